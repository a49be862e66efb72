"""The Python client's edges: arguments it refuses naming them (timeouts grpc cannot hold,
an empty certificate argument that would have meant plaintext, a token HTTP/2 metadata cannot
carry, ints past int64, ragged lists), streams left early or cancelled, stream handles left
open, a regenerate too large for the server, and `ssmstream generate` stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_helpers import make_certs, position_on_server, serve, target
from ssmstream.runtime.client import (
    CLIENT_CLOSED,
    AsyncClient,
    Client,
    channel_credentials,
    create_request,
    generate_request,
    step_request,
)
from ssmstream.runtime.generate import main as generate_main

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"  # the shape only


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: create_request("s", ttl=10**400), "ttl"),
        (lambda: generate_request("s", [1], temperature=10**400), "temperature"),
        (lambda: generate_request("s", [1], top_p=-(10**400)), "top_p"),
    ],
    ids=["ttl", "temperature", "top_p"],
)
def test_a_huge_int_number_is_a_value_error_naming_it(call, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        call()


def test_a_ragged_token_list_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="^tokens: "):
        step_request("s", tokens=[[1], [1, 2]])
    with pytest.raises(ValueError, match="^prompt: "):
        generate_request("s", [[1], [1, 2]])


def test_arguments_of_the_wrong_type_are_value_errors_naming_them(certs):
    """They had reached protobuf or a dict lookup: TypeError, not the ValueError naming the
    argument the client promises."""
    for call, name in [
        (lambda: create_request("s", snapshot="abc"), "snapshot"),
        (lambda: create_request(5), "session_id"),
        (lambda: generate_request(5, [1]), "session_id"),
        (lambda: step_request(5, tokens=[1]), "session_id"),
        (lambda: step_request("s", tokens=[1], output=["last"]), "output"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()
    # bytes-like arguments are bytes (the server's snapshot decoder takes them too)
    assert create_request("s", snapshot=bytearray(b"ab")).snapshot == b"ab"
    assert create_request("s", snapshot=memoryview(b"ab")).snapshot == b"ab"
    assert channel_credentials(root_certificates=bytearray(certs.ca.read_bytes())) is not None
    with pytest.raises(ValueError, match="^root_certificates: is empty"):
        channel_credentials(root_certificates=bytearray())


@pytest.mark.parametrize("ids", [[2**64], [-1, 2**63], [-(2**63) - 1]], ids=str)
def test_an_integer_beyond_int64_is_refused_as_such(ids):
    with pytest.raises(ValueError, match="^prompt: must fit in int64"):
        generate_request("s", ids)


def test_an_integer_beyond_int64_is_named_not_the_int64_minimum_beside_it():
    """-(2**63) fits int64: the error names the id that does not."""
    with pytest.raises(ValueError) as e:
        generate_request("s", [-(2**63), 2**63])
    assert str(e.value) == f"prompt: must fit in int64, got {2**63}"


def test_an_integer_beyond_int64_is_named_not_the_int64_maximum_beside_it():
    """2**63 - 1 fits int64: the error names the id that does not."""
    with pytest.raises(ValueError) as e:
        generate_request("s", [2**63 - 1, 2**64])
    assert str(e.value) == f"prompt: must fit in int64, got {2**64}"


@pytest.fixture(scope="module")
def srv(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


def test_a_send_after_a_timed_out_send_is_an_rpc_error_not_a_cancelled_task(srv):
    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            st = s.open_stream()
            await st.send(tokens=[1])
            task = asyncio.ensure_future(st.send(tokens=[2]))
            await asyncio.sleep(0)  # the send is now suspended in grpc (its write or read)
            task.cancel()  # what asyncio.wait_for / asyncio.timeout do when time is up
            with pytest.raises(asyncio.CancelledError):
                await task
            try:
                await st.send(tokens=[3])
            except asyncio.CancelledError:
                return "asyncio.CancelledError"
            except grpc.RpcError as e:
                return e.code()
            finally:
                await st.close()
                await s.close()
            return "no error"

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == grpc.StatusCode.CANCELLED, f"the next send raised {got}"


N = 30_000  # all of them take the server many seconds: never over before the checks below


def test_closing_an_async_stream_early_stops_its_inputs_and_detaches(srv):
    """Leaving `stream` early (break, aclose) cancels its call: the session detaches (a Step
    is taken again) having run only the inputs sent before (a few; at most what HTTP/2 flow
    control let through, on a stalled client), and nothing steps it afterwards. Left running,
    it would go on through all N inputs, attached all the while."""

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            async with contextlib.aclosing(s.stream([[1]] * N)) as g:
                async for r in g:
                    if r.position == 3:
                        break
            # detached within moments (seconds on a loaded machine): polled, not timed
            step_error, deadline = None, time.monotonic() + 30
            while True:
                try:
                    r = await s.step(tokens=[1])
                    break
                except grpc.RpcError as e:
                    step_error = f"{e.code().name}: {e.details()}"
                    if time.monotonic() > deadline:
                        return None, position_on_server(srv, s.id), step_error
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # no input of the closed stream steps it any more
            return r.position, position_on_server(srv, s.id), None

    detached_at, later, err = asyncio.run(asyncio.wait_for(run(), 60))
    assert err is None and detached_at < N // 3 and later == detached_at, (
        f"left at position 3; stepped again at {detached_at}, then {later} of {N}; step: {err}"
    )


@pytest.mark.parametrize("timeout", [math.inf, 1e12], ids=["inf", "1e12"])
def test_a_generous_timeout_does_not_fail_every_call(srv, timeout):
    with Client(target(srv), timeout=timeout) as c:
        assert c.info().vocab_size > 0

    async def run():
        async with AsyncClient(target(srv), timeout=timeout) as c:
            return (await c.info()).vocab_size

    assert asyncio.run(run()) > 0


@pytest.mark.parametrize("timeout", [-1.0, 0, math.nan, "10"], ids=["negative", "0", "nan", "str"])
def test_a_meaningless_timeout_is_refused_naming_it(timeout):
    """grpc failed every call with these (DEADLINE_EXCEEDED): a slow server, it seemed."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=r"^timeout: must be"):
            make("127.0.0.1:1", timeout=timeout)


