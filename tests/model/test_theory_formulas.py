"""Formulas of docs/theory.md that no other test states, each against a second computation.

- §3: a prompt's k-th output sees the incoming state through Ā^{k+1} (x₀ is the state before
  the first input), checked against `SSM.step` from a non-zero state with zero input.
- §5: a ZOH layer whose Δ is divided by `ssm.rescale_dt(·, c)` gives, on a held signal
  sampled c times as densely, the outputs of the original layer at the shared sample times.
- §2: forward Euler with S4D-Lin at the default sizes (d_state 64, Δ in [1e-3, 0.1]) starts
  with growing modes in every head, counted in plain complex arithmetic and by
  `SSMNetwork.growing_modes`.
- §4: the packed state sizes of the shipped byte-lm and of the benchmark's probe model, from
  their recorded configs and the built network's `state_layout()`.
- §8: every discretization of the leaky integrator ẋ = −x + u keeps Ā + B̄ = 1; the update is
  a convex combination at every step only for backward Euler and ZOH.

Letters: D d_model, H heads, M head width, N state (N/2 modes), L length.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, ssm
from ssmstream.model.layers import SSM

F64, C128 = torch.float64, torch.complex128
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("heads", [None, 2], ids=["siso", "multihead"])
def test_the_initial_states_share_of_output_k_goes_through_a_to_the_k_plus_one(heads):
    D, N, L = 4, 6, 9
    torch.manual_seed(0)
    layer = SSM(D, N, heads, dt_min=0.05, dt_max=0.5).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.complex(*torch.randn(2, 1, layer.heads, layer.N2, generator=g, dtype=F64))
    with torch.no_grad():
        dA, _, C = layer.discrete()  # [H, N/2], [H, N/2, M], [H, M, N/2]
        x, ys = x0, []
        for _ in range(L):
            y, x = layer.step(torch.zeros(1, D, dtype=F64), x)
            ys.append(y[0])
    got = torch.stack(ys)  # [L, D]: zero input, so only the incoming state's share
    powers = torch.stack([dA ** (k + 1) for k in range(L)])  # [L, H, N/2]
    want = 2 * torch.einsum("hpn,khn->khp", C, powers * x0[0]).real.reshape(L, D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    one_short = 2 * torch.einsum("hpn,khn->khp", C, powers / dA * x0[0]).real.reshape(L, D)
    assert (got - one_short).abs().max() > 1e-2  # Ā^k would be another answer


@pytest.mark.parametrize("c", [2, 3])
def test_dividing_dt_by_c_runs_a_held_signal_sampled_c_times_as_densely(c):
    """ZOH is exact for a held input, so the layer at Δ/c on each sample repeated c times
    ends every c-th step where the layer at Δ ends each step: the same outputs there."""
    D, N, L = 3, 8, 40
    torch.manual_seed(0)
    coarse = SSM(D, N, discretization="zoh", dt_min=0.05, dt_max=0.5).double()
    fine = copy.deepcopy(coarse)
    with torch.no_grad():
        fine.log_dt.copy_(torch.log(ssm.rescale_dt(torch.exp(coarse.log_dt), c)))
    u = torch.randn(1, L, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        y = coarse(u)  # [1, L, D]
        y_fine = fine(u.repeat_interleave(c, dim=1))  # [1, c·L, D]
        y_slow = coarse(u.repeat_interleave(c, dim=1))  # the same samples, Δ not rescaled
    torch.testing.assert_close(y_fine[:, c - 1 :: c], y, rtol=1e-10, atol=1e-12)
    assert (y_slow[:, c - 1 :: c] - y).abs().max() > 1e-2


def test_forward_euler_with_s4d_lin_at_the_default_sizes_grows_in_every_head():
    cfg = SSMConfig(vocab_size=4, d_model=16, n_layers=2, discretization="euler")
    assert (cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max) == (64, "s4d-lin", 1e-3, 0.1)
    torch.manual_seed(0)
    net = SSMNetwork(cfg)
    growing, heads = 0, 0
    for layer in net.ssms:
        for h, log_dt in enumerate(layer.log_dt.tolist()):
            dt = math.exp(log_dt)
            As = [complex(-math.exp(a), b) for a, b in
                  zip(layer.log_A_real[h].tolist(), layer.A_imag[h].tolist())]  # fmt: skip
            grows = [abs(1 + dt * A) > 1 for A in As]
            growing, heads = growing + sum(grows), heads + any(grows)
            assert grows[-1], "the fastest mode, n = 31, needs Δ < 1.05e-4 < dt_min"
    assert heads == 2 * 16
    assert net.growing_modes()[:2] == (growing, 2 * 16 * 32)
    assert 1 / (0.25 + (math.pi * 31) ** 2) < cfg.dt_min  # the bound of docs/theory.md §2


def test_the_leaky_integrator_keeps_a_plus_b_one_and_only_some_methods_stay_convex():
    z = torch.linspace(-6.0, 6.0, 49, dtype=F64)  # gate logits
    dt = torch.exp(z)
    A = torch.full_like(z, -1.0).to(C128)  # ẋ = −x + u
    B = torch.ones_like(A)
    exact = {  # Ā for A = −1 by hand
        "backward_euler": 1 / (1 + dt),
        "zoh": torch.exp(-dt),
        "bilinear": (1 - dt / 2) / (1 + dt / 2),
        "euler": 1 - dt,
        "gbt": (1 - 0.7 * dt) / (1 + 0.3 * dt),
    }
    for method, want in exact.items():
        dA, dB = ssm.discretize(A, B, dt, method, alpha=0.3)
        torch.testing.assert_close(dA.real, want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close((dA + dB).real, torch.ones_like(z), rtol=0, atol=1e-12)
        convex = ((dA.real >= 0) & (dA.real <= 1)).all()
        assert bool(convex) == (method in ("backward_euler", "zoh")), method
    dA, _ = ssm.discretize(A, B, dt, "bilinear")
    assert ((dA.real < 0) == (dt > 2)).all()  # bilinear's Ā turns negative past Δ = 2


@pytest.mark.parametrize(
    "recorded, floats",
    [("examples/checkpoints/byte-lm/config.json", 16_384),
     ("benchmarks/results/bench_export.json", 131_072)],
    ids=["byte-lm", "probe"],
)  # fmt: skip
def test_the_packed_state_sizes_are_the_ones_the_theory_page_states(recorded, floats):
    """S = n_layers · H · N floats (docs/theory.md §4): 16,384 (64 KiB) for byte-lm, 131,072
    for the probe model, against the layout a built network packs its state by."""
    cfg = SSMConfig.from_dict(json.loads((ROOT / recorded).read_text())["model"])
    net = SSMNetwork(cfg)
    layout = net.state_layout()
    assert sum(e["size"] for e in layout) == cfg.state_size == floats
    assert layout[-1]["offset"] + layout[-1]["size"] == floats
    assert all(e["shape"] == [2, cfg.d_model, cfg.d_state // 2] for e in layout)  # SISO
    states = [torch.zeros(1, s.heads, s.N2, dtype=torch.complex64) for s in net.ssms]
    assert net.pack_state(states).shape == (1, floats)
    if floats == 16_384:
        assert 4 * floats == 64 * 1024  # float32 bytes per session
