"""Two replicas in one process: SessionStores composed with RedisReplications on one real
redis-server, and what the scale-out tests do to them (steps, lost replies, outages, Redis
going back to older data)."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import redis
from ssmstream.runtime.redis_backend import RedisBackend
from ssmstream.runtime.replication import RedisReplication
from ssmstream.runtime.sessions import SessionStore

S = 64


def replica(
    redis_server, name: str, persist_every="1", lease_ttl=0.4, lease_wait=2.0, **kw
) -> SessionStore:
    """One replica's store: a SessionStore composed with a RedisReplication. Its Redis I/O
    timeout is 2 s (the server's is 0.5 s): a loaded CI machine can keep redis-server off the
    cores that long, and the tests that need a timeout inject one."""
    kw.setdefault("model_sha", "sha-A")
    replication = RedisReplication(
        url=redis_server.url, persist_every=persist_every, lease_ttl=lease_ttl,
        lease_wait=lease_wait, replica_id=name,
        backend=RedisBackend(redis_server.url, timeout=2.0),
    )  # fmt: skip
    return SessionStore(S, replication=replication, **kw)


def step(store: SessionStore, sid: str, rng, principal: str = "") -> np.ndarray:
    """One commit of a fresh random state; returns it."""
    s = store.get(sid, principal)
    x = rng.standard_normal(S).astype(np.float32)
    store.commit(s, x, 1)
    return x


@contextlib.contextmanager
def replies_lost(store: SessionStore):
    """Redis applies the store's writes, but their replies time out (a network cut)."""
    backend = store.replication.backend
    real = backend.write_many

    def applied_then_timed_out(*args):
        real(*args)
        raise redis.TimeoutError("Timeout reading from socket")

    backend.write_many = applied_then_timed_out
    try:
        yield
    finally:
        backend.write_many = real


def outage(store: SessionStore) -> None:
    store.replication._degrade(redis.ConnectionError("outage"))


def record(redis_server, sid: str) -> dict:
    """Redis's record of `sid` as HGETALL gives it (what `roll_back` puts back)."""
    return redis.Redis.from_url(redis_server.url).hgetall(f"ssmstream:s:{sid}")


def roll_back(redis_server, sid: str, record: dict) -> None:
    """Redis comes back from an older dump (RDB or AOF), or fails over to a replica that
    lags: the generation token is the same, the session's record is `record` (as HGETALL gave
    it earlier) and its lease has expired."""
    cli = redis.Redis.from_url(redis_server.url)
    cli.delete(f"ssmstream:l:{sid}", f"ssmstream:s:{sid}")
    cli.hset(f"ssmstream:s:{sid}", mapping=record)


def written(store: SessionStore, sid: str) -> tuple[int, np.ndarray, int]:
    """Redis's record of `sid`: position, state, version."""
    rec = store.replication.backend.load(sid)
    position, state = store.unpack(rec["snap"])
    return position, state, rec["version"]


def stepped_twice(redis_server, rng, principal: str = "") -> tuple[SessionStore, str, dict]:
    """Replica A (lease 5 s) steps a new session twice: A, the session's id, and its record
    after the first step (what `roll_back` puts back: older data than A's copy)."""
    a = replica(redis_server, "A", lease_ttl=5.0)
    sid = a.create(principal).id
    step(a, sid, rng, principal)
    old = record(redis_server, sid)
    step(a, sid, rng, principal)
    return a, sid, old


def taken_over(redis_server, rng):
    """A steps alice's session twice (`old`: its record after the first step: version 2,
    term 0, holder A); A's lease lapses (A paused) and B takes the session over (term 1,
    holder B) and steps it once. A, B, the session's id, `old`."""
    a = replica(redis_server, "A", lease_ttl=0.2)
    b = replica(redis_server, "B", lease_ttl=0.2)
    sid = a.create("alice").id
    step(a, sid, rng, "alice")
    old = record(redis_server, sid)
    step(a, sid, rng, "alice")
    time.sleep(0.3)
    b.fetch(sid, "alice")
    step(b, sid, rng, "alice")
    return a, b, sid, old
