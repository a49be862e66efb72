"""History: what a session needs to rewind — checkpoints of its state and the inputs since.

A session at position p, the furthest it reached being f (f > p after a rewind), with a
rewind window of W inputs keeps

    checkpoints  (c, x_c) for positions c ≥ f − W, at most Q apart    (Q = the prefill chunk),
                 plus the latest one below f − W (so f − W itself is reachable)
    inputs       u[c_0 : p], from the oldest checkpoint c_0 on

so the state at any position r in [max(c_0, f − W), p] is x_r = replay(x_c, u[c : r]) with c
the latest checkpoint ≤ r: one checkpoint copy and fewer than Q inputs through the model. The
window is counted back from f, not p: a rewind does not widen it.

Checkpoints come from where states exist: after a single step when Q inputs passed since
the last one, and from a prefill's states (where it began, its chunk ends and its end; a
state is kept when Q inputs passed since the last checkpoint, or when the next one there is
would be more than Q past it, so no two are more than Q apart; with a prefill graph that
reports no chunk-end states, a prefill leaves states only where its calls end). The batcher's
worker records them (`record`) and replays a rewind (`plan`, then `rewound`), so a
session's history changes in the order of its requests. The one other writer is the event
loop closing the session (`release`), which may land while the worker is still finishing
that session's step: each history has a lock, and a released history ignores late updates
(its bytes stay given back) and plans no rewind.

Bytes per session are bounded: at most 2·W / Q + 3 checkpoints of S × 4 bytes (each is
more than Q inputs past the one two before it; fed by whole chunks or single steps they are
Q apart, W / Q + 2 of them) and W + Q inputs (W + the most inputs between two checkpoints,
where they can be more than Q apart), kept as rows of one array with at most 2 Q rows spare
(`max_bytes`). All sessions' checkpoints
together are bounded by a shared `CheckpointBudget` (the server's --rewind-memory-mb): a
session that would take the total past it drops its own oldest checkpoints first, so its
window shrinks instead (and `max_bytes` counts at most the budget for one session).

Dimension letters: S state size, Q chunk, W window, T inputs of one request.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from .errors import OutOfRange


class CheckpointBudget:
    """Checkpoint bytes held by all sessions' histories, against a limit (0: none)."""

    def __init__(self, limit: int = 0):
        self.limit, self.used = int(limit), 0
        self._lock = threading.Lock()  # the batcher's worker and the event loop both count

    def add(self, n: int) -> None:
        with self._lock:
            self.used += n

    def over(self) -> bool:
        return bool(self.limit) and self.used > self.limit


class _Rows:
    """A session's kept inputs u[base : position] as rows of one ring buffer (a list of one
    array per input cost ~100 bytes of object each: 13× the 8 bytes of a token). Dropping
    rows at either end moves none; the buffer grows `spare` rows past what it must hold and
    gives back what a cut frees past 2 `spare` rows."""

    def __init__(self, spare: int):
        self.spare = max(1, spare)
        self._a: np.ndarray | None = None  # [capacity] | [capacity, d_in]
        self._head = self._n = 0  # the first row's index in _a; rows kept

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the rows kept (the buffer has at most 2 `spare` rows more)."""
        return 0 if self._a is None else self._n * self._a[:1].nbytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows [start, stop)."""
        if self._a is None:
            return np.empty(0)
        cap, i, k = len(self._a), (self._head + start) % len(self._a), stop - start
        if i + k <= cap:
            return self._a[i : i + k].copy()
        return np.concatenate([self._a[i:], self._a[: i + k - cap]])

    def extend(self, rows: np.ndarray) -> None:
        """Append rows [T] (tokens) or [T, d_in] (values)."""
        T = rows.shape[0]
        if self._a is None or self._n + T > len(self._a):
            self._resize(self._n + T + self.spare, rows)
        cap = len(self._a)
        i = (self._head + self._n) % cap
        if i + T <= cap:
            self._a[i : i + T] = rows
        else:  # wraps around
            self._a[i:] = rows[: cap - i]
            self._a[: T - (cap - i)] = rows[cap - i :]
        self._n += T

    def cut(self, start: int, stop: int | None = None) -> None:
        """Keep only rows [start, stop) (stop None: to the end)."""
        stop = self._n if stop is None else stop
        if self._a is not None:
            self._head = (self._head + start) % len(self._a)
        self._n = stop - start
        if self._a is not None and len(self._a) > self._n + 2 * self.spare:
            self._resize(self._n + self.spare, self._a)  # give back what the cut freed

    def _resize(self, capacity: int, like: np.ndarray) -> None:
        grown = np.empty((capacity, *like.shape[1:]), like.dtype)
        grown[: self._n] = self.rows(0, self._n) if self._n else grown[:0]
        self._a, self._head = grown, 0

    def clear(self) -> None:
        self._a, self._head, self._n = None, 0, 0


