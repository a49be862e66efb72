"""Server lifecycle and operations: health, reflection, Prometheus metrics, and a restart
(SIGTERM the server process, start it again on the same --state-dir, continue: the
outputs equal an uninterrupted run)."""

from __future__ import annotations

import json
import pathlib
import socket
import threading
import time

import grpc
import grpc_helpers
import numpy as np
import pytest
import ssmstream.runtime.server as server_module
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import ServerProcess, make_certs, scrape, serve, target
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import MIN_SESSION_TTL, ServerConfig
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.server import BackgroundServer, check_files
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey

ATOL = 2e-4


@pytest.fixture(scope="module")
def server(tiny_token_model):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        metrics_port=0,
        device="cpu",
        grace=0.2,
    )
    with BackgroundServer(cfg) as srv:
        yield srv


def test_health_serves_overall_and_per_service(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "ssmstream.v1.StreamingInference"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "unknown service 'no.such.Service'"
        # a long name (no token needed to send it) is not sent back whole
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == f"unknown service '{'x' * 64}…'"


def test_reflection_lists_the_services_and_describes_the_proto(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="ssmstream.v1.StreamingInference"
            ),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "ssmstream.v1.StreamingInference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    (blob,) = described.file_descriptor_response.file_descriptor_proto[:1]
    assert b"ssmstream/protos/inference.proto" in blob and b"StepRequest" in blob


def test_metrics_count_what_happened(server):
    before = scrape(server.server.metrics_port)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        s = c.create_session()
        s.step(tokens=[1, 2, 3])
        list(s.stream([[4], [5]]))
        with pytest.raises(grpc.RpcError):
            c.session("missing-one").step(tokens=[1])
        after = scrape(server.server.metrics_port)
        assert after["ssmstream_sessions_active"] == before["ssmstream_sessions_active"] + 1
        s.close()
        assert len(list(c.generate([1, 2], max_new_tokens=4, temperature=0.0))) == 4
        generated = scrape(server.server.metrics_port)
        c.create_session(prompt=[3, 1, 4, 1, 5]).close()  # its prompt is consumed too
        created = scrape(server.server.metrics_port)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('ssmstream_tokens_total{rpc="Step"}') == 3
    assert delta('ssmstream_tokens_total{rpc="Stream"}') == 2
    assert delta('ssmstream_requests_total{rpc="Stream"}') == 2
    assert delta('ssmstream_request_latency_seconds_count{rpc="Step"}') == 1
    # Generate: one call; inputs consumed: the 2 prompt tokens and the first 3 generated ones
    # (fed back; the 4th ends it); a latency per generated token
    g = lambda key: generated.get(key, 0.0) - after.get(key, 0.0)  # noqa: E731
    assert g('ssmstream_requests_total{rpc="Generate"}') == 1
    assert g('ssmstream_tokens_total{rpc="Generate"}') == 2 + 3
    assert g('ssmstream_request_latency_seconds_count{rpc="Generate"}') == 4
    assert created.get('ssmstream_tokens_total{rpc="CreateSession"}') == 5
    assert delta('ssmstream_errors_total{code="NOT_FOUND"}') == 1
    assert after["ssmstream_tokens_per_second"] > 0
    assert after["ssmstream_sessions_capacity"] == 1024
    assert "ssmstream_sessions_evicted_total" in after and after["ssmstream_draining"] == 0
    # the 2 streamed tokens ran as 2 slot steps: a token and a slot in, the outputs out
    d_out = server.server.engine.d_output
    assert delta("ssmstream_state_slab_steps_total") == 2
    assert delta('ssmstream_state_slab_transfer_bytes_total{direction="in",path="step"}') == 32
    assert delta('ssmstream_state_slab_transfer_bytes_total{direction="out",path="step"}') == (
        2 * 4 * d_out
    )


@pytest.mark.parametrize("ends", ["deadline", "cancel"])
def test_inputs_applied_after_their_call_ended_are_counted(server, monkeypatch, ends):
    """A Step whose deadline passes (or that its client cancels) while its prefill runs:
    the prefill applies (the session advances), its inputs count as discarded, not as
    Step tokens, and the call counts as DEADLINE_EXCEEDED (CANCELLED): both went uncounted.
    An expired call may count as CANCELLED: the client's deadline passes first, and its
    cancel can reach the server before the server's copy of the deadline (sent with the
    request, started when it arrived) has passed."""
    engine = server.server.engine
    real, ran = engine.prefill_unchecked, threading.Event()

    def slow(*a, **k):
        time.sleep(2.5)  # the call ends 1 s in: long after a loaded machine started the prefill
        out = real(*a, **k)
        ran.set()
        return out

    monkeypatch.setattr(engine, "prefill_unchecked", slow)
    codes = ("DEADLINE_EXCEEDED", "CANCELLED") if ends == "deadline" else ("CANCELLED",)
    before = scrape(server.server.metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.StreamingInferenceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
        req = pb.StepRequest(session_id=sid, tokens=[1, 2, 3, 4, 5])
        call = stub.Step.future(req, timeout=1.0 if ends == "deadline" else 30)
        if ends == "cancel":
            time.sleep(1.0)
            call.cancel()
        with pytest.raises(grpc.FutureCancelledError if ends == "cancel" else grpc.RpcError):
            call.result()
        assert ran.wait(10)
        errors = [f'ssmstream_errors_total{{code="{c}"}}' for c in codes]
        deadline = time.monotonic() + 10  # the result comes back to the event loop after `ran`
        while True:
            after = scrape(server.server.metrics_port)
            moved = {k for k in after if after[k] != before.get(k, 0)}
            if moved & set(errors) and "ssmstream_tokens_discarded_total" in moved:
                break
            assert time.monotonic() < deadline, "the ended call was not counted"
            time.sleep(0.05)
        assert grpc_helpers.position_on_server(server, sid) == 5  # applied
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert sum(map(delta, errors)) == 1
    assert delta("ssmstream_tokens_discarded_total") == 5
    assert delta('ssmstream_tokens_total{rpc="Step"}') == 0


def test_periodic_save_and_health_going_not_serving(tiny_token_model, tmp_path):
    state_dir = tmp_path / "state"
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        device="cpu",
        state_dir=str(state_dir),
        save_interval=0.1,
        grace=0.5,
    )
    eng = Engine(tiny_token_model["model_dir"], device="cpu")
    srv = BackgroundServer(cfg, engine=eng).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            s = c.create_session(session_id="saved")
            s.step(tokens=[1, 2, 3])

            def saved_position():  # what a periodic save wrote so far (no shutdown)
                store = SessionStore(
                    eng.state_size,
                    4,
                    model_sha=eng.info["step_sha256"],
                    snapshot_key=SnapshotKey.in_dir(state_dir),
                )
                if store.load(state_dir) != 1:
                    return None
                return store.get("saved", "anonymous").position

            deadline = time.monotonic() + 30  # saves every 0.1 s: a loaded machine is slower
            while saved_position() != 3:
                assert time.monotonic() < deadline, "no periodic save of the step"
                time.sleep(0.05)
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                watch = health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=30
                )
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                stopper = threading.Thread(target=srv.stop, kwargs={"grace": 0.5})
                stopper.start()
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                stopper.join(10)
    finally:
        srv.stop()


