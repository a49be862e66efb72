"""Tests of ssmstream.model.ssm: each formula against an independent computation.

- discretizations: the diagonal (elementwise) form against dense matrices built from the
  diagonal; ZOH against Van Loan's block matrix exponential (no A⁻¹ involved); the GBT
  family against its defining linear equations and its three named members.
- kernels: `ssm_kernel` against explicit matrix powers C Ā^l B̄, `ssm_kernel_dense`
  against `torch.linalg.matrix_power`.
- convolutions / scan: `causal_conv`, `causal_conv_mimo`, `diagonal_scan` against direct
  O(L²) sums and the explicit recurrence.

All tight checks run in float64 (complex128). Letters: N state, M inputs, P outputs, L length.
"""

from __future__ import annotations

import math

import pytest
import torch
from ssmstream.model import ssm

F64, C128 = torch.float64, torch.complex128
GBT_METHODS = ("euler", "bilinear", "backward_euler")
ALPHA_OF = {"euler": 0.0, "bilinear": 0.5, "backward_euler": 1.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stable_diag(N: int, seed: int) -> torch.Tensor:
    """A random complex diagonal with Re < 0: [N] complex128."""
    g = _gen(seed)
    re = -(0.1 + torch.rand(N, generator=g, dtype=F64))  # [N]
    im = 4 * torch.randn(N, generator=g, dtype=F64)  # [N]
    return torch.complex(re, im)


def _crandn(*shape: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.complex(
        torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)
    )


def _van_loan_zoh(A: torch.Tensor, B: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ZOH by one matrix exponential:  exp(dt [[A, B], [0, 0]]) = [[Ā, B̄], [0, I]]."""
    N, M = B.shape
    big = torch.zeros(N + M, N + M, dtype=A.dtype)  # [N+M, N+M]
    big[:N, :N], big[:N, N:] = A, B
    E = torch.linalg.matrix_exp(dt * big)
    return E[:N, :N], E[:N, N:]


# --- discretizations ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zoh", *GBT_METHODS, "gbt"])
def test_diagonal_equals_dense_on_a_diagonal_matrix(method):
    N, M, dt = 6, 3, 0.37
    A = _stable_diag(N, seed=1)  # [N]
    B = _crandn(N, M, seed=2)  # [N, M]
    dA, dB = ssm.discretize(A[:, None], B, torch.tensor(dt, dtype=F64), method, alpha=0.3)
    dA_dense, dB_dense = ssm.discretize_dense(torch.diag(A), B, dt, method, alpha=0.3)
    # the dense result of a diagonal A is diagonal, with the elementwise values on it
    torch.testing.assert_close(dA_dense, torch.diag(dA[:, 0]), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dB_dense, dB, rtol=1e-12, atol=1e-13)


def test_diagonal_zoh_matches_van_loan_matrix_exponential():
    N, M, dt = 5, 2, 0.21
    a = _stable_diag(N, seed=4)
    A, B = torch.diag(a), _crandn(N, M, seed=5)
    dA_d, dB = ssm.discretize(a[:, None], B, torch.tensor(dt, dtype=F64), "zoh")
    ref_dA, ref_dB = _van_loan_zoh(A, B, dt)
    torch.testing.assert_close(torch.diag(dA_d[:, 0]), ref_dA, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(dB, ref_dB, rtol=1e-11, atol=1e-12)


def test_dense_zoh_matches_the_inverse_formula():
    """discretize_dense takes ZOH from one block exponential; on an invertible A that is
    dA = exp(dt A), dB = A⁻¹ (exp(dt A) − I) B."""
    N, M, dt = 5, 2, 0.21
    g = _gen(3)  # a full (non-normal) real matrix, shifted to be stable
    A = torch.randn(N, N, generator=g, dtype=F64) - 3 * torch.eye(N, dtype=F64)
    B = torch.randn(N, M, generator=g, dtype=F64)
    dA, dB = ssm.discretize_dense(A, B, dt, "zoh")
    ref_dA = torch.linalg.matrix_exp(dt * A)
    ref_dB = torch.linalg.solve(A, (ref_dA - torch.eye(N, dtype=F64)) @ B)
    torch.testing.assert_close(dA, ref_dA, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(dB, ref_dB, rtol=1e-11, atol=1e-12)


def test_dense_zoh_of_a_singular_matrix_is_the_closed_form():
    """The double integrator (A singular, no A⁻¹): dA = [[1, dt], [0, 1]], dB = [dt²/2, dt]."""
    dt = 0.1
    A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)
    dA, dB = ssm.discretize_dense(A, torch.tensor([[0.0], [1.0]], dtype=F64), dt, "zoh")
    torch.testing.assert_close(dA, torch.tensor([[1.0, dt], [0.0, 1.0]], dtype=F64))
    torch.testing.assert_close(dB, torch.tensor([[dt**2 / 2], [dt]], dtype=F64))


@pytest.mark.parametrize("dt", [1e-3, 1e-4, 1e-5])
def test_float32_zoh_keeps_its_precision_at_small_dt(dt):
    """exp(dt A) − 1 cancels in float32 at small dt unless taken as expm1: the float32 dB
    matches the float64 one to float32 precision."""
    A = -torch.exp(torch.linspace(-1, 1, 16, dtype=F64)) + 1j * torch.linspace(0, 30, 16)
    B = torch.ones(16, dtype=torch.complex128)
    _, ref = ssm.discretize(A, B, torch.tensor(dt, dtype=F64), "zoh")
    _, dB = ssm.discretize(A.to(torch.complex64), B.to(torch.complex64), torch.tensor(dt), "zoh")
    err = ((dB.to(torch.complex128) - ref).abs() / ref.abs()).max()
    assert err < 2e-6, err


def test_zoh_is_exact_for_piecewise_constant_input():
    """x(t+dt) of x' = Ax + Bu with u held constant, by many small RK4 steps."""
    N, dt, u = 4, 0.3, 0.8
    A, B = torch.diag(_stable_diag(N, seed=6)), _crandn(N, 1, seed=7)
    x0 = _crandn(N, 1, seed=8)
    dA, dB = ssm.discretize_dense(A, B, dt, "zoh")

    def f(x):
        return A @ x + B * u

    x, h = x0.clone(), dt / 2000
    for _ in range(2000):
        k1 = f(x)
        k2 = f(x + h / 2 * k1)
        k3 = f(x + h / 2 * k2)
        k4 = f(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(dA @ x0 + dB * u, x, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_gbt_solves_its_defining_equations_on_a_dense_matrix(alpha):
    """(I − αΔA) Ā = I + (1−α)ΔA  and  (I − αΔA) B̄ = ΔB, checked by multiplication."""
    N, M, dt = 5, 3, 0.4
    g = _gen(9)
    A = torch.randn(N, N, generator=g, dtype=F64) - 2 * torch.eye(N, dtype=F64)
    B = torch.randn(N, M, generator=g, dtype=F64)
    dA, dB = ssm.discretize_dense(A, B, dt, "gbt", alpha=alpha)
    eye = torch.eye(N, dtype=F64)
    lhs = eye - alpha * dt * A
    torch.testing.assert_close(lhs @ dA, eye + (1 - alpha) * dt * A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lhs @ dB, dt * B, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", GBT_METHODS)
@pytest.mark.parametrize("dense", [False, True], ids=["diagonal", "dense"])
def test_gbt_family_reproduces_named_methods(method, dense):
    """gbt(α=0, ½, 1) = euler, bilinear, backward_euler; and each named formula by hand."""
    N, M, dt = 4, 2, 0.3
    a = _stable_diag(N, seed=10)
    B = _crandn(N, M, seed=11)
    if dense:
        A = torch.diag(a)
        named = ssm.discretize_dense(A, B, dt, method)
        gbt = ssm.discretize_dense(A, B, dt, "gbt", alpha=ALPHA_OF[method])
        eye = torch.eye(N, dtype=C128)
        inv = torch.linalg.inv
        by_hand = {
            "euler": (eye + dt * A, dt * B),
            "backward_euler": (inv(eye - dt * A), inv(eye - dt * A) @ (dt * B)),
            "bilinear": (
                inv(eye - dt / 2 * A) @ (eye + dt / 2 * A),
                inv(eye - dt / 2 * A) @ (dt * B),
            ),
        }[method]
    else:
        dt_t = torch.tensor(dt, dtype=F64)
        named = ssm.discretize(a[:, None], B, dt_t, method)
        gbt = ssm.discretize(a[:, None], B, dt_t, "gbt", alpha=ALPHA_OF[method])
        z = dt * a[:, None]  # [N, 1]
        by_hand = {
            "euler": (1 + z, dt * B + 0 * z),
            "backward_euler": (1 / (1 - z), dt * B / (1 - z)),
            "bilinear": ((1 + z / 2) / (1 - z / 2), dt * B / (1 - z / 2)),
        }[method]
    for got, want in zip(named, gbt):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    for got, want in zip(named, by_hand):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_discretize_broadcasts_per_channel_dt():
    """dt [H, 1] against A [H, N]: each row equals its own dense discretization."""
    H, N = 3, 4
    A = torch.stack([_stable_diag(N, seed=20 + h) for h in range(H)])  # [H, N]
    B = _crandn(H, N, seed=30)  # [H, N]
    dt = torch.tensor([[0.01], [0.1], [0.5]], dtype=F64)  # [H, 1]
    dA, dB = ssm.discretize(A, B, dt, "bilinear")  # [H, N]
    for h in range(H):
        rdA, rdB = ssm.discretize_dense(torch.diag(A[h]), B[h, :, None], float(dt[h]), "bilinear")
        torch.testing.assert_close(dA[h], torch.diagonal(rdA), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(dB[h], rdB[:, 0], rtol=1e-12, atol=1e-13)


def test_rescale_dt_divides_and_matches_finer_sampling():
    """Δ/r at rate r·f: r ZOH steps of Δ/r with zero input compose to one step of Δ."""
    dt = torch.tensor([0.2, 0.05], dtype=F64)
    torch.testing.assert_close(ssm.rescale_dt(dt, 4.0), dt / 4, rtol=0, atol=0)
    a = _stable_diag(2, seed=40)
    dA, _ = ssm.discretize(a, torch.ones(2, dtype=C128), dt, "zoh")
    dA4, _ = ssm.discretize(a, torch.ones(2, dtype=C128), ssm.rescale_dt(dt, 4.0), "zoh")
    torch.testing.assert_close(dA4**4, dA, rtol=1e-13, atol=1e-14)


# --- kernels -----------------------------------------------------------------------------


def test_ssm_kernel_equals_explicit_matrix_powers():
    N, L = 5, 40
    dA = 0.97 * torch.exp(1j * torch.linspace(0.1, 2.0, N, dtype=F64))  # [N], |dA| < 1
    dB, C = _crandn(N, seed=50), _crandn(N, seed=51)
    K = ssm.ssm_kernel(dA, dB, C, L)  # [L]
    Ad = torch.diag(dA)
    ref = torch.stack([C @ torch.linalg.matrix_power(Ad, l) @ dB for l in range(L)])
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-13)


def test_ssm_kernel_batched_and_long_is_accurate():
    """[H, N] batch, L = 4096: the exp(l·log dA) powers track a running product in float64."""
    H, N, L = 3, 4, 4096
    dA = torch.stack([torch.exp(0.05 * _stable_diag(N, seed=60 + h)) for h in range(H)])
    dB, C = _crandn(H, N, seed=61), _crandn(H, N, seed=62)
    K = ssm.ssm_kernel(dA, dB, C, L)  # [H, L]
    assert K.shape == (H, L)
    ref, p = [], torch.ones(H, N, dtype=C128)
    for _ in range(L):
        ref.append((C * p * dB).sum(-1))
        p = p * dA
    ref = torch.stack(ref, -1)  # [H, L]
    scale = ref.abs().max()
    assert (K - ref).abs().max() / scale < 1e-11


def test_kernel_of_a_vanished_mode_is_finite():
    """dA = 0 (a float32 ZOH mode with Δ·|Re A| > 103 underflows): powers 1, 0, 0, … not NaN."""
    A = torch.tensor([-2000 + 3j, -0.5 + 1j], dtype=torch.complex64)  # [N]
    dA, dB = ssm.discretize(A, torch.ones(2, dtype=torch.complex64), torch.tensor(0.1), "zoh")
    assert dA[0] == 0
    V = ssm.vandermonde(dA, 4)  # [N, L]
    ref = torch.stack([dA**l for l in range(4)], -1)  # torch: 0**0 = 1
    torch.testing.assert_close(V, ref, rtol=1e-6, atol=1e-7)
    K = ssm.ssm_kernel(dA, dB, torch.ones(2, dtype=torch.complex64), 8)
    assert torch.isfinite(torch.view_as_real(K)).all()


def test_a_vanished_mode_has_finite_gradients():
    """Training through a vanished mode: log and angle at dA = 0 must not turn the backward
    into NaN (with clip_grad_norm_ one NaN would spoil every parameter); the live mode's
    gradient is the numeric one."""
    dA = torch.tensor([0j, 0.5 + 0.25j], dtype=torch.complex128, requires_grad=True)
    ssm.vandermonde(dA, 6).real.sum().backward()
    grad = dA.grad
    assert torch.isfinite(torch.view_as_real(grad)).all()
    f = lambda z: sum((z**l).real for l in range(6))  # noqa: E731
    z, h = 0.5 + 0.25j, 1e-6
    torch.testing.assert_close(
        grad[1].real, torch.tensor((f(z + h) - f(z - h)) / (2 * h), dtype=F64)
    )
    # float32 modes on their way out (|dA| down to 1e-19 and below, Δ·|Re A| from ~44 on,
    # where angle's backward divides by |dA|² = 0) are finite too, through a whole ZOH layer
    A = -torch.tensor([30.0, 50.0, 80.0, 100.0, 0.5]) + 1j * torch.tensor([1.0, 2, 3, 4, 5])
    log_dt = torch.zeros(5, requires_grad=True)
    dA, dB = ssm.discretize(A, torch.ones(5, dtype=torch.complex64), torch.exp(log_dt), "zoh")
    K = ssm.ssm_kernel(dA, dB, torch.ones(5, dtype=torch.complex64), 8)
    (2 * K.real).sum().backward()
    assert torch.isfinite(log_dt.grad).all(), log_dt.grad
    assert log_dt.grad[-1] != 0  # the live mode learns


def test_ssm_kernel_dense_equals_matrix_powers_and_diagonal_kernel():
    N, M, P, L = 4, 2, 3, 24
    g = _gen(70)
    A = torch.randn(N, N, generator=g, dtype=F64) - 2 * torch.eye(N, dtype=F64)
    dA, dB = ssm.discretize_dense(A, torch.randn(N, M, generator=g, dtype=F64), 0.1, "zoh")
    C = torch.randn(P, N, generator=g, dtype=F64)
    K = ssm.ssm_kernel_dense(dA, dB, C, L)  # [L, P, M]
    assert K.shape == (L, P, M)
    ref = torch.stack([C @ torch.linalg.matrix_power(dA, l) @ dB for l in range(L)])
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-13)
    # on a diagonal system the dense kernel is the diagonal one (P = M = 1)
    d = 0.9 * torch.exp(1j * torch.linspace(0.2, 1.0, N, dtype=F64))
    b, c = _crandn(N, seed=71), _crandn(N, seed=72)
    Kd = ssm.ssm_kernel_dense(torch.diag(d), b[:, None], c[None, :], L)[:, 0, 0]
    torch.testing.assert_close(Kd, ssm.ssm_kernel(d, b, c, L), rtol=1e-12, atol=1e-13)


# --- convolutions and the scan -------------------------------------------------------------


def _direct_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[..., l] = Σ_{j ≤ l} K[..., j] u[..., l-j] by the O(L²) double loop."""
    L = u.shape[-1]
    Kp = torch.zeros(*K.shape[:-1], L, dtype=K.dtype)
    n = min(L, K.shape[-1])
    Kp[..., :n] = K[..., :n]
    y = torch.zeros(torch.broadcast_shapes(u.shape, Kp.shape), dtype=u.dtype)
    for l in range(L):
        for j in range(l + 1):
            y[..., l] += Kp[..., j] * u[..., l - j]
    return y


@pytest.mark.parametrize("K_len", [57, 9, 130], ids=["equal", "shorter", "longer"])
def test_causal_conv_equals_direct_sum(K_len):
    """Kernels shorter than u are zero-extended, longer ones truncated (no FFT wrap-around)."""
    g = _gen(80)
    u = torch.randn(2, 3, 57, generator=g, dtype=F64)  # [B, H, L]
    K = torch.randn(3, K_len, generator=g, dtype=F64)  # [H, L_K], broadcast over B
    y = ssm.causal_conv(u, K)
    assert y.shape == u.shape
    torch.testing.assert_close(y, _direct_causal_conv(u, K), rtol=1e-12, atol=1e-12)


def test_causal_conv_mimo_equals_direct_sum():
    Bsz, H, M, P, L = 2, 2, 3, 4, 33
    g = _gen(81)
    u = torch.randn(Bsz, H, M, L, generator=g, dtype=F64)
    K = torch.randn(H, P, M, L, generator=g, dtype=F64)
    y = ssm.causal_conv_mimo(u, K)  # [B, H, P, L]
    ref = torch.zeros(Bsz, H, P, L, dtype=F64)
    for p in range(P):
        for m in range(M):
            ref[:, :, p] += _direct_causal_conv(u[:, :, m], K[:, p, m])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_diagonal_scan_equals_the_recurrence():
    Bsz, H, N, L = 2, 3, 4, 300
    dA = torch.stack([torch.exp(0.1 * _stable_diag(N, seed=90 + h)) for h in range(H)])
    v = _crandn(Bsz, H, N, L, seed=95)
    X = ssm.diagonal_scan(dA, v)  # [B, H, N, L]
    x, ref = torch.zeros(Bsz, H, N, dtype=C128), []
    for l in range(L):
        x = dA * x + v[..., l]
        ref.append(x)
    torch.testing.assert_close(X, torch.stack(ref, -1), rtol=1e-11, atol=1e-12)


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    A, B, dt = _stable_diag(2, seed=1), torch.ones(2, dtype=C128), torch.tensor(0.1, dtype=F64)
    with pytest.raises(ValueError, match="unknown discretization method 'rk4'"):
        ssm.discretize(A, B, dt, "rk4")
    with pytest.raises(ValueError, match="alpha must be in"):
        ssm.discretize(A, B, dt, "gbt", alpha=1.5)
    with pytest.raises(ValueError, match="unknown discretization method 'foh'"):
        ssm.discretize_dense(torch.diag(A), B[:, None], 0.1, "foh")
    with pytest.raises(ValueError, match=r"A must be square \[N, N\]"):
        ssm.discretize_dense(torch.ones(2, 3, dtype=F64), torch.ones(2, 1, dtype=F64), 0.1)
    with pytest.raises(ValueError, match=r"B must be \[N, M\] with N=2"):
        ssm.discretize_dense(torch.eye(2, dtype=F64), torch.ones(3, 1, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="factor must be positive"):
        ssm.rescale_dt(dt, 0.0)


@pytest.mark.parametrize("factor", [math.nan, math.inf])
def test_rescale_dt_refuses_a_factor_that_is_not_a_positive_finite_number(factor):
    """An infinite factor would make Δ = 0: the layer would output D·u alone."""
    dt = torch.tensor([0.1, 0.2], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^factor must be positive and finite, got {factor}$"):
        ssm.rescale_dt(dt, factor)
    torch.testing.assert_close(ssm.rescale_dt(dt, 2.0), dt / 2, rtol=0, atol=0)


F64 = torch.float64


def _direct(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[..., l] = sum_{j<=l} K[..., j] u[..., l-j] by a double loop (K truncated to L)."""
    L = u.shape[-1]
    y = torch.zeros(torch.broadcast_shapes(u.shape[:-1], K.shape[:-1]) + (L,), dtype=u.dtype)
    for l in range(L):
        for j in range(min(l + 1, K.shape[-1])):
            y[..., l] += K[..., j] * u[..., l - j]
    return y


def test_causal_conv_mimo_truncates_a_longer_kernel():
    g = torch.Generator().manual_seed(3)
    Bsz, H, M, P, L = 2, 2, 2, 3, 17
    u = torch.randn(Bsz, H, M, L, generator=g, dtype=F64)
    K = torch.randn(H, P, M, 3 * L, generator=g, dtype=F64)  # longer than u
    y = ssm.causal_conv_mimo(u, K)
    assert y.shape == (Bsz, H, P, L)
    ref = torch.zeros(Bsz, H, P, L, dtype=F64)
    for p in range(P):
        for m in range(M):
            ref[:, :, p] += _direct(u[:, :, m], K[:, p, m])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, ssm.causal_conv_mimo(u, K[..., :L]), rtol=0, atol=1e-12)
