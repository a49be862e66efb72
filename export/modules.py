"""Export-only torch modules: the network's recurrent step and chunked prefill, in real arithmetic.

ONNX has no complex type (and complex tensors do not export reliably), so each layer's
complex diagonal state x [B, H, N/2] is carried as X [B, 2, H, N/2] — real block, then
imaginary block — which is exactly the packed-state layout of `SSMNetwork.state_layout()`.
The discretization (dA, dB, C) is computed once here, in float64, and folded in as
constants: no graph recomputes it.

A complex product z·x is a 2×2 real block per mode, applied as one broadcast Mul and one
ReduceSum over the re/im axis (2 graph nodes, no copies):
    [Re zx; Im zx] = Σ_c' R[c, c'] X[c'],   R = [[Re z, -Im z], [Im z, Re z]]   (`rot`, `cmul`)

Step (all L layers at once on the whole state, [B, L, 2, H, N/2]; see `StepSSMs`):
    AX = R(dA)·X                                  (dA x: needs only the incoming state)
    y  = Σ_{c,n} Ĉ[c,h,p,n] AX[b,c,h,n] + Ê u      (Ĉ = [2 Re C; -2 Im C], Ê = 2 Re(C dB) + D,
                                                    so y = 2 Re(C x') + D u)
    X' = AX + B̄u                                  (x' = dA x + dB u)
A multi-head or MIMO layer's per-head products Ĉ·AX and B̄u are Mul + ReduceSum, not batched
MatMuls: onnxruntime's batched MatMul rounds a row by the call's row count, so a session's
step would depend on its batch mates; measured the same speed (0.97-1.03× at B = 1, 8, 64
for 4 heads and MIMO, d_model 256, N 64; 0.74× with 16 heads at B = 64).

Prefill (per layer) over T = n·Q positions cut into n chunks of Q (Q = manifest
graphs.prefill.chunk), with x₀ the incoming state. Rows are (batch, chunk) pairs, so every
big product is one batched MatMul over the H heads [H, B·n, ·] @ [H, ·, ·]:
    intra-chunk   y_loc[t] = Σ_{s≤t} K[t-s] u[s] + D u[t]  kernel path: Toeplitz [H, Q·M, Q·P]
                  with D folded into its diagonal (K[0] + D: no separate D u term);
                  mode path (wide heads, M² > N/2): the local states by a log₂Q-step doubling
                  scan over the chunk, then y = 2 Re(C x)
    chunk ends    E_j = Σ_s dA^{Q-1-s} dB u[jQ+s]          [H, Q·M, 2·N/2] table
    carry         S_0 = x₀,  S_{j+1} = dA^Q S_j + E_j       unrolled over n_max chunks on
                  cache-sized [B, 2, H, N/2] blocks (only non-negative powers: no overflow)
    state term    y[jQ+t] += 2 Re Σ_n C_n dA_n^{t+1} S_j,n  [H, 2·N/2, Q·P] table
    final state   S_n; every layer's S_0..S_{n_max} are packed once, and one cut of them is
                  chunk_states (S_1..S_n), one Gather state_out
The big per-layer tables are computed inside the graph from [H, N/2] parameters, so the
file stays small; onnxruntime's constant folding computes them once at session start.
T may be any multiple of Q up to Q·n_max (manifest graphs.prefill.max_len). The last chunk
may end in padding: with r ≤ Q real inputs in it (the graph's `length` input), outputs before
the padding are unchanged (the scan is causal) and the final state is
    x_T = dA^r S_{n-1} + Σ_{s<r} dA^{r-1-s} dB u_s   (G applied to the chunk's inputs moved
                                                      Q - r places later: no negative powers)
(the mode path reads it off its per-position states), S_n itself when r = Q. The graph
computes it inside an If on r < Q (torch.cond), so whole chunks cost nothing more: a shipped
model's T = 1024 call took 1.01× the graph without `length`, and a 1,000-input prompt 0.74×
(one padded call instead of 960 inputs and 40 steps).
The trunk runs on [B·T, D] rows; a SISO layer hands its output over channels first
([D, B·T], the layout of its per-head MatMuls), and the block's Out reads it transposed
(onnxruntime folds that Transpose into the Gemm). A GLU is two Linear(D, D), so no
[B·T, 2D] tensor is split. Other forms, measured on this project's CPU (2 cores,
onnxruntime 1.31), were slower: onnxruntime's DFT takes ~12 ms for one layer's forward
transform alone (H = 128, 2T = 2048); a grouped Conv with a T-tap kernel ~26 ms a layer; a
log-depth doubling carry more than the unrolled one (O(n log n) elementwise work, and
elementwise ops are bandwidth-bound here); Q = 32 is no faster than Q = 64.
The unrolled carry costs ~6 µs a step (Unsqueeze, Mul, ReduceSum, Add on 4 K floats; the
ReduceSum is most of it): dropping it altogether saves ~0.5-0.8 ms of a ~7.7-8.4 ms
shipped-model call (T = 1024, B = 1).
Measured against it: a scaled CumSum, S_j = P^j (x₀ + Σ_{i<j} P^{-(i+1)} E_i) with P = dA^Q
(8 nodes instead of 64), saves only ~0.25 ms of the call, and only with |P| clamped to
≥ 1e-2 so that P^-16 stays in float32 range, which put 2e-4 relative errors into the
shipped model's states (it has faster modes); in float64 (exact, no clamp) the carry alone
is 1.7× the float32 one, more than the unrolled carry, and a blocked float32 form needs
three full passes instead of two. That CumSum in the heads-first layout [H, B, n, 2, N/2]
(no Transposes of E and of the chunk starts) is slower: onnxruntime's ReduceSum over the
re/im axis with 16-float inner runs made the whole call 9.9 ms instead of 7.7 ms. A step as
a per-head MatMul with a block-diagonal [2·N/2, 2·N/2] matrix takes ~27 µs. Not tried in
the graph: the per-head products transposed (Toepᵀ @ Uᵀ + Fᵀ @ Shᵀ and Gᵀ @ Uᵀ) are 9-11%
faster alone (the Toeplitz one by itself 2-40%, by the run), but they want the trunk's rows
in (t, b, j) order, and the element-strided Transposes of the chunk states and per-head
ones of the inputs that needs take 143-269 µs each against 24-48 µs for today's.
Where a call's time goes (a 256-wide, 4-layer, N = 128 SISO model, T = 1,024, ~27 ms on a
2-core Intel Xeon): ~9.4 ms in the 12 per-head MatMuls, which read ~80 MB of tables a call
(G and F 8 MB a layer each, the Toeplitz 4 MB): one of them takes ~0.5 ms alone with its
table hot, ~0.7 ms in a chain of MatMuls over 96 MB of tables, ~0.9 ms in the graph; ~5.4 ms
in the dense layers; ~3.4 ms in the unrolled carries' arithmetic (the graph without it:
30.1 → 26.8 ms); the rest moves data (the Transposes of
E and of the chunk starts, Split, Concat, cuts). Tried there and dropped: the carry heads
first ([H, B, n, 2, N/2]: no Transposes of E and the starts), whose ReduceSum over re/im with
64-float inner runs took twice as long (+1.2 ms a call), while onnxruntime's transpose
optimizer moved the packing Transposes behind the Concat of all layers (one 1.2 ms
Transpose); the carry re/im first ([n, 2, B, H, N/2]: no Unsqueeze a step, -0.27 ms), which
needs a Transpose that moves B to pack the states (+1.2 ms); chunk_states as all n_max + 1
states (no cut: -0.6 ms, 2%), not worth a change of the graph's outputs; selecting the
tail's inputs inside the If (nothing measurable); one table V = dA^s [H, Q, 2·N/2] for both
the chunk ends (dB·(U reversed @ V)) and the state term (V @ (C dA S_j)ᵀ), which halves the
tables read: its 12 MatMuls summed 10.0 ms instead of 10.3 in one run's node profile (the
~9.4 ms above is another run's; per-head products run at ~40% of a dense layer's GFLOP/s
whatever their table's size), and the state term's operand with B·n innermost needs an
element-strided Transpose (+2 ms a layer).
Also dropped (shipped model, interleaved A/B in one process; ~1% is the noise floor): the
carry step as S·[Re P; Re P] + swap(S)·[−Im P; Im P] + E (Gather, Mul, Mul, Add: no
Unsqueeze or ReduceSum, bit-identical) 0.99-1.00× (probe model 1.01-1.07×); a blocked carry
(local scans within 4 groups of 4 chunks, 4 steps across, one fix-up; or 2 and 4 chunks a
step) has half the nodes but does 2-4× the elementwise work broadcast along a middle axis,
which onnxruntime runs slowly: 1.2-2× the unrolled carry alone; alternating the re/im axis
with keepdims ReduceSum 1.3×; the logits as MatMul + Add on [B, T, D] (no output copy, but
the bias then takes a pass of its own) 1.005-1.012×; chunk_states as one Concat of per-layer
cuts 1.00-1.06×; a Transpose before GELU so that both GLU Gemms read untransposed 0.99-1.04×;
one MatMul [U | Sh] @ [Toep; F] for the two products and the Add (no faster alone); Q = 32
or 128 (slower). onnxruntime's SkipLayerNormalization fusion (residual Add + the next
LayerNorm) cannot apply: it wants static dims after the first and an Add read only by the
LayerNorm.

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

# whether torch.export is tracing (torch >= 2.6; before, always taken as yes)
_EXPORTING = getattr(torch.compiler, "is_exporting", lambda: True)
# dtypes of the weights/activations for each export variant (the SSM recurrence and the
# state always stay float32: an fp16 state drifts over long streams).
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}


def discrete64(ssm: SSM, dt_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Complex128 (dA [H, N/2], dB [H, N/2, M], C [H, M, N/2]) with every Δ scaled by dt_scale."""
    ssm64 = copy.deepcopy(ssm).to(torch.float64)
    with torch.no_grad():
        dA, dB, C = ssm64.discrete(dt_scale)
    return dA, dB, C


