"""Discretizations against closed forms, the stability table of docs/theory.md, and the layer's
kernel against the impulse response of its own recurrence.

- ZOH of a scalar system is Ā = e^{ΔA}, B̄ = (e^{ΔA} − 1)/A · B: here from Python's `cmath`,
  not torch, for real and complex A and steps from 1e-6 to 10.
- The stability column of the table: for Re A < 0, zoh, bilinear, backward Euler and gbt(α ≥ ½)
  keep |Ā| < 1 at every Δ; forward Euler exactly while Δ < −2 Re A / |A|²; gbt(α < ½) exactly
  while |1 + (1−α)ΔA| < |1 − αΔA|; as Δ → ∞ backward Euler's Ā → 0 and bilinear's |Ā| → 1.
- The kernel `SSM.kernel` convolves with is what `SSM.step` answers to a unit impulse on one
  input channel (minus the D skip at l = 0), for every head layout and discretization.

Letters: D d_model, H heads, M head width, N state (N/2 modes), L length.
"""

from __future__ import annotations

import cmath

import pytest
import torch
from ssmstream.model import ssm
from ssmstream.model.layers import SSM

F64, C128 = torch.float64, torch.complex128


def _diag(values) -> torch.Tensor:
    return torch.tensor(values, dtype=C128)


@pytest.mark.parametrize("dt", [1e-6, 1e-3, 0.1, 1.0, 10.0])
def test_zoh_of_a_scalar_system_is_the_exponential(dt):
    A = [-0.5, -2.0 + 3.0j, -1e-3 + 40.0j, -7.0 - 0.25j]
    B = [1.0, 0.5 - 2.0j, 1j, -3.0]
    dA, dB = ssm.discretize(_diag(A), _diag(B), torch.tensor(dt, dtype=F64), "zoh")
    want_dA = _diag([cmath.exp(dt * a) for a in A])
    # (e^{ΔA} − 1)/A = Δ · Σ_k (ΔA)^k / (k+1)!: the series, where e^{ΔA} − 1 would cancel
    phi = [sum((dt * a) ** k / _fact(k + 1) for k in range(30)) if abs(dt * a) < 1 else
           (cmath.exp(dt * a) - 1) / (dt * a) for a in A]  # fmt: skip
    want_dB = _diag([dt * p * b for p, b in zip(phi, B)])
    torch.testing.assert_close(dA, want_dA, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dB, want_dB, rtol=1e-12, atol=1e-18)


def _fact(n: int) -> float:
    out = 1.0
    for k in range(2, n + 1):
        out *= k
    return out


# stable continuous modes: slow, fast, oscillating and nearly undamped ones
MODES = _diag([-0.5, -50.0, -0.5 + 30.0j, -1e-3 + 2.0j, -2.0 - 7.0j, -1.0 + 0j])
DTS = torch.logspace(-4, 4, 81, dtype=F64)[:, None]  # [T, 1]


def _dA(method: str, alpha: float = 0.5) -> torch.Tensor:
    dA, _ = ssm.discretize(MODES, torch.ones_like(MODES), DTS, method, alpha)
    return dA  # [T, N]


@pytest.mark.parametrize(
    "method, alpha",
    [("zoh", 0.5), ("bilinear", 0.5), ("backward_euler", 0.5), ("gbt", 0.5), ("gbt", 0.75),
     ("gbt", 1.0)],
)  # fmt: skip
def test_a_stable_methods_keep_every_mode_inside_the_unit_circle(method, alpha):
    assert (_dA(method, alpha).abs() < 1).all()


def test_forward_euler_is_stable_exactly_below_its_step_bound():
    bound = -2 * MODES.real / MODES.abs() ** 2  # [N]: Δ < −2 Re A / |A|²
    inside = _dA("euler").abs() < 1  # [T, N]
    assert (inside == (DTS < bound)).all()
    assert inside.any() and not inside.all()  # the grid crosses the bound of each mode
    assert (~inside).any(0).all() and inside.any(0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.45])
def test_gbt_below_one_half_is_stable_exactly_where_the_table_says(alpha):
    z = DTS * MODES  # [T, N]
    rule = (1 + (1 - alpha) * z).abs() < (1 - alpha * z).abs()
    inside = _dA("gbt", alpha).abs() < 1
    assert (inside == rule).all()
    assert inside.any() and not inside.all()