def test_a_failed_periodic_save_is_retried_and_the_shutdown_save_still_runs(
    tiny_token_model, tmp_path, caplog
):
    """A save that fails (here a directory where sessions.bin goes) does not end the
    periodic saves, nor skip the save at shutdown: the restarted server has the session at
    the position it acknowledged last.

    Each step waits for what it needs (a save, a failed save) instead of sleeping: the
    periodic saves run every 0.1 s in the server's threads, so a fixed sleep could end before
    the save it meant to wait for, and a save could land between an unlink and a mkdir."""
    state_dir = tmp_path / "state"
    kw = dict(model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=0.2)
    srv = BackgroundServer(ServerConfig(state_dir=str(state_dir), save_interval=0.1, **kw))
    caplog.set_level("ERROR", logger=server_module.__name__)
    srv.start()
    saved = state_dir / "sessions.bin"

    def wait_for(predicate, what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def failed_saves() -> int:
        return sum("periodic save" in r.getMessage() for r in caplog.records)

    def saves_fail(s) -> None:
        """The fault: a directory where sessions.bin goes, until the next periodic save has
        failed on it (a save that lands between the unlink and the mkdir is simply undone).
        A step of `s` makes the store unsaved (a store unchanged is not saved again)."""
        failed = failed_saves()
        while True:
            saved.unlink(missing_ok=True)
            try:
                saved.mkdir()
                break
            except FileExistsError:
                continue
        s.step(tokens=[9])
        wait_for(lambda: failed_saves() > failed, "a periodic save to fail")

    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            s = c.create_session(session_id="kept")
            s.step(tokens=[1, 2, 3])
            wait_for(saved.is_file, "a periodic save")
            saves_fail(s)
            saved.rmdir()  # gone again
            s.step(tokens=[4])
            wait_for(saved.is_file, "a periodic save after the failed one")  # they went on
            saves_fail(s)  # failing again when the server stops
            saved.rmdir()
    finally:
        srv.stop()  # does not raise the periodic save's error; saves at shutdown
    assert saved.is_file()
    with BackgroundServer(ServerConfig(state_dir=str(state_dir), **kw)) as again:
        with Client(f"127.0.0.1:{again.port}", timeout=30) as c:
            h = c.session("kept")
            h.snapshot()
            assert h.position == 6


def test_restart_on_the_same_state_dir_continues_exactly(tiny_token_model, tmp_path):
    model_dir = tiny_token_model["model_dir"]
    eng = Engine(model_dir, device="cpu")
    V = int(eng.info["vocab_size"])
    x = np.random.default_rng(21).integers(0, V, size=12, dtype=np.int64)  # [12]
    state = eng.new_state(1)
    expect = []
    for t in x:  # the uninterrupted run, in-process
        y, state = eng.step(np.array([t], dtype=np.int64), state)
        expect.append(y[0])
    state_dir = tmp_path / "state"
    args = ("--state-dir", str(state_dir), "--device", "cpu", "--grace", "2")

    first = ServerProcess(model_dir, *args, workdir=tmp_path)
    try:
        with Client(first.address, timeout=30) as c:
            s = c.create_session(session_id="resumable")
            idle = c.create_session()
            with s.open_stream() as st:
                got = [st.send(tokens=[t]) for t in x[:7]]
        assert first.terminate() == 0
    finally:
        first.kill()
    out = first.output()
    assert "serving model" in out and "saved 2 sessions" in out, out

    second = ServerProcess(model_dir, *args, workdir=tmp_path)
    try:
        with Client(second.address, timeout=30) as c:
            with c.session("resumable").open_stream() as st:
                got += [st.send(tokens=[t]) for t in x[7:]]
            assert c.session(idle.id).close() == 0
            assert c.session("resumable").close() == 12
        assert second.terminate() == 0
    finally:
        second.kill()
    assert "restored 2 sessions" in second.output()
    assert [r.position for r in got] == list(range(1, 13))
    np.testing.assert_allclose(np.stack([r.outputs[0] for r in got]), np.stack(expect), atol=ATOL)


# --- starting and stopping ---------------------------------------------------------------


def _start(config: ServerConfig, engine=None):
    """Server(config).start() on a fresh event loop; returns (the server, what it raised)."""
    import asyncio

    from ssmstream.runtime.server import Server

    srv = Server(config, engine)

    async def go():
        try:
            await srv.start()
        except Exception as e:
            return e
        await srv.stop(0)
        return None

    return srv, asyncio.run(go())


def test_start_names_the_flag_whose_file_or_port_cannot_work(tiny_token_model, tmp_path):
    """Checked before the engine loads: TLS material that does not load, a --state-dir the
    server cannot write (its sessions would be lost at SIGTERM), a --port-file directory
    that does not exist or a --port-file that is a directory, a --metrics-port in use, a
    --host that does not resolve or is not this machine's (also with --port 0); each an
    error naming the flag, and no file left behind."""
    import socket

    model = str(tiny_token_model["model_dir"])
    (tmp_path / "garbage.pem").write_text("not a certificate")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    certs = make_certs(tmp_path / "certs")
    garbage, cert, ca = tmp_path / "garbage.pem", str(certs.server_cert), str(certs.ca)
    key, client_key = str(certs.server_key), str(certs.client_key)
    cases = [  # a file that is no PEM is named (OpenSSL says only "[SSL] PEM lib")
        (dict(tls_cert=str(garbage), tls_key=str(garbage)), f"tls_cert: {garbage} is not PEM"),
        (dict(tls_cert=cert, tls_key=str(garbage)), f"tls_key: {garbage} is not PEM"),
        # PEM, but not what the flag takes: the files swapped, a certificate as the key
        (dict(tls_cert=key, tls_key=cert), f"tls_cert: {key} holds no certificate"),
        (dict(tls_cert=cert, tls_key=ca), f"tls_key: {ca} holds no private key"),
        (dict(tls_cert=cert, tls_key=client_key), f"tls_cert/tls_key: cannot load {cert} / "),
        (dict(state_dir=str(tmp_path / "a-file" / "state")), "state_dir: cannot write"),
        (dict(port_file=str(tmp_path / "missing" / "pf.json")), "port_file: "),
        (dict(port_file=str(tmp_path / "a-dir")), "port_file: "),
        (dict(metrics_port=taken.getsockname()[1]), "metrics_port: cannot listen"),
        (dict(host="no-such-host.invalid"), "host: cannot listen"),
        (dict(host="no-such-host.invalid", port=50999), "host: cannot listen"),
        (dict(host="192.0.2.1", port=50999), "host: cannot listen"),  # TEST-NET: not ours
        (dict(snapshot_key=str(tmp_path / "no-key")), "snapshot_key: cannot read"),
    ]  # fmt: skip
    try:
        for kw, words in cases:
            srv, err = _start(
                ServerConfig(**{"model_dir": model, "port": 0, "device": "cpu", **kw})
            )
            assert words in str(err), (kw, err)
            assert srv.engine is None  # refused before the slow part
    finally:
        taken.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file", "certs", "garbage.pem"]
    assert not any((tmp_path / "a-dir").iterdir())
    # a port file that cannot be written after all (made a directory since) leaves no temp
    from ssmstream.runtime.server import _write_port_file

    with pytest.raises(InvalidInput, match=r"^port_file: cannot write .*a-dir: Is a directory$"):
        _write_port_file(str(tmp_path / "a-dir"), 1234, None)  # named: --port-file
    with pytest.raises(InvalidInput, match=r"^port_file: cannot write .*: File name too long$"):
        _write_port_file(str(tmp_path / ("p" * 250)), 1234, None)  # its temp file's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file", "certs", "garbage.pem"]


def test_a_start_that_fails_after_binding_closes_its_port_and_saves_nothing(
    tiny_token_model, tmp_path, monkeypatch
):
    import socket

    import ssmstream.runtime.server as server_module

    def no_port_file(*a):
        raise OSError("disk full (test)")

    monkeypatch.setattr(server_module, "_write_port_file", no_port_file)
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu",
        state_dir=str(tmp_path / "state"), port_file=str(tmp_path / "pf.json"),
    )  # fmt: skip
    srv, err = _start(cfg)
    assert "disk full (test)" in str(err) and srv.port
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", srv.port)) != 0
    assert not (tmp_path / "state" / "sessions.bin").exists()


