"""The replication's bookkeeping at its edges: a fetch whose reply was lost, a close that
races a take-over or a write, an id created again during its old session's write, a
write-back left pending, a take-over of a copy with unwritten steps, and a replicated
server's background thread (written behind while it serves, stopped with it)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import redis
from ssmstream.runtime.auth import ANONYMOUS
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.errors import Unavailable
from ssmstream.runtime.redis_backend import RedisBackend
from ssmstream.runtime.server import BackgroundServer
from stores import S, record, replica, roll_back, step, written

pytestmark = pytest.mark.timeout(120)


# A fetch whose _TAKE raised the term of a rolled-back record (OLDER, term 0 -> 1, `raised`
# naming us) but whose reply was lost: the replica keeps term 0 in memory. Its recovery
# write-back must recognise that raise as its own (the `raised` marker _TAKE sets) and write
# its copy, not refuse it as stale and drop the only copy of the acknowledged steps.
def test_a_lost_reply_of_an_older_fetch_that_raised_the_term_keeps_the_copy(redis_server):
    rng = np.random.default_rng(41)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    old = record(redis_server, sid)  # version 2, term 0, holder A
    step(a, sid, rng)  # version 3
    roll_back(redis_server, sid, old)  # Redis went back to version 2, lease gone
    a.replication._lease_until[sid] = 0.0  # as after a renewal that found the lease gone
    be = a.replication.backend
    real = be.take

    def applied_then_timed_out(*args, **kw):
        be.take = real
        real(*args, **kw)  # OLDER: term 0 -> 1, holder A, raised A
        raise redis.TimeoutError("Timeout reading from socket")

    be.take = applied_then_timed_out
    with pytest.raises(Unavailable):
        a.fetch(sid)
    assert a.replication.degraded and a.replication._term[sid] == 0
    rec = be.load(sid)
    assert (rec["term"], rec["holder"], rec["version"]) == (1, "A", 2)
    last = step(a, sid, rng)  # acknowledged, served from memory (position 3)
    a.replication._try_recover()  # write-back: term 0 here, 1 (A's own raise) in Redis
    assert not a.replication.degraded
    assert a.replication.stats()["moved"] == 0 and a.local(sid) is not None
    position, state, _ = written(a, sid)
    assert position == 3
    np.testing.assert_array_equal(state, last)
    assert be.load(sid)["term"] == 1 and a.replication._term[sid] == 1


# --persist-every N > 1: a session left pending by a write-back (its row was lent while Redis
# came back empty) is written back by its step's own commit, at once, whatever N says (not
# only at the Nth step or by the background thread's next period).
def test_a_pending_session_is_written_back_by_its_next_commit_in_step_mode(redis_server):
    rng = np.random.default_rng(45)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)  # step 1 of 4: not written yet
    redis_server.stop()
    redis_server.start()  # empty
    a.replication._degrade(RuntimeError("test"))
    (s,) = a.lend([a.get(sid)])  # a step holds the row: the write-back leaves it pending
    a.replication._try_recover()
    assert not a.replication.degraded and not a.replication.backend.exists(sid)
    x = rng.standard_normal(S).astype(np.float32)
    a.slab.write(s.slot, x)  # what the slot step does to the row
    assert a.give_back([s], 1) == [2]  # its commit writes it back (no background thread)
    assert a.replication.backend.exists(sid), "the commit did not write the session back"
    position, state, _ = written(a, sid)
    assert position == 2
    np.testing.assert_array_equal(state, x)
    assert a.replication.stats()["dirty"] == 0
    be = a.replication.backend
    assert be.client.get(be.lease(sid)) == b"A"  # the write-back took the lease back


# --persist-every Nms (write-behind): a session left pending by a write-back (its row was
# lent while Redis came back empty; its step then failed, so no commit wrote it) is written
# back by the write-behind pass and by the shutdown flush, not lost with the replica.
def pending_after_an_empty_restart(redis_server, rng):
    a = replica(redis_server, "A", persist_every="50ms", lease_ttl=5.0)
    sid = a.create().id
    x = step(a, sid, rng)
    a.flush()  # all written: only the write-back is left to do
    redis_server.stop()
    redis_server.start()  # empty
    a.replication._degrade(RuntimeError("test"))
    (s,) = a.lend([a.get(sid)])
    a.replication._try_recover()  # the row is lent: the session stays pending
    assert not a.replication.degraded and not a.replication.backend.exists(sid)
    a.give_back([s], 0)  # its step failed: nothing committed, nothing written
    assert a.replication.stats()["dirty"] == 1
    return a, sid, x


@pytest.mark.parametrize("by", ["write_behind", "shutdown"])
def test_a_pending_session_is_written_back_in_write_behind_mode(redis_server, by):
    rng = np.random.default_rng(49)
    a, sid, x = pending_after_an_empty_restart(redis_server, rng)
    if by == "write_behind":
        a.replication._write_dirty()  # what the background thread does every 50 ms
    else:
        assert a.flush() == 0  # no step lost
    assert a.replication.backend.exists(sid), "the pending session was not written back"
    assert a.replication.stats()["dirty"] == 0
    b = replica(redis_server, "B", lease_ttl=5.0, lease_wait=6.0)
    if by == "write_behind":
        a.flush()  # releases A's lease
    b.fetch(sid)
    s = b.get(sid)
    assert s.position == 1
    np.testing.assert_array_equal(b.read(s), x)


# A copy with unwritten steps (--persist-every N) that another replica took over meanwhile:
# fetching the session back loads the other replica's record, and the steps of the old copy
# are gone with it: nothing counts as unwritten any more (the dirty-sessions gauge says 0, and
# a shutdown reports no lost steps).
def test_a_take_over_of_a_copy_with_unwritten_steps_leaves_nothing_dirty(redis_server):
    rng = np.random.default_rng(48)
    a = replica(redis_server, "A", persist_every="4", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create().id
    step(a, sid, rng)  # step 1 of 4: not written
    assert a.replication.stats()["dirty"] == 1
    time.sleep(0.3)  # A's lease lapses (A paused)
    b.fetch(sid)  # B takes it over from the record without A's step
    newest = step(b, sid, rng)
    b.flush()  # written, lease released
    a.fetch(sid)  # A takes it back: B's record replaces A's old copy
    s = a.get(sid)
    assert s.position == 1
    np.testing.assert_array_equal(a.read(s), newest)
    assert a.replication.stats()["dirty"] == 0
    assert a.flush() == 0


# A session closed while the background thread's write of it is in flight: once that write
# returns, the replication forgets the closed session (no version or dirty count left behind
# for an id that is gone: one leaked entry per such close otherwise), and its keys are gone.
def test_a_close_during_a_write_behind_leaves_no_bookkeeping(redis_server):
    rng = np.random.default_rng(46)
    a = replica(redis_server, "A", persist_every="50ms", lease_ttl=5.0)
    r = a.replication
    s = a.create()
    sid = s.id
    step(a, sid, rng)  # dirty: for the write-behind
    real = r.backend.write_many

    def write_many(*args):  # the Close lands while this write's reply is on its way
        out = real(*args)
        a.close(sid)
        return out

    r.backend.write_many = write_many
    try:
        assert r._write_dirty() == 1  # what the background thread does each interval
    finally:
        r.backend.write_many = real
    assert a.local(sid) is None and not s.live
    assert r.backend.load(sid) is None and r.backend.gone(sid, s.incarnation) == "closed"
    assert sid not in r._version and sid not in r._dirty and sid not in r._used
    assert r.stats()["dirty"] == 0 and a.flush() == 0


# A server with --state-store runs the replication's background thread while it serves
# (write-behind: a step is in Redis within the interval, long before the shutdown) and at
# stop flushes with `final` (a fetch after it takes no lease) and ends that thread. Its
# start line names the store (no sessions are restored from a --state-dir).
def test_a_replicated_server_writes_behind_while_serving_and_stops_its_store(
    toy_token_model, redis_server, caplog
):
    caplog.set_level(logging.INFO, logger="ssmstream.runtime.server")
    cfg = ServerConfig(
        model_dir=str(toy_token_model["model_dir"]), host="127.0.0.1", port=0, device="cpu",
        grace=0.2, state_store=redis_server.url, persist_every="50ms", lease_ttl=5.0,
        replica_id="R1",
    )  # fmt: skip
    backend = RedisBackend(redis_server.url, timeout=2.0)
    srv = BackgroundServer(cfg).start()
    try:
        (serving,) = [r.getMessage() for r in caplog.records if "serving model" in r.msg]
        assert f"; sessions in {redis_server.url} (persist every 50ms, lease 5s); " in serving
        assert "restored" not in serving
        replication = srv.server.store.replication
        thread = replication._thread
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            s = c.create_session()
            sid = s.id
            assert backend.load(sid)["version"] == 1  # written at its creation
            s.step(tokens=[1, 2, 3])
        # write-behind: the background thread writes the step within its 50 ms interval
        deadline = time.monotonic() + 10
        while backend.load(sid)["version"] < 2:
            assert time.monotonic() < deadline, "the step was not written behind"
            time.sleep(0.02)
        position, _ = srv.server.store.unpack(backend.load(sid)["snap"])
        assert position == 3
    finally:
        srv.stop()
    assert srv.server.unsaved == 0
    assert not thread.is_alive()  # the store's background thread ended with the server
    assert backend.client.get(backend.lease(sid)) is None  # released at the shutdown
    with pytest.raises(Unavailable, match="shutting down"):
        srv.server.store.fetch(sid, ANONYMOUS)  # the final flush ran: no lease is taken
    assert backend.client.get(backend.lease(sid)) is None
    backend.client.close()


def rounds_until(store, done, what: str) -> None:
    """Run the replication's background rounds until done() (10 s at most, else `what`)."""
    store.replication.start()
    try:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)
    finally:
        store.replication.stop()