def test_a_timeout_of_numpy_type_is_a_float_and_inf_is_none():
    assert Client("127.0.0.1:1", timeout=np.float32(30)).timeout == 30.0
    assert type(Client("127.0.0.1:1", timeout=np.float32(30)).timeout) is float
    assert Client("127.0.0.1:1", timeout=math.inf).timeout is None


@pytest.mark.parametrize(
    "kw",
    [
        {"root_certificates": ""},
        {"root_certificates": b""},
        {"client_cert": "", "client_key": ""},
    ],
    ids=["ca-empty-path", "ca-empty-bytes", "mtls-empty-paths"],
)
def test_an_empty_certificate_argument_never_means_plaintext(kw):
    """An unset variable (`--tls-ca "$CA"`) must not silently mean plaintext."""
    with pytest.raises(ValueError, match=rf"^{next(iter(kw))}: is empty"):
        channel_credentials(**kw)


@pytest.mark.parametrize(
    "kw, flag",
    [({"root_certificates": "no-ca.pem"}, "--tls-ca"),
     ({"client_cert": "no-cert.pem", "client_key": PEM}, "--tls-cert"),
     ({"client_cert": PEM, "client_key": "no-key.pem"}, "--tls-key")],
)  # fmt: skip
def test_a_certificate_file_that_cannot_be_read_is_named_with_its_flag(tmp_path, kw, flag):
    kw = {k: str(tmp_path / v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=rf"\({flag}\): cannot read '.*no-.*\.pem': No such file"):
        channel_credentials(**kw)


@pytest.fixture(scope="module")
def plaintext_server(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


def test_generate_cli_with_an_empty_tls_ca_does_not_talk_plaintext(plaintext_server, capsys):
    argv = ["--server", target(plaintext_server), "--ids", "1", "--max-new-tokens", "2",
            "--tls-ca", ""]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        generate_main(argv)
    assert e.value.code == 2
    said = capsys.readouterr()
    assert said.out == "" and "--tls-ca: is empty" in said.err


@pytest.fixture(scope="module")
def byte_server(make_toy, tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("toy256"), "tokens", V=256, d_out=256)
    with serve(toy["model_dir"], max_new_tokens=100000) as s:
        yield s


@pytest.mark.parametrize(
    "sig, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")]
)
def test_ctrl_c_or_sigterm_prints_the_kept_session_and_no_traceback(byte_server, sig, said):
    # SIGTERM (`kill`, `timeout`) had ended the command with no word: the kept session's id,
    # which only this command knew, was lost
    cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "generate", "--server",
           target(byte_server), "--max-new-tokens", "100000", "--temperature", "1",
           "--ids", "1", "--keep-session"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        head = p.stdout.read(50)  # tokens are arriving
        assert head
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    printed = len((head + out).split())
    err = err.decode(errors="replace")
    assert "Traceback" not in err, err[-300:]
    assert p.returncode == 128 + sig and err.startswith(f"ssmstream generate: {said}\nsession: "), (
        err
    )
    # (--ids: each id ends its line, so no newline comes first)
    # the session holds the prompt and the ids received but the last (the next prompt starts
    # with it), not the ids the server sampled and fed after it that never arrived: what the
    # CLI says is where the session is (the last ids received may be unprinted: the Ctrl-C
    # can land before their writes)
    sid, position = re.search(r"session: (\S+) \(position (\d+)\)", err).groups()
    assert int(position) == position_on_server(byte_server, sid)
    assert int(position) >= printed  # 1 prompt token + received - 1


