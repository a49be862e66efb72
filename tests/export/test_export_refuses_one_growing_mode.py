"""A single growing mode is enough to make a model's outputs grow without bound over a
stream: the export refuses it like a model whose modes all grow, writing nothing."""

from __future__ import annotations

import math

import pytest
import torch
from export_helpers import EXPORT
from ssmstream.export import ExportFailed, export_network
from ssmstream.model import SSMConfig, SSMNetwork


def test_a_model_with_exactly_one_growing_mode_is_refused(tmp_path):
    torch.manual_seed(0)
    dt = 1e-3
    cfg = SSMConfig(d_input=1, d_output=1, d_model=4, n_layers=1, d_state=8,
                    discretization="euler", dt_min=dt, dt_max=dt)  # fmt: skip
    net = SSMNetwork(cfg).eval()
    ssm = net.ssms[0]
    with torch.no_grad():
        ssm.log_A_real[1, 2] = math.log(3 / dt)  # Euler: Ā = 1 + ΔA, |Ā| ≥ |1 − 3| = 2
    re_a = -torch.exp(ssm.log_A_real.double())
    mags = (1 + dt * torch.complex(re_a, ssm.A_imag.double())).abs()  # every mode's |Ā|
    assert int((mags > 1).sum()) == 1  # the premise: the others decay
    with pytest.raises(ExportFailed, match=rf"^the model is unstable: 1 of {mags.numel()} modes"):
        export_network(net, tmp_path / "model", **EXPORT)
    assert list(tmp_path.iterdir()) == []
