"""Export-only torch modules: the network's recurrent step and chunked prefill, in real arithmetic.

ONNX has no complex type (and complex tensors do not export reliably), so each layer's
complex diagonal state x [B, H, N/2] is carried as X [B, 2, H, N/2] — real block, then
imaginary block — which is exactly the packed-state layout of `SSMNetwork.state_layout()`.
The discretization (dA, dB, C) is computed once here, in float64, and folded in as
constants: no graph recomputes it.

Complex products are written with a "flip": for z = z_r + i z_i and X = [x_r; x_i],
    z·x = z_r·X + Ẑ·flip(X),   Ẑ = [-z_i; z_i],   flip(X) = [x_i; x_r].

Step (per layer):
    X' = dA·X + B̄u                         (x' = dA x + dB u)
    y  = Σ_{c,n} Ĉ[c,h,p,n] X'[b,c,h,n] + D u   (Ĉ = [2 Re C; -2 Im C], so y = 2 Re(C x'))

Prefill (per layer) over T = n·Q positions cut into n chunks of Q (Q = manifest
graphs.prefill.chunk), with x₀ the incoming state:
    intra-chunk   y_loc[t] = Σ_{s≤t} K[t-s] u[s]        (kernel path: Toeplitz [H, Q·P, Q·M]
                  or the local states by a log₂Q-step doubling scan (mode path, wide heads)
    chunk ends    E_j = Σ_s dA^{Q-1-s} dB u[jQ+s]
    carry         S_0 = x₀,  S_{j+1} = dA^Q S_j + E_j     by a doubling scan over chunks
                  (K_c steps with the constants dA^{Q·2^k}: only non-negative powers)
    state term    y[jQ+t] = y_loc[t] + 2 Re Σ_n C_n dA_n^{t+1} S_j,n
    final state   S_n = dA^{T} x₀ + …  (the last carry)
The big per-layer tables (Toeplitz, chunk-end and state-term matrices) are computed inside
the graph from [H, N/2] parameters, so the file stays small; onnxruntime folds them once at
session start. T may be any multiple of Q up to Q·(2^K_c − 1).

Dimension letters: B batch, T length, D d_model, H heads, M head width (= P outputs),
N state (N/2 complex modes, written n), Q chunk length, S packed state.
"""

from __future__ import annotations

import copy
import math

import torch
from ssmstream.model import SSMNetwork
from ssmstream.model.layers import SSM
from torch import Tensor, nn

# dtypes of the weights/activations for each export variant (the SSM recurrence and the
# state always stay float32: an fp16 state drifts over long streams).
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}


