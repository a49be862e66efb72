"""SessionStore + RedisReplication against a real redis-server: two stores = two replicas.

The states here are arbitrary float32 rows (the store does not run models); each test
compares what one replica committed with what the other one loads.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
from ssmstream.runtime.errors import (
    CorruptState,
    InvalidInput,
    LimitExceeded,
    ModelError,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from ssmstream.runtime.redis_backend import PIPELINE_CALLS, record_expire_ms
from ssmstream.runtime.replication import RedisReplication, StoreCollector, parse_persist_every
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey
from stores import S, outage, replica, replies_lost, step


def test_persist_every_parses_steps_and_milliseconds():
    assert parse_persist_every("1") == (1, 0.0)
    assert parse_persist_every("16") == (16, 0.0)
    assert parse_persist_every("250ms") == (0, 0.25)
    for bad in ("0", "-1", "1s", "ms", "", "1.5"):
        with pytest.raises(ValueError, match="persist_every"):
            parse_persist_every(bad)


def test_a_take_over_of_a_state_gone_nan_is_data_loss_not_a_bad_snapshot(redis_server):
    """A step whose outputs came out NaN left its state in the slab and wrote it through to
    Redis; the replica that takes the session over answers as the first one did (DATA_LOSS
    for that session), not INVALID_ARGUMENT about a `snapshot` the client never sent."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=5.0)
    sid = a.create("alice").id
    a.commit(a.get(sid, "alice"), np.full(S, np.nan, np.float32), 1)  # written through
    with pytest.raises(CorruptState, match=rf"session '{sid}': its copy in the state store"):
        b.fetch(sid, "alice")
    assert sid not in {x.id for x in b.sessions()}


def test_a_close_of_an_unusable_record_deletes_it_and_frees_the_id(redis_server):
    """`close_unusable` (a close of a session whose record failed the snapshot checks)
    deletes the record and lease and leaves the "closed" tombstone; a usable record, another
    model's, another principal's, or none is left exactly as it was (its term and holder given
    back, the lease let go); one whose lease another replica holds is busy."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=5.0)
    other = replica(redis_server, "C", lease_ttl=30.0, model_sha="sha-other")
    backend = b.replication.backend
    good = a.create("alice").id
    step(a, good, np.random.default_rng(0), "alice")
    foreign = other.create("alice").id
    with pytest.raises(SessionBusy, match="held by replica 'C'"):
        b.close_unusable(foreign, "alice")
    other.flush()  # C lets go of its lease
    bad = a.create("alice").id
    incarnation = a.get(bad, "alice").incarnation
    a.commit(a.get(bad, "alice"), np.full(S, np.nan, np.float32), 1)
    time.sleep(0.25)  # A's leases lapse (A "died")
    before = backend.load(good)
    assert not b.close_unusable(good, "alice")  # usable: an ordinary fetch loads it
    assert backend.load(good) == before and backend.client.get(backend.lease(good)) is None
    before = backend.load(foreign)
    assert not b.close_unusable(foreign, "alice")  # another model's: usable where it serves
    assert backend.load(foreign) == before and backend.client.get(backend.lease(foreign)) is None
    assert not b.close_unusable(bad, "mallory")  # another principal's: as an unknown id
    assert backend.load(bad) is not None
    with pytest.raises(CorruptState):
        b.fetch(bad, "alice")
    assert b.close_unusable(bad, "alice")
    assert backend.load(bad) is None and backend.client.get(backend.lease(bad)) is None
    assert backend.gone(bad, incarnation) == "closed"
    assert not b.close_unusable(bad, "alice")  # gone: nothing to do
    assert b.create("alice", session_id=bad).position == 0  # the id is free again


def test_write_through_another_replica_continues_from_the_last_step(redis_server):
    rng = np.random.default_rng(0)
    a = replica(redis_server, "A", lease_ttl=2.0)
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=10.0)
    sid = a.create("alice").id
    for _ in range(5):
        last = step(a, sid, rng, "alice")
    assert not b.held(sid)
    b.fetch(sid, "alice")  # A's lease is still fresh: B waits for it to expire (A "died")
    assert b.replication.stats()["lease_waits"] == 1  # (else SessionBusy after lease_wait)
    s = b.get(sid, "alice")
    assert s.position == 5
    np.testing.assert_array_equal(b.read(s), last)
    assert b.held(sid)
    # A is stale now: its next step is refused and changes nothing in Redis
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng, "alice")
    assert sid not in {x.id for x in a.sessions()}
    rec = b.replication.backend.load(sid)
    assert rec["version"] == 6 and rec["principal"] == "alice"  # 1 + 5 writes
    assert rec["term"] == 1  # B's take-over


def test_every_nth_step_loses_at_most_n_minus_1(redis_server):
    rng = np.random.default_rng(1)
    a, b = replica(redis_server, "A", persist_every="4"), replica(redis_server, "B")
    sid = a.create().id
    states = [step(a, sid, rng) for _ in range(7)]
    b.fetch(sid)
    s = b.get(sid)
    assert s.position == 4  # steps 5..7 were not yet written: 3 = N - 1 lost
    np.testing.assert_array_equal(b.read(s), states[3])


def test_write_behind_writes_within_the_interval(redis_server):
    rng = np.random.default_rng(2)
    a = replica(redis_server, "A", persist_every="50ms")
    a.replication.start()
    try:
        sid = a.create().id
        last = [step(a, sid, rng) for _ in range(3)][-1]
        assert a.replication.backend.load(sid)["version"] == 1  # only the creation so far
        deadline = time.monotonic() + 2
        while a.replication.backend.load(sid)["version"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        b = replica(redis_server, "B")
        a.flush()  # graceful: written and lease released, B takes it at once
        b.fetch(sid)
        assert b.replication.stats()["lease_waits"] == 0
        np.testing.assert_array_equal(b.read(b.get(sid)), last)
        assert b.get(sid).position == 3
    finally:
        a.replication.stop()


def test_two_replicas_racing_exactly_one_wins_the_lease(redis_server):
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    a.flush()  # released: both B and C may take it
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=0.3)
    c = replica(redis_server, "C", lease_ttl=5.0, lease_wait=0.3)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def take(name, store):
        barrier.wait()
        try:
            store.fetch(sid)
            results[name] = "won"
        except SessionBusy as e:
            results[name] = e

    threads = [threading.Thread(target=take, args=(n, st)) for n, st in (("B", b), ("C", c))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    loser = "C" if winners == ["B"] else "B"
    assert "held by replica" in str(results[loser])
    win, lose = (b, c) if winners == ["B"] else (c, b)
    # the loser cannot write either: a commit without the lease is refused
    assert win.held(sid) and not lose.held(sid)
    rng = np.random.default_rng(3)
    x = step(win, sid, rng)
    np.testing.assert_array_equal(win.read(win.get(sid)), x)


def test_a_stale_replica_cannot_overwrite_a_newer_state(redis_server):
    rng = np.random.default_rng(4)
    a, b = replica(redis_server, "A", lease_ttl=0.2), replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)  # A's lease lapses (A paused: no renewal thread)
    b.fetch(sid)
    newer = step(b, sid, rng)
    b.flush()  # B lets go; A takes the lease back but its copy (and version) is old
    backend = a.replication.backend
    assert backend.client.set(backend.lease(sid), "A", px=10_000, nx=True)
    a.replication._lease_until[sid] = time.monotonic() + 10
    with pytest.raises(Unavailable, match="newer version"):
        step(a, sid, rng)
    rec = b.replication.backend.load(sid)
    assert (rec["version"], rec["term"]) == (3, 1)  # A's create and step, B's step; B took over
    c = replica(redis_server, "C")
    c.fetch(sid)
    np.testing.assert_array_equal(c.read(c.get(sid)), newer)


def test_refuses_a_snapshot_of_another_model_and_other_principals(redis_server):
    a = replica(redis_server, "A")
    sid = a.create("alice").id
    a.flush()
    other_model = replica(redis_server, "B", model_sha="sha-B")
    with pytest.raises(ModelError, match="another model"):
        other_model.fetch(sid, "alice")
    assert not other_model.replication.backend.client.exists(
        other_model.replication.backend.lease(sid)
    )  # released
    b = replica(redis_server, "C")
    b.fetch(sid, "mallory")  # not hers: nothing is loaded, get says unknown
    with pytest.raises(KeyError, match="unknown"):
        b.get(sid, "mallory")


def test_ids_are_unique_across_replicas(redis_server):
    a, b = replica(redis_server, "A"), replica(redis_server, "B")
    a.create(session_id="chat-1")
    with pytest.raises(InvalidInput, match="already in use"):
        b.create(session_id="chat-1")
    assert len(b) == 0
    a.flush()
    with pytest.raises(InvalidInput, match="already in use"):  # the record exists
        b.create(session_id="chat-1")


def test_close_and_eviction_delete_the_keys(redis_server):
    now = [0.0]
    a = replica(redis_server, "A", ttl=10.0, clock=lambda: now[0])
    s1, s2 = a.create(), a.create()
    incarnations = {s.id: s.incarnation for s in (s1, s2)}
    s1, s2 = s1.id, s2.id
    assert a.replication.backend.exists(s1) and a.replication.backend.exists(s2)
    a.close(s1)
    assert not a.replication.backend.exists(s1)
    now[0] = 11.0
    assert a.evict_idle() == [s2]
    a.replication._delete_dropped()  # the background thread does this
    assert not a.replication.backend.exists(s2)
    # left: the snapshot key, the generation token and a tombstone per closed session
    # (incarnation), expiring after its TTL
    client = a.replication.backend.client
    tombs = {f"ssmstream:x:{sid}:{inc}".encode() for sid, inc in incarnations.items()}
    shared = {b"ssmstream:snapshot-key", b"ssmstream:generation"}
    assert set(client.keys("ssmstream:*")) == shared | tombs
    for key in tombs:
        assert 0 < client.pttl(key) <= 70_000


def test_fork_and_restore_are_written_at_once(redis_server):
    rng = np.random.default_rng(5)
    a, b = replica(redis_server, "A"), replica(redis_server, "B")
    sid = a.create().id
    x = step(a, sid, rng)
    child = a.fork(sid).id
    b.fetch(child)  # the fork let go of the child's lease: no wait
    assert b.replication.stats()["lease_waits"] == 0
    restored = a.restore(a.snapshot(sid)).id
    a.flush()
    for other in (child, restored):
        b.fetch(other)
        s = b.get(other)
        assert s.position == 1
        np.testing.assert_array_equal(b.read(s), x)


def test_a_fork_made_while_redis_was_down_lets_go_of_the_child_once_written_back(redis_server):
    """As a fork does when Redis is up: the child's write-back does not keep its lease (the
    proxy routes the child by its own id, maybe to another replica, which would wait the
    lease out); the parent's lease stays, and so does that of a child stepped here."""
    rng = np.random.default_rng(15)
    a = replica(redis_server, "A", lease_ttl=5.0)
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=0.3)
    backend = a.replication.backend
    sid = a.create().id
    x = step(a, sid, rng)
    a.replication._degrade(RuntimeError("test"))
    child, used = a.fork(sid).id, a.fork(sid).id
    y = step(a, used, rng)
    a.replication._try_recover()
    assert not a.replication.degraded
    assert not backend.client.exists(backend.lease(child))
    assert {backend.client.get(backend.lease(i)) for i in (sid, used)} == {b"A"}
    b.fetch(child)
    assert b.replication.stats()["lease_waits"] == 0  # (else SessionBusy after 0.3 s)
    s = b.get(child)
    assert s.position == 1
    np.testing.assert_array_equal(b.read(s), x)
    with pytest.raises(SessionBusy):
        b.fetch(used)
    assert a.get(used).position == 2
    np.testing.assert_array_equal(a.read(a.get(used)), y)


def test_a_fork_child_stepped_as_redis_returns_keeps_its_lease(redis_server):
    """A fork made while Redis was down whose row was being stepped when Redis came back:
    that step's commit writes it back, and it was stepped here, so its lease stays here (the
    write-back had let it go, and another replica could take over a session served here)."""
    rng = np.random.default_rng(16)
    a = replica(redis_server, "A", lease_ttl=5.0)
    backend = a.replication.backend
    sid = a.create().id
    step(a, sid, rng)
    a.replication._degrade(RuntimeError("test"))
    child = a.fork(sid)
    (lent,) = a.lend([child])  # the batcher steps the child's row ...
    a.replication._try_recover()  # ... as the outage ends: the child stays pending
    assert not a.replication.degraded
    a.slab.write(child.slot, rng.standard_normal(S).astype(np.float32))
    assert a.give_back([lent], 1) == [2]  # its step: the commit writes it back
    assert backend.client.get(backend.lease(child.id)) == b"A" and a.held(child.id)


def test_redis_down_keeps_serving_memory_then_recovers(redis_server, caplog):
    rng = np.random.default_rng(6)
    a = replica(redis_server, "A", lease_ttl=0.3)
    a.replication.start()
    try:
        sid = a.create().id
        step(a, sid, rng)
        redis_server.stop()
        states = [step(a, sid, rng) for _ in range(3)]  # served from memory
        assert a.replication.degraded
        with caplog.at_level("DEBUG", logger="ssmstream.runtime.replication"):
            for _ in range(5):  # the background thread's tries, every period
                a.replication._try_recover()
        tries = [r for r in caplog.records if "write-back failed" in r.getMessage()]
        assert len(tries) >= 5 and [r.levelname for r in tries].count("WARNING") <= 1
        assert a.replication.stats()["up"] is False
        fresh = a.create().id  # new sessions still work (locally)
        with pytest.raises(Unavailable, match="state store"):
            a.fetch("never-seen-here")
        assert a.get(sid).position == 4
        assert a.flush() == 2  # a shutdown now would lose sid's last steps and `fresh`
        redis_server.start()  # back, and empty (no persistence)
        deadline = time.monotonic() + 5
        while a.replication.degraded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not a.replication.degraded
        b = replica(redis_server, "B")
        assert a.flush() == 0  # everything written
        b.fetch(sid)
        np.testing.assert_array_equal(b.read(b.get(sid)), states[-1])
        assert b.get(sid).position == 4
        b.fetch(fresh)
        assert b.get(fresh).position == 0
    finally:
        a.replication.stop()


