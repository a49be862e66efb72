"""Redis going back to older data, combined with what else happens around it: a lost reply of
a write that raised the term, a close while such a write is in flight, and a replica holding an
idle copy that another replica's take-over (which the older data lack) made stale."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
from ssmstream.runtime.errors import ModelError, SessionNotFound, Unavailable
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


def kept_and_written(store, sid: str, state: np.ndarray) -> None:
    """The store still serves `sid` (not dropped as moved) and Redis holds `state` for it."""
    assert store.replication.stats()["moved"] == 0
    assert sid in {s.id for s in store.sessions()}
    np.testing.assert_array_equal(written(store, sid)[1], state)


def _second_reply_lost(store):
    """The store's first write_many goes through; the second applies but its reply is lost."""
    backend = store.replication.backend
    real = backend.write_many
    calls = []

    def flaky(*args):
        calls.append(args)
        out = real(*args)
        if len(calls) == 2:
            raise redis.TimeoutError("Timeout reading from socket")
        return out

    backend.write_many = flaky
    return real, calls


# --- lost replies of writes around a term raise: the raiser's copy is not taken for stale ---


def test_a_lost_reply_of_an_outage_write_back_that_raised_the_term_keeps_later_steps(
    redis_server,
):
    """Redis comes back from an older dump after an outage; A's write-back applies but its
    reply is lost (A stays degraded). The step A serves from memory meanwhile is written back
    at the next recovery."""
    rng = np.random.default_rng(21)
    a, sid, old = stepped_twice(redis_server, rng)
    outage(a)
    step(a, sid, rng)  # served from memory
    roll_back(redis_server, sid, old)
    with replies_lost(a):
        a.replication._try_recover()  # applied, reply lost
    assert a.replication.degraded
    last = step(a, sid, rng)  # acknowledged, served from memory
    a.replication._try_recover()
    assert not a.replication.degraded
    kept_and_written(a, sid, last)


def test_a_lost_reply_of_the_write_back_after_a_behind_write_keeps_later_steps(redis_server):
    """Write-through after Redis went back: _PUT answers BEHIND (term 0 -> 1), and the reply
    of the write-back that follows is lost. The step A serves from memory meanwhile is written
    back at the recovery (the write-back keeps the term it was given)."""
    rng = np.random.default_rng(22)
    a, sid, old = stepped_twice(redis_server, rng)
    roll_back(redis_server, sid, old)
    real, calls = _second_reply_lost(a)
    step(a, sid, rng)  # _PUT BEHIND, then _RESTORE applied with its reply lost: degraded
    a.replication.backend.write_many = real
    assert len(calls) == 2 and a.replication.degraded
    last = step(a, sid, rng)  # served from memory
    a.replication._try_recover()
    kept_and_written(a, sid, last)


def test_a_lost_reply_of_the_write_back_after_an_older_fetch_keeps_later_steps(redis_server):
    """A's fetch finds its record went back: _TAKE answers OLDER and raises the term 0 -> 1;
    the reply of the write-back that follows is lost (the fetch fails, A degrades and keeps
    its copy). The step A serves from memory meanwhile is written back at the recovery."""
    rng = np.random.default_rng(28)
    a, sid, old = stepped_twice(redis_server, rng)
    roll_back(redis_server, sid, old)
    a.replication._lease_until[sid] = 0.0  # as after a renewal that found the lease gone
    with replies_lost(a), pytest.raises(Unavailable):
        a.fetch(sid)
    assert a.replication.degraded and sid in {s.id for s in a.sessions()}
    last = step(a, sid, rng)  # served from memory
    a.replication._try_recover()
    kept_and_written(a, sid, last)


def test_a_lost_reply_of_a_behind_write_keeps_the_steps(redis_server):
    """_PUT answers BEHIND and raises the term 0 -> 1, but the reply is lost: A still has
    term 0. Its recovery write-back finds the next term naming A as holder, its own raise,
    takes that term on and writes its copy (not refused as stale, which would drop it)."""
    rng = np.random.default_rng(23)
    a, sid, old = stepped_twice(redis_server, rng)
    roll_back(redis_server, sid, old)
    with replies_lost(a):
        step(a, sid, rng)  # _PUT applied (term raised), reply lost: degraded
    last = step(a, sid, rng)  # served from memory
    a.replication._try_recover()
    assert sid in {s.id for s in a.sessions()}
    np.testing.assert_array_equal(written(a, sid)[1], last)


