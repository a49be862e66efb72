"""Client paths the other client tests leave open: the int64 bound of token ids, top_p 0
(the proto's "off") in regenerate's checks, handles that learn their position and id from a
StreamHandle or an async Generate, async regenerate's checks before its rewind, and
`ssmstream generate`'s --stop, --seed, --keep-session and id-256 output — each against a
toy server's own answers or values written down independently."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from grpc_helpers import position_on_server, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import client_flags
from ssmstream.runtime.client import (
    AsyncClient,
    Client,
    check_generate,
    generate_request,
    step_request,
)
from ssmstream.runtime.generate import main as generate_main

PROMPT = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def toy_server(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64) as s:
        yield s


def test_the_largest_int64_token_id_is_sent_and_one_more_is_refused():
    """2**63 - 1 fits the wire's int64 (the server then judges it against the vocabulary);
    2**63 does not."""
    top = 2**63 - 1
    assert list(generate_request("s", [top]).prompt) == [top]
    import numpy as np

    assert list(step_request("s", tokens=np.array([top], np.uint64)).tokens) == [top]
    with pytest.raises(ValueError, match="^prompt: must fit in int64"):
        generate_request("s", np.array([top + 1], np.uint64))


def test_check_generate_takes_top_p_zero_as_off():
    """top_p 0 is the proto's default, which the server reads as 1 (off): regenerate's
    checks accept it, as the server would."""
    limits = pb.Limits(max_tokens_per_request=4, max_new_tokens=64)
    info = pb.ModelInfo(input_kind="tokens", vocab_size=10, d_output=10, limits=limits)
    req = generate_request("s", [1], top_p=0.0)
    assert req.top_p == 0.0 and check_generate(req, info) is req


def test_a_handle_made_with_a_position_starts_there():
    """Client.session(id, position) makes no call (port 1: nothing listens)."""
    with Client("127.0.0.1:1", timeout=5) as c:
        h = c.session("abc", 7)
        assert (h.id, h.position) == ("abc", 7)


def test_a_stream_handle_moves_its_sessions_position(toy_server):
    """Each send's response position is the handle's session's, as the server holds it."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
        seen = []
        with s.open_stream() as st:
            for tokens in ([1], [2, 3], [4]):
                st.send(tokens=tokens)
                seen.append(s.position)
        assert seen == [1, 3, 4] == [1, 1 + 2, 1 + 2 + 1]
        assert position_on_server(toy_server, s.id) == 4
        s.close()


def test_an_async_generate_tells_a_handle_without_id_its_new_session(toy_server):
    """As the sync client: the kept session's id and position reach the handle."""

    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            h = c.session("")
            got = [
                r async for r in h.generate([1, 2], max_new_tokens=3, temperature=0.0,
                                            keep_session=True)
            ]  # fmt: skip
            on_server = position_on_server(toy_server, h.id) if h.id else None
            if h.id:
                await h.close()
            return h.id, h.position, got, on_server

    sid, position, got, on_server = asyncio.run(asyncio.wait_for(run(), 30))
    assert sid and sid == got[0].session_id
    assert position == got[-1].position == 2 + 3 - 1 == on_server


def test_async_regenerate_refused_by_the_models_ranges_does_not_rewind(toy_server):
    """The range checks (against GetModelInfo) come before the rewind: a refused
    regenerate leaves the session where it was, as the sync client's does."""

    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            s = await c.create_session(prompt=PROMPT)
            for bad in (dict(temperature=-1.0), dict(top_k=99), dict(max_new_tokens=0)):
                with pytest.raises(ValueError):
                    [r async for r in s.regenerate(3, [1], **bad)]
            where = position_on_server(toy_server, s.id)
            await s.close()
            return where

    assert asyncio.run(asyncio.wait_for(run(), 30)) == len(PROMPT)


def _cli(toy_server, *flags):
    return ["--server", target(toy_server), "--ids", *flags]


