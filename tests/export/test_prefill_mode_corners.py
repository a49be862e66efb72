"""The prefill graph's polar form dA = exp(log|dA| + i·arg dA) at modes the other tests never
reach.

Every network in tests/export is a fresh S4D-Lin one: Im A = π n ≥ 0 and Δ ≤ 0.1, so every
arg dA lies in [0, π) and no |dA| is small unless dB is too (the one vanished-mode test is ZOH,
where dB ≈ -B/A is tiny when dA is). Trained weights have neither property:

- Im A is a free parameter (either sign), and Δ·Im A wraps past ±π: arg dA in (-π, 0).
- a bilinear (or Euler) mode near Δ·A = -2 (-1) has |dA| ≪ 1 with dB ≈ Δ B / 2 large: its
  tiny powers dA^k are read from log|dA| in the tables, so they must be exact there too.

Both are checked as the rest of tests/export checks the prefill: the step graph and both
prefill paths (kernel / mode scan) against the network's float64 convolution forward, from zero
and from a non-zero state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from export_helpers import conv_reference, rel, run_steps
from ssmstream.export.modules import PrefillGraph, StepGraph
from ssmstream.model import SSMConfig, SSMNetwork

TOL = 1e-4  # max |error| / max |reference|, float32 graphs


def check_all_views(net: SSMNetwork, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 48, net.cfg.d_input, generator=g)
    warm = torch.randn(2, 21, net.cfg.d_input, generator=g)
    zero = torch.zeros(2, net.cfg.state_size)
    step = StepGraph(net)
    y_step, s_step = run_steps(step, x, zero)
    assert rel(y_step, conv_reference(net, x)) < TOL
    _, state = run_steps(step, warm, zero)
    y_warm, s_warm = run_steps(step, x, state)
    for mode_path in (False, True):
        pre = PrefillGraph(net, chunk=16, max_chunks=4, mode_path=mode_path)
        with torch.no_grad():
            y0, s0, _ = pre(x, zero)
            y1, s1, _ = pre(x, state)
            y2, s2, _ = pre(torch.cat([x[:, :37], x[:, :11]], 1), state, torch.tensor(37))
        y_37, s_37 = run_steps(step, x[:, :37], state)
        assert rel(y0, y_step) < TOL and rel(s0, s_step) < TOL, mode_path
        assert rel(y1, y_warm) < TOL and rel(s1, s_warm) < TOL, mode_path
        assert rel(y2[:, :37], y_37) < TOL and rel(s2, s_37) < TOL, mode_path


@pytest.mark.parametrize("heads", [None, 2], ids=["siso", "multihead"])
def test_modes_with_negative_and_wrapped_phases(heads):
    """Im A of both signs and Δ·|Im A| up to ~3π (arg dA wraps): trained-looking weights."""
    torch.manual_seed(1)
    cfg = SSMConfig(d_input=3, d_output=2, d_model=8, n_layers=2, d_state=8, heads=heads,
                    dt_min=0.05, dt_max=0.2)  # fmt: skip
    net = SSMNetwork(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ssm in net.ssms:
            ssm.A_imag.copy_(40 * torch.randn(ssm.A_imag.shape, generator=g))
    phases = [torch.angle(ssm.discrete()[0]) for ssm in net.ssms]
    assert min(p.min().item() for p in phases) < -1.0  # some arg dA well below 0
    check_all_views(net, seed=3)


@pytest.mark.parametrize("method, edge", [("bilinear", 2.0), ("euler", 1.0)])
def test_fast_modes_with_a_large_dB(method, edge):
    """Real modes at Δ·|A| just past the point where dA = 0 (bilinear: 2, Euler: 1), Δ = 1:
    |dA| from 1e-4 to 8e-4 while |dB| ≈ Δ/2 (bilinear) or Δ (Euler) is of order one."""
    torch.manual_seed(5)
    cfg = SSMConfig(d_input=3, d_output=2, d_model=8, n_layers=2, d_state=8,
                    discretization=method, init="s4d-real")  # fmt: skip
    net = SSMNetwork(cfg).eval()
    eps = torch.tensor([2e-4, 6e-4, 1e-3, 1.6e-3])  # bilinear |dA| = eps / (2 + eps)
    with torch.no_grad():
        for ssm in net.ssms:
            ssm.log_dt.zero_()  # Δ = 1
            scale = eps if method == "bilinear" else eps / 2
            ssm.log_A_real.copy_(torch.log(edge * (1 + scale)).expand_as(ssm.log_A_real))
    for ssm in net.ssms:
        with torch.no_grad():
            dA, dB, _ = copy.deepcopy(ssm).double().discrete()
        assert dA.abs().max() < 1e-3 and dA.abs().min() > 5e-5
        assert dB.abs().min() > 0.4
    check_all_views(net, seed=6)