def _take_reply_lost(store):
    """The store's next `take` (_TAKE) applies in Redis but its reply times out."""
    be = store.replication.backend
    real = be.take

    def applied_then_timed_out(*args, **kw):
        be.take = real
        real(*args, **kw)
        raise redis.TimeoutError("Timeout reading from socket")

    be.take = applied_then_timed_out


def test_a_lost_take_over_reply_is_not_taken_for_a_term_raise_of_ones_own(
    redis_server,
):
    """Redis goes back to before B's take-over; A, the holder, raises the term (fetch: OLDER,
    term 0 -> 1) and steps: A's copy is the newest, B's (term 1, the forgotten take-over) ties
    and must lose on the holder. B's fetch takes the session over (term 1 -> 2, holder B) to
    load A's record, but the reply is lost: B keeps its own stale term-1 copy. B's recovery
    write-back finds the next term naming B, but from a take-over, not a term raise of B's
    own: it is refused as stale, and A's acknowledged step stays."""
    rng = np.random.default_rng(31)
    a, b, sid, old = taken_over(redis_server, rng)  # B's take-over: term 1, holder B
    roll_back(redis_server, sid, old)  # term 0, holder A, v2: B's take-over forgotten
    a.fetch(sid, "alice")  # OLDER: term 0 -> 1, A's copy written back at term 1
    assert a.replication._term[sid] == 1
    newest = step(a, sid, rng, "alice")  # acknowledged (write-through)
    np.testing.assert_array_equal(written(a, sid)[1], newest)
    time.sleep(0.3)  # A idle: its lease lapses
    b.replication._lease_until[sid] = 0.0
    _take_reply_lost(b)
    with pytest.raises(Unavailable):
        b.fetch(sid, "alice")  # TAKEN applied (term 2, holder B), reply lost
    assert b.replication.degraded and b.local(sid) is not None
    b.replication._try_recover()
    np.testing.assert_array_equal(written(a, sid)[1], newest)  # A's step is not lost


def test_a_close_after_a_lost_reply_of_a_term_raise_deletes_the_record(redis_server):
    """A's write finds its record went back (BEHIND: term 0 -> 1, holder A) but the reply is
    lost; A degrades and the client closes the session. The queued delete names term 0
    and takes the record of term 1 that A raised as A's own: it is deleted, and no other
    replica serves the closed session."""
    rng = np.random.default_rng(32)
    a, sid, old = stepped_twice(redis_server, rng, "alice")
    roll_back(redis_server, sid, old)
    with replies_lost(a):
        step(a, sid, rng, "alice")  # _PUT applied (term raised), reply lost: degraded
    assert a.replication.degraded
    a.close(sid, "alice")  # degraded: the delete is queued
    a.replication._try_recover()  # deletes queued first
    assert not a.replication.degraded
    a.replication._delete_dropped()
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:l:{sid}")
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_a_take_over_copy_wins_at_its_next_write_after_redis_went_back(redis_server):
    """B took the session over (term 1) and serves it; Redis goes back to before the take-over
    (term 0, holder A, no lease). B still holds its lease locally and steps: _PUT finds a
    stale record of a lower term under no one's lease, and B writes its newest copy back
    (instead of dropping it as moved)."""
    rng = np.random.default_rng(33)
    a, b, sid, old = taken_over(redis_server, rng)  # B's step: only B's copy holds it
    roll_back(redis_server, sid, old)
    b.replication._lease_until[sid] = time.monotonic() + 5.0  # B's lease holds, as B knows
    newest = step(b, sid, rng, "alice")
    assert b.local(sid) is not None and b.replication.stats()["moved"] == 0
    np.testing.assert_array_equal(written(b, sid)[1], newest)
    assert int(record(redis_server, sid)[b"term"]) == 1


