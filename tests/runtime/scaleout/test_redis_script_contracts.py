"""The Lua scripts' contracts, checked on a real redis-server through RedisBackend: what each
refuses and what it leaves in Redis (keys, expiries, the record's fields), including the
cases the replicas' own bookkeeping rarely reaches."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from ssmstream.runtime.redis_backend import BEHIND, STALE
from stores import S, outage, record, replica, roll_back, step, written

pytestmark = pytest.mark.timeout(30)


def _client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def test_a_claim_of_an_id_whose_record_exists_is_refused_and_takes_no_lease(redis_server):
    """An idle session (its lease lapsed, its record kept) on one replica: another replica's
    create of that id is refused at the claim, and the lease stays free for a take-over."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    a.replication.backend.release([sid], "A")  # as a lapsed lease
    b = replica(redis_server, "B", lease_ttl=5.0)
    assert b.replication.backend.claim(sid, "B", 5000) is False
    assert _client(redis_server).get(f"ssmstream:l:{sid}") is None
    assert b.replication.backend.load(sid)["version"] == 1


def test_a_write_naming_a_version_the_record_moved_past_is_refused(redis_server):
    """The compare-and-set compares the version too, not only the lease and the term: a
    write that builds on version 2 of a record at version 3 is refused (STALE) even under
    the writer's own lease and term, and the record keeps the newer state."""
    rng = np.random.default_rng(3)
    a = replica(redis_server, "A", lease_ttl=5.0)
    s = a.create()
    step(a, s.id, rng)
    x = step(a, s.id, rng)  # version 3
    be = a.replication.backend
    old = a.pack_state(np.zeros(S, np.float32), 0)
    out = be.write_many([(s.id, 2, 0, old, "", s.ttl, s.incarnation, False)], "A", 5000)
    assert out == [(STALE, 0)]
    position, state, version = written(a, s.id)
    assert version == 3 and position == 2
    np.testing.assert_array_equal(state, x)


def test_the_raised_mark_lasts_until_the_next_write(redis_server):
    """A write that finds the record went back to fewer of its writes raises the term and
    names the writer as `raised`; the writer's next write clears that mark."""
    rng = np.random.default_rng(4)
    a = replica(redis_server, "A", lease_ttl=5.0)
    s = a.create()
    step(a, s.id, rng)
    old = record(redis_server, s.id)  # version 2
    step(a, s.id, rng)  # version 3
    roll_back(redis_server, s.id, old)
    be = a.replication.backend
    snap = a.pack_state(np.ones(S, np.float32), 3)
    row = (s.id, 3, 0, snap, "", s.ttl, s.incarnation, False)
    assert be.write_many([row], "A", 5000) == [(BEHIND, 1)]
    assert (be.load(s.id)["term"], be.load(s.id)["raised"]) == (1, "A")
    assert be.write_many([(s.id, 2, 1, *row[3:])], "A", 5000) == [(3, 1)]
    rec = be.load(s.id)
    assert (rec["version"], rec["term"], rec["holder"], rec["raised"]) == (3, 1, "A", None)


@pytest.mark.parametrize("how", ["expired", "outage"])
def test_a_written_back_record_expires_after_its_ttl_and_a_minute(redis_server, how):
    """A write-back (the record vanished, or Redis was down) keeps the record's expiry as a
    write does: the session's TTL and a minute more, not forever; the lease it re-takes
    expires too."""
    rng = np.random.default_rng(6)
    a = replica(redis_server, "A", lease_ttl=5.0, ttl=10.0)
    sid = a.create().id
    step(a, sid, rng)
    cli = _client(redis_server)
    if how == "expired":
        cli.delete(f"ssmstream:s:{sid}")
        x = step(a, sid, rng)  # finds no record: written back
    else:
        outage(a)
        x = step(a, sid, rng)  # served from memory
        a.replication._try_recover()
        assert not a.replication.degraded
    position, state, _ = written(a, sid)
    assert position == 2
    np.testing.assert_array_equal(state, x)
    assert 65_000 < cli.pttl(f"ssmstream:s:{sid}") <= 70_000
    assert 0 < cli.pttl(f"ssmstream:l:{sid}") <= 5_000