class History:
    """One session's rewind history (see the module docstring).

    Args:
        window: W, how many inputs back a rewind may go (>= 1).
        chunk: Q, the most inputs between two checkpoints.
        position: the session's position now; state: its state there (float32 [S]).
        budget: the CheckpointBudget shared by all sessions (None: no shared limit).
    """

    def __init__(
        self,
        window: int,
        chunk: int,
        position: int,
        state: np.ndarray,
        budget: CheckpointBudget | None = None,
    ):
        self.window, self.chunk = int(window), int(chunk)
        self.budget = budget or CheckpointBudget()
        self.released = False  # the session is gone: nothing more is recorded
        self._lock = threading.Lock()  # the worker's updates vs the event loop's release
        self._checkpoints: deque[tuple[int, np.ndarray]] = deque()
        self._inputs = _Rows(self.chunk)  # u[base : position], one row per input
        self._start(position, state)

    def _start(self, position: int, state: np.ndarray) -> None:
        """Begin (again) at `position` with one checkpoint, `state`, and no inputs."""
        self._clear()
        self.position = self.furthest = int(position)
        self._add(self.position, state)
        self._base = self.position  # the position of _inputs[0] (= the oldest checkpoint's)

    def _add(self, position: int, state: np.ndarray, copy: bool = True) -> None:
        x = np.array(state, np.float32, copy=copy or None)
        self._checkpoints.append((position, x))
        self.budget.add(x.nbytes)

    def _drop_oldest(self) -> None:
        self.budget.add(-self._checkpoints.popleft()[1].nbytes)

    def release(self) -> None:
        """The session is gone: give its checkpoint bytes back to the budget."""
        with self._lock:
            self.released = True
            self._clear()

    def _clear(self) -> None:
        """No checkpoints (their bytes given back to the budget), no inputs."""
        while self._checkpoints:
            self._drop_oldest()
        self._inputs.clear()

    @staticmethod
    def max_bytes(
        window: int,
        chunk: int,
        state_size: int,
        input_bytes: int,
        limit: int = 0,
        spacing: int = 0,
    ) -> int:
        """The most bytes one session's history can hold; under a CheckpointBudget `limit`
        its checkpoints hold at most the limit (one at least: a session past it keeps its
        newest). spacing: the most inputs between two checkpoints (0: the chunk; more
        where requests leave states only at their ends: no chunk-end states)."""
        checkpoints = (2 * (window // chunk) + 3) * 4 * state_size
        if limit:
            checkpoints = min(checkpoints, max(limit, 4 * state_size))
        gap = max(chunk, spacing)
        return checkpoints + (window + gap + 2 * chunk) * input_bytes  # W + gap kept, 2 Q spare

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(x.nbytes for _, x in self._checkpoints) + self._inputs.nbytes

    @property
    def oldest(self) -> int:
        """The earliest position a rewind can reach now."""
        with self._lock:
            return self._oldest()

    def _oldest(self) -> int:
        return max(self._checkpoints[0][0], self.furthest - self.window)

    def record(
        self, inputs: np.ndarray, end: int, states: dict[int, np.ndarray], shared: bool = False
    ) -> None:
        """The session consumed `inputs` ([T] or [T, d_in]) and is at position `end`;
        `states` holds the states after some of them, {position: float32 [S]} (at least the
        one at `end` when a checkpoint may be due). Positions that do not follow on from
        this history (a state installed from elsewhere) restart it. shared: the states are
        arrays nobody writes (the prefix cache's), kept without a copy."""
        with self._lock:
            if not self.released:
                self._record(inputs, end, states, not shared)

    def _record(
        self, inputs: np.ndarray, end: int, states: dict[int, np.ndarray], copy: bool = True
    ) -> None:
        T = inputs.shape[0]
        if end - T != self.position:  # not a continuation: start over from here
            if end in states:
                self._start(end, states[end])
            return
        self._inputs.extend(inputs)  # copied in: not the caller's array
        self.position, self.furthest = end, max(self.furthest, end)
        # keep checkpoints at most Q apart: a state is kept when Q inputs passed since the last
        # checkpoint, or when the next state there is would be more than Q past it
        last = self._checkpoints[-1][0]
        at = sorted(p for p in states if p > last)
        for i, p in enumerate(at):
            after = at[i + 1] if i + 1 < len(at) else None
            if p - last >= self.chunk or (after is not None and after - last > self.chunk):
                self._add(p, states[p], copy)
                last = p
                # each checkpoint more than Q past the one two before it (the bound): after
                # a rewind the one between may not be; without it they are still ≤ Q apart
                cp = self._checkpoints
                if len(cp) >= 3 and p - cp[-3][0] <= self.chunk:
                    self.budget.add(-cp[-2][1].nbytes)
                    del cp[-2]
        self._trim()

    def step(
        self, inputs: np.ndarray, end: int, state: Callable[..., np.ndarray | None], *args
    ) -> None:
        """`record` for one step (inputs [1] or [1, d_in]); `state(*args)` gives the state
        after it (float32 [S], None when the session is gone), called only when a checkpoint
        is due: the per-token path, without building a dict or reading the state. The state
        is read outside this history's lock (reading takes the store's lock, which is held
        while a closing session releases its history)."""
        with self._lock:
            if self.released:
                return
            if end - 1 == self.position and end - self._checkpoints[-1][0] < self.chunk:
                self._inputs.extend(inputs)
                self.position, self.furthest = end, max(self.furthest, end)
                self._trim()  # the oldest checkpoint may have left the window
                return
        x = state(*args)
        if x is not None:
            self.record(inputs, end, {end: x})

    def _trim(self) -> None:
        """Drop checkpoints (and their inputs) no longer needed to reach furthest − W."""
        floor = self.furthest - self.window
        while len(self._checkpoints) > 1 and (
            self._checkpoints[1][0] <= floor or self.budget.over()
        ):
            self._drop_oldest()
        base = self._checkpoints[0][0]
        if base > self._base:
            self._inputs.cut(base - self._base)
            self._base = base

    def plan(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(the checkpoint state [S] at or before `position`, the inputs from there to it);
        OutOfRange naming the window when `position` is outside it (or the history was
        released: the session is gone)."""
        with self._lock:
            if self.released:
                raise OutOfRange("position", "the session's rewind history is gone (closed)")
            oldest = self._oldest()
            if not oldest <= position <= self.position:
                raise OutOfRange(
                    "position",
                    f"{position} is outside the rewind window [{oldest}, {self.position}] "
                    f"(at most {self.window} inputs back from the furthest position the "
                    f"session reached, and not before its first checkpoint)",
                )
            c, x = next((c, x) for c, x in reversed(self._checkpoints) if c <= position)
            rows = self._inputs.rows(c - self._base, position - self._base)
            return x.copy(), rows if len(rows) else np.empty(0)

    def rewound(self, position: int) -> None:
        """The session is back at `position` (within the window): forget what came after (the
        furthest position it reached stays: the window is not widened)."""
        with self._lock:
            if self.released:
                return
            while self._checkpoints[-1][0] > position:
                self.budget.add(-self._checkpoints.pop()[1].nbytes)
            self._inputs.cut(0, position - self._base)
            self.position = position