@pytest.fixture(scope="module")
def small_msgs(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64, max_message_bytes=256) as s:
        yield s


def test_a_regenerate_too_large_for_the_server_does_not_rewind(small_msgs):
    with Client(target(small_msgs), timeout=10) as c:
        s = c.create_session(prompt=[1, 2, 3, 4, 5, 6])
        big_prompt = [7] * 400  # 400 tokens: under max_tokens_per_request, over 256 bytes
        assert c.info().limits.max_tokens_per_request >= len(big_prompt)
        with pytest.raises((ValueError, grpc.RpcError)) as e:
            list(s.regenerate(2, big_prompt, max_new_tokens=2))
        where = position_on_server(small_msgs, s.id)
        s.close()
    assert where == 6, f"refused ({e.value!r:.120}) yet the session was rewound to {where}"


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_handles_left_open_leave_no_thread_after_the_client_closes(srv):
    with Client(target(srv), timeout=10) as c:  # warm the channel's own threads up
        c.info()
    before = _threads()
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        for _ in range(3):
            st = s.open_stream()
            st.send(tokens=[1])
            del st  # dropped without close()
        st = s.open_stream()
        with pytest.raises(grpc.RpcError):
            st.send(tokens=[999])  # the server ends this stream: INVALID_ARGUMENT
        del st
        gc.collect()
        s.close()
    # they end within moments (seconds on a loaded machine); a thread left waiting on a
    # dropped handle's queue would never end: polled up to a generous deadline
    left = _threads_left(before)
    assert not left, f"{len(left)} threads left after Client.close(): {left}"


