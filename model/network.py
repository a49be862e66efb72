"""The deep SSM network: encoder → n pre-norm SSM blocks → norm → head.

    block(z) = z + dropout(Out(dropout(GELU(SSM(LayerNorm(z))))))   Out = Linear or GLU

Nothing here mixes time steps except the SSM (no BatchNorm over time, no
padding tricks), so `forward` over a sequence and repeated `step` agree.

Inputs are either tokens (`vocab_size`, int64 [B, L]) or continuous signals
(`d_input`, float [B, L, d_input]). Outputs are logits [B, L, vocab_size] or
values [B, L, d_output].

The packed state is what a serving session is: float32 [B, S] with, per layer,
the complex state [B, H, N/2] stored as [B, 2, H, N/2] (real block, then
imaginary block), layers concatenated; S = n_layers · H · d_state.
See `state_layout()`.

Dimension letters: B batch, L length, D d_model, H heads, N d_state, S packed state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import INITS, SSM, check_dt_range
from .ssm import METHODS


def check_fields(cfg, ints=(), floats=(), bools=()) -> None:
    """Check the types of the named fields of a config dataclass (ValueError naming the
    field): an integer for `ints`, any real number for `floats` (None only where that is the
    field's default), true or false for `bools` ("no" would be true). numpy scalars become
    plain int / float: config.json, the training log and a manifest are written by the json
    module, which refuses numpy's (a run would fail at its first save)."""
    for name in bools:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    optional = {f.name for f in dataclasses.fields(cfg) if f.default is None}

    def given(name: str, kind: type, word: str) -> bool:
        v = getattr(cfg, name)
        if v is None and name in optional:
            return False
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"{name} must be {word}, got {v!r}")
        return True

    for name in ints:
        if given(name, numbers.Integral, "an integer") and type(getattr(cfg, name)) is not int:
            setattr(cfg, name, int(getattr(cfg, name)))
    for name in floats:  # an int stays an int (1 is a valid alpha)
        if given(name, numbers.Real, "a number") and type(getattr(cfg, name)) not in (int, float):
            setattr(cfg, name, float(getattr(cfg, name)))


