"""Sampling the next token from logits (numpy only; used by Engine.generate and the server).

Given logits z ∈ R^V for a vocabulary of V tokens:

    greedy (temperature = 0):  t = argmax_v z_v
    temperature τ > 0:         p_v = exp(z_v / τ) / Σ_w exp(z_w / τ)
    top-k (k > 0):             keep the k most likely tokens (and any tied with the k-th),
                               renormalize
    top-p (0 < p < 1):         keep the smallest set of most likely tokens whose
                               probability sums to ≥ p (nucleus sampling), renormalize
                               (p = 0 or 1: off; 0 is the wire's default, as k = 0)

Filters apply in that order (temperature, then top-k, then top-p). A seeded
`numpy.random.Generator` makes a sample reproducible.

Dimension letters: V vocabulary size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput, as_array, integer, real_number


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token.

    temperature: 0 → greedy (argmax); > 0 divides the logits.
    top_k: 0 → off; else keep the k most likely tokens (and any tied with the k-th).
    top_p: 0 or 1 → off; else nucleus sampling with mass p, 0 < p < 1.
    seed: None → nondeterministic; else the seed of the generator.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checked = check_params(self.temperature, self.top_k, self.top_p)
        for name, value in zip(("temperature", "top_k", "top_p"), checked):
            object.__setattr__(self, name, value)  # a Fraction, np.uint8, … as float / int
        object.__setattr__(self, "seed", integer(self.seed, "seed", none=True))

    def rng(self) -> np.random.Generator:
        """A fresh generator seeded with `seed`."""
        return np.random.default_rng(self.seed)


def check_params(temperature: float, top_k: int, top_p: float) -> tuple[float, int, float]:
    """Raise InvalidInput naming the first bad parameter; returns them as (float, int, float)
    (a Fraction temperature or a numpy uint8 top_k would break the arithmetic later)."""
    t = real_number(temperature, "temperature", "a real number")
    if not math.isfinite(t) or t < 0:
        raise InvalidInput("temperature", f"must be finite and >= 0, got {t}")
    k = integer(top_k, "top_k", note=" (0 = off)")
    p = real_number(top_p, "top_p", "a real number")
    if not 0.0 <= p <= 1.0:
        raise InvalidInput("top_p", f"must be in [0, 1] (0 or 1 = off), got {p}")
    return t, k, p


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = as_array(logits, "logits")  # a ragged list or a bool among floats: refused, named
    if z.ndim != 1 or z.shape[0] == 0:
        raise InvalidInput("logits", f"must be a non-empty 1-D array [V], got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.floating):
        raise InvalidInput("logits", f"must be floating point, got {z.dtype}")
    return z.astype(np.float64, copy=False)  # [V]


def probabilities(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """The distribution `sample` draws from: float64 [V], sums to 1.

    temperature = 0 gives a one-hot vector at argmax (first index on ties).
    NaN logits are refused; -inf logits get probability 0.
    """
    params = check_params(temperature, top_k, top_p)  # the parameters' errors first
    return _probabilities(_check_logits(logits), *params)


def _probabilities(z: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """`probabilities` of float64 logits z [V] with checked parameters."""
    if np.isnan(z).any() or np.isposinf(z).any():
        raise InvalidInput("logits", "contain NaN or +inf")
    if not np.isfinite(z).any():
        raise InvalidInput("logits", "are all -inf: no token can be sampled")
    V = z.shape[0]
    p = np.zeros(V, dtype=np.float64)  # [V]
    if temperature == 0:
        p[int(np.argmax(z))] = 1.0
        return p
    with np.errstate(over="ignore"):  # z - max <= 0: a tiny temperature sends it to -inf (p 0)
        z = (z - z.max()) / temperature
    p = np.exp(z)  # [V]
    if 0 < top_k < V:
        # zero everything below the k-th largest probability (ties at the cut are kept)
        kth = np.partition(p, V - top_k)[V - top_k]
        p[p < kth] = 0.0
    p /= p.sum()
    if 0 < top_p < 1.0:
        order = np.argsort(-p, kind="stable")  # [V] most likely first
        cum = np.cumsum(p[order])  # [V]
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1  # smallest prefix with mass >= p
        drop = order[min(keep, V) :]
        p[drop] = 0.0
        p /= p.sum()
    return p


def sample(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: np.random.Generator | None = None,
) -> int:
    """Draw one token id from `logits` [V] (see the module docstring for the filters).

    Args:
        logits: float [V] unnormalized log-probabilities.
        temperature, top_k, top_p: the filters; temperature = 0 is greedy and uses no randomness.
        rng: the random generator (a fresh unseeded one when None).
    Returns:
        the token id, an int in [0, V).
    """
    params = check_params(temperature, top_k, top_p)
    if rng is not None and not callable(getattr(rng, "random", None)):  # a Generator's draw
        raise InvalidInput(
            "rng", f"must be a numpy.random.Generator or None, got {type(rng).__name__}"
        )
    return _sample(_check_logits(logits), *params, rng)


def _sample(z, temperature: float, top_k: int, top_p: float, rng) -> int:
    """`sample` of float64 logits z [V] with checked parameters."""
    p = _probabilities(z, temperature, top_k, top_p)  # [V]
    if temperature == 0:
        return int(np.argmax(p))
    rng = np.random.default_rng() if rng is None else rng
    cum = np.cumsum(p)  # [V]
    u = rng.random() * cum[-1]
    return int(min(np.searchsorted(cum, u, side="right"), p.shape[0] - 1))


class Sampler:
    """A SamplingConfig with its own generator: `Sampler(cfg)(logits) -> token`.

    Two samplers with the same seed produce the same tokens from the same logits.
    """

    def __init__(self, config: SamplingConfig | None = None):
        if config is not None and not isinstance(config, SamplingConfig):
            raise InvalidInput(
                "config", f"must be a SamplingConfig or None, got {type(config).__name__}"
            )
        self.config = config or SamplingConfig()

    @functools.cached_property
    def rng(self) -> np.random.Generator:
        """Made when first needed: greedy decoding (temperature 0) draws nothing, and
        seeding a generator costs ~20 µs, about a step of the shipped model."""
        return self.config.rng()

    def __call__(self, logits: np.ndarray) -> int:
        c = self.config  # checked when it was made
        rng = self.rng if c.temperature > 0 else None
        return _sample(_check_logits(logits), c.temperature, c.top_k, c.top_p, rng)