@pytest.mark.parametrize("where", ["slab", "engine"])
def test_a_slab_too_large_for_memory_names_max_sessions(
    tiny_token_model, monkeypatch, caplog, where
):
    """A `--max-sessions` whose state slab cannot be allocated is refused naming the flag and
    the bytes it needs: the slab's own refusal (numpy's MemoryError as InvalidInput naming its
    argument, `capacity`) or a MemoryError from elsewhere in the allocation."""
    import logging

    import ssmstream.runtime.slab as slab

    def refused(shape, dtype, field):  # what zeros() raises for numpy's MemoryError
        raise InvalidInput(field, f"an array of {shape[0]} × {shape[1]} cannot be allocated")

    def no_memory(self, capacity):
        raise MemoryError

    if where == "slab":
        monkeypatch.setattr(slab, "zeros", refused)
    else:
        monkeypatch.setattr(Engine, "new_slab", no_memory)
    argv = [str(tiny_token_model["model_dir"]), "--port", "0", "--device", "cpu",
            "--max-sessions", "1000"]  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.server"):
        assert server_module.main(argv) == 2
    # what main said (a server an earlier test left stopping may log from its threads)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    (message,) = [m for m in said if m.startswith("ssmstream serve: ")]
    assert message.startswith("ssmstream serve: --max-sessions: 1000 sessions need ")
    assert "too many" in message and "capacity" not in message


def test_config_takes_a_bracketed_ipv6_host_and_refuses_one_port_for_both():
    assert ServerConfig(model_dir="m", host="[::1]").host == "::1"
    assert ServerConfig(model_dir="m", host="::1", port=5).address == "[::1]:5"
    with pytest.raises(ValueError, match="metrics_port: 7000 is the gRPC --port too"):
        ServerConfig(model_dir="m", port=7000, metrics_port=7000)