def _threads_left(before: set, seconds: float = 30.0) -> list[str]:
    """The names of threads started since `before` that have not ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := _threads() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    return sorted(t.name for t in left)


def _catch(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - CancelledError is a BaseException
        return e
    return None


def test_a_bad_kind_is_a_value_error_naming_it_in_both_clients(srv):
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        e = _catch(lambda: list(s.stream([[1], [2]], kind="token")))
        assert isinstance(e, ValueError) and "kind" in str(e), f"sync: {type(e).__name__}: {e}"

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            try:
                [r async for r in s.stream([[1], [2]], kind="token")]
            except BaseException as e:  # noqa: BLE001
                return e
            return None

    e = asyncio.run(asyncio.wait_for(run(), 30))
    assert isinstance(e, ValueError) and "kind" in str(e), f"async: {type(e).__name__}: {e}"


class MicError(OSError):
    pass


def _inputs():
    yield [1]
    raise MicError("microphone unplugged")


async def _ainputs():
    yield [1]
    raise MicError("microphone unplugged")


def test_the_callers_own_iterable_error_reaches_the_caller_in_both_clients(srv):
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        e = _catch(lambda: list(s.stream(_inputs())))
        assert isinstance(e, MicError), f"sync: {type(e).__name__}: {e}"

    async def run(make):
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            try:
                [r async for r in s.stream(make())]
            except BaseException as e:  # noqa: BLE001
                return e
            return None

    for make in (_inputs, _ainputs):
        e = asyncio.run(asyncio.wait_for(run(make), 30))
        assert isinstance(e, MicError), f"async ({make.__name__}): {type(e).__name__}: {e}"


@pytest.mark.parametrize("token", ["s3cret\n", "s3cr\u00e9t"], ids=["newline", "non-ascii"])
def test_a_token_grpc_cannot_send_is_named_not_an_internal_error(srv, token):
    """A token read from a file with its newline made every call fail with INTERNAL."""
    with pytest.raises(ValueError, match=r"^token: must be visible ASCII"):
        Client(target(srv), token=token, timeout=10)
    sendable = token.strip().encode("ascii", "replace").decode()
    with Client(target(srv), token=sendable, timeout=10) as c:
        assert c.info().vocab_size > 0  # no auth on this server: a sendable token is taken


def test_close_while_another_thread_opens_stream_handles(srv):
    """Client.close() and StreamHandle() from another thread at once: close never raises
    ("Set changed size during iteration") and the channel is closed."""
    c = Client(target(srv), timeout=10)
    sessions = [c.create_session() for _ in range(4)]
    stop, errors = threading.Event(), []

    def open_many():
        while not stop.is_set():
            for s in sessions:
                try:
                    s.open_stream().close()
                except (grpc.RpcError, ValueError):  # the channel closed under it: fine
                    return

    t = threading.Thread(target=open_many)
    t.start()
    try:
        time.sleep(0.2)
        c.close()
    except RuntimeError as e:  # noqa: PERF203
        errors.append(e)
    finally:
        stop.set()
        t.join(10)
    assert errors == []


def test_a_token_with_a_space_is_refused_naming_it():
    """A token with a space is not one bearer token (a pasted "Bearer <token>", or a line
    of the tokens file, "<token> <principal>"): refused before any call."""
    for token in ("tok-0123 alice", "Bearer tok-0123"):
        with pytest.raises(ValueError, match=r"^token: must be visible ASCII"):
            Client("127.0.0.1:1", token=token, timeout=10)
        with pytest.raises(ValueError, match=r"^token: must be visible ASCII"):
            AsyncClient("127.0.0.1:1", token=token, timeout=10)


@pytest.mark.parametrize(
    "token, said",
    [
        (b"tok-0123", "token: must be a str (None: no token), got bytes; decode it first"),
        (bytearray(b"t"), "token: must be a str (None: no token), got bytearray; decode it first"),
        (b"", "token: must be a str (None: no token), got bytes; decode it first"),
        (0, "token: must be a str (None: no token), got int"),
        ("tok 0123", "token: must be visible ASCII characters (no blanks, no newline)"),
        ("tok-0123\n", "token: must be visible ASCII characters (no blanks, no newline)"),
        ("tök-0123", "token: must be visible ASCII characters (no blanks, no newline)"),
    ],
    ids=["bytes", "bytearray", "empty-bytes", "zero", "space", "newline", "non-ascii"],
)
def test_a_token_that_is_no_str_of_visible_ascii_is_refused_at_construction(token, said):
    """Bytes were refused as not visible ASCII; a falsy non-str (b"", 0) was taken as no
    token. Each is a ValueError naming `token` before any call (port 1: nothing listens);
    None and "" send no token."""
    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError) as e:
            cls("127.0.0.1:1", token=token, timeout=10)
        assert str(e.value) == said
    with Client("127.0.0.1:1", token=None) as none, Client("127.0.0.1:1", token="") as empty:
        assert none.metadata == empty.metadata == ()
    with Client("127.0.0.1:1", token="t-1") as one:
        assert one.metadata == (("authorization", "Bearer t-1"),)


def test_close_ends_the_stream_handles_still_held_open(srv):
    """Client.close() closes the handles the caller still holds: their request threads end
    (not only those of handles dropped without close)."""
    with Client(target(srv), timeout=10) as c:  # warm the channel's own threads up
        c.info()
    before = _threads()
    c = Client(target(srv), timeout=10)
    held = [c.create_session().open_stream() for _ in range(3)]  # one Stream per session
    for st in held:
        st.send(tokens=[1])
    c.close()
    left = _threads_left(before)
    assert not left, f"{len(left)} threads left with {len(held)} handles held: {left}"
    with pytest.raises(grpc.RpcError):
        held[0].send(tokens=[2])


def test_closing_an_async_generate_early_stops_the_generation(byte_server):
    """aclose() on an async generate cancels its call: the kept session stays at the
    position it had when left, the server does not go on generating all N tokens."""
    n = 100_000

    async def run():
        async with AsyncClient(target(byte_server), timeout=10) as c:
            s = await c.create_session(prompt=[1])
            g = s.generate([1], max_new_tokens=n, temperature=1.0, seed=0, keep_session=True)
            async for r in g:
                if r.position >= 3:
                    break
            await g.aclose()
            await asyncio.sleep(0.5)  # the cancellation reaches the server
            left_at = position_on_server(byte_server, s.id)
            await asyncio.sleep(0.5)  # nothing generates on it any more
            later = position_on_server(byte_server, s.id)
            await s.close()
            return left_at, later

    left_at, later = asyncio.run(asyncio.wait_for(run(), 60))
    assert later == left_at < n // 3, f"left at 3; then {left_at}, {later} of {n}"


def test_leaving_the_with_block_closes_the_channel_in_both_clients(srv):
    """After the `with` block no call goes out: the channel is closed (grpc refuses an RPC on
    it), and the client's calls raise CANCELLED "the client was closed"."""
    with Client(target(srv), timeout=10) as c:
        assert c.info().vocab_size > 0
    with pytest.raises(ValueError, match="closed channel"):
        c.channel.unary_unary("/ssmstream.v1.StreamingInference/GetModelInfo")(b"")
    with pytest.raises(grpc.RpcError) as e:
        c.info()
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.CANCELLED, CLIENT_CLOSED)

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            assert (await c.info()).vocab_size > 0
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await c.channel.unary_unary("/ssmstream.v1.StreamingInference/GetModelInfo")(b"")
        with pytest.raises(grpc.RpcError) as e:
            await c.info()
        return e.value.code(), e.value.details()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == (grpc.StatusCode.CANCELLED, CLIENT_CLOSED)


