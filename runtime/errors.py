"""The runtime's own error types, the argument checks shared by its modules and its
client (`integer`, `real_number`, `as_array`, `zeros`, `check_session_id`), and `FailureRun`,
how its background loops log their failures. The gRPC server
maps each type to one status code (in one place, runtime/status.py); library users catch
them directly.

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

import logging
import math
import numbers
import re

import numpy as np


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


def as_array(value, field: str) -> np.ndarray:
    """np.asarray, refusing naming `field` what it would convert silently or with its own
    error: a ragged nested list (rows of different lengths), and a bool among the numbers of
    a list (numpy would make [65, True] the tokens [65, 1])."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(field, f"must be a rectangular array: {e}") from e
    if a.dtype.kind in "iuf" and holds_bool(value):
        raise InvalidInput(field, "holds a bool (True / False) among its numbers")
    return a


def as_tokens(value, field: str) -> np.ndarray:
    """as_array for token ids: bytes, a bytearray or a memoryview of bytes are the byte
    values 0..255 (a byte-level model's ids), in every API that takes tokens."""
    if isinstance(value, (bytes, bytearray)) or (
        isinstance(value, memoryview) and value.format in "Bc"
    ):
        return np.frombuffer(bytes(value), dtype=np.uint8)
    return as_array(value, field)


def holds_bool(value) -> bool:
    """Whether a list or tuple (nested too) holds a bool among its items (by their types:
    ~15 ns an item)."""
    if not isinstance(value, (list, tuple)):
        return False
    types = set(map(type, value))
    if bool in types or np.bool_ in types:
        return True
    if any(issubclass(t, (list, tuple, np.ndarray)) for t in types):  # nested: look inside
        return any((v.dtype == bool) if isinstance(v, np.ndarray) else holds_bool(v) for v in value)
    return False


def zeros(shape: tuple[int, ...], dtype, field: str) -> np.ndarray:
    """np.zeros, with a size that cannot be allocated refused naming `field` (the count
    that made it) instead of numpy's ValueError / MemoryError."""
    try:
        return np.zeros(shape, dtype=dtype)
    except (ValueError, MemoryError) as e:
        size = " × ".join(map(str, shape))
        raise InvalidInput(field, f"an array of {size} cannot be allocated ({e})") from e


SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # used with fullmatch only


def check_session_id(session_id, field: str = "session_id") -> str:
    """A session id: 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit
    (the whole string: no trailing newline), else InvalidInput."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        raise InvalidInput(
            field,
            f"must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit, "
            f"got {(session_id[:64] if isinstance(session_id, str) else session_id)!r}",
        )
    return session_id


# what a client is told of a server bug (the details and traceback go to the server log only)
INTERNAL_ERROR = "internal error (see the server log)"


class FailureRun:
    """The failures in a row of a task run every `period` seconds (a background loop): the
    first is logged with its traceback, the others only counted, and the run that works again
    says after how many. A loop that logged every failure would fill the log while the cause
    lasts. `failure()` goes in the loop's `except`, `success()` after a run that worked."""

    def __init__(self, logger: logging.Logger, what: str, period: float, runs: str):
        self.logger, self.what, self.period, self.runs = logger, what, period, runs
        self.failed = 0  # runs failed in a row

    def failure(self) -> None:
        self.failed += 1
        if self.failed == 1:
            self.logger.exception("%s failed; trying again every %gs", self.what, self.period)

    def success(self) -> None:
        if self.failed:
            self.logger.info("%s works again after %d failed %s", self.what, self.failed, self.runs)
            self.failed = 0
