"""The server's background work when something goes wrong in it: an idle sweep that fails
(logged once with its traceback, tried again on its next tick, the server serving and healthy
meanwhile), clocks that jump, periodic saves at the bounds of --save-interval and --session-ttl,
a stop that comes while a periodic save runs, and a shutdown save that fails with an error
other than the disk's (the rest of the shutdown still runs). Each runs a server in this
process on the toy model; none leaves an asyncio task destroyed while pending or an
exception never retrieved."""

from __future__ import annotations

import gc
import logging
import threading
import time
import urllib.error

import grpc
import pytest
import ssmstream.runtime.server as server_module
import ssmstream.runtime.sessions as sessions_module
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import scrape, serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import MAX_SECONDS

SERVER_LOG = server_module.__name__


@pytest.fixture(autouse=True)
def no_lost_tasks(caplog):
    """asyncio logs a task garbage-collected while pending, or one whose exception nobody
    read, at ERROR: neither may happen in these tests."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    lost = [
        r.getMessage()
        for r in caplog.get_records("call") + caplog.records
        if r.name == "asyncio"
        and ("destroyed but it is pending" in r.getMessage() or "never retrieved" in r.getMessage())
    ]
    assert not lost, lost


def wait_for(predicate, timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def health(srv) -> int:
    with grpc.insecure_channel(target(srv)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def task_named(srv, name: str):
    (task,) = [t for t in srv.server._tasks if name in t.get_coro().__qualname__]
    return task


# --- the idle sweep ---------------------------------------------------------------------


def test_a_failing_idle_sweep_is_logged_once_and_the_next_sweep_evicts(toy_token_model, caplog):
    """--session-ttl 0.2: a sweep every 0.05 s. The sweep raises (OSError, then
    RuntimeError) for a while: one ERROR with the traceback of the first failure, the sweep
    task still running, health SERVING and new sessions served. Once the store works again
    the next sweep evicts the session left idle meanwhile, and says the sweep recovered."""
    caplog.set_level(logging.INFO, logger=SERVER_LOG)
    with serve(toy_token_model["model_dir"], session_ttl=0.2) as srv:
        store = srv.server.store
        real_sweep = store.evict_idle
        failures = [OSError(28, "No space left on device"), RuntimeError("sweep broke")]
        failed = []
        broken = threading.Event()
        broken.set()

        def sweep():
            if broken.is_set():
                failed.append(failures[min(len(failed), 1)])
                raise failed[-1]
            return real_sweep()

        store.evict_idle = sweep
        with Client(target(srv), timeout=30) as c:
            c.create_session(session_id="left-idle")
            wait_for(lambda: len(failed) >= 4, what="4 failed sweeps")
            assert not task_named(srv, "_evict_loop").done()
            assert health(srv) == health_pb2.HealthCheckResponse.SERVING
            assert len(list(c.generate([1, 2], max_new_tokens=3, temperature=0.0))) == 3
            assert store.local("left-idle") is not None  # no sweep has run: it is still there
            broken.clear()
            wait_for(lambda: store.local("left-idle") is None, what="the sweep to evict it")
    errors = [r for r in caplog.records if r.name == SERVER_LOG and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "idle-session sweep failed" in errors[0].getMessage()
    assert errors[0].exc_info[1] is failed[0]  # the first failure's traceback
    said = [r.getMessage() for r in caplog.records if r.name == SERVER_LOG]
    assert f"idle-session sweep works again after {len(failed)} failed sweeps" in said


def test_a_wall_clock_jump_neither_evicts_sessions_nor_stops_the_sweep(
    toy_token_model, monkeypatch
):
    """Idle time is measured on the monotonic clock: the wall clock set a day ahead, then a
    day back (NTP, an operator, a VM resumed), evicts no session whose TTL has not run out
    ("kept", 2 s), and the sweep goes on evicting the one whose TTL has ("short", 0.3 s)."""
    with serve(toy_token_model["model_dir"], session_ttl=2.0) as srv:  # a sweep every 0.5 s
        store = srv.server.store
        with Client(target(srv), timeout=30) as c:
            c.create_session(session_id="kept")
            c.create_session(session_id="short", ttl=0.3)
        real_time, real_sweep = time.time, store.evict_idle
        swept = []
        store.evict_idle = lambda: swept.append(real_sweep()) or swept[-1]
        for jump in (86400.0, -86400.0):
            monkeypatch.setattr(time, "time", lambda jump=jump: real_time() + jump)
            n = len(swept)
            wait_for(lambda n=n: len(swept) > n, what="a sweep")
            assert store.local("kept") is not None, f"evicted by a wall clock {jump:+g} s off"
        monkeypatch.setattr(time, "time", real_time)
        wait_for(lambda: store.local("short") is None, what="the sweep to evict 'short'")
        assert ["short"] in swept and store.local("kept") is not None


# --- periodic saves and the shutdown ---------------------------------------------------


def positions_after_restart(model_dir, state_dir) -> dict[str, int]:
    with serve(model_dir, state_dir=str(state_dir)) as again:
        return {s.id: s.position for s in again.server.store.sessions()}


def stop_raises(srv) -> list[BaseException]:
    try:
        srv.stop()
    except BaseException as e:
        return [e]
    return []


@pytest.mark.parametrize("interval", [1e-6, MAX_SECONDS])
def test_save_intervals_at_their_bounds_serve_and_stop_promptly(
    toy_token_model, tmp_path, interval
):
    """The shortest --save-interval saves back to back, the longest sleeps ~31 years: either
    way steps are served, the stop (mostly during a save with the shortest) is prompt, and the
    shutdown save holds every acknowledged step."""
    state = tmp_path / "state"
    srv = serve(toy_token_model["model_dir"], state_dir=str(state), save_interval=interval)
    srv.start()
    try:
        with Client(target(srv), timeout=30) as c:
            s = c.create_session(session_id="a")
            for _ in range(5):
                s.step(tokens=[1, 2])
        assert not task_named(srv, "_save_loop").done()
    finally:
        began = time.monotonic()
        srv.stop()
    assert time.monotonic() - began < 5
    assert positions_after_restart(toy_token_model["model_dir"], state) == {"a": 10}


def test_a_stop_while_a_periodic_save_writes_waits_for_it_and_saves_last(
    toy_token_model, tmp_path, monkeypatch
):
    """A periodic save is in the middle of writing (it read the session at position 2 or
    before) when the session steps to 5 and the server is told to stop: the stop cancels the
    save loop without losing its thread's work or a task, and the shutdown save, after it,
    holds 5."""
    state = tmp_path / "state"
    real_write = sessions_module.write_session_file
    writing, go_on = threading.Event(), threading.Event()

    def slow_first_write(*args):
        if not writing.is_set():
            writing.set()
            assert go_on.wait(10)
        return real_write(*args)

    srv = serve(toy_token_model["model_dir"], state_dir=str(state), save_interval=0.05)
    srv.start()
    try:
        with Client(target(srv), timeout=30) as c:
            s = c.create_session(session_id="a")
            s.step(tokens=[1, 2])
            monkeypatch.setattr(sessions_module, "write_session_file", slow_first_write)
            assert writing.wait(5)
            s.step(tokens=[3, 4, 5])
        raised = []
        stopping = threading.Thread(target=lambda: raised.extend(stop_raises(srv)))
        stopping.start()
        wait_for(lambda: task_named(srv, "_save_loop").done(), what="the save loop to end")
        go_on.set()
        stopping.join(30)
        assert not stopping.is_alive() and not raised, raised
    finally:
        go_on.set()
        srv.stop()
    assert positions_after_restart(toy_token_model["model_dir"], state) == {"a": 5}


def test_a_shutdown_save_failing_with_any_error_still_ends_the_shutdown(
    toy_token_model, tmp_path, caplog
):
    """The shutdown save raises an error that is not the disk's (MemoryError, a bug): the
    stop still ends as it does for a full disk. The error is logged with its traceback naming
    --state-dir, the sessions count as unsaved (exit status 1), the older periodic save is set
    aside (a restart must not bring back older positions as the last), and the metrics
    exporter is closed."""
    caplog.set_level(logging.ERROR, logger=SERVER_LOG)
    state = tmp_path / "state"
    srv = serve(toy_token_model["model_dir"], state_dir=str(state), metrics_port=0)
    srv.start()
    try:
        with Client(target(srv), timeout=30) as c:
            s = c.create_session(session_id="a")
            s.step(tokens=[1])
            srv.server.store.save(state)  # an older save, at position 1
            s.step(tokens=[2])
        port = srv.server.metrics_port
        assert "ssmstream_draining" in scrape(port)

        def broken_save(directory):
            raise MemoryError("no memory for the save")

        srv.server.store.save = broken_save
    finally:
        srv.stop()  # does not raise
    assert srv.server.unsaved == 1
    (error,) = [r for r in caplog.records if r.name == SERVER_LOG]
    assert "--state-dir: cannot save 1 sessions" in error.getMessage()
    assert "no memory for the save" in error.getMessage()
    assert isinstance(error.exc_info[1], MemoryError)
    assert not (state / "sessions.bin").exists() and (state / "sessions.bin.stale").is_file()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)