def test_a_second_signal_ends_the_grace_period(tiny_token_model, tmp_path):
    """A Generate in flight keeps a draining server for its whole --grace (here a long one
    whose client stopped reading); a second SIGTERM ends the grace at once, the Generate's
    temporary session is let go, and the sessions are still saved."""
    import signal

    srv = ServerProcess(
        tiny_token_model["model_dir"], "--device", "cpu", "--grace", "60",
        "--state-dir", str(tmp_path / "state"), "--max-new-tokens", "10000000",
        workdir=tmp_path,
    )  # fmt: skip
    try:
        with Client(srv.address, timeout=30) as c:
            c.create_session(session_id="kept")
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.StreamingInferenceStub(channel)
        generate = stub.Generate(pb.GenerateRequest(prompt=[1], max_new_tokens=10_000_000))
        next(generate)  # in flight; not read further
        srv.proc.send_signal(signal.SIGTERM)
        # the second SIGTERM goes only once the server has taken the first and is draining
        # (its second-signal handler is in place then): two sent a fixed time apart can
        # reach a server that was not scheduled meanwhile as one pending signal
        deadline = time.monotonic() + 30
        while "draining: refusing new work" not in srv.output():
            assert srv.proc.poll() is None, srv.output()
            assert time.monotonic() < deadline, f"no drain after SIGTERM:\n{srv.output()}"
            time.sleep(0.05)
        time.sleep(1.0)  # draining, and with a 60 s grace it stays so: not stopped at once
        assert srv.proc.poll() is None, srv.output()  # the Generate holds the drain
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # without the second signal it would wait out the 60 s grace
        assert srv.proc.wait(40) == 0 and time.monotonic() - t0 < 40
        channel.close()
    finally:
        srv.kill()
    assert "second signal" in srv.output() and "saved 1 sessions" in srv.output()


def test_scale_out_flags_without_a_shared_store_are_named_as_ignored(tiny_token_model, caplog):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu",
        persist_every="1", replica_id="r1",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="ssmstream.runtime.server"):
        _, err = _start(cfg)
    assert err is None
    assert "--persist-every, --replica-id: only for a shared --state-store; ignored" in caplog.text


@pytest.mark.parametrize("mb, warned", [(0.0001, True), (0.0, False), (1.0, False)])
def test_a_prefix_cache_too_small_for_one_state_is_named(tiny_token_model, caplog, mb, warned):
    """--prefix-cache-mb below one entry (state, output, a one-token prefix, bookkeeping)
    caches nothing: the server says so at startup (0 is the cache turned off: no warning)."""
    from ssmstream.runtime.prefix_cache import PrefixCache, entry_bytes

    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", prefix_cache_mb=mb
    )
    with caplog.at_level("WARNING", logger="ssmstream.runtime.server"):
        srv, err = _start(cfg)
    assert err is None
    engine = srv.engine
    smallest = entry_bytes(1, engine.state_size, engine.d_output)
    assert ("holds no prompt state" in caplog.text) == warned, caplog.text
    # the bound is the cache's own: an entry of that size is kept by a cache of that size
    cache = PrefixCache(smallest, chunk=4, model_sha="m")
    kept = {1: (np.zeros(engine.state_size, np.float32), np.zeros(engine.d_output, np.float32))}
    assert cache.insert("s", np.array([7]), kept) == 1 and cache.bytes == smallest
    assert PrefixCache(smallest - 1, chunk=4, model_sha="m").insert("s", np.array([7]), kept) == 0


def test_sighup_stops_gracefully_and_the_port_file_goes(tiny_token_model, tmp_path):
    """A closed terminal (SIGHUP) stops the server like SIGTERM: sessions saved, exit 0; and
    the port file, which names a port nobody listens on any more, is removed."""
    import signal

    srv = ServerProcess(
        tiny_token_model["model_dir"], "--device", "cpu", "--grace", "2",
        "--state-dir", str(tmp_path / "state"), workdir=tmp_path,
    )  # fmt: skip
    try:
        with Client(srv.address, timeout=30) as c:
            c.create_session(session_id="kept")
        assert srv.port_file.is_file()
        srv.proc.send_signal(signal.SIGHUP)
        assert srv.proc.wait(30) == 0
    finally:
        srv.kill()
    out = srv.output()
    assert "SIGHUP received" in out and "saved 1 sessions" in out, out
    assert not srv.port_file.exists()


def test_the_port_file_of_another_server_is_left_alone(tiny_token_model, tmp_path):
    """Two servers in one process (same pid) with one --port-file: stopping the first leaves
    the file the second wrote; stopping the second removes it."""
    port_file = tmp_path / "port.json"
    cfg = dict(model_dir=tiny_token_model["model_dir"], port=0, device="cpu",
               port_file=str(port_file))  # fmt: skip
    first = BackgroundServer(ServerConfig(**cfg)).start()
    second = BackgroundServer(ServerConfig(**cfg)).start()
    try:
        assert json.loads(port_file.read_text())["port"] == second.port
        first.stop()
        assert json.loads(port_file.read_text())["port"] == second.port
    finally:
        first.stop()
        second.stop()
    assert not port_file.exists()


def test_a_shutdown_that_fails_still_removes_the_port_file(tiny_token_model, tmp_path):
    """The shutdown save fails (its --state-dir became a file): the server exits with status 1
    (stopped, its sessions lost), says so naming --state-dir, and its port file is gone, not
    left naming a port nobody listens on."""
    import signal

    state = tmp_path / "state"
    srv = ServerProcess(
        tiny_token_model["model_dir"], "--device", "cpu", "--grace", "1",
        "--state-dir", str(state), workdir=tmp_path,
    )  # fmt: skip
    try:
        import shutil

        shutil.rmtree(state)
        state.write_text("not a directory")
        with Client(srv.address, timeout=30) as c:
            c.create_session()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 1
    finally:
        srv.kill()
    assert "ERROR __main__: --state-dir: cannot save 1 sessions" in srv.output()
    assert not srv.port_file.exists(), srv.output()


def test_a_server_started_with_sighup_ignored_keeps_serving_on_sighup(tiny_token_model, tmp_path):
    """`nohup ssmstream serve` ignores SIGHUP: a closed terminal must not stop it."""
    import signal

    # ignored here, so ignored in the server (kept across exec, as nohup does it); not in a
    # preexec_fn, which forks this gRPC-using process and can crash the child
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        srv = ServerProcess(tiny_token_model["model_dir"], "--device", "cpu", workdir=tmp_path)
    finally:
        signal.signal(signal.SIGHUP, old)
    try:
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert srv.proc.poll() is None
        with Client(srv.address, timeout=30) as c:
            c.create_session()
        assert srv.terminate() == 0
    finally:
        srv.kill()
    assert "SIGHUP received" not in srv.output()


