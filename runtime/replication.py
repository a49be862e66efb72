"""Replication of sessions through Redis: any replica can continue any session.

Redis keeps each session's record (a signed snapshot and its bookkeeping) and lease; the keys
and the Lua scripts that change them are in runtime/redis_backend.py.

`RedisReplication` is a policy a SessionStore is composed with (`SessionStore(...,
replication=RedisReplication(url))`): the store keeps the working copy of every session
and calls the policy at named moments — claim / created / release (a new session),
commit (a step's new states, around the local commit), removed (close, eviction, moved),
fetch (make a session local), held, flush (shutdown) — through its public API only:

- Ownership is leased. A replica steps a session only while it holds the lease key
  (SET NX PX; `lease_ttl` seconds, renewed in the background for sessions in use). A
  replica that does not hold a session (after a failover, or a lapsed lease) `fetch`es
  it: takes the lease — waiting up to `lease_wait` for another holder's lease to be
  released or to expire — and loads the newest snapshot. Two replicas never step one
  session at once.
- Versions. Each write is a compare-and-set (one Lua script): it applies only while the
  writer holds the lease and names the version it last read or wrote; the version then
  goes up by one. A stale replica cannot overwrite a newer state; its session is
  dropped locally ("moved") and its request fails with UNAVAILABLE (retry).
- Terms. Taking a session over (a load under a newly taken lease, `_TAKE`) raises its
  term by one and names the new holder in the record (undone when the load fails here:
  another model, a full store); writes and deletes also compare the term. So a copy left
  on the previous replica matches nothing: neither its writes nor its delete (an idle
  eviction there) touch the record the new holder builds on; and of two copies the one
  with the higher term is the newer, however many versions the other wrote (what a
  write-back decides by; a tie of terms goes to the holder the record names).
- Persistence (`persist_every`, the `--persist-every` flag):
      "1"     write-through: a step is acknowledged after its state is in Redis;
      "N"     every Nth step of a session is written through: a replica that dies
              loses at most the last N-1 acknowledged steps of each session;
      "Nms"   write-behind: dirty sessions are written every N milliseconds in the
              background: a replica that dies loses at most the last N ms (+ one write).
  A temporary session (a Generate's without a session id) is never written (`keep_local`).
  New, restored and forked sessions are written at once; everything dirty is written (and
  every record that went back to older data or vanished), and every lease released, on
  `flush` (graceful shutdown), so a drained replica's sessions continue elsewhere at once.
  Close and idle eviction delete the keys; a key also expires after the session's TTL.
- Snapshots carry the model sha: a replica serving another model refuses them
  (ModelError → FAILED_PRECONDITION). They are signed with one key per Redis (made by
  the first replica, SET NX), unless every replica is given `--snapshot-key`.
- Redis down: the store turns `degraded` (health and metrics say so), keeps serving the
  sessions it holds in memory (without leases), creates new ones locally, and refuses
  only what needs Redis (loading a session it does not hold: UNAVAILABLE). A background
  ping notices when Redis is back; then every session held here is written back with its
  lease re-taken (`_RESTORE`), unless Redis has a later term of it or its tombstone
  (taken over, or closed, elsewhere meanwhile: dropped here). The newest copy wins
  whichever replica writes back first. A session a step holds at that moment stays
  pending (served from memory) and is written back by its commit or the next period.
  A record that expired (or that Redis evicted) while a replica holds the session is
  written back the same way by that replica's next write, or when it is asked for it;
  renewing a used session's lease renews its record's expiry too, so this is rare.
- Redis back empty (restarted without persistence, flushed): the client reconnects
  quietly, so no outage may be seen. Each Redis data set carries a generation token
  (SET NX by the first replica); every write, write-back and take-over checks it, and the
  background thread and a shutdown read it. A replica that finds another token (or none)
  handles it as an outage that just ended: it proposes a new token and the snapshot key
  (the first proposal wins, so every replica ends up on one) and writes its sessions
  back; a write that found the token gone is not taken for a lost lease (which would drop
  the only copy of its session).

Threads: the batcher's worker thread commits (and writes through); one background
thread renews leases, writes behind, deletes evicted keys and watches Redis. Redis calls
from the event loop are a few round trips on loopback (create and restore 2, fork 3, close
1), each waiting for a write of the same replica in flight (`_io`); the ones that may wait
for another replica (`fetch`) run in the service's fetch threads. A step with write-through
is one round trip; a fetch of a session this replica held last (its lease lapsed while it
was idle) is one round trip without the snapshot.

Limits: one Redis (or a Sentinel-managed primary) — the scripts touch two keys of one
session, which Redis Cluster would need hash tags for ({id}); leases use Redis's clock
(PX), so replica clocks need not agree.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from .errors import (
    CorruptState,
    FailureRun,
    InvalidInput,
    LimitExceeded,
    ModelError,
    SessionBusy,
    Unavailable,
    check_session_id,
)
from .redis_backend import (
    BEHIND,
    CLOSED,
    CURRENT,
    EVICTED,
    HELD,
    LOST,
    NO_RECORD,
    NOREC,
    OLDER,
    OTHER_PRINCIPAL,
    TAKEN,
    RedisBackend,
    StoreReset,
    record_expire_ms,
)
from .sessions import Session, SessionStore
from .snapshots import SnapshotKey

log = logging.getLogger(__name__)
T = TypeVar("T")


_PERSIST_RE = re.compile(r"^\s*(\d{1,10})\s*(ms)?\s*$")
MAX_PERSIST_STEPS = 10**9  # a larger N writes nothing a session will live to see
MAX_PERSIST_MS = 3_600_000  # an hour: the longest --lease-ttl


def parse_persist_every(text: str) -> tuple[int, float]:
    """`--persist-every`: "N" → (N steps, 0.0); "Nms" → (0, N / 1000 seconds)."""
    m = _PERSIST_RE.match(str(text))
    n = int(m.group(1)) if m else 0
    if not 1 <= n <= (MAX_PERSIST_MS if m and m.group(2) else MAX_PERSIST_STEPS):
        raise ValueError(
            f"persist_every: must be N (write every Nth step, 1 = write-through; N <= "
            f"{MAX_PERSIST_STEPS:g}) or Nms (write behind every N milliseconds; N <= "
            f"{MAX_PERSIST_MS}) with N >= 1, got {text!r}"
        )
    return (0, n / 1000.0) if m.group(2) else (n, 0.0)


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisReplication:
    """Sessions kept in Redis too, leased to one replica at a time (see the module docstring).

    Args:
        url: redis://host:port/db (rediss:// for TLS).
        persist_every: "1" | "N" | "Nms" (see the module docstring).
        lease_ttl: seconds a lease lasts without renewal (the failover time after a replica
            dies; renewed every lease_ttl / 3 while a session is in use).
        lease_wait: seconds `fetch` waits for another replica's lease (default lease_ttl + 1).
        replica_id: this replica's name in the leases (default host:pid:random).
        prefix: key prefix in Redis.
        backend: a RedisBackend to use instead of connecting to `url` (tests).

    `SessionStore(..., replication=this)` attaches it (`attach`): from then on the store
    calls it; nothing else should.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        persist_every: str = "100ms",
        lease_ttl: float = 3.0,
        lease_wait: float | None = None,
        replica_id: str | None = None,
        prefix: str = "ssmstream",
        backend: RedisBackend | None = None,
    ):
        if not isinstance(lease_ttl, (int, float)) or not 0.05 <= lease_ttl <= 3600:
            raise InvalidInput("lease_ttl", f"must be in [0.05, 3600] seconds, got {lease_ttl!r}")
        self.persist_steps, self.persist_interval = parse_persist_every(persist_every)
        self.persist_every = str(persist_every).strip()
        self.lease_ttl = float(lease_ttl)
        self.lease_wait = self.lease_ttl + 1.0 if lease_wait is None else float(lease_wait)
        self.replica_id = replica_id or default_replica_id()
        self.backend = backend or RedisBackend(url, prefix)
        self.store: SessionStore | None = None
        self._lease_ms = max(50, int(1000 * self.lease_ttl))
        self._lease_until: dict[str, float] = {}  # id -> monotonic time our lease surely lasts
        self._version: dict[str, int] = {}  # id -> the Redis version the local copy builds on
        self._term: dict[str, int] = {}  # id -> the term (take-overs) of the local copy
        self._dirty: dict[str, int] = {}  # id -> steps committed since the last write
        self._used: set[str] = set()  # stepped since the last renewal
        # to write back (_RESTORE) after an outage / empty restart / expired record; until
        # then served from memory without a lease
        self._pending: set[str] = set()
        self._unleased: set[str] = set()  # forks made while degraded: let go once written back
        self._local: set[str] = set()  # temporary sessions: kept here only (`keep_local`)
        # closed/evicted sessions whose keys are still to delete: (id, incarnation) ->
        # (version, term, expire ms, "closed" | "evicted")
        self._drops: dict[tuple[str, str], tuple[int, int, int, str]] = {}
        self._drops_lock = threading.Lock()  # added under the store's lock, taken by I/O
        self._io = threading.RLock()  # orders writes of one session with its commits
        self.degraded = False
        self._retry_said = -math.inf  # when a failed write-back was last logged as a warning
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_key = True
        self._final = False  # flush(final=True) ran: fetches are refused (no lease is taken)
        self._reclaim_after = -math.inf  # a full `reclaim` that dropped nothing waits till then

    def attach(self, store: SessionStore, key_given: bool) -> None:
        """Called once by the store: sign with the key kept in Redis unless the key was given
        to every replica (--snapshot-key)."""
        self.store, self._own_key = store, not key_given
        try:
            self.backend.ping()
            self._share_key()
            self.backend.join()
        except self.backend.Error as e:
            self._degrade(e)

    # --- background thread -------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (lease renewal, write-behind, deletes, Redis watch)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="state-store", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _loop(self) -> None:
        period = self.lease_ttl / 3
        if self.persist_interval:
            period = min(period, self.persist_interval)
        next_renew = 0.0
        run = FailureRun(log, "state store background work", period, "rounds")  # not Redis's
        while not self._stop.wait(period):
            try:
                if self.degraded:
                    self._try_recover()
                    continue
                self.backend.check_generation()  # Redis back empty: seen within one period
                if self.persist_interval:
                    self._write_dirty()
                elif self._pending:
                    self._write_pending()
                if time.monotonic() >= next_renew:
                    self._renew_used()
                    next_renew = time.monotonic() + self.lease_ttl / 3
                self._delete_dropped()
            except self.backend.Error as e:
                self._degrade(e)
                continue  # a failed round too: not one that works again
            except Exception:  # the thread must survive anything
                run.failure()
                continue
            run.success()

    # --- health ------------------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        self.counts["errors"] += 1
        if not self.degraded:
            self.degraded = True
            what = "lost its data" if isinstance(exc, StoreReset) else "unavailable"
            log.warning(
                "state store %s %s (%s): serving the %d sessions held in memory, "
                "persistence and failover paused until they are written back",
                self.backend.url,
                what,
                str(exc),  # not the exception: a kept log record would keep its frames
                len(self.store),
            )

    def _share_key(self) -> None:
        """Sign with the key kept in Redis (proposing ours: a restarted, empty Redis gets
        back the key this replica's sessions are signed with)."""
        if self._own_key:
            secret = self.backend.snapshot_key(self.store.snapshot_key.secret)
            if secret != self.store.snapshot_key.secret:
                self.store.snapshot_key = SnapshotKey(secret)

    def _try_recover(self) -> None:
        """Redis answers again (after an outage, or back empty): write back every session
        held here (`_RESTORE`: its lease re-taken) unless a later term of it (a take-over
        elsewhere meanwhile) or its tombstone is in Redis (then it is dropped here). A
        session being stepped right now stays pending: written by its commit or next period.
        """
        try:
            self.backend.ping()
            self._share_key()
            self.backend.join()
            self._delete_dropped()  # first: a closed incarnation's record must not stay
            with self._io:
                live = self._shared()
                self._pending.update(s.id for s in live)
                self._write_current(live)
                kept = sum(1 for s in live if self.store.local(s.id) is s)
        except self.backend.Error as e:  # tried every period: a warning at most every 30 s
            now = time.monotonic()
            loud = now - self._retry_said >= 30
            if loud:
                self._retry_said = now
            (log.warning if loud else log.debug)(
                "state store %s: write-back failed (%s); retrying", self.backend.url, str(e)
            )
            return
        self.degraded, self._retry_said = False, -math.inf
        waiting = len(self._pending)
        log.info(
            "state store %s is back: %d sessions written back and re-leased, %d dropped (moved "
            "or ended elsewhere), %d being stepped (written next)",
            self.backend.url,
            kept - waiting,
            len(live) - kept,
            waiting,
        )

    def stats(self) -> dict:
        return {
            "up": not self.degraded,
            "dirty": self._unwritten(),
            **{k: self.counts[k] for k in ("writes", "write_bytes", "loads", "relocks")},
            "moved": self.counts["moved"],
            "errors": self.counts["errors"],
            "lease_waits": self.counts["lease_waits"],
        }

    # --- ownership (the store's held / fetch) ------------------------------------------

    def _safe_until(self, t0: float) -> float:
        """Until when a lease taken or renewed at t0 lets this replica step the session without
        asking Redis: half of lease_ttl. A step in that window is renewed (or written) by the
        next renewal, which comes at most lease_ttl / 3 later, so by 5/6 of the lease, before
        Redis can expire it and another replica take the session over from an older record
        (a later step asks Redis first)."""
        return t0 + 0.5 * self.lease_ttl

    def held(self, session_id: str) -> bool:
        """True when the lease of a session that is here is safely ours, or Redis is down, or
        the session is pending a write-back (which takes the lease), or kept here only."""
        return (
            self.degraded
            or session_id in self._local
            or session_id in self._pending
            or self._lease_until.get(session_id, 0.0) > time.monotonic()
        )

    def fetch(self, session_id: str, principal: str = "") -> None:
        """Take the session's lease (waiting up to lease_wait for another replica's) and make
        its newest state local. Blocking: call it off the event loop.

        Raises SessionBusy (another replica keeps the lease), Unavailable (Redis down and
        the session is not here), ModelError (a snapshot of another model). An unknown
        session, or one of another principal, raises nothing here: `get` reports it.
        """
        if self._final:
            raise Unavailable(f"replica is shutting down; retry {session_id!r} elsewhere")
        if self.degraded:
            local = self.store.local(session_id)
            if local is not None and local.principal == principal:  # else: as an unknown id
                return
            raise Unavailable(
                f"state store is unavailable and session {session_id!r} is not held by this "
                f"replica; retry later"
            )
        try:
            self._fetch(session_id, principal)
        except self.backend.Error as e:
            self._degrade(e)
            log.warning("state store failed while loading %r: %s", session_id, str(e))
            raise Unavailable(f"state store failed while loading {session_id!r}; retry") from e

    def close_unusable(self, session_id: str, principal: str = "") -> bool:
        """Close a session whose record no snapshot check passes (`fetch` raised
        CorruptState for it): take its lease and, when the record is still unusable, delete
        it and its lease, leaving its incarnation's "closed" tombstone. True when deleted;
        False, nothing changed, when the record is usable after all (or another model's), gone
        or another principal's. Raises SessionBusy while another replica holds its lease,
        Unavailable when Redis is down."""
        if self.degraded or self._final:
            raise Unavailable(f"state store is unavailable; retry closing {session_id!r} later")
        try:
            with self._io:
                if self.store.local(session_id) is not None:
                    return False  # a copy here: an ordinary close
                code, rec = self.backend.take(
                    session_id, self.replica_id, self._lease_ms, principal, ("", -1, -1)
                )
                # HELD, NO_RECORD, OTHER_PRINCIPAL set no lease; CURRENT and OLDER (which do)
                # answer only a replica with a copy
                if code == HELD:
                    raise SessionBusy(f"session {session_id!r} is held by replica {rec!r}; retry")
                if code != TAKEN:
                    return False
                deleted = False
                try:
                    self.store.unpack(rec["snap"])
                except InvalidInput:  # still unusable: delete it under our lease (term + 1)
                    drop = (rec["version"], rec["term"] + 1, record_expire_ms(rec["ttl"]))
                    (deleted,) = self.backend.drop_many(
                        [(session_id, rec["incarnation"], *drop, "closed")], self.replica_id
                    )
                except ModelError:  # another model's: usable where that model serves
                    pass
                finally:
                    if not deleted:  # the take-over undone, as a failed fetch undoes it
                        self.backend.untake(session_id, self.replica_id, rec)
                        self.backend.release([session_id], self.replica_id)
                if deleted:
                    log.warning("session %s: its unusable record was deleted", session_id)
                return deleted
        except self.backend.Error as e:
            self._degrade(e)
            raise Unavailable(f"state store failed while closing {session_id!r}; retry") from e

    def _fetch(self, sid: str, principal: str) -> None:
        """Make `sid` ours in one `_TAKE` per try, waiting (without _io) while another replica
        holds its lease, up to lease_wait."""
        deadline = time.monotonic() + self.lease_wait
        waited = False
        while True:
            with self._io:
                if self._final:  # the shutdown's flush ran while this fetch waited
                    raise Unavailable(f"replica is shutting down; retry {sid!r} elsewhere")
                local = self.store.local(sid)
                ours = ("", -1, -1)
                if local is not None:
                    ours = (local.incarnation, self._term.get(sid, -1), self._version.get(sid, -1))
                t0 = time.monotonic()
                code, got = self.backend.take(sid, self.replica_id, self._lease_ms, principal, ours)
                if code != HELD:
                    self.counts["lease_waits"] += waited
                    self._took(sid, principal, local, code, got, t0)
                    return
            if time.monotonic() >= deadline:
                raise SessionBusy(
                    f"session {sid!r} is held by replica {got!r} (its lease was not released "
                    f"within {self.lease_wait:g}s); retry"
                )
            waited = True
            time.sleep(min(0.05, self.lease_ttl / 10))

    def _took(self, sid: str, principal: str, local, code: int, got, t0: float) -> None:
        """What `_TAKE` answered `_fetch` (caller holds _io)."""
        if code in (NO_RECORD, OLDER):  # gone, or a stale copy's: ours is newest (write-back)
            if local is not None and local.principal == principal:
                if code == OLDER and got is not None:  # written back as a take-over would
                    self._term[sid] = got
                self._republish(local)
        elif code == OTHER_PRINCIPAL:  # `get` says unknown; a copy of an ended incarnation goes
            if local is not None and local.incarnation != got:
                self._drop_ended(local)
        elif code == CURRENT:  # we held it last: our copy (maybe ahead by unwritten steps) stays
            self._pending.discard(sid)
            self._lease_until[sid] = self._safe_until(t0)
            self.counts["relocks"] += 1
        else:
            try:
                self.with_room(lambda: self._install(sid, principal, got, t0))
            except BaseException:  # not loaded here: the take-over did not happen
                self._lease_until.pop(sid, None)
                self.backend.untake(sid, self.replica_id, got)
                self.backend.release([sid], self.replica_id)
                raise

    def with_room(self, make: Callable[[], T]) -> T:
        """`make()` (which takes a slot of the store); when the store or the principal is
        full (LimitExceeded), once more after `reclaim` let copies that moved on go."""
        try:
            return make()
        except LimitExceeded:
            if not self.reclaim():
                raise
        return make()

    def reclaim(self, session_id: str | None = None) -> int:
        """Forget local copies that Redis shows have moved on, so that they stop holding
        this replica's limits and ids: copies of sessions another replica took over (a later
        term) or that ended there (closed or evicted: another incarnation's record, or no
        record and this incarnation's tombstone). Such a copy can never be written back (a
        write-back drops it too). A copy whose lease is ours, that a step holds or that waits
        for a write-back stays, and so does one Redis has neither a record nor a tombstone
        of (it may be the only copy). session_id: only that id's copy; else every copy, at
        most once per lease_ttl / 3 while none goes. Blocking: pipelined round trips for the
        records, the tombstones needed and the taken-over copies' leases (at most three);
        returns how many copies went."""
        if self.degraded or self._final:
            return 0
        if session_id is None and time.monotonic() < self._reclaim_after:
            return 0
        if session_id is not None and self.store.local(session_id) is None:
            return 0  # no copy of it here: nothing to ask Redis
        gone = 0
        try:
            with self._io:  # no fetch installs a newer copy meanwhile
                local = (
                    self.store.sessions() if session_id is None else [self.store.local(session_id)]
                )
                copies = [s for s in local if s and not s.pinned and not self.held(s.id)]
                heads = self.backend.heads([s.id for s in copies]) if copies else []
                # a copy of an incarnation Redis does not hold: its tombstone says if it ended
                unsure = [
                    s
                    for s, (incarnation, _, version, _, _) in zip(copies, heads)
                    if version is None or incarnation not in ("", s.incarnation)
                ]
                tombs = self.backend.gone_many([(s.id, s.incarnation) for s in unsure])
                ended = dict(zip(unsure, tombs))
                moved = []
                for s, (_, term, version, _, _) in zip(copies, heads):
                    if s in ended:
                        why = ended[s] or (None if version is None else "closed")
                        if why is None:
                            continue  # no record, no tombstone: maybe the only copy
                        self.store.drop(s, why)  # ended there: later `get`s say how
                    elif term > self._term.get(s.id, 0):  # taken over by another replica
                        self.store.drop(s)
                        moved.append(s.id)
                    else:
                        continue
                    gone += 1
                self.counts["moved"] += len(moved)
                if moved:
                    self.backend.release(moved, self.replica_id)
        except self.backend.Error as e:
            self._degrade(e)
        if gone:
            log.info("%d session copies that moved to other replicas or ended there let go", gone)
        elif session_id is None:
            self._reclaim_after = time.monotonic() + self.lease_ttl / 3
        return gone

    def _unwritten(self) -> int:
        """Sessions held here with steps not written to Redis yet (or not written back).
        Called from the metrics thread too: it iterates copies (list() of a dict or set is
        atomic under the GIL; a comprehension over the live dict is not)."""
        ids = {i for i, n in list(self._dirty.items()) if n > 0} | set(list(self._pending))
        return sum(1 for i in ids if self.store.local(i) is not None)

    def _drop_ended(self, local: Session) -> None:
        """Forget a local copy of a session that ended elsewhere (its tombstone says how;
        without one it was closed: the id is another incarnation's)."""
        self.store.drop(local, self.backend.gone(local.id, local.incarnation) or "closed")

    def _install(self, sid: str, principal: str, rec: dict, t0: float) -> None:
        """Make Redis's record of `sid` (as `take` returned it, before its term went up) our
        copy (caller holds _io and the lease). A record no snapshot check passes (a state
        gone NaN / inf on the replica that stepped it, a damaged record) is DATA_LOSS for the
        session, as its steps were there: the client's request sent no snapshot."""
        try:
            position, state = self.store.unpack(rec["snap"])
        except InvalidInput as e:
            raise CorruptState(
                f"session {sid!r}: its copy in the state store is unusable ({e}): restore a "
                "good snapshot into another id, or close this one to free it"
            ) from e
        self.store.install(sid, principal, rec["ttl"], position, state, rec["incarnation"])
        self._pending.discard(sid)
        self._dirty.pop(sid, None)
        self._version[sid], self._term[sid] = rec["version"], rec["term"] + 1
        self._lease_until[sid] = self._safe_until(t0)
        self.counts["loads"] += 1
        log.info("session %s loaded from the state store at position %d", sid, position)

    def _renew_used(self) -> None:
        """Renew the leases of sessions used since the last renewal or running. An idle
        session with steps not yet written (--persist-every N) is written first and renewed
        once more: its lease must not lapse while its newest steps exist only here (another
        replica would load the older record)."""
        live = self.store.sessions()
        idle_dirty = [
            s
            for s in live
            if self._dirty.get(s.id, 0) > 0 and s.id not in self._used and not s.pinned
        ]
        if idle_dirty:
            with self._io:
                self._write_current(idle_dirty)
        written = {s.id for s in idle_dirty}
        renew = [s for s in live if s.id in self._used or s.pinned or s.id in written]
        self._used.clear()
        t0 = time.monotonic()
        ids, expires = [s.id for s in renew], [record_expire_ms(s.ttl) for s in renew]
        ok = self.backend.renew(ids, self.replica_id, self._lease_ms, expires)
        for sid, renewed in zip(ids, ok):
            if renewed:
                self._lease_until[sid] = self._safe_until(t0)
            else:  # expired and taken by another replica, or never taken (degraded)
                self._lease_until.pop(sid, None)

    # --- new sessions: claim the id in Redis, then write the first version -------------

    def claim(self, session_id: str | None) -> str:
        """The id a new session will have, reserved in Redis (its lease newly taken). An id
        in use, here or on any replica, is refused without touching its lease (a refused
        create must not take a live session's lease from the replica serving it)."""
        sid = str(uuid.uuid4()) if session_id is None else check_session_id(session_id)
        in_use = InvalidInput("session_id", f"{sid!r} is already in use")
        if self.store.local(sid) is not None:
            raise in_use
        if self.degraded:  # nothing reserved: written back (_RESTORE) when Redis is back
            self._pending.add(sid)
            return sid
        try:
            with self._io:
                with self._drops_lock:  # an ended incarnation's delete first: it may drop the lease
                    ended = [k for k in self._drops if k[0] == sid]
                for key in ended:
                    self._delete_dropped(key)
                if not self.backend.claim(sid, self.replica_id, self._lease_ms):
                    raise in_use
        except self.backend.Error as e:
            self._degrade(e)
        return sid

    def keep_local(self, s: Session) -> None:
        """A new session that stays here only (a temporary one): not claimed, written, leased
        or written back; its close or eviction leaves nothing to delete. Called under the
        store's lock, before its first step."""
        self._local.add(s.id)

    def _shared(self) -> list[Session]:
        """The store's sessions, less those kept here only."""
        return [s for s in self.store.sessions() if s.id not in self._local]

    def release(self, session_id: str) -> None:
        """Let go of a claimed id whose session was not made after all (the create's own
        error is what its caller raises: a Redis error here only degrades the store)."""
        self._pending.discard(session_id)
        if not self.degraded:
            try:
                self.backend.release([session_id], self.replica_id)
            except self.backend.Error as e:
                self._degrade(e)

    def created(self, s: Session, keep_lease: bool = True) -> None:
        """Write a new session's first version; a fork lets go of its lease at once (a sticky
        proxy routes the child's calls by its own id, maybe to another replica)."""
        self._lease_until[s.id] = self._safe_until(time.monotonic())
        self._version[s.id], self._term[s.id] = 0, 0
        self._dirty[s.id] = 0
        if self.degraded:  # only in memory: written back when Redis is back
            self._pending.add(s.id)
            if not keep_lease:
                self._unleased.add(s.id)
            return
        try:
            with self._io:
                self._write_current([s])
            # refused (and dropped here): another replica claimed the id after our claim lapsed
            if self.store.local(s.id) is not s:
                raise InvalidInput("session_id", f"{s.id!r} is already in use")
            if not keep_lease:
                self._lease_until.pop(s.id, None)
                self.backend.release([s.id], self.replica_id)
        except self.backend.Error as e:
            self._degrade(e)

    # --- steps -------------------------------------------------------------------------

    def committed(self, sessions, results: list, force: bool = False) -> list:
        """After a local commit (`results`: a position or an error per session, as
        SessionStore.give_back returns them): write through the sessions that are due (all of
        them with `force`: a rewind, which a replica taking over must not miss; and those
        pending a write-back). One whose lease was lost or whose version is stale is dropped
        here (another replica owns it): its result becomes Unavailable, and Redis keeps the
        other replica's newer record. Each write reads the session's state and position
        together (`state_now`); one closed since its step is not written (its step did apply:
        its result stays)."""
        results = list(results)
        with self._io:  # the versions and dirty counts change only under _io
            ok = [
                j
                for j, r in enumerate(results)
                if not isinstance(r, BaseException) and sessions[j].id not in self._local
            ]
            for j in ok:  # stepped here: its lease stays here (before a write-back lets go)
                self._unleased.discard(sessions[j].id)
            due = [] if self.degraded else [j for j in ok if force or self._due(sessions[j].id)]
            versions: dict[int, int] = {}
            items, written = [], []
            for j in due:
                now = self.store.state_now(sessions[j])
                if now is not None:
                    items.append((sessions[j], *now))
                    written.append(j)
            if items:
                try:
                    versions = dict(zip(written, self._put(items)))
                except self.backend.Error as e:
                    self._degrade(e)
            for j in ok:
                s, v = sessions[j], versions.get(j)
                if v is not None and v < 0:
                    results[j] = self._lost(s, v)
                    continue
                here = self.store.local(s.id)
                if here is None or here is s:  # else its id is a new session's now
                    self._used.add(s.id)
                    if v is None:
                        self._dirty[s.id] = self._dirty.get(s.id, 0) + 1
                    else:
                        self._version[s.id] = v
                        self._dirty[s.id] = 0
                if not s.live:  # closed since (also after the counts above): forget them
                    self._after_removed(s, v)
            return results

    def _due(self, sid: str) -> bool:
        if sid in self._pending:  # a write-back: as soon as its row is free
            return True
        return bool(self.persist_steps) and self._dirty.get(sid, 0) + 1 >= self.persist_steps

    def _after_removed(self, s: Session, version: int | None) -> None:
        """A session closed or evicted while its write was in flight (`removed` ran before
        this bookkeeping): forget it again, and let its pending delete match the version
        just written (else the delete finds a newer record, deletes nothing, and another
        replica serves the closed session). Caller holds _io."""
        if self.store.local(s.id) is None:  # no newer incarnation uses the id here
            self._dirty.pop(s.id, None)
            self._used.discard(s.id)
            self._version.pop(s.id, None)
        if version is not None:
            with self._drops_lock:
                drop = self._drops.get((s.id, s.incarnation))
                if drop is not None:
                    self._drops[(s.id, s.incarnation)] = (version, *drop[1:])

    def _put(self, items: Sequence[tuple[Session, np.ndarray, int]]) -> list[int]:
        """Write (session, state [S], position) items, a session pending a write-back by
        `_RESTORE` (which takes its lease), the others by compare-and-set; caller holds _io.
        New versions, or LOST / STALE / CLOSED / EVICTED."""
        rows = [self._row(s, state, position) for s, state, position in items]
        t0 = time.monotonic()
        replies = self._write(rows)
        gone = [j for j, (v, _) in enumerate(replies) if v in (NOREC, BEHIND)]
        if gone:  # the record expired under us (or Redis evicted it), or went back: write back
            self._pending.update(
                rows[j][0] for j in gone if self.store.local(rows[j][0]) is not None
            )
            again = [(*rows[j][:2], replies[j][1], *rows[j][3:7], True) for j in gone]
            for j, row, reply in zip(gone, again, self._write(again)):
                rows[j], replies[j] = row, reply
        codes = [v for v, _ in replies]
        done = [row for row, v in zip(rows, codes) if v > 0]  # a refused write is not a write
        self.counts["writes"] += len(done)
        self.counts["write_bytes"] += sum(len(r[3]) for r in done)
        for row, v in zip(rows, codes):
            if row[-1] and v > 0 and self.store.local(row[0]) is not None:
                self._pending.discard(row[0])  # written back: the lease is ours again
                self._lease_until[row[0]] = self._safe_until(t0)
        let_go = [row[0] for row, v in zip(rows, codes) if v > 0 and row[0] in self._unleased]
        if let_go:  # forks made while degraded: released as `created` releases a fork's
            self._unleased.difference_update(let_go)
            for sid in let_go:
                self._lease_until.pop(sid, None)
            try:
                self.backend.release(let_go, self.replica_id)
            except self.backend.Error as e:  # written: the lease just lapses
                log.warning("state store: releasing %d leases failed: %s", len(let_go), str(e))
        return codes

    def _write(self, rows: list[tuple]) -> list[tuple[int, int]]:
        """write_many, keeping the term of each record that went up (it went back to older
        data, and a copy from a take-over Redis forgot must not win over ours). A session
        closed or evicted while its write was in flight has its delete name the new term
        (else the delete finds a newer term and leaves the record of a closed session)."""
        replies = self.backend.write_many(rows, self.replica_id, self._lease_ms)
        for row, (_, term) in zip(rows, replies):
            if term == row[2]:
                continue
            with self._drops_lock:
                drop = self._drops.get((row[0], row[6]))
                if drop is not None:
                    self._drops[(row[0], row[6])] = (drop[0], term, *drop[2:])
                    continue
            self._term[row[0]] = term
        return replies

    def _row(self, s: Session, state: np.ndarray, position: int) -> tuple:
        """A write's item (RedisBackend.write_many): id, the version and term our copy builds
        on, snapshot, principal, ttl, incarnation, whether it is a write-back."""
        snap = self.store.pack_state(state, position)
        version, term = self._version.get(s.id, 0), self._term.get(s.id, 0)
        return s.id, version, term, snap, s.principal, s.ttl, s.incarnation, s.id in self._pending

    def _lost(self, s: Session, code: int) -> Exception:
        """A write found that the session ended elsewhere or belongs to another replica now:
        drop our copy; returns the error its request gets."""
        self._pending.discard(s.id)
        if code in (CLOSED, EVICTED):  # its tombstone: closed / evicted on another replica
            self.store.drop(s, "evicted" if code == EVICTED else "closed")
            return s.gone()
        why = "its lease was taken" if code == LOST else "a newer version was written"
        log.warning("session %s moved to another replica (%s); dropped here", s.id, why)
        self._drop_local(s)
        return Unavailable(f"session {s.id!r} is now served by another replica ({why}); retry")

    def _drop_local(self, s: Session) -> None:
        """Forget our copy of a session another replica owns now (and any lease we took)."""
        self.store.drop(s)
        self.counts["moved"] += 1
        try:
            self.backend.release([s.id], self.replica_id)
        except self.backend.Error as e:
            self._degrade(e)

    def _write_dirty(self) -> int:
        with self._io:
            return self._write_dirty_locked()

    def _write_dirty_locked(self) -> int:
        """Write every session with unwritten steps or pending a write-back; caller holds
        _io. Returns how many."""
        ids = dict.fromkeys([i for i, n in list(self._dirty.items()) if n > 0] + [*self._pending])
        return self._write_current([s for s in map(self.store.local, ids) if s is not None])

    def _write_pending(self) -> int:
        with self._io:
            return self._write_current(
                [s for s in map(self.store.local, list(self._pending)) if s is not None]
            )

    def _write_current(self, sessions: Sequence[Session]) -> int:
        """Write the sessions' local states as they are now; caller holds _io (no commit
        runs meanwhile, so each state and position belong together)."""
        items = []
        for s in sessions:
            now = self.store.state_now(s)  # no wait: a step holding its row needs _io to end
            if now is not None:  # else closed meanwhile, or being stepped: written later
                items.append((s, *now))
        if not items:
            return 0
        versions = self._put(items)
        for (s, _, _), v in zip(items, versions):
            if v < 0:
                self._lost(s, v)
                continue
            self._version[s.id] = v
            self._dirty[s.id] = 0
            if not s.live:
                self._after_removed(s, v)
        return len(items)

    def _write_behind_records(self) -> int:
        """Write back each session without unwritten steps whose record is gone (it expired,
        or Redis evicted it) or older than our copy (Redis went back to older data: a lower
        term, or our term and no other holder but fewer versions) and whose lease no other
        replica holds, as its next write would; for a shutdown, which hands the record over.
        The term stays: a copy from a take-over
        the older data lack (a higher term) still wins where it turns up. Caller holds _io.
        Returns how many."""
        live = self._shared()
        clean = [s for s in live if not self._dirty.get(s.id) and s.id not in self._pending]
        behind = []
        for s, head in zip(clean, self.backend.heads([s.id for s in clean])):
            incarnation, term, version, holder, lease = head
            if lease not in ("", self.replica_id):
                continue  # another replica serves it (it wrote its copy back there)
            if version is not None:
                ours = self._term.get(s.id, 0)
                if incarnation not in ("", s.incarnation) or term > ours:
                    continue  # another incarnation, or a take-over: not ours to write
                if term == ours and (
                    holder not in ("", self.replica_id) or version >= self._version.get(s.id, 0)
                ):
                    continue  # our copy, or ahead of it (a reply lost), or another holder's
            behind.append(s)
        self._pending.update(s.id for s in behind)
        return self._write_current(behind)

    def _republish(self, s: Session) -> None:
        """Write back our copy of a session Redis has no record of (it expired, or Redis lost
        it), unless a later term of it or its tombstone turns up (then it is dropped here).
        Being stepped right now: written by its commit. Caller holds _io."""
        self._pending.add(s.id)
        self._write_current([s])

    # --- closing, eviction, shutdown ---------------------------------------------------

    def removed(self, s: Session, reason: str) -> None:
        """A session left the store (under the store's lock: bookkeeping only, no I/O);
        the keys of a closed or evicted one are deleted by `closed` or the background thread."""
        if s.id in self._local:  # nothing of it in Redis
            self._local.discard(s.id)
            return
        self._lease_until.pop(s.id, None)
        self._dirty.pop(s.id, None)
        self._used.discard(s.id)
        self._pending.discard(s.id)
        self._unleased.discard(s.id)
        version, term = self._version.pop(s.id, -1), self._term.pop(s.id, -1)
        if reason in ("closed", "evicted"):
            expire_ms = record_expire_ms(s.ttl)
            with self._drops_lock:
                self._drops[(s.id, s.incarnation)] = (version, term, expire_ms, reason)

    def closed(self, s: Session) -> None:
        """After a close: delete its keys now (the evictions queued meanwhile are the
        background thread's)."""
        if self.degraded:
            return
        try:
            self._delete_dropped((s.id, s.incarnation))
        except self.backend.Error as e:
            self._degrade(e)

    def _delete_dropped(self, only: tuple[str, str] | None = None) -> None:
        """Delete the keys of sessions closed or evicted here (`only` that (id, incarnation)),
        in one pipelined round trip, once a write of one still in flight has ended (_io: its
        bookkeeping gives the delete the version it wrote). A failure (Redis down) puts them
        back to be tried again (a delete that did apply finds nothing the second time)."""
        with self._io:
            with self._drops_lock:
                if only is None:
                    todo, self._drops = list(self._drops.items()), {}
                else:
                    drop = self._drops.pop(only, None)
                    todo = [] if drop is None else [(only, drop)]
            if not todo:
                return
            try:
                self.backend.drop_many([(*k, *d) for k, d in todo], self.replica_id)
            except BaseException:
                with self._drops_lock:
                    for key, drop in todo:
                        self._drops.setdefault(key, drop)
                raise

    def flush(self, final: bool = False) -> int:
        """Write every unwritten step (and write back every record found older than our copy,
        or gone), delete closed keys, release every lease (shutdown).
        Returns how many sessions have steps that could not be written (0: none lost). A
        store that is degraded, or finds Redis's data set replaced, writes back first.
        final: fetches are refused from now on, also one waiting for a lease meanwhile (it
        would take a lease that nobody releases: the next replica would wait it out)."""
        if final:
            with self._io:  # after a take in progress, before the next one
                self._final = True
        for _ in range(2):
            if self.degraded:
                self._try_recover()  # Redis may be back while the background thread sleeps
            if self.degraded:
                break
            try:
                self.backend.check_generation()  # an empty restart nobody has noticed yet
                with self._io:
                    n = self._write_dirty_locked() + self._write_behind_records()
                self._delete_dropped()
                ids = [s.id for s in self.store.sessions()]
                self.backend.release(ids, self.replica_id)
                for sid in ids:
                    self._lease_until.pop(sid, None)
                log.info("state store: wrote %d sessions, released %d leases", n, len(ids))
                break
            except self.backend.Error as e:
                self._degrade(e)
        lost = self._unwritten()
        if lost:
            log.error(
                "state store unavailable at shutdown: the last steps of %d sessions are not "
                "written (other replicas will serve them from their last write)",
                lost,
            )
        return lost


class StoreCollector:
    """Prometheus collector of a RedisReplication (registered by the server)."""

    def __init__(self, replication: RedisReplication):
        self.replication = replication

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.replication.stats()
        yield GaugeMetricFamily(
            "ssmstream_state_store_up", "1 while the shared state store (Redis) is reachable",
            value=float(st["up"]),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ssmstream_state_store_dirty_sessions", "sessions with steps not yet written",
            value=st["dirty"],
        )  # fmt: skip
        for key, help_text in (
            ("writes", "session states written to the state store"),
            ("write_bytes", "bytes of session snapshots written to the state store"),
            ("loads", "sessions loaded from the state store (failover, moved, stale copy)"),
            ("relocks", "leases taken back after lapsing, the local copy still current"),
            ("moved", "sessions dropped here because another replica took them over"),
            ("errors", "state store operations that failed (Redis unreachable)"),
            ("lease_waits", "loads that had to wait for another replica's lease"),
        ):
            yield CounterMetricFamily(f"ssmstream_state_store_{key}", help_text, value=st[key])
