"""RedisReplication's bookkeeping in cases the other scale-out tests leave out: two replica
stores in one process on a real redis-server (tests/runtime/scaleout/stores.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from stores import replica, step, written

pytestmark = pytest.mark.timeout(60)


def test_an_empty_restart_is_noticed_and_an_idle_session_written_back(redis_server):
    """Redis restarts empty (its generation token gone too) while a session sits idle here:
    the background thread notices within a few periods, with no write to tell it, and writes
    the session back."""
    rng = np.random.default_rng(21)
    a = replica(redis_server, "A", lease_ttl=0.3)
    sid = a.create().id
    x = step(a, sid, rng)
    a.replication.backend.client.flushall()
    a.replication.start()
    try:
        deadline = time.monotonic() + 5
        while a.replication.backend.load(sid) is None:
            assert time.monotonic() < deadline, "the idle session was not written back"
            time.sleep(0.02)
    finally:
        a.replication.stop()
    position, state, _ = written(a, sid)
    assert position == 1
    np.testing.assert_array_equal(state, x)


def test_a_close_during_a_write_back_leaves_no_lease_bookkeeping(redis_server):
    """A session pending a write-back (its record vanished) is closed while that write-back's
    reply is on its way: the write-back's bookkeeping does not bring back the lease entry
    of the session just closed, and the delete that waited for it removes the record."""
    rng = np.random.default_rng(22)
    a = replica(redis_server, "A", lease_ttl=5.0)
    r = a.replication
    s = a.create()
    sid = s.id
    step(a, sid, rng)
    r.backend.client.delete(r.backend.key(sid), r.backend.lease(sid))  # the record vanished
    r._pending.add(sid)
    real = r.backend.write_many

    def write_many(*args):  # the Close arrives while this write's reply is on its way
        out = real(*args)
        closer = threading.Thread(target=a.close, args=(sid,))
        closer.start()
        closer.join(0.2)
        threads.append(closer)
        return out

    threads: list[threading.Thread] = []
    r.backend.write_many = write_many
    try:
        assert r._write_pending() == 1
    finally:
        r.backend.write_many = real
    threads[0].join(5)
    assert a.local(sid) is None and not s.live
    assert sid not in r._lease_until and sid not in r._pending
    assert r.backend.load(sid) is None and r.backend.gone(sid, s.incarnation) == "closed"


def test_closing_as_unusable_a_session_held_here_leaves_it_and_its_lease(redis_server):
    """A session with a copy here (a fetch made it between the failed load and this close)
    is not closed as unusable: its lease stays this replica's and its record's term and
    holder are untouched, so no other replica can take it while this one steps it."""
    rng = np.random.default_rng(23)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create("p").id
    step(a, sid, rng, "p")
    be = a.replication.backend
    assert a.close_unusable(sid, "p") is False
    assert a.get(sid, "p").position == 1
    assert be.client.get(be.lease(sid)) == b"A"
    rec = be.load(sid)
    assert (rec["version"], rec["term"], rec["holder"]) == (2, 0, "A")


def test_write_bytes_counts_the_snapshot_bytes_written(redis_server):
    """ssmstream_state_store_write_bytes: the bytes of the snapshots written (a create and
    two write-through steps: three snapshots of one size), not the number of writes."""
    rng = np.random.default_rng(24)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    step(a, sid, rng)
    size = len(a.replication.backend.load(sid)["snap"])
    assert size > 64 * 4
    assert a.replication.stats()["writes"] == 3
    assert a.replication.stats()["write_bytes"] == 3 * size