@pytest.mark.parametrize("id_reused", [False, True], ids=["closed", "closed_and_id_reused"])
def test_a_close_between_the_local_commit_and_the_write_through_fails_nothing(
    redis_server, id_reused
):
    """Rows stepped in the slab are committed locally first, then written through. A session
    of the batch closed in between is simply not written (its step applied); the others are
    written with their own state and position, and no result turns into an error. With its
    id created again meanwhile, the closed session's bookkeeping leaves the new session's
    alone: not its version (its next write would be refused as stale, the session dropped as
    "moved"), not a count of the old step (the dirty-sessions gauge said 1)."""
    rng = np.random.default_rng(3)
    store = replica(redis_server, "A")
    r = store.replication
    a, b = store.create(), store.create()
    lent = store.lend([a, b])
    for s in lent:  # what a slot step does to the rows
        store.slab.write(s.slot, rng.standard_normal(S).astype(np.float32))
    want = store.slab.read(a.slot)
    real_due, closed, new = r._due, [], []

    def due(sid):  # runs after the local commit, before the writes
        if not closed:
            closed.append(sid)
            store.close(b.id)
            if id_reused:
                new.append(store.create(session_id=b.id))  # version 1 in Redis
        return real_due(sid)

    r._due = due
    results = store.give_back(lent, 1)
    assert results == [1, 1] and closed  # both steps applied; no error for a
    assert r._dirty.get(a.id) == 0 and r.backend.load(a.id)["version"] == 2
    position, state = store.unpack(r.backend.load(a.id)["snap"])
    assert position == 1
    np.testing.assert_array_equal(state, want)
    assert not any(x._lent for x in lent) and not b.live
    # nothing is left counted as unwritten for the closed session
    assert r._dirty.get(b.id, 0) == 0 and r.stats()["dirty"] == 0
    if id_reused:
        (fresh,) = new
        assert r.backend.load(b.id)["version"] == 1 and store.local(b.id) is fresh
        last = step(store, b.id, rng)  # its first step: written through, version 2
        rec = r.backend.load(b.id)
        assert (rec["version"], rec["incarnation"]) == (2, fresh.incarnation)
        np.testing.assert_array_equal(store.unpack(rec["snap"])[1], last)
        assert r.stats()["moved"] == 0 and store.local(b.id) is fresh
    assert store.flush() == 0  # a clean shutdown


def test_a_close_during_a_write_deletes_the_record_it_wrote(redis_server):
    """The write-behind thread writes a session; its Close lands while the reply is on the
    way. The delete waits for that write and compares against the version it wrote, so the
    record goes and a tombstone stays: another replica does not serve the closed session."""
    rng = np.random.default_rng(4)
    a = replica(redis_server, "A", persist_every="50ms", lease_ttl=0.3)
    b = replica(redis_server, "B", lease_ttl=0.3)
    s = a.create("alice")
    sid = s.id
    step(a, sid, rng, "alice")
    backend = a.replication.backend
    real_put = backend.write_many

    def write_many(*args):  # the Close arrives while this write's reply is on its way
        out = real_put(*args)
        closer = threading.Thread(target=a.close, args=(sid, "alice"))
        closer.start()
        closer.join(0.2)
        return out

    backend.write_many = write_many
    writer = threading.Thread(target=a.replication._write_dirty)
    writer.start()
    writer.join(10)
    backend.write_many = real_put
    deadline = time.monotonic() + 5
    while backend.load(sid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.load(sid) is None and backend.gone(sid, s.incarnation) == "closed"
    time.sleep(0.4)  # A's lease, were it still held, would have lapsed
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_an_idle_session_with_unwritten_steps_is_written_before_its_lease_lapses(redis_server):
    """--persist-every 4: two acknowledged steps exist only on A when the client goes
    quiet. A writes them before letting the lease go, so B continues from position 2, and
    A, when the client comes back, continues from B's steps."""
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=0.3)
    b = replica(redis_server, "B", persist_every="4", lease_ttl=0.3)
    a.replication.start()
    b.replication.start()
    try:
        sid = a.create().id
        step(a, sid, rng)
        want = step(a, sid, rng)
        time.sleep(1.0)  # idle for three lease periods
        b.fetch(sid)
        sb = b.get(sid)
        assert sb.position == 2
        np.testing.assert_array_equal(b.read(sb), want)
        for _ in range(3):
            want = step(b, sid, rng)
        time.sleep(1.0)
        a.fetch(sid)
        sa = a.get(sid)
        assert sa.position == 5
        np.testing.assert_array_equal(a.read(sa), want)
    finally:
        a.replication.stop()
        b.replication.stop()


def test_a_fetch_that_waited_out_a_close_does_not_serve_the_old_copy(redis_server):
    """A's copy moved to B; A's fetch waits for B's lease, and B closes the session
    meanwhile: A drops its old copy (NOT_FOUND closed) instead of serving it."""
    rng = np.random.default_rng(9)
    a = replica(redis_server, "A", lease_ttl=0.3)
    b = replica(redis_server, "B", lease_ttl=5.0)
    sid = a.create("p").id
    step(a, sid, rng, "p")
    a.flush()  # A lets the session go (its copy stays local)
    b.fetch(sid, "p")
    b.get(sid, "p")  # B holds the lease now
    closer = threading.Timer(0.3, b.close, args=(sid, "p"))
    closer.start()
    a.fetch(sid, "p")  # waits for B's lease; B closes the session meanwhile
    closer.join()
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "p")
    assert e.value.reason == "closed"


def test_a_fetch_waiting_through_the_shutdown_flush_takes_no_lease(redis_server):
    """B's fetch waits for A's lease while B shuts down (flush(final=True)); A lets go
    after that: B's fetch answers UNAVAILABLE instead of taking a lease that nobody would
    release (the next replica would have waited it out), and a shut-down B fetches nothing."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=3.0)
    sid, other = a.create("p").id, a.create("p").id
    backend = a.replication.backend
    outcome: list[BaseException | None] = []

    def fetch():
        try:
            b.fetch(sid, "p")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    waiter = threading.Thread(target=fetch)
    waiter.start()
    time.sleep(0.3)  # B's fetch is waiting for A's lease
    assert b.flush(final=True) == 0
    a.flush()  # A lets go: the waiting fetch may try again now
    waiter.join(5)
    assert isinstance(outcome[0], Unavailable) and "shutting down" in str(outcome[0])
    assert not backend.client.exists(backend.lease(sid)) and b.local(sid) is None
    with pytest.raises(Unavailable, match="shutting down"):
        b.fetch(other, "p")
    assert not backend.client.exists(backend.lease(other))
    a.fetch(sid, "p")  # a plain flush only lets go: A takes its session back
    assert a.held(sid, "p")


def test_recovering_from_an_outage_does_not_bring_back_what_ended_elsewhere(redis_server):
    """Only A saw Redis fail (degraded); meanwhile the client moved the session to B and
    closed it there, or closed it and made a new session with the same id. When Redis
    answers A again, A drops its old copy: it neither brings the closed session back nor
    overwrites the new one's record."""
    rng = np.random.default_rng(10)
    for recreate in (False, True):
        a = replica(redis_server, f"A{recreate}", lease_ttl=0.3)
        b = replica(redis_server, f"B{recreate}", lease_ttl=0.3)
        sid = a.create("alice", f"conv-{recreate}").id
        step(a, sid, rng, "alice")
        a.replication._degrade(TimeoutError("a socket timeout (test)"))
        time.sleep(0.6)  # A's lease lapses: no renewals while degraded
        b.fetch(sid, "alice")
        b.close(sid, "alice")
        if recreate:
            new = b.create("alice", sid)
            b.flush()  # written, B's lease released
        a.replication._try_recover()
        rec = a.replication.backend.load(sid)
        if recreate:
            assert rec["incarnation"] == new.incarnation  # not overwritten by A's old copy
            assert a.local(sid) is None
            a.fetch(sid, "alice")  # A serves the new session now, from its record
            assert a.get(sid, "alice").incarnation == new.incarnation
        else:
            assert rec is None  # stays closed
            with pytest.raises(SessionNotFound) as e:
                a.get(sid, "alice")
            assert e.value.reason == "closed"


def test_readers_of_stepping_rows_do_not_wait_on_the_state_store(redis_server):
    """The rows of a replicated step are returned before its write-through: a snapshot of a
    session just stepped does not wait while the state store's lock is held elsewhere."""
    store = replica(redis_server, "A")
    s = store.create()
    lent = store.lend([s])
    done = threading.Event()

    def hold_io():
        with store.replication._io:
            done.wait(60)

    holder = threading.Thread(target=hold_io)
    holder.start()
    try:
        giver = threading.Thread(target=store.give_back, args=(lent, 1))
        giver.start()
        snap = store.snapshot(s.id)  # waits only for the local commit
        io_still_held = holder.is_alive()  # it lets go only when told (or after 60 s)
    finally:
        done.set()
        holder.join(5)
        giver.join(5)
    assert io_still_held and store.unpack(snap)[0] == 1


def test_a_rewind_is_written_at_once_whatever_persist_every_says(redis_server):
    """A rewound session's record is the rewound state: a replica that takes it over
    continues from there, not from the state before the rewind."""
    rng = np.random.default_rng(5)
    a, b = replica(redis_server, "A", persist_every="16"), replica(redis_server, "B")
    sid = a.create().id
    states = [step(a, sid, rng) for _ in range(3)]
    a.rewind(a.get(sid), states[0], 1)
    a.replication.stop()  # A is gone (its lease expires); B takes over
    b.fetch(sid)
    s = b.get(sid)
    assert s.position == 1
    np.testing.assert_array_equal(b.read(s), states[0])


def test_dirty_counts_only_sessions_with_unwritten_steps(redis_server):
    rng = np.random.default_rng(6)
    through, behind = replica(redis_server, "A"), replica(redis_server, "B", persist_every="4")
    for store in (through, behind):
        for sid in [store.create().id for _ in range(3)]:
            step(store, sid, rng)
    assert through.replication.stats()["dirty"] == 0  # every step written through
    assert behind.replication.stats()["dirty"] == 3  # one step each, none due yet


def test_a_ttl_past_what_redis_expires_is_stored_without_expiry(redis_server):
    """A TTL too large for Redis's millisecond expiry (it had failed the write after the
    record was set, and the replica then dropped its own session as moved)."""
    rng = np.random.default_rng(7)
    a, b = replica(redis_server, "A", ttl=1e16), replica(redis_server, "B")
    sid = a.create().id
    last = [step(a, sid, rng) for _ in range(3)][-1]
    assert not a.replication.degraded and a.replication.counts["moved"] == 0
    a.replication.stop()
    b.fetch(sid)
    s = b.get(sid)
    assert s.position == 3
    np.testing.assert_array_equal(b.read(s), last)


def test_a_refused_create_leaves_the_lease_of_the_session_using_the_id(redis_server):
    """CreateSession with an id in use (on this replica or another) is refused and changes
    nothing in Redis: the replica serving that session keeps its lease and its next write
    succeeds (a refused create had deleted that lease)."""
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", persist_every="2", lease_ttl=5.0)
    b = replica(redis_server, "B")
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    lease = a.replication.backend.client.get(a.replication.backend.lease(sid))
    for store in (a, b):
        with pytest.raises(InvalidInput, match="already in use"):
            store.create("mallory", sid)
    assert a.replication.backend.client.get(a.replication.backend.lease(sid)) == lease
    last = step(a, sid, rng, "alice")  # due (2nd step): written, not "moved"
    assert a.replication.counts["moved"] == 0
    rec = a.replication.backend.load(sid)
    assert rec["principal"] == "alice" and rec["version"] == 2
    assert not b.held(sid)
    assert a.flush() == 0  # A lets go (its lease no longer lapses within the test)
    b.fetch(sid, "alice")
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), last)


def test_a_session_closed_on_another_replica_never_comes_back(redis_server):
    """Replica A keeps an old copy of a session that moved to B and was closed there: A's
    next fetch of it finds the tombstone of that incarnation and forgets its copy (NOT_FOUND
    closed), instead of republishing it as if Redis had lost the key."""
    rng = np.random.default_rng(9)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    time.sleep(0.3)  # A's lease lapses (the session is idle there)
    b.fetch(sid, "alice")
    step(b, sid, rng, "alice")
    b.close(sid, "alice")
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound, match="closed"):
        a.get(sid, "alice")
    assert not a.replication.backend.exists(sid)