def rot(z: Tensor) -> Tensor:
    """Complex z [...] -> float32 R [2, 2, ...] with R[c, c'] the 2×2 real block of z·."""
    return rot_ri(z.real, z.imag).float()


def rot_ri(re: Tensor, im: Tensor) -> Tensor:
    """`rot` of z = re + i·im given as real tensors (usable inside an exported graph)."""
    return torch.stack([torch.stack([re, -im]), torch.stack([im, re])])


def cmul(R: Tensor, X: Tensor, cdim: int) -> Tensor:
    """z·X for X with re/im on axis `cdim`; R = rot(z) laid out to broadcast against
    X.unsqueeze(cdim), its (out, in) re/im axes at (cdim, cdim + 1)."""
    return (X.unsqueeze(cdim) * R).sum(cdim + 1)


def _shift(X: Tensor, d: int, dim: int) -> Tensor:
    """X shifted by d along `dim` (zeros enter at the front, the length is kept)."""
    pad = [0, 0] * (X.dim() - 1 - dim) + [d, 0]
    L = X.shape[dim]
    return nn.functional.pad(X, pad).narrow(dim, 0, L)


class StepSSMs(nn.Module):
    """Every layer's recurrence x' = dA x + dB u, y = 2 Re(C x') + D u, on the whole packed
    state X [B, L, 2, H, N/2] at once.

    x' is linear in (x, u), so the part of it that needs only the incoming state, AX = dA x,
    is computed for all L layers before the first layer runs (`rotate`), and so is its share
    of every layer's output (`readout`: y = 2 Re(C·AX) + (2 Re(C dB) + D) u). The layers
    then pass only [B, D] tensors (`direct`), and the whole state is written once at the
    end (`inject`: X' = AX + dB u for every layer). Each state-sized op is one pass over
    the whole state: no per-layer Split/Concat copies of it, and few graph nodes at B = 1.
    """

    def __init__(self, ssms: list[SSM], dt_scale: float):
        super().__init__()
        self.L, self.H, self.M, self.N2 = len(ssms), ssms[0].heads, ssms[0].M, ssms[0].N2
        H, M, N2 = self.H, self.M, self.N2
        R, Bs, Cs, E = [], [], [], []
        for ssm in ssms:
            dA, dB, C = discrete64(ssm, dt_scale)  # [H, N/2], [H, N/2, M], [H, M, N/2]
            D = ssm.D.detach().to(torch.float64)  # [D]
            CB = 2 * (C @ dB).real  # 2 Re(C dB): [H, P, M]
            Cc = torch.stack([2 * C.real, -2 * C.imag])  # Ĉ: [2, H, P, N/2]
            R.append(rot(dA))  # [2, 2, H, N/2]
            if M == 1:
                Bs.append(torch.stack([dB.real, dB.imag])[..., 0])  # [2, H, N/2]
                Cs.append(Cc[:, :, 0])  # [2, H, N/2]
                E.append(CB[:, 0, 0] + D)  # [D]
            else:
                Bs.append(torch.cat([dB.real, dB.imag], dim=1).transpose(1, 2))  # [H, M, 2·N/2]
                Cs.append(Cc.permute(1, 0, 3, 2).reshape(H, 2 * N2, M))  # [H, 2·N/2, P]
                # y += u @ Ê with Ê [D, D] = blockdiag_h(2 Re(C dB)[h]ᵀ) + diag(D)
                E.append(torch.block_diag(*CB.transpose(1, 2)) + torch.diag(D))
        self.register_buffer("R", torch.stack(R).float())  # [L, 2, 2, H, N/2]
        if M == 1:
            self.register_buffer("Bs", torch.stack(Bs).float())  # [L, 2, H, N/2]
            self.register_buffer("Cs", torch.stack(Cs).float())  # [L, 2, H, N/2]
            self.register_buffer("ones", torch.ones(1, N2))  # [1, N/2]
        else:
            self.register_buffer("Bm", torch.stack(Bs).float())  # [L, H, M, 2·N/2]
            self.register_buffer("Cm", torch.stack(Cs).float())  # [L, H, 2·N/2, P]
        self.register_buffer("E", torch.stack(E).float())  # [L, D] (M = 1) | [L, D, D]

    def rotate(self, X: Tensor) -> Tensor:
        """AX = dA x for every layer: X [B, L, 2, H, N/2] -> [B, L, 2, H, N/2]."""
        return cmul(self.R, X, 2)

    def readout(self, AX: Tensor) -> list[Tensor]:
        """Every layer's 2 Re(C·AX): AX [B, L, 2, H, N/2] -> L × [B, D]."""
        Bsz, L, H, M, N2 = AX.shape[0], self.L, self.H, self.M, self.N2
        if M == 1:
            y = (AX * self.Cs).sum(-1).sum(2)  # [B, L, H]
        else:  # Mul + ReduceSum, not a batched MatMul: see `inject`
            AXh = AX.transpose(2, 3).reshape(Bsz, L, H, 2 * N2, 1)  # [B, L, H, 2·N/2, 1]
            y = (AXh * self.Cm).sum(3)  # [B, L, H, P]
        return list(y.reshape(Bsz, L * H * M).split(H * M, dim=1))  # one Split

    def direct(self, i: int, u: Tensor) -> Tensor:
        """Layer i's input term (2 Re(C dB) + D) u: u [B, D] -> [B, D]."""
        return u * self.E[i] if self.M == 1 else u @ self.E[i]

    def inject(self, AX: Tensor, U: Tensor) -> Tensor:
        """X' = AX + dB u for every layer: AX [B, L, 2, H, N/2], U [B, L, D] -> X' [B, S]."""
        Bsz, L, H, M, N2 = AX.shape[0], self.L, self.H, self.M, self.N2
        if M == 1:
            Uo = U.unsqueeze(-1) @ self.ones  # u ⊗ 1 as a MatMul: [B, L, H, N/2]
            Bu = Uo.unsqueeze(2) * self.Bs  # [B, L, 2, H, N/2]
        else:
            # Mul + ReduceSum: onnxruntime's batched MatMul [L, H, B, ·] @ [L, H, ·, ·] rounds
            # a row by the call's row count; this sums each row the same way whatever B is,
            # so a session's step does not depend on its batch mates
            Uh = U.reshape(Bsz, L, H, M, 1)  # [B, L, H, M, 1]
            Bu = (Uh * self.Bm).sum(3).reshape(Bsz, L, H, 2, N2).transpose(2, 3)
        # reshaped before the Add, so the graph's last op writes state_out itself
        return AX.reshape(Bsz, -1) + Bu.reshape(Bsz, -1)  # [B, S]