def test_generate_cli_stops_after_a_stop_token(toy_server, toy_tok, capsys):
    """--stop ends the generation after that token (the same as Engine.generate's greedy
    tokens up to and including the first stop token)."""
    want = list(toy_tok.generate([1, 2, 3], max_new_tokens=8, temperature=0.0))
    stop = want[2]
    cut = want[: want.index(stop) + 1]
    argv = _cli(toy_server, "--temperature", "0", "--max-new-tokens", "8", "--stop", str(stop))
    assert generate_main([*argv, "1,2,3"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == cut


def test_generate_cli_seed_is_the_clients_seeded_generation(toy_server, capsys):
    """--seed N samples what Client.generate(seed=N) samples (temperature 1)."""
    with Client(target(toy_server), timeout=10) as c:
        want = [
            [g.token for g in c.generate([1, 2, 3], max_new_tokens=12, temperature=1.0, seed=s)]
            for s in (5, 6)
        ]
    assert want[0] != want[1]  # the seed matters for these 12 tokens
    argv = _cli(toy_server, "--temperature", "1", "--max-new-tokens", "12", "--seed", "5")
    assert generate_main([*argv, "1,2,3"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want[0]


def test_generate_cli_prints_a_kept_sessions_id_only_for_a_new_session(toy_server, capsys):
    """--keep-session without --session names the new session and its position on stderr;
    with --session (the caller knows its id) nothing is printed there."""
    argv = _cli(toy_server, "--temperature", "0", "--max-new-tokens", "3", "--keep-session")
    assert generate_main([*argv, "1,2"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("session: ") and err.endswith("(position 4)")  # 2 + 3 - 1
    sid = err.split()[1]
    assert position_on_server(toy_server, sid) == 4
    assert generate_main([*argv, "--session", sid, "5"]) == 0
    assert capsys.readouterr().err == ""
    assert position_on_server(toy_server, sid) == 4 + 1 + 3 - 1
    with Client(target(toy_server), timeout=10) as c:
        c.session(sid).close()


def test_generate_cli_shows_only_ids_below_256_as_bytes(monkeypatch, capsys):
    """A model with more than 256 ids: id 256 is not a byte and prints nothing (id 255 is
    the byte 0xff, id 97 is "a")."""

    class FakeSession:
        id, position = "fake", 0

        def generate(self, prompt, **kw):
            for t in (97, 256, 98):
                yield pb.GenerateResponse(token=t)

    class FakeClient:
        def __init__(self, *a, **kw):
            pass

        def info(self):
            limits = pb.Limits(max_tokens_per_request=64, max_new_tokens=64)
            return pb.ModelInfo(input_kind="tokens", vocab_size=300, d_output=300, limits=limits)

        def session(self, session_id):
            return FakeSession()

        def close(self):
            pass

    monkeypatch.setattr(client_flags, "Client", FakeClient)
    assert generate_main(["--server", "x:1", "--max-new-tokens", "3", "hi"]) == 0
    assert capsys.readouterr().out == "ab\n"


def test_regenerate_with_more_stop_tokens_than_the_vocabulary_does_not_rewind(toy_server, capsys):
    """The server takes at most vocab_size stop tokens, repeats counted: the client checks it
    before the rewind (regenerate and `ssmstream generate --rewind-to`), so nothing changes."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=PROMPT)
        with pytest.raises(ValueError, match=r"^stop: has more than vocab_size=11 tokens$"):
            list(s.regenerate(3, [1], max_new_tokens=2, stop=[1] * 12))
        argv = _cli(toy_server, "--session", s.id, "--rewind-to", "3", "--stop", "1," * 11 + "1")
        with pytest.raises(SystemExit) as e:
            generate_main([*argv, "--max-new-tokens", "2", "1"])
        assert e.value.code == 2
        assert "error: --stop: has more than vocab_size=11 tokens" in capsys.readouterr().err
        assert position_on_server(toy_server, s.id) == len(PROMPT)
        assert [t.token for t in s.generate([1], max_new_tokens=1, stop=[1] * 11)]  # 11: taken
        s.close()


def test_generate_into_a_closed_pipe_stops_quietly(toy_server):
    """`ssmstream generate … | head -n 2`: no traceback when the reader goes away; the exit
    status is a closed pipe's (141), and its temporary session is closed on the server."""
    srv = toy_server.server
    before = len(srv.store)
    cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "generate", *_cli(toy_server),
           "--max-new-tokens", "4000", "--temperature", "0", "1"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.readline()) > 0 and len(p.stdout.readline()) > 0
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err.decode()) == (141, "")
    deadline = time.monotonic() + 10
    while len(srv.store) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(srv.store) == before


def test_generate_cli_ignores_blank_items_in_id_lists(toy_server, capsys):
    """A trailing comma or a blank item in --ids' prompt or --stop is skipped, as an empty
    one is: "1,2, " is the prompt [1, 2] and --stop " " no stop token."""
    with Client(target(toy_server), timeout=10) as c:
        want = [g.token for g in c.generate([1, 2], max_new_tokens=4, temperature=0.0)]
    argv = _cli(toy_server, "--temperature", "0", "--max-new-tokens", "4", "--stop", " , ")
    assert generate_main([*argv, "1,2, "]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want


def test_closing_an_async_regenerate_early_cancels_its_generate_at_once(toy_server):
    """aclose() of a regenerate cancels its Generate call before it returns, as a generate's
    does (the call stayed open until the garbage collector closed the generation inside)."""

    async def run():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            calls, real = [], c.stub.Generate
            c.stub.Generate = lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1]
            s, t = [await c.create_session(prompt=PROMPT) for _ in range(2)]
            ended = []
            for g in (s.generate([1], max_new_tokens=50), t.regenerate(3, [1], max_new_tokens=50)):
                async for _ in g:
                    break
                await g.aclose()
                ended.append(calls[-1].cancelled())
            return ended

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [True, True]


@pytest.mark.parametrize("n", ["0", "-1"])
def test_a_max_new_tokens_below_one_is_refused_before_any_call(n, monkeypatch, capsys):
    """No server takes 0 tokens: `--max-new-tokens 0` was sent, so with the server down it
    said UNAVAILABLE, not the flag; and -1 was refused as "must be an integer >= 0"."""
    monkeypatch.setattr(client_flags, "Client", lambda *a, **k: pytest.fail("called"))
    with pytest.raises(SystemExit) as e:
        generate_main(["--server", "127.0.0.1:1", "--max-new-tokens", n, "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-1] == f"ssmstream generate: error: --max-new-tokens: must be an integer >= 1, got {n}"
    )