def test_an_old_copy_is_not_served_once_its_id_is_another_session(redis_server):
    """The same, with the id taken since by another principal's new session: A drops its
    old copy instead of serving it to its former owner, and leaves the new session alone."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create("alice", session_id="chat-1").id
    time.sleep(0.3)
    b.fetch(sid, "alice")
    b.close(sid, "alice")
    new = b.create("mallory", session_id="chat-1")
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        a.get(sid, "alice")
    rec = b.replication.backend.load(sid)
    assert rec["principal"] == "mallory" and rec["incarnation"] == new.incarnation
    assert b.get(sid, "mallory") is new


def test_an_old_copy_of_a_session_evicted_elsewhere_says_evicted(redis_server):
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=10.0)  # the record carries the TTL
    b = replica(redis_server, "B", lease_ttl=0.2, ttl=10.0, clock=lambda: now[0])
    sid = a.create("alice").id
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid, "alice")
    now[0] += 11.0  # idle on B past its TTL
    assert b.evict_idle() == [sid]
    b.replication._delete_dropped()  # the background thread does this
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound, match="evicted"):
        a.get(sid, "alice")
    assert not a.replication.backend.exists(sid)


def wait_recovered(store: SessionStore, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while store.replication.degraded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not store.replication.degraded


def test_a_redis_that_restarts_empty_between_two_writes_loses_no_session(redis_server):
    """Redis restarts without its data while no call is in flight: the client reconnects
    quietly, so no outage is seen. The next write finds Redis's marker of this generation
    gone and recovers (re-lease, write back) instead of reading the missing lease as "moved"
    and dropping what is then the only copy."""
    rng = np.random.default_rng(11)
    a = replica(redis_server, "A", lease_ttl=0.3)
    a.replication.start()
    try:
        sid = a.create("alice").id
        step(a, sid, rng, "alice")
        redis_server.stop()
        redis_server.start()  # empty
        x = step(a, sid, rng, "alice")  # acknowledged; not dropped
        assert a.get(sid, "alice").position == 2
        wait_recovered(a)
        b = replica(redis_server, "B")
        b.fetch(sid, "alice")
        np.testing.assert_array_equal(b.read(b.get(sid, "alice")), x)
        assert b.get(sid, "alice").position == 2
    finally:
        a.replication.stop()


def test_after_an_empty_restart_replicas_old_and_new_share_one_snapshot_key(redis_server):
    """A replica started after Redis came back empty proposes the first snapshot key and
    generation; an older replica notices (its background check) and signs with that key,
    so its sessions load on the new replica."""
    rng = np.random.default_rng(12)
    a = replica(redis_server, "A", lease_ttl=0.3)
    a.replication.start()
    try:
        sid = a.create().id
        x = step(a, sid, rng)
        redis_server.stop()
        redis_server.start()
        c = replica(redis_server, "C")
        deadline = time.monotonic() + 5
        while not c.replication.backend.exists(sid) and time.monotonic() < deadline:
            time.sleep(0.02)  # A notices the new generation and writes its sessions back
        c.fetch(sid)
        np.testing.assert_array_equal(c.read(c.get(sid)), x)
        assert a.snapshot_key.secret == c.snapshot_key.secret
    finally:
        a.replication.stop()


def test_an_old_copy_stays_closed_when_its_id_was_reused_and_closed_again(redis_server):
    """Tombstones are per incarnation: closing a second session of the same id does not
    erase the record that the first one was closed."""
    rng = np.random.default_rng(13)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create("alice", session_id="chat-1").id
    step(a, sid, rng, "alice")
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid, "alice")
    b.close(sid, "alice")
    b.create("alice", session_id="chat-1")
    b.close(sid, "alice")
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound, match="closed"):
        a.get(sid, "alice")
    assert not a.replication.backend.exists(sid)


def test_evicting_a_stale_copy_leaves_the_record_of_the_replica_that_took_over(redis_server):
    """A copy that another replica took over (and only read, so it wrote nothing) reaches
    its idle TTL here: its delete must not remove the record the new holder builds on."""
    now = [0.0]
    rng = np.random.default_rng(14)
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=10.0, clock=lambda: now[0])
    b = replica(redis_server, "B", lease_ttl=0.2, ttl=10.0)
    sid = a.create("alice").id
    x = step(a, sid, rng, "alice")
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid, "alice")  # B takes over and only reads
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), x)
    time.sleep(0.3)  # B's lease lapses too (idle)
    now[0] += 11.0  # A's stale copy reaches its idle TTL
    assert a.evict_idle() == [sid]
    a.replication._delete_dropped()
    assert b.replication.backend.exists(sid)
    b.fetch(sid, "alice")
    y = step(b, sid, rng, "alice")
    assert b.get(sid, "alice").position == 2
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), y)


def test_a_session_back_on_a_replica_it_left_is_not_evicted_by_its_old_idle_timer(redis_server):
    """A session moves to B and is used there, while A's old copy sits idle past its TTL;
    then it comes back to A. The take-over brings A's copy up to date and must count as a
    use: A had evicted it on the get right after (NOT_FOUND evicted for a session in use)
    and, holding the lease by then, deleted the record B had built."""
    now = [0.0]
    rng = np.random.default_rng(21)
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=10.0, clock=lambda: now[0])
    b = replica(redis_server, "B", lease_ttl=0.2, ttl=10.0)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    time.sleep(0.3)  # A's lease lapses; its copy stays
    b.fetch(sid, "alice")
    y = step(b, sid, rng, "alice")  # in use on B ...
    now[0] += 11.0  # ... while A's copy sat idle longer than its TTL
    time.sleep(0.3)  # B's lease lapses
    a.fetch(sid, "alice")  # the session comes back to A
    s = a.get(sid, "alice")
    assert s.position == 2
    np.testing.assert_array_equal(a.read(s), y)
    a.replication._delete_dropped()
    assert a.replication.backend.exists(sid)
    assert a.evict_idle() == []  # its idle time counts from the take-over


def moved(redis_server, rng, names=("A", "B")):
    """The first replica creates and steps a session, the second takes it over and steps it
    (the first keeps a stale copy). Returns (first, second, the session's id, its state)."""
    a = replica(redis_server, names[0], lease_ttl=0.2)
    b = replica(redis_server, names[1], lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)  # the first's lease lapses; its copy stays
    b.fetch(sid)
    return a, b, sid, step(b, sid, rng)


def moved_then_emptied(redis_server, rng, busy: bool = False):
    """`moved`, then Redis restarts empty. Returns (a, b, the session's id, B's state, A's
    other session's id when `busy`)."""
    a, b, sid, newest = moved(redis_server, rng)
    other = a.create().id if busy else None
    redis_server.stop()
    redis_server.start()  # empty
    return a, b, sid, newest, other


@pytest.mark.parametrize("first", ["stale", "newest"])
def test_after_redis_lost_its_data_the_newest_copy_is_written_back(redis_server, first):
    """Two replicas hold copies of one session (B took it over from A, so A's is stale) when
    Redis restarts empty. Whichever writes back first, the record ends as B's copy: a
    take-over raised the term, and a write-back never replaces a later term."""
    rng = np.random.default_rng(15)
    a, b, sid, newer, _ = moved_then_emptied(redis_server, rng)
    order = (a, b) if first == "stale" else (b, a)
    for r in order:
        r.replication._try_recover()  # the background thread's write-back, in this order
    c = replica(redis_server, "C")
    c.fetch(sid)
    np.testing.assert_array_equal(c.read(c.get(sid)), newer)
    assert c.get(sid).position == 2
    with pytest.raises((Unavailable, SessionNotFound)):
        step(a, sid, rng)  # A's copy is stale: dropped now, or at the write-back
    assert sid not in {s.id for s in a.sessions()}


@pytest.mark.parametrize("step_applies", [True, False])
def test_a_session_being_stepped_is_written_back_when_its_row_returns(redis_server, step_applies):
    """The write-back does not wait for a row a step holds (no waiting on the batcher while
    holding the replication's lock), nor does the store stay degraded for it: the session
    stays pending, served from memory, and is written back by its step's commit, or (a
    step that failed) by the next background period."""
    rng = np.random.default_rng(16)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    x = step(a, sid, rng)
    redis_server.stop()
    redis_server.start()
    a.replication._degrade(RuntimeError("test"))
    (s,) = a.lend([a.get(sid)])
    a.replication._try_recover()
    assert not a.replication.degraded and not a.replication.backend.exists(sid)
    assert a.held(sid) and a.replication.stats()["dirty"] == 1
    a.give_back([s], 1 if step_applies else 0)
    if not step_applies:
        assert not a.replication.backend.exists(sid)
        a.replication._write_pending()  # the background thread does this
    assert a.replication.stats()["dirty"] == 0
    b = replica(redis_server, "B")
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), x)
    assert b.get(sid).position == (2 if step_applies else 1)


def test_a_shutdown_after_an_unseen_empty_restart_writes_everything_back(redis_server):
    rng = np.random.default_rng(17)
    a = replica(redis_server, "A", persist_every="8")  # steps not written yet
    sid = a.create().id
    x = [step(a, sid, rng) for _ in range(3)][-1]
    redis_server.stop()
    redis_server.start()  # empty; A's background thread is not running: nothing noticed
    assert a.flush() == 0
    b = replica(redis_server, "B")
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), x)
    assert b.get(sid).position == 3


def test_a_stale_copy_written_back_first_and_stepped_still_loses(redis_server):
    """Terms go up only at a take-over: a stale copy that wrote itself back first and was
    stepped since has a lower term than the copy of the replica that took the session over,
    however many versions it wrote."""
    rng = np.random.default_rng(31)
    a, b, sid, newest, _ = moved_then_emptied(redis_server, rng)
    _long_lease(a)  # (the lease its write-back takes is held() for 0.1 s of 0.2 s only)
    a.replication._try_recover()  # A writes back first and takes the lease
    assert not a.replication.degraded and a.held(sid)
    step(a, sid, rng)  # a request routed back to A
    step(a, sid, rng)
    b.replication._try_recover()
    c = replica(redis_server, "C")
    c.fetch(sid)
    np.testing.assert_array_equal(c.read(c.get(sid)), newest)
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)  # A's lease was taken by B's write-back


def test_repeated_write_backs_of_a_stale_copy_do_not_make_it_win(redis_server):
    """A replica that writes back every period (a session of its own stays pending) does
    not raise its stale copy of another session above the newest copy."""
    rng = np.random.default_rng(41)
    a, b, sid, newest, busy = moved_then_emptied(redis_server, rng, busy=True)
    (lent,) = a.lend([a.get(busy)])
    for _ in range(3):
        a.replication._try_recover()
    a.give_back([lent], 0)
    b.replication._try_recover()
    c = replica(redis_server, "C")
    c.fetch(sid)
    np.testing.assert_array_equal(c.read(c.get(sid)), newest)


def test_a_write_back_whose_reply_was_lost_keeps_our_copy(redis_server):
    """Redis applied a write-back but the reply timed out: the next try finds a record of our
    own term and writes again, instead of taking it for a newer copy and dropping ours."""
    rng = np.random.default_rng(71)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._degrade(redis.ConnectionError("outage"))
    step(a, sid, rng)  # served from memory
    with replies_lost(a):
        a.replication._try_recover()
    assert a.replication.degraded
    last = step(a, sid, rng)
    a.replication._try_recover()
    assert not a.replication.degraded and a.get(sid).position == 3
    b = replica(redis_server, "B")
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), last)


def test_write_back_completes_while_a_session_streams(redis_server):
    """A session stepped back to back (its row lent most of the time) does not keep the
    store degraded: it is written back by one of its commits."""
    rng = np.random.default_rng(51)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    step(a, sid, rng)
    a.replication.start()
    stop = threading.Event()

    def batcher():  # the worker thread: lend, run the step (20 ms), give back, repeat
        while not stop.is_set():
            rows = a.lend([a.get(sid)])
            time.sleep(0.02)
            a.give_back(rows, 1)

    t = threading.Thread(target=batcher)
    t.start()
    try:
        time.sleep(0.2)
        errors = a.replication.stats()["errors"]
        redis_server.stop()
        redis_server.start()  # empty: the store meets the outage or the empty restart
        # it counts that as an error and turns degraded until its write-back; the degraded
        # spell can be one 0.1 s period, which a poll of the flag misses on a loaded machine
        deadline = time.monotonic() + 30
        while a.replication.stats()["errors"] == errors or a.replication.degraded:
            assert time.monotonic() < deadline, ("still degraded", a.replication.stats())
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while not a.replication.backend.exists(sid):
            assert time.monotonic() < deadline, "the streaming session was never written back"
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
        a.replication.stop()


def test_a_shutdown_after_an_unseen_empty_restart_with_every_step_written(redis_server):
    rng = np.random.default_rng(1)
    a = replica(redis_server, "A", persist_every="1")  # nothing dirty: no write would notice
    sid = a.create().id
    x = step(a, sid, rng)
    redis_server.stop()
    redis_server.start()
    assert a.flush() == 0
    b = replica(redis_server, "B")
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), x)


def test_a_fetch_before_the_new_generation_is_noticed_asks_to_retry(redis_server):
    """B has not noticed the empty restart yet (the others signed with a new key since): its
    take-over meets the new generation and answers UNAVAILABLE (retry), not a signature
    error on a request that carried no snapshot; B's next try loads the session."""
    rng = np.random.default_rng(61)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    x = step(a, sid, rng)
    redis_server.stop()
    redis_server.start()
    c = replica(redis_server, "C")  # a new replica: its key and generation are first
    a.replication._degrade(RuntimeError("A's background check"))
    a.replication._try_recover()
    assert a.snapshot_key.secret == c.snapshot_key.secret != b.snapshot_key.secret
    time.sleep(0.3)  # A idle: its lease lapses; the client is routed to B
    with pytest.raises(Unavailable, match="retry"):
        b.fetch(sid)
    b.replication._try_recover()  # B's background thread
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), x)


@pytest.mark.parametrize("first", ["stale", "newest"])
def test_the_newest_copy_survives_a_fetch_before_the_restart_is_noticed(redis_server, first):
    """A request for a session A holds (idle: its lease lapsed) arrives after Redis came back
    empty, before anyone noticed: A's copy, the newest (A took it over from B), still wins
    the write-backs, whichever comes first."""
    rng = np.random.default_rng(21)
    b, a, sid, newest = moved(redis_server, rng, ("B", "A"))  # B keeps a stale copy
    time.sleep(0.3)  # A idle: its lease lapses
    redis_server.stop()
    redis_server.start()
    with pytest.raises(Unavailable, match="retry"):
        a.fetch(sid)  # its write-back meets the new generation
    for r in (b, a) if first == "stale" else (a, b):
        r.replication._try_recover()
    c = replica(redis_server, "C")
    c.fetch(sid)
    assert c.get(sid).position == 2
    np.testing.assert_array_equal(c.read(c.get(sid)), newest)


def test_a_shutdown_whose_write_back_fails_reports_instead_of_raising(redis_server):
    rng = np.random.default_rng(91)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._degrade(redis.ConnectionError("outage"))

    def timeout(*args):
        raise redis.TimeoutError("Timeout reading from socket")

    a.replication.backend.write_many = timeout
    assert a.flush() == 1  # the session's state is not in Redis: said, not raised
    assert sid in {s.id for s in a.sessions()}


def test_a_take_over_that_fails_to_load_leaves_the_term_as_it_was(redis_server):
    """A replica of another model is asked for a session (a rolling model update) and refuses
    it: the take-over is undone, so the holder's copy (with steps served from memory during
    an outage) still wins its write-back."""
    rng = np.random.default_rng(1)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    outage(a)
    last = step(a, sid, rng)  # acknowledged while degraded: only A has it
    time.sleep(0.3)  # A's lease lapses
    other = replica(redis_server, "B", model_sha="sha-B")
    with pytest.raises(ModelError):
        other.fetch(sid)
    assert other.replication.backend.load(sid)["term"] == 0
    a.replication._try_recover()
    c = replica(redis_server, "C")
    c.fetch(sid)
    assert c.get(sid).position == 2
    np.testing.assert_array_equal(c.read(c.get(sid)), last)


def test_an_eviction_after_a_failed_take_over_elsewhere_deletes_the_record(redis_server):
    now = [0.0]
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=10.0, clock=lambda: now[0])
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    time.sleep(0.3)
    other = replica(redis_server, "X", model_sha="sha-B")
    with pytest.raises(ModelError):
        other.fetch(sid, "alice")
    now[0] += 11.0
    assert a.evict_idle() == [sid]
    a.replication._delete_dropped()
    assert not a.replication.backend.exists(sid)
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_an_id_closed_twice_while_degraded_leaves_both_tombstones(redis_server):
    rng = np.random.default_rng(3)
    a = replica(redis_server, "A", lease_ttl=0.2)
    first = a.create("alice", "chat-1")
    step(a, "chat-1", rng, "alice")
    outage(a)
    a.close("chat-1", "alice")
    second = a.create("alice", "chat-1")
    a.close("chat-1", "alice")
    a.replication._try_recover()
    a.replication._delete_dropped()
    backend = a.replication.backend
    assert not backend.exists("chat-1")
    assert backend.gone("chat-1", first.incarnation) == "closed"
    assert backend.gone("chat-1", second.incarnation) == "closed"
    time.sleep(0.3)
    b = replica(redis_server, "B")
    b.fetch("chat-1", "alice")
    with pytest.raises(SessionNotFound):
        b.get("chat-1", "alice")


