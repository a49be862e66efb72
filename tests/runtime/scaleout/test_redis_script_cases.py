"""More of the Lua scripts' contracts, on a real redis-server through RedisBackend: cases
the replicas' own flows reach only through a lost reply or a race, each pinned to what it
answers and what it leaves in Redis."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from ssmstream.runtime.redis_backend import LOST, TAKEN, StoreReset
from stores import S, replica, step

pytestmark = pytest.mark.timeout(30)


def _client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def test_a_write_behind_the_record_under_a_lapsed_lease_takes_no_lease(redis_server):
    """Our lease lapsed and the record is ahead of the version our copy names (a reply of
    ours was lost): the write is refused as LOST and the lease stays free, as only a
    record that is exactly our copy has its lapsed lease taken back."""
    rng = np.random.default_rng(11)
    a = replica(redis_server, "A", lease_ttl=5.0)
    s = a.create()
    step(a, s.id, rng)  # version 2
    be = a.replication.backend
    be.release([s.id], "A")  # as a lapsed lease
    snap = a.pack_state(np.zeros(S, np.float32), 0)
    out = be.write_many([(s.id, 1, 0, snap, "", s.ttl, s.incarnation, False)], "A", 5000)
    assert out == [(LOST, 0)]
    assert _client(redis_server).get(be.lease(s.id)) is None
    assert be.load(s.id)["version"] == 2


def test_a_first_write_after_another_replica_claimed_the_id_is_refused(redis_server):
    """Replica A's claim of a new id lapsed before its first write and replica B claimed the
    id meanwhile: A's first write is refused (LOST), writes no record and leaves B's lease."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    be = a.replication.backend
    sid = "new-id"
    assert be.claim(sid, "A", 5000)
    _client(redis_server).delete(be.lease(sid))  # A's claim lapsed
    assert be.claim(sid, "B", 5000)
    snap = a.pack_state(np.zeros(S, np.float32), 0)
    out = be.write_many([(sid, 0, 0, snap, "", 60.0, "inc-A", False)], "A", 5000)
    assert out == [(LOST, 0)]
    assert _client(redis_server).get(be.lease(sid)) == b"B"
    assert be.load(sid) is None


def test_undoing_a_take_over_the_record_moved_past_changes_nothing(redis_server):
    """An undo names the term its take-over gave: once a later take-over raised the term
    again (the same replica holding the lease), undoing the first one is refused and leaves
    the later term and holder as they are."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create("p").id
    be = a.replication.backend
    be.release([sid], "A")
    code, first = be.take(sid, "B", 5000, "p", ("", -1, -1))
    assert (code, first["term"], first["holder"]) == (TAKEN, 0, "A")
    be.release([sid], "B")
    assert be.take(sid, "C", 5000, "p", ("", -1, -1))[0] == TAKEN  # term 2, holder C
    be.release([sid], "C")
    assert be.take(sid, "B", 5000, "p", ("", -1, -1))[0] == TAKEN  # term 3, holder B
    assert be.untake(sid, "B", first) is False
    rec = be.load(sid)
    assert (rec["term"], rec["holder"]) == (3, "B")


def test_a_delete_in_a_data_set_not_joined_deletes_nothing(redis_server):
    """Redis's generation token is no longer the one this replica joined: a delete raises
    StoreReset and leaves the record, its lease and no tombstone (the replica writes its
    sessions back first, as after an outage)."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    s = a.create()
    be = a.replication.backend
    cli = _client(redis_server)
    cli.set("ssmstream:generation", "another-data-set")
    with pytest.raises(StoreReset):
        be.drop_many([(s.id, s.incarnation, 1, 0, 60_000, "closed")], "A")
    assert be.load(s.id)["version"] == 1
    assert cli.get(be.lease(s.id)) == b"A"
    assert be.gone(s.id, s.incarnation) is None