def test_a_state_dir_that_cannot_be_made_is_refused_making_nothing(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # mkdir: EEXIST at the first save
    for d, why in [
        (tmp_path / "a-file" / "state", f"cannot write {tmp_path / 'a-file' / 'state'} "
         f"({tmp_path / 'a-file'} is not a directory): sessions are saved there"),
        (tmp_path / "a-file", f"cannot write {tmp_path / 'a-file'} (Not a directory): "
         "sessions are saved there"),
        (tmp_path / "dangling" / "s", f"cannot write {tmp_path / 'dangling' / 's'} "
         f"({tmp_path / 'dangling'} is a link to {tmp_path / 'gone'}, which does not resolve to "
         "a directory): sessions are saved there"),
    ]:  # fmt: skip
        with pytest.raises(InvalidInput) as e:
            check_files(ServerConfig(model_dir="m", state_dir=str(d)))
        assert str(e.value) == f"state_dir: {why}"
    new = tmp_path / "new" / "state"  # its port file too: the state dir is made at start
    check_files(ServerConfig(model_dir="m", state_dir=str(new), port_file=str(new / "p.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dangling"]  # none made


@pytest.mark.parametrize("with_key", [False, True])
def test_a_port_file_in_a_state_dir_still_to_be_made_is_written(
    tiny_token_model, tmp_path, with_key
):
    # the state dir is made once the model has opened, also when --snapshot-key names the key
    # (then nothing else made it before the port file was written)
    key = tmp_path / "k.key"
    key.write_bytes(b"s" * 32)
    key.chmod(0o600)
    state = tmp_path / "new" / "state"
    cfg = ServerConfig(model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu",
                       state_dir=str(tmp_path / "new" / ".." / "new" / "state"),
                       port_file=str(state / "p.json"),
                       snapshot_key=str(key) if with_key else None)  # fmt: skip
    with BackgroundServer(cfg) as srv:
        assert json.loads((state / "p.json").read_text())["port"] == srv.port


def test_a_state_dir_whose_sessions_file_is_a_directory_is_refused(tmp_path):
    (tmp_path / "state" / "sessions.bin").mkdir(parents=True)
    with pytest.raises(InvalidInput) as e:
        check_files(ServerConfig(model_dir="m", state_dir=str(tmp_path / "state")))
    assert e.value.field == "state_dir"
    assert str(e.value) == f"state_dir: {tmp_path / 'state' / 'sessions.bin'} is not a file"


def test_a_background_server_whose_start_fails_saves_nothing(
    toy_token_model, tmp_path, monkeypatch
):
    """A start that fails after the listener is up (here: its --port-file cannot be
    written) stops the server without saving; BackgroundServer then stops it again, and
    that second stop must not save the (empty) sessions over --state-dir either."""

    def no_port_file(*a):
        raise OSError("disk full")

    monkeypatch.setattr(server_module, "_write_port_file", no_port_file)
    state = tmp_path / "state"
    cfg = ServerConfig(
        model_dir=str(toy_token_model["model_dir"]),
        port=0,
        device="cpu",
        grace=0.1,
        state_dir=str(state),
        port_file=str(tmp_path / "port.json"),
    )
    with pytest.raises(OSError, match="disk full"):
        BackgroundServer(cfg).start()
    assert not (state / "sessions.bin").exists()


@pytest.mark.parametrize("unsaved, code", [(3, 1), (0, 0)])
def test_serve_exits_1_when_sessions_could_not_be_saved(monkeypatch, unsaved, code):
    async def run(self):
        self.unsaved = unsaved

    monkeypatch.setattr(server_module.Server, "run", run)
    assert server_module.main(["m", "--port", "0"]) == code


def test_a_state_dir_that_cannot_be_written_is_refused_at_start(tmp_path, monkeypatch):
    """An existing --state-dir whose files cannot be created (read-only mount, another
    owner) is refused before serving: the sessions would be lost at shutdown. Writing is
    made to fail here (as root, permissions would not stop it)."""
    d = tmp_path / "state"
    d.mkdir()
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.parent == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    with pytest.raises(InvalidInput) as e:
        check_files(ServerConfig(model_dir="m", state_dir=str(d)))
    assert e.value.field == "state_dir"
    assert (
        str(e.value) == f"state_dir: cannot write {d} (Permission denied): sessions are saved there"
    )
    assert list(d.iterdir()) == []


def _client(srv):
    from ssmstream.runtime.client import Client

    return Client(target(srv), timeout=30)


def test_rewind_memory_mb_is_mebibytes(toy_token_model):
    """--rewind-memory-mb 1 lets a session keep the rewind history of 300 inputs
    (~3.5 KB for the toy model): a rewind to position 5 works. Read as KiB (1024 bytes) the
    session would have dropped its oldest checkpoints and position 5 be out of range."""
    with serve(toy_token_model["model_dir"], rewind_memory_mb=1.0) as srv, _client(srv) as c:
        s = c.create_session()
        for i in range(3):
            s.step(tokens=[(7 * j + i) % toy_token_model["V"] for j in range(100)])
        assert s.position == 300
        assert s.rewind(5) == 5
        assert s.step(tokens=[1]).position == 6


def test_prefix_cache_mb_is_mebibytes(toy_token_model):
    """--prefix-cache-mb 1 caches the states of a 1000-token prompt (~8 KB of tokens):
    the second session created with it starts from the cache. Read as KiB the entry would
    not fit and nothing be cached."""
    prompt = [(3 * j + 1) % toy_token_model["V"] for j in range(1000)]
    with (
        serve(
            toy_token_model["model_dir"], prefix_cache_mb=1.0, max_tokens_per_request=2000
        ) as srv,
        _client(srv) as c,
    ):
        first = c.create_session(prompt=prompt)
        second = c.create_session(prompt=prompt)
        assert first.cached_tokens == 0
        assert second.cached_tokens == 1000
        assert second.position == first.position == 1000


def test_the_port_file_names_the_metrics_port(toy_token_model, tmp_path):
    """The port file carries the bound metrics port (--metrics-port 0 picks one: the
    file is how a supervisor finds it)."""
    import json
    import urllib.request

    pf = tmp_path / "port.json"
    with serve(toy_token_model["model_dir"], metrics_port=0, port_file=str(pf)) as srv:
        info = json.loads(pf.read_text())
        assert info["port"] == srv.port
        assert isinstance(info["metrics_port"], int) and info["metrics_port"] > 0
        assert info["metrics_port"] == srv.server.metrics_port != srv.port
        url = f"http://127.0.0.1:{info['metrics_port']}/metrics"
        assert b"ssmstream_draining" in urllib.request.urlopen(url, timeout=10).read()
    assert not pf.exists()


def test_a_client_ca_that_does_not_load_is_blamed_on_tls_client_ca(tmp_path):
    """With a good certificate and key, an unreadable --tls-client-ca is reported under
    its own flag, not under --tls-cert/--tls-key."""
    certs = make_certs(tmp_path / "certs")
    bad = tmp_path / "ca.pem"
    bad.write_text("not a CA bundle")
    cfg = ServerConfig(
        model_dir="m", tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
        tls_client_ca=str(bad),
    )  # fmt: skip
    with pytest.raises(InvalidInput) as e:
        check_files(cfg)
    assert e.value.field == "tls_client_ca"
    assert str(e.value).startswith(f"tls_client_ca: cannot load {bad}: ")
    ok = ServerConfig(model_dir="m", tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                      tls_client_ca=str(certs.ca))  # fmt: skip
    check_files(ok)


def test_the_draining_gauge_goes_to_one_when_the_server_stops(toy_token_model):
    """Ssmstream_draining is 0 while serving and 1 from the start of the shutdown."""
    srv = serve(toy_token_model["model_dir"], metrics_port=0).start()
    reg = srv.server.metrics.registry
    try:
        assert scrape(srv.server.metrics_port)["ssmstream_draining"] == 0
        assert reg.get_sample_value("ssmstream_draining") == 0.0
    finally:
        srv.stop()
    assert reg.get_sample_value("ssmstream_draining") == 1.0


def test_metrics_http_is_closed_when_the_server_stops(toy_token_model):
    """After stop nothing answers on the metrics port (its socket is closed)."""
    import urllib.error

    srv = serve(toy_token_model["model_dir"], metrics_port=0).start()
    port = srv.server.metrics_port
    try:
        assert "ssmstream_draining" in scrape(port)
    finally:
        srv.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)


def test_sessions_saved_beside_a_lost_key_say_so_at_every_start(tiny_token_model, tmp_path):
    """A --state-dir whose snapshot.key was lost (sessions.bin kept): the start said the file
    "is signed with another server key (see --snapshot-key)", which sent one off to another
    flag, and left the new key it had made, so the next start said it again. It names the
    missing key file, leaves no new one, and the sessions load once the key is back."""
    eng = Engine(tiny_token_model["model_dir"], device="cpu")
    state = tmp_path / "state"
    key = SnapshotKey.in_dir(state)
    store = SessionStore(eng.state_size, 4, model_sha=eng.info["step_sha256"], snapshot_key=key)
    store.create("anonymous", "kept")
    store.save(state)
    old_key = (state / "snapshot.key").read_bytes()
    (state / "snapshot.key").unlink()
    cfg = ServerConfig(model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu",
                       state_dir=str(state))  # fmt: skip
    for _ in range(2):  # the second start says it too
        _, err = _start(cfg, engine=eng)
        assert isinstance(err, InvalidInput) and err.field == "state_dir", err
        assert f"was signed with the key in {state / 'snapshot.key'}, which is missing" in str(err)
        assert sorted(p.name for p in state.iterdir()) == ["lock", "sessions.bin"]
    (state / "snapshot.key").write_bytes(old_key)
    srv, err = _start(cfg, engine=eng)
    assert err is None and srv.store.get("kept", "anonymous").position == 0


def test_snapshot_key_file_wins_over_the_state_dir_key(toy_token_model, tmp_path):
    """With both --snapshot-key and --state-dir, snapshots are signed with the key file,
    so another server holding only that key file restores them."""
    import grpc

    key = tmp_path / "snapshot.key"
    key.write_bytes(b"0123456789abcdef-h8-shared-key\n")
    with (
        serve(
            toy_token_model["model_dir"], state_dir=str(tmp_path / "state"), snapshot_key=str(key)
        ) as a,
        _client(a) as c,
    ):
        s = c.create_session()
        s.step(tokens=[1, 2, 3])
        data = s.snapshot()
    assert (tmp_path / "state").is_dir()
    with serve(toy_token_model["model_dir"], snapshot_key=str(key)) as b, _client(b) as c:
        try:
            r = c.restore(data)
        except grpc.RpcError as e:
            pytest.fail(f"restore refused: {e.code()} {e.details()}")
        assert r.position == 3


def test_a_port_file_removed_by_someone_else_does_not_fail_the_stop(toy_token_model, tmp_path):
    """Stop tolerates a --port-file that is already gone (an operator's cleanup)."""
    pf = tmp_path / "port.json"
    srv = serve(toy_token_model["model_dir"], port_file=str(pf)).start()
    assert pf.is_file()
    pf.unlink()
    srv.stop()  # must not raise
    assert srv.server._stopped.is_set() and not pf.exists()


def test_stop_grace_argument_overrides_the_configured_grace(toy_token_model, tmp_path):
    """Server.stop(grace) uses the grace it is given (BackgroundServer.stop(0), a failed
    start's stop(0)), not --grace: neither an open health Watch nor a Generate in flight
    (which a draining server waits for, up to the grace) holds it for --grace."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ssmstream.runtime.server import BackgroundServer

    # --grace 30: held for it, the stop would take 30 s; with its own 0.1 s, well under 15 s
    # even on a loaded machine
    cfg = ServerConfig(
        model_dir=str(toy_token_model["model_dir"]), port=0, device="cpu", grace=30,
        max_new_tokens=10_000_000,
    )  # fmt: skip
    srv = BackgroundServer(cfg).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.StreamingInferenceStub(channel)
        generate = stub.Generate(pb.GenerateRequest(prompt=[1], max_new_tokens=10_000_000))
        next(generate)  # in flight; not read further
        t0 = time.monotonic()
        srv.stop(grace=0.1)
        assert time.monotonic() - t0 < 15.0
    finally:
        channel.close()
        srv.stop()


def test_a_start_up_error_about_a_setting_names_its_flag(tiny_token_model, tmp_path, caplog):
    """Errors found when the server starts (a file a flag names) say the flag, as argument
    errors do: `--snapshot-key: …`, not the config field `snapshot_key: …`."""
    key = tmp_path / "short.key"
    key.write_bytes(b"12345")
    key.chmod(0o600)
    argv = [str(tiny_token_model["model_dir"]), "--port", "0", "--device", "cpu",
            "--snapshot-key", str(key)]  # fmt: skip
    with caplog.at_level("ERROR", logger="ssmstream.runtime.server"):
        assert server_module.main(argv) == 2
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said.startswith(f"ssmstream serve: --snapshot-key: {key} holds 5 bytes"), said
    assert server_module.with_flags("not_a_field: x") == "not_a_field: x"
    assert server_module.with_flags("tls_cert/tls_key: both") == "--tls-cert/--tls-key: both"


def test_a_start_that_fails_logs_only_its_error(tiny_token_model, tmp_path, caplog):
    # a model dir that is not one had logged the random snapshot key's warning, then
    # 'draining: refusing new work' and 'stopped' for a server that never served; with a
    # --state-dir it made the directories and a signing key
    caplog.set_level("INFO", logger=server_module.__name__)
    assert server_module.main([str(tmp_path / "missing"), "--port", "0"]) == 2
    assert (
        server_module.main(
            [str(tmp_path / "missing"), "--port", "0", "--state-dir", str(tmp_path / "new" / "s")]
        )
        == 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == 2 * [("ERROR", f"ssmstream serve: {tmp_path / 'missing'} does not exist")], said
    caplog.clear()
    with BackgroundServer(ServerConfig(model_dir=str(tiny_token_model["model_dir"]), port=0)):
        pass
    said = caplog.text
    for line in ("signed with a random key", "serving model", "draining: refusing", "stopped"):
        assert line in said, (line, said)


def test_periodic_saves_start_on_a_fixed_schedule(tmp_path):
    # the next save had been due --save-interval after the last one ended: with saves that
    # take a while, a SIGKILL lost up to interval + 2 saves' time, not interval + one
    import asyncio
    import types

    starts = []

    def save(directory):  # a save of many sessions: 0.15 s
        starts.append(time.monotonic())
        time.sleep(0.15)

    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(save_interval=0.2, state_dir=str(tmp_path)),
        store=types.SimpleNamespace(save=save, changed_since_save=True),
    )

    async def run():
        task = asyncio.create_task(server_module.Server._save_loop(fake))
        await asyncio.sleep(1.1)
        task.cancel()

    asyncio.run(run())
    gaps = np.diff(starts)
    assert len(starts) >= 4 and np.all(gaps < 0.3), gaps  # 0.2 s apart, not 0.35


# A port taken between the start's own check (check_bindable) and grpc's bind: grpc does not
# bind, and the start fails naming the address (OSError), instead of "serving" on no port.
def test_a_port_taken_after_the_check_fails_the_start_naming_the_address(
    toy_token_model, monkeypatch
):
    # the check passes (as it did before another process took the port)
    monkeypatch.setattr(server_module, "check_bindable", lambda *a, **kw: None)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServerConfig(
            model_dir=str(toy_token_model["model_dir"]), host="127.0.0.1", port=port,
            device="cpu", grace=0.2,
        )  # fmt: skip
        srv = BackgroundServer(cfg)
        try:
            with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
                srv.start()
            # the failed start undid itself: its event loop thread ended, the loop closed
            assert not srv._thread.is_alive() and srv.loop.is_closed()
        finally:
            srv.stop()  # a no-op after a start that undid itself
    assert srv.server.port == 0
    assert srv.server.batcher is not None and not srv.server.batcher.running  # undone


# A background task that died of an error (a stand-in among the server's tasks: the idle
# sweep and the periodic save log their errors and go on) does not skip the shutdown: stop()
# logs it, still saves every session to --state-dir, and a restart continues them.
def test_a_background_task_that_failed_does_not_skip_the_shutdown_save(
    toy_token_model, tmp_path, caplog
):
    import asyncio

    state_dir = tmp_path / "state"
    kw = dict(model_dir=str(toy_token_model["model_dir"]), port=0, device="cpu", grace=0.2)
    caplog.set_level("ERROR", logger=server_module.__name__)

    async def broken_task():
        raise RuntimeError("background task failed (test)")

    async def add_broken_task():
        task = asyncio.create_task(broken_task())
        srv.server._tasks.append(task)
        await asyncio.wait([task])
        return task

    srv = BackgroundServer(ServerConfig(state_dir=str(state_dir), **kw))
    srv.start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            s = c.create_session(session_id="kept")
            s.step(tokens=[1, 2, 3])
        assert srv.call(add_broken_task()).done()  # it ended with its error
    finally:
        srv.stop()  # does not raise the task's error; saves at shutdown
    said = [r for r in caplog.records if "background task" in r.getMessage()]
    assert len(said) == 1 and "broken_task" in said[0].getMessage(), caplog.text
    assert str(said[0].exc_info[1]) == "background task failed (test)"
    assert (state_dir / "sessions.bin").is_file()
    with BackgroundServer(ServerConfig(state_dir=str(state_dir), **kw)) as again:
        with Client(f"127.0.0.1:{again.port}", timeout=30) as c:
            h = c.session("kept")
            h.snapshot()
            assert h.position == 3


@pytest.mark.parametrize("given", ["state_dir_key", "snapshot_key_flag"])
def test_sessions_signed_with_another_key_leave_the_key_file_as_it_was(
    toy_token_model, tmp_path, given
):
    """A sessions.bin signed with another key (copied from another server) fails the start,
    saying so; the key in use, which this start did not make, is left as it was: only a key
    the start itself made is removed again."""
    eng = Engine(toy_token_model["model_dir"], device="cpu")
    state = tmp_path / "state"
    other = SessionStore(eng.state_size, 4, model_sha=eng.info["step_sha256"],
                         snapshot_key=SnapshotKey(b"another-servers-key-0123456789ab"))  # fmt: skip
    other.create("anonymous", "theirs")
    other.save(state)
    key = state / "snapshot.key" if given == "state_dir_key" else tmp_path / "flag.key"
    key.write_bytes(b"the-key-this-server-signs-with-0123")
    key.chmod(0o600)
    cfg = ServerConfig(
        model_dir=str(toy_token_model["model_dir"]), port=0, device="cpu", state_dir=str(state),
        snapshot_key=str(key) if given == "snapshot_key_flag" else None,
    )  # fmt: skip
    _, err = _start(cfg, engine=eng)
    assert isinstance(err, InvalidInput) and "another server key" in str(err), repr(err)
    assert key.read_bytes() == b"the-key-this-server-signs-with-0123"


def test_without_a_save_interval_sessions_are_saved_only_at_shutdown(toy_token_model, tmp_path):
    """--save-interval 0 (the default): no periodic saves, the sessions reach --state-dir
    when the server stops."""
    state = tmp_path / "state"
    cfg = ServerConfig(model_dir=str(toy_token_model["model_dir"]), port=0, device="cpu",
                       grace=0.1, state_dir=str(state), save_interval=0.0)  # fmt: skip
    with BackgroundServer(cfg) as srv:
        tasks = [t.get_coro().__qualname__ for t in srv.server._tasks]
        assert not any("_save_loop" in name for name in tasks), tasks
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            c.create_session(session_id="kept")
        time.sleep(0.2)  # a periodic save with no interval would have written by now
        assert not (state / "sessions.bin").exists()
    assert (state / "sessions.bin").is_file()


@pytest.mark.parametrize(
    "ttl, period", [(0.1, 0.05), (MIN_SESSION_TTL, 0.05), (8.0, 2.0), (600.0, 5.0), (1e9, 5.0)]
)
def test_the_idle_sweep_runs_every_quarter_ttl_within_its_bounds(monkeypatch, ttl, period):
    """Sessions idle past their TTL are swept every TTL/4, at least every 5 s (a long TTL
    must not keep expired sessions counted for minutes) and at most every 0.05 s."""
    import types

    slept = []

    class Swept(Exception):
        pass

    async def sleep(seconds):
        slept.append(seconds)
        raise Swept

    monkeypatch.setattr(server_module.asyncio, "sleep", sleep)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(session_ttl=ttl))
    with pytest.raises(Swept):
        server_module.Server._evict_loop(fake).send(None)
    assert slept == [pytest.approx(period)]


def test_a_shutdown_that_raises_still_removes_the_port_file(toy_token_model, tmp_path):
    """An error in the shutdown itself (here the batcher's close) is raised, and the port
    file, which names a port nobody listens on any more, is removed all the same."""
    import asyncio

    pf = tmp_path / "port.json"
    srv = server_module.Server(ServerConfig(model_dir=str(toy_token_model["model_dir"]),
                                            port=0, device="cpu", port_file=str(pf)))  # fmt: skip

    async def go():
        await srv.start()
        assert pf.is_file()
        real_close = srv.batcher.close

        async def broken_close():
            await real_close()
            raise RuntimeError("close failed (test)")

        srv.batcher.close = broken_close
        with pytest.raises(RuntimeError, match="close failed"):
            await srv.stop(0)

    asyncio.run(go())
    assert not pf.exists()


def test_a_port_file_rewritten_for_the_same_port_and_pid_is_not_removed(tmp_path):
    """Two servers that share a --port-file, both pid 1 on the same port (containers): the
    one stopping first must not remove the file the other wrote over its own."""
    from ssmstream.runtime.server import _remove_port_file, _write_port_file

    pf = str(tmp_path / "port.json")
    first = _write_port_file(pf, 50051, 9100)
    second = _write_port_file(pf, 50051, 9100)
    _remove_port_file(pf, first)
    assert (tmp_path / "port.json").read_text() == second
    _remove_port_file(pf, second)
    assert not (tmp_path / "port.json").exists()


def test_a_state_dir_another_server_uses_is_refused_until_it_stops(toy_token_model, tmp_path):
    """Two servers saving to one --state-dir overwrite each other's sessions: a second
    server on a directory in use does not start (naming --state-dir and the holder's pid)
    and leaves the first serving; once the first has stopped (its last save written), the
    directory is free and the session it saved loads."""
    import os

    state = str(tmp_path / "state")
    with serve(toy_token_model["model_dir"], state_dir=state) as first:
        with Client(target(first), timeout=30) as c:
            c.create_session(session_id="kept").step(tokens=[1, 2])
        with pytest.raises(InvalidInput) as e:
            serve(toy_token_model["model_dir"], state_dir=state).start()
        assert e.value.field == "state_dir"
        assert f"{state} is in use by another server (pid {os.getpid()})" in str(e.value)
        with Client(target(first), timeout=30) as c:
            assert c.session("kept").step(tokens=[3]).position == 3
    with serve(toy_token_model["model_dir"], state_dir=state) as second:
        with Client(target(second), timeout=30) as c:
            assert c.session("kept").step(tokens=[4]).position == 4


def test_a_state_dir_whose_filesystem_has_no_locks_is_served_unchecked(
    tmp_path, monkeypatch, caplog
):
    """A filesystem without flock (ENOLCK): the server serves, warning that a second server
    would go unnoticed; not refused as if another server held the directory."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level("WARNING", logger="ssmstream.runtime.server")
    assert server_module.lock_state_dir(tmp_path) is None
    assert f"cannot lock {tmp_path / 'lock'} (No locks available)" in caplog.text
