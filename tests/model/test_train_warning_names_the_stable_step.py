"""When forward Euler's growing modes need a Δ below --dt-min, `ssmstream train`'s warning says
so and names the step below which every mode is stable: at the default --d-state 64 the
fastest S4D-Lin mode (n = 31, A = −½ + 31πi) needs Δ < −2 Re A / |A|² = 1/(¼ + (31π)²)
≈ 1.05e-4 (docs/theory.md §2), under the default --dt-min 0.001, so a smaller --dt-max alone
cannot remove them. That step is the threshold: every mode is stable just below it and one
grows just above it."""

from __future__ import annotations

import logging
import math

import pytest
from ssmstream.model import SSMNetwork
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, default_model_config, fit


def _config(**model):
    model = {"discretization": "euler"} | model
    return default_model_config("signal", d_model=4, n_layers=1, **model)


def _warning(tmp_path, caplog, **model) -> str:
    cfg = _config(**model)
    train = TrainConfig(task="signal", out=str(tmp_path / "o"), signal=SignalConfig(rate=4.0,
                        duration=2.0), batch_size=1, steps=1, warmup_steps=0, eval_batches=1,
                        progress=False, threads=1)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ssmstream.model.train"):
        fit(cfg, train)
    (said,) = [r.getMessage() for r in caplog.records if "grow at initialization" in r.getMessage()]
    return said


@pytest.mark.parametrize("method, alpha", [("euler", 0.0), ("gbt", 0.25)])
def test_the_warning_names_the_step_every_mode_needs_when_it_is_below_dt_min(
    tmp_path, caplog, method, alpha
):
    """gbt(α < ½): |Ā| < 1 ⇔ Δ < −2 Re A / ((1 − 2α)|A|²), so α = ¼ doubles Euler's step."""
    model = dict(discretization=method, alpha=alpha)
    limit = 1 / ((1 - 2 * alpha) * (0.25 + (31 * math.pi) ** 2))  # fastest mode of d_state 64
    said = _warning(tmp_path, caplog, **model)
    assert f"use a smaller --dt-max (now 0.1) and --dt-min (now 0.001): every mode is " \
           f"stable only for Δ < {limit:.3g}; or an A-stable" in said  # fmt: skip
    for dt, grows in ((0.99 * limit, False), (1.01 * limit, True)):
        net = SSMNetwork(_config(dt_min=dt, dt_max=dt, **model))
        assert (net.growing_modes()[0] > 0) == grows, dt


@pytest.mark.parametrize("model", [dict(d_state=8), dict(d_state=64, dt_min=1e-4)])
def test_the_warning_asks_only_for_a_smaller_dt_max_when_dt_min_is_small_enough(
    tmp_path, caplog, model
):
    """d_state 8: the fastest mode (n = 3) needs Δ < 1/(¼ + 9π²) ≈ 0.0112, above --dt-min."""
    said = _warning(tmp_path, caplog, **model)
    assert "use a smaller --dt-max (now 0.1) or an A-stable" in said
    assert "--dt-min" not in said
