"""The SSM math as small pure functions.

Continuous SSM  x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t).
Discretized with step dt:  x_k = dA x_{k-1} + dB u_k,  y_k = C x_k + D u_k.
Unrolled, the output is a causal convolution y = K * u with the SSM kernel
K = (C dB, C dA dB, ..., C dA^{L-1} dB), computed in O(L log L) by FFT.

Training uses the convolution, serving uses the recurrence; both compute the
same function (tests/model prove it).

References: Gu et al., "On the Parameterization and Initialization of Diagonal
State Space Models" (S4D, 2022); Smith et al., "Simplified State Space Layers"
(S5, 2023) for the discretizations side by side.

Dimension letters: L sequence length, N state size (complex modes for the
diagonal forms), M input width, P output width, '...' any batch of SSMs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("euler", "backward_euler", "bilinear", "zoh", "gbt")

_ALPHA = {"euler": 0.0, "bilinear": 0.5, "backward_euler": 1.0}


def _check_method(method: str, alpha: float) -> float:
    """The GBT α of a named method; -1 for zoh (not in the GBT family)."""
    if method == "zoh":
        return -1.0
    if method == "gbt":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] for method='gbt', got {alpha}")
        return float(alpha)
    if method in _ALPHA:
        return _ALPHA[method]
    raise ValueError(f"unknown discretization method {method!r}; expected one of {METHODS}")


def discretize(
    A: Tensor, B: Tensor, dt: Tensor, method: str = "zoh", alpha: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Discretize a diagonal SSM (elementwise; A complex [..., N]).

    gbt(α):  dA = (1 + (1-α) dt A) / (1 - α dt A),   dB = dt B / (1 - α dt A)
             (α=0 euler, α=½ bilinear, α=1 backward_euler)
    zoh:     dA = exp(dt A),                          dB = (exp(dt A) - 1) / A · B
             (exp(dt A) - 1 as expm1, so it keeps float32 precision at small dt; written
             dt · φ(dt A) · B with φ(z) = (e^z - 1) / z and φ(0) = 1, so a mode whose dt·A is 0
             or subnormal, Re A underflowed with Im A = 0, is the integrator dB = dt B, not NaN)

    Args:
        A: [..., N] complex diagonal of the state matrix.
        B: broadcastable to A (e.g. [..., N] or [..., N, M] with A[..., N, 1]).
        dt: broadcastable step sizes, e.g. [H, 1]; must be positive.
    Returns:
        (dA, dB) with the broadcast shapes of (A, dt) and (A, B, dt).
    """
    a = _check_method(method, alpha)
    dtA = dt * A
    if a < 0:  # zoh
        return torch.exp(dtA), dt * _phi(dtA) * B
    denom = 1 - a * dtA
    return (1 + (1 - a) * dtA) / denom, dt * B / denom


def _phi(z: Tensor) -> Tensor:
    """(e^z - 1) / z, with its limit 1 + z/2 where |z| is below the dtype's eps (exact there
    to rounding; a complex division by such a z, a subnormal or 0, gives NaN). The division
    is taken at 1 there, so the gradient stays finite too."""
    small = z.abs() < torch.finfo(z.real.dtype).eps
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 + z / 2, _expm1(safe) / safe)


def _expm1(z: Tensor) -> Tensor:
    """exp(z) - 1 for complex z = a + ib without cancellation at small |z|:
    Re = expm1(a) cos b - 2 sin²(b/2),  Im = exp(a) sin b."""
    a, b = z.real, z.imag
    return torch.complex(
        torch.expm1(a) * torch.cos(b) - 2 * torch.sin(b / 2) ** 2, torch.exp(a) * torch.sin(b)
    )


