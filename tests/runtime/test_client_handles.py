"""The client's own logic against a toy server: each argument check names its argument and
stops at the wire type's bound, handles follow the server's position (sync and asyncio),
timeouts and channel options reach grpc, and `ssmstream generate`'s flags do what they say.

Dimension letters: V vocabulary (11 for the toy), T inputs per request.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_helpers import RpcFailure, make_certs, position_on_server, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import client_flags
from ssmstream.runtime.auth import ANONYMOUS
from ssmstream.runtime.client import (
    AsyncClient,
    Client,
    channel_credentials,
    check_generate,
    choose_session_id,
    create_request,
    generate_request,
    step_request,
)
from ssmstream.runtime.generate import main as generate_main


@pytest.fixture(scope="module")
def toy_server(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64) as s:
        yield s


@pytest.fixture(scope="module")
def values_server(toy_signal_model):
    with serve(toy_signal_model["model_dir"]) as s:
        yield s


def test_counts_stop_at_the_uint32_field_and_name_the_argument():
    assert step_request("s", tokens=[1], output="top_k", top_k=2**32 - 1).top_k == 2**32 - 1
    with pytest.raises(ValueError) as e:
        step_request("s", tokens=[1], output="top_k", top_k=2**32)
    assert (
        str(e.value)
        == "top_k: must be at most 4294967295 (the largest its field holds), got 4294967296"
    )
    with pytest.raises(ValueError) as e:
        generate_request("s", [1], max_new_tokens=2**32)
    assert str(e.value).startswith("max_new_tokens: must be at most 4294967295")
    # below 0: the bound the client knows; the server (check_generate) states the range
    with pytest.raises(ValueError) as e:
        generate_request("s", [1], top_k=-1)
    assert str(e.value) == "top_k: must be an integer >= 0, got -1"


def test_numpy_integers_are_counts():
    req = generate_request("s", [1], max_new_tokens=np.int64(7), top_k=np.int32(3),
                           seed=np.uint64(2**64 - 1))  # fmt: skip
    assert (req.max_new_tokens, req.top_k, req.seed) == (7, 3, 2**64 - 1)
    assert step_request("s", tokens=[1], output="top_k", top_k=np.int64(2)).top_k == 2


def test_numpy_floats_are_numbers():
    req = generate_request("s", [1], temperature=np.float32(0.5), top_p=np.float64(0.25))
    assert (req.temperature, req.top_p) == (0.5, 0.25)
    assert create_request("s", ttl=np.float64(2.5)).ttl_seconds == 2.5


@pytest.mark.parametrize(
    "kw, said",
    [
        ({"top_k": 3}, "top_k: is only used with output='top_k', got output='last'"),
        (
            {"top_k": 3, "output": "all"},
            "top_k: is only used with output='top_k', got output='all'",
        ),
        ({"output": "top_k"}, "top_k: must be >= 1 with output='top_k'"),
    ],
)
def test_top_k_and_output_top_k_go_together_said_in_this_api_s_words(kw, said):
    """The server's rule (top_k with OUTPUT_TOP_K only, and >= 1 there), checked before
    the call in the names a Python caller writes (the server says output=OUTPUT_TOP_K)."""
    with pytest.raises(ValueError) as e:
        step_request("s", tokens=[1], **kw)
    assert str(e.value) == said
    assert step_request("s", tokens=[1], output="top_k", top_k=3).top_k == 3


def test_a_2d_token_array_is_sent_row_major():
    assert list(step_request("s", tokens=np.array([[1, 2], [3, 4]])).tokens) == [1, 2, 3, 4]
    assert list(generate_request("s", [[5], [6]]).prompt) == [5, 6]


def test_values_are_sent_as_float32_row_major():
    v = np.array([[0.1, 1.0001, -3.14159], [1e-5, 65504.5, 7.0]])  # [T=2, I=3]
    req = step_request("s", values=v)
    assert req.values == v.astype(np.float32).reshape(-1).tolist()
    assert list(step_request("s", values=[[1, 2, 3], [4, 5, 6]]).values) == [1, 2, 3, 4, 5, 6]


def test_keep_session_is_sent():
    assert generate_request("s", [1], keep_session=True).keep_session is True
    assert generate_request("s", [1]).keep_session is False


def test_create_request_carries_ttl_and_snapshot():
    req = create_request("s", ttl=12.5, snapshot=b"SNAP", prompt=[1, 2])
    assert (req.session_id, req.ttl_seconds, req.snapshot, list(req.prompt)) == (
        "s",
        12.5,
        b"SNAP",
        [1, 2],
    )


def _info(V=10, max_new=64):
    limits = pb.Limits(max_tokens_per_request=4, max_new_tokens=max_new)
    return pb.ModelInfo(input_kind="tokens", vocab_size=V, d_output=V, limits=limits)


def test_check_generate_bounds_are_inclusive_and_ids_non_negative():
    ok = generate_request("s", [0, 9, 9, 9], max_new_tokens=64, stop=[0])
    assert check_generate(ok, _info()) is ok  # 4 tokens, 64 new: both limits allowed
    for req, msg in (
        (generate_request("s", [-1]), "prompt: token -1 is outside [0, vocab_size=10)"),
        (generate_request("s", [1], stop=[-2]), "stop: token -2 is outside [0, vocab_size=10)"),
    ):
        with pytest.raises(ValueError) as e:
            check_generate(req, _info())
        assert str(e.value) == msg


def test_root_certificates_alone_mean_tls(tmp_path):
    import grpc

    assert channel_credentials() is None
    ca = make_certs(tmp_path).ca.read_bytes()
    assert isinstance(channel_credentials(root_certificates=ca), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="^root_certificates .*holds no certificate"):
        channel_credentials(root_certificates=b"-----BEGIN \n")


def test_a_new_session_id_is_a_uuid4():
    sid = choose_session_id()
    assert uuid.UUID(sid).version == 4 and choose_session_id() != sid
    assert choose_session_id("mine") == "mine"


def test_resumable_error_with_no_details():
    import grpc
    from grpc_helpers import RpcFailure as Err  # details None: a status without a message
    from ssmstream.runtime.client import resumable_error

    S = grpc.StatusCode
    assert resumable_error(Err(S.UNAVAILABLE))
    assert not resumable_error(Err(S.FAILED_PRECONDITION))
    assert not resumable_error(Err(S.INTERNAL))


PROMPT = [1, 2, 3, 4, 5, 6]


def test_sync_handles_follow_the_servers_position(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=PROMPT)
        assert s.position == 6 == position_on_server(toy_server, s.id)
        assert s.rewind(2) == 2 and s.position == 2
        s.step(tokens=[7, 8, 9])
        r = c.restore(s.snapshot())
        f = s.fork()
        assert (r.position, f.position) == (5, 5)
        r.step(tokens=[1])
        fresh = c.session(r.id)
        assert fresh.position == 0 and fresh.close() == 6 and fresh.position == 6
        for h in (s, f):
            h.close()


def test_sync_generate_tells_the_handle_its_session_and_position(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        s = c.session("")
        got = list(s.generate([1, 2], max_new_tokens=3, temperature=0.0, keep_session=True))
        assert s.id == got[0].session_id != ""
        assert s.position == got[-1].position == 2 + 3 - 1 == position_on_server(toy_server, s.id)
        s.close()


def test_async_handles_follow_the_servers_position(toy_server):
    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            fresh = [10, 10, 9, 9, 8, 8]  # a prompt no other test sends
            a = await c.create_session(prompt=fresh)
            b = await c.create_session(prompt=fresh)  # from the prefix cache
            assert (a.position, b.position) == (6, 6)
            assert (a.cached_tokens, b.cached_tokens) == (0, 6)
            await a.step(tokens=[7])
            assert a.position == 7
            other = c.session(a.id)  # a handle that saw nothing: its snapshot tells it
            assert await other.snapshot() and other.position == 7
            r = await c.restore(await a.snapshot())
            assert r.position == 7
            for h in (a, b, r):
                await h.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_sync_cached_tokens(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        a = c.create_session(prompt=[9, 8, 7, 6])
        b = c.create_session(prompt=[9, 8, 7, 6, 5])
        assert (a.cached_tokens, b.cached_tokens) == (0, 4)
        a.close(), b.close()


def test_async_regenerate_refuses_a_negative_position_when_called(toy_server):
    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            s = await c.create_session(prompt=PROMPT)
            with pytest.raises(ValueError) as e:
                s.regenerate(-1, [1])  # not only once iterated
            assert str(e.value) == "position: must be an integer >= 0, got -1"
            assert position_on_server(toy_server, s.id) == 6
            await s.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_the_clients_timeout_bounds_its_unary_calls():
    """A peer that accepts TCP but never speaks HTTP/2: info() fails DEADLINE_EXCEEDED after
    the client's timeout (sync and async), it does not wait for grpc's connect timeout (20 s)
    or forever: bounded at 10 s, a loaded machine's slack over the 0.5 s timeout."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        tgt = f"127.0.0.1:{lsock.getsockname()[1]}"
        result = {}

        def call():
            try:
                with Client(tgt, timeout=0.5) as c:
                    c.info()
            except grpc.RpcError as e:
                result["code"] = e.code()

        t0 = time.monotonic()
        th = threading.Thread(target=call, daemon=True)
        th.start()
        th.join(10)
        assert result.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 10

        async def acall():
            async with AsyncClient(tgt, timeout=0.5) as c:
                with pytest.raises(grpc.RpcError) as e:
                    await asyncio.wait_for(c.info(), 10)
                return e.value.code()

        assert asyncio.run(acall()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_ttl_reaches_the_server_on_create_and_restore(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(ttl=123.5)
        assert toy_server.server.store.get(s.id, ANONYMOUS).ttl == 123.5
        r = c.restore(s.snapshot(), ttl=77.25)
        assert toy_server.server.store.get(r.id, ANONYMOUS).ttl == 77.25
        s.close(), r.close()


def test_async_fork_rewind_close_update_positions(toy_server):
    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            s = await c.create_session()
            await s.step(tokens=[1, 2, 3, 4])
            f = await s.fork()
            assert f.position == 4
            assert await s.rewind(1) == 1 and s.position == 1
            other = c.session(f.id)  # a handle that saw nothing of it
            assert other.position == 0
            assert await other.close() == 4 and other.position == 4
            await s.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_rewind_to_without_session_is_a_usage_error_before_any_call(capsys):
    with pytest.raises(SystemExit) as e:  # port 1: nothing listens
        generate_main(["--server", "127.0.0.1:1", "--ids", "--rewind-to", "3", "1"])
    assert e.value.code == 2 and "--rewind-to needs --session" in capsys.readouterr().err


def test_rewind_to_zero_rewinds_to_the_start(toy_server, capsys):
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=[1, 2, 3])
        argv = ["--server", target(toy_server), "--ids", "--session", s.id, "--rewind-to", "0",
                "--temperature", "0", "--max-new-tokens", "1", "4"]  # fmt: skip
        assert generate_main(argv) == 0
        assert len(capsys.readouterr().out.split()) == 1
        # from position 0: the prompt's 1 token fed, the 1 generated token not fed
        assert s.close() == 1


def test_a_rewind_the_server_refuses_is_said_of_the_flag(toy_server, capsys):
    """The server's `position: …` is this command's --rewind-to; nothing is generated and
    the session stays where it was."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=[1, 2, 3])
        argv = ["--server", target(toy_server), "--ids", "--session", s.id, "--rewind-to", "9",
                "--max-new-tokens", "1", "4"]  # fmt: skip
        assert generate_main(argv) == 1
        out, err = capsys.readouterr()
        assert not out
        assert err == (
            "ssmstream generate: OUT_OF_RANGE: --rewind-to: 9 is ahead of the session (at "
            "position 3)\n"
        )
        assert s.close() == 3


class _FakeSession:
    def __init__(self, tokens):
        self.id, self.position, self.tokens = "fake", 0, tokens

    def generate(self, prompt, **kw):
        for i, t in enumerate(self.tokens):
            self.position = len(prompt) + i
            yield pb.GenerateResponse(token=t, position=self.position)


def _fake_client(monkeypatch, vocab, tokens):
    class FakeClient:
        def __init__(self, target, token=None, **kw):
            FakeClient.token = token

        def info(self):
            limits = pb.Limits(max_tokens_per_request=64, max_new_tokens=64)
            return pb.ModelInfo(
                input_kind="tokens", vocab_size=vocab, d_output=vocab, limits=limits
            )

        def session(self, session_id):
            return _FakeSession(tokens)

        def close(self):
            pass

    monkeypatch.setattr(client_flags, "Client", FakeClient)
    return FakeClient


@pytest.mark.parametrize(
    "vocab, tokens, text",
    [
        (256, [0x68, 0xC3], "h\ufffd\n"),  # a truncated UTF-8 sequence at the end
        (256, [0xFF, 0x69], "\ufffdi\n"),  # an invalid byte is shown, not dropped
        (256, [0xC3, 0xA9], "\u00e9\n"),  # a 2-byte character split over two tokens
        (300, [0x61, 256 + 0x2C, 0x62], "ab\n"),  # ids >= 256 are not bytes
    ],
)
def test_generated_bytes_are_decoded_as_utf8(monkeypatch, capsys, vocab, tokens, text):
    _fake_client(monkeypatch, vocab, tokens)
    assert generate_main(["--server", "x:1", "--max-new-tokens", str(len(tokens)), "hi"]) == 0
    assert capsys.readouterr().out == text


def test_the_token_comes_from_the_token_env_variable(monkeypatch):
    fake = _fake_client(monkeypatch, 256, [0x61])
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    assert (
        generate_main(["--server", "x:1", "--max-new-tokens", "1", "--token-env", "MY_TOKEN", "hi"])
        == 0
    )
    assert fake.token == "s3cret"
    monkeypatch.setenv("SSMSTREAM_TOKEN", "")
    assert generate_main(["--server", "x:1", "--max-new-tokens", "1", "hi"]) == 0
    assert fake.token is None  # an empty variable is no token
    monkeypatch.setenv("SSMSTREAM_TOKEN", " s3cret\n")  # blanks around it, as the server reads
    assert generate_main(["--server", "x:1", "--max-new-tokens", "1", "hi"]) == 0
    assert fake.token == "s3cret"


def test_no_token_is_a_missing_token_not_an_invalid_one(
    toy_token_model, tmp_path, monkeypatch, capsys
):
    """Against a server with --auth-tokens, a client given no token (None or "") sends no
    authorization header: the server says the token is missing (not that "None" is invalid).
    `ssmstream generate` refused for its token says where it takes one from."""
    f = tmp_path / "tokens"
    f.write_text("tok-0123456789abcdef alice\n")
    with serve(toy_token_model["model_dir"], auth_tokens=str(f)) as srv:
        for token in (None, ""):
            with Client(target(srv), token=token, timeout=10) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.info()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details().startswith("missing bearer token: ")
            assert "Client(token=...)" in e.value.details()  # how this client sends one
        with Client(target(srv), token="tok-0123456789abcdef", timeout=10) as c:
            assert c.info().input_kind == "tokens"
        argv = ["--server", target(srv), "--ids", "1", "--max-new-tokens", "1"]
        for value, said in (("", "is empty"), ("tok-wrong", "is set")):
            monkeypatch.setenv("SSMSTREAM_TOKEN", value)
            assert generate_main(argv) == 1
            assert capsys.readouterr().err.splitlines()[1:] == [
                "ssmstream generate: the bearer token is read from $SSMSTREAM_TOKEN "
                f"(--token-env names another variable), which {said}"
            ]
        monkeypatch.setenv("SSMSTREAM_TOKEN", "tok-0123456789abcdef")
        assert generate_main(argv) == 0


SMALL = [("grpc.max_receive_message_length", 100)]  # bytes; a [10, 5] float32 answer is ~240


def test_a_callers_receive_limit_applies_in_the_sync_client(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
    with Client(target(toy_server), timeout=10, options=SMALL) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.session(s.id).step(tokens=[1] * 10, output="all")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_callers_receive_limit_applies_in_the_async_client(toy_server):
    async def run():
        async with AsyncClient(target(toy_server), timeout=10, options=SMALL) as c:
            s = await c.create_session()
            with pytest.raises(grpc.RpcError) as e:
                await s.step(tokens=[1] * 10, output="all")
            return e.value.code()

    assert asyncio.run(asyncio.wait_for(run(), 20)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_memoryview_of_chars_is_byte_ids():
    """A memoryview in format 'c' (a char buffer) holds bytes: ids 0..255, as bytes do."""
    chars = memoryview(b"h\xe9").cast("c")
    assert list(step_request("s", tokens=chars).tokens) == [104, 233]
    assert list(generate_request("s", chars).prompt) == [104, 233]


def test_a_bool_is_neither_a_count_nor_a_number():
    """True is not 1 here: a flag passed in the wrong place is refused, naming it."""
    for call, name in (
        (lambda: generate_request("s", [1], max_new_tokens=True), "max_new_tokens"),
        (lambda: generate_request("s", [1], top_k=False), "top_k"),
        (lambda: generate_request("s", [1], seed=True), "seed"),
        (lambda: step_request("s", tokens=[1], output="top_k", top_k=True), "top_k"),
        (lambda: generate_request("s", [1], temperature=True), "temperature"),
        (lambda: generate_request("s", [1], top_p=False), "top_p"),
        (lambda: create_request("s", ttl=True), "ttl"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: must be"):
            call()


def test_check_generate_takes_as_many_stop_tokens_as_the_vocabulary():
    """The server allows up to vocab_size stop tokens (repeats counted): V pass, V + 1 not."""
    V = 10
    ok = generate_request("s", [1], stop=list(range(V)))
    assert check_generate(ok, _info(V)) is ok
    with pytest.raises(ValueError) as e:
        check_generate(generate_request("s", [1], stop=[*range(V), 0]), _info(V))
    assert str(e.value) == "stop: has more than vocab_size=10 tokens"


def test_check_generate_takes_a_request_of_exactly_the_servers_message_limit():
    """grpc refuses a message larger than max_message_bytes, not one of that size."""
    req = generate_request("s", [1, 2, 3], max_new_tokens=5, seed=7)
    info = _info()
    info.limits.max_message_bytes = req.ByteSize()
    assert check_generate(req, info) is req
    info.limits.max_message_bytes = req.ByteSize() - 1
    with pytest.raises(ValueError, match="^prompt: the request is"):
        check_generate(req, info)


def test_a_fork_of_a_handle_that_saw_nothing_has_the_servers_position(toy_server):
    """The fork's position is the one the server reports, not the parent handle's."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=PROMPT)
        stale = c.session(s.id)  # position 0 on this handle; 6 on the server
        f = stale.fork()
        assert f.position == 6 == position_on_server(toy_server, f.id)
        f.close(), s.close()


def test_ttl_reaches_the_server_on_async_restore(toy_server):
    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            s = await c.create_session(ttl=123.5)
            r = await c.restore(await s.snapshot(), ttl=77.25)
            ttls = [toy_server.server.store.get(h.id, ANONYMOUS).ttl for h in (s, r)]
            await s.close(), await r.close()
            return ttls

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [123.5, 77.25]


def test_outputs_are_none_unless_the_step_asked_for_them(toy_server):
    """output="none" and "top_k" return no output rows: `outputs` is None (not an empty
    array), as for a StepResponse without rows."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
        assert s.step(tokens=[1, 2], output="none").outputs is None
        r = s.step(tokens=[3], output="top_k", top_k=2)
        assert r.outputs is None and r.top_tokens.shape == (2,) and r.position == 3
        assert s.step(tokens=[4], output="last").outputs.shape == (1, 5)  # d_output 5
        s.close()


class _InterruptedSession(_FakeSession):
    def __init__(self, tokens):
        super().__init__(tokens)
        self.rewound = []  # (position, timeout) of each rewind

    def generate(self, prompt, **kw):
        yield from super().generate(prompt, **kw)
        raise KeyboardInterrupt

    def rewind(self, position, timeout=None):
        self.rewound.append((position, timeout))
        return position


class _DrainedSession(_FakeSession):
    def generate(self, prompt, **kw):
        yield from super().generate(prompt, **kw)
        raise _unavailable()

    def rewind(self, position, timeout=None):
        raise _unavailable()


def _unavailable() -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE, "server is shutting down; resume after the restart"
    )


def test_a_generation_cut_by_a_drain_names_the_kept_session(monkeypatch, capsys):
    """The server drained (SIGTERM) mid-generation and saved the session: exit 1 with the
    status, and the kept session's id, which the restarted server resumes (it had not been
    printed: the session stayed unknown to its user until its TTL)."""
    fake = _fake_client(monkeypatch, 256, [0x61, 0x62])
    fake.session = lambda self, session_id: _DrainedSession([0x61, 0x62])
    argv = ["--server", "x:1", "--max-new-tokens", "2", "--keep-session", "hi"]
    assert generate_main(argv) == 1
    said = capsys.readouterr()
    # the server may have fed tokens sampled after the last one printed; the rewind that
    # drops them cannot reach a draining server, so the command that does it is printed
    assert said.err == (
        "ssmstream generate: UNAVAILABLE: server is shutting down; resume after the restart\n"
        "ssmstream generate: the session may hold tokens sampled after the last one received "
        "(UNAVAILABLE: server is shutting down; resume after the restart); to drop them: "
        "--session fake --rewind-to 3\n"
        "session: fake (position 3)\n"
    )


def test_a_session_cut_before_any_token_arrived_is_not_told_to_rewind(monkeypatch, capsys):
    """Nothing received, nothing to drop: "--rewind-to 0" would throw away what the
    --session held before this command."""
    fake = _fake_client(monkeypatch, 256, [])
    fake.session = lambda self, session_id: _DrainedSession([])
    argv = ["--server", "x:1", "--max-new-tokens", "2", "--session", "theirs", "hi"]
    assert generate_main(argv) == 1
    assert capsys.readouterr().err == (
        "ssmstream generate: UNAVAILABLE: server is shutting down; resume after the restart\n"
    )


def test_a_generate_started_with_sigterm_ignored_leaves_it_ignored(monkeypatch, capsys):
    """As under nohup or `trap '' TERM`: the command's own SIGTERM handler (stop as Ctrl-C
    does) is for a SIGTERM that would otherwise kill it, not one its parent chose to ignore."""
    seen = []

    class Watching(_FakeSession):
        def generate(self, prompt, **kw):
            seen.append(signal.getsignal(signal.SIGTERM))
            yield from super().generate(prompt, **kw)

    fake = _fake_client(monkeypatch, 256, [0x61])
    fake.session = lambda self, session_id: Watching([0x61])
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert generate_main(["--server", "x:1", "--max-new-tokens", "1", "hi"]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen == [signal.SIG_IGN] and capsys.readouterr().out == "a\n"


def test_ctrl_c_exits_130_naming_the_kept_session(monkeypatch, capsys):
    """Ctrl-C during the generation: exit status 128 + SIGINT, one line as every command
    says it (on a line of its own after the tokens), the kept session named."""
    fake = _fake_client(monkeypatch, 256, [0x61, 0x62])
    held = _InterruptedSession([0x61, 0x62])
    fake.session = lambda self, session_id: held
    argv = ["--server", "x:1", "--max-new-tokens", "2", "--keep-session", "hi"]
    assert generate_main(argv) == 130
    said = capsys.readouterr()
    assert said.out == "ab"
    assert said.err == "\nssmstream generate: interrupted\nsession: fake (position 3)\n"
    # rewound to the last token received, which is not fed; within a deadline of its own
    ((position, timeout),) = held.rewound
    assert position == 3 and 0 < timeout <= 2.0


def test_ctrl_c_does_not_rewind_a_session_given_by_id(monkeypatch, capsys):
    """Other clients may use a --session: a cut generation says how to rewind it, and does
    not, where a new --keep-session one (its id known only to this command) is rewound."""
    fake = _fake_client(monkeypatch, 256, [0x61, 0x62])
    held = _InterruptedSession([0x61, 0x62])
    fake.session = lambda self, session_id: held
    argv = ["--server", "x:1", "--max-new-tokens", "2", "--session", "theirs", "hi"]
    assert generate_main(argv) == 130
    assert held.rewound == []
    assert capsys.readouterr().err == (
        "\nssmstream generate: interrupted\nssmstream generate: the session may hold tokens "
        "sampled after the last one received; to drop them: --session fake --rewind-to 3\n"
    )


def test_a_second_ctrl_c_during_the_rewind_says_how_to_do_it(monkeypatch, capsys):
    class Twice(_InterruptedSession):
        def rewind(self, position, timeout=None):
            raise KeyboardInterrupt

    fake = _fake_client(monkeypatch, 256, [0x61, 0x62])
    fake.session = lambda self, session_id: Twice([0x61, 0x62])
    argv = ["--server", "x:1", "--max-new-tokens", "2", "--keep-session", "hi"]
    assert generate_main(argv) == 130
    assert capsys.readouterr().err.endswith(
        "last one received (interrupted); to drop them: --session fake --rewind-to 3\n"
        "session: fake (position 3)\n"
    )


def test_a_send_interrupted_while_it_waits_ends_the_stream_instead_of_answering_late(toy_server):
    """Ctrl-C while a sync stream's send waits for its response: that response was still
    due, and the next send returned it (every later one a response behind, positions stale,
    no error). The interrupted send ends the stream: the next send raises CANCELLED, as the
    async handle's does, and the session holds what the server applied."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
        with s.open_stream() as st:
            st.send(tokens=[1, 2])

            class Interrupted:  # the wait for the response is interrupted once
                def __init__(self, call):
                    self.call, self.first = call, True

                def __next__(self):
                    if self.first:
                        self.first = False
                        raise KeyboardInterrupt
                    return next(self.call)

                def cancel(self):
                    return self.call.cancel()

            st._call = Interrupted(st._call)
            with pytest.raises(KeyboardInterrupt):
                st.send(tokens=[3, 4, 5])
            with pytest.raises(grpc.RpcError) as e:
                st.send(tokens=[6])
            assert (e.value.code(), e.value.details()) == (
                grpc.StatusCode.CANCELLED,
                "this stream was cancelled by an earlier send's interruption",
            )
        deadline = time.monotonic() + 10
        while toy_server.server.service.attached and time.monotonic() < deadline:
            time.sleep(0.01)  # the server lets go of the ended stream
        assert s.step(tokens=[7]).position in (3, 6)  # the interrupted request: applied or not
        s.close()