def test_an_id_closed_and_created_again_while_degraded_keeps_the_new_session(redis_server):
    """The old incarnation's delete runs before the write-backs: the new session does not
    meet the old record and is written back."""
    rng = np.random.default_rng(4)
    a = replica(redis_server, "A", lease_ttl=0.2)
    a.create("alice", "chat-1")
    step(a, "chat-1", rng, "alice")
    outage(a)
    a.close("chat-1", "alice")
    new = a.create("alice", "chat-1")
    x = step(a, "chat-1", rng, "alice")
    a.replication._try_recover()
    s = a.get("chat-1", "alice")
    assert s.incarnation == new.incarnation
    np.testing.assert_array_equal(a.read(s), x)
    rec = a.replication.backend.load("chat-1")
    assert rec is not None and rec["incarnation"] == new.incarnation


def test_a_delete_that_fails_is_retried(redis_server):
    rng = np.random.default_rng(7)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    backend = a.replication.backend
    real = backend.drop_many

    def timeout(*args, **kw):
        raise redis.TimeoutError("Timeout reading from socket")

    backend.drop_many = timeout
    a.close(sid, "alice")  # acknowledged; its delete failed: degraded
    backend.drop_many = real
    assert a.replication.degraded
    a.replication._try_recover()  # deletes first
    assert not backend.exists(sid)
    time.sleep(0.3)
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_a_used_session_keeps_its_record_and_one_that_expired_is_written_back(redis_server):
    """The lease renewal of a used session renews its record's expiry too; and a record that
    vanished anyway (Redis evicted it) makes the holder's next write a write-back, not a
    "moved" that would drop the only copy."""
    rng = np.random.default_rng(5)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=5.0, ttl=30.0)
    sid = a.create().id
    step(a, sid, rng)
    backend = a.replication.backend
    backend.client.pexpire(backend.key(sid), 1000)
    a.replication._renew_used()
    assert backend.client.pttl(backend.key(sid)) > 60_000  # TTL + 60 s again
    backend.client.delete(backend.key(sid))  # gone anyway
    xs = [step(a, sid, rng) for _ in range(3)]  # the 4th step is due: written
    assert a.get(sid).position == 4
    position, state = a.unpack(backend.load(sid)["snap"])
    assert position == 4
    np.testing.assert_array_equal(state, xs[-1])


def test_a_stale_copy_does_not_take_the_lease_of_the_replica_serving_the_session(redis_server):
    """B took the session over from A and serves it; its record vanished (Redis evicted it).
    A request reaching A (its old copy's lease lapsed) does not write A's copy back over B:
    B holds the lease, so A drops its stale copy."""
    rng = np.random.default_rng(10)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=0.2)
    b = replica(redis_server, "B", persist_every="4", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)
    b.fetch(sid)
    newest = [step(b, sid, rng) for _ in range(2)][-1]
    backend = b.replication.backend
    backend.client.delete(backend.key(sid))
    a.fetch(sid)
    assert sid not in {s.id for s in a.sessions()} and b.held(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), newest)


def test_a_write_back_does_not_replace_a_take_over_made_since_in_the_same_term(redis_server):
    """After an empty restart, B writes back its stale copy (term 0) and C takes it over
    (term 1) and acknowledges a step; A, which took the session over before the restart
    (also term 1), writes back later: the record is of A's term but C's, so A's copy loses
    (its steps since its last write are lost: the documented cost of an empty restart)."""
    rng = np.random.default_rng(9)
    b, a, sid, _ = moved(redis_server, rng, ("B", "A"))
    time.sleep(0.3)
    redis_server.stop()
    redis_server.start()
    b.replication._degrade(RuntimeError("B's background check"))
    b.replication._try_recover()
    b.flush()
    c = replica(redis_server, "C", lease_ttl=5.0)
    c.fetch(sid)
    acked = step(c, sid, rng)
    a.replication._degrade(RuntimeError("A's background check"))
    a.replication._try_recover()
    assert not (a.held(sid) and c.held(sid))
    position, state = c.unpack(c.replication.backend.load(sid)["snap"])
    np.testing.assert_array_equal(state, acked)


def test_a_create_whose_claim_ran_degraded_survives_a_recovery_before_its_write(redis_server):
    a = replica(redis_server, "A", lease_ttl=0.2)
    r = a.replication
    outage(a)
    real_claim = r.claim

    def claim(sid):
        out = real_claim(sid)
        r._try_recover()  # the background thread, between the claim and the first write
        return out

    r.claim = claim
    s = a.create("alice")
    r.claim = real_claim
    assert s.live and a.get(s.id, "alice") is s
    assert r.backend.exists(s.id)


def test_a_session_restored_while_degraded_counts_as_unwritten(redis_server):
    rng = np.random.default_rng(6)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    snap = a.snapshot(sid)
    outage(a)
    restored = a.restore(snap)  # acknowledged: its state is only here
    assert a.replication.stats()["dirty"] == 1
    assert not a.replication.backend.exists(restored.id)
    assert a.flush() == 0  # Redis answers: the shutdown writes it back first
    assert a.replication.backend.exists(restored.id)


class RoundTrips:
    """Counts the Redis commands a client sends (a pipeline is one send: one round trip)."""

    def __init__(self, monkeypatch):
        import redis.connection

        self.sends: list[bytes] = []
        cls = redis.connection.AbstractConnection
        send = cls.send_packed_command

        def counted(conn, command, check_health=True):
            parts = [command] if isinstance(command, (bytes, str)) else command
            self.sends.append(b"".join(bytes(p, "utf-8") if isinstance(p, str) else bytes(p)
                                       for p in parts))  # fmt: skip
            return send(conn, command, check_health)

        monkeypatch.setattr(cls, "send_packed_command", counted)

    def __len__(self) -> int:
        return len(self.sends)


def test_taking_back_the_lease_of_a_session_held_last_is_one_round_trip(redis_server, monkeypatch):
    """A session idle a little longer than the lease (a user reading the reply) needs its
    lease back: one script, which sends no snapshot when our copy is the record's."""
    rng = np.random.default_rng(0)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    x = step(a, sid, rng)
    time.sleep(0.4)
    a.fetch(sid)  # loads the script once
    time.sleep(0.4)
    assert not a.held(sid)
    _long_lease(a)  # (the lease it takes back is held() for 0.15 s of 0.3 s only)
    trips = RoundTrips(monkeypatch)
    a.fetch(sid)
    assert a.held(sid) and len(trips) == 1
    assert a.replication.counts["relocks"] == 2 and a.replication.counts["loads"] == 0
    rec = a.replication.backend.load(sid)
    assert (rec["term"], rec["holder"]) == (0, "A")
    np.testing.assert_array_equal(a.read(a.get(sid)), x)


def test_a_close_deletes_its_own_keys_only(redis_server, monkeypatch):
    """Evictions queue their deletes for the background thread; a close (on the event loop)
    deletes its own keys in one round trip, not the queue one by one."""
    now = [0.0]
    a = replica(redis_server, "A", ttl=10.0, clock=lambda: now[0])
    idle = [a.create().id for _ in range(20)]
    now[0] = 11.0
    keep, warm = a.create().id, a.create().id
    a.close(warm)  # loads the script once
    assert sorted(a.evict_idle()) == sorted(idle)
    trips = RoundTrips(monkeypatch)
    a.close(keep)
    assert len(trips) == 1 and not a.replication.backend.exists(keep)
    assert all(a.replication.backend.exists(i) for i in idle)
    before = len(trips)
    a.replication._delete_dropped()  # the background thread: all of them, one round trip
    assert len(trips) == before + 1
    assert not any(a.replication.backend.exists(i) for i in idle)


def test_a_refused_write_is_not_counted_as_a_write(redis_server):
    rng = np.random.default_rng(5)
    a, _, sid, _ = moved(redis_server, rng)  # B took it over: A's next write is refused
    writes = a.replication.counts["writes"]
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)
    assert a.replication.counts["writes"] == writes


def test_a_create_refused_while_redis_went_down_raises_its_own_error(redis_server, monkeypatch):
    a = replica(redis_server, "A", capacity=1)
    a.create()
    r = a.replication
    claim = r.claim

    def claim_then_outage(session_id):
        sid = claim(session_id)
        redis_server.stop()
        return sid

    monkeypatch.setattr(r, "claim", claim_then_outage)
    try:
        with pytest.raises(LimitExceeded):
            a.create()
        assert r.degraded
    finally:
        redis_server.start()


def test_a_replicated_store_refuses_a_sessions_file(redis_server, tmp_path):
    """A sessions file's copies may be older than the ones other replicas serve now (their
    deletes at idle eviction would remove those replicas' records): refused, naming why."""
    a = replica(redis_server, "A")
    a.create()
    a.save(tmp_path)
    b = replica(redis_server, "B")
    with pytest.raises(InvalidInput, match="state_dir: a replicated store does not load"):
        b.load(tmp_path)
    assert len(b) == 0


def test_a_copy_of_a_later_term_wins_over_a_stale_copy_written_back_first(redis_server):
    """B took the session over (term 1) and stepped it; A keeps a stale copy (term 0). The
    record vanishes (Redis evicted it) while both are idle; A is asked first and writes its
    copy back; then B is asked: its copy, of the later term, is written back over A's."""
    rng = np.random.default_rng(1)
    a, b, sid, newest = moved(redis_server, rng)
    time.sleep(0.3)  # B idle: its lease lapses
    backend = a.replication.backend
    backend.client.delete(backend.key(sid))
    a.fetch(sid)
    b.fetch(sid)
    assert b.get(sid).position == 2
    np.testing.assert_array_equal(b.read(b.get(sid)), newest)
    rec = backend.load(sid)
    assert (rec["term"], rec["holder"]) == (1, "B")
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)  # B's write-back took A's lease


def test_a_close_after_an_unseen_empty_restart_wins_over_a_stale_write_back(redis_server):
    """B holds the newest copy; A a stale one. Redis restarts empty and A writes its copy
    back first; the client then closes the session on B, which has not noticed the restart:
    the close meets the new generation (B writes back, then deletes), and the delete wins over
    A's copy of a lower term, so no replica serves the closed session."""
    rng = np.random.default_rng(2)
    a, b, sid, _, _ = moved_then_emptied(redis_server, rng)
    a.replication._degrade(RuntimeError("A saw the new generation first"))
    a.replication._try_recover()
    assert a.replication.backend.exists(sid)
    b.close(sid)
    b.replication._try_recover()  # B's background thread
    backend = b.replication.backend
    assert not backend.exists(sid)
    c = replica(redis_server, "C", lease_ttl=0.2, lease_wait=1.0)
    c.fetch(sid)
    with pytest.raises(SessionNotFound):
        c.get(sid)
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)


def test_while_redis_is_down_an_id_held_here_is_answered_like_one_that_is_not(redis_server):
    """Another principal cannot tell that a (client-chosen) id is held on this replica."""
    a = replica(redis_server, "A")
    a.create("alice", session_id="chat-1")
    outage(a)
    with pytest.raises(Unavailable, match="not held by this replica"):
        a.fetch("chat-2", "eve")
    with pytest.raises(Unavailable, match="not held by this replica"):
        a.fetch("chat-1", "eve")
    a.fetch("chat-1", "alice")  # hers: served from memory


def test_a_queued_delete_of_an_old_incarnation_runs_before_the_id_is_claimed(
    redis_server, monkeypatch
):
    """An evicted incarnation's delete is queued for the background thread; a create of the
    same id runs it first, so a background delete cannot remove the new incarnation's lease
    between its claim and its first write."""
    now = [0.0]
    a = replica(redis_server, "A", ttl=10.0, clock=lambda: now[0])
    sid = a.create(session_id="chat-1").id
    r = a.replication
    r.backend.client.delete(r.backend.key(sid))  # Redis evicted the record
    now[0] = 11.0
    assert a.evict_idle() == [sid]
    claim = r.claim

    def claim_then_background(session_id):
        got = claim(session_id)
        r._delete_dropped()  # the background thread's period falls here
        return got

    monkeypatch.setattr(r, "claim", claim_then_background)
    s = a.create(session_id="chat-1")
    assert s.live and a.local("chat-1") is s and r.counts["moved"] == 0
    assert r.backend.exists("chat-1")


def _service(redis_server, engine, name: str):
    """A replica's SessionService (rewind window 16) on the toy model, over Redis."""
    from ssmstream.runtime.batcher import Batcher
    from ssmstream.runtime.service import ServiceLimits, SessionService

    replication = RedisReplication(
        url=redis_server.url, persist_every="1", lease_ttl=0.4, replica_id=name
    )
    store = SessionStore(engine.state_size, 8, replication=replication, model_sha="sha-A")
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0)
    return SessionService(engine, store, batcher, ServiceLimits(rewind_window=16))


def test_a_session_taken_over_keeps_a_rewind_history_from_there(redis_server, toy_token_model):
    """The service of the replica that takes a session over gives it a rewind history at
    the position it moved at: rewinds reach back to there, not before (they found none)."""
    import asyncio

    from ssmstream.runtime.engine import Engine
    from ssmstream.runtime.errors import OutOfRange

    engine = Engine(toy_token_model["model_dir"], device="cpu", threads=1)

    def service(name: str):
        return _service(redis_server, engine, name)

    def after(tokens) -> np.ndarray:
        _, s = engine.prefill(np.asarray(tokens, np.int64)[None], engine.new_state())
        return s[0]

    async def main():
        a, b = service("A"), service("B")
        await a.batcher.start()
        await b.batcher.start()
        s, _ = await a.create("p")
        await a.step("p", s.id, [1, 2, 3])
        a.store.flush()  # A lets go: B takes the session over at position 3
        await b.step("p", s.id, [4, 5])
        moved = b.store.get(s.id, "p")
        for position in (4, 3):
            await b.rewind("p", s.id, position)
            np.testing.assert_allclose(
                b.store.read(moved), after([1, 2, 3, 4][:position]), atol=1e-5
            )
        with pytest.raises(OutOfRange, match="position"):
            await b.rewind("p", s.id, 2)
        await a.batcher.close()
        await b.batcher.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_close_of_a_session_whose_record_is_unusable_closes_it(redis_server, toy_token_model):
    """CloseSession on the replica that finds a session's record unusable (its state went
    NaN where it was stepped) deletes the record: the answer is still DATA_LOSS (no final
    position to give), and the id is then free; the other sessions are untouched."""
    import asyncio

    from ssmstream.runtime.engine import Engine

    engine = Engine(toy_token_model["model_dir"], device="cpu", threads=1)

    async def main():
        a, b = _service(redis_server, engine, "A"), _service(redis_server, engine, "B")
        await b.batcher.start()
        bad, _ = await a.create("p")
        good, _ = await a.create("p")
        nan = np.full(engine.state_size, np.nan, np.float32)
        a.store.commit(a.store.get(bad.id, "p"), nan, 1)
        a.store.flush()  # A lets go of both
        closed = r"was unusable \(snapshot: .*\); it is closed, its state lost"
        with pytest.raises(CorruptState, match=closed):
            await b.close("p", bad.id)
        assert b.store.replication.backend.load(bad.id) is None
        with pytest.raises(SessionNotFound):
            await b.close("p", bad.id)
        again, _ = await b.create("p", bad.id)
        assert (again.id, again.position) == (bad.id, 0)
        assert (await b.close("p", good.id)).position == 0
        await b.batcher.close()

    asyncio.run(asyncio.wait_for(main(), 60))