def step_drift(net: SSMNetwork, dt_scale: float, beyond: float = 0.0) -> dict:
    """How far the step graph may drift from the exact recurrence over streams as long as
    its slowest mode's memory. StepSSMs holds each dA as float32 (Re, Im), off from dA by
    e_n = |dA32_n − dA_n| ≤ ~3e-8 per component; a mode's state accumulates that error over
    its memory 1/δ_n (δ_n = 1 − |dA_n|), to a relative error of about e_n / δ_n. A model
    whose slowest modes have δ ≪ 1e-3 (small Δ·|Re A|: a trained slow mode, or a small
    dt_scale) can drift past the fp32 tolerance on streams longer than a parity check; the
    prefill graph keeps log|dA| instead and does not.

    Returns {"max_rel": max_n e_n / δ_n over the modes whose memory exceeds `beyond` steps
    (a check that long measures the others), "memory": max_n 1 / δ_n (steps)}."""
    worst, memory = 0.0, 0.0
    for ssm in net.ssms:
        dA = discrete64(ssm, dt_scale)[0]  # [H, N/2]
        R = rot(dA).double()  # the float32 block the graph holds, [2, 2, H, N/2]
        e = (torch.complex(R[0, 0], R[1, 0]) - dA).abs()  # [H, N/2]
        # δ > 0 (the layers' Re A < 0); a |dA| that rounds to 1 in float64 (Δ·|Re A| below
        # ~1e-16) decays slower than float64 resolves: its memory is at least 2^53 steps
        decay = (1 - dA.abs()).clamp_min(2.0**-53)
        memory = max(memory, float((1 / decay).max()))
        long = decay * beyond < 1  # memory 1/δ > beyond
        if long.any():
            worst = max(worst, float((e[long] / decay[long]).max()))
    return {"max_rel": worst, "memory": memory}


