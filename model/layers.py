"""The S4D-style diagonal SSM layer: one module for SISO, multi-head and MIMO.

A layer of width D = d_model holds H = `heads` independent SSMs, each reading and
writing M = D / H channels:

    heads = D  (default)  SISO: one SSM per channel (depthwise), M = 1
    1 < heads < D         multi-head: H SSMs of width M
    heads = 1             MIMO: one SSM over all D channels, M = D

Each SSM has a diagonal complex A with N/2 modes stored as conjugate pairs, so
`d_state = N` real numbers of state per head and the output is 2·Re(C x)
(the conjugate partner contributes the complex conjugate). Parameters are stored
real (A as log(-Re A) and Im A, B and C as re/im pairs, Δ as log Δ) and turned
into complex values at the top of `discrete()`.

Two views of one function (Gu et al. 2022, S4D):
    forward(u)   convolution  y = K * u + D u,   K[h,p,m,l] = 2 Re Σ_n C_pn dA_n^l dB_nm
    step(u, x)   recurrence   x = dA x + dB u,   y = 2 Re(C x) + D u

The convolution has two O(L log L) evaluations of the same sum, picked by cost:
    kernel path (M² ≤ N/2, e.g. SISO)   build K [H, M, M, L], convolve each (p, m) pair
    mode path   (M² > N/2, e.g. MIMO)   project v = dB u onto the N/2 modes, run the
                diagonal recurrence for all l at once (`diagonal_scan`), read out 2 Re(C x)
so a wide MIMO layer never builds its M²·L kernel.

Dimension letters: B batch, L length, D model width, H heads, M head width
(inputs = outputs per head), N state (N/2 complex modes, written n).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .ssm import METHODS, causal_conv_mimo, diagonal_scan, discretize, vandermonde

INITS = ("s4d-lin", "s4d-inv", "s4d-real")


def init_A(init: str, H: int, N2: int) -> tuple[Tensor, Tensor]:
    """S4D initializations of the diagonal A ([H, N/2] real and imaginary parts).

    s4d-lin:  A_n = -1/2 + i π n
    s4d-inv:  A_n = -1/2 + i (N/π) (N / (2n + 1) - 1)
    s4d-real: A_n = -(n + 1)
    """
    n = torch.arange(N2, dtype=torch.float32)  # [N/2]
    N = 2 * N2
    if init == "s4d-lin":
        re, im = torch.full_like(n, 0.5), math.pi * n
    elif init == "s4d-inv":
        re, im = torch.full_like(n, 0.5), (N / math.pi) * (N / (2 * n + 1) - 1)
    elif init == "s4d-real":
        re, im = n + 1, torch.zeros_like(n)
    else:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    return re.expand(H, N2).clone(), im.expand(H, N2).clone()  # -Re A, Im A: [H, N/2]


# Δ is a float32 parameter: outside float32's positive normal range it would be inf or 0
# (the loss NaN from the first step, or a layer with no dynamics)
DT_RANGE = (float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max))


def check_dt_range(dt_min: float, dt_max: float) -> None:
    """ValueError unless DT_RANGE[0] <= dt_min <= dt_max <= DT_RANGE[1]."""
    low, high = DT_RANGE
    if not low <= dt_min <= dt_max <= high:
        raise ValueError(
            f"need {low:.3g} <= dt_min <= dt_max <= {high:.3g} (float32's range), got "
            f"dt_min={dt_min}, dt_max={dt_max}"
        )


class SSM(nn.Module):
    """Diagonal SSM layer over [B, L, D] (see module docstring).

    Args:
        d_model: D, channels in and out.
        d_state: N, real numbers of state per head (N/2 complex modes); even.
        heads: H; None → D (SISO). Must divide d_model.
        init: "s4d-lin" | "s4d-inv" | "s4d-real".
        discretization: "zoh" | "bilinear" | "euler" | "backward_euler" | "gbt".
        alpha: GBT α (only for discretization="gbt").
        dt_min, dt_max: range of the log-uniform Δ init (0 < dt_min ≤ dt_max).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        heads: int | None = None,
        init: str = "s4d-lin",
        discretization: str = "zoh",
        alpha: float = 0.5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        heads = d_model if heads is None else heads
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        if d_state <= 0 or d_state % 2:
            raise ValueError(f"d_state must be a positive even number, got {d_state}")
        if heads <= 0 or d_model % heads:
            raise ValueError(f"heads={heads} must be positive and divide d_model={d_model}")
        if discretization not in METHODS:
            raise ValueError(
                f"unknown discretization {discretization!r}; expected one of {METHODS}"
            )
        if discretization == "gbt" and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        check_dt_range(dt_min, dt_max)
        self.d_model, self.d_state, self.heads = d_model, d_state, heads
        self.discretization, self.alpha = discretization, alpha
        H, M, N2 = heads, d_model // heads, d_state // 2
        self.M, self.N2 = M, N2

        A_re, A_im = init_A(init, H, N2)
        self.log_A_real = nn.Parameter(torch.log(A_re))  # [H, N/2]
        self.A_imag = nn.Parameter(A_im)  # [H, N/2]
        if M == 1:
            B = torch.ones(H, N2, 1, dtype=torch.cfloat)  # [H, N/2, M]
        else:
            B = torch.randn(H, N2, M, dtype=torch.cfloat) / math.sqrt(M)
        self.B = nn.Parameter(torch.view_as_real(B))  # [H, N/2, M, 2]
        C = torch.randn(H, M, N2, dtype=torch.cfloat) / math.sqrt(M)  # [H, P=M, N/2]
        self.C = nn.Parameter(torch.view_as_real(C))  # [H, M, N/2, 2]
        self.D = nn.Parameter(torch.randn(d_model, dtype=torch.float32))  # [D]
        log_dt = torch.rand(H, dtype=torch.float32)  # [H], log-uniform in [dt_min, dt_max]
        log_dt = log_dt * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # [H]

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The parameters that get their own optimizer group (A, Δ, B)."""
        return [self.log_A_real, self.A_imag, self.log_dt, self.B]

    def discrete(self, dt_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Complex (dA [H, N/2], dB [H, N/2, M], C [H, M, N/2]) with Δ scaled by dt_scale."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # [H, N/2]
        dt = torch.exp(self.log_dt) * dt_scale  # [H]
        B = torch.view_as_complex(self.B)  # [H, N/2, M]
        dA, dB = discretize(
            A.unsqueeze(-1), B, dt[:, None, None], self.discretization, self.alpha
        )  # [H, N/2, 1], [H, N/2, M]
        return dA.squeeze(-1), dB, torch.view_as_complex(self.C)

    def kernel(self, L: int, entry: tuple[int, int] | None = None) -> Tensor:
        """K[h, p, m, l] = 2 Re Σ_n C[h,p,n] dA[h,n]^l dB[h,n,m]  -> [H, M, M, L] real;
        with entry=(p, m) only that input m → output p kernel of each head, [H, L] (no
        M²·L kernel built)."""
        dA, dB, C = self.discrete()
        if entry is not None:
            p, m = entry
            W = (C[:, p, :] * dB[:, :, m]).unsqueeze(1)  # [H, 1, N/2]
            return 2 * torch.bmm(W, vandermonde(dA, L)).real.squeeze(1)
        H, M, N2 = self.heads, self.M, self.N2
        W = torch.einsum("hpn,hnm->hpmn", C, dB).reshape(H, M * M, N2)  # [H, P·M, N/2]
        K = torch.bmm(W, vandermonde(dA, L))  # [H, P·M, L]
        return 2 * K.real.reshape(H, M, M, L)

    @property
    def uses_mode_path(self) -> bool:
        """True when forward convolves in mode space (cheaper when M² > N/2)."""
        return self.M * self.M > self.N2

    def conv_kernel_path(self, uh: Tensor) -> Tensor:
        """y = K * u with the explicit kernel. uh: [B, H, M, L] -> [B, H, M, L]."""
        return causal_conv_mimo(uh, self.kernel(uh.shape[-1]))

    def conv_mode_path(self, uh: Tensor) -> Tensor:
        """y = 2 Re(C x) with all states x by `diagonal_scan`. uh: [B, H, M, L] -> [B, H, M, L]."""
        dA, dB, C = self.discrete()  # [H, N/2], [H, N/2, M], [H, M, N/2]
        v = torch.einsum("hnm,bhml->bhnl", dB, uh.to(dB.dtype))  # [B, H, N/2, L]
        x = diagonal_scan(dA, v)  # [B, H, N/2, L]
        return 2 * torch.einsum("hpn,bhnl->bhpl", C, x).real  # [B, H, M, L]

    def forward(self, u: Tensor) -> Tensor:
        """Convolution mode. u: [B, L, D] -> y: [B, L, D]."""
        if u.dim() != 3 or u.shape[-1] != self.d_model or u.shape[1] < 1:
            raise ValueError(f"u must be [B, L >= 1, {self.d_model}], got shape {tuple(u.shape)}")
        Bsz, L, _ = u.shape
        H, M = self.heads, self.M
        uh = u.transpose(1, 2).reshape(Bsz, H, M, L)  # [B, H, M, L]
        conv = self.conv_mode_path if self.uses_mode_path else self.conv_kernel_path
        y = conv(uh)  # [B, H, M, L]
        y = y.reshape(Bsz, self.d_model, L).transpose(1, 2)  # [B, L, D]
        return y + u * self.D

    def initial_state(self, batch: int = 1) -> Tensor:
        """Zero state: complex [B, H, N/2] on the parameters' device and dtype."""
        p = self.log_dt
        dtype = torch.complex128 if p.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch, self.heads, self.N2, dtype=dtype, device=p.device)

    def step(self, u: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Recurrence mode. u: [B, D], x: [B, H, N/2] complex -> (y [B, D], x [B, H, N/2])."""
        if u.dim() != 2 or u.shape[-1] != self.d_model:
            raise ValueError(f"u must be [B, {self.d_model}], got shape {tuple(u.shape)}")
        if x.shape != (u.shape[0], self.heads, self.N2) or not x.is_complex():
            raise ValueError(
                f"x must be complex [{u.shape[0]}, {self.heads}, {self.N2}], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        dA, dB, C = self.discrete()
        uh = u.reshape(-1, self.heads, self.M).to(dB.dtype)  # [B, H, M]
        x = dA * x + torch.einsum("hnm,bhm->bhn", dB, uh)  # [B, H, N/2]
        y = 2 * torch.einsum("hpn,bhn->bhp", C, x).real  # [B, H, M]
        return y.reshape(u.shape) + u * self.D, x
