"""`SSMNetwork.growing_modes(dt_scale)` counts the modes that grow at the scaled step Δ·s (the
export's --dt-scale check), against |1 + Δ·s·A| of forward Euler computed here from the
parameters in Python complex numbers; modes on or just inside the unit circle are not counted,
and one growing mode is enough for the trainer's warning."""

from __future__ import annotations

import math

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.model import train as train_mod


def _euler_magnitudes(net: SSMNetwork, scale: float) -> list[float]:
    mags = []
    for ssm in net.ssms:
        for h, log_dt in enumerate(ssm.log_dt.tolist()):
            for re_, im in zip(ssm.log_A_real[h].tolist(), ssm.A_imag[h].tolist()):
                mags.append(abs(1 + scale * math.exp(log_dt) * complex(-math.exp(re_), im)))
    return mags


def test_growing_modes_counts_the_modes_growing_at_the_scaled_step():
    torch.manual_seed(0)
    cfg = SSMConfig(d_input=1, d_model=4, n_layers=2, d_state=8, discretization="euler")
    net = SSMNetwork(cfg)
    counts = []
    for scale in (0.01, 1.0, 4.0):
        mags = _euler_magnitudes(net, scale)
        grow, modes, largest = net.growing_modes(scale)
        assert (grow, modes) == (sum(m > 1 for m in mags), len(mags))
        assert largest == pytest.approx(max(mags), rel=1e-6)
        counts.append(grow)
    assert counts[0] == 0 and counts[0] < counts[1] < counts[2]  # three different cases


def test_barely_decaying_bilinear_modes_are_not_counted_as_growing():
    """Bilinear maps Re A < 0 inside the unit circle; with Re A ≈ -6e-6 its float32 |Ā| rounds
    above 1 for some modes, so the count must be taken in float64."""
    torch.manual_seed(0)
    cfg = SSMConfig(d_input=1, d_model=4, n_layers=1, d_state=64, discretization="bilinear")
    net = SSMNetwork(cfg)
    with torch.no_grad():
        net.ssms[0].log_A_real.fill_(-12.0)
    assert (net.ssms[0].discrete()[0].abs() > 1).any()  # the float32 rounding is there
    grow, modes, largest = net.growing_modes()
    assert (grow, modes) == (0, 128) and largest < 1


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_a_mode_whose_re_a_underflowed_to_zero_is_not_growing(method):
    """Re A = -exp(-1000) = 0: |Ā| is 1 up to float64 rounding of cos and sin, on the unit
    circle, neither decaying nor growing."""
    torch.manual_seed(0)
    cfg = SSMConfig(d_input=1, d_model=4, n_layers=1, d_state=16, discretization=method)
    net = SSMNetwork(cfg)
    with torch.no_grad():
        net.ssms[0].log_A_real.fill_(-1000.0)
    grow, modes, largest = net.growing_modes()
    assert (grow, modes) == (0, 32)
    assert largest == pytest.approx(1.0, abs=1e-12)


def test_a_single_growing_mode_is_warned_of(caplog):
    """One mode of an otherwise stable euler network is pushed past |1 + ΔA| = 1: the
    warning names it (a count of one is a count)."""
    torch.manual_seed(0)
    cfg = SSMConfig(d_input=1, d_model=4, n_layers=1, d_state=4, discretization="euler",
                    dt_min=1e-3, dt_max=1e-3)  # fmt: skip
    net = SSMNetwork(cfg)
    with torch.no_grad():
        net.ssms[0].A_imag[0, 1] = 3000.0  # |1 + ΔA| ≈ |1 + 3i| > 1 for this mode only
    assert sum(m > 1 for m in _euler_magnitudes(net, 1.0)) == 1
    with caplog.at_level("WARNING", logger="ssmstream.model.train"):
        train_mod._warn_of_growing_modes(net)
    assert any(r.getMessage().startswith("1 of 8 modes grow") for r in caplog.records)
