"""The prefix cache and rewind over gRPC, the Python client and `ssmstream generate`, checked
against the toy model's float64 recurrence (`Ref`)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import grpc
import pytest
from rel_helpers import Ref, assert_matches, code_of, serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.generate import main as generate_main

C = grpc.StatusCode


@pytest.fixture(scope="module")
def srv(toy):
    with serve(toy, rewind_window=12, prefix_cache_mb=1.0, max_tokens_per_request=64) as s:
        yield s


@pytest.fixture()
def client(srv):
    with Client(target(srv), timeout=30) as c:
        yield c


def test_limits_say_what_the_server_keeps(client, toy):
    lim = client.info().limits
    assert lim.rewind_window == 12 and lim.prefix_cache_bytes == 2**20
    assert lim.prefix_cache_scope == "principal"
    # at most 2 · 12 / 4 + 3 checkpoints of S float32 and 12 + 4 int64 inputs kept, with up
    # to 2 · 4 rows spare in their array
    assert lim.checkpoint_bytes_per_session == (2 * 12 // 4 + 3) * 4 * toy["S"] + (12 + 12) * 8


def test_create_with_a_prompt_starts_from_the_cache(client, toy):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    first = client.create_session(prompt=prompt)
    second = client.create_session(prompt=prompt)
    partly = client.create_session(prompt=[*prompt[:8], 7, 7, 7])
    assert (first.cached_tokens, second.cached_tokens, partly.cached_tokens) == (0, 10, 8)
    for s, p in ((first, prompt), (second, prompt), (partly, [*prompt[:8], 7, 7, 7])):
        ref = Ref(toy)
        ref.feed(p)
        assert_matches(s, ref)
    code, msg = code_of(lambda: client.create_session(prompt=[11]))
    assert code == C.INVALID_ARGUMENT and msg.startswith("prompt: ")


def test_rewind_and_regenerate(srv, client, toy):
    s = client.create_session()
    ref = Ref(toy)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    for t in tokens:
        s.step(tokens=[t])
    assert s.rewind(4) == 4
    ref.feed(tokens[:4])
    assert_matches(s, ref)
    greedy = [g.token for g in s.regenerate(4, [5], max_new_tokens=3, temperature=0.0)]
    assert greedy == ref.greedy([5], 3)
    code, msg = code_of(lambda: s.rewind(100))
    assert code == C.OUT_OF_RANGE and msg.startswith("position: ") and "ahead" in msg
    for _ in range(20):
        s.step(tokens=[1])
    code, msg = code_of(lambda: s.rewind(1))
    assert code == C.OUT_OF_RANGE and "rewind window" in msg
    with s.open_stream() as st:
        st.send(tokens=[2])
        code, _ = code_of(lambda: s.rewind(s.position - 1))
        assert code == C.FAILED_PRECONDITION


def test_generate_cli_rewinds_a_session(srv, client, toy):
    s = client.create_session()
    s.step(tokens=[1, 2, 3, 4, 5, 6])
    out = io.StringIO()
    with redirect_stdout(out):
        rc = generate_main(
            [
                "--server", target(srv), "--ids", "--session", s.id, "--rewind-to", "3",
                "--temperature", "0", "--max-new-tokens", "2", "4",
            ]
        )  # fmt: skip
    ref = Ref(toy)
    ref.feed([1, 2, 3])
    assert rc == 0 and [int(t) for t in out.getvalue().split()] == ref.greedy([4], 2)
    assert s.rewind(3) == 3


def test_generate_cli_keeps_its_session_for_a_later_rewind(srv, toy, capsys):
    """--keep-session prints the new session's id and position; --session ID --rewind-to
    then regenerates from inside that generation."""
    argv = ["--server", target(srv), "--ids", "--temperature", "0"]
    assert generate_main([*argv, "--max-new-tokens", "3", "--keep-session", "1,2,3,4"]) == 0
    out = capsys.readouterr()
    first = [int(t) for t in out.out.split()]
    sid, position = re.fullmatch(r"session: (\S+) \(position (\d+)\)\n", out.err).groups()
    assert int(position) == 4 + 3 - 1  # the last token is not fed
    again = [*argv, "--session", sid, "--rewind-to", "5", "--max-new-tokens", "2"]
    assert generate_main([*again, str(first[1])]) == 0  # the same second token, fed again
    ref = Ref(toy)
    ref.feed([1, 2, 3, 4, first[0]])
    assert [int(t) for t in capsys.readouterr().out.split()] == ref.greedy([first[1]], 2)
    for refused in (["--temperature", "-1"], ["--max-new-tokens", "0"], ["--top-k", "999"]):
        with pytest.raises(SystemExit):  # a usage error before the rewind: nothing changes
            generate_main([*again, *refused, "1"])
    with Client(target(srv)) as c:
        assert c.session(sid).close() == 5 + 1 + 1


def test_rewind_history_starts_again_after_a_restart(toy, tmp_path):
    """A restart keeps the session, not its history: rewinds reach back to the position it
    was loaded at, not before (they had found no history at all)."""
    state_dir = str(tmp_path / "state")
    tokens = [1, 2, 3, 4, 5]
    with serve(toy, state_dir=state_dir, rewind_window=12) as a, Client(target(a)) as c:
        s = c.create_session()
        s.step(tokens=tokens[:3])
        sid = s.id
    with serve(toy, state_dir=state_dir, rewind_window=12) as b, Client(target(b)) as c:
        s = c.session(sid, position=3)
        assert s.step(tokens=tokens[3:]).position == 5
        assert s.rewind(4) == 4
        ref = Ref(toy)
        ref.feed(tokens[:4])
        assert_matches(s, ref)
        assert s.rewind(3) == 3
        code, msg = code_of(lambda: s.rewind(2))  # before the restart: not kept
        assert code == C.OUT_OF_RANGE and msg.startswith("position: ")


def test_a_rewind_does_not_widen_the_window_again(client, toy):
    """The window counts back from the furthest position the session reached: after 30
    inputs and a rewind to 24, position 14 (10 back from 24) had already left it. Refused
    naming the window, nothing changes; 18 = 30 − 12 is still there."""
    tokens = [(7 * i + 3) % toy["V"] for i in range(30)]
    s = client.create_session()
    s.step(tokens=tokens)
    assert s.rewind(24) == 24
    code, details = code_of(lambda: s.rewind(14))
    assert code == C.OUT_OF_RANGE
    assert re.fullmatch(
        r"position: 14 is outside the rewind window \[1[6-8], 24\] \(at most 12 inputs back "
        r"from the furthest position the session reached, and not before its first checkpoint\)",
        details,
    )
    ref = Ref(toy)
    ref.feed(tokens[:24])
    assert_matches(s, ref)  # unchanged
    assert s.rewind(18) == 18
    ref = Ref(toy)
    ref.feed(tokens[:18])
    assert_matches(s, ref)


def test_a_rewind_queued_behind_steps_is_checked_at_its_turn(toy):
    """A rewind runs in the session's request order, like a step: a position the steps queued
    before it reach is not "ahead of the session", and one they do not reach is refused when
    its turn comes, naming the position the session is at then."""
    from rel_helpers import wait_until
    from ssmstream.protos import inference_pb2 as pb

    tokens = list(range(1, 11))
    with (
        serve(toy, rewind_window=64, max_batch_delay=2.0) as srv,
        Client(target(srv), timeout=30) as c,
    ):
        other, s = c.create_session(), c.create_session()
        s.step(tokens=tokens)
        other.step(tokens=[1])  # two active sessions: a lone step waits for its batch

        def queued(token, behind=0):  # a Step, once it waits (behind `behind` others)
            f = c.stub.Step.future(pb.StepRequest(session_id=s.id, tokens=[token]))
            wait_until(lambda: srv.server.batcher.pending() > behind, what="a queued step")
            return [f]

        fs = queued(3)
        fs += queued(4, behind=1)  # in this order
        assert c.stub.RewindSession(pb.RewindRequest(session_id=s.id, position=11)).position == 11
        assert [f.result().position for f in fs] == [11, 12]
        ref = Ref(toy)
        ref.feed([*tokens, 3])
        assert_matches(s, ref)
        fs = queued(5)
        ahead = pb.RewindRequest(session_id=s.id, position=13)
        # at 11 when it came, at 12 when its turn came: checked then
        said = "position: 13 is ahead of the session (at position 12)"
        assert code_of(lambda: c.stub.RewindSession(ahead)) == (C.OUT_OF_RANGE, said)
        assert fs[0].result().position == 12
        ref.feed([5])
        assert_matches(s, ref)