def discrete64(ssm: SSM, dt_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Complex128 (dA [H, N/2], dB [H, N/2, M], C [H, M, N/2]) with every Δ scaled by dt_scale."""
    ssm64 = copy.deepcopy(ssm).to(torch.float64)
    with torch.no_grad():
        dA, dB, C = ssm64.discrete(dt_scale)
    return dA, dB, C


def _pair(z: Tensor) -> tuple[Tensor, Tensor]:
    """Complex z -> (z_r, Ẑ = [-z_i; z_i]) as float32, for z·x = z_r·X + Ẑ·flip(X)."""
    return z.real.float(), torch.stack([-z.imag, z.imag]).float()


def _shift(X: Tensor, d: int, dim: int) -> Tensor:
    """X shifted by d along `dim` (zeros enter at the front, the length is kept)."""
    pad = [0, 0] * (X.dim() - 1 - dim) + [d, 0]
    L = X.shape[dim]
    return nn.functional.pad(X, pad).narrow(dim, 0, L)


def _cmul(zr: Tensor, zf: Tensor, X: Tensor, cdim: int) -> Tensor:
    """z·X for X with re/im on `cdim`: zr·X + zf·flip(X)."""
    return zr * X + zf * X.flip(cdim)


class StepSSM(nn.Module):
    """One layer's recurrence x' = dA x + dB u, y = 2 Re(C x') + D u, on X [B, 2, H, N/2]."""

    def __init__(self, ssm: SSM, dt_scale: float):
        super().__init__()
        dA, dB, C = discrete64(ssm, dt_scale)  # [H, N/2], [H, N/2, M], [H, M, N/2]
        self.H, self.M, self.N2 = ssm.heads, ssm.M, ssm.N2
        Ar, Af = _pair(dA)
        self.register_buffer("Ar", Ar)  # [H, N/2]
        self.register_buffer("Af", Af)  # [2, H, N/2]
        Cc = torch.stack([2 * C.real, -2 * C.imag])  # [2, H, M, N/2]
        if self.M == 1:
            self.register_buffer("Bs", torch.stack([dB.real, dB.imag])[..., 0].float())  # [2,H,N/2]
            self.register_buffer("Cs", Cc[:, :, 0].float())  # [2, H, N/2]
        else:
            Bm = torch.cat([dB.real, dB.imag], dim=1).transpose(1, 2)  # [H, M, 2·N/2]
            self.register_buffer("Bm", Bm.float().contiguous())
            Cm = Cc.permute(1, 0, 3, 2).reshape(self.H, 2 * self.N2, self.M)  # [H, 2·N/2, M]
            self.register_buffer("Cm", Cm.float().contiguous())
        self.register_buffer("D", ssm.D.detach().float().clone())  # [D]

    def forward(self, u: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
        """u: float32 [B, D], X: [B, 2, H, N/2] -> (y [B, D], X')."""
        Bsz = u.shape[0]
        H, M, N2 = self.H, self.M, self.N2
        if M == 1:
            Bu = self.Bs * u.reshape(Bsz, 1, H, 1)  # [B, 2, H, N/2]
        else:
            uh = u.reshape(Bsz, H, M).transpose(0, 1)  # [H, B, M]
            Bu = (uh @ self.Bm).reshape(H, Bsz, 2, N2).permute(1, 2, 0, 3)  # [B, 2, H, N/2]
        X = _cmul(self.Ar, self.Af, X, 1) + Bu  # [B, 2, H, N/2]
        if M == 1:
            y = (self.Cs * X).sum(dim=(1, 3))  # [B, H]
        else:
            Xh = X.permute(2, 0, 1, 3).reshape(H, Bsz, 2 * N2)  # [H, B, 2·N/2]
            y = (Xh @ self.Cm).transpose(0, 1)  # [B, H, M]
        return y.reshape(Bsz, H * M) + u * self.D, X


class PrefillSSM(nn.Module):
    """One layer over a chunked sequence (see the module docstring), u [B, T, D], X [B, 2, H, N/2].

    Args:
        ssm: the trained layer.
        dt_scale: Δ multiplier.
        chunk: Q, the chunk length (a power of two).
        carry_steps: K_c doubling steps of the inter-chunk carry: T ≤ Q·(2^K_c − 1).
        mode_path: intra-chunk by a doubling scan over the modes (wide heads, M² > N/2)
            instead of the Toeplitz of the kernel; None → pick like the layer does.
    """

    def __init__(
        self,
        ssm: SSM,
        dt_scale: float,
        chunk: int,
        carry_steps: int,
        mode_path: bool | None = None,
    ):
        super().__init__()
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two, got {chunk}")
        dA, dB, C = discrete64(ssm, dt_scale)  # [H, N/2], [H, N/2, M], [H, M, N/2]
        H, M, N2, Q = ssm.heads, ssm.M, ssm.N2, chunk
        self.H, self.M, self.N2, self.Q = H, M, N2, Q
        self.mode_path = ssm.uses_mode_path if mode_path is None else mode_path
        # dA = exp(logr + i·theta); |dA| floored so that dA^0 = 1 even when dA = 0.
        self.register_buffer("logr", torch.log(dA.abs().clamp_min(1e-30)).float())  # [H, N/2]
        self.register_buffer("theta", torch.angle(dA).float())  # [H, N/2]
        self.register_buffer("k", torch.arange(Q + 1, dtype=torch.float32))  # [Q+1]
        # inter-chunk carry constants dA^{Q·2^k}, exact in float64
        zs = [dA ** (Q * 2**k) for k in range(carry_steps)]
        self.register_buffer("Zr", torch.stack([z.real for z in zs]).float())  # [K_c, H, N/2]
        self.register_buffer(
            "Zf", torch.stack([torch.stack([-z.imag, z.imag]) for z in zs]).float()
        )  # [K_c, 2, H, N/2]
        self.carry_steps = carry_steps
        Bc = torch.cat([dB.real, dB.imag], dim=1)  # [H, 2·N/2, M]  (re rows, im rows)
        self.register_buffer("dBr", dB.real.float())  # [H, N/2, M]
        self.register_buffer("dBi", dB.imag.float())  # [H, N/2, M]
        self.register_buffer("Cr", C.real.float())  # [H, M, N/2]
        self.register_buffer("Ci", C.imag.float())  # [H, M, N/2]
        Cm = torch.cat([2 * C.real, -2 * C.imag], dim=2).transpose(1, 2)  # [H, 2·N/2, M]
        self.register_buffer("Cm", Cm.float().contiguous())
        if self.mode_path:
            self.register_buffer("Bm", Bc.transpose(1, 2).float().contiguous())  # [H, M, 2·N/2]
            zq = [dA ** (2**k) for k in range(int(math.log2(Q)))]
            self.register_buffer("zqr", torch.stack([z.real for z in zq]).float())  # [log2Q,H,N/2]
            self.register_buffer(
                "zqf", torch.stack([torch.stack([-z.imag, z.imag]) for z in zq]).float()
            )  # [log2Q, 2, H, N/2]
        else:
            W = torch.einsum("hpn,hnm->hpmn", C, dB).reshape(H, M * M, N2)  # [H, P·M, N/2]
            self.register_buffer("W2", torch.cat([2 * W.real, -2 * W.imag], 2).float())
        self.register_buffer("D", ssm.D.detach().float().clone())  # [D]

    def powers(self) -> tuple[Tensor, Tensor]:
        """dA^k for k = 0..Q: (re, im), each [H, N/2, Q+1] (computed in the graph)."""
        mag = torch.exp(self.logr.unsqueeze(-1) * self.k)  # [H, N/2, Q+1]
        ang = self.theta.unsqueeze(-1) * self.k  # [H, N/2, Q+1]
        return mag * torch.cos(ang), mag * torch.sin(ang)

    def forward(self, u: Tensor, X0: Tensor) -> tuple[Tensor, Tensor]:
        """u: float32 [B, T, D] (T = n·Q), X0: [B, 2, H, N/2] -> (y [B, T, D], X_T)."""
        Bsz, T = u.shape[0], u.shape[1]
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        n = T // Q
        Pr, Pi = self.powers()  # [H, N/2, Q+1]
        if self.mode_path:
            y_loc, E, Xloc = self._intra_modes(u, Bsz, n)
        else:
            y_loc, E = self._intra_kernel(u, Pr, Pi, Bsz, n)
            Xloc = None
        S = self._carry(E, X0, Bsz, n)  # [B, n+1, 2, H, N/2]
        starts, X_T = S[:, :n], S[:, n]  # [B, n, 2, H, N/2], [B, 2, H, N/2]
        if self.mode_path:
            # x_t = local_t + dA^{t+1} S_j, then y = 2 Re(C x)
            P1r = Pr[..., 1:].permute(2, 0, 1)  # [Q, H, N/2]
            P1f = torch.stack([-Pi[..., 1:], Pi[..., 1:]]).permute(3, 0, 1, 2)  # [Q, 2, H, N/2]
            Xs = starts.unsqueeze(2)  # [B, n, 1, 2, H, N/2]
            Xfull = Xloc + P1r.unsqueeze(1) * Xs + P1f * Xs.flip(3)  # [B, n, Q, 2, H, N/2]
            Xh = Xfull.permute(4, 0, 1, 2, 3, 5).reshape(H, Bsz * T, 2 * N2)  # [H, B·T, 2·N/2]
            y = (Xh @ self.Cm).permute(1, 0, 2)  # [B·T, H, M]
        else:
            # state term: F[h, (t,p), (c,n)] = 2 Re/−2 Im of C_pn dA_n^{t+1}
            P1r, P1i = Pr[..., 1:], Pi[..., 1:]  # [H, N/2, Q]
            Fr = 2 * (self.Cr.unsqueeze(1) * P1r.transpose(1, 2).unsqueeze(2)) - 2 * (
                self.Ci.unsqueeze(1) * P1i.transpose(1, 2).unsqueeze(2)
            )  # [H, Q, P, N/2]
            Fi = -2 * (self.Cr.unsqueeze(1) * P1i.transpose(1, 2).unsqueeze(2)) - 2 * (
                self.Ci.unsqueeze(1) * P1r.transpose(1, 2).unsqueeze(2)
            )  # [H, Q, P, N/2]
            F = torch.cat([Fr, Fi], dim=3).reshape(H, Q * M, 2 * N2)  # [H, Q·P, 2·N/2]
            Sh = starts.permute(3, 2, 4, 0, 1).reshape(H, 2 * N2, Bsz * n)  # [H, 2·N/2, B·n]
            y = y_loc + F @ Sh  # [H, Q·P, B·n]
            y = y.reshape(H, Q, M, Bsz, n).permute(3, 4, 1, 0, 2)  # [B, n, Q, H, P]
        return y.reshape(Bsz, T, H * M) + u * self.D, X_T

    def _intra_kernel(self, u, Pr, Pi, Bsz, n):
        """Toeplitz of the kernel: y_loc [H, Q·P, B·n] and chunk-end states E [B, n, 2, H, N/2]."""
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        # kernel K[h, (p,m), l] = 2 Re Σ_n W[h,(p,m),n] dA^l, l < Q
        K = self.W2 @ torch.cat([Pr[..., :Q], Pi[..., :Q]], dim=1)  # [H, P·M, Q]
        Kp = nn.functional.pad(K, [1, 0])  # [H, P·M, Q+1], Kp[..., 0] = 0
        q = self.k[:Q].to(torch.int64)  # [Q]
        idx = (q.unsqueeze(1) - q.unsqueeze(0) + 1).clamp_min(0)  # [Q(t), Q(s)]: t-s+1 or 0
        Toep = Kp[:, :, idx]  # [H, P·M, Q, Q]
        Toep = Toep.reshape(H, M, M, Q, Q).permute(0, 3, 1, 4, 2).reshape(H, Q * M, Q * M)
        uc = u.reshape(Bsz, n, Q, H, M).permute(3, 2, 4, 0, 1).reshape(H, Q * M, Bsz * n)
        y_loc = Toep @ uc  # [H, Q·P, B·n]
        # chunk ends: G[h, (c,n), (s,m)] = (dA^{Q-1-s} dB)[h,n,m], re (c=0) / im (c=1)
        Rr, Ri = Pr[..., :Q].flip(-1), Pi[..., :Q].flip(-1)  # [H, N/2, Q(s)]
        dBr, dBi = self.dBr.unsqueeze(2), self.dBi.unsqueeze(2)  # [H, N/2, 1, M]
        Gr = Rr.unsqueeze(-1) * dBr - Ri.unsqueeze(-1) * dBi  # [H, N/2, Q, M]
        Gi = Rr.unsqueeze(-1) * dBi + Ri.unsqueeze(-1) * dBr  # [H, N/2, Q, M]
        G = torch.cat([Gr, Gi], dim=1).reshape(H, 2 * N2, Q * M)  # [H, 2·N/2, Q·M]
        E = (G @ uc).reshape(H, 2, N2, Bsz, n).permute(3, 4, 1, 0, 2)  # [B, n, 2, H, N/2]
        return y_loc, E

    def _intra_modes(self, u, Bsz, n):
        """Local states by doubling within each chunk.

        Returns (None, chunk ends E [B, n, 2, H, N/2], local states X [B, n, Q, 2, H, N/2]).
        """
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        uh = u.reshape(Bsz * n * Q, H, M).transpose(0, 1)  # [H, B·T, M]
        v = (uh @ self.Bm).reshape(H, Bsz, n, Q, 2, N2).permute(1, 2, 3, 4, 0, 5)
        X = v  # [B, n, Q, 2, H, N/2]
        for k in range(self.zqr.shape[0]):
            X = X + _cmul(self.zqr[k], self.zqf[k], _shift(X, 2**k, 2), 3)
        return None, X[:, :, Q - 1], X

    def _carry(self, E: Tensor, X0: Tensor, Bsz: int, n) -> Tensor:
        """S_j = Σ_{i≤j} dA^{Q(j-i)} E'_i with E' = [x₀, E_0, …]: [B, n+1, 2, H, N/2]."""
        S = torch.cat([X0.unsqueeze(1), E], dim=1)  # [B, n+1, 2, H, N/2]
        for k in range(self.carry_steps):
            S = S + _cmul(self.Zr[k], self.Zf[k], _shift(S, 2**k, 1), 2)
        return S


class _Trunk(nn.Module):
    """The per-time-step parts of the network (encoder, blocks' norm/mix, final norm, head)."""

    def __init__(self, net: SSMNetwork, dtype: torch.dtype):
        super().__init__()
        cfg = net.cfg
        self.tokens = cfg.input_kind == "tokens"
        self.dtype = dtype
        src = copy.deepcopy(net).eval().to(dtype)
        self.encoder, self.norm, self.head = src.encoder, src.norm, src.head
        self.norms = nn.ModuleList(b.norm for b in src.blocks)
        self.outs = nn.ModuleList(b.out for b in src.blocks)
        self.layout = net.state_layout()

    def encode(self, inp: Tensor) -> Tensor:
        return self.encoder(inp if self.tokens else inp.to(self.dtype))

    def mix(self, i: int, z: Tensor, y: Tensor) -> Tensor:
        """Residual block tail: z + Out(GELU(y)) (dropout is identity in eval)."""
        return z + self.outs[i](nn.functional.gelu(y.to(self.dtype)))

    def output(self, z: Tensor) -> Tensor:
        return self.head(self.norm(z)).float()

    def split_state(self, state: Tensor) -> list[Tensor]:
        """[B, S] -> per layer [B, 2, H, N/2]."""
        Bsz = state.shape[0]
        parts = torch.split(state, [e["size"] for e in self.layout], dim=1)
        return [p.reshape(Bsz, *e["shape"]) for p, e in zip(parts, self.layout)]


class StepGraph(nn.Module):
    """(input int64 [B] | float32 [B, d_input], state [B, S]) -> (output [B, V], state_out)."""

    def __init__(self, net: SSMNetwork, dt_scale: float = 1.0, dtype: str = "fp32"):
        super().__init__()
        self.trunk = _Trunk(net, COMPUTE_DTYPES[dtype])
        self.ssms = nn.ModuleList(StepSSM(s, dt_scale) for s in net.ssms)

    def forward(self, input: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        tr = self.trunk
        Bsz = state.shape[0]
        z = tr.encode(input)  # [B, D]
        outs = []
        for i, (ssm, X) in enumerate(zip(self.ssms, tr.split_state(state))):
            y, X = ssm(tr.norms[i](z).float(), X)  # [B, D], [B, 2, H, N/2]
            z = tr.mix(i, z, y)
            outs.append(X.reshape(Bsz, -1))
        return tr.output(z), torch.cat(outs, dim=1)


class PrefillGraph(nn.Module):
    """(input [B, T] | [B, T, d_input], state [B, S]) -> (output [B, T, V], state_out [B, S])."""

    def __init__(
        self,
        net: SSMNetwork,
        dt_scale: float = 1.0,
        dtype: str = "fp32",
        chunk: int = 128,
        carry_steps: int = 6,
        mode_path: bool | None = None,
    ):
        super().__init__()
        self.trunk = _Trunk(net, COMPUTE_DTYPES[dtype])
        self.chunk, self.carry_steps = chunk, carry_steps
        self.max_len = chunk * (2**carry_steps - 1)
        self.ssms = nn.ModuleList(
            PrefillSSM(s, dt_scale, chunk, carry_steps, mode_path) for s in net.ssms
        )

    def forward(self, input: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        tr = self.trunk
        Bsz = state.shape[0]
        z = tr.encode(input)  # [B, T, D]
        outs = []
        for i, (ssm, X) in enumerate(zip(self.ssms, tr.split_state(state))):
            y, X = ssm(tr.norms[i](z).float(), X)  # [B, T, D], [B, 2, H, N/2]
            z = tr.mix(i, z, y)
            outs.append(X.reshape(Bsz, -1))
        return tr.output(z), torch.cat(outs, dim=1)
