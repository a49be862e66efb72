"""SessionStore: the sessions of a served model; their states live in the engine's slab.

A session is one stream fed to the recurrent step graph. Its whole memory is the
packed state x ∈ R^S (float32) plus a little bookkeeping, so the store keeps

    slab  StateSlab [capacity, S]   row `slot` = the state of one session (S × 4 bytes),
                                    on the engine's device (runtime/slab.py)
    map   session_id -> Session     (id, principal, slot, position, last_used, ttl)

`position` counts the inputs the session has consumed. A state and its position change
together, in two ways: `commit(session, x', n)` writes a new row computed elsewhere (a
prefill) and adds n; a step writes the rows in the slab itself between `lend(sessions)`
and `give_back(sessions, n)`, which adds n. Either refuses (changing nothing) a session
closed or evicted in the meantime. While rows are lent, reading them (read, snapshot,
fork, save) waits, and the slot of a session closed meanwhile is not reused.

Sessions expire when idle longer than their TTL (`evict_idle`, also done lazily on
access); a closed or evicted id is remembered for a while so `get` can say why it
is gone (`SessionNotFound.reason` = "unknown" | "closed" | "evicted"). A session is
invisible to other principals (they get "unknown").

A session is also one *incarnation*: a random id given at create / restore / fork (and
kept through save/load and the shared store), so a Stream bound to a session is never
rebound to a new session that reuses a closed one's id.

Snapshots (`snapshot` / `restore`) and the session file (`save` / `load`) are signed
with the store's SnapshotKey: runtime/snapshots.py has their formats and checks.

Dimension letters: S packed state size, B sessions in a batch.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import secrets
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import (
    CorruptState,
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    SessionBusy,
    SessionNotFound,
    Unavailable,
    as_array,
    check_session_id,
    integer,
    real_number,
)
from .slab import StateSlab
from .snapshots import (
    MAX_POSITION,
    O_BINARY,
    BytesLike,
    SnapshotKey,
    check_state,
    decode_snapshot,
    encode_snapshot,
    read_session_file,
    write_session_file,
)

log = logging.getLogger(__name__)

STORE_FILE = "sessions.bin"
SAVE_PART_BYTES = 4 << 20  # rows a save copies per hold of the store lock
FULL_LOG_INTERVAL = 60.0  # seconds between two "store full" warnings


class Session:
    """One live session. Read-only to callers; the store changes it under its lock.

    id: the session id; principal: its owner; slot: its row in the slab;
    position: inputs consumed; last_used: store clock time of the last access;
    ttl: idle seconds before eviction (math.inf = never); incarnation: random, one per
    create / restore / fork (an id reused after a close gets a new one).
    """

    __slots__ = (
        "_id", "_principal", "_slot", "_position", "_last_used", "_ttl", "_live", "_pins",
        "_lent", "_incarnation", "_ended", "history",
    )  # fmt: skip

    def __init__(
        self,
        id: str,
        principal: str,
        slot: int,
        position: int,
        now: float,
        ttl: float,
        incarnation: str | None = None,
    ):
        self._id, self._principal, self._slot = id, principal, slot
        self._position, self._last_used, self._ttl = position, now, ttl
        self._live, self._pins = True, 0
        self._ended = ""  # once not live: "closed" / "evicted" / "moved" (to another replica)
        self._lent = False  # its slab row is being stepped (lend)
        self._incarnation = incarnation or secrets.token_hex(8)
        self.history = None  # its rewind History (runtime/history.py), set by the service

    id = property(lambda self: self._id)
    principal = property(lambda self: self._principal)
    slot = property(lambda self: self._slot)
    position = property(lambda self: self._position)
    last_used = property(lambda self: self._last_used)
    ttl = property(lambda self: self._ttl)
    live = property(lambda self: self._live, doc="False once closed or evicted")
    incarnation = property(lambda self: self._incarnation)
    pinned = property(lambda self: self._pins > 0, doc="a step of it is queued or running")

    def gone(self) -> SessionNotFound | Unavailable:
        """The error for a request of this session once it is not live: NOT_FOUND saying
        how it ended, or UNAVAILABLE (retry) when another replica serves it now."""
        if self._ended == "moved":
            return Unavailable(f"session {self._id!r} is now served by another replica; retry")
        return SessionNotFound(self._id, self._ended or "closed")

    def __repr__(self) -> str:
        return (
            f"Session(id={self._id!r}, principal={self._principal!r}, slot={self._slot}, "
            f"position={self._position}, live={self._live})"
        )


def _check_ttl(ttl, field: str = "ttl") -> float:
    seconds = real_number(ttl, field, "a number of seconds")  # 10**400: inf, never expires
    if math.isnan(seconds):
        raise InvalidInput(field, f"must be a number of seconds, got {ttl!r}")
    if seconds <= 0:
        raise InvalidInput(field, f"must be > 0 seconds (math.inf = never expire), got {seconds:g}")
    return seconds


class SessionStore:
    """Sessions and their states (see the module docstring).

    Args:
        state_size: S, float32 numbers of state per session (Engine.state_size).
        capacity: maximum number of live sessions (rows of the slab).
        ttl: default idle time-to-live in seconds (math.inf = never).
        max_per_principal: maximum live sessions per principal (None = no limit).
        model_sha: identifies the model the states belong to (Engine.info["step_sha256"]);
            snapshots and saved stores of another model are refused.
        snapshot_key: signs and verifies snapshots and the session file (None: a random
            key, valid for this store only).
        replication: a policy that also keeps the sessions elsewhere (runtime/replication.py
            RedisReplication), called at create / commit / close / fetch; None: memory only.
        slab: where the states live (Engine.new_slab(capacity): on the engine's device);
            None: a CPU StateSlab of its own.
        clock: a monotonic clock in seconds (tests pass a fake one).
        tombstones: how many closed/evicted ids to remember for `get`'s reason.

    Thread-safe: every method that reads or changes sessions takes the store's lock (`len`,
    `held` and `local` read one entry without it; `pack_state` and `unpack` touch none).
    """

    def __init__(
        self,
        state_size: int,
        capacity: int = 1024,
        ttl: float = 600.0,
        max_per_principal: int | None = None,
        model_sha: str = "",
        clock: Callable[[], float] = time.monotonic,
        tombstones: int = 65536,
        snapshot_key: SnapshotKey | None = None,
        replication=None,
        slab: StateSlab | None = None,
    ):
        self.state_size = integer(state_size, "state_size", 1)
        self.capacity = integer(capacity, "capacity", 1)
        max_per_principal = integer(max_per_principal, "max_per_principal", 1, none=True)
        if not isinstance(model_sha, str) or not model_sha.isascii() or len(model_sha) > 1024:
            raise InvalidInput("model_sha", f"must be an ASCII string, got {model_sha!r}")
        self.ttl = _check_ttl(ttl)
        if snapshot_key is not None and not isinstance(snapshot_key, SnapshotKey):
            raise InvalidInput(  # raw bytes would fail only at the first snapshot
                "snapshot_key",
                "must be a SnapshotKey (SnapshotKey(secret), SnapshotKey.from_file(path), "
                f"SnapshotKey.in_dir(directory)) or None, got {type(snapshot_key).__name__}",
            )
        if slab is not None and not isinstance(slab, StateSlab):
            raise InvalidInput(
                "slab", f"must be a StateSlab (Engine.new_slab) or None, got {type(slab).__name__}"
            )
        self.max_per_principal = max_per_principal
        self.model_sha = model_sha
        self.snapshot_key = snapshot_key or SnapshotKey.generate()
        self.clock = clock
        if slab is None:
            slab = StateSlab(self.capacity, self.state_size)
        elif (slab.capacity, slab.state_size) != (self.capacity, self.state_size):
            raise InvalidInput(
                "slab", f"{slab!r} does not hold {self.capacity} states of size {self.state_size}"
            )
        self.slab = slab
        # free slots as a min-heap: a new session takes the lowest, so live sessions stay
        # packed at the start of the slab (a CPU slab's untouched pages cost no memory)
        self._free = list(range(self.capacity))
        self._sessions: dict[str, Session] = {}
        self._per_principal: Counter[str] = Counter()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (principal, reason)
        self._max_gone = integer(tombstones, "tombstones")
        self._lock = threading.RLock()
        self._returned = threading.Condition(self._lock)  # notified by give_back
        self._save_lock = threading.Lock()  # one save at a time: they share the temp file
        self._counts = Counter()
        self.ended = 0  # sessions removed so far (closed, evicted, moved): the batcher's cue
        # changes to what a save writes (sessions made or removed, states and positions
        # written), and their count when the last successful save began: see `changed_since_save`
        self._changes, self._saved_changes = 0, -1
        self._full_logged = -math.inf  # when the last "store full" warning was logged
        self.replication = replication
        if replication is not None:
            replication.attach(self, key_given=snapshot_key is not None)

    # --- bookkeeping -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def bytes_per_session(self) -> int:
        """Slab bytes one session occupies: S × 4."""
        return self.slab.row_bytes

    def stats(self) -> dict:
        """Counts for metrics and logs: live sessions, capacity and free slots, the slab's
        size, device and bytes moved, and the sessions created, closed, evicted, restored
        and forked so far."""
        with self._lock:
            return {
                "sessions": len(self._sessions),
                "capacity": self.capacity,
                "free": len(self._free),
                "state_size": self.state_size,
                "bytes_per_session": self.bytes_per_session,
                "slab_bytes": self.slab.nbytes,
                "slab_device": self.slab.device,
                "slab": asdict(self.slab.stats),  # row and per-step bytes moved
                "principals": len(self._per_principal),
                "created": self._counts["created"],
                "closed": self._counts["closed"],
                "evicted": self._counts["evicted"],
                "restored": self._counts["restored"],
                "forked": self._counts["forked"],
            }

    def sessions(self, principal: str | None = None) -> list[Session]:
        """Live sessions (of one principal, or all when None)."""
        with self._lock:
            return [
                s for s in self._sessions.values() if principal is None or s._principal == principal
            ]

    def _new_session(
        self,
        principal: str,
        session_id: str | None,
        ttl: float | None,
        position: int,
        incarnation: str | None = None,
    ) -> Session:
        """Check limits, take a zeroed slot, register. Caller holds the lock; no change on error."""
        if not isinstance(principal, str):
            raise InvalidInput("principal", f"must be a string, got {type(principal).__name__}")
        ttl = self.ttl if ttl is None else _check_ttl(ttl)
        if session_id is None:
            session_id = str(uuid.uuid4())
        elif check_session_id(session_id) in self._sessions:
            # past its TTL: evicted now, not at the next sweep
            if not self._evict_if_idle(self._sessions[session_id], self.clock()):
                raise InvalidInput("session_id", f"{session_id!r} is already in use")
        limit = self.max_per_principal
        if not self._free or (limit is not None and self._per_principal[principal] >= limit):
            self._evict_idle_locked()  # past their TTL: evicted now, not at the next sweep
        if not self._free:
            now = self.clock()
            if now - self._full_logged >= FULL_LOG_INTERVAL:  # tell the operator, not per call
                self._full_logged = now
                log.warning(
                    "session store full (capacity=%d): new sessions are refused until some "
                    "close or sit idle past their TTL (the server's --max-sessions, "
                    "--session-ttl)",
                    self.capacity,
                )
            raise LimitExceeded(
                f"session store is full ({self.capacity} sessions; capacity={self.capacity})"
            )
        if limit is not None and self._per_principal[principal] >= limit:
            raise LimitExceeded(
                f"principal {principal!r} already has {self._per_principal[principal]} sessions "
                f"(max_per_principal={self.max_per_principal})"
            )
        slot = heapq.heappop(self._free)
        self.slab.zero(slot)
        s = Session(session_id, principal, slot, position, self.clock(), ttl, incarnation)
        self._sessions[session_id] = s
        self._changes += 1
        self._per_principal[principal] += 1
        self._gone.pop(session_id, None)
        return s

    def _remove(self, s: Session, reason: str) -> None:
        """Unregister and free the slot. Caller holds the lock."""
        del self._sessions[s._id]
        self._changes += 1
        s._live, s._ended = False, reason
        if not s._lent:  # else give_back frees it: no new session gets a row being written
            heapq.heappush(self._free, s._slot)
        self._per_principal[s._principal] -= 1
        if self._per_principal[s._principal] <= 0:
            del self._per_principal[s._principal]
        self._gone[s._id] = (s._principal, reason)
        self._gone.move_to_end(s._id)
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)
        self._counts[reason] += 1
        self.ended += 1
        if s.history is not None:
            s.history.release()
        if self.replication is not None:
            self.replication.removed(s, reason)

    def _expired(self, s: Session, now: float) -> bool:
        return s._pins == 0 and now - s._last_used > s._ttl

    def _evict_if_idle(self, s: Session, now: float) -> bool:
        """Evict `s` if it is idle past its TTL (a request came for it before the sweep
        did); True if it was. Caller holds the lock."""
        if not self._expired(s, now):
            return False
        self._remove(s, "evicted")
        log.info(
            "evicted idle session %r (unused for %.1f s, ttl %g s)",
            s._id,
            now - s._last_used,
            s._ttl,
        )
        return True

    def _evict_idle_locked(self) -> list[str]:
        now = self.clock()
        victims = [s for s in self._sessions.values() if self._expired(s, now)]
        for s in victims:
            self._remove(s, "evicted")
        if victims:
            log.info("evicted %d idle sessions", len(victims))
        return [s._id for s in victims]

    # --- public API --------------------------------------------------------------------

    def create(
        self,
        principal: str = "",
        session_id: str | None = None,
        ttl: float | None = None,
        shared: bool = True,
    ) -> Session:
        """A new session with a zero state at position 0. shared=False: one with a new id
        (session_id is not used) that the replication never writes nor leases, for a
        temporary session, which ends with the request that made it on this replica.

        Raises InvalidInput (bad or duplicate session_id, bad ttl) or LimitExceeded
        (store full after evicting idle sessions, or the principal's limit reached).
        """

        def make(sid):
            s = self._new_session(principal, sid, ttl, 0)
            self._counts["created"] += 1  # after its checks: a refused create is not counted
            return s

        r = self.replication
        if shared or r is None:
            return self._add(session_id, make)

        def make_local():  # no claim, no first write: the replication only learns to skip it
            with self._lock:
                s = make(None)
                r.keep_local(s)
                return s

        return r.with_room(make_local)

    def _add(self, session_id: str | None, make: Callable, keep_lease: bool = True) -> Session:
        """A new session from `make(id)` (run under the lock), with the replication's claim of
        the id before and its first write after. Replicated, local copies of sessions that
        moved on to other replicas give way first to an id in use here and to a full store or
        principal (RedisReplication.reclaim)."""
        r = self.replication
        if r is None:
            with self._lock:
                return make(session_id)
        if session_id is not None:
            r.reclaim(session_id)  # a copy of it that moved on to another replica gives way
        return r.with_room(lambda: self._add_replicated(r, session_id, make, keep_lease))

    def _add_replicated(self, r, session_id: str | None, make: Callable, keep_lease: bool):
        """`_add` with the replication `r`: claim, make, first write."""
        sid = r.claim(session_id)
        try:
            with self._lock:
                s = make(sid)
        except BaseException:
            r.release(sid)
            raise
        r.created(s, keep_lease)
        return s

    def get(self, session_id: str, principal: str = "") -> Session:
        """The live session `session_id` of `principal`; refreshes its idle timer.

        Raises SessionNotFound with reason "unknown" (never existed, or belongs to
        another principal), "closed" or "evicted" (also when it expired just now).
        """
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInput("session_id", f"must be a non-empty string, got {session_id!r}")
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None and s._principal == principal:
                now = self.clock()
                if not self._evict_if_idle(s, now):
                    s._last_used = now
                    return s
            gone = self._gone.get(session_id)
            if gone is not None and gone[0] == principal:
                raise SessionNotFound(session_id, gone[1])
            raise SessionNotFound(session_id, "unknown")

    def close(self, session_id: str, principal: str = "", incarnation: str | None = None) -> None:
        """Free the session's slot; later `get`s say "closed". With `incarnation`, only that
        incarnation of the id is closed (SessionNotFound "closed" when another holds it)."""
        with self._lock:
            s = self.get(session_id, principal)
            if incarnation is not None and s._incarnation != incarnation:
                raise SessionNotFound(session_id, "closed")
            self._remove(s, "closed")
        if self.replication is not None:
            self.replication.closed(s)

    def evict_idle(self) -> list[str]:
        """Evict every session idle longer than its TTL (not those pinned by a running step)."""
        with self._lock:
            return self._evict_idle_locked()

    def _current(self, s: Session) -> bool:
        """s is live and still the session of its id here (not closed, evicted, replaced)."""
        return s._live and self._sessions.get(s._id) is s

    def _check_live(self, s: Session) -> None:
        if not isinstance(s, Session):
            raise InvalidInput("session", f"must be a Session, got {type(s).__name__}")
        if not self._current(s):
            raise s.gone()

    def pin(self, s: Session) -> None:
        """Mark a step in flight: a pinned session is not evicted for idleness. One idle past
        its TTL is evicted now, as `get` does (a Stream attached to it holds no pin between
        requests): SessionNotFound evicted."""
        with self._lock:
            self._check_live(s)
            if self._evict_if_idle(s, self.clock()):
                raise s.gone()
            s._pins += 1

    def unpin(self, s: Session) -> None:
        """End a `pin`: the step is done; the session's idle time counts from now."""
        with self._lock:
            s._pins = max(0, s._pins - 1)
            s._last_used = self.clock()

    def give_history(self, s: Session, history) -> None:
        """Attach a rewind History to a session (the one it had is released). A session
        that ended meanwhile (closed by another thread) releases it at once: its removal
        released only the History it had then."""
        with self._lock:
            if not s._live:
                history.release()
                return
            if s.history is not None:
                s.history.release()
            s.history = history

    def read(self, s: Session) -> np.ndarray:
        """A copy of the session's state: float32 [S] (waits while a step writes it)."""
        with self._lock:
            self._check_live(s)
            self._wait_returned(s)
            return self.slab.read(s._slot)

    def state_now(self, s: Session) -> tuple[np.ndarray, int] | None:
        """(state [S], position) of a live session, read together; None when it is gone or
        its row is being stepped right now (no waiting: for the replication's writes)."""
        with self._lock:
            if s._lent or not self._current(s):
                return None
            return self.slab.read(s._slot), s._position

    def lend(self, sessions: Sequence[Session]) -> list[Session]:
        """The live ones of `sessions` (in order), their rows lent to a step that writes
        them in the slab (Engine.run_slots) until `give_back`. Meanwhile reading their
        states waits, and the slot of one closed meanwhile is not reused."""
        with self._lock:
            lent = [s for s in sessions if self._current(s)]
            if any(s._lent for s in lent) or len(set(map(id, lent))) < len(lent):
                raise SessionBusy("a session's row is lent to a step already (or given twice)")
            for s in lent:
                s._lent = True
            return lent

    def give_back(
        self, sessions: Sequence[Session], consumed: int
    ) -> list[int | SessionNotFound | Unavailable]:
        """End `lend`: advance each session still live by `consumed` (0 when the step failed
        and wrote nothing); returns per session its new position, or the error of one closed
        or evicted meanwhile (its slot is freed now) or, replicated, moved elsewhere."""
        consumed = integer(consumed, "consumed")
        with self._lock:
            if not all(s._lent for s in sessions):  # a state and its position move together
                raise InvalidInput("sessions", "give_back takes only sessions `lend` lent")
            results = self._advance(sessions, consumed)
            for s in sessions:
                lent, s._lent = s._lent, False
                if lent and not s._live:  # _remove left the slot to us
                    heapq.heappush(self._free, s._slot)
            self._returned.notify_all()
        return self._write_through(sessions, consumed, results)

    def _advance(
        self, sessions: Sequence[Session], consumed: int
    ) -> list[int | SessionNotFound | Unavailable]:
        """Add `consumed` to the position of each live session (caller holds the lock)."""
        results: list[int | SessionNotFound | Unavailable] = []
        now = self.clock()
        for s in sessions:
            if not self._current(s):
                results.append(s.gone())
                continue
            s._position += consumed
            s._last_used = now
            results.append(s._position)
        self._changes += consumed > 0
        return results

    def _write_through(
        self, sessions: Sequence[Session], consumed: int, results: list, force: bool = False
    ) -> list:
        """After a local commit (rows returned: no reader waits on the replication), the
        replication's write of the sessions that are due (all with `force`); `results` as
        give_back's."""
        if self.replication is None or not consumed:
            return results
        return self.replication.committed(sessions, results, force)

    def _wait_returned(self, s: Session) -> None:
        """Wait (the caller holds the lock) until s's row is not lent; then s must still be
        live (SessionNotFound)."""
        while s._lent:
            self._returned.wait()
        self._check_live(s)

    def commit(self, s: Session, new_state: np.ndarray, consumed: int) -> int:
        """Write the session's new state [S] and advance its position by `consumed`.

        All or nothing: raises (changing nothing) when the session is no longer live
        or the arguments are malformed. Returns the new position.
        """
        consumed = integer(consumed, "consumed")
        new_state = self._row(new_state, "new_state")
        with self._lock:
            self._check_live(s)  # a Session (InvalidInput naming it), live
            self._wait_returned(s)  # a step may advance it meanwhile; then s must be live
            if consumed > MAX_POSITION - s._position:  # no snapshot or save could hold it
                raise OutOfRange(
                    "consumed", f"{consumed} inputs would take the session at position "
                    f"{s._position} past the largest position, 2**63 - 1",
                )  # fmt: skip
            self.slab.write(s._slot, new_state)
            results = self._advance([s], consumed)
        (result,) = self._write_through([s], consumed, results)
        if isinstance(result, BaseException):
            raise result
        return result

    def _row(self, state, field: str) -> np.ndarray:
        """A session's state as given to commit or rewind: float32 [S], else InvalidInput."""
        state = np.asarray(state)
        if state.shape != (self.state_size,):
            raise InvalidInput(field, f"must have shape [{self.state_size}], got {state.shape}")
        if state.dtype != np.float32:
            raise InvalidInput(field, f"must be float32, got {state.dtype}")
        return state

    def rewind(self, s: Session, state: np.ndarray, position: int) -> None:
        """Set a session back to an earlier `position` with `state` [S] (the caller computed
        it from the session's History). All or nothing, like commit."""
        state = self._row(state, "state")
        with self._lock:
            self._check_live(s)
            position = integer(position, "position", 0, s._position)
            self._wait_returned(s)
            self.slab.write(s._slot, state)
            s._position = position
            s._last_used = self.clock()
            self._changes += 1
        # replicated: written now, whatever --persist-every says (a replica that takes the
        # session over must continue from here, not from the state before the rewind)
        (result,) = self._write_through([s], 1, [position], force=True)
        if isinstance(result, BaseException):
            raise result

    # --- replication: what the service and the replication policy call -------------------

    def held(self, session_id: str, principal: str | None = None) -> bool:
        """True when this process may step the session without asking anyone: it is here
        (and, replicated, its lease is ours). With `principal`, a session here of another
        principal is not held (for that principal it is answered as one that is not here:
        whether an id is held here tells nothing about other principals' sessions)."""
        if self.replication is None:
            return True
        s = self._sessions.get(session_id)
        if s is None or (principal is not None and s._principal != principal):
            return False
        return self.replication.held(session_id)

    def fetch(self, session_id: str, principal: str = "") -> None:
        """Make the newest state of `session_id` local (blocking; a no-op unless replicated)."""
        if self.replication is not None and not self.held(session_id, principal):
            self.replication.fetch(session_id, principal)

    def close_unusable(self, session_id: str, principal: str = "") -> bool:
        """Close a session that `fetch` found unusable in the state store (CorruptState):
        True when its record was deleted (RedisReplication.close_unusable; False unreplicated)."""
        r = self.replication
        return r is not None and r.close_unusable(session_id, principal)

    def local(self, session_id: str) -> Session | None:
        """The live session `session_id` here, whoever owns it (no timer refresh)."""
        return self._sessions.get(session_id)

    def install(
        self,
        session_id: str,
        principal: str,
        ttl: float,
        position: int,
        state: np.ndarray,
        incarnation: str | None,
    ) -> Session:
        """Make a session's copy here equal to one kept elsewhere (replication): the local
        session is updated, or replaced when it is another incarnation, or created.
        Raises SessionBusy when a step of the local copy is in flight."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None and s._pins:
                raise SessionBusy(
                    f"session {session_id!r} changed on another replica while a step of it is "
                    f"in flight here; retry"
                )
            if s is not None and s._incarnation != incarnation:
                self._remove(s, "closed")  # closed elsewhere and created again: another session
                self._gone.pop(session_id, None)
                s = None
            if s is None:
                s = self._new_session(principal, session_id, ttl, position, incarnation)
                self._counts["restored"] += 1
            else:  # used elsewhere since: its idle time counts from now, not from its last use here
                s._last_used = self.clock()
                if s.history is not None:  # its steps since went on elsewhere
                    s.history.release()
                    s.history = None
            s._position = position
            self.slab.write(s._slot, state)
            self._changes += 1
            return s

    def drop(self, s: Session, reason: str = "moved") -> None:
        """Forget the local copy of a session another replica owns now ("moved"), or one
        closed or evicted on another replica ("closed" / "evicted": later `get`s say so)."""
        with self._lock:
            if self._sessions.get(s._id) is s:
                self._remove(s, reason)
                if reason == "moved":
                    self._gone.pop(s._id, None)

    def flush(self, final: bool = False) -> int:
        """Write what is not yet persisted elsewhere and let go of ownership (shutdown);
        returns how many sessions have steps that could not be written. final: no session is
        fetched from then on (`fetch` raises Unavailable)."""
        return self.replication.flush(final) if self.replication is not None else 0

    # --- snapshots -----------------------------------------------------------------------

    def _pack(self, s: Session) -> bytes:
        self._wait_returned(s)
        state = self.slab.read(s._slot)
        if not np.isfinite(state).all():  # a restore would refuse it: no snapshot of it
            raise CorruptState(
                f"session {s._id!r}: its state contains NaN or inf (the model's outputs came "
                "out so), so it has no snapshot: close it, or restore a good snapshot"
            )
        return self.pack_state(state, s._position)

    def pack_state(self, state: np.ndarray, position: int) -> bytes:
        """A signed snapshot (runtime/snapshots.py) of state [S] at `position`."""
        state = as_array(state, "state")
        if state.shape != (self.state_size,):
            raise InvalidInput(
                "state", f"must have shape [{self.state_size}], got {list(state.shape)}"
            )
        if state.dtype.kind != "f":  # NaN passes: replication writes a state gone bad through
            raise InvalidInput("state", f"must be floats, got {state.dtype}")
        position = integer(position, "position", 0, MAX_POSITION)
        return encode_snapshot(self.snapshot_key, self.model_sha, state, position)

    def snapshot(self, session_id: str, principal: str = "") -> bytes:
        """The session's state and position as signed bytes (runtime/snapshots.py)."""
        with self._lock:
            return self._pack(self.get(session_id, principal))

    def unpack(self, data: BytesLike) -> tuple[int, np.ndarray]:
        """Verify a snapshot -> (position, state [S]). Raises InvalidInput / ModelError."""
        return decode_snapshot(self.snapshot_key, data, self.model_sha, self.state_size)

    def restore(
        self,
        data: BytesLike,
        principal: str = "",
        session_id: str | None = None,
        ttl: float | None = None,
    ) -> Session:
        """A new session holding a snapshot's state and position.

        A corrupt snapshot (InvalidInput) or one of another model (ModelError) is
        refused before anything changes; limits apply as in `create`.
        """
        position, state = self.unpack(data)

        def make(sid):
            s = self._new_session(principal, sid, ttl, position)
            self.slab.write(s._slot, state)
            self._counts["restored"] += 1
            return s

        return self._add(session_id, make)

    def fork(self, session_id: str, principal: str = "", new_id: str | None = None) -> Session:
        """A new session of the same principal with a copy of the state and position
        (replicated: written at once, its lease let go: a sticky proxy may route it elsewhere)."""
        self.get(session_id, principal)  # NOT_FOUND before claiming the new id

        def make(sid):
            parent = self.get(session_id, principal)
            self._wait_returned(parent)
            parent._pins += 1  # not evicted (idle past its TTL after the wait) to make room
            try:
                child = self._new_session(principal, sid, parent._ttl, parent._position)
            finally:
                parent._pins -= 1
            self.slab.copy(parent._slot, child._slot)
            self._counts["forked"] += 1
            return child

        return self._add(new_id, make, keep_lease=False)

    # --- persistence ---------------------------------------------------------------------

    @property
    def changed_since_save(self) -> bool:
        """Whether a session was made, removed, stepped or rewound since the last successful
        `save` began (True before the first): a periodic save of an idle store would write
        the same file again."""
        return self._changes != self._saved_changes

    def save(self, directory: str | os.PathLike) -> Path:
        """Write every live session to directory/sessions.bin atomically (temp file + rename);
        sessions idle past their TTL are evicted first, as the sweep would.

        Saves are serialized (a periodic save may still run when the shutdown save starts).
        """
        with self._save_lock:
            return self._save(Path(directory))

    def _save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        self.snapshot_key.keep()  # removed with the directory: the file is unreadable without it
        path = directory / STORE_FILE
        with self._lock:
            self._evict_idle_locked()  # past their TTL: evicted now, not saved for a restart
            live, changes = list(self._sessions.values()), self._changes
        # copied a few MiB of rows at a time, each row with its position: steps wait for the
        # lock one part's copy long, not the whole slab's (128 MiB: ~0.4 s)
        part = max(1, SAVE_PART_BYTES // (4 * self.state_size))
        saved, states = [], []
        for i in range(0, len(live), part):
            with self._lock:
                sessions = live[i : i + part]
                while any(s._lent for s in sessions):
                    self._returned.wait()
                sessions = [s for s in sessions if self._current(s)]
                states.append(self.slab.read_rows([s._slot for s in sessions]))  # [k, S]
                saved += [
                    {"id": s._id, "principal": s._principal, "position": s._position,
                     "ttl": s._ttl, "incarnation": s._incarnation}
                    for s in sessions
                ]  # fmt: skip
        usable = [np.isfinite(part).all(axis=1) for part in states]  # [k] each
        if not all(ok.all() for ok in usable):  # a load would refuse the file: left out
            flat = np.concatenate(usable)  # [n]
            bad = [h["id"] for h, ok in zip(saved, flat) if not ok]
            log.warning(
                "not saved: %d sessions whose state contains NaN or inf (unusable; a load "
                "would refuse the file): %s",
                len(bad),
                bad[:5],
            )
            saved = [h for h, ok in zip(saved, flat) if ok]
            states = [part[ok] for part, ok in zip(states, usable)]
        header = {"model_sha": self.model_sha, "state_size": self.state_size, "sessions": saved}
        tmp = path.with_name(f".{STORE_FILE}.{os.getpid()}.tmp")
        try:  # owner-only, as the key beside it: the file holds every conversation's state
            # made anew, never opened through what is there: a temp file left by a crash may
            # have other bits, and a link at its name would have the states written over the
            # file it points to
            tmp.unlink(missing_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY  # EXCL: nor through a link
            with open(os.open(tmp, flags, 0o600), "wb") as f:
                # part by part: no copy of all the states at once (each a GIL-held memcpy
                # that stalled the steps of the event loop)
                write_session_file(f, self.snapshot_key, header, states)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk: no partial file left to keep it full
            tmp.unlink(missing_ok=True)
            raise
        self._saved_changes = changes
        log.info("saved %d sessions to %s", len(saved), path)
        return path

    def load(self, directory: str | os.PathLike) -> int:
        """Add the sessions saved in directory/sessions.bin; returns how many (0 if no file).

        All or nothing: a corrupt file (InvalidInput), another model's file (ModelError),
        an id already live here (InvalidInput) or too little room (LimitExceeded)
        raises before any session is added. Loaded sessions start a fresh idle timer; their
        TTL is at most this store's `ttl` (a server restarted with a lower --session-ttl).
        """
        if self.replication is not None:  # its sessions live in the shared store
            raise InvalidInput(
                "state_dir",
                "a replicated store does not load sessions files: its sessions are kept in the "
                "shared state store (a copy loaded here could be older than the one another "
                "replica serves)",
            )
        path = Path(directory) / STORE_FILE
        if not path.is_file():
            log.info("no saved sessions at %s", path)
            return 0
        header, states = read_session_file(self.snapshot_key, path)
        try:
            S = int(header["state_size"])
            entries = [
                (
                    check_session_id(str(e["id"])),
                    str(e["principal"]),
                    int(e["position"]),
                    min(_check_ttl(e["ttl"]), self.ttl),
                    str(e["incarnation"]),
                )
                for e in header["sessions"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput("state_dir", f"{path}: bad session entry: {e}") from e
        for e, row in zip(entries, states):
            check_state(row, e[2], "state_dir", f"{path}: session {e[0]!r}")
        if header.get("model_sha") != self.model_sha:
            raise ModelError(
                f"state_dir: {path} holds sessions of another model "
                f"(sha {header.get('model_sha')!r})"
            )
        if S != self.state_size:
            raise ModelError(
                f"state_dir: {path} has state size {S}, this model has {self.state_size}"
            )
        n = len(entries)
        with self._lock:
            ids = [e[0] for e in entries]
            clash = [i for i in ids if i in self._sessions]
            if clash or len(set(ids)) != n:
                raise InvalidInput(
                    "state_dir", f"{path}: session ids already live or repeated: {clash[:5]}"
                )
            if n > len(self._free):
                raise LimitExceeded(
                    f"state_dir: {path} holds {n} sessions, only {len(self._free)} free slots "
                    "(max_sessions)"
                )
            need = Counter(e[1] for e in entries)
            if self.max_per_principal is not None:
                over = [
                    p
                    for p, k in need.items()
                    if self._per_principal[p] + k > self.max_per_principal
                ]
                if over:
                    raise LimitExceeded(
                        f"state_dir: {path}: principals {over[:5]} would exceed their "
                        "max_sessions_per_principal"
                    )
            for (sid, principal, position, ttl, incarnation), row in zip(entries, states):
                s = self._new_session(principal, sid, ttl, position, incarnation)
                self.slab.write(s._slot, row)
            self._counts["restored"] += n  # created + restored + forked = live + ended
        log.info("loaded %d sessions from %s", n, path)
        return n
