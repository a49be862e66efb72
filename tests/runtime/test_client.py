"""The Python client (sync and asyncio) and `ssmstream generate`, against a real server."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import cli
from ssmstream.runtime.client import (
    AsyncClient,
    Client,
    channel_credentials,
    check_generate,
    create_request,
    generate_request,
    step_request,
)
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.server import BackgroundServer

ATOL = 2e-4


@pytest.fixture(scope="module")
def server(tiny_token_model):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=0.2
    )
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(tiny_token_model):
    return Engine(tiny_token_model["model_dir"], device="cpu")


def greedy(eng, prompt, n):
    """In-process greedy decoding: the reference for server-side Generate."""
    state = eng.new_state(1)
    for t in prompt:
        y, state = eng.step(np.array([t], dtype=np.int64), state)
    out = []
    for _ in range(n):
        t = int(np.argmax(y[0]))
        out.append(t)
        y, state = eng.step(np.array([t], dtype=np.int64), state)
    return out


def test_async_client_matches_the_sync_client(server, engine):
    V = int(engine.info["vocab_size"])
    x = np.random.default_rng(0).integers(0, V, size=6, dtype=np.int64)
    target = f"127.0.0.1:{server.port}"
    with Client(target, timeout=30) as c:
        s = c.create_session()
        sync_all = s.step(tokens=x, output="all").outputs
        s.close()

    async def run():
        async with AsyncClient(target, timeout=30) as c:
            info = await c.info()
            s = await c.create_session()
            first = await s.step(tokens=x[:2], output="all")
            async with s.open_stream() as st:
                rest = [await st.send(tokens=[t]) for t in x[2:4]]
            snap = await s.snapshot()
            restored = await c.restore(snap)
            fork = await s.fork()
            tail = [await h.step(tokens=x[4:], output="all") for h in (s, restored, fork)]
            gen = [r.token async for r in s.generate([1], max_new_tokens=4, temperature=0.0)]
            positions = [await h.close() for h in (s, restored, fork)]
            return info, first, rest, tail, gen, positions

    info, first, rest, tail, gen, positions = asyncio.run(run())
    assert info.state_size == engine.info["state_size"]
    got = np.concatenate([first.outputs, np.stack([r.outputs[0] for r in rest])])
    np.testing.assert_allclose(got, sync_all[:4], atol=ATOL)
    for t in tail:
        np.testing.assert_allclose(t.outputs, sync_all[4:], atol=ATOL)
    assert gen == greedy(engine, list(x) + [1], 4)
    assert positions == [6 + 4, 6, 6]  # generate fed its prompt and 3 of its 4 tokens


def test_async_stream_regenerate_and_generate_match_the_sync_client(server, engine):
    """AsyncClientSession.stream (an iterable or an async iterable of inputs), .regenerate
    and AsyncClient.generate (a temporary session) give what the sync client's do, and the
    regenerated and generated tokens are in-process greedy decoding's."""
    V = int(engine.info["vocab_size"])
    x = np.random.default_rng(1).integers(0, V, size=6, dtype=np.int64).tolist()
    target = f"127.0.0.1:{server.port}"
    with Client(target, timeout=30) as c:
        s = c.create_session()
        sync_stream = np.concatenate([r.outputs for r in s.stream([[t] for t in x])])
        sync_regen = [g.token for g in s.regenerate(3, [1], max_new_tokens=4, temperature=0.0)]
        s.close()
        sync_temp = [g.token for g in c.generate([2, 3], max_new_tokens=3, temperature=0.0)]

    async def inputs():
        for t in x:
            yield [t]

    async def run():
        async with AsyncClient(target, timeout=30) as c:
            s = await c.create_session()
            streamed = [r async for r in s.stream(inputs())]
            at = s.position
            regen = [g async for g in s.regenerate(3, [1], max_new_tokens=4, temperature=0.0)]
            await s.close()
            temp = [g.token async for g in c.generate([2, 3], max_new_tokens=3, temperature=0.0)]
            s2 = await c.create_session()
            plain = [r.outputs async for r in s2.stream([[t] for t in x[:2]])]
            await s2.close()
            return streamed, at, regen, temp, plain

    streamed, at, regen, temp, plain = asyncio.run(run())
    np.testing.assert_allclose(np.concatenate([r.outputs for r in streamed]), sync_stream)
    assert [r.position for r in streamed] == list(range(1, 7)) and at == 6
    assert [g.token for g in regen] == sync_regen == greedy(engine, x[:3] + [1], 4)
    assert regen[-1].position == 3 + 1 + 3  # rewound to 3, fed the prompt and 3 of 4 tokens
    assert temp == sync_temp == greedy(engine, [2, 3], 3)
    np.testing.assert_allclose(np.concatenate(plain), sync_stream[:2])