URL = "redis://127.0.0.1:1/0"  # never connected to: the constructor does no I/O


@pytest.mark.parametrize("ttl", [0.05, 3600, 3600.0])
def test_lease_ttl_bounds_are_inclusive(ttl):
    assert RedisReplication(url=URL, lease_ttl=ttl).lease_ttl == float(ttl)


@pytest.mark.parametrize("ttl", [0.049, 3600.001, 0, -1, "3"])
def test_a_lease_ttl_out_of_range_names_the_field(ttl):
    with pytest.raises(InvalidInput) as e:
        RedisReplication(url=URL, lease_ttl=ttl)
    assert e.value.field == "lease_ttl"
    assert str(e.value) == f"lease_ttl: must be in [0.05, 3600] seconds, got {ttl!r}"


def test_lease_wait_defaults_to_one_second_past_the_lease():
    assert RedisReplication(url=URL, lease_ttl=0.4).lease_wait == pytest.approx(1.4)
    assert RedisReplication(url=URL, lease_ttl=0.4, lease_wait=0.0).lease_wait == 0.0


def test_a_replica_given_a_snapshot_key_signs_with_it_not_with_the_one_in_redis(redis_server):
    """--snapshot-key given to every replica: the key Redis keeps (proposed by a replica
    without one) must not replace it."""
    a = replica(redis_server, "A")  # proposes its generated key: Redis keeps it
    given = SnapshotKey(b"k" * 32)
    b = replica(redis_server, "B", snapshot_key=given)
    assert a.snapshot_key.secret != given.secret
    assert b.snapshot_key.secret == given.secret
    b.replication._share_key()  # as a recovery after an outage runs it
    assert b.snapshot_key.secret == given.secret


def test_a_failed_write_counts_one_error(redis_server):
    rng = np.random.default_rng(1)
    a = replica(redis_server, "A")
    sid = a.create().id
    assert a.replication.stats()["errors"] == 0
    redis_server.stop()
    step(a, sid, rng)  # served from memory; the write-through failed
    st = a.replication.stats()
    assert st["up"] is False and st["errors"] == 1 and st["dirty"] == 1


def test_a_session_taken_over_elsewhere_counts_as_moved(redis_server):
    rng = np.random.default_rng(2)
    a, b, sid, _ = moved(redis_server, rng)
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)
    assert a.replication.stats()["moved"] == 1
    assert b.replication.stats()["moved"] == 0 and b.replication.stats()["loads"] == 1


def test_a_fetch_that_waited_for_a_lease_counts_one_lease_wait(redis_server):
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=30.0)
    take, tried = b.replication.backend.take, threading.Event()

    def take_then_tell(*args):
        try:
            return take(*args)
        finally:
            tried.set()

    b.replication.backend.take = take_then_tell
    releaser = threading.Thread(target=lambda: tried.wait(30) and a.flush())
    releaser.start()  # A lets go once B's fetch met its lease: B waits
    try:
        b.fetch(sid)
    finally:
        tried.set()
        releaser.join(30)
        b.replication.backend.take = take
    assert b.held(sid)
    assert b.replication.stats()["lease_waits"] == 1
    c = replica(redis_server, "C", lease_ttl=5.0)
    sid2 = a.create().id
    a.flush()
    c.fetch(sid2)  # free at once: no wait
    assert c.replication.stats()["lease_waits"] == 0


def test_recovering_from_an_outage_after_an_eviction_elsewhere_says_evicted(redis_server):
    """Only A saw Redis fail; meanwhile the session moved to B and B evicted it (idle past its
    TTL). A's write-back finds the 'evicted' tombstone: A drops its copy and says evicted
    (not closed), as a fetch of such a copy does."""

    rng = np.random.default_rng(11)
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=0.3, ttl=10.0)
    b = replica(redis_server, "B", lease_ttl=0.3, ttl=10.0, clock=lambda: now[0])
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    a.replication._degrade(TimeoutError("a socket timeout (test)"))
    time.sleep(0.6)  # A's lease lapses: no renewals while degraded
    b.fetch(sid, "alice")
    now[0] += 11.0
    assert b.evict_idle() == [sid]
    b.replication._delete_dropped()
    a.replication._try_recover()
    assert not a.replication.degraded
    assert a.local(sid) is None and a.replication.backend.load(sid) is None
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "alice")
    assert e.value.reason == "evicted"


def test_a_create_is_two_round_trips_and_its_first_write_is_a_plain_write(
    redis_server, monkeypatch
):
    """The module's contract: create = claim + first write (a compare-and-set on version 0),
    not a write that finds "no record" and is then retried as a write-back."""
    a = replica(redis_server, "A")
    a.create()  # loads the scripts once
    trips = RoundTrips(monkeypatch)
    s = a.create()
    assert len(trips) == 2
    rec = a.replication.backend.load(s.id)
    assert (rec["version"], rec["term"], rec["holder"]) == (1, 0, "A")
    assert a.replication.counts["writes"] == 2


def test_a_create_whose_claim_lapsed_before_its_first_write_keeps_its_session(
    redis_server, monkeypatch
):
    """The first write of a new session takes its lease again where the claim's lapsed
    meanwhile and no one claimed the id since: here the create waits longer than the lease
    for a write of other sessions in flight (it holds _io) between its claim and its first
    write. The session is created, written and leased, not dropped as "moved"."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    r = a.replication
    claim = r.claim

    def claim_then_wait_for_a_write(session_id):
        got = claim(session_id)
        held = threading.Event()

        def write_in_flight():
            with r._io:
                held.set()
                time.sleep(0.35)  # a slow write-through of other sessions: the claim lapses

        threading.Thread(target=write_in_flight).start()
        held.wait()
        return got

    monkeypatch.setattr(r, "claim", claim_then_wait_for_a_write)
    s = a.create("alice")
    assert a.get(s.id, "alice") is s and r.counts["moved"] == 0
    rec = r.backend.load(s.id)
    assert (rec["version"], rec["term"], rec["holder"]) == (1, 0, "A")
    assert r.backend.client.get(r.backend.lease(s.id)) == b"A"


def test_a_create_whose_id_another_replica_claimed_after_its_claim_lapsed_is_refused(
    redis_server, monkeypatch
):
    """A's claim of "chat-1" lapses before its first write and B claims and creates
    "chat-1" meanwhile: A's first write is refused (B holds the lease), and A's create is
    refused as a claim of an id in use is, rather than returning a session A dropped."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    claim = a.replication.backend.claim

    def slow_claim(*args):
        got = claim(*args)
        time.sleep(0.3)  # A's claim lapses; B claims the id and writes its session
        b.create("bob", session_id="chat-1")
        return got

    monkeypatch.setattr(a.replication.backend, "claim", slow_claim)
    with pytest.raises(InvalidInput, match="already in use"):
        a.create("alice", session_id="chat-1")
    assert a.local("chat-1") is None
    rec = b.replication.backend.load("chat-1")
    assert (rec["principal"], rec["version"], rec["holder"]) == ("bob", 1, "B")
    assert b.get("chat-1", "bob").live


def test_a_stale_copy_of_the_same_version_but_an_older_term_cannot_overwrite(redis_server):
    """B took the session over (its term went up; the version did not: B has not stepped it)
    and let go. A's copy has the record's version but the older term: even holding the lease
    again, A's write is refused (the compare-and-set compares the term too) and the record
    stays B's."""
    rng = np.random.default_rng(12)
    a, b = replica(redis_server, "A", lease_ttl=0.2), replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)  # version 2, term 0
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid)  # term 1, version still 2
    b.flush()  # B lets go without a step
    backend = a.replication.backend
    before = backend.load(sid)
    assert (before["version"], before["term"], before["holder"]) == (2, 1, "B")
    assert backend.client.set(backend.lease(sid), "A", px=10_000, nx=True)
    a.replication._lease_until[sid] = time.monotonic() + 10
    with pytest.raises(Unavailable, match="newer version"):
        step(a, sid, rng)
    after = backend.load(sid)
    assert (after["version"], after["term"], after["holder"], after["snap"]) == (
        2, 1, "B", before["snap"])  # fmt: skip


def test_a_write_back_after_one_whose_reply_was_lost_still_raises_the_version(redis_server):
    """Versions only go up: a write-back that finds our own earlier write-back (applied, its
    reply lost) builds on that record's version, not on our copy's older one, so two
    different states never carry one version."""
    rng = np.random.default_rng(71)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    step(a, sid, rng)  # version 2
    a.replication._degrade(redis.ConnectionError("outage"))
    step(a, sid, rng)  # served from memory
    backend = a.replication.backend
    with replies_lost(a):
        a.replication._try_recover()  # applied: version 3
    first = backend.load(sid)
    assert first["version"] == 3
    step(a, sid, rng)
    a.replication._try_recover()
    second = backend.load(sid)
    assert not a.replication.degraded and second["snap"] != first["snap"]
    assert second["version"] == 4
    assert a.replication._version[sid] == 4


def test_a_write_back_never_replaces_another_incarnations_record(redis_server):
    """Redis lost its data (tombstones too); meanwhile the id was taken by a new session on B
    (another incarnation, term 0). A's old copy of the id (term 1: A took it over once) is
    written back when A notices: it must not replace the new session's record, whatever the
    terms say: A drops its copy instead."""
    rng = np.random.default_rng(13)
    x = replica(redis_server, "X", lease_ttl=0.2)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = x.create("alice", "chat-1").id
    step(x, sid, rng, "alice")
    time.sleep(0.3)
    a.fetch(sid, "alice")  # A took it over: term 1
    step(a, sid, rng, "alice")
    a.replication.backend.client.flushall()  # Redis restarted empty
    b = replica(redis_server, "B")
    new = b.create("mallory", "chat-1")
    b.flush()
    a.replication._degrade(TimeoutError("noticed the empty restart (test)"))
    a.replication._try_recover()
    rec = b.replication.backend.load(sid)
    assert (rec["principal"], rec["incarnation"]) == ("mallory", new.incarnation)
    assert a.local(sid) is None
    assert b.get(sid, "mallory") is new


@pytest.mark.parametrize("same_replica", [False, True])
def test_taking_a_lease_renews_the_records_expiry(redis_server, same_replica):
    """A fetch (take-over, or taking back our own lapsed lease) renews the record's expiry to
    its TTL + 60 s, as a write would: a session picked up again must not expire under its
    new holder before its first write."""
    rng = np.random.default_rng(14)
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=30.0)
    b = replica(redis_server, "B", lease_ttl=0.2, ttl=30.0)
    sid = a.create().id
    step(a, sid, rng)
    backend = a.replication.backend
    backend.client.pexpire(backend.key(sid), 1500)
    time.sleep(0.3)  # A's lease lapses
    (a if same_replica else b).fetch(sid)
    assert 80_000 < backend.client.pttl(backend.key(sid)) <= 90_000


@pytest.mark.parametrize("c_idle", [False, True], ids=["c_holds_its_lease", "c_idle"])
def test_a_close_of_a_copy_of_the_same_term_leaves_the_replica_serving_it(redis_server, c_idle):
    """After an empty restart, B writes back its stale copy (term 0) and C takes the session
    over (term 1, as A's copy) and steps it. A then closes its own copy (term 1): a record
    of the same term with C holding its lease is not A's to delete (only a LOWER term is
    taken for a stale write-back that the close wins over); nor is it when C is idle and its
    lease has lapsed (the record's version is not A's copy's)."""
    rng = np.random.default_rng(16)
    b, a, sid, _ = moved(redis_server, rng, ("B", "A"))  # A took it over: term 1
    time.sleep(0.3)
    redis_server.stop()
    redis_server.start()  # empty
    b.replication._degrade(RuntimeError("B's background check"))
    b.replication._try_recover()  # B's stale copy (term 0) written back
    b.flush()
    c = replica(redis_server, "C", lease_ttl=0.2 if c_idle else 5.0)
    c.fetch(sid)  # term 1, holder C
    acked = step(c, sid, rng)
    a.replication._degrade(RuntimeError("A's background check"))
    a.close(sid)  # queued while degraded
    if c_idle:
        _lapsed(c)  # nobody holds a lease of it
        assert c.replication.backend.client.get(c.replication.backend.lease(sid)) is None
    a.replication._try_recover()  # runs the queued delete first
    rec = c.replication.backend.load(sid)
    assert rec is not None and (rec["holder"], rec["term"], rec["version"]) == ("C", 1, 4)
    assert c.held(sid) != c_idle
    np.testing.assert_array_equal(c.unpack(rec["snap"])[1], acked)


def test_forgetting_an_old_copy_never_deletes_the_new_sessions_record(redis_server):
    """A keeps an old copy of chat-1 (alice's, closed on B); the id is mallory's new session
    now. A's fetch drops its copy, which queues the delete of that OLD incarnation's keys:
    once B's lease has lapsed too (idle), that delete (the background thread's) must not
    touch mallory's record (same version and term as A's copy: only the incarnation
    differs)."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create("alice", session_id="chat-1").id  # version 1, term 0
    time.sleep(0.3)
    b.fetch(sid, "alice")
    b.close(sid, "alice")
    new = b.create("mallory", session_id="chat-1")  # version 1, term 0
    a.fetch(sid, "alice")
    assert a.local(sid) is None
    time.sleep(0.3)  # B's lease of the new session lapses (idle)
    a.replication._delete_dropped()  # the background thread does this
    rec = b.replication.backend.load(sid)
    assert rec is not None and (rec["principal"], rec["incarnation"]) == (
        "mallory",
        new.incarnation,
    )


def test_a_close_leaves_the_keys_while_another_replica_holds_the_lease(redis_server):
    """_DROP deletes only a record that is ours: our version and term AND nobody else holding
    its lease. Here A's lease lapsed and B holds it (B is taking the session over: the record
    is still A's version and term); A's close of its copy must leave B's lease and the
    record."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    time.sleep(0.3)  # A's lease lapses
    backend = a.replication.backend
    assert backend.client.set(backend.lease(sid), "B", px=10_000, nx=True)
    a.close(sid)
    assert backend.exists(sid)
    assert backend.client.get(backend.lease(sid)) == b"B"