# --- a close racing a write that raised the term: its delete still applies ------------------


def test_a_close_during_an_outage_write_back_that_raised_the_term_deletes_the_record(
    redis_server,
):
    """The session is closed while the recovery's write-back over a rolled-back record is in
    flight (the close's `removed` runs under the store's lock, not _io): the queued delete
    still removes the record, and no other replica serves the closed session."""
    rng = np.random.default_rng(24)
    a, sid, old = stepped_twice(redis_server, rng, "alice")
    outage(a)
    roll_back(redis_server, sid, old)
    be = a.replication.backend
    real = be.write_many

    def closing(*args):
        a.close(sid, "alice")  # degraded: `closed` only queues the delete
        return real(*args)

    be.write_many = closing
    a.replication._try_recover()
    be.write_many = real
    assert not a.replication.degraded
    a.replication._delete_dropped()  # the background thread's next period
    assert not be.exists(sid)
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:l:{sid}")  # A's lease lapses
    b = replica(redis_server, "B")
    b.fetch(sid, "alice")
    with pytest.raises(SessionNotFound):
        b.get(sid, "alice")


def test_a_close_during_a_write_through_that_raised_the_term_deletes_the_record(redis_server):
    """A close lands while a step's write-through is in flight; the write finds the record
    went back (BEHIND: term 0 -> 1) and writes back at term 1: the queued delete names the new
    term, so it removes the record."""
    rng = np.random.default_rng(25)
    a, sid, old = stepped_twice(redis_server, rng, "alice")
    roll_back(redis_server, sid, old)
    be = a.replication.backend
    real = be.write_many
    closer: list[threading.Thread] = []

    def closing(*args):
        if not closer:
            t = threading.Thread(target=a.close, args=(sid, "alice"))
            closer.append(t)
            t.start()
            while a.local(sid) is not None:  # `removed` ran; `closed` waits for _io
                time.sleep(0.001)
        return real(*args)

    be.write_many = closing
    step(a, sid, rng, "alice")
    be.write_many = real
    closer[0].join(5)
    a.replication._delete_dropped()
    assert not be.exists(sid)


# --- an idle stale copy does not beat the replica that took the session over ----------------


def _stale_copy_on_a(redis_server, rng):
    """A steps alice's session to v3 (`old`: its record at v2, term 0, holder A); A's lease
    lapses (A idle) and B takes the session over (term 1) and steps it twice: B's copy holds
    every step A's does and more. Redis then goes back to `old` (older than A's copy, and
    without B's take-over). A, B, the id, B's newest state."""
    a, b, sid, old = taken_over(redis_server, rng)
    newest = step(b, sid, rng, "alice")
    roll_back(redis_server, sid, old)
    return a, b, sid, newest


def test_an_idle_stale_copy_written_back_at_recovery_does_not_beat_the_take_over(redis_server):
    """Both replicas saw the outage of a Redis that came back from an older dump. A, whose
    copy is an idle prefix of B's, writes back first, at its term; B's write-back (the higher
    term of its take-over) wins: the newest copy wins whichever replica writes back first."""
    rng = np.random.default_rng(26)
    a, b, sid, newest = _stale_copy_on_a(redis_server, rng)
    outage(a)
    outage(b)
    a.replication._try_recover()
    b.replication._try_recover()
    c = replica(redis_server, "C", lease_wait=6.0)
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:l:{sid}")
    c.fetch(sid, "alice")
    np.testing.assert_array_equal(c.read(c.get(sid, "alice")), newest)


def test_a_shutdown_flush_of_an_idle_stale_copy_does_not_beat_the_take_over(redis_server):
    """A shuts down holding the idle stale copy (its lease lapsed long ago); its flush writes
    that copy back at its own term. B, the replica serving the session, finds its lease gone
    and fetches: the record's term is below B's copy's, so B writes its newest copy back."""
    rng = np.random.default_rng(27)
    a, b, sid, newest = _stale_copy_on_a(redis_server, rng)
    assert not a.replication.held(sid)  # A knows its lease lapsed
    assert a.flush(final=True) == 0
    b.replication._lease_until[sid] = 0.0  # as after a renewal that found the lease gone
    b.fetch(sid, "alice")
    np.testing.assert_array_equal(b.read(b.get(sid, "alice")), newest)