def test_a_stream_interrupted_while_it_waits_cancels_its_call(toy_server):
    """Ctrl-C while a sync stream() waits for a response cancels the call, as generate's
    does: while anything held the call (the interrupt's traceback does, as the REPL's last
    one), grpc went on sending the caller's inputs, the session kept advancing and stayed
    attached to the Stream."""

    class Interrupted:  # the wait for the second response is interrupted
        def __init__(self, call):
            self.call, self.waits = call, 0

        def __iter__(self):
            return self

        def __next__(self):
            self.waits += 1
            if self.waits == 2:
                raise KeyboardInterrupt
            return next(self.call)

        def cancel(self):
            return self.call.cancel()

    def inputs():
        while True:
            yield [1]

    with Client(target(toy_server), timeout=10) as c:
        calls, real = [], c.stub.Stream
        c.stub.Stream = lambda *a, **kw: calls.append(Interrupted(real(*a, **kw))) or calls[-1]
        s = c.create_session()
        with pytest.raises(KeyboardInterrupt):
            for _ in s.stream(inputs()):
                pass
        assert calls[0].call.cancelled()
        deadline = time.monotonic() + 10
        while toy_server.server.service.attached and time.monotonic() < deadline:
            time.sleep(0.01)  # the server lets go of the ended stream
        at = position_on_server(toy_server, s.id)
        time.sleep(0.05)
        assert s.step(tokens=[2]).position == at + 1  # no input arrived after the cancel
        s.close()


@pytest.mark.parametrize(
    "sync, aio",
    [("Client", "AsyncClient"), ("ClientSession", "AsyncClientSession"),
     ("StreamHandle", "AsyncStreamHandle")],
)  # fmt: skip
def test_the_async_client_has_every_method_of_the_sync_one_with_its_parameters(sync, aio):
    # "same methods as Client, awaited": AsyncClientSession.rewind had lacked timeout=
    import inspect

    from ssmstream.runtime import client

    sync, aio = getattr(client, sync), getattr(client, aio)
    for name, f in inspect.getmembers(sync, inspect.isfunction):
        if not name.startswith("_"):
            assert hasattr(aio, name), f"{aio.__name__}.{name} is missing"
            params = [list(inspect.signature(g).parameters) for g in (f, getattr(aio, name))]
            assert params[0] == params[1], f"{aio.__name__}.{name}: {params[1]} != {params[0]}"