@pytest.mark.parametrize("field, flag", [("root_certificates", "--tls-ca"),
                                         ("client_cert", "--tls-cert"),
                                         ("client_key", "--tls-key")])  # fmt: skip
@pytest.mark.parametrize(
    "content, words",
    [(b"", "is not PEM"), (b"not a certificate\n", "is not PEM"),
     (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
      "is encrypted")],
    ids=["empty", "not-pem", "encrypted"],
)  # fmt: skip
def test_a_certificate_file_that_is_not_pem_is_named_not_a_crash(
    tmp_path, field, flag, content, words
):
    """grpc's core aborted the whole process (SIGABRT) on an empty key or certificate file;
    a CA that is not PEM, or an encrypted key, failed only at connect, UNAVAILABLE without
    naming the flag."""
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    kw = {"client_cert": PEM, "client_key": PEM} if field != "root_certificates" else {}
    kw[field] = str(bad)
    with pytest.raises(ValueError, match=rf"^{field} \({flag}\): '.*bad.pem' {words}"):
        Client("127.0.0.1:1", **kw)


def test_a_ca_file_openssl_cannot_load_is_named(tmp_path, certs):
    bad = tmp_path / "ca.pem"
    bad.write_bytes(PEM)  # a PEM header around a body that is no certificate
    with pytest.raises(ValueError, match=r"^root_certificates \(--tls-ca\): holds no certificate"):
        Client("127.0.0.1:1", root_certificates=str(bad))
    assert Client("127.0.0.1:1", root_certificates=str(certs.ca)).credentials is not None


