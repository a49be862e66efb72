"""What an operator sees of a running server: health probes answer while every call slot is
taken, an open health Watch does not hold a shutdown, a shutdown saves neither expired
sessions nor temporary Generate sessions, and the Redis password never reaches the log."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import ServerProcess, serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey

HEALTH = health_pb2.HealthCheckResponse


def _code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_health_check_answers_while_the_rpc_limit_is_taken_by_streams(toy_token_model):
    """--max-concurrent-rpcs 2 with two open Streams: another call is refused (counted in
    errors_total), the health Check is not; a slot given back is taken again."""
    with serve(toy_token_model["model_dir"], max_concurrent_rpcs=2) as srv:
        errors = srv.server.metrics.errors.labels("RESOURCE_EXHAUSTED")
        with Client(target(srv), timeout=30) as c, grpc.insecure_channel(target(srv)) as ch:
            s = c.create_session()
            with s.open_stream() as a, c.create_session().open_stream() as b:
                a.send(tokens=[1]), b.send(tokens=[1])  # two Streams open, between requests
                check = health_pb2_grpc.HealthStub(ch).Check
                for _ in range(3):
                    assert (
                        check(health_pb2.HealthCheckRequest(), timeout=10).status == HEALTH.SERVING
                    )
                assert _code_of(c.info) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "2 calls in flight (--max-concurrent-rpcs); retry later",
                )
                assert errors._value.get() == 1
                assert a.send(tokens=[2]).position == 2  # the open ones keep working
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the Streams' slots come back as they end
                try:
                    assert c.info().state_size > 0
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
            assert s.step(tokens=[3]).position == 3


def test_a_health_watch_takes_a_slot_and_a_refused_call_gives_none_back(toy_token_model):
    """--max-concurrent-rpcs 1: an open health Watch (only Check is exempt) takes the slot;
    with an open Stream holding it, a refused Stream or call leaves it taken (a refusal that
    gave back a slot it never took let the next call in, past the limit)."""
    exhausted = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "1 calls in flight (--max-concurrent-rpcs); retry later")  # fmt: skip
    with serve(toy_token_model["model_dir"], max_concurrent_rpcs=1) as srv:
        with Client(target(srv), timeout=30) as c, grpc.insecure_channel(target(srv)) as ch:
            s = c.create_session()
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == HEALTH.SERVING
            assert _code_of(c.info) == exhausted
            watch.cancel()
            deadline = time.monotonic() + 10
            while True:  # the Watch's slot comes back as it ends
                try:
                    c.info()
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the cancelled Watch kept its slot"
                    time.sleep(0.05)
            with s.open_stream() as a:
                a.send(tokens=[1])  # the slot is taken
                with c.session(s.id).open_stream() as b:
                    assert _code_of(lambda: b.send(tokens=[2])) == exhausted
                for _ in range(2):
                    assert _code_of(c.info) == exhausted
                assert a.send(tokens=[3]).position == 2


def test_a_health_watch_ends_at_the_shutdown_after_not_serving(toy_token_model, tmp_path):
    """A load balancer's open Watch gets NOT_SERVING and its stream ends: an idle server
    stops at once, not after its whole --grace (30 s here: a bound well under it holds on a
    loaded machine, where a process's stop and exit alone can take seconds)."""
    srv = ServerProcess(toy_token_model["model_dir"], "--device", "cpu", "--grace", "30",
                        workdir=tmp_path)  # fmt: skip
    try:
        with grpc.insecure_channel(srv.address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            assert next(watch).status == HEALTH.SERVING
            t0, rc = time.monotonic(), []
            stopper = threading.Thread(target=lambda: rc.append(srv.terminate(60)))
            stopper.start()
            assert [r.status for r in watch] == [HEALTH.NOT_SERVING]  # then the end
            stopper.join(60)
            took = time.monotonic() - t0
        assert rc == [0] and took < 15, f"an idle server took {took:.1f} s to stop (grace 30 s)"
    finally:
        srv.kill()


def test_a_session_expired_before_the_shutdown_is_not_restored(toy_token_model, tmp_path):
    """Idle past its TTL but not swept yet when the server stops: evicted, not saved; a live
    session beside it is restored."""
    model_dir, state_dir = toy_token_model["model_dir"], str(tmp_path / "state")
    with serve(model_dir, state_dir=state_dir) as srv:  # --session-ttl 600: sweep every 5 s
        with Client(target(srv), timeout=30) as c:
            c.create_session(session_id="short", ttl=0.3).step(tokens=[1, 2])
            c.create_session(session_id="long").step(tokens=[1, 2])
        time.sleep(1.0)  # "short" idle 1 s > its 0.3 s TTL
    with serve(model_dir, state_dir=state_dir) as again:
        with Client(target(again), timeout=30) as c:
            code, details = _code_of(lambda: c.session("short").step(tokens=[3]))
            assert code == grpc.StatusCode.NOT_FOUND
            assert c.session("long").step(tokens=[3]).position == 3


def test_a_temporary_generate_cut_by_the_shutdown_is_not_saved(toy_token_model, tmp_path):
    model_dir, state_dir = toy_token_model["model_dir"], tmp_path / "state"
    srv = serve(model_dir, state_dir=str(state_dir), max_new_tokens=1_000_000).start()
    started, ended = threading.Event(), []

    def generate():
        with Client(target(srv), timeout=60) as c:
            try:
                for _ in c.generate([1], max_new_tokens=1_000_000, temperature=1.0):
                    started.set()
            except grpc.RpcError as e:
                ended.append(e.code())

    t = threading.Thread(target=generate)
    t.start()
    try:
        assert started.wait(30)
        time.sleep(0.3)
    finally:
        srv.stop(grace=0.2)  # the Generate outlives the grace: cut
        t.join(30)
    assert ended, "the generation was not cut by the shutdown"
    eng = Engine(model_dir, device="cpu")
    store = SessionStore(
        eng.state_size, 8, model_sha=eng.info["step_sha256"],
        snapshot_key=SnapshotKey.in_dir(state_dir),
    )  # fmt: skip
    assert store.load(state_dir) == 0  # the temporary session was let go before the save


def test_the_redis_password_never_reaches_the_log(toy_token_model, caplog):
    pytest.importorskip("redis")
    password = "hunter2-redis-secret-pw"
    # DEBUG for the loggers that see the URL only: a record of grpc's own, formatted after
    # the server it names has stopped, can crash the interpreter (a segfault in getMessage)
    for name in ("ssmstream", "redis"):
        caplog.set_level(logging.DEBUG, logger=name)
    url = f"redis://:{password}@127.0.0.1:1/0"  # port 1: nothing listens, the store degrades
    with serve(toy_token_model["model_dir"], state_store=url, lease_ttl=0.5):
        time.sleep(0.5)  # a write-back retry or two
    logged = caplog.text  # each line formatted as it was logged
    assert "state store redis://:***@127.0.0.1:1/0 unavailable" in logged
    assert password not in logged


def test_a_fetch_still_running_at_the_stop_has_ended_when_stop_returns(toy_token_model, caplog):
    """A fetch from the shared store in progress when the server stops (a lease wait, a
    Redis call timing out; here 1 s) ends before stop() returns: no fetch thread hands its
    result to the event loop after the loop closed."""
    pytest.importorskip("redis")
    from ssmstream.runtime.errors import Unavailable

    caplog.set_level(logging.WARNING)
    srv = serve(toy_token_model["model_dir"], state_store="redis://127.0.0.1:1/0").start()
    started, ended = threading.Event(), threading.Event()

    def slow_fetch(session_id, principal=""):
        started.set()
        time.sleep(1.0)
        ended.set()
        raise Unavailable("retry")

    srv.server.store.replication.fetch = slow_fetch
    with Client(target(srv), timeout=30) as c:
        step = threading.Thread(target=_code_of, args=(lambda: c.session("s-1").step([1]),))
        step.start()
        try:
            assert started.wait(30)
        finally:
            srv.stop(grace=0.1)
            ended_at_stop = ended.is_set()
            step.join(30)
    assert ended_at_stop
    assert not [r for r in caplog.records if r.name == "concurrent.futures"]


def test_an_executor_job_still_running_at_the_stop_has_ended_when_stop_returns(
    toy_token_model,
):
    """A job of the server loop's default executor (a periodic save, anything run with
    asyncio.to_thread) still running when the server stops ends before stop() returns."""
    srv = serve(toy_token_model["model_dir"]).start()
    started, ended = threading.Event(), threading.Event()

    def job():
        started.set()
        time.sleep(1.0)
        ended.set()

    srv.loop.call_soon_threadsafe(srv.loop.run_in_executor, None, job)
    try:
        assert started.wait(30)
    finally:
        srv.stop()
    assert ended.is_set()


@pytest.mark.parametrize("state_dir", [False, True])
def test_a_stream_ended_by_the_drain_is_told_what_becomes_of_its_session(
    toy_token_model, tmp_path, state_dir
):
    """Without --state-dir the sessions end with the process: the stream is not told to
    resume after the restart; with it, it is (and can)."""
    from ssmstream.runtime.config import ServerConfig
    from ssmstream.runtime.server import BackgroundServer

    extra = {"state_dir": str(tmp_path / "state")} if state_dir else {}
    cfg = ServerConfig(model_dir=str(toy_token_model["model_dir"]), port=0, device="cpu", **extra)
    srv = BackgroundServer(cfg).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            st = c.create_session().open_stream()
            assert st.send(tokens=[1]).position == 1
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 5.0})
            stopper.start()
            stopper.join(30)
            code, details = _code_of(lambda: st.send(tokens=[2]))
    finally:
        srv.stop()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == (
        "server is shutting down; the session is saved, resume after the restart"
        if state_dir
        else "server is shutting down; its sessions end with it"
    )