@pytest.mark.parametrize("persist_every", ["1", "4"])
def test_the_background_thread_writes_back_a_pending_session_in_step_mode(
    redis_server, persist_every
):
    """--persist-every N (no write-behind interval): a session left pending by a write-back
    (its row was lent; its step then failed, so no commit wrote it) is written back by the
    background thread's next period, not only when a later step or the shutdown comes."""
    rng = np.random.default_rng(17)
    a = replica(redis_server, "A", persist_every=persist_every, lease_ttl=0.3)
    sid = a.create().id
    x = step(a, sid, rng)
    a.flush()  # all written (so only the pending write-back is left)
    redis_server.stop()
    redis_server.start()  # empty
    a.replication._degrade(RuntimeError("test"))
    (s,) = a.lend([a.get(sid)])
    a.replication._try_recover()
    assert not a.replication.degraded and not a.replication.backend.exists(sid)
    a.give_back([s], 0)  # the step failed: nothing committed, nothing written
    a.replication.start()
    try:
        deadline = time.monotonic() + 2.0
        while not a.replication.backend.exists(sid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.replication.backend.exists(sid)
        assert a.replication.stats()["dirty"] == 0
    finally:
        a.replication.stop()
    position, state = a.unpack(a.replication.backend.load(sid)["snap"])
    assert position == 1
    np.testing.assert_array_equal(state, x)


def test_a_session_with_a_step_queued_keeps_its_lease(redis_server):
    """A pinned session (a step queued or running, not committed yet) has its lease renewed
    by every renewal, used since the last one or not: its lease must not lapse under a long
    queue (another replica would take it over mid-step).

    The lease is long (60 s); before each renewal the test shortens what is left of it to
    30 s, so a renewal shows as the expiry going back up to 60 s (an idle, unpinned session
    beside it is not renewed), whatever the machine's speed."""
    a = replica(redis_server, "A", lease_ttl=60.0)
    s, idle = a.create(), a.create()
    a.pin(s)
    backend = a.replication.backend
    try:
        for _ in range(3):  # each renewal: the background thread's, every lease_ttl / 3
            for x in (s, idle):
                assert backend.client.pexpire(backend.lease(x.id), 30_000)
            a.replication._renew_used()
            assert backend.client.get(backend.lease(s.id)) == b"A"
            assert backend.client.pttl(backend.lease(s.id)) > 30_000  # renewed
            assert backend.client.pttl(backend.lease(idle.id)) <= 30_000  # not renewed
        assert a.held(s.id)
    finally:
        a.unpin(s)


def test_a_renewal_writes_idle_dirty_sessions_but_not_one_with_a_step_queued(redis_server):
    """_renew_used writes a session with unwritten steps that is idle (its lease must not
    lapse with its newest steps only here), but not one a queued step pins (its commit is
    about to write or count it): only the idle one's record moves on."""
    rng = np.random.default_rng(18)
    a = replica(redis_server, "A", persist_every="8", lease_ttl=5.0)
    idle, busy = a.create().id, a.create().id
    for sid in (idle, busy):
        step(a, sid, rng)
    a.replication._renew_used()  # both were used: renewed, nothing written
    backend = a.replication.backend
    assert backend.load(idle)["version"] == 1 and backend.load(busy)["version"] == 1
    s = a.get(busy)
    a.pin(s)
    try:
        a.replication._renew_used()  # now idle-dirty: idle is written, busy (pinned) not
        assert backend.load(idle)["version"] == 2
        assert backend.load(busy)["version"] == 1
    finally:
        a.unpin(s)


def test_a_take_over_keeps_a_long_ttl_records_expiry_as_a_write_would(redis_server):
    """The record of a session with a TTL of 1e7 s (within what Redis expires) gets
    TTL + 60 s from a take-over too, as from a write; only past 1e9 s is it kept without
    expiry."""
    rng = np.random.default_rng(19)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create(ttl=1e7).id
    step(a, sid, rng)
    backend = a.replication.backend
    expect = int(1e10) + 60_000
    assert expect - 5_000 < backend.client.pttl(backend.key(sid)) <= expect
    time.sleep(0.3)
    b.fetch(sid)
    assert expect - 5_000 < backend.client.pttl(backend.key(sid)) <= expect
    forever = a.create(ttl=2e9).id
    assert backend.client.pttl(backend.key(forever)) == -1


def test_an_undone_take_over_of_a_record_without_holder_leaves_it_without_one(redis_server):
    """A record without a holder field (written before holders were recorded) taken over by
    a replica that then cannot load it: the undo restores the record exactly (term and no
    holder), so the copy's holder is not mistaken for another replica's."""
    from ssmstream.runtime.errors import ModelError

    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    backend = a.replication.backend
    backend.client.hdel(backend.key(sid), "holder")
    time.sleep(0.3)
    other = replica(redis_server, "B", model_sha="sha-B")
    with pytest.raises(ModelError):
        other.fetch(sid)
    rec = backend.load(sid)
    assert (rec["term"], rec["holder"]) == (0, None)


def test_another_principal_asking_for_a_session_does_not_end_it(redis_server):
    """Mallory asks replica A for alice's session id after A's lease of it lapsed (idle):
    the fetch finds a record of another principal — of the very incarnation A holds — and
    must leave alone both A's copy and the record (mallory just gets "unknown")."""

    rng = np.random.default_rng(20)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create("alice").id
    x = step(a, sid, rng, "alice")
    time.sleep(0.3)  # A's lease lapses
    a.fetch(sid, "mallory")
    with pytest.raises(SessionNotFound):
        a.get(sid, "mallory")
    a.replication._delete_dropped()  # the background thread's deletes: none for alice's
    assert a.replication.backend.exists(sid)
    a.fetch(sid, "alice")
    np.testing.assert_array_equal(a.read(a.get(sid, "alice")), x)


def test_a_session_pending_its_write_back_counts_as_held(redis_server):
    """After an empty restart, a session whose row a step holds stays pending (written back
    by its commit): until then it is held here (the write-back takes the lease), also once
    the lease it had before the outage would have lapsed; a request for it is served from
    memory, without a fetch."""
    rng = np.random.default_rng(22)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    x = step(a, sid, rng)
    redis_server.stop()
    redis_server.start()  # empty
    a.replication._degrade(RuntimeError("test"))
    time.sleep(0.3)  # the lease A had is long gone
    _long_lease(a)  # (the lease the commit's write-back takes is held() for 0.1 s of 0.2 s only)
    (s,) = a.lend([a.get(sid)])
    a.replication._try_recover()
    assert not a.replication.degraded and not a.replication.backend.exists(sid)
    assert a.held(sid)
    loads, relocks = a.replication.counts["loads"], a.replication.counts["relocks"]
    a.fetch(sid)  # no-op: held
    assert (a.replication.counts["loads"], a.replication.counts["relocks"]) == (loads, relocks)
    a.give_back([s], 1)  # its commit writes it back
    assert a.replication.backend.exists(sid) and a.held(sid)
    np.testing.assert_array_equal(a.read(a.get(sid)), x)


def test_a_close_while_redis_is_down_does_not_try_redis_and_deletes_on_recovery(redis_server):
    """While degraded a close is bookkeeping only (no Redis call on the event loop, no new
    error counted); its keys are deleted when Redis is back."""
    rng = np.random.default_rng(23)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    step(a, sid, rng)
    redis_server.stop()
    step(a, sid, rng)  # the write-through fails: degraded
    assert a.replication.degraded and a.replication.stats()["errors"] == 1
    a.close(sid)
    assert a.replication.stats()["errors"] == 1
    redis_server.start()
    a.replication._try_recover()
    assert not a.replication.degraded and not a.replication.backend.exists(sid)


def test_write_behind_runs_every_interval_even_when_the_lease_is_long(redis_server):
    """--persist-every 50ms with a long lease: dirty sessions are written within ~50 ms, not
    at the lease renewal period (lease_ttl / 3 = 20 s here, so a write within 10 s can only
    be the write-behind's, on a loaded machine too)."""
    rng = np.random.default_rng(24)
    a = replica(redis_server, "A", persist_every="50ms", lease_ttl=60.0)
    sid = a.create().id
    a.replication.start()
    try:
        time.sleep(0.1)
        x = step(a, sid, rng)
        t0 = time.monotonic()
        backend = a.replication.backend
        while backend.load(sid)["version"] < 2 and time.monotonic() - t0 < 10.0:
            time.sleep(0.01)
        assert backend.load(sid)["version"] == 2
    finally:
        a.replication.stop()
    np.testing.assert_array_equal(a.unpack(backend.load(sid)["snap"])[1], x)


def test_a_session_closed_after_a_write_whose_reply_was_lost_stays_closed(redis_server):
    """A write-through Redis applied but whose reply was lost (version 3 there; A knows 2 and
    degrades), then a close on A: at recovery the queued delete must still delete the record
    (of A's term, A its holder: A's own write) and leave the tombstone. It was left alone, and
    once A's lease lapsed another replica fetched and served the closed session."""
    rng = np.random.default_rng(7)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    backend = a.replication.backend
    with replies_lost(a):
        step(a, sid, rng, "alice")  # applied in Redis, the reply lost: A degrades
    assert a.replication.degraded
    a.close(sid, "alice")  # the client ends the session
    a.replication._try_recover()
    assert not a.replication.degraded
    assert backend.load(sid) is None
    time.sleep(0.4)  # A's lease lapses
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_a_step_after_the_last_renewal_before_the_lease_expires_asks_redis_first(redis_server):
    """--persist-every 2: a session stepped (and written) and renewed, then idle through two
    renewals, is stepped again late in its lease. Held() had said yes there (0.8 x lease_ttl)
    while the next renewal came only as Redis expired the lease: another replica took the
    session over from the older record, and the acknowledged step lived only on the first
    (both then answered the same position with different states). The step must take the
    lease back first, so that the other replica waits for it."""
    ttl = 1.0
    rng = np.random.default_rng(41)
    a = replica(redis_server, "A", persist_every="2", lease_ttl=ttl)
    b = replica(redis_server, "B", persist_every="2", lease_ttl=ttl, lease_wait=0.1)
    sid = a.create().id
    step(a, sid, rng)
    step(a, sid, rng)  # the second: written (version 2)
    t0 = time.monotonic()
    a.replication._renew_used()  # used: renewed, Redis expires the lease at t0 + ttl
    for k in (1, 2):  # the renewals of the background thread, every ttl / 3: idle, clean
        time.sleep(max(0.0, t0 + k * ttl / 3 - time.monotonic()))
        a.replication._renew_used()
    time.sleep(max(0.0, t0 + 0.7 * ttl - time.monotonic()))
    if not a.held(sid):  # as the service does before a step
        a.fetch(sid)
    x = step(a, sid, rng)  # acknowledged at position 3, not written (the 3rd of 2 per write)
    time.sleep(max(0.0, t0 + ttl + 0.05 - time.monotonic()))  # past the first lease's expiry
    a.replication._renew_used()  # the next renewal
    try:
        b.fetch(sid)
    except SessionBusy:  # A's lease was taken back for the step: B waits for A
        return
    s = b.get(sid)  # B may load it only as A left it
    assert s.position == 3
    np.testing.assert_array_equal(b.read(s), x)


def test_refetching_a_session_whose_lease_is_still_ours_in_redis_does_not_wait(redis_server):
    """Held() says no from 0.5 x lease_ttl after the last renewal (a safety margin), while
    Redis still has our lease: a fetch then must take it back at once (CURRENT), not wait for
    its own lease to lapse as if another replica held it."""
    a = replica(redis_server, "A", lease_ttl=5.0, lease_wait=0.5)
    sid = a.create().id
    step(a, sid, np.random.default_rng(0))
    a.replication._lease_until[sid] = 0.0  # as 0.5 x lease_ttl after the last renewal
    assert not a.held(sid)
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"A"
    a.fetch(sid)  # waiting for its own lease would end in SessionBusy after lease_wait
    assert a.held(sid)
    st = a.replication.stats()
    assert (st["relocks"], st["lease_waits"], st["loads"]) == (1, 0, 0)


def test_a_ttl_of_exactly_1e9_seconds_still_expires_like_the_take_over_script_says(redis_server):
    """Past 1e9 s a record gets no expiry; at exactly 1e9 s it does (the write and the
    take-over scripts must agree on the bound, else a take-over makes a persisted record
    expire or the other way round)."""
    assert record_expire_ms(1e9) == 1_000_000_060_000
    assert record_expire_ms(1e9 + 1) == 0
    a = replica(redis_server, "A", ttl=1e9)
    sid = a.create().id
    cli = redis.Redis.from_url(redis_server.url)
    written = cli.pttl(f"ssmstream:s:{sid}")
    assert written > 999_000_000_000
    a.flush()
    b = replica(redis_server, "B")
    b.fetch(sid)  # _TAKE renews the record's expiry by its own rule (ttl > 1e9: none)
    assert cli.pttl(f"ssmstream:s:{sid}") > 999_000_000_000


def test_a_flush_of_more_sessions_than_one_pipeline_writes_every_one(redis_server):
    """Writes are pipelined PIPELINE_CALLS (256) script calls per round trip: a shutdown
    with more dirty sessions than that must write every one (none lost at a chunk's edge)."""
    rng = np.random.default_rng(3)
    n = PIPELINE_CALLS + 4
    a = replica(redis_server, "A", persist_every="10000ms", lease_ttl=5.0, capacity=n)
    ids = [a.create().id for _ in range(n)]
    last = {sid: step(a, sid, rng) for sid in ids}
    assert a.replication.stats()["dirty"] == n
    assert a.flush() == 0
    assert a.replication.stats()["dirty"] == 0
    be = a.replication.backend
    for sid in ids:
        assert be.load(sid)["version"] == 2, sid
    b = replica(redis_server, "B", capacity=n)
    probe = ids[PIPELINE_CALLS - 1]  # the last call of the first chunk
    b.fetch(probe)
    np.testing.assert_array_equal(b.read(b.get(probe)), last[probe])


def test_a_session_taken_over_keeps_its_own_ttl(redis_server):
    """The record carries the session's TTL: the replica taking it over keeps it (not
    its store's default)."""
    a = replica(redis_server, "A", lease_ttl=5.0, ttl=600.0)
    sid = a.create(ttl=42.5).id
    a.flush()
    b = replica(redis_server, "B", ttl=600.0)
    b.fetch(sid)
    assert b.get(sid).ttl == 42.5
    assert b.replication.backend.load(sid)["ttl"] == 42.5


def test_an_undone_take_over_gives_the_record_back_to_its_holder(redis_server):
    """A replica of another model refuses a session: the take-over is undone, term AND
    holder, so the record again names the replica that wrote it."""
    rng = np.random.default_rng(5)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)  # A's lease lapses
    other = replica(redis_server, "B", model_sha="sha-B")
    with pytest.raises(ModelError):
        other.fetch(sid)
    rec = a.replication.backend.load(sid)
    assert (rec["term"], rec["holder"]) == (0, "A")