@dataclass
class SSMConfig:
    """Network hyper-parameters (stored as config.json in a checkpoint).

    Exactly one of `vocab_size` (token model) or `d_input` (continuous model).
    `d_output` defaults to vocab_size (logits) or d_input.
    """

    vocab_size: int | None = None
    d_input: int | None = None
    d_output: int | None = None
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64
    heads: int | None = None
    init: str = "s4d-lin"
    discretization: str = "zoh"
    alpha: float = 0.5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    glu: bool = True

    def __post_init__(self):
        # 8.0 from a config.json failed deep in torch, "0.001" with a bare TypeError
        check_fields(
            self,
            ints=("vocab_size", "d_input", "d_output", "d_model", "n_layers", "d_state", "heads"),
            floats=("alpha", "dt_min", "dt_max", "dropout"),
            bools=("glu",),
        )
        if (self.vocab_size is None) == (self.d_input is None):
            raise ValueError("exactly one of vocab_size (tokens) or d_input (signals) must be set")
        for name in ("vocab_size", "d_input"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.d_output is None:
            self.d_output = self.vocab_size if self.vocab_size is not None else self.d_input
        for name in ("d_output", "d_model", "n_layers", "d_state"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model == 1:  # LayerNorm over one channel outputs its bias, whatever the input
            raise ValueError(
                "d_model must be at least 2, got 1: the LayerNorm of each block over a single "
                "channel is constant, so the network would ignore its input"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # The layer checks these too; checking here makes a bad config fail when it is
        # made (CLI flags, config.json), naming the field, before any module is built.
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (N/2 conjugate pairs), got {self.d_state}")
        if self.heads is not None and (self.heads <= 0 or self.d_model % self.heads):
            raise ValueError(
                f"heads={self.heads} must be positive and divide d_model={self.d_model}"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        if self.discretization not in METHODS:
            raise ValueError(
                f"unknown discretization {self.discretization!r}; expected one of {METHODS}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        check_dt_range(self.dt_min, self.dt_max)

    @property
    def input_kind(self) -> str:
        return "tokens" if self.vocab_size is not None else "values"

    @property
    def n_heads(self) -> int:
        return self.d_model if self.heads is None else self.heads

    @property
    def state_size(self) -> int:
        """S: float32 numbers of packed state per session."""
        return self.n_layers * self.n_heads * self.d_state

    @property
    def n_parameters(self) -> int:
        """Parameters of SSMNetwork(self), counted from the config alone (nothing is built:
        a config too large for memory can be refused first)."""
        D, N, H = self.d_model, self.d_state, self.n_heads
        encoder = self.vocab_size * D if self.input_kind == "tokens" else (self.d_input + 1) * D
        ssm = 2 * H * (N // 2) + 2 * N * D + D + H  # A re, im [H, N/2]; B, C [D·N/2, 2]; D; Δ
        out = 2 * D * (D + 1) if self.glu else D * (D + 1)  # Linear(D, 2D) + GLU, or (D, D)
        block = 2 * D + ssm + out  # LayerNorm, SSM, output projection
        return encoder + self.n_layers * block + 2 * D + (D + 1) * self.d_output

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SSMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        if missing:  # a default would make it another model (zoh for bilinear, alpha 0.5)
            raise ValueError(f"missing config fields {missing} (a saved config names them all)")
        return cls(**d)


class Block(nn.Module):
    """Pre-norm residual block: z + Out(GELU(SSM(LayerNorm(z))))."""

    def __init__(self, cfg: SSMConfig):
        super().__init__()
        D = cfg.d_model
        self.norm = nn.LayerNorm(D)
        self.ssm = SSM(
            D, cfg.d_state, cfg.heads, cfg.init, cfg.discretization, cfg.alpha,
            cfg.dt_min, cfg.dt_max,
        )  # fmt: skip
        self.drop = nn.Dropout(cfg.dropout)
        self.out = (
            nn.Sequential(nn.Linear(D, 2 * D), nn.GLU(dim=-1)) if cfg.glu else nn.Linear(D, D)
        )

    def _mix(self, y: Tensor) -> Tensor:
        """Per-time-step part after the SSM (shared by forward and step)."""
        return self.drop(self.out(self.drop(nn.functional.gelu(y))))

    def forward(self, z: Tensor) -> Tensor:  # [B, L, D]
        return z + self._mix(self.ssm(self.norm(z)))

    def step(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:  # [B, D], [B, H, N/2]
        y, x = self.ssm.step(self.norm(z), x)
        return z + self._mix(y), x


class SSMNetwork(nn.Module):
    """Deep SSM: `forward` (convolution, training) and `step` (recurrence, serving)."""

    def __init__(self, cfg: SSMConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        if cfg.input_kind == "tokens":
            self.encoder = nn.Embedding(cfg.vocab_size, D)
        else:
            self.encoder = nn.Linear(cfg.d_input, D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.d_output)

    @property
    def ssms(self) -> list[SSM]:
        return [b.ssm for b in self.blocks]

    # where modes grow, what to train with instead of a smaller --dt-max (said by `ssmstream
    # train` and `ssmstream export`)
    A_STABLE = (
        "an A-stable --discretization (zoh, bilinear, backward_euler, gbt with --alpha >= 0.5)"
    )

    @torch.no_grad()
    def growing_modes(self, dt_scale: float = 1.0) -> tuple[int, int, float]:
        """(modes whose |Ā| > 1, all modes, the largest |Ā|) with Δ scaled by dt_scale, in
        float64 (a float32 |Ā| of a mode barely decaying, small Δ, may round above 1; one
        whose Re A underflowed to 0 is 1 exactly). A growing mode (forward Euler, or gbt with
        α < ½, at too large a Δ·|A|: docs/theory.md §2) makes the outputs grow without bound
        over a stream."""
        mags = [layer.double().discrete(dt_scale)[0].abs() for layer in copy.deepcopy(self.ssms)]
        grow = sum(int((m > 1 + 1e-12).sum()) for m in mags)  # past float64 rounding
        return grow, sum(m.numel() for m in mags), max(float(m.max()) for m in mags)

    def _check_input(self, inp: Tensor, time_axis: bool) -> None:
        cfg, lead = self.cfg, ("B, L" if time_axis else "B")
        if cfg.input_kind == "tokens":
            if inp.dim() != (2 if time_axis else 1) or inp.dtype != torch.long:
                raise ValueError(
                    f"input must be int64 [{lead}] tokens, got {inp.dtype} {tuple(inp.shape)}"
                )
        elif inp.dim() != (3 if time_axis else 2) or inp.shape[-1] != cfg.d_input:
            raise ValueError(f"input must be float [{lead}, {cfg.d_input}], got {tuple(inp.shape)}")

    def forward(self, inp: Tensor) -> Tensor:
        """Convolution mode. inp: int64 [B, L] or float [B, L, d_input] -> [B, L, d_output]."""
        self._check_input(inp, time_axis=True)
        z = self.encoder(inp)  # [B, L, D]
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z))

    def initial_state(self, batch: int = 1) -> list[Tensor]:
        """Zero state: one complex [B, H, N/2] per layer."""
        return [ssm.initial_state(batch) for ssm in self.ssms]

    def step(self, inp: Tensor, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Recurrence mode. inp: int64 [B] or float [B, d_input] -> ([B, d_output], states)."""
        self._check_input(inp, time_axis=False)
        if len(states) != len(self.blocks):
            raise ValueError(f"states must hold {len(self.blocks)} layer states, got {len(states)}")
        for i, (ssm, x) in enumerate(zip(self.ssms, states)):
            want = (inp.shape[0], ssm.heads, ssm.N2)
            if not isinstance(x, Tensor) or x.shape != want or not x.is_complex():
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"states[{i}] must be complex {list(want)}, got {got}")
        z = self.encoder(inp)  # [B, D]
        new_states = []
        for block, x in zip(self.blocks, states):
            z, x = block.step(z, x)
            new_states.append(x)
        return self.head(self.norm(z)), new_states

    # --- packed state: float32 [B, S], the runtime's view ------------------------------

    def state_layout(self) -> list[dict]:
        """Per layer: offset into S, shape [2, H, N/2] (re, im), size."""
        layout, offset = [], 0
        for i, ssm in enumerate(self.ssms):
            shape = [2, ssm.heads, ssm.N2]
            size = math.prod(shape)
            layout.append({"layer": i, "offset": offset, "shape": shape, "size": size})
            offset += size
        return layout

    def pack_state(self, states: list[Tensor]) -> Tensor:
        """Complex per-layer states -> real [B, S] (dtype of the state's real part)."""
        parts = [torch.stack([x.real, x.imag], dim=1).flatten(1) for x in states]  # [B, 2·H·N/2]
        return torch.cat(parts, dim=1)

    def unpack_state(self, packed: Tensor) -> list[Tensor]:
        """Real [B, S] -> complex per-layer states [B, H, N/2]."""
        S = self.cfg.state_size
        if packed.dim() != 2 or packed.shape[1] != S:
            raise ValueError(f"packed state must be [B, S={S}], got shape {tuple(packed.shape)}")
        states = []
        for entry in self.state_layout():
            o, (_, H, N2) = entry["offset"], entry["shape"]
            block = packed[:, o : o + entry["size"]].reshape(-1, 2, H, N2)
            states.append(torch.complex(block[:, 0], block[:, 1]))
        return states