def failing_rounds(store, monkeypatch, *errors: Exception) -> list[float]:
    """The store's background rounds raise `errors`, one a round, then run as they do; returns
    the rounds' start times (it grows as they run)."""
    real, calls = store.replication._write_dirty, []

    def round_():
        calls.append(time.monotonic())
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        real()

    monkeypatch.setattr(store.replication, "_write_dirty", round_)
    return calls


def test_a_background_round_that_fails_logs_its_traceback_once_and_goes_on(
    redis_server, caplog, monkeypatch
):
    """A failure that is not Redis's (a bug in a round) is logged with its traceback the
    first time in a row, not every period (one a second per server until it is fixed); the
    rounds go on, and the round that works again says so and writes what was left."""
    rng = np.random.default_rng(43)
    a = replica(redis_server, "A", persist_every="20ms", lease_ttl=5.0)
    calls = failing_rounds(a, monkeypatch, *(RuntimeError("a bug in a round") for _ in range(5)))
    sid = a.create().id
    last = step(a, sid, rng)
    caplog.set_level("INFO", logger="ssmstream")
    rounds_until(a, lambda: written(a, sid)[0] >= 1, "the step was not written after the failures")
    failed = [r for r in caplog.records if "background work failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info and failed[0].levelname == "ERROR"
    again = [r for r in caplog.records if "works again" in r.getMessage()]
    assert [r.getMessage() for r in again] == [
        "state store background work works again after 5 failed rounds"
    ]
    np.testing.assert_array_equal(written(a, sid)[1], last)
    assert len(calls) >= 6 and not a.replication.degraded


def test_a_round_that_fails_in_redis_is_not_said_to_work_again(redis_server, caplog, monkeypatch):
    """Rounds that failed by a bug, then one that Redis fails: that round degrades the store,
    it does not work again. "works again" is said once a round has run whole, after the
    store is back."""
    rng = np.random.default_rng(47)
    a = replica(redis_server, "A", persist_every="20ms", lease_ttl=5.0)
    bugs = (RuntimeError("a bug in a round") for _ in range(3))
    failing_rounds(a, monkeypatch, *bugs, redis.ConnectionError("Connection refused"))
    sid = a.create().id
    last = step(a, sid, rng)
    caplog.set_level("INFO", logger="ssmstream")
    worked = lambda: any("works again" in r.getMessage() for r in caplog.records)  # noqa: E731
    rounds_until(a, worked, "no round worked again")
    said = [r.getMessage() for r in caplog.records]
    down = next(i for i, m in enumerate(said) if "unavailable (Connection refused)" in m)
    back = next(i for i, m in enumerate(said) if " is back: " in m)
    again = [i for i, m in enumerate(said) if "works again" in m]
    assert len(again) == 1 and down < back < again[0], said
    assert said[again[0]] == "state store background work works again after 3 failed rounds"
    np.testing.assert_array_equal(written(a, sid)[1], last)
