"""Server security: bearer-token auth per RPC, sessions private to their principal, TLS
and mTLS with certificates generated in the test (openssl CLI)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import make_certs
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import auth
from ssmstream.runtime.auth import TokenTable
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.generate import main as generate_main
from ssmstream.runtime.server import BackgroundServer

ALICE, BOB = "tok-alice-3f9a1c", "tok-bob-77e2d0"


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def auth_server(tiny_token_model, tmp_path_factory):
    f = tmp_path_factory.mktemp("auth") / "tokens"
    f.write_text(f"# test tokens\n{ALICE} alice\n{BOB} bob\n")
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        device="cpu",
        auth_tokens=str(f),
        grace=0.2,
    )
    with BackgroundServer(cfg) as srv:
        yield srv


def every_rpc(c: Client, sid: str) -> dict:
    """One call of each RPC of the service, on session `sid` where it takes one."""
    s = c.session(sid)
    return {
        "GetModelInfo": c.info,
        "CreateSession": c.create_session,
        "Step": lambda: s.step(tokens=[1]),
        "Stream": lambda: list(s.stream([[1]])),
        "Generate": lambda: list(s.generate([1], max_new_tokens=2)),
        "SnapshotSession": s.snapshot,
        "RestoreSession": lambda: c.restore(b"snapshot"),
        "ForkSession": s.fork,
        "CloseSession": s.close,
    }


def test_every_rpc_needs_a_valid_token(auth_server, caplog):
    caplog.set_level(logging.DEBUG, logger="ssmstream")
    caplog.set_level(logging.DEBUG, logger="grpc")
    target = f"127.0.0.1:{auth_server.port}"
    with Client(target, token=ALICE, timeout=30) as alice:
        sid = alice.create_session().id
        for token in (None, "wrong-token-5b1e", ""):
            with Client(target, token=token, timeout=30) as c:
                for name, fn in every_rpc(c, sid).items():
                    code, msg = code_of(fn)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, token, code)
                    assert "bearer token" in msg and (not token or token not in msg)
        # a malformed header, or one with an empty token, is refused as well
        raw = grpc.insecure_channel(target)
        info = raw.unary_unary("/ssmstream.v1.StreamingInference/GetModelInfo")
        for value in (f"Basic {ALICE}", "Bearer ", "Bearer   "):
            md = (("authorization", value),)
            with pytest.raises(grpc.RpcError) as e:
                info(pb.GetModelInfoRequest().SerializeToString(), metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        raw.close()
        assert alice.session(sid).step(tokens=[1]).position == 1  # untouched by the above
    for secret in (ALICE, BOB, "wrong-token-5b1e"):
        assert secret not in caplog.text, "a token was logged"


def test_each_refused_call_counts_as_unauthenticated_in_the_metrics(auth_server):
    refused = {"code": "UNAUTHENTICATED"}
    registry = auth_server.server.metrics.registry
    before = registry.get_sample_value("ssmstream_errors_total", refused) or 0.0
    with Client(f"127.0.0.1:{auth_server.port}", token="wrong-token-5b1e", timeout=30) as c:
        for _ in range(2):
            assert code_of(c.info)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert registry.get_sample_value("ssmstream_errors_total", refused) == before + 2


def test_another_principals_session_does_not_exist(auth_server, tiny_token_model):
    target = f"127.0.0.1:{auth_server.port}"
    with Client(target, token=ALICE, timeout=30) as alice, Client(target, token=BOB) as bob:
        s = alice.create_session()
        before = s.step(tokens=[3, 4], output="all")
        for name, fn in every_rpc(bob, s.id).items():
            if name in ("GetModelInfo", "CreateSession", "RestoreSession"):
                continue
            code, msg = code_of(fn)
            assert code == grpc.StatusCode.NOT_FOUND, (name, code, msg)
            assert "unknown" in msg  # the same answer as for an id that never existed
        # ids are one namespace: a taken id is refused (that says the id is taken, no more)
        code, msg = code_of(lambda: bob.create_session(session_id=s.id))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("session_id")
        # alice's session is untouched by all of it
        assert s.snapshot() and s.position == 2
        fork = s.fork()
        again = fork.step(tokens=[5], output="last")
        ref = alice.create_session()
        expect = ref.step(tokens=[3, 4, 5], output="all")
        np.testing.assert_allclose(again.outputs[0], expect.outputs[-1], atol=2e-4)
        np.testing.assert_allclose(before.outputs, expect.outputs[:2], atol=2e-4)
        for h in (s, fork, ref):
            h.close()


def test_health_is_open_and_reflection_needs_a_token(auth_server):
    target = f"127.0.0.1:{auth_server.port}"
    with grpc.insecure_channel(target) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        r = hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        # Watch never ends by itself: without a token it would hold a concurrent-RPC slot
        watch = hs.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        code, _ = code_of(lambda: next(watch))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {BOB}"),)
        watch = hs.Watch(health_pb2.HealthCheckRequest(service=""), metadata=md, timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        code, _ = code_of(lambda: list(refl.ServerReflectionInfo(iter([req]), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {BOB}"),)
        (resp,) = list(refl.ServerReflectionInfo(iter([req]), metadata=md, timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "ssmstream.v1.StreamingInference" in names


def test_a_token_check_does_not_grow_with_the_table():
    """A check looks the digest up: at 20,000 tokens it costs what it costs at one (a scan
    of every entry took ~0.8 ms per RPC at 10,000), for tokens found and not found."""
    big = auth.TokenTable({f"token-{i}": f"p{i % 7}" for i in range(20_000)})
    one = auth.TokenTable({"token-0": "p0"})
    tokens = [f"token-{i}" for i in range(0, 20_000, 97)] + [f"nope-{i}" for i in range(200)]
    assert [big.principal(t) for t in tokens[:3]] == ["p0", "p6", "p5"]  # 0, 97, 194 mod 7
    assert big.principal("nope-0") is None and one.principal("token-97") is None

    def cost(table) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for t in tokens:
                table.principal(t)
            best = min(best, time.perf_counter() - t0)
        return best

    assert cost(big) < 20 * cost(one)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


def test_tls_server_talks_tls_only(tiny_token_model, certs):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        device="cpu",
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        grace=0.2,
    )
    with BackgroundServer(cfg) as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, root_certificates=certs.ca, timeout=30) as c:
            s = c.create_session()
            assert s.step(tokens=[1, 2]).position == 2
            s.close()
        with Client(target, timeout=5) as plain:
            code, _ = code_of(plain.info)
            assert code == grpc.StatusCode.UNAVAILABLE
        # a client that does not trust the server's CA refuses it
        with Client(target, root_certificates=certs.client_cert, timeout=5) as wrong_ca:
            code, _ = code_of(wrong_ca.info)
            assert code == grpc.StatusCode.UNAVAILABLE


def test_generate_says_what_to_try_where_tls_does_not_match(tiny_token_model, certs, capsys):
    """grpc says "Socket closed" of a plaintext client that a TLS server hangs up on, and
    "Tls handshake failed" of a TLS client of a plaintext server: the command says which
    flags to try."""
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    for kw, flags, hint in (
        (tls, [], "if the server uses TLS, connect with --tls (system roots) or --tls-ca FILE"),
        ({}, ["--tls-ca", str(certs.ca)], "the TLS handshake failed: the server may be plaintext"),
    ):
        cfg = ServerConfig(tiny_token_model["model_dir"], port=0, device="cpu", grace=0.2, **kw)
        with BackgroundServer(cfg) as srv:
            argv = ["--server", f"127.0.0.1:{srv.port}", "--timeout", "5", *flags, "x"]
            assert generate_main(argv) == 1
        said = capsys.readouterr().err.splitlines()
        assert said[0].startswith("ssmstream generate: UNAVAILABLE: "), said
        assert said[1].startswith(f"ssmstream generate: {hint}"), said
    # a server that is not there: no TLS hint
    assert generate_main(["--server", "127.0.0.1:1", "--timeout", "5", "x"]) == 1
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("ssmstream generate: UNAVAILABLE: "), said


def test_mtls_requires_a_client_certificate(tiny_token_model, certs):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        device="cpu",
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
        grace=0.2,
    )
    with BackgroundServer(cfg) as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(
            target,
            root_certificates=certs.ca,
            client_cert=certs.client_cert,
            client_key=certs.client_key,
            timeout=30,
        ) as c:
            assert c.create_session().step(tokens=[1]).position == 1
        with Client(target, root_certificates=certs.ca, timeout=5) as no_cert:
            code, _ = code_of(no_cert.info)
            assert code == grpc.StatusCode.UNAVAILABLE


def test_each_refused_call_is_reported_to_on_denied_with_its_method():
    """The interceptor reports every refusal (ssmstream_errors_total{code="UNAUTHENTICATED"}
    counts them), with its method; accepted and open calls are not reported."""
    denied = []
    interceptor = auth.AuthInterceptor(auth.TokenTable({"tok-a": "alice"}), on_denied=denied.append)

    async def behavior(request, context):
        return b"ok"

    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(behavior)

    def call(method, *metadata):
        details = SimpleNamespace(method=method, invocation_metadata=metadata)
        asyncio.run(interceptor.intercept_service(continuation, details))

    step, generate = (f"/ssmstream.v1.StreamingInference/{m}" for m in ("Step", "Generate"))
    call(step, ("authorization", "Bearer tok-a"))
    call("/grpc.health.v1.Health/Check")
    assert denied == []
    call(step)
    call(generate, ("authorization", "Bearer nope"))
    assert denied == [step, generate]


def test_refused_calls_in_a_loop_are_one_log_line_and_each_is_counted(caplog):
    """A caller without a token that calls in a loop gets one log line per
    REFUSALS_LOGGED_EVERY seconds (the first at once), not one per call; each call still
    reaches on_denied (the metric). The next line logged says how many went unlogged."""
    caplog.set_level(logging.INFO, logger="ssmstream.runtime.auth")
    now = [100.0]
    denied = []
    interceptor = auth.AuthInterceptor(auth.TokenTable({"tok-a": "alice"}), on_denied=denied.append)
    interceptor.refusals = auth.RefusalLog(clock=lambda: now[0])

    async def behavior(request, context):
        return b"ok"

    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(behavior)

    step = "/ssmstream.v1.StreamingInference/Step"
    first = f"auth: refused {step} (missing bearer token)"

    def refuse(n: int) -> None:
        for _ in range(n):
            details = SimpleNamespace(method=step, invocation_metadata=())
            asyncio.run(interceptor.intercept_service(continuation, details))
            now[0] += 0.01

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "auth: refused" in r.getMessage()]

    refuse(200)  # 2 s of calls
    assert len(denied) == 200
    assert lines() == [first]
    now[0] = 100.0 + auth.REFUSALS_LOGGED_EVERY
    refuse(2)
    assert lines() == [first, f"{first}; 199 more since the previous line"]
    assert len(denied) == 202


def test_a_refused_call_s_request_is_never_parsed():
    """Before the token is checked, grpc has read a request of up to --max-message-bytes;
    a refused call must not have it decoded as well (a message of repeated ints takes ~15
    times its bytes once parsed): the deserializer runs for an accepted call only."""
    parsed = []

    def deserialize(data: bytes) -> bytes:
        parsed.append(len(data))
        return data

    async def behavior(request, context):
        return b"ok"

    handler = grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=deserialize)
    service = grpc.method_handlers_generic_handler("t.S", {"M": handler})
    interceptor = auth.AuthInterceptor(auth.TokenTable({"tok-a": "alice"}))

    async def go() -> list:
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers((service,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary("/t.S/M")
                for token in ("nope", None, "tok-a"):
                    md = () if token is None else (("authorization", f"Bearer {token}"),)
                    try:
                        await call(b"x" * 1000, metadata=md, timeout=10)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
        finally:
            await server.stop(0)
        return codes

    assert asyncio.run(go()) == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.OK]
    assert parsed == [1000]  # the accepted call's request only


def test_a_tokens_path_that_is_not_a_file_is_a_value_error_naming_the_flag(tmp_path):
    """A directory or a missing path is ValueError 'auth_tokens: PATH is not a file'
    (what main reports as a usage error), not an IsADirectoryError / FileNotFoundError."""
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError) as e:
            TokenTable.from_file(path)
        assert str(e.value) == f"auth_tokens: {path} is not a file"


def test_a_tokens_file_with_a_bom_keeps_its_first_token_and_non_ascii_tokens_are_refused(
    tmp_path,
):
    """An editor's UTF-8 BOM was read as part of the first token (which then never matched);
    a token no gRPC client can send (non-ASCII) is refused naming its line, not its text."""
    path = tmp_path / "tokens"
    path.write_bytes("\ufefftok-a alice\ntok-b bob\n".encode())
    table = TokenTable.from_file(path)
    assert table.principal("tok-a") == "alice" and table.principal("tok-b") == "bob"
    path.write_text("tok-a alice\ntök-b bob\n")
    with pytest.raises(ValueError) as e:
        TokenTable.from_file(path)
    assert str(e.value) == (
        f"auth_tokens: {path}:2: the token must be visible ASCII (no client can send another)"
    )


NO_TOKEN_LINE = "holds no '<token> <principal>' line (only blank lines and # comments)"


@pytest.mark.parametrize("text", ["", "\n\n", "# tokens of the team\n   \n#tok-a alice\n"])
def test_a_tokens_file_without_a_token_line_is_refused_naming_the_file(tmp_path, caplog, text):
    """Only blank lines and comments: one error naming the file (it said "the token table is
    empty" after an info line counting 0 tokens)."""
    path = tmp_path / "tokens"
    path.write_text(text)
    with caplog.at_level(logging.INFO, logger=auth.__name__), pytest.raises(ValueError) as e:
        TokenTable.from_file(path)
    assert str(e.value) == f"auth_tokens: {path} {NO_TOKEN_LINE}"
    assert caplog.records == []


def test_serve_with_a_tokens_file_without_a_token_line_exits_2_naming_the_flag(
    toy_token_model, tmp_path, caplog
):
    from ssmstream.runtime import server

    path = tmp_path / "tokens"
    path.write_text("# no tokens yet\n\n")
    argv = [
        str(toy_token_model["model_dir"]), "--host", "127.0.0.1", "--port", "0",
        "--device", "cpu", "--auth-tokens", str(path),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ssmstream.runtime"):
        assert server.main(argv) == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == [f"ssmstream serve: --auth-tokens: {path} {NO_TOKEN_LINE}"]


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.1.2.3", False, True),
        ("my-host.example", False, True),
        ("127.0.0.1", False, False),
        ("127.8.0.1", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
        ("localhost", False, False),
        ("0.0.0.0", True, False),
    ],
)
def test_tokens_in_clear_text_on_a_reachable_address_are_warned_of(host, tls, warned):
    from ssmstream.runtime.server import cleartext_tokens

    tls_args = dict(tls_cert="c.pem", tls_key="k.pem") if tls else {}
    cfg = ServerConfig(model_dir="m", host=host, auth_tokens="tokens", **tls_args)
    assert cleartext_tokens(cfg) is warned
    assert cleartext_tokens(dataclasses.replace(cfg, auth_tokens=None)) is False


def test_the_start_logs_the_clear_text_warning(tiny_token_model, tmp_path, caplog, monkeypatch):
    """The check runs at start: the server on 127.0.0.1 says nothing; told its host is
    reachable, it warns (the bind itself stays on loopback: the check is patched)."""
    from ssmstream.runtime import server

    f = tmp_path / "tokens"
    f.write_text(f"{ALICE} alice\n")
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu",
        auth_tokens=str(f), grace=0.2,
    )  # fmt: skip
    says = "bearer tokens reach 127.0.0.1 in clear text"
    with caplog.at_level(logging.WARNING, logger="ssmstream.runtime.server"):
        with BackgroundServer(cfg):
            pass
        assert says not in caplog.text
        monkeypatch.setattr(server, "cleartext_tokens", lambda c: True)
        with BackgroundServer(cfg):
            pass
    assert says in caplog.text