def discretize_dense(
    A: Tensor, B: Tensor, dt: float | Tensor, method: str = "zoh", alpha: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Discretize a dense SSM, A [N, N], B [N, M].

    gbt(α):  dA = (I - α dt A)^{-1} (I + (1-α) dt A),  dB = (I - α dt A)^{-1} dt B
    zoh:     dA = exp(dt A),  dB = ∫₀^dt exp(s A) ds B = A^{-1} (exp(dt A) - I) B, both read
             from exp(dt [[A, B], [0, 0]]) = [[dA, dB], [0, I]] (Van Loan), so a
             singular A (an integrator) needs no inverse
    """
    a = _check_method(method, alpha)
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square [N, N], got shape {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[0] != A.shape[0]:
        raise ValueError(f"B must be [N, M] with N={A.shape[0]}, got shape {tuple(B.shape)}")
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    dtA = dt * A
    if a < 0:  # zoh
        N, M = B.shape
        block = torch.zeros(N + M, N + M, dtype=A.dtype, device=A.device)  # [[A, B], [0, 0]]
        block[:N, :N], block[:N, N:] = A, B
        E = torch.linalg.matrix_exp(dt * block)
        return E[:N, :N], E[:N, N:]
    lhs = eye - a * dtA
    return torch.linalg.solve(lhs, eye + (1 - a) * dtA), torch.linalg.solve(lhs, dt * B)


def vandermonde(dA: Tensor, L: int) -> Tensor:
    """Powers dA^l for l = 0..L-1: [..., N] -> [..., N, L].

    Computed as |dA|^l · (cos(l·arg dA) + i sin(l·arg dA)) = exp(l · log dA) in real
    arithmetic (about 5× faster than a complex exp, and it keeps float64 accuracy for long
    L). A mode with dA = 0 (e.g. exp(Δ Re A) underflowing in float32) would give
    0 · log 0 = NaN at l = 0; log|dA| is floored at -1000 (below the underflow of exp in
    float64), so dA^0 = 1 and dA^l = 0 for l ≥ 1, as in the recurrence.
    """
    l = torch.arange(L, device=dA.device, dtype=dA.real.dtype)  # [L]
    # a mode below sqrt(tiny) counts as gone (its powers from l = 1 on are below 1e-19 in
    # float32): log and angle have no usable gradient there (angle's divides by |dA|², which
    # underflows to 0), so they are taken at 1 and the log floored
    gone = dA.abs() < torch.finfo(dA.real.dtype).tiny ** 0.5
    safe = torch.where(gone, torch.ones_like(dA), dA)
    log_mag = torch.where(gone, -1000.0, torch.log(safe.abs())).unsqueeze(-1)  # [..., N, 1]
    phase = torch.angle(safe).unsqueeze(-1) * l  # [..., N, L]
    mag = torch.exp(log_mag * l)  # [..., N, L]
    return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))


def ssm_kernel(dA: Tensor, dB: Tensor, C: Tensor, L: int) -> Tensor:
    """Diagonal SSM kernel  K[..., l] = Σ_n C_n dA_n^l dB_n  (complex).

    dA, dB, C broadcast over [..., N]; the layer applies its conjugate-pair
    convention (2·Re) on top.
    Returns: [..., L] complex.
    """
    V = vandermonde(dA, L)  # [..., N, L]
    return torch.einsum("...n,...nl->...l", C * dB, V)


def ssm_kernel_dense(dA: Tensor, dB: Tensor, C: Tensor, L: int) -> Tensor:
    """Dense SSM kernel  K[l] = C dA^l dB,  dA [N, N], dB [N, M], C [P, N] -> [L, P, M]."""
    K = []
    x = dB  # [N, M] = dA^0 dB
    for _ in range(L):
        K.append(C @ x)  # [P, M]
        x = dA @ x
    return torch.stack(K)  # [L, P, M]


def causal_conv(u: Tensor, K: Tensor) -> Tensor:
    """Causal convolution  y_l = Σ_{j ≤ l} K_j u_{l-j}  by FFT (zero-pad to 2L).

    u, K: real, broadcastable [..., L] (K may be shorter than u: zero-extended; taps
    beyond L cannot reach y and are dropped, so they do not wrap around the FFT).
    Returns: [..., L].
    """
    L = u.shape[-1]
    n = 2 * L
    K = K[..., :L]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)  # [..., 2L]
    return y[..., :L]


def causal_conv_mimo(u: Tensor, K: Tensor) -> Tensor:
    """Multi-input causal convolution  y_p = Σ_m K_{p,m} * u_m  by FFT.

    u: [B, H, M, L], K: [H, P, M, L] -> y: [B, H, P, L]. The sum over inputs is done
    in the frequency domain, so memory stays O(B·H·(M+P)·L) and time O(L log L).
    """
    L = u.shape[-1]
    n = 2 * L
    K = K[..., :L]  # longer taps cannot reach y (and would wrap around)
    U = torch.fft.rfft(u, n=n)  # [B, H, M, n/2+1]
    Kf = torch.fft.rfft(K, n=n)  # [H, P, M, n/2+1]
    Y = torch.einsum("bhmf,hpmf->bhpf", U, Kf)  # [B, H, P, n/2+1]
    return torch.fft.irfft(Y, n=n)[..., :L]


def diagonal_scan(dA: Tensor, v: Tensor) -> Tensor:
    """All states of the diagonal recurrence  x_l = dA x_{l-1} + v_l  (x_{-1} = 0) by FFT.

    Unrolled, x_l = Σ_{j ≤ l} dA^j v_{l-j}: a causal convolution of v with the geometric
    kernel (1, dA, dA², …), so time is O(L log L) and nothing is L×L.

    dA: complex [..., N]; v: complex [..., N, L] (leading dims broadcast with dA).
    Returns: complex [..., N, L], the state after each step.
    """
    L = v.shape[-1]
    n = 2 * L
    V = vandermonde(dA, L)  # [..., N, L]
    X = torch.fft.fft(v, n=n) * torch.fft.fft(V, n=n)  # [..., N, 2L]
    return torch.fft.ifft(X, n=n)[..., :L]


def rescale_dt(dt: Tensor, factor: float) -> Tensor:
    """Inputs sampled at `factor`× the training rate → dt / factor.

    Resampling a signal by c is absorbed by scaling Δ; no retraining.
    """
    if not 0 < factor < math.inf:
        raise ValueError(f"factor must be positive and finite, got {factor}")
    return dt / factor