def test_large_steps_backward_euler_damps_and_bilinear_keeps_the_magnitude():
    big = torch.tensor(1e8, dtype=F64)
    be, _ = ssm.discretize(MODES, torch.ones_like(MODES), big, "backward_euler")
    bl, _ = ssm.discretize(MODES, torch.ones_like(MODES), big, "bilinear")
    assert be.abs().max() < 1e-6  # L-stable: Ā → 0
    torch.testing.assert_close(bl.abs(), torch.ones(len(MODES), dtype=F64), rtol=0, atol=1e-6)
    assert (bl.abs() < 1).all()


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler", "backward_euler", "gbt"])
@pytest.mark.parametrize("heads", [None, 2, 1], ids=["siso", "multihead", "mimo"])
def test_kernel_is_the_impulse_response_of_the_recurrence(heads, method):
    D, L = 4, 24
    torch.manual_seed(0)
    # Δ = 0.02: forward Euler is stable for the three S4D-Lin modes (Δ < 1/(¼ + π²n²) = 0.025)
    layer = SSM(D, 6, heads, discretization=method, alpha=0.3, dt_min=0.02, dt_max=0.02)
    layer = layer.double().eval()
    M = layer.M
    with torch.no_grad():
        K = layer.kernel(L)  # [H, P, M, L]
        for c in range(D):  # a unit impulse on input channel c = h·M + m at l = 0
            h, m = divmod(c, M)
            x = layer.initial_state(1)
            u = torch.zeros(1, D, dtype=F64)
            u[0, c] = 1.0
            ys = []
            for _ in range(L):
                y, x = layer.step(u, x)
                ys.append(y[0])
                u = torch.zeros(1, D, dtype=F64)
            response = torch.stack(ys, -1)  # [D, L]
            response[c, 0] -= layer.D[c]  # the skip term is not part of K
            want = torch.zeros(D, L, dtype=F64)
            want[h * M : (h + 1) * M] = K[h, :, m]  # outputs of head h: K[h, p, m, l]
            assert K[h, :, m].abs().max() > 1e-3  # a real kernel, not a vanishing one
            torch.testing.assert_close(response, want, rtol=1e-10, atol=1e-13)


def test_zoh_kernel_is_the_continuous_kernel_integrated_over_each_step():
    """K(t) = 2 Re Σ_n C_n e^{tA_n} B_n (docs/theory.md §6); with ZOH the layer's kernel is
    K̄_l = ∫_{lΔ}^{(l+1)Δ} K(t) dt, here by Simpson's rule on the continuous kernel."""
    torch.manual_seed(0)
    layer = SSM(2, 8, None, discretization="zoh", dt_min=0.3, dt_max=0.3).double()
    L, n = 12, 400  # steps, Simpson intervals per step (even)
    with torch.no_grad():
        K = layer.kernel(L)[:, 0, 0]  # [H, L]
        A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag)  # [H, N/2]
        B = torch.view_as_complex(layer.B)[..., 0]  # [H, N/2]
        C = torch.view_as_complex(layer.C)[:, 0]  # [H, N/2]
        dt = torch.exp(layer.log_dt)  # [H]
    s = torch.linspace(0, 1, n + 1, dtype=F64)  # one step, in units of Δ
    w = torch.ones(n + 1, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0  # Simpson weights 1 4 2 4 … 2 4 1
    for h in range(K.shape[0]):
        want = []
        for l in range(L):
            t = dt[h] * (l + s)  # [n+1]
            Kt = 2 * (C[h, :, None] * torch.exp(A[h, :, None] * t) * B[h, :, None]).sum(0).real
            want.append((w * Kt).sum() * dt[h] / (3 * n))
        torch.testing.assert_close(K[h], torch.stack(want), rtol=1e-9, atol=1e-12)
        # and not the kernel's samples Δ·K(lΔ), which the docs' "≈" stands for
        samples = torch.stack(
            [dt[h] * 2 * (C[h] * torch.exp(A[h] * dt[h] * l) * B[h]).sum().real for l in range(L)]
        )
        assert (K[h] - samples).abs().max() > 1e-3