@pytest.mark.parametrize("sid", ["é", "sess\n", "a b", "-x"])
def test_a_session_id_metadata_cannot_carry_is_a_value_error_naming_it(srv, sid):
    """It went into the x-session-id header unchecked: INTERNAL "Invalid metadata" (sync) or
    a grpc ExecuteBatchError that is no RpcError (async)."""
    with Client(target(srv), timeout=10) as c:
        before = len(srv.server.store)
        for call in (lambda: c.create_session(sid), lambda: c.session(sid),
                     lambda: c.session("ok").fork(sid)):  # fmt: skip
            with pytest.raises(ValueError, match=r"^(new_)?session_id: must be 1-128 characters"):
                call()
        assert len(srv.server.store) == before

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            with pytest.raises(ValueError, match="^session_id: "):
                await c.create_session(sid)
            with pytest.raises(ValueError, match="^session_id: "):
                c.session(sid)

    asyncio.run(run())


def test_a_bool_among_tokens_or_values_is_refused_not_sent_as_1():
    for call, name in [
        (lambda: step_request("s", tokens=[7, True]), "tokens"),
        (lambda: generate_request("s", [65, np.True_]), "prompt"),
        (lambda: generate_request("s", [65], stop=[False]), "stop"),
        (lambda: create_request("s", prompt=(1, True)), "prompt"),
        (lambda: step_request("s", values=[1.0, True]), "values"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()
    assert list(step_request("s", tokens=[7, 1]).tokens) == [7, 1]


@pytest.mark.parametrize("port", ["65536", "104707", "0"])
def test_a_port_outside_the_tcp_range_is_refused_not_wrapped(port):
    """grpc took the port modulo 65536: 104707 reached whatever listens on 39171."""
    targets = ["127.0.0.1:", "dns:///localhost:", "[::1]:", "ipv4:127.0.0.1:", "ipv6:[::1]:",
               "dns://8.8.8.8/h:"]  # fmt: skip
    for make in (Client, AsyncClient):
        for t in (f"{t}{port}" for t in targets):
            with pytest.raises(ValueError, match=rf"^target \(--server\): port {port} is outside"):
                make(t)


@pytest.mark.parametrize(
    "t",
    ["127.0.0.1:65535", "localhost:50051", "[::1]:50051", "dns:///localhost:50051",
     "ipv6:[::1]:50051", "unix:/tmp/sock:99999", "unix:///tmp/s", "vsock:3:70000", "fd00::0",
     "xds:///svc", "ipv4:127.0.0.1:1,127.0.0.2:70000"],
)  # fmt: skip
def test_targets_that_are_no_single_tcp_port_are_taken_as_given(t):
    assert Client(t).target == t


def test_a_top_p_below_float32_is_the_smallest_nucleus_not_off(byte_server):
    """top_p is a float32 field where 0 means off: 1e-50 rounded to 0 and sampled the whole
    distribution."""
    assert generate_request("s", [1], top_p=1e-50).top_p > 0
    with Client(target(byte_server), timeout=30) as c:
        greedy = [r.token for r in c.generate([1], max_new_tokens=20, temperature=0)]
        tiny = [r.token for r in c.generate([1], max_new_tokens=20, top_p=1e-50, seed=3)]
        full = [r.token for r in c.generate([1], max_new_tokens=20, top_p=1.0, seed=3)]
    assert tiny == greedy != full


def test_an_async_send_in_flight_when_the_handle_closes_is_cancelled_not_a_cancelled_task(
    byte_server,
):
    """The task ended with asyncio.CancelledError (task.cancelled() True, though nothing
    cancelled it), where the sync handle raises RpcError CANCELLED."""

    async def one() -> object:
        async with AsyncClient(target(byte_server), timeout=30) as c:
            s = await c.create_session()
            h = s.open_stream()
            await h.send([1])
            task = asyncio.ensure_future(h.send([2] * 4000))
            await asyncio.sleep(0)  # the send is suspended in grpc now
            await h.close()
            try:
                await task
                return "returned"  # it finished first: try again
            except grpc.RpcError as e:
                return (e.code(), e.details(), task.cancelled())

    for _ in range(10):
        got = asyncio.run(asyncio.wait_for(one(), 60))
        if got != "returned":
            break
    assert got == (grpc.StatusCode.CANCELLED, "this stream was closed", False)


def test_a_ca_bundle_with_non_ascii_comments_loads(certs, tmp_path):
    """OpenSSL loads a bundle whose comments name issuers in UTF-8 (older certifi ones); the
    client's check raised a TypeError on it."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Issuer: Főtanúsítvány\n".encode() + certs.ca.read_bytes())
    assert Client("127.0.0.1:1", root_certificates=str(bundle)).credentials is not None


def test_an_async_stream_handle_dropped_unclosed_ends_its_stream(srv):
    # grpc.aio kept a dropped handle's call, and the server its Stream with the session
    # attached, until the channel closed (~25 KB a handle in the client, one open Stream each)
    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            h = s.open_stream()
            await h.send(tokens=[1])
            del h  # not closed
            gc.collect()
            deadline = time.monotonic() + 20
            while True:  # attached to the dropped one, a new Stream is refused until it ends
                again = s.open_stream()
                try:
                    r = await again.send(tokens=[2])
                    break
                except grpc.aio.AioRpcError as e:
                    if "attached to an open" not in (e.details() or ""):
                        raise
                    if time.monotonic() > deadline:
                        pytest.fail("the dropped handle's Stream is still attached")
                    await asyncio.sleep(0.1)
                finally:
                    await again.close()
            await s.close()
            return r.position

    assert asyncio.run(asyncio.wait_for(run(), 60)) == 2


def as_an_old_server(create):
    """A CreateSession stub call as a server older than the client makes it: it ignores
    CreateSessionRequest.prompt (an unknown field)."""
    from ssmstream.protos import inference_pb2 as pb

    def call(req, **kw):
        old = pb.CreateSessionRequest()
        old.CopyFrom(req)
        old.ClearField("prompt")
        return create(old, **kw)

    return call


def test_a_server_that_drops_the_prompt_is_an_error_not_an_empty_session(byte_server):
    # a server older than the client ignores CreateSessionRequest.prompt (an unknown field):
    # the session came back at position 0 without its prompt, and later calls ignored it
    before = len(byte_server.server.store)
    with Client(target(byte_server), timeout=30) as c:
        assert c.create_session(prompt=[1, 2, 3]).position == 3  # today's server takes it
        real = c.stub.CreateSession
        c.stub.CreateSession = as_an_old_server(real)
        with pytest.raises(RuntimeError, match="^prompt: the server created the session without"):
            c.create_session(prompt=[1, 2, 3])
        assert c.create_session().position == 0  # no prompt: nothing to check
        snap = c.create_session().snapshot()  # with a snapshot, the prompt is never taken
        with pytest.raises(RuntimeError, match="^prompt: the server created"):
            c.create_session(snapshot=snap, prompt=[5, 6])
        c.stub.CreateSession = real
        assert c.create_session(prompt=np.array([[1, 2, 3]])).position == 3  # [1, T]: 3

    async def async_client():
        async with AsyncClient(target(byte_server), timeout=30) as c:
            c.stub.CreateSession = as_an_old_server(c.stub.CreateSession)
            with pytest.raises(RuntimeError, match="^prompt: the server created"):
                await c.create_session(prompt=[4, 5])

    asyncio.run(async_client())
    assert len(byte_server.server.store) == before + 4  # the refused ones were closed


def test_a_server_that_drops_the_prompt_beside_a_snapshot_at_its_length_is_an_error(
    byte_server,
):
    """Today's server refuses a prompt with a snapshot; an older one restores the snapshot
    alone. One at the prompt's length comes back where the prompt would have left it: the
    position cannot tell, the snapshot does."""
    with Client(target(byte_server), timeout=30) as c:
        s = c.create_session()
        s.step(tokens=[7, 8])
        snap = s.snapshot()
        s.close()
        before = len(byte_server.server.store)
        c.stub.CreateSession = as_an_old_server(c.stub.CreateSession)
        with pytest.raises(RuntimeError, match="^prompt: the server created the session without"):
            c.create_session(snapshot=snap, prompt=[5, 6])
        assert len(byte_server.server.store) == before  # the refused one was closed
