"""Training data: byte-level text (vocab 256) and a synthetic continuous-signal task.

Text. A corpus is a set of files (default: the Python standard library's own `.py`
sources, found via `sysconfig.get_paths()["stdlib"]`, present on every machine). Each
file is assigned to train or val by a hash of its path relative to the corpus root,

    val  ⇔  sha256(relpath) / 2^64 < val_fraction,

so the split is deterministic, the same on every machine and disjoint. With one file
(or a split that leaves a side empty) the concatenated bytes are split instead: the
last `val_fraction` of them are val. A batch is B random contiguous windows of L + 1
bytes: inputs x = w[:L], targets y = w[1:]. Bits per byte = loss in nats / ln 2.

Signal. Sums of K sinusoids  u(t) = Σ_k a_k sin(2π f_k t + φ_k)  on t ∈ [0, T),
sampled at `rate` samples per unit time (L = T · rate samples, t_i = i / rate), with
f_k log-uniform in [freq_min, freq_max], a_k ~ N(0, 1/K) and φ_k uniform in [0, 2π).
Targets are defined in continuous time, so the same task can be sampled at rate r and
2r (the Δ-rescaling demonstration):

    lowpass   y' = (u − y) / τ,  y(0) = 0   (exact: steady state + decaying transient)
    delay     y(t) = u(t − τ) for t ≥ τ, else 0
    next      y(t) = u(t + h), h = `horizon` (default one sample, 1 / rate)

The sinusoid parameters of a batch depend only on its generator seed, not on the
rate: `signal_batch(cfg_at_r, seed)` and `signal_batch(cfg_at_2r, seed)` are the same
signals, sampled twice as densely.

Dimension letters: B batch, L length (samples), K sinusoid components.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .network import check_fields

log = logging.getLogger(__name__)

VOCAB_SIZE = 256
SIGNAL_TARGETS = ("lowpass", "delay", "next")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# --- text -------------------------------------------------------------------------------


def default_corpus_dir() -> Path:
    """The Python standard library's source directory (the default text corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(paths: list[str | os.PathLike], glob: str | None = None) -> list[tuple[Path, str]]:
    """Files of a corpus as (path, key), sorted by key; each file once.

    A file found under a directory `.../root` has the key `root/<path below root>`; a file
    named on its own has the path as given, unless a directory also found it (then the
    directory's key, so a file's split does not depend on how it was named). A file found
    under two names (a symlink) takes the smaller key, whatever order the directory lists.

    Args:
        paths: files and/or directories (searched recursively; hidden entries,
            `site-packages`, `dist-packages` and `__pycache__` skipped, and symlinked
            directories not followed: each is logged).
        glob: file-name pattern inside directories; None → "*.py" for the default
            corpus and every file otherwise. Explicitly named files are always taken.
    Raises:
        ValueError naming the path that does not exist, a directory that cannot be read, or
        the two files that would share a key (e.g. two directories of the same name).
    """
    by_file: dict[Path, tuple[Path, str]] = {}  # resolved path -> (path, key)
    named = []
    for p in map(Path, paths):
        if p.is_file():
            named.append(p)
        elif p.is_dir():
            pattern = glob or "*"
            top = Path(os.path.abspath(p)).name  # `--data .` is keyed by the folder's name
            for root, dirs, names in os.walk(p, onerror=_unreadable_dir):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
                for d in dirs:
                    if Path(root, d).is_symlink():
                        log.info("data: %s is a symlinked directory, not followed", Path(root, d))
                for name in fnmatch.filter(names, pattern):
                    f = Path(root, name)
                    if not name.startswith(".") and f.is_file():
                        key = f"{top}/{f.relative_to(p).as_posix()}"
                        seen = by_file.setdefault(f.resolve(), (f, key))
                        if key < seen[1]:  # found twice: the smaller key, in any listing order
                            by_file[f.resolve()] = (f, key)
        elif p.exists():  # /dev/null, a FIFO, a socket (or a link to one): what a walk skips
            raise ValueError(f"data: {str(p)!r} is not a regular file or a directory")
        elif p.is_symlink():  # a link to nothing (exists / is_file / is_dir follow links)
            raise ValueError(
                f"data: {str(p)!r} is a link to {os.readlink(p)!r}, which does not exist"
            )
        else:
            raise ValueError(f"data: {str(p)!r} does not exist")
    for p in named:
        by_file.setdefault(p.resolve(), (p, p.as_posix()))
    keys: dict[str, Path] = {}
    for path, key in by_file.values():
        if keys.setdefault(key, path) is not path:
            raise ValueError(
                f"data: {str(keys[key])!r} and {str(path)!r} have the same key {key!r} "
                "(their directories have the same name); pass their parent directory instead"
            )
    return sorted(by_file.values(), key=lambda item: item[1])


