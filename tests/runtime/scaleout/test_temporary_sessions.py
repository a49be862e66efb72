"""Temporary sessions (a Generate without a session id and without keep_session, closed when
the call ends) are kept by the replica that serves the call only: nothing of them reaches
Redis, whatever --persist-every says, and no replication bookkeeping outlives them."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import BackgroundServer
from stores import outage, replica

pytestmark = pytest.mark.timeout(60)


def _keys(redis_server) -> set[bytes]:
    return set(redis.Redis.from_url(redis_server.url).keys("*"))


def test_a_temporary_generate_writes_nothing_to_redis(toy_token_model, redis_server):
    """Under write-through (--persist-every 1) a temporary Generate of 64 tokens makes no
    Redis write and leaves no key (no record, lease or tombstone); the same Generate on a
    kept session is written at its creation and at each of its 64 steps (the prompt, then
    each token fed but the last)."""
    cfg = ServerConfig(
        model_dir=str(toy_token_model["model_dir"]), host="127.0.0.1", port=0, device="cpu",
        grace=0.2, state_store=redis_server.url, persist_every="1", lease_ttl=30.0,
        replica_id="R1",
    )  # fmt: skip
    srv = BackgroundServer(cfg).start()
    try:
        counts = srv.server.store.replication.counts
        keys = _keys(redis_server)
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            temporary = [r.token for r in c.generate([1, 2, 3], max_new_tokens=64, seed=7)]
            assert (counts["writes"], _keys(redis_server)) == (0, keys)
            out = list(c.generate([1, 2, 3], max_new_tokens=64, seed=7, keep_session=True))
        assert counts["writes"] == 65
        assert [r.token for r in out] == temporary and len(temporary) == 64
        assert [s.id for s in srv.server.store.sessions()] == [out[0].session_id]
    finally:
        srv.stop()


def test_a_session_kept_here_only_is_never_written_leased_or_tombstoned(redis_server):
    """A session created with shared=False is held here without a lease, its steps are not
    written, neither a recovery after an outage nor a shutdown writes it back, and its close
    leaves nothing in Redis."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    keys = _keys(redis_server)
    s = a.create(shared=False)
    assert a.held(s.id)
    a.commit(a.get(s.id), np.ones(64, np.float32), 1)
    outage(a)
    a.replication._try_recover()
    assert not a.replication.degraded
    assert a.flush() == 0
    assert a.replication.counts["writes"] == 0 and _keys(redis_server) == keys
    assert a.get(s.id).position == 1
    a.close(s.id)
    assert _keys(redis_server) == keys
    assert not a.replication._local