def test_an_id_in_use_is_refused_naming_the_session_id_field(redis_server):
    """The refusal of an id in use names the request field."""
    a, b = replica(redis_server, "A"), replica(redis_server, "B")
    a.create(session_id="chat-1")
    with pytest.raises(InvalidInput) as e:
        b.create(session_id="chat-1")
    assert e.value.field == "session_id"
    assert str(e.value) == "session_id: 'chat-1' is already in use"


def test_a_refused_write_adds_no_bytes_written(redis_server):
    """Write_bytes counts what was written: a refused write adds nothing."""
    rng = np.random.default_rng(7)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    before = dict(a.replication.counts)
    assert before["write_bytes"] > 0
    redis.Redis.from_url(redis_server.url).set(f"ssmstream:l:{sid}", "B")
    with pytest.raises(Unavailable):
        step(a, sid, rng)
    assert a.replication.counts["writes"] == before["writes"]
    assert a.replication.counts["write_bytes"] == before["write_bytes"]


def test_the_collector_exports_the_replications_stats(redis_server):
    """Every stat is exported under its own name."""
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=0.2)
    sid = a.create().id
    a.create()
    step(a, sid, rng)  # dirty: not written yet
    time.sleep(0.3)
    a.fetch(sid)  # a relock
    got = {m.name: m.samples[0].value for m in StoreCollector(a.replication).collect()}
    st = a.replication.stats()
    assert st["dirty"] == 1 and st["writes"] == 2 and st["relocks"] == 1
    assert got == {
        "ssmstream_state_store_up": 1.0,
        "ssmstream_state_store_dirty_sessions": 1.0,
        "ssmstream_state_store_writes": 2.0,
        "ssmstream_state_store_write_bytes": float(st["write_bytes"]),
        "ssmstream_state_store_loads": 0.0,
        "ssmstream_state_store_relocks": 1.0,
        "ssmstream_state_store_moved": 0.0,
        "ssmstream_state_store_errors": 0.0,
        "ssmstream_state_store_lease_waits": 0.0,
    }


def test_a_failed_renewal_means_the_lease_is_not_held(redis_server):
    """A renewal that finds the lease taken by another replica: not held from then on
    (the next step fetches instead of writing without a lease)."""
    rng = np.random.default_rng(10)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)  # used: renewed at the next renewal
    assert a.held(sid)
    redis.Redis.from_url(redis_server.url).set(f"ssmstream:l:{sid}", "B")
    a.replication._renew_used()  # the background thread's renewal
    assert not a.held(sid)


def test_the_background_thread_deletes_an_evicted_sessions_keys(redis_server):
    """An idle eviction only queues its delete (no I/O under the store's lock): the
    background thread must run it within a period, leaving the 'evicted' tombstone."""
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=0.3, ttl=10.0, clock=lambda: now[0])
    a.replication.start()
    try:
        s = a.create()
        sid, inc = s.id, s.incarnation
        now[0] = 11.0
        assert a.evict_idle() == [sid]
        cli = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 2.0
        while cli.exists(f"ssmstream:s:{sid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not cli.exists(f"ssmstream:s:{sid}")
        assert not cli.exists(f"ssmstream:l:{sid}")
        assert cli.get(f"ssmstream:x:{sid}:{inc}") == b"evicted"
    finally:
        a.replication.stop()


def _fake_clock(monkeypatch):
    """The replication module's monotonic clock, set by the test (everything else real)."""
    import types

    import ssmstream.runtime.replication as rep

    clock = [1000.0]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep, time=time.time)
    monkeypatch.setattr(rep, "time", fake)
    return clock


def _down(redis_server, monkeypatch):
    """A replica with one session, Redis stopped and the outage noticed; the fake clock."""
    clock = _fake_clock(monkeypatch)
    a = replica(redis_server, "A")
    a.create()
    redis_server.stop()
    outage(a)
    return clock, a


def _tries(caplog):
    return [r.levelname for r in caplog.records if "write-back failed" in r.getMessage()]


def test_failed_write_backs_warn_at_most_every_30_seconds(redis_server, monkeypatch, caplog):
    """A write-back retried every period while Redis is down logs a WARNING at most every
    30 s (DEBUG in between)."""
    clock, a = _down(redis_server, monkeypatch)
    with caplog.at_level("DEBUG", logger="ssmstream.runtime.replication"):
        for t in (1000.0, 1010.0, 1029.0, 1030.5, 1040.0):
            clock[0] = t
            a.replication._try_recover()
    assert _tries(caplog) == ["WARNING", "DEBUG", "DEBUG", "WARNING", "DEBUG"]


def test_a_new_outage_after_a_recovery_warns_at_once(redis_server, monkeypatch, caplog):
    """The 30 s throttle of write-back warnings starts afresh with each outage: the first
    failed write-back of a new outage is a WARNING even right after the last one."""
    clock, a = _down(redis_server, monkeypatch)
    with caplog.at_level("DEBUG", logger="ssmstream.runtime.replication"):
        a.replication._try_recover()  # WARNING
        redis_server.start()
        clock[0] += 5
        a.replication._try_recover()
        assert not a.replication.degraded
        redis_server.stop()
        outage(a)
        clock[0] += 5
        a.replication._try_recover()
    assert _tries(caplog) == ["WARNING", "WARNING"]


def test_a_create_refused_while_degraded_does_not_try_redis(redis_server):
    """While Redis is down, a create whose claim reserved nothing (degraded) and that is
    then refused (a bad ttl) lets go of the id without calling Redis: no second error."""
    a = replica(redis_server, "A")
    redis_server.stop()
    outage(a)
    assert a.replication.stats()["errors"] == 1
    with pytest.raises(InvalidInput) as e:
        a.create(session_id="chat-9", ttl=-1)
    assert e.value.field == "ttl"
    assert a.replication.stats()["errors"] == 1
    assert not a.held("chat-9") and "chat-9" not in a.replication._pending


def test_a_script_error_other_than_a_lost_script_is_not_run_again(redis_server):
    """_run re-runs only the calls Redis answered NOSCRIPT (it lost its scripts): a call
    that failed otherwise (here WRONGTYPE: the lease key is not a string) ran, maybe in part
    (Lua has no rollback), and is not run a second time: one pipelined round trip, its error
    raised (the store turns degraded)."""
    rng = np.random.default_rng(11)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    cli = redis.Redis.from_url(redis_server.url)
    cli.delete(f"ssmstream:l:{sid}")
    cli.hset(f"ssmstream:l:{sid}", "x", "1")  # WRONGTYPE for GET
    client = a.replication.backend.client
    pipes, loads = [], []
    real_pipe, real_load = client.pipeline, client.script_load
    client.pipeline = lambda *a_, **k: pipes.append(1) or real_pipe(*a_, **k)
    client.script_load = lambda *a_, **k: loads.append(1) or real_load(*a_, **k)
    step(a, sid, rng)  # served; the write failed
    assert a.replication.degraded and a.replication.stats()["errors"] == 1
    assert (len(pipes), len(loads)) == (1, 0)


def test_a_shutdown_deletes_the_keys_of_sessions_evicted_since_the_last_period(redis_server):
    """An eviction queues its delete for the background thread: a shutdown before the
    next period runs it (else the evicted session's record stays for its TTL, and another
    replica serves the session that was evicted here)."""
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=5.0, ttl=10.0, clock=lambda: now[0])
    s = a.create()
    sid, inc = s.id, s.incarnation
    now[0] = 11.0
    assert a.evict_idle() == [sid]
    assert a.replication.backend.exists(sid)  # queued, not yet deleted
    assert a.flush(final=True) == 0
    cli = redis.Redis.from_url(redis_server.url)
    assert not cli.exists(f"ssmstream:s:{sid}")
    assert cli.get(f"ssmstream:x:{sid}:{inc}") == b"evicted"
    b = replica(redis_server, "B")
    b.fetch(sid)
    with pytest.raises(SessionNotFound):
        b.get(sid)


def test_busy_names_the_replica_holding_the_lease(redis_server):
    """A fetch that waited lease_wait in vain says which replica keeps the lease."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=0.2)
    with pytest.raises(SessionBusy) as e:
        b.fetch(sid)
    assert str(e.value) == (
        f"session {sid!r} is held by replica 'A' (its lease was not released within 0.2s); retry"
    )


def test_another_principal_asking_for_a_session_whose_record_expired_writes_nothing(redis_server):
    """The record of alice's session expired while A holds it: only alice's own request
    writes it back (and takes its lease). Mallory asking for the id changes nothing in Redis
    (and is answered as for an unknown id)."""
    rng = np.random.default_rng(12)
    a = replica(redis_server, "A", lease_ttl=0.2)
    sid = a.create("alice").id
    x = step(a, sid, rng, "alice")
    cli = redis.Redis.from_url(redis_server.url)
    cli.delete(f"ssmstream:s:{sid}")  # the record expired (or Redis evicted it)
    time.sleep(0.3)  # and A's lease lapsed
    a.fetch(sid, "mallory")
    assert not cli.exists(f"ssmstream:s:{sid}")
    assert not cli.exists(f"ssmstream:l:{sid}")
    with pytest.raises(SessionNotFound):
        a.get(sid, "mallory")
    _long_lease(a)
    a.fetch(sid, "alice")  # alice's request writes it back
    rec = a.replication.backend.load(sid)
    assert rec["principal"] == "alice" and a.held(sid, "alice")
    np.testing.assert_array_equal(a.read(a.get(sid, "alice")), x)


def _old_copy_then_id_reused(redis_server, end: str):
    """A holds an old copy of alice's chat-1; B took it over and it ended there (`end`:
    "closed" | "evicted"), then mallory made a new chat-1 on B. Returns (a, b, sid, the old
    incarnation)."""
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=0.2, ttl=10.0)
    b = replica(redis_server, "B", lease_ttl=0.2, ttl=10.0, clock=lambda: now[0])
    old = a.create("alice", session_id="chat-1")
    time.sleep(0.3)  # A's lease lapses
    b.fetch("chat-1", "alice")
    if end == "evicted":
        now[0] += 11.0
        assert b.evict_idle() == ["chat-1"]
        b.replication._delete_dropped()  # the background thread does this
    else:
        b.close("chat-1", "alice")
    b.create("mallory", session_id="chat-1")
    return a, b, "chat-1", old.incarnation


def test_an_old_copy_whose_id_was_reused_after_an_eviction_says_evicted(redis_server):
    """The tombstone of the old incarnation says how it ended: its owner is told
    'evicted' (not 'closed') when it was evicted elsewhere, even though the id is another
    principal's session now."""
    a, b, sid, inc = _old_copy_then_id_reused(redis_server, "evicted")
    assert b.replication.backend.gone(sid, inc) == "evicted"
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "alice")
    assert e.value.reason == "evicted"
    assert b.replication.backend.load(sid)["principal"] == "mallory"


def test_an_old_copy_whose_tombstone_expired_says_closed(redis_server):
    """Without a tombstone (it expired) the old incarnation is reported closed: the id is
    another session's now."""
    a, b, sid, inc = _old_copy_then_id_reused(redis_server, "evicted")
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:x:{sid}:{inc}")  # expired
    assert b.replication.backend.gone(sid, inc) is None
    a.fetch(sid, "alice")
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "alice")
    assert e.value.reason == "closed"


def test_a_create_refused_while_degraded_leaves_nothing_to_write_back(redis_server, caplog):
    """A create refused while Redis is down (its id reserved nothing: pending a
    write-back) lets go of the id entirely: the recovery writes back the one real session and
    reports nothing left waiting (not a phantom 'being stepped' session and -1 written)."""
    a = replica(redis_server, "A")
    sid = a.create().id
    redis_server.stop()
    outage(a)
    with pytest.raises(InvalidInput):
        a.create(session_id="chat-9", ttl=-1)
    redis_server.start()
    with caplog.at_level("INFO", logger="ssmstream.runtime.replication"):
        a.replication._try_recover()
    assert not a.replication.degraded
    back = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
    assert len(back) == 1
    assert back[0].endswith(
        ": 1 sessions written back and re-leased, 0 dropped (moved or "
        "ended elsewhere), 0 being stepped (written next)"
    )
    assert a.replication.backend.exists(sid) and not a.replication.backend.exists("chat-9")
    assert a.replication.stats()["dirty"] == 0


def test_each_failed_operation_counts_one_error_also_while_degraded(redis_server):
    """`errors` counts state store operations that failed, not outages: a fetch waiting
    for another replica's lease and a write-through that both fail when Redis goes away are
    two errors, in either order; the second one fails while the store is degraded."""
    rng = np.random.default_rng(13)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    # B's background thread (every lease_ttl / 3) stays out of the count
    b = replica(redis_server, "B", lease_ttl=30.0, lease_wait=3.0)
    own = b.create().id
    got, stepped, waiting = [], threading.Event(), threading.Event()
    take = b.replication.backend.take

    def take_after_the_step(*args):  # the fetch's next try waits until the step failed
        if waiting.is_set():
            stepped.wait(5)
        try:
            return take(*args)
        finally:
            waiting.set()

    b.replication.backend.take = take_after_the_step

    def fetch():
        try:
            b.fetch(sid)
        except Exception as e:  # noqa: BLE001
            got.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    assert waiting.wait(5)  # B's fetch waits for A's lease
    redis_server.stop()
    step(b, own, rng)  # served from memory; its write-through failed
    assert b.replication.stats()["errors"] == 1
    stepped.set()
    t.join(5)
    assert len(got) == 1 and isinstance(got[0], Unavailable)
    assert str(got[0]) == f"state store failed while loading {sid!r}; retry"
    st = b.replication.stats()
    assert st["up"] is False and st["errors"] == 2