def _unreadable_dir(e: OSError) -> None:
    """os.walk's onerror: a directory that cannot be listed (permissions) would be skipped
    without a word, leaving a smaller corpus and another split (or an "empty corpus")."""
    raise ValueError(f"data: cannot read the directory {e.filename}: {e.strerror or e}") from e


def _is_val(key: str, val_fraction: float) -> bool:
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes (valid ones as before)
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < val_fraction


@dataclass
class TextData:
    """Byte tensors of the two splits (uint8 [n_train], uint8 [n_val]) and their files."""

    train: Tensor
    val: Tensor
    train_files: list[str]
    val_files: list[str]

    def split(self, name: str) -> Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def load_text(
    paths: Sequence[str | os.PathLike] | None = None,
    glob: str | None = None,
    val_fraction: float = 0.05,
    min_bytes: int = 2,
) -> TextData:
    """Read a byte corpus and split it deterministically into train / val.

    Args:
        paths: files or directories; None → the standard library (`*.py`).
        glob: pattern for files inside directories (see `find_files`).
        val_fraction: share of files (or bytes, see module docstring) held out; in (0, 1).
        min_bytes: each split must hold at least this many bytes (window length + 1).
    Raises:
        ValueError: bad val_fraction, missing path, empty corpus, split too small.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if paths is None:
        paths, glob = [default_corpus_dir()], glob or "*.py"
    files = find_files(paths, glob)
    chunks = {"train": [], "val": []}
    names = {"train": [], "val": []}
    for path, key in files:
        try:
            data = path.read_bytes()
        except OSError as e:  # unreadable (permissions, a directory's race): named, no traceback
            raise ValueError(f"data: cannot read {path}: {e.strerror or e}") from e
        if not data:
            continue
        side = "val" if _is_val(key, val_fraction) else "train"
        chunks[side].append(data)
        names[side].append(key)
    total = sum(len(c) for side in chunks.values() for c in side)
    if total == 0:
        where = ", ".join(str(p) for p in paths)
        raise ValueError(f"empty corpus: no non-empty files matching {glob or '*'!r} under {where}")
    n_train, n_val = (sum(map(len, chunks[s])) for s in ("train", "val"))
    if n_train < min_bytes or n_val < min_bytes:
        # Too few files for a file-level split: split the concatenated bytes instead.
        everything = b"".join(c for s in ("train", "val") for c in chunks[s])
        cut = len(everything) - max(int(len(everything) * val_fraction), min_bytes)
        train_bytes, val_bytes = everything[:cut], everything[cut:]
        names = {"train": names["train"] + names["val"], "val": ["<tail of the corpus>"]}
        log.info("split by bytes: %d train, %d val", len(train_bytes), len(val_bytes))
    else:
        train_bytes, val_bytes = b"".join(chunks["train"]), b"".join(chunks["val"])
    for side, data in (("train", train_bytes), ("val", val_bytes)):
        if len(data) < min_bytes:
            raise ValueError(
                f"corpus too small: the {side} split has {len(data)} of its {total} bytes, "
                f"need at least {min_bytes} (--seq-len + 1) in train and in val: add text "
                "to --data or use a smaller --seq-len"
            )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return TextData(as_tensor(train_bytes), as_tensor(val_bytes), names["train"], names["val"])


def text_batch(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """B random contiguous windows of a byte tensor.

    Args:
        data: uint8 [n] with n ≥ seq_len + 1.
    Returns:
        x int64 [B, L] (inputs), y int64 [B, L] (next bytes), on the CPU.
    """
    n = data.numel()
    if n < seq_len + 1:
        raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} bytes, data has {n}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)  # [B]
    idx = starts[:, None] + torch.arange(seq_len + 1, dtype=torch.long)  # [B, L+1]
    w = data[idx].long()  # [B, L+1]
    return w[:, :-1], w[:, 1:]


# --- continuous signals -----------------------------------------------------------------


@dataclass
class SignalConfig:
    """The synthetic signal task (units: time in arbitrary units, frequency in cycles/unit).

    Args:
        rate: samples per unit time (r); L = round(duration · rate).
        duration: T, length of each signal in time units.
        n_components: K sinusoids per signal.
        freq_min, freq_max: frequency range; freq_max must be below the Nyquist rate / 2.
        target: "lowpass" | "delay" | "next" (see module docstring).
        tau: time constant (lowpass) or delay (delay), in time units.
        horizon: look-ahead for "next" in time units; None → one sample (1 / rate).
    """

    rate: float = 16.0
    duration: float = 16.0
    n_components: int = 4
    freq_min: float = 0.05
    freq_max: float = 1.0
    target: str = "lowpass"
    tau: float = 0.5
    horizon: float | None = None

    def __post_init__(self):
        check_fields(
            self,
            ints=("n_components",),
            floats=("rate", "duration", "freq_min", "freq_max", "tau", "horizon"),
        )
        for name in ("rate", "duration", "tau"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if self.n_components <= 0:
            raise ValueError(f"n_components must be positive, got {self.n_components}")
        if not 0 < self.freq_min <= self.freq_max:
            raise ValueError(
                f"need 0 < freq_min <= freq_max, got freq_min={self.freq_min}, "
                f"freq_max={self.freq_max}"
            )
        if self.freq_max >= self.rate / 2:
            raise ValueError(
                f"freq_max={self.freq_max} must be below the Nyquist frequency "
                f"rate/2={self.rate / 2}"
            )
        if self.target not in SIGNAL_TARGETS:
            raise ValueError(
                f"unknown signal target {self.target!r}; expected one of {SIGNAL_TARGETS}"
            )
        if self.horizon is not None and not 0 < self.horizon < math.inf:
            raise ValueError(f"horizon must be positive and finite, got {self.horizon}")
        if not math.isfinite(self.duration * self.rate):
            raise ValueError(f"duration · rate must be finite, got {self.duration * self.rate}")
        if self.length < 1:
            raise ValueError(f"duration · rate must give at least one sample, got {self.length}")

    @property
    def length(self) -> int:
        """L, samples per signal."""
        return int(round(self.duration * self.rate))


def signal_batch(
    cfg: SignalConfig, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A batch of the signal task, float32 on the CPU.

    The sinusoid parameters are drawn from `generator` independently of `cfg.rate`.
    Returns:
        u [B, L, 1] input samples, y [B, L, 1] target samples at t_i = i / rate.
    """
    K = cfg.n_components
    g = generator
    log_f = torch.rand(batch_size, K, 1, generator=g, dtype=torch.float64)  # [B, K, 1]
    f = torch.exp(math.log(cfg.freq_min) + log_f * math.log(cfg.freq_max / cfg.freq_min))
    a = torch.randn(batch_size, K, 1, generator=g, dtype=torch.float64) / math.sqrt(K)
    phi = torch.rand(batch_size, K, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    t = torch.arange(cfg.length, dtype=torch.float64) / cfg.rate  # [L]
    w = 2 * math.pi * f  # [B, K, 1] angular frequency

    def u_at(tt: Tensor) -> Tensor:  # [L] -> [B, L]
        return (a * torch.sin(w * tt + phi)).sum(1)

    u = u_at(t)  # [B, L]
    if cfg.target == "lowpass":
        # y' = (u - y)/τ: each sinusoid's steady state a·|H| sin(ωt + φ - atan(ωτ)),
        # |H| = 1/√(1+(ωτ)²), minus its value at t=0 decaying as e^{-t/τ} so that y(0) = 0.
        gain, lag = 1 / torch.sqrt(1 + (w * cfg.tau) ** 2), torch.atan(w * cfg.tau)
        steady = a * gain * torch.sin(w * t + phi - lag)  # [B, K, L]
        y = (steady - steady[..., :1] * torch.exp(-t / cfg.tau)).sum(1)  # [B, L]
    elif cfg.target == "delay":
        y = torch.where(t >= cfg.tau, u_at(t - cfg.tau), torch.zeros((), dtype=torch.float64))
    else:  # next
        y = u_at(t + (cfg.horizon if cfg.horizon is not None else 1 / cfg.rate))
    return u.float().unsqueeze(-1), y.float().unsqueeze(-1)