# --- take-overs, leases and the shutdown write-back ------------------------------------


def test_an_undone_take_over_keeps_the_raised_marker_of_a_lost_raise(redis_server):
    """Redis goes back to older data; A's next write raises the term (BEHIND, 0 -> 1, raised
    A) but its reply is lost: A degrades and serves from memory. B (another model) takes the
    session over (1 -> 2, raised cleared) and its load fails: _UNTAKE puts back term 1,
    holder A and `raised`, so A's recovery write-back still recognises its own raise and
    writes its acknowledged steps."""
    rng = np.random.default_rng(301)
    a, sid, old = stepped_twice(redis_server, rng)
    roll_back(redis_server, sid, old)
    with replies_lost(a):
        step(a, sid, rng)  # _PUT BEHIND applied (term 1, raised A), reply lost: degraded
    assert a.replication.degraded
    last = step(a, sid, rng)  # acknowledged, served from memory
    b = replica(redis_server, "B", model_sha="sha-B")
    with pytest.raises(ModelError):
        b.fetch(sid)  # TAKEN then _UNTAKE
    assert int(record(redis_server, sid)[b"term"]) == 1
    a.replication._try_recover()
    assert sid in {s.id for s in a.sessions()}, "A dropped its newest copy as stale"
    np.testing.assert_array_equal(written(a, sid)[1], last)


def test_a_shutdown_flush_does_not_overwrite_a_session_another_replica_serves(redis_server):
    """B took alice's session over (term 1) and went idle (lease lapsed); Redis then evicted
    the record (maxmemory) and A, whose idle copy is of term 0, was asked for it: NO_RECORD,
    A writes its copy back, holds the lease and serves a step. B shuts down: its flush finds
    a record of a lower term than its copy, but under A's lease: A serves the session, so
    B's flush leaves it alone (as a write or a fetch of B's would), and A's step stays."""
    rng = np.random.default_rng(302)
    a, b, sid, _ = taken_over(redis_server, rng)
    time.sleep(0.3)  # B's lease lapses (B idle)
    redis.Redis.from_url(redis_server.url).delete(f"ssmstream:s:{sid}")  # evicted
    a.replication._lease_ms = 5000
    a.fetch(sid, "alice")  # NO_RECORD: A writes its copy back and holds the lease
    served = step(a, sid, rng, "alice")
    assert written(a, sid)[1].tolist() == served.tolist()
    assert redis.Redis.from_url(redis_server.url).get(f"ssmstream:l:{sid}") == b"A"
    assert b.flush(final=True) == 0
    np.testing.assert_array_equal(written(a, sid)[1], served)
    step(a, sid, rng, "alice")
    assert a.replication.stats()["moved"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/scaleout.md): of two take-overs the older data lack, the copy "
    "written back first wins",
)
def test_the_newest_of_two_forgotten_take_overs_wins_after_a_rollback(redis_server):
    """A (term 0), then B (term 1), then C (term 2) served the session; Redis goes back to A's
    record (term 0, no lease). B and C both still think they hold the lease. B steps first:
    it writes its copy back over the lower term (term 1) and takes the lease. C's copy (term
    2) holds every step B's does and more, but C's next write finds B's lease."""
    rng = np.random.default_rng(303)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    c = replica(redis_server, "C", lease_ttl=0.2)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    old = record(redis_server, sid)
    time.sleep(0.3)
    b.fetch(sid, "alice")
    step(b, sid, rng, "alice")
    time.sleep(0.3)
    c.fetch(sid, "alice")
    step(c, sid, rng, "alice")
    roll_back(redis_server, sid, old)
    for store in (b, c):
        store.replication._lease_until[sid] = time.monotonic() + 5.0
    step(b, sid, rng, "alice")  # the stale middle copy writes itself back (term 1)
    newest = step(c, sid, rng, "alice")
    assert c.replication.stats()["moved"] == 0
    np.testing.assert_array_equal(written(c, sid)[1], newest)
