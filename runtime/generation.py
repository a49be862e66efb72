"""The generation loop, once: sample a token from the last logits, decide whether to go on.

Both drivers use it — `Engine.generate` (in-process, synchronous) and
`SessionService.generate` (the server, asynchronous, through the batcher):

    gen = Generation(config)
    g = gen(logits [V], position)          # the first token, from the prompt's last logits
    while not g.last:
        logits, position = feed(g.token)   # the driver steps the model on the token
        g = gen(logits, position)

The loop itself never feeds a token; a driver feeds each token before asking for the
next one, and the last one only if it wants to (the server does not: the session holds
only tokens the client was sent; the edge API does, when asked to update a state).

`GenerateConfig.check` validates a request's fields once, for both drivers.

Dimension letters: V vocabulary size, T prompt length.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import CorruptState, InvalidInput, integer
from .sampling import Sampler, SamplingConfig

FINISH_STOP, FINISH_MAX = "stop_token", "max_tokens"


@dataclass(frozen=True)
class GenerateConfig:
    """How many tokens, how to sample them, and which tokens end the generation."""

    max_new_tokens: int
    sampling: SamplingConfig
    stop: frozenset[int] = frozenset()

    @classmethod
    def check(
        cls,
        vocab_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop=(),
        max_limit: int | None = None,
        min_new_tokens: int = 0,
        stop_field: str = "stop",
    ) -> GenerateConfig:
        """A checked config; InvalidInput names the first bad field.

        max_new_tokens must lie in [min_new_tokens, max_limit] (no upper bound when None);
        top_k in [0, vocab_size]; stop tokens (any iterable; None: none) in [0, vocab_size), at most
        vocab_size of them (reading stops there: a request cannot make the server loop over
        millions).
        """
        n = integer(max_new_tokens, "max_new_tokens", min_new_tokens, max_limit)
        if (
            isinstance(top_k, numbers.Integral)
            and not isinstance(top_k, bool)
            and top_k > vocab_size
        ):
            raise InvalidInput(  # before the sampling checks, as the client's check_generate
                "top_k", f"must be in [0, vocab_size={vocab_size}] (0: off), got {top_k}"
            )
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        stop = () if stop is None else stop  # none, as the clients take it
        if not isinstance(stop, Iterable) or (isinstance(stop, np.ndarray) and stop.ndim == 0):
            raise InvalidInput(stop_field, f"must be an iterable of token ids, got {stop!r}")
        stop = list(itertools.islice(stop, vocab_size + 1))  # any iterable; never more
        if len(stop) > vocab_size:
            raise InvalidInput(stop_field, f"has more than vocab_size={vocab_size} tokens")
        stop_set = set()
        for t in stop:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InvalidInput(stop_field, f"must be token ids (ints), got {t!r}")
            if not 0 <= t < vocab_size:
                raise InvalidInput(stop_field, f"token {t} is outside [0, vocab_size={vocab_size})")
            stop_set.add(int(t))
        return cls(int(n), sampling, frozenset(stop_set))


@dataclass(frozen=True)
class Generated:
    """One generated token.

    token: the sampled id; logprob: its log-probability under the unfiltered distribution
    (log_softmax of the logits); index: 0-based among the generated tokens; position:
    inputs the session had consumed when it was sampled; finish: None while more follow,
    else FINISH_STOP or FINISH_MAX.
    """

    token: int
    logprob: float
    index: int
    position: int
    finish: str | None

    @property
    def last(self) -> bool:
        return self.finish is not None


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log p_v = z_v − log Σ_w exp z_w, in float64: [V] → [V]."""
    z = z.astype(np.float64)  # [V]
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


class Generation:
    """The loop's state: the sampler (with its seeded generator) and the count so far."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.sampler = Sampler(config.sampling)
        self.index = 0

    def __call__(self, logits: np.ndarray, position: int) -> Generated:
        """The next token from logits [V] (call at most max_new_tokens times)."""
        # -inf is a token masked out, unless every token is
        if np.isnan(logits).any() or np.isposinf(logits).any() or np.isneginf(logits).all():
            raise CorruptState(
                f"the model's outputs at position {position} are NaN or inf; the state is unusable"
            )
        token = self.sampler(logits)
        i, self.index = self.index, self.index + 1
        finish = None
        if token in self.config.stop:
            finish = FINISH_STOP
        elif self.index >= self.config.max_new_tokens:
            finish = FINISH_MAX
        logprob = float(log_softmax(logits)[token])
        return Generated(token, logprob, i, position, finish)