def test_a_pipeline_that_finds_one_script_missing_runs_only_the_calls_that_did_not_run(
    redis_server,
):
    """Redis lost its script cache (a restart that kept its data): in one pipelined round
    trip a write whose script is loaded again applies, and a write-back whose script is not
    fails with NOSCRIPT. Only the write-back runs again; the applied write is not repeated
    (a second run would name a version the record moved past, and be refused as stale)."""
    rng = np.random.default_rng(7)
    a = replica(redis_server, "A", lease_ttl=5.0)
    s1, s2 = a.create(), a.create()
    be = a.replication.backend
    be.client.script_flush()
    step(a, s1.id, rng)  # loads the write's script again (version 2)
    be.client.delete(be.key(s2.id))  # s2's record vanished: its next write is a write-back
    x2 = rng.standard_normal(S).astype(np.float32)
    y1 = rng.standard_normal(S).astype(np.float32)
    rows = [
        (s1.id, 2, 0, a.pack_state(y1, 2), "", s1.ttl, s1.incarnation, False),
        (s2.id, 1, 0, a.pack_state(x2, 1), "", s2.ttl, s2.incarnation, True),
    ]
    assert be.write_many(rows, "A", 5000) == [(3, 0), (2, 0)]
    for sid, x, position, version in ((s1.id, y1, 2, 3), (s2.id, x2, 1, 2)):
        got_position, state, got_version = written(a, sid)
        assert (got_position, got_version) == (position, version)
        np.testing.assert_array_equal(state, x)


def test_a_delete_refused_because_the_record_moved_on_reports_it_and_keeps_the_record(
    redis_server,
):
    """drop_many answers, per item, whether it deleted: a delete naming a copy another
    replica took over since (an older term) deletes nothing and says so."""
    rng = np.random.default_rng(8)
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=5.0)
    s = a.create()
    step(a, s.id, rng)
    a.replication.backend.release([s.id], "A")  # A's lease lapsed
    b.fetch(s.id)
    x = step(b, s.id, rng)  # term 1, version 3, holder B
    be = a.replication.backend
    assert be.drop_many([(s.id, s.incarnation, 2, 0, 0, "evicted")], "A") == [False]
    position, state, version = written(b, s.id)
    assert (position, version) == (2, 3)
    np.testing.assert_array_equal(state, x)
    assert be.gone(s.id, s.incarnation) is None


def test_taking_back_a_record_ahead_of_our_copy_loads_it(redis_server):
    """A replica whose copy names an older version than the record of its own term and
    holdership (its last write applied, but it did not learn the new version) takes the
    session back by loading the record, not by keeping its copy's bookkeeping: its next
    step builds on the record and is written."""
    rng = np.random.default_rng(9)
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create().id
    step(a, sid, rng)
    x = step(a, sid, rng)  # version 3
    a.replication._version[sid] = 2  # the version its copy knows
    a.replication._lease_until.pop(sid)
    a.replication.backend.release([sid], "A")  # its lease lapsed
    a.fetch(sid)
    np.testing.assert_array_equal(a.read(a.get(sid)), x)
    y = step(a, sid, rng)
    position, state, version = written(a, sid)
    assert (position, version) == (3, 4)
    np.testing.assert_array_equal(state, y)
    assert a.replication.backend.load(sid)["term"] == 1


def test_a_take_over_clears_the_raised_mark(redis_server):
    """`raised` names the replica whose own term raise the record holds; a take-over by
    another replica raises the term again and clears it."""
    rng = np.random.default_rng(10)
    a = replica(redis_server, "A", lease_ttl=5.0)
    s = a.create()
    step(a, s.id, rng)
    old = record(redis_server, s.id)  # version 2
    x = step(a, s.id, rng)  # version 3
    roll_back(redis_server, s.id, old)
    be = a.replication.backend
    row = (s.id, 3, 0, a.pack_state(x, 2), "", s.ttl, s.incarnation, False)
    assert be.write_many([row], "A", 5000) == [(BEHIND, 1)]
    b = replica(redis_server, "B", lease_ttl=5.0)
    b.fetch(s.id)
    assert b.get(s.id).position == 1  # the record as it went back
    rec = be.load(s.id)
    assert (rec["term"], rec["holder"], rec["raised"]) == (2, "B", None)
