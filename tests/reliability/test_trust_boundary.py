"""What a hostile or careless client can do at the trust boundary, and what it cannot.

Each test checks the server's answer and every state it reports against the toy model's
float64 numpy recurrence (`Ref`): a stale Stream never reaches a new session of the same
id, ids are matched whole, forged / foreign / unsigned snapshots are refused (the
signature is recomputed here with hmac, see rel_helpers.make_snapshot), NaN outputs are a
server-side condition (DATA_LOSS), the largest position is enforced (OUT_OF_RANGE),
Generate needs a prompt, concurrent Steps of one session queue in order, and a taken port
is one line of error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from rel_helpers import (
    SECRET,
    Ref,
    assert_matches,
    code_of,
    decode_snapshot,
    idle,
    make_snapshot,
    serve,
    target,
    wait_until,
)
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import Client

C = grpc.StatusCode


@pytest.fixture(scope="module")
def srv(toy):
    with serve(toy, session_ttl=60.0, max_new_tokens=16) as s:
        yield s


@pytest.fixture()
def client(srv):
    with Client(target(srv), timeout=30) as c:
        yield c


@pytest.fixture()
def stub(srv):
    """A raw stub: no client-side checks, no x-session-id metadata."""
    with grpc.insecure_channel(target(srv)) as ch:
        yield pb_grpc.StreamingInferenceStub(ch)


@pytest.mark.parametrize("rpc", ["create", "fork", "generate", "stream"])
def test_a_session_made_after_the_calls_deadline_is_closed_again(srv, stub, monkeypatch, rpc):
    """The deadline passes while a session is made, the event loop held up (a long prefill
    ends, other work runs) so grpc cannot cancel the call first: grpc would drop the response
    and the client never learn the id. The session is closed again (DEADLINE_EXCEEDED)
    instead of holding a slot and the principal's quota until its TTL. Generate
    (keep_session) and Stream (no session_id) send the new id with their first response:
    when the deadline passed while the session was made, that response is not sent."""
    svc = srv.server.service
    parent = stub.CreateSession(pb.CreateSessionRequest(prompt=[1, 2])).session_id
    # what takes too long: the fork itself, or the step that feeds the new session its prompt
    owner, name = (svc, rpc) if rpc == "fork" else (svc.batcher, "step")
    real, ended = getattr(owner, name), []

    async def late(*args, **kw):
        try:
            result = await real(*args, **kw)
            time.sleep(0.6)  # the loop held past the deadline; then the handler goes on at once
            return result
        finally:
            ended.append(True)

    monkeypatch.setattr(owner, name, late)
    before = len(svc.store)
    call = {
        "create": lambda: stub.CreateSession(  # a prompt no earlier test cached: it is stepped
            pb.CreateSessionRequest(prompt=[7, 3, 9]), timeout=0.3
        ),
        "fork": lambda: stub.ForkSession(pb.ForkRequest(session_id=parent), timeout=0.3),
        "generate": lambda: list(
            stub.Generate(
                pb.GenerateRequest(prompt=[5, 4], max_new_tokens=2, keep_session=True),
                timeout=0.3,  # a prompt no earlier test cached: it is stepped
            )
        ),
        "stream": lambda: list(stub.Stream(iter([pb.StepRequest(tokens=[3])]), timeout=0.3)),
    }[rpc]
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == C.DEADLINE_EXCEEDED
    wait_until(lambda: ended and len(svc.store) == before, what="the late session closed again")
    monkeypatch.undo()
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=parent)).position == 2


def test_a_stream_is_bound_to_the_session_it_attached_to(srv, client, toy):
    old = client.create_session(session_id="B1")
    with old.open_stream() as st:
        st.send(tokens=[1, 2])
        assert client.session("B1").close() == 2
        new = client.create_session(session_id="B1")  # the old stream does not block the id
        r = new.step(tokens=[3])
        ref = Ref(toy)
        np.testing.assert_allclose(r.outputs[-1], ref.feed([3])[-1], atol=1e-4)
        code, msg = code_of(lambda: st.send(tokens=[4, 5, 6]))  # would land in the new one
        assert code == C.NOT_FOUND and "closed" in msg
    wait_until(lambda: idle(srv), what="the stale stream to end")
    assert_matches(new, ref)  # position 1: nothing of the old stream in it
    with new.open_stream() as st2:  # and the new session can be streamed on
        st2.send(tokens=[7])
    ref.feed([7])
    assert_matches(new, ref)
    new.close()


def test_session_ids_are_matched_whole(stub, client):
    parent = client.create_session()
    cases = [
        (lambda: stub.CreateSession(pb.CreateSessionRequest(session_id="abc\n")), "session_id"),
        (lambda: stub.Step(pb.StepRequest(session_id=f"{parent.id}\n", tokens=[1])), "session_id"),
        (
            lambda: stub.ForkSession(pb.ForkRequest(session_id=parent.id, new_session_id="q\n")),
            "new_session_id",
        ),
    ]
    for call, field in cases:
        code, msg = code_of(call)
        assert code == C.INVALID_ARGUMENT and msg.startswith(f"{field}: "), msg
    assert client.session(parent.id).close() == 0  # untouched, and nothing else created


def test_forged_snapshots_are_refused_and_signed_ones_restore(client, toy):
    s = client.create_session()
    ref = Ref(toy)
    ref.feed([1, 2, 3])
    s.step(tokens=[1, 2, 3])
    position, state, sha = decode_snapshot(s.snapshot(), SECRET)  # the signature verifies
    assert position == 3
    huge = np.full(toy["S"], 3e38)
    forged = {
        "another server key": make_snapshot(5, huge, sha, secret=b"attacker's own key 123"),
        "unsigned": make_snapshot(5, huge, sha, version=1, secret=None),
    }
    for words, data in forged.items():
        code, msg = code_of(lambda d=data: client.restore(d))
        assert code == C.INVALID_ARGUMENT and msg.startswith("snapshot: ") and words in msg
    tampered = bytearray(s.snapshot())
    tampered[-50] ^= 0x40  # a bit of the state
    code, msg = code_of(lambda: client.restore(bytes(tampered)))
    assert code == C.INVALID_ARGUMENT and "tampered" in msg
    copy = client.restore(make_snapshot(3, state, sha))  # signed with the servers' key
    r = copy.step(tokens=[4])
    np.testing.assert_allclose(r.outputs[-1], ref.feed([4])[-1], atol=1e-4)


def test_the_largest_position_is_enforced(srv, client, toy):
    state = np.zeros(toy["S"], dtype=np.float32)
    sha = decode_snapshot(client.create_session().snapshot())[2]
    s = client.restore(make_snapshot(2**63 - 2, state, sha))
    assert s.step(tokens=[1]).position == 2**63 - 1
    before = decode_snapshot(s.snapshot())
    code, msg = code_of(lambda: s.step(tokens=[2]))
    assert code == C.OUT_OF_RANGE and msg.startswith("inputs: ") and "2**63 - 1" in msg
    after = decode_snapshot(s.snapshot())
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    code, _ = code_of(lambda: client.restore(make_snapshot(2**63, state, sha)))
    assert code == C.INVALID_ARGUMENT


def test_nonfinite_outputs_are_data_loss_not_invalid_argument(srv, client, toy):
    """A state that went bad on the server (simulated: NaN written into its slab row) makes
    Step and Generate answer DATA_LOSS; other sessions and health are unaffected."""
    bad, good = client.create_session(), client.create_session()
    store = srv.server.store
    store.commit(store.get(bad.id, "anonymous"), np.full(toy["S"], np.nan, np.float32), 0)
    code, msg = code_of(lambda: bad.step(tokens=[1]))
    assert code == C.DATA_LOSS and "NaN or inf" in msg
    code, _ = code_of(lambda: list(bad.generate([1], max_new_tokens=3, seed=0)))
    assert code == C.DATA_LOSS
    code, msg = code_of(bad.snapshot)  # a restore would refuse it
    assert code == C.DATA_LOSS and "its state contains NaN or inf" in msg
    ref = Ref(toy)
    np.testing.assert_allclose(good.step(tokens=[5]).outputs[-1], ref.feed([5])[-1], atol=1e-4)


def test_generate_needs_a_prompt_also_on_a_session_with_a_position(client, toy):
    s = client.create_session()
    s.step(tokens=[1, 2])
    code, msg = code_of(lambda: list(s.generate([], max_new_tokens=2, seed=0)))
    assert code == C.INVALID_ARGUMENT and msg.startswith("prompt: ")
    ref = Ref(toy)
    ref.feed([1, 2])
    assert_matches(s, ref)
    tokens = [g.token for g in s.generate([3], max_new_tokens=3, temperature=0.0)]
    assert tokens == ref.greedy([3], 3)


def test_concurrent_steps_of_one_session_run_one_at_a_time_in_order(client, toy):
    """Unary Steps sent together to one session queue behind each other: each is applied
    exactly once, and the positions they report are the order they were applied in."""
    s = client.create_session()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    got: dict[int, object] = {}

    def send(t):
        with Client(client.target, timeout=30) as c:
            got[t] = c.session(s.id).step(tokens=[t])

    threads = [threading.Thread(target=send, args=(t,)) for t in tokens]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    order = sorted(tokens, key=lambda t: got[t].position)
    assert sorted(got[t].position for t in tokens) == list(range(1, 9))
    ref = Ref(toy)
    for t in order:
        np.testing.assert_allclose(got[t].outputs[-1], ref.feed([t])[-1], atol=1e-4)
    assert_matches(s, ref)


def test_serve_on_a_taken_port_is_one_line_and_exit_2(toy, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "ssmstream.runtime.cli", "serve", str(toy["model_dir"]),
             "--port", str(port), "--device", "cpu", "--log-level", "WARNING"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0]
