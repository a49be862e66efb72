"""The runtime's own error types. The gRPC server maps each to one status code
(in one place, runtime/status.py); library users catch them directly.

    InvalidInput       → INVALID_ARGUMENT   (message names the field)
    SessionNotFound    → NOT_FOUND          (unknown / closed / evicted: `reason` says which)
    LimitExceeded      → RESOURCE_EXHAUSTED (capacity, per-principal, sizes)
    OutOfRange         → OUT_OF_RANGE       (a position past the largest one, 2**63 - 1, or a
                                             rewind ahead of the session or outside its window)
    SessionBusy        → FAILED_PRECONDITION (already attached / a step in flight)
    Unavailable        → UNAVAILABLE        (draining)
    ModelError         → FAILED_PRECONDITION at load (bad manifest, sha mismatch, foreign snapshot)
    EngineFailure      → INTERNAL           (onnxruntime failed inside a batch)
    CorruptState       → DATA_LOSS          (the model's outputs came out NaN / inf: the
                                             step applied, the session's state is unusable;
                                             a snapshot of a state that is not finite)
"""

from __future__ import annotations

import math
import numbers


class RuntimeErrorBase(Exception):
    """Base class of every error the runtime raises on purpose."""


class InvalidInput(RuntimeErrorBase, ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class SessionNotFound(RuntimeErrorBase, KeyError):
    def __init__(self, session_id: str, reason: str = "unknown"):
        super().__init__(session_id)
        self.session_id, self.reason = session_id, reason

    def __str__(self) -> str:
        return f"session {self.session_id!r} not found ({self.reason})"


class LimitExceeded(RuntimeErrorBase):
    pass


class OutOfRange(RuntimeErrorBase):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class CorruptState(RuntimeErrorBase):
    pass


class SessionBusy(RuntimeErrorBase):
    pass


class Unavailable(RuntimeErrorBase):
    pass


class ModelError(RuntimeErrorBase, ValueError):
    pass


class EngineFailure(RuntimeErrorBase):
    pass


def integer(
    value, field: str, low: int = 0, high: int | None = None, none: bool = False, note: str = ""
) -> int | None:
    """`value` as an int in [low, high] (any integral number but a bool: numpy's too; None
    passes when `none`), else InvalidInput(field, "must be a positive integer, got …") — the
    bounds spelled out, `note` after them."""
    if type(value) is int and value >= low and (high is None or value <= high):
        return value  # the common case first: a per-step count stays ~0.1 µs
    if value is None and none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        if high is not None:
            bounds = f"an integer in [{low}, {high}]"
        else:
            bounds = "a positive integer" if low == 1 else f"an integer >= {low}"
        also = " or None" if none else ""
        raise InvalidInput(field, f"must be {bounds}{also}{note}, got {value!r}")
    return int(value)


def real_number(value, field: str, what: str = "a number") -> float:
    """`value` as a float: any real number but a bool (an int too large for a float is ±inf,
    which the caller's range check sees), else InvalidInput(field, "must be {what}")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(field, f"must be {what}, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond float range
        return math.inf if value > 0 else -math.inf


# what a client is told of a server bug (the details and traceback go to the server log only)
INTERNAL_ERROR = "internal error (see the server log)"
