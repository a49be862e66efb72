"""Redis going back to older data with the same generation token: a restart from an older
dump (RDB or AOF) or a failover to a replica that lags. The replica that held a session last
writes its newer copy back, raising the term as a take-over does, so that a copy from a
take-over the older data forgot cannot win over it; on every path a session takes (write
through, write-behind, every Nth step, shutdown flush, lost replies, close, eviction, fork,
outage recovery, another incarnation of the id).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from ssmstream.runtime.errors import SessionBusy, SessionNotFound, Unavailable
from ssmstream.runtime.sessions import SessionStore
from stores import (
    outage,
    record,
    replica,
    replies_lost,
    roll_back,
    step,
    stepped_twice,
    taken_over,
    written,
)


def rolled_back(redis_server, rng) -> tuple[SessionStore, str, np.ndarray]:
    """Replica A steps a session 3 times, then Redis comes back from an older dump (RDB or
    AOF), or fails over to a replica that lags: the generation token is the same, the
    session's record is as after step 1 and its lease has expired. A, the session's id and
    the state of step 3."""
    a, sid, old = stepped_twice(redis_server, rng)
    last = step(a, sid, rng)
    assert written(a, sid)[2] == 4
    roll_back(redis_server, sid, old)
    assert written(a, sid)[0] == 1
    return a, sid, last


def test_a_record_redis_rolled_back_is_overwritten_by_the_next_write_of_the_newer_copy(
    redis_server,
):
    """The replica that held the session last writes its newer copy back at its next write
    (here before any lease renewal noticed the lapse): no acknowledged step is lost, and the
    session is not dropped as 'moved'."""
    rng = np.random.default_rng(1)
    a, sid, _ = rolled_back(redis_server, rng)
    assert a.held(sid)
    x = step(a, sid, rng)
    position, state, version = written(a, sid)
    assert (position, a.get(sid).position) == (4, 4) and version > 4
    np.testing.assert_array_equal(state, x)
    assert a.replication.stats()["moved"] == 0


def test_a_record_redis_rolled_back_is_overwritten_when_the_holder_fetches_it_again(
    redis_server,
):
    """After a renewal found the lease gone, the holder's next fetch finds the record behind
    its copy (same incarnation and term, held by no one else since) and writes its copy back
    instead of loading the older record."""
    rng = np.random.default_rng(2)
    a, sid, last = rolled_back(redis_server, rng)
    a.replication._lease_until[sid] = 0.0  # as after a renewal that found the lease gone
    a.fetch(sid)
    s = a.get(sid)
    assert s.position == 3
    np.testing.assert_array_equal(a.read(s), last)
    position, state, version = written(a, sid)
    assert position == 3 and version > 4
    np.testing.assert_array_equal(state, last)
    assert a.replication.stats()["loads"] == 0
    x = step(a, sid, rng)
    assert written(a, sid)[0] == 4
    np.testing.assert_array_equal(written(a, sid)[1], x)


def _forked_history(redis_server, a_lease_ttl: float | None = None):
    """a_lease_ttl: the lease A takes from here on (taken_over's 0.2 s lapses within moments;
    a test that needs A to keep holding it gives a long one)."""
    rng = np.random.default_rng(7)
    a, b, sid, old = taken_over(redis_server, rng)
    step(b, sid, rng, "alice")  # B's copy: term 1, v5
    roll_back(redis_server, sid, old)  # Redis lost B's take-over and writes
    assert not a.held(sid)
    if a_lease_ttl is not None:
        a.replication.lease_ttl, a.replication._lease_ms = a_lease_ttl, int(1000 * a_lease_ttl)
    a.fetch(sid, "alice")  # the client is now served by A
    newest = step(a, sid, rng, "alice")  # acknowledged by A, after everything B did
    np.testing.assert_array_equal(written(a, sid)[1], newest)
    return a, b, sid, newest


def test_the_replica_whose_take_over_was_rolled_back_does_not_overwrite_newer_steps_on_fetch(
    redis_server,
):
    a, b, sid, newest = _forked_history(redis_server)
    time.sleep(0.3)  # A idles: its lease lapses; the client's next request goes to B
    b.fetch(sid, "alice")
    np.testing.assert_array_equal(written(b, sid)[1], newest)  # Redis keeps A's newest step
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), newest)


def test_the_replica_whose_take_over_was_rolled_back_does_not_steal_a_live_session_on_recovery(
    redis_server,
):
    # A serves the session and holds its lease throughout (a 0.2 s lease lapsed under a
    # loaded machine before B's recovery, and the lease assertion below then failed)
    a, b, sid, newest = _forked_history(redis_server, a_lease_ttl=30.0)
    # B's connection blips: its recovery writes back every session it holds
    outage(b)
    b.replication._try_recover()
    assert not b.replication.degraded
    np.testing.assert_array_equal(written(a, sid)[1], newest)  # not B's older copy
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"A"
    # A, which holds the lease and served the newest step, keeps serving the session
    step(a, sid, np.random.default_rng(8), "alice")
    assert a.replication.stats()["moved"] == 0


def test_the_write_path_too_leaves_no_copy_that_beats_the_written_back_one(redis_server):
    """As above, but A notices the rollback at a write (its lease still valid here: `_PUT`
    answers BEHIND), not at a fetch."""
    rng = np.random.default_rng(9)
    a, b, sid, old = taken_over(redis_server, rng)
    roll_back(redis_server, sid, old)
    a.replication._lease_until[sid] = time.monotonic() + 10  # A still believes it holds it
    newest = step(a, sid, rng, "alice")  # _PUT: rolled back → written back via _RESTORE
    np.testing.assert_array_equal(written(a, sid)[1], newest)
    time.sleep(0.3)
    a.replication._lease_until[sid] = 0.0
    b.fetch(sid, "alice")
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), newest)


@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/scaleout.md): two replicas stepped the session, one of them "
    "during an outage, and Redis went back to older data: the copy of the forgotten take-over "
    "wins, whichever stepped last",
)
def test_an_outage_write_back_over_a_rolled_back_take_over(redis_server):
    rng = np.random.default_rng(10)
    a, b, sid, old = taken_over(redis_server, rng)
    outage(a)
    newest = step(a, sid, rng, "alice")  # served from memory while degraded
    roll_back(redis_server, sid, old)
    a.replication._try_recover()
    np.testing.assert_array_equal(written(a, sid)[1], newest)
    time.sleep(0.3)
    b.fetch(sid, "alice")
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), newest)


def test_write_behind_writes_back_dirty_steps_over_a_rolled_back_record(redis_server):
    rng = np.random.default_rng(1)
    a = replica(redis_server, "A", persist_every="10000ms", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._write_dirty()  # v2
    old = record(redis_server, sid)
    step(a, sid, rng)
    a.replication._write_dirty()  # v3
    last = step(a, sid, rng)  # dirty
    roll_back(redis_server, sid, old)
    a.replication._write_dirty()  # the background period
    position, state, version = written(a, sid)
    assert position == 3 and version > 3
    np.testing.assert_array_equal(state, last)
    assert a.replication.stats()["dirty"] == 0 and a.replication.stats()["moved"] == 0
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"A"


def test_every_nth_step_writes_back_the_dirty_steps_at_its_next_due_write(redis_server):
    rng = np.random.default_rng(2)
    a = replica(redis_server, "A", persist_every="2", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    step(a, sid, rng)  # written: v2
    old = record(redis_server, sid)
    step(a, sid, rng)
    step(a, sid, rng)  # v3
    step(a, sid, rng)  # dirty
    roll_back(redis_server, sid, old)
    last = step(a, sid, rng)  # due: _PUT finds v2 < 3 → written back
    position, state, _ = written(a, sid)
    assert position == 6
    np.testing.assert_array_equal(state, last)


def test_a_shutdown_flush_writes_back_dirty_steps_and_hands_the_newest_over(redis_server):
    rng = np.random.default_rng(3)
    a = replica(redis_server, "A", persist_every="10000ms", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._write_dirty()
    old = record(redis_server, sid)
    step(a, sid, rng)
    a.replication._write_dirty()
    last = step(a, sid, rng)
    roll_back(redis_server, sid, old)
    assert a.flush(final=True) == 0
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") is None  # released
    b = replica(redis_server, "B")
    b.fetch(sid)
    assert b.replication.stats()["lease_waits"] == 0  # released: taken at once
    np.testing.assert_array_equal(b.read(b.get(sid)), last)


def test_a_shutdown_flush_of_a_clean_session_after_a_rollback(redis_server):
    rng = np.random.default_rng(4)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    old = record(redis_server, sid)
    last = step(a, sid, rng)  # write-through: acknowledged and written
    roll_back(redis_server, sid, old)
    a.flush(final=True)
    b = replica(redis_server, "B")
    b.fetch(sid)
    np.testing.assert_array_equal(b.read(b.get(sid)), last)


def test_a_shutdown_flush_writes_back_clean_sessions_whose_record_vanished_or_is_stale(
    redis_server,
):
    """A session without unwritten steps whose record vanished (it expired, or Redis
    evicted it) or went back to a stale copy of a lower term is written back by the flush
    that hands it over."""
    rng = np.random.default_rng(11)
    a = replica(redis_server, "A", lease_ttl=5.0)
    b = replica(redis_server, "B", lease_ttl=5.0)
    cli = redis.Redis.from_url(redis_server.url)
    gone = a.create("alice").id
    gone_state = step(a, gone, rng, "alice")
    cli.delete(f"ssmstream:s:{gone}")
    lower = b.create("alice").id  # B holds it at term 0
    old = record(redis_server, lower)
    b.replication._lease_until[lower] = 0.0
    cli.delete(f"ssmstream:l:{lower}")  # B's lease lapsed: A takes the session over (term 1)
    a.fetch(lower, "alice")
    lower_state = step(a, lower, rng, "alice")
    roll_back(redis_server, lower, old)  # Redis went back to B's record of term 0
    writes = a.replication.stats()["writes"]

    assert a.flush(final=True) == 0
    assert a.replication.stats()["writes"] == writes + 2
    np.testing.assert_array_equal(written(a, gone)[1], gone_state)
    np.testing.assert_array_equal(written(a, lower)[1], lower_state)
    assert int(record(redis_server, lower)[b"term"]) == 1
    c = replica(redis_server, "C")
    c.fetch(lower, "alice")
    np.testing.assert_array_equal(c.read(c.get(lower, "alice")), lower_state)


def test_a_shutdown_flush_leaves_current_records_and_take_overs_alone(redis_server):
    """A flush writes no clean session whose record is its copy, and none another replica
    took over (that replica's steps stay)."""
    rng = np.random.default_rng(12)
    a, b, taken, _ = taken_over(redis_server, rng)  # A's copy of `taken` is stale
    mine = a.create("alice").id
    step(a, mine, rng, "alice")
    before = {sid: record(redis_server, sid) for sid in (taken, mine)}
    writes = a.replication.stats()["writes"]

    assert a.flush(final=True) == 0
    assert a.replication.stats()["writes"] == writes
    assert a.replication.stats()["moved"] == 0  # A's stale copy was not even tried
    assert {sid: record(redis_server, sid) for sid in (taken, mine)} == before


def test_a_lost_reply_then_a_rollback_recovers_the_newest_copy(redis_server):
    rng = np.random.default_rng(5)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    old = record(redis_server, sid)  # v2
    with replies_lost(a):
        last = step(a, sid, rng)  # applied (v3), reply lost: degraded
    assert a.replication.degraded
    assert written(a, sid)[2] == 3 and a.replication._version[sid] == 2
    roll_back(redis_server, sid, old)
    a.replication._try_recover()
    assert not a.replication.degraded
    position, state, version = written(a, sid)
    assert position == 2 and version == 3
    np.testing.assert_array_equal(state, last)
    x = step(a, sid, rng)
    np.testing.assert_array_equal(written(a, sid)[1], x)


def test_a_lost_reply_whose_record_is_ahead_is_not_taken_for_a_rollback(redis_server):
    """Our write applied, reply lost, and no outage seen (the write path itself): the record
    is AHEAD of our version; the next write must not be refused as 'moved' by the new branch
    nor write anything older."""
    rng = np.random.default_rng(6)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    with replies_lost(a):
        step(a, sid, rng)
    a.replication._try_recover()
    x = step(a, sid, rng)
    np.testing.assert_array_equal(written(a, sid)[1], x)
    assert a.replication.stats()["moved"] == 0


def test_a_close_after_a_rollback_stays_closed(redis_server):
    rng = np.random.default_rng(7)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    old = record(redis_server, sid)
    step(a, sid, rng, "alice")
    roll_back(redis_server, sid, old)
    a.close(sid, "alice")
    assert not a.replication.backend.exists(sid)
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_an_evicted_copy_is_not_written_back_by_its_old_holder(redis_server):
    """A evicted the session (its keys deleted), Redis then rolled back to a record of it: A
    has no copy any more, so nothing is written back over it from A (the doc's 'comes back as
    it was in the older data'); A's own fetch loads it like any replica's."""
    now = [0.0]
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", lease_ttl=5.0, ttl=10.0, clock=lambda: now[0])
    sid = a.create().id
    step(a, sid, rng)
    old = record(redis_server, sid)
    now[0] = 11.0
    assert a.evict_idle() == [sid]
    a.replication._delete_dropped()
    roll_back(redis_server, sid, old)
    a.fetch(sid)
    assert a.replication.stats()["loads"] == 1 and written(a, sid)[2] == int(old[b"version"])


def test_a_take_over_between_the_refused_write_and_its_write_back_wins_alone(redis_server):
    """_PUT answers -6 (lease absent), then B takes the session over before A's _RESTORE
    (the second round trip): A's write-back is refused and A drops its copy; one holder."""
    rng = np.random.default_rng(9)
    a = replica(redis_server, "A", lease_ttl=5.0)
    b = replica(redis_server, "B", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    old = record(redis_server, sid)
    step(a, sid, rng)
    roll_back(redis_server, sid, old)
    be = a.replication.backend
    real = be.write_many
    calls = []

    def racing(items, owner, lease_ms):
        calls.append([it[-1] for it in items])
        if len(calls) == 2:  # the write-back: B takes the session over first
            b.fetch(sid)
        return real(items, owner, lease_ms)

    be.write_many = racing
    with pytest.raises(Unavailable):
        step(a, sid, rng)
    be.write_many = real
    assert calls == [[False], [True]]
    assert sid not in {s.id for s in a.sessions()}
    assert b.held(sid)
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"B"
    x = step(b, sid, rng)
    np.testing.assert_array_equal(written(b, sid)[1], x)


def test_another_incarnations_rolled_back_record_is_not_overwritten(redis_server):
    """Redis rolled back to a record of an earlier incarnation of the id (A held it too): A's
    copy of the new incarnation must not take it for its own older write."""
    rng = np.random.default_rng(10)
    a = replica(redis_server, "A", lease_ttl=5.0)
    a.create(session_id="chat-1")
    step(a, "chat-1", rng)
    step(a, "chat-1", rng)
    step(a, "chat-1", rng)
    old = record(redis_server, "chat-1")  # v4 of the first incarnation
    a.close("chat-1")
    a.create(session_id="chat-1")
    for _ in range(5):
        step(a, "chat-1", rng)  # v6 of the second
    roll_back(redis_server, "chat-1", old)
    with pytest.raises(Unavailable):
        step(a, "chat-1", rng)  # not ours: dropped as moved (the pre-change behaviour)
    assert written(a, "chat-1")[2] == 4


def test_a_fork_made_on_the_holder_then_rolled_back_is_written_back(redis_server):
    rng = np.random.default_rng(11)
    a = replica(redis_server, "A", lease_ttl=5.0)
    parent = a.create().id
    step(a, parent, rng)
    child = a.fork(parent).id  # written (v1), lease released
    a.fetch(child)
    step(a, child, rng)
    old = record(redis_server, child)  # v2
    last = step(a, child, rng)  # v3
    roll_back(redis_server, child, old)
    a.replication._lease_until[child] = 0.0
    a.fetch(child)
    np.testing.assert_array_equal(written(a, child)[1], last)


def test_the_outage_path_is_unchanged_by_a_rollback(redis_server):
    rng = np.random.default_rng(12)
    a, sid, old = stepped_twice(redis_server, rng)
    outage(a)
    last = step(a, sid, rng)  # served from memory
    roll_back(redis_server, sid, old)
    a.replication._try_recover()
    np.testing.assert_array_equal(written(a, sid)[1], last)


def test_write_behind_keeps_dirty_steps_when_only_the_lease_was_rolled_back(redis_server):
    """The record is our copy's last write, only the lease is gone: the write takes the
    lease back and writes the unwritten steps (it used to drop them as 'moved')."""
    rng = np.random.default_rng(13)
    a = replica(redis_server, "A", persist_every="10000ms", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    a.replication._write_dirty()
    last = step(a, sid, rng)  # dirty
    roll_back(redis_server, sid, record(redis_server, sid))  # same record, lease gone
    a.replication._write_dirty()
    assert sid in {s.id for s in a.sessions()}
    np.testing.assert_array_equal(written(a, sid)[1], last)


def test_a_lapsed_lease_no_one_took_is_taken_back_by_the_next_write(redis_server):
    """Write-through: the holder's lease lapsed (a long pause) and no replica took the
    session over: its next write takes the lease back instead of dropping the session as
    'moved'. Another replica then waits for that lease, as for any held session."""
    rng = np.random.default_rng(14)
    # a 60 s lease: its full TTL (not a lease left over or one without expiry) is told from a
    # loaded machine's pause between the write and the check by a wide margin
    a = replica(redis_server, "A", lease_ttl=60.0)
    sid = a.create().id
    step(a, sid, rng)
    cli = redis.Redis.from_url(redis_server.url)
    cli.delete(f"ssmstream:l:{sid}")
    last = step(a, sid, rng)
    assert written(a, sid)[0] == 2 and a.replication.stats()["moved"] == 0
    np.testing.assert_array_equal(written(a, sid)[1], last)
    assert cli.get(f"ssmstream:l:{sid}") == b"A"
    assert 50_000 < cli.pttl(f"ssmstream:l:{sid}") <= 60_000
    b = replica(redis_server, "B", lease_ttl=60.0, lease_wait=0.2)
    with pytest.raises(SessionBusy, match="held by replica 'A'"):
        b.fetch(sid)


def test_a_lapsed_lease_another_replica_took_over_is_not_taken_back(redis_server):
    """The same pause, but another replica took the session over meanwhile (the term went
    up): the holder's write is refused and its copy dropped; the other replica keeps it."""
    rng = np.random.default_rng(15)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid)
    mine = step(b, sid, rng)
    a.replication._lease_until[sid] = time.monotonic() + 10  # A still believes it holds it
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"B"
    np.testing.assert_array_equal(written(b, sid)[1], mine)


def test_a_refused_write_after_a_take_over_takes_no_lease(redis_server):
    """Another replica took the session over without stepping it (same version, a higher
    term) and its lease lapsed too: the old holder's write is refused and leaves the lease
    free, for whichever replica the session's next request reaches."""
    rng = np.random.default_rng(16)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)
    time.sleep(0.3)  # A's lease lapses
    b.fetch(sid)  # term 1, version unchanged
    time.sleep(0.3)  # B's lease lapses
    a.replication._lease_until[sid] = time.monotonic() + 10  # A still believes it holds it
    with pytest.raises(Unavailable, match="another replica"):
        step(a, sid, rng)
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") is None


def test_a_shutdown_flush_writes_back_an_older_record_that_names_no_holder(redis_server):
    """A record that went back to fewer of A's writes and names no holder (as an older
    release wrote it) is A's own: A's shutdown flush writes its newer clean copy back."""
    rng = np.random.default_rng(33)
    a, sid, old = stepped_twice(redis_server, rng)
    want = a.read(a.get(sid))
    del old[b"holder"]
    roll_back(redis_server, sid, old)
    assert written(a, sid)[0] == 1
    assert a.flush() == 0
    position, state, _ = written(a, sid)
    assert position == 2
    np.testing.assert_array_equal(state, want)