def test_plaintext_connections_to_a_tls_server_write_no_log_line_each(tiny_token_model, tmp_path):
    """Unless GRPC_VERBOSITY says otherwise, grpc's core logs at INFO: `ssmstream serve`
    wrote "Handshake failed with error SSL_ERROR_SSL …" on stderr for every connection that
    did not speak TLS, which anyone who reaches the port can open in a loop."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    certs = make_certs(tmp_path / "certs")
    port_file, log = tmp_path / "port.json", tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "serve",
           str(tiny_token_model["model_dir"]), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--port-file", str(port_file), "--grace", "0.2",
           "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        for _ in range(3):  # an HTTP/1 request where a TLS handshake is due: refused
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(100)
        with Client(f"127.0.0.1:{port}", root_certificates=certs.ca.read_bytes()) as c:
            assert c.info().state_size > 0  # a TLS client is served
        # the other way round, a TLS client of a port that does not speak TLS: the command's
        # one error line, and no line of grpc's own
        with socket.create_server(("127.0.0.1", 0)) as plain:
            answer = threading.Thread(target=_answer_in_plaintext, args=(plain,), daemon=True)
            answer.start()
            gen = subprocess.run(
                [sys.executable, "-m", "ssmstream.runtime.cli", "generate", "--server",
                 f"127.0.0.1:{plain.getsockname()[1]}", "--tls-ca", str(certs.ca),
                 "--timeout", "5", "x"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
        assert gen.returncode == 1
        said = gen.stderr.splitlines()
        assert said[0].startswith("ssmstream generate: UNAVAILABLE: ")
        assert said[1].startswith("ssmstream generate: the TLS handshake failed: "), said
        assert len(said) == 2, gen.stderr  # the command's lines only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "with TLS" in text  # the start line says it serves TLS
    assert "Handshake failed" not in text, text


def _answer_in_plaintext(listener) -> None:
    """Answer each connection to `listener` with an HTTP/1 error, as a plaintext server
    answers a TLS hello, until the listener closes."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
