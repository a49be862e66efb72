"""A session that moved to another replica (and maybe was closed there) leaves a copy on
the replica it left. That copy gives way when the replica needs its room or its id
(docs/scaleout.md): it does not hold `--max-sessions`, `--max-sessions-per-principal` or
its id there until its idle TTL."""

import time

import grpc
import pytest
from localcluster import ReplicaProcess
from services import RedisProcess, require
from ssmstream.runtime.client import Client

pytestmark = pytest.mark.timeout(120)


def _two_replicas(model_dir, tmp_path, extra):
    require("redis-server")
    redis = RedisProcess(tmp_path)
    args = [
        "--state-store",
        redis.url,
        "--persist-every",
        "1",
        "--lease-ttl",
        "0.5",
        "--grace",
        "1",
        *extra,
    ]
    reps = []
    try:
        reps.append(ReplicaProcess(model_dir, args, tmp_path, "a"))
        reps.append(ReplicaProcess(model_dir, args, tmp_path, "b"))
    except BaseException:
        for r in reps:
            r.kill()
        redis.stop()
        raise
    return redis, reps


@pytest.mark.parametrize("limit", [["--max-sessions", "2"], ["--max-sessions-per-principal", "2"]])
def test_sessions_moved_away_and_closed_do_not_count_against_the_replica_they_left(
    tiny_token_model, tmp_path, limit
):
    redis, (a, b) = _two_replicas(tiny_token_model["model_dir"], tmp_path, limit)
    try:
        with Client(a.address, timeout=30) as ca, Client(b.address, timeout=30) as cb:
            ids = [ca.create_session().id for _ in range(2)]
            for sid in ids:
                ca.session(sid).step(tokens=[1, 2])
            time.sleep(1.5)  # A's leases lapse (unused): the sessions may move
            for sid in ids:  # the proxy moved them to B (a replica blip), where they end
                assert cb.session(sid).step(tokens=[3]).position == 3
                cb.session(sid).close()
            # no session exists anywhere now; A holds none of them
            s = ca.create_session()  # A should accept a new session
            assert s.step(tokens=[1]).position == 1
    finally:
        a.kill()
        b.kill()
        redis.stop()


@pytest.mark.parametrize("limit", [["--max-sessions", "2"]])
def test_a_replica_whose_sessions_moved_away_accepts_new_ones(tiny_token_model, tmp_path, limit):
    """Without any close: the sessions are live on B (write-through, so Redis has their
    newest state); A holds only stale, clean copies whose leases lapsed: they give way to a
    new session (they had until their idle TTL, 600 s by default). An id live on B stays
    refused on A, and the session comes back to A with B's newest state."""
    redis, (a, b) = _two_replicas(tiny_token_model["model_dir"], tmp_path, limit)
    try:
        with Client(a.address, timeout=30) as ca, Client(b.address, timeout=30) as cb:
            ids = [ca.create_session().id for _ in range(2)]
            time.sleep(1.5)
            for sid in ids:
                assert cb.session(sid).step(tokens=[3]).position == 1
            s = ca.create_session()
            assert s.step(tokens=[1]).position == 1
            with pytest.raises(grpc.RpcError) as e:
                ca.create_session(session_id=ids[0])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "already in use" in e.value.details()
            s.close()
            time.sleep(1.5)  # B's leases lapse; A loads the session back from Redis
            assert ca.session(ids[0]).step(tokens=[4]).position == 2
    finally:
        a.kill()
        b.kill()
        redis.stop()


def test_an_id_closed_on_another_replica_can_be_created_again_where_it_was_before(
    tiny_token_model, tmp_path
):
    """docs/scaleout.md: ids may be reused ("a replica never serves an old copy once the id
    belongs to a new session, however often the id was reused"). A session moved from A to
    B and was closed on B: its id can be created again on A, where A's old copy of it gives
    way (no session has that id anywhere)."""
    redis, (a, b) = _two_replicas(tiny_token_model["model_dir"], tmp_path, [])
    try:
        with Client(a.address, timeout=30) as ca, Client(b.address, timeout=30) as cb:
            sid = ca.create_session("chat-42").id
            ca.session(sid).step(tokens=[1, 2])
            time.sleep(1.5)  # A's lease lapses
            assert cb.session(sid).step(tokens=[3]).position == 3  # moved to B
            cb.session(sid).close()
            with pytest.raises(grpc.RpcError) as e:
                cb.session(sid).snapshot()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            s = ca.create_session("chat-42")  # the proxy routes the id to A again
            assert s.step(tokens=[1]).position == 1
    finally:
        a.kill()
        b.kill()
        redis.stop()