def test_an_evicted_sessions_delete_is_sent_once(redis_server):
    """The deletes queued by an eviction are sent by the next delete run only: a later run
    (the next period) sends nothing again."""
    now = [0.0]
    a = replica(redis_server, "A", lease_ttl=0.3, ttl=10.0, clock=lambda: now[0])
    s = a.create()
    now[0] = 11.0
    assert a.evict_idle() == [s.id]
    backend = a.replication.backend
    sent = []
    drop_many = backend.drop_many
    backend.drop_many = lambda items, owner: sent.append(len(items)) or drop_many(items, owner)
    a.replication._delete_dropped()
    a.replication._delete_dropped()
    assert sent == [1]
    cli = redis.Redis.from_url(redis_server.url)
    assert cli.get(f"ssmstream:x:{s.id}:{s.incarnation}") == b"evicted"


def test_an_idle_session_written_by_the_renewal_keeps_its_lease_one_period_more(
    redis_server, monkeypatch
):
    """--persist-every 4: the renewal that writes an idle session's unwritten step renews
    its lease too, so the lease is still held past what the previous renewal gave."""
    clock = _fake_clock(monkeypatch)
    rng = np.random.default_rng(31)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._renew_used()  # used since the last renewal: renewed
    clock[0] += 2.0
    a.replication._renew_used()  # idle with an unwritten step: written, then renewed
    assert a.replication.backend.load(sid)["version"] == 2
    clock[0] += 1.0  # past 0.5 × lease_ttl after the first renewal
    assert a.held(sid)


def test_a_fetch_arriving_while_a_reclaim_lets_the_copy_go_loads_the_session_afresh(
    redis_server,
):
    """A fetch of a session whose stale copy a reclaim is letting go at that moment waits
    for the reclaim, then loads the session afresh: A holds it and its lease afterwards
    (it is not left dropped with its lease released)."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    _lapsed(a)
    b.fetch(sid)
    _lapsed(b)  # B's lease lapses too: A may take the session back
    _long_lease(a)
    fetches = []
    real_drop = a.drop

    def drop_while_fetched(s, reason="moved"):
        t = threading.Thread(target=a.fetch, args=(sid,))
        t.start()
        t.join(0.5)
        fetches.append(t)
        real_drop(s, reason)

    a.drop = drop_while_fetched
    try:
        assert a.replication.reclaim() == 1
    finally:
        a.drop = real_drop
    fetches[0].join(5)
    assert a.local(sid) is not None and a.held(sid)
    assert a.replication.backend.client.get(f"ssmstream:l:{sid}") == b"A"
    assert a.replication.backend.load(sid)["holder"] == "A"


# --- copies that moved on give way to new sessions --------------------------------------------


def _long_lease(store) -> None:
    """Leases the store takes from now on last 30 s. A test whose leases had to lapse quickly
    asserts held() after taking one back: held() is true for half of lease_ttl after the
    lease was taken (0.1 s of 0.2 s), which a loaded machine can spend before the assert."""
    store.replication.lease_ttl, store.replication._lease_ms = 30.0, 30_000


def _lapsed(*stores) -> None:
    """Wait until the stores' leases of sessions they did not use have lapsed."""
    time.sleep(max(s.replication.lease_ttl for s in stores) + 0.05)


def test_copies_that_moved_on_give_way_to_a_full_store(redis_server):
    """A's copies of a session B took over (a later term) and of one B closed (its
    tombstone) stop holding A's capacity: A's next create drops them and succeeds. The
    closed one answers "closed" on A afterwards; the moved one is B's."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    moved, closed = a.create().id, a.create().id
    with pytest.raises(LimitExceeded):
        a.create()  # both copies are A's own: nothing gives way
    _lapsed(a)
    b.fetch(moved)
    b.fetch(closed)
    b.close(closed)
    s = a.create()
    assert a.local(moved) is None and a.local(closed) is None
    assert a.replication.stats()["moved"] == 1
    with pytest.raises(SessionNotFound) as e:
        a.get(closed)
    assert e.value.reason == "closed"
    assert b.held(moved) and b.replication.backend.load(moved)["term"] == 1
    assert a.replication.backend.load(s.id)["version"] == 1  # the new session is written


def test_copies_that_may_be_the_only_ones_or_are_busy_stay(redis_server):
    """A copy whose record vanished without a tombstone (it may be the only copy), one whose
    lease is still A's, one nobody took over since A's lease lapsed (idle) and one a step
    holds all stay: the create is refused. A full reclaim
    that dropped nothing is not repeated within lease_ttl / 3; after it, the copy B took
    over gives way once no step holds it."""
    a = replica(redis_server, "A", lease_ttl=0.6, capacity=4)
    b = replica(redis_server, "B", lease_ttl=5.0)
    lost, busy, idle = a.create().id, a.create().id, a.create().id
    _lapsed(a)
    # leases of 3 s from here on: a reclaim that dropped nothing is not repeated for 1 s, not
    # 0.2 s, which the next create's claim and release round trips can outlast on a loaded
    # machine (the reclaim then ran again and let the unpinned copy go)
    a.replication.lease_ttl, a.replication._lease_ms = 3.0, 3000
    held = a.create().id  # its lease is fresh
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:s:{lost}")
    b.fetch(busy)
    a.pin(a.local(busy))
    with pytest.raises(LimitExceeded):
        a.create()
    assert all(a.local(sid) is not None for sid in (lost, busy, idle, held))
    a.unpin(a.local(busy))
    with pytest.raises(LimitExceeded):
        a.create()  # within lease_ttl / 3 of a reclaim that dropped nothing: not asked again
    assert a.local(busy) is not None
    time.sleep(a.replication.lease_ttl / 3 + 0.05)
    a.create()
    assert a.local(busy) is None
    assert all(a.local(sid) is not None for sid in (lost, idle, held))


def test_an_id_whose_copy_moved_on_can_be_created_again_here(redis_server):
    """An id closed on B can be created again on A, whose old copy of it gives way (a new
    incarnation); an id live on B stays "already in use" on A (A's copy goes all the same);
    an id whose copy is still A's own is "already in use" and its copy stays."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    old = a.create(session_id="chat-1")
    a.create(session_id="chat-2")
    _lapsed(a)
    b.fetch("chat-1")
    b.close("chat-1")
    b.fetch("chat-2")
    new = a.create(session_id="chat-1")
    assert new.incarnation != old.incarnation and a.local("chat-1") is new
    with pytest.raises(InvalidInput, match="already in use"):
        a.create(session_id="chat-2")
    assert a.local("chat-2") is None and b.held("chat-2")
    with pytest.raises(InvalidInput, match="already in use"):
        a.create(session_id="chat-1")
    assert a.local("chat-1") is new


def test_copies_stay_while_redis_is_down(redis_server):
    """Degraded, a replica cannot tell a copy that moved on from the only one: it drops
    none, and a full store stays full."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=1)
    b = replica(redis_server, "B", lease_ttl=5.0)
    sid = a.create().id
    _lapsed(a)
    b.fetch(sid)
    outage(a)
    assert a.replication.reclaim() == 0 and a.replication.reclaim(sid) == 0
    with pytest.raises(LimitExceeded):
        a.create()
    assert a.local(sid) is not None


def test_a_take_over_into_a_full_store_lets_copies_that_moved_on_give_way(redis_server):
    """A is full of copies B took over; a session made on B comes to A (a failover, or the
    proxy's ring changed): A's take-over drops the stale copies instead of failing with
    LimitExceeded, and holds the session's lease."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    moved = [a.create().id, a.create().id]
    _lapsed(a)
    for sid in moved:
        b.fetch(sid)
    new = b.create().id
    _lapsed(b)
    _long_lease(a)
    a.fetch(new)
    assert a.held(new) and a.local(new) is not None
    assert all(a.local(sid) is None for sid in moved)


def test_reclaim_asks_redis_in_few_round_trips_and_counts_one_error(redis_server):
    """Copies without a record (Redis emptied, not yet noticed) are looked up in one
    pipelined round trip, not one per copy; a reclaim whose lease release fails counts one
    error and still lets go of the copies Redis showed had moved on."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=40)
    ids = [a.create().id for _ in range(40)]
    _lapsed(a)
    backend = a.replication.backend
    asked = []
    gone_many = backend.gone_many
    backend.gone_many = lambda items: asked.append(len(items)) or gone_many(items)
    for sid in ids[:20]:  # records gone without tombstones
        redis.Redis.from_url(redis_server.url).delete(f"ssmstream:s:{sid}")
    b = replica(redis_server, "B", lease_ttl=5.0)
    for sid in ids[20:23]:
        b.fetch(sid)  # taken over

    def down(*args):
        raise redis.ConnectionError("gone")

    backend.release = down
    errors = a.replication.stats()["errors"]
    assert a.replication.reclaim() == 3
    assert asked == [20]
    assert a.replication.stats()["errors"] == errors + 1 and a.replication.degraded
    assert all(a.local(sid) is None for sid in ids[20:23])
    assert all(a.local(sid) is not None for sid in ids[:20] + ids[23:])


def test_an_old_copy_whose_id_was_reused_elsewhere_gives_way_saying_how_it_ended(redis_server):
    """A's old copy of a chat-1 that was evicted on B, whose id is now another session of
    B's (another incarnation's record), gives way to a reclaim; A then answers "evicted"
    for it, as its tombstone says, and mallory's record on B stays."""
    a, b, sid, inc = _old_copy_then_id_reused(redis_server, "evicted")
    assert a.replication.reclaim() == 1
    assert a.local(sid) is None
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "alice")
    assert e.value.reason == "evicted"
    assert b.replication.backend.load(sid)["principal"] == "mallory"


def test_an_old_copy_whose_id_was_reused_gives_way_after_its_tombstone_expired(redis_server):
    """Another incarnation's record without the old incarnation's tombstone (it expired)
    still shows that A's copy ended: it gives way to a reclaim and is answered "closed"."""
    a, b, sid, inc = _old_copy_then_id_reused(redis_server, "closed")
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:x:{sid}:{inc}")  # expired
    assert a.replication.reclaim() == 1
    with pytest.raises(SessionNotFound) as e:
        a.get(sid, "alice")
    assert e.value.reason == "closed"
    assert b.replication.backend.load(sid)["principal"] == "mallory"


def test_a_copy_whose_record_names_no_incarnation_is_its_own_and_stays(redis_server):
    """A record without an incarnation (as an older release wrote it) is the copy's own, as
    the write-back takes it: A's idle copy of it stays, and a full store stays full."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=1)
    sid = a.create().id
    _lapsed(a)
    redis.Redis.from_url(redis_server.url).hdel(f"ssmstream:s:{sid}", "incarnation")
    with pytest.raises(LimitExceeded):
        a.create()
    assert a.local(sid) is not None
    assert a.replication.reclaim(sid) == 0


def test_a_create_of_an_id_that_ended_elsewhere_is_not_held_back_by_a_recent_full_reclaim(
    redis_server,
):
    """Only full reclaims wait lease_ttl / 3 after one that dropped nothing: right after a
    refused create into a full store, a create naming the id of A's copy that B has closed
    since still lets that copy go and makes the new session."""
    a = replica(redis_server, "A", lease_ttl=1.5, capacity=1)
    b = replica(redis_server, "B", lease_ttl=5.0)
    old = a.create(session_id="chat-1")
    _lapsed(a)
    with pytest.raises(LimitExceeded):
        a.create()  # A's copy is current: nothing gives way
    b.fetch("chat-1")
    b.close("chat-1")
    new = a.create(session_id="chat-1")
    assert new.incarnation != old.incarnation and a.local("chat-1") is new


def test_an_id_refused_as_in_use_does_not_hold_back_the_next_full_reclaim(redis_server):
    """A create naming the id of A's own current copy is refused ("already in use") and
    lets nothing go; that lookup of one id does not count as a full reclaim, so the next
    create into the full store at once lets go of the copy B took over."""
    a = replica(redis_server, "A", lease_ttl=1.5, capacity=2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    moved, own = a.create().id, a.create().id
    _lapsed(a)
    b.fetch(moved)
    with pytest.raises(InvalidInput, match="already in use"):
        a.create(session_id=own)
    a.create()
    assert a.local(moved) is None and a.local(own) is not None


def test_a_reclaim_that_let_copies_go_does_not_hold_back_the_next_one(redis_server):
    """Only a full reclaim that dropped nothing waits lease_ttl / 3: after one that let a
    copy go, a copy that a step held then gives way to the very next full create."""
    a = replica(redis_server, "A", lease_ttl=1.5, capacity=2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    first, busy = a.create().id, a.create().id
    _lapsed(a)
    b.fetch(first)
    b.fetch(busy)
    a.pin(a.local(busy))
    a.create()  # `first` gives way; `busy` is held by a step
    assert a.local(first) is None and a.local(busy) is not None
    a.unpin(a.local(busy))
    a.create()
    assert a.local(busy) is None


def test_a_create_naming_a_new_id_into_a_full_store_lets_copies_that_moved_on_give_way(
    redis_server,
):
    """A create that names its own (new) id into a store full of copies B took over lets
    those copies go, as one without an id does."""
    a = replica(redis_server, "A", lease_ttl=0.2, capacity=1)
    b = replica(redis_server, "B", lease_ttl=5.0)
    moved = a.create().id
    _lapsed(a)
    b.fetch(moved)
    s = a.create(session_id="chat-new")
    assert a.local(moved) is None and a.local("chat-new") is s


def test_a_replica_shut_down_lets_no_copy_go(redis_server):
    """After the shutdown flush (flush(final=True)) a replica asks Redis nothing more about
    its copies: a reclaim lets none go, not even one B took over."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    sid = a.create().id
    _lapsed(a)
    b.fetch(sid)
    assert a.flush(final=True) == 0
    assert a.replication.reclaim() == 0 and a.replication.reclaim(sid) == 0
    assert a.local(sid) is not None


def test_a_drained_stream_on_a_replica_is_told_to_resume_on_another(redis_server, toy_token_model):
    """What a Stream the drain ends is told, on a replica with a shared state store: its
    session is in the store and resumes on another replica (not that it ends with the
    server, as without a store). New work refused while it drains is sent on to another
    replica too, not told to wait for this one's restart."""
    import asyncio

    from ssmstream.runtime.engine import Engine

    engine = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    svc = _service(redis_server, engine, "A")
    svc.drain()
    with pytest.raises(Unavailable) as e:
        asyncio.run(svc.create("p", "new"))
    assert str(e.value) == "server is shutting down; retry on another replica"
    assert svc.store.local("new") is None
    svc.shutdown()
    assert svc.draining_says == (
        "server is shutting down; the session is in the shared state store, resume on "
        "another replica"
    )
