"""A run whose initialization has growing modes (|Ā| > 1: forward Euler, or gbt with α < ½, at
too large a Δ·|A|, docs/theory.md §2) says so when it starts, with the count of such modes:
a short training window does not show the growth, and the export refuses the model."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from ssmstream.model import SSMNetwork
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, default_model_config, fit


def _growing(net: SSMNetwork, alpha: float) -> int:
    """Modes with |Ā| > 1, Ā = (1 + (1 − α)ΔA) / (1 − αΔA) in Python complex numbers."""
    n = 0
    for ssm in net.ssms:
        for h, log_dt in enumerate(ssm.log_dt.tolist()):
            for re_, im in zip(ssm.log_A_real[h].tolist(), ssm.A_imag[h].tolist()):
                z = math.exp(log_dt) * complex(-math.exp(re_), im)
                n += abs((1 + (1 - alpha) * z) / (1 - alpha * z)) > 1
    return n


@pytest.mark.parametrize(
    "model, alpha",
    [
        (dict(discretization="euler"), 0.0),
        (dict(discretization="gbt", alpha=0.2), 0.2),
        (dict(discretization="euler", dt_max=0.01), 0.0),  # below 2·½/|A|² of the fastest mode
        (dict(discretization="zoh"), None),
    ],
    ids=["euler", "gbt-0.2", "euler-small-dt", "zoh"],
)
def test_growing_modes_at_initialization_are_warned_of(tmp_path, caplog, model, alpha):
    cfg = default_model_config("signal", d_model=8, n_layers=2, d_state=8, **model)
    train = TrainConfig(task="signal", out=str(tmp_path / "o"), signal=SignalConfig(rate=4.0,
                        duration=2.0), batch_size=1, steps=1, warmup_steps=0, eval_batches=1,
                        progress=False, threads=1)  # fmt: skip
    torch.manual_seed(train.seed)  # the run's initialization, drawn again here
    n = _growing(SSMNetwork(cfg), alpha) if alpha is not None else 0
    assert (n > 0) == (alpha is not None and "dt_max" not in model)  # the cases are what they say
    with caplog.at_level(logging.WARNING, logger="ssmstream.model.train"):
        fit(cfg, train)
    said = [r.getMessage() for r in caplog.records if "grow at initialization" in r.getMessage()]
    if n == 0:
        assert said == []
    else:
        assert len(said) == 1
        assert re.match(rf"{n} of 64 modes grow at initialization \(\|Ā\| up to ", said[0])
        assert "use a smaller --dt-max (now 0.1)" in said[0]