def test_stream_handle_creates_a_session_when_it_has_none(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        s = c.session("")
        with s.open_stream() as st:
            r = st.send(tokens=[1, 2])
        assert s.id and r.session_id == s.id and s.position == 2
        assert s.close() == 2


def test_generate_cli_prints_token_ids(server, engine, capsys):
    want = greedy(engine, [1, 2, 3], 5)
    rc = cli.main(
        [
            "generate",
            "--server",
            f"127.0.0.1:{server.port}",
            "--ids",
            "1,2,3",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ]  # fmt: skip
    )
    assert rc == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want


def test_generate_cli_text_or_a_clear_error(server, engine, capsys):
    V = int(engine.info["vocab_size"])
    argv = ["generate", "--server", f"127.0.0.1:{server.port}", "hi", "--temperature", "0"]
    if V < 256:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "--ids" in capsys.readouterr().err
        return
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
    want = bytes(greedy(engine, list(b"hi"), 4)).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == want + "\n"


def test_generate_cli_sends_the_prompts_bytes_also_when_not_utf8(make_toy, tmp_path, capsys):
    """A byte-level model: a prompt argument that is not UTF-8 (on Linux, an undecodable
    byte reaches Python as a surrogate escape) is sent as its bytes, as --ids would send them
    (it had failed to encode, naming no argument)."""
    toy = make_toy(tmp_path / "bytes", "tokens", V=256, d_out=256)
    cfg = ServerConfig(model_dir=str(toy["model_dir"]), port=0, device="cpu", grace=0.2)
    with BackgroundServer(cfg) as srv:
        base = ["generate", "--server", f"127.0.0.1:{srv.port}", "--temperature", "0"]
        base += ["--max-new-tokens", "3", "--ids"]
        assert cli.main([*base[:-1], "a" + os.fsdecode(b"\xff")]) == 0
        text = capsys.readouterr().out
        assert cli.main([*base, "97,255"]) == 0
        ids = [int(t) for t in capsys.readouterr().out.split()]
    assert text == bytes(ids).decode("utf-8", errors="replace") + "\n"


def test_generate_cli_on_a_values_model_says_so(make_toy, tmp_path, capsys):
    toy = make_toy(tmp_path / "values", "values")
    cfg = ServerConfig(model_dir=str(toy["model_dir"]), port=0, device="cpu", grace=0.2)
    with BackgroundServer(cfg) as srv:
        for prompt in (["hi"], ["--ids", "1"]):  # not "pass token ids with --ids"
            with pytest.raises(SystemExit) as e:
                cli.main(["generate", "--server", f"127.0.0.1:{srv.port}", *prompt])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "takes values" in err and "with --ids" not in err


def test_generate_cli_timeout_inf_is_no_limit(server, capsys):
    argv = ["generate", "--server", f"127.0.0.1:{server.port}", "--ids", "1"]
    assert cli.main([*argv, "--max-new-tokens", "2", "--timeout", "inf"]) == 0
    assert len(capsys.readouterr().out.split()) == 2


def test_generate_cli_reports_server_errors(server, capsys):
    rc = cli.main(["generate", "--server", f"127.0.0.1:{server.port}", "--ids", "1",
                   "--session", "no-such-session"])  # fmt: skip
    assert rc == 1
    assert "NOT_FOUND: session 'no-such-session' not found" in capsys.readouterr().err
    # what the model info tells is checked before any call that changes something: exit 2
    V = server.server.engine.vocab_size
    for flags, words in (
        (["--max-new-tokens", "0"], "error: --max-new-tokens: "),
        (["--top-k", str(V + 1)], "error: --top-k: "),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "--server", f"127.0.0.1:{server.port}", "--ids", "1", *flags])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_client_side_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="^output: "):
        step_request("s", tokens=[1], output="everything")
    bad_steps = [
        (dict(tokens=[1.9, 2.5]), "tokens"),  # not truncated to [1, 2]
        (dict(tokens=[True]), "tokens"),
        (dict(tokens=np.array([2**63], np.uint64)), "tokens"),
        (dict(values=["x"]), "values"),
        (dict(values=["1.5"]), "values"),  # a numeric string is not a number either
        (dict(values=[True, False]), "values"),  # as the engine refuses bools
        (dict(tokens=[1], output="top_k", top_k=-2), "top_k"),
    ]
    for kw, field in bad_steps:
        with pytest.raises(ValueError, match=f"^{field}: "):
            step_request("s", **kw)
    bad_generates = [
        ([3.7], {}, "prompt"),
        ([1], dict(stop=[4.2]), "stop"),
        ([1], dict(max_new_tokens=-1), "max_new_tokens"),
        ([1], dict(max_new_tokens=2.0), "max_new_tokens"),
        ([1], dict(top_k=-1), "top_k"),
        ([1], dict(seed=-1), "seed"),
        ([1], dict(temperature="hot"), "temperature"),
        ([1], dict(top_p=None), "top_p"),
        ([2**63], {}, "prompt"),  # would wrap to a negative id in int64
        ([1], dict(stop=np.array([2**64 - 1], np.uint64)), "stop"),
    ]
    for prompt, kw, field in bad_generates:
        with pytest.raises(ValueError, match=f"^{field}: "):
            generate_request("s", prompt, **kw)
    ok = generate_request("s", np.array([1, 2]), seed=2**64 - 1, stop=np.array([3]))
    assert list(ok.prompt) == [1, 2] and ok.seed == 2**64 - 1 and list(ok.stop_tokens) == [3]
    # bytes are byte ids, as a byte-level model reads them
    assert list(generate_request("s", b"h\xe9", stop=bytearray(b"\n")).prompt) == [104, 233]
    assert list(step_request("s", tokens=memoryview(b"ab")).tokens) == [97, 98]
    wide = memoryview(np.array([1, 2, 300], np.int64))  # a buffer of int64 ids, not bytes
    assert list(step_request("s", tokens=wide).tokens) == [1, 2, 300]
    with pytest.raises(ValueError, match="^client_cert/client_key: "):
        channel_credentials(client_cert=b"pem")
    assert channel_credentials() is None
    # the session calls check theirs before sending (port 1: nothing is ever sent)
    with Client("127.0.0.1:1", timeout=5) as c:
        for call, field in (
            (lambda: c.session("s").rewind(-1), "position"),
            (lambda: c.create_session(prompt=[1.5]), "prompt"),
            (lambda: c.create_session(ttl="soon"), "ttl"),
            (lambda: c.restore(b"snap", ttl=[1]), "ttl"),
        ):
            with pytest.raises(ValueError, match=f"^{field}: "):
                call()
    assert list(create_request("s", 2, b"", b"hi").prompt) == [104, 105]
    # None: the server's default TTL (0 on the wire), as SessionService takes it
    assert create_request("s", None).ttl_seconds == create_request("s").ttl_seconds == 0