class PrefillSSM(nn.Module):
    """One layer over a chunked sequence (see the module docstring), u [B, T, D], X [B, 2, H, N/2].

    Args:
        ssm: the trained layer.
        dt_scale: Δ multiplier.
        chunk: Q, the chunk length (a power of two).
        max_chunks: n_max, chunks per call (the carry is unrolled n_max times): T ≤ Q·n_max.
        mode_path: intra-chunk by a doubling scan over the modes (wide heads, M² > N/2)
            instead of the Toeplitz of the kernel; None → pick like the layer does.
    """

    def __init__(
        self,
        ssm: SSM,
        dt_scale: float,
        chunk: int,
        max_chunks: int,
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
        self.register_buffer("kq", torch.arange(Q))  # int64 [Q]: positions in a chunk
        # carry constant dA^Q, exact in float64, as 2×2 blocks [2, 2, H, N/2]
        self.register_buffer("Rc", rot(dA**Q))
        self.max_chunks = max_chunks
        if self.mode_path:
            Bm = torch.cat([dB.real, dB.imag], dim=1).transpose(1, 2)  # [H, M, 2·N/2]
            self.register_buffer("Bm", Bm.float().contiguous())
            Cm = torch.cat([2 * C.real, -2 * C.imag], dim=2).transpose(1, 2)  # [H, 2·N/2, M]
            self.register_buffer("Cm", Cm.float().contiguous())
            L2 = int(math.log2(Q))
            zq = torch.stack([dA ** (2**k) for k in range(L2)])  # [log2 Q, H, N/2]
            Rq = rot(zq).permute(2, 3, 0, 1, 4).reshape(L2, H, 1, 1, 1, 2, 2, N2)
            self.register_buffer("Rq", Rq.contiguous())
        else:
            W = torch.einsum("hpn,hnm->hpmn", C, dB).reshape(H, M * M, N2)  # [H, P·M, N/2]
            self.register_buffer("W2", torch.cat([2 * W.real, -2 * W.imag], 2).float())
            # dB and 2·C in polar form, laid out for the tables (log|·| floored: no -inf)
            dBt = dB.transpose(1, 2)  # [H, M, N/2]
            self.register_buffer("lB", torch.log(dBt.abs().clamp_min(1e-30)).float())
            self.register_buffer("phB", torch.angle(dBt).float())  # [H, M, N/2]
            Ct = (2 * C).permute(0, 2, 1).unsqueeze(2)  # [H, N/2, 1, P]
            self.register_buffer("lC", torch.log(Ct.abs().clamp_min(1e-30)).float())
            self.register_buffer("phC", torch.angle(Ct).float())  # [H, N/2, 1, P]
            # the direct term D u as K[0] += D on the p = m channels: no separate Mul and Add
            Dk = torch.zeros(H, M, M)
            Dk[:, range(M), range(M)] = ssm.D.detach().float().reshape(H, M)
            self.register_buffer("Dk", Dk.reshape(H, M * M, 1))
        self.register_buffer("D", ssm.D.detach().float().clone())  # [D]
        self.register_buffer("Dc", self.D.unsqueeze(-1).clone())  # [D, 1]

    def powers(self) -> tuple[Tensor, Tensor]:
        """dA^k for k = 0..Q: (re, im), each [H, N/2, Q+1] (computed in the graph)."""
        mag = torch.exp(self.logr.unsqueeze(-1) * self.k)  # [H, N/2, Q+1]
        ang = self.theta.unsqueeze(-1) * self.k  # [H, N/2, Q+1]
        return mag * torch.cos(ang), mag * torch.sin(ang)

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel path: (Toeplitzᵀ [H, Q·M, Q·P] of K with D on its diagonal, chunk-end
        Gᵀ [H, Q·M, 2·N/2],
        state term Fᵀ [H, 2·N/2, Q·P]), from the [H, N/2] parameters.

        Each is built in its final layout straight from the polar form
        z·dA^k = exp(log|z| + k·log|dA|) · e^{i(arg z + k·arg dA)}, so that constant folding
        at session start makes few full-size intermediates (its peak memory).
        """
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        logr, theta = self.logr.unsqueeze(1), self.theta.unsqueeze(1)  # [H, 1, N/2]
        k = self.k[:Q]  # [Q]: 0..Q-1
        # kernel K[h, (p,m), l] = 2 Re Σ_n W[h,(p,m),n] dA^l, l < Q
        kl = k.unsqueeze(-1)  # [Q, 1]
        mag, ang = torch.exp(kl * logr), kl * theta  # [H, Q, N/2]
        P = torch.cat([mag * torch.cos(ang), mag * torch.sin(ang)], dim=2)  # [H, Q(l), 2·N/2]
        K = self.W2 @ P.transpose(1, 2)  # [H, P·M, Q]
        K = K + nn.functional.pad(self.Dk, [0, Q - 1])  # D folded into K[0]
        Kp = nn.functional.pad(K, [1, 0])  # [H, P·M, Q+1], Kp[..., 0] = 0
        q = k.to(torch.int64)  # [Q]
        idx = (q.unsqueeze(0) - q.unsqueeze(1) + 1).clamp_min(0)  # [Q(s), Q(t)]: t-s+1 or 0
        Toep = Kp[:, :, idx]  # [H, P·M, Q(s), Q(t)]
        if M == 1:
            Toep = Toep.reshape(H, Q, Q)
        else:
            Toep = Toep.reshape(H, M, M, Q, Q).permute(0, 3, 2, 4, 1).reshape(H, Q * M, Q * M)
        # chunk ends G[h, (s,m), (c,n)] = dB[h,n,m] dA^{Q-1-s}, re (c=0) / im (c=1)
        ks = (Q - 1 - k).reshape(Q, 1, 1)  # [Q, 1, 1]
        expo = ks * logr.unsqueeze(1) + self.lB.unsqueeze(1)  # [H, Q, M, N/2]
        ang = ks * theta.unsqueeze(1) + self.phB.unsqueeze(1)  # [H, Q, M, N/2]
        mag = torch.exp(expo)
        G = torch.cat([mag * torch.cos(ang), mag * torch.sin(ang)], dim=3)  # [H, Q, M, 2·N/2]
        # state term F[h, (c,n), (t,p)] = (2 Re, -2 Im) of C[h,p,n] dA^{t+1}
        kt = (k + 1).unsqueeze(-1)  # [Q, 1]
        expo = self.logr.reshape(H, N2, 1, 1) * kt + self.lC  # [H, N/2, Q, P]
        ang = self.theta.reshape(H, N2, 1, 1) * kt + self.phC  # [H, N/2, Q, P]
        mag = torch.exp(expo)
        F = torch.cat([mag * torch.cos(ang), -(mag * torch.sin(ang))], dim=1)  # [H, 2·N/2, Q, P]
        return Toep, G.reshape(H, Q * M, 2 * N2), F.reshape(H, 2 * N2, Q * M)

    def forward(self, u: Tensor, X0: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """u: float32 [B, T, D] (T = n·Q), X0: [B, 2, H, N/2] -> (y [B, T, D], the carry's
        states S_0..S_{n_max} [B, n_max + 1, 2, H, N/2]: S_j is the state after j chunks, those
        past n are padding; what `tail` needs for a last chunk that ends in padding)."""
        Bsz, T = u.shape[0], u.shape[1]
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        n = T // Q
        uh = u.reshape(Bsz * T, H, M).transpose(0, 1)  # [H, B·T, M], rows (b, j, s)
        if self.mode_path:
            v = (uh @ self.Bm).reshape(H, Bsz, n, Q, 2, N2)  # dB u per position
            for k in range(self.Rq.shape[0]):  # local states within each chunk
                v = v + cmul(self.Rq[k], _shift(v, 2**k, 3), 4)
            E = v[:, :, :, Q - 1].permute(1, 2, 3, 0, 4)  # [B, n, 2, H, N/2]
            S = self._carry(E, X0)  # [B, n_max + 1, 2, H, N/2]
            starts = S[:, :n]  # [B, n, 2, H, N/2]
            # x_t = local_t + dA^{t+1} S_j, then y = 2 Re(C x)
            Pr, Pi = self.powers()  # [H, N/2, Q+1]
            P1 = rot_ri(Pr[..., 1:], Pi[..., 1:])  # [2, 2, H, N/2, Q]
            P1 = P1.permute(2, 4, 0, 1, 3).reshape(H, 1, 1, Q, 2, 2, N2)
            Sj = starts.permute(3, 0, 1, 2, 4).unsqueeze(3)  # [H, B, n, 1, 2, N/2]
            x = v + cmul(P1, Sj, 4)  # [H, B, n, Q, 2, N/2]
            y = x.reshape(H, Bsz * T, 2 * N2) @ self.Cm  # [H, B·T, M]
            tail = (x[:, :, -1],)  # the last chunk's states [H, B, Q, 2, N/2]
        else:
            Toep, G, F = self.tables()
            U = uh.reshape(H, Bsz * n, Q * M)  # [H, B·n, Q·M]
            E = U @ G  # [H, B·n, 2·N/2]: no [Toeplitz | G] product to split
            E = E.reshape(H, Bsz * n, 2, N2).permute(1, 2, 0, 3)  # [B·n, 2, H, N/2]
            S = self._carry(E.reshape(Bsz, n, 2, H, N2), X0)  # [B, n_max + 1, 2, H, N/2]
            starts = S[:, :n]  # [B, n, 2, H, N/2]
            Sh = starts.reshape(Bsz * n, 2, H, N2).permute(2, 0, 1, 3)  # [H, B·n, 2, N/2]
            y = U @ Toep + Sh.reshape(H, Bsz * n, 2 * N2) @ F  # [H, B·n, Q·P]
            last = U.reshape(H, Bsz, -1, Q * M)[:, :, -1]  # [H, B, Q·M]: the last chunk's inputs
            tail = (last, S[:, n - 1], G)
        if M == 1:  # SISO: channels first, the block's Out reads it transposed
            y = y.reshape(H, Bsz * T)  # [D, B·T]
            return (y + uh.reshape(H, Bsz * T) * self.Dc if self.mode_path else y), S, tail
        y = y.reshape(H, Bsz * T, M).transpose(0, 1).reshape(Bsz * T, H * M)  # [B·T, H·P]
        return (y + u.reshape(Bsz * T, H * M) * self.D if self.mode_path else y), S, tail

    def tail(self, r: Tensor, *args: Tensor) -> Tensor:
        """The state after the first r inputs (int64 [], 1..Q) of the last chunk, from
        forward's tail tuple: [B, 2, H, N/2].

        Mode path: the chunk's per-position states x [H, B, Q, 2, N/2] hold it at r - 1.
        Kernel path, from (the chunk's inputs [H, B, Q·M], S_{n-1} [B, 2, H, N/2], the table
        G): dA^r S_{n-1} + Σ_{s<r} dA^{r-1-s} dB u_s, the sum being G applied to the inputs
        moved Q - r places later (G[s] = dB dA^{Q-1-s}): only non-negative powers."""
        H, M, N2, Q = self.H, self.M, self.N2, self.Q
        if self.mode_path:
            (x,) = args
            xr = x.index_select(2, (r - 1).reshape(1))  # [H, B, 1, 2, N/2]
            return xr.reshape(H, -1, 2, N2).permute(1, 2, 0, 3)
        last, S_prev, G = args
        Bsz = S_prev.shape[0]
        src = self.kq - (Q - r)  # [Q]: the input that lands at each position, < 0: none
        last = last.reshape(H, Bsz, Q, M)
        moved = last.index_select(2, src.clamp_min(0)) * (src >= 0).to(last.dtype).reshape(Q, 1)
        Er = (moved.reshape(H, Bsz, Q * M) @ G).reshape(H, Bsz, 2, N2).permute(1, 2, 0, 3)
        rf = r.to(self.logr.dtype)
        mag, ang = torch.exp(rf * self.logr), rf * self.theta  # dA^r in polar form [H, N/2]
        Rr = rot_ri(mag * torch.cos(ang), mag * torch.sin(ang))  # [2, 2, H, N/2]
        return cmul(Rr, S_prev, 1) + Er  # [B, 2, H, N/2]

    def _carry(self, E: Tensor, X0: Tensor) -> Tensor:
        """S_0 = x₀, S_{j+1} = dA^Q S_j + E_j, unrolled n_max times on [B, 2, H, N/2] blocks.

        E: chunk-end states [B, n, 2, H, N/2] (n ≤ n_max, brought to n_max here by one Gather
        that repeats E_{n-1}: the steps past n come after everything that is read; a Pad to
        n_max and a cut back cost two copies, 0.3-0.45 ms a layer of the probe model). Returns
        S_0..S_{n_max} [B, n_max + 1, 2, H, N/2] (the caller cuts what it reads).
        """
        nmax = self.max_chunks  # a static chunk count: no shape depends on n_max - n
        idx = torch.arange(nmax, device=E.device).clamp(max=E.shape[1] - 1)
        E = E.index_select(1, idx)  # [B, n_max, 2, H, N/2]
        S = X0.unsqueeze(1)  # [B, 1, 2, H, N/2]: the chunk axis kept, no Squeeze/Unsqueeze
        states = [S]
        for Ej in E.split(1, dim=1):  # n_max × [B, 1, 2, H, N/2]
            S = cmul(self.Rc, S, 2) + Ej
            states.append(S)
        return torch.cat(states, dim=1)  # [B, n_max + 1, 2, H, N/2]


class _GLU(nn.Module):
    """Linear(D, 2D) + GLU as two Linear(D, D): a·σ(b) without splitting a [.., 2D] tensor."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        D = lin.out_features // 2
        self.a, self.b = nn.Linear(lin.in_features, D), nn.Linear(lin.in_features, D)
        with torch.no_grad():
            for half, part in zip((self.a, self.b), (slice(0, D), slice(D, 2 * D))):
                half.weight.copy_(lin.weight[part])
                half.bias.copy_(lin.bias[part])
        self.to(lin.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) * torch.sigmoid(self.b(x))


def _split_glu(out: nn.Module) -> nn.Module:
    """A block's Out with a GLU as `_GLU`; a plain Linear as is."""
    if isinstance(out, nn.Sequential) and isinstance(out[-1], nn.GLU):
        return _GLU(out[0])
    return out


class Trunk(nn.Module):
    """The per-time-step parts of the network (encoder, blocks' norm/mix, final norm, head)."""

    def __init__(self, net: SSMNetwork, dtype: torch.dtype):
        super().__init__()
        cfg = net.cfg
        self.tokens = cfg.input_kind == "tokens"
        self.dtype = dtype
        src = copy.deepcopy(net).eval().to(dtype)
        self.encoder, self.norm, self.head = src.encoder, src.norm, src.head
        self.norms = nn.ModuleList(b.norm for b in src.blocks)
        self.outs = nn.ModuleList(_split_glu(b.out) for b in src.blocks)
        self.layout = net.state_layout()

    def encode(self, inp: Tensor) -> Tensor:
        return self.encoder(inp if self.tokens else inp.to(self.dtype))

    def mix(self, i: int, z: Tensor, y: Tensor) -> Tensor:
        """Residual block tail: z + Out(GELU(y)) (dropout is identity in eval)."""
        return z + self.outs[i](nn.functional.gelu(y.to(self.dtype)))

    def output(self, z: Tensor) -> Tensor:
        return self.head(self.norm(z)).float()

    def split_state(self, state: Tensor) -> list[Tensor]:
        """[B, S] -> per layer [B, 2, H, N/2]: one Reshape + one Split."""
        Bsz, L = state.shape[0], len(self.layout)
        _, H, N2 = self.layout[0]["shape"]  # every layer has the same [2, H, N/2]
        return list(state.reshape(Bsz, 2 * L, H, N2).split(2, dim=1))


class StepGraph(nn.Module):
    """(input int64 [B] | float32 [B, d_input], state [B, S]) -> (output [B, V], state_out [B, S]).

    The state is read once at the top (`StepSSMs.rotate`, `readout`) and written once at
    the end (`StepSSMs.inject`); between them only [B, D] tensors flow through the layers.
    """

    def __init__(self, net: SSMNetwork, dt_scale: float = 1.0, dtype: str = "fp32"):
        super().__init__()
        self.trunk = Trunk(net, COMPUTE_DTYPES[dtype])
        self.ssm = StepSSMs(list(net.ssms), dt_scale)

    def forward(self, input: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        tr, ssm = self.trunk, self.ssm
        Bsz = state.shape[0]
        AX = ssm.rotate(state.reshape(Bsz, ssm.L, 2, ssm.H, ssm.N2))  # [B, L, 2, H, N/2]
        Y = ssm.readout(AX)  # L × [B, D]
        z = tr.encode(input)  # [B, D]
        us = []
        for i in range(ssm.L):
            u = tr.norms[i](z).float()  # [B, D]
            z = tr.mix(i, z, Y[i] + ssm.direct(i, u))
            us.append(u)
        state_out = ssm.inject(AX, torch.cat(us, 1).reshape(Bsz, ssm.L, -1))  # [B, S]
        return tr.output(z), state_out


class PrefillGraph(nn.Module):
    """(input [B, T] | [B, T, d_input], state [B, S], length int64 [])
    -> (output [B, T, V], state_out [B, S], chunk_states [B, T / chunk, S]): the packed state
    after each chunk too (the runtime's prefix cache and rewind checkpoints use them).

    T is a multiple of the chunk; `length` says how many of the T inputs are real: the last
    chunk may end in padding (T - length < chunk inputs, after the real ones), which changes
    no output before it. state_out is then the state after input `length`, and the last of
    chunk_states (a chunk that is not whole) is not a state of the stream. The exported graph
    gives `length` a default larger than any T (the whole input is real), so callers that do
    not feed it see no change."""

    def __init__(
        self,
        net: SSMNetwork,
        dt_scale: float = 1.0,
        dtype: str = "fp32",
        chunk: int = 64,
        max_chunks: int = 16,
        mode_path: bool | None = None,
    ):
        super().__init__()
        self.trunk = Trunk(net, COMPUTE_DTYPES[dtype])
        self.chunk, self.max_chunks = chunk, max_chunks
        self.ssms = nn.ModuleList(
            PrefillSSM(s, dt_scale, chunk, max_chunks, mode_path) for s in net.ssms
        )

    def forward(
        self, input: Tensor, state: Tensor, length: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        tr = self.trunk
        z = tr.encode(input)  # [B, T, D]
        Bsz, T = z.shape[0], z.shape[1]
        z = z.reshape(Bsz * T, -1)  # [B·T, D]: 2-D, so a transposed operand folds into MatMul
        # r: the inputs in the last chunk (1..Q); the rest of it is padding
        r = None if length is None else (length - (T - self.chunk)).clamp(1, self.chunk)
        states, tails = [], []
        for i, (ssm, X) in enumerate(zip(self.ssms, tr.split_state(state))):
            u = tr.norms[i](z).float().reshape(Bsz, T, -1)  # [B, T, D]
            y, S, tail = ssm(u, X)  # [D, B·T] (SISO) | [B·T, D], [B, n_max + 1, 2, H, N/2]
            states.append(S)
            tails.append(tail)
            if ssm.M == 1:
                z = z + tr.outs[i](nn.functional.gelu(y.to(tr.dtype)).transpose(0, 1))
            else:
                z = tr.mix(i, z, y)
        # every layer's S_0..S_{n_max} as packed states, then one cut writes chunk_states
        # (S_1..S_n) and one Gather the final state S_n: no per-layer slices or Concat
        n = T // self.chunk
        packed = torch.cat(states, dim=2).reshape(Bsz, self.max_chunks + 1, -1)  # [B, n_max+1, S]
        final = packed[:, n]  # [B, S]
        if r is not None:  # a last chunk with padding ends at the state after input r
            sizes = [len(t) for t in tails]
            flat = [a for t in tails for a in t]

            def whole(r, final, *flat):
                return final.clone()

            def partial(r, final, *flat):
                parts, k = [], 0
                for ssm, size in zip(self.ssms, sizes):
                    parts.append(ssm.tail(r, *flat[k : k + size]))
                    k += size
                return torch.cat(parts, 1).reshape(final.shape)

            # an If in the graph: the tail is computed only when the last chunk has padding.
            # Called eagerly (tests), the branch is taken directly: torch.cond compiles both
            # with dynamo for each new shape, ~2 s each time (torch < 2.6 cannot tell)
            if _EXPORTING() or torch.compiler.is_compiling():
                final = torch.cond(r == self.chunk, whole, partial, (r, final, *flat))
            else:
                final = (whole if bool(r == self.chunk) else partial)(r, final, *flat)
        return tr.output(z).reshape(Bsz, T, -1), final, packed[:, 1 : n + 1]