def test_resumable_error_names_the_errors_a_failover_causes():
    import grpc
    from grpc_helpers import RpcFailure as Err
    from ssmstream.runtime.client import resumable_error

    S = grpc.StatusCode
    assert resumable_error(Err(S.UNAVAILABLE, "server is shutting down"))
    assert resumable_error(Err(S.FAILED_PRECONDITION, "session 'x' is held by replica 'r1'"))
    assert resumable_error(Err(S.INTERNAL, "Stream removed (RST_STREAM (error code 2))"))
    assert resumable_error(Err(S.INTERNAL, "Internal error from Core"))
    assert not resumable_error(Err(S.INTERNAL, "step graph failed for batch 4"))
    assert not resumable_error(Err(S.INVALID_ARGUMENT, "tokens: [0] = 999 is outside [0, 256)"))
    assert not resumable_error(Err(S.NOT_FOUND, "session 'x' not found (closed)"))
    # the client's own timeout, the caller's cancel, an unknown error or a limit say nothing
    # about the session's replica
    for code in (S.DEADLINE_EXCEEDED, S.CANCELLED, S.UNKNOWN, S.RESOURCE_EXHAUSTED):
        assert not resumable_error(Err(code, "Deadline Exceeded")), code
    assert not resumable_error(  # a replica of another model refuses it every time
        Err(S.FAILED_PRECONDITION, "snapshot belongs to another model (sha 'ab'…)")
    )
    # FAILED_PRECONDITION resumes only the server's SessionBusy, never its ModelError
    for busy in (
        "session 'x' is attached to an open Stream",
        "session 'x' changed on another replica while a step of it is in flight here; retry",
    ):
        assert resumable_error(Err(S.FAILED_PRECONDITION, busy))
    for permanent in (
        "Generate needs a token model; this model takes values (use Step)",
        "snapshot has state size 64, this model has 128",
    ):
        assert not resumable_error(Err(S.FAILED_PRECONDITION, permanent))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-new-tokens", "-1"], "error: --max-new-tokens: "),  # said of the flag given
        (["--seed", "-5"], "error: --seed: "),
        (["--top-k", "-1"], "error: --top-k: "),
        (["--top-p", "2"], "error: --top-p: must be in [0, 1]"),
        (["--temperature", "nan"], "error: --temperature: must be finite"),
        (["--stop", "99999999999999999999"], "error: --stop: "),
        (["--tls-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (["--tls-cert", "/etc/hostname"], "--tls-cert/--tls-key: "),
        (["--session", "s", "--rewind-to", "-1"], "--rewind-to: "),
        (["--timeout", "0"], "--timeout: "),  # every call would fail DEADLINE_EXCEEDED
        (["--server", "127.0.0.1:"], "--server: no port"),  # not grpc's default port, 443
        (["--timeout", "nan"], "--timeout: "),
    ],
)
def test_generate_cli_bad_flags_are_usage_errors_before_any_call(flags, words, capsys):
    """Exit 2 with the argument named, not a traceback; no server is needed to find out
    (port 1 refuses connections)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--server", "127.0.0.1:1", "--ids", "1", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err


def test_seed_zero_is_a_seed():
    """seed=0 is sent (a reproducible run); no seed leaves the field unset (random)."""
    req = pb.GenerateRequest.FromString(generate_request("s", [1], seed=0).SerializeToString())
    assert req.HasField("seed") and req.seed == 0
    assert not generate_request("s", [1]).HasField("seed")


def test_check_generate_refuses_what_the_server_would_naming_the_field():
    """The ranges regenerate checks before its rewind, against GetModelInfo (V = 10)."""

    def info(V=10, d_output=10, kind="tokens"):
        limits = pb.Limits(max_tokens_per_request=4, max_new_tokens=64)
        return pb.ModelInfo(input_kind=kind, vocab_size=V, d_output=d_output, limits=limits)

    ok = generate_request("s", [9], max_new_tokens=64, stop=[9], top_k=10)
    assert check_generate(ok, info()) is ok
    bad = [
        (ok, info(kind="values"), "prompt: Generate needs a token model; this model takes values"),
        (
            ok,
            info(d_output=12),
            "prompt: Generate samples token ids from the outputs; "
            "d_output=12 is more than vocab_size=10",
        ),
        (
            generate_request("s", [1] * 5),
            info(),
            "prompt: needs 1 to 4 tokens (the server's --max-tokens-per-request), got 5",
        ),
        (
            generate_request("s", [1], max_new_tokens=65),
            info(),
            "max_new_tokens: must be an integer in [1, 64], got 65",
        ),
        (generate_request("s", [10]), info(), "prompt: token 10 is outside [0, vocab_size=10)"),
        (
            generate_request("s", [1], stop=[10]),
            info(),
            "stop: token 10 is outside [0, vocab_size=10)",
        ),
        (
            generate_request("s", [1], top_k=11),
            info(),
            "top_k: must be in [0, vocab_size=10] (0: off), got 11",
        ),
    ]
    for req, model, message in bad:
        with pytest.raises(ValueError) as e:
            check_generate(req, model)
        assert str(e.value) == message
