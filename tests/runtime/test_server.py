"""The gRPC server end to end: real server on 127.0.0.1 (ephemeral port), real channels.

Every RPC's happy path and each status code; what comes over the wire is compared with
`Engine.step` run in-process on the same inputs (the independent computation).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from faults import inject
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import AsyncClient, Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.server import BackgroundServer

ATOL = 2e-4  # server (batched step / prefill) vs in-process single steps


def reference(eng: Engine, inputs: np.ndarray, state: np.ndarray | None = None):
    """Engine.step one input at a time: outputs [T, D] and the final state [1, S]."""
    state = eng.new_state(1) if state is None else state
    outs = []
    for x in inputs:
        y, state = eng.step(np.asarray(x)[None], state)
        outs.append(y[0])
    return np.stack(outs), state


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def engine(tiny_token_model):
    return Engine(tiny_token_model["model_dir"], device="cpu")


@pytest.fixture(scope="module")
def server(tiny_token_model, snapshot_key_file):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        snapshot_key=snapshot_key_file,
        port=0,
        device="cpu",
        max_tokens_per_request=64,
        max_new_tokens=64,
        max_batch=64,
        max_batch_delay=0.001,
        session_ttl=30.0,
        max_message_bytes=64 * 1024,
        grace=0.5,
    )
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def tokens_for(engine, n, seed):
    V = int(engine.info["vocab_size"])
    return np.random.default_rng(seed).integers(0, V, size=n, dtype=np.int64)  # [n]


# --- happy paths ---------------------------------------------------------------------------


def test_model_info_describes_the_engine(client, engine):
    info = client.info()
    e = engine.info
    assert info.input_kind == "tokens" and info.vocab_size == e["vocab_size"]
    assert info.d_output == e["d_output"] and info.state_size == e["state_size"]
    assert info.state_bytes == 4 * e["state_size"]
    assert info.step_sha256 == e["step_sha256"] and info.provider
    assert info.limits.max_tokens_per_request == 64 and info.limits.max_new_tokens == 64


def test_step_over_the_wire_equals_engine_step(client, engine):
    x = tokens_for(engine, 12, seed=1)
    expect, _ = reference(engine, x)  # [12, V]
    s = client.create_session()
    assert s.position == 0
    got = [s.step(tokens=[t], output="last").outputs[0] for t in x[:5]]  # T=1 steps
    r = s.step(tokens=x[5:], output="all")  # T=7: prefill
    assert r.position == 12 and r.outputs.shape == (7, engine.info["d_output"])
    np.testing.assert_allclose(np.stack(got), expect[:5], atol=ATOL)
    np.testing.assert_allclose(r.outputs, expect[5:], atol=ATOL)
    none = s.step(tokens=[1], output="none")
    assert none.outputs is None and none.position == 13
    s.close()


def test_top_k_over_the_wire(client, engine):
    x = tokens_for(engine, 4, seed=2)
    expect, _ = reference(engine, x)
    z = expect[-1].astype(np.float64)
    lp = z - np.log(np.exp(z - z.max()).sum()) - z.max()  # log_softmax, independently
    order = np.argsort(-lp, kind="stable")[:5]
    s = client.create_session()
    r = s.step(tokens=x, output="top_k", top_k=5)
    assert r.outputs is None and r.position == 4
    assert r.top_tokens.tolist() == order.tolist()
    np.testing.assert_allclose(r.top_logprobs, lp[order], atol=1e-3)
    s.close()


def test_stream_equals_engine_and_keeps_order(client, engine):
    x = tokens_for(engine, 10, seed=3)
    expect, _ = reference(engine, x)
    s = client.create_session()
    results = list(s.stream(([t] for t in x), output="last"))
    assert [r.position for r in results] == list(range(1, 11))
    np.testing.assert_allclose(np.stack([r.outputs[0] for r in results]), expect, atol=ATOL)
    s.close()


def test_stream_first_request_creates_a_session(client, engine):
    x = tokens_for(engine, 3, seed=4)
    expect, _ = reference(engine, x)
    stub = client.stub
    reqs = [pb.StepRequest(tokens=[int(t)]) for t in x]
    resps = list(stub.Stream(iter(reqs)))
    sid = resps[0].session_id
    assert sid and all(r.session_id == sid for r in resps)
    got = np.stack([np.asarray(r.outputs, np.float32) for r in resps])
    np.testing.assert_allclose(got, expect, atol=ATOL)
    assert client.session(sid).close() == 3


def test_stream_disconnect_leaves_the_session_resumable(client, engine):
    x = tokens_for(engine, 8, seed=5)
    expect, _ = reference(engine, x)
    s = client.create_session()
    with s.open_stream() as st:
        for t in x[:4]:
            st.send(tokens=[t])
    # the stream is gone; the session is not: continue where it stopped
    with s.open_stream() as st:
        rest = [st.send(tokens=[t]) for t in x[4:]]
    assert rest[-1].position == 8
    np.testing.assert_allclose(np.stack([r.outputs[0] for r in rest]), expect[4:], atol=ATOL)
    s.close()


def test_second_attach_is_refused_and_the_first_is_unaffected(client, engine):
    x = tokens_for(engine, 4, seed=6)
    expect, _ = reference(engine, x)
    s = client.create_session()
    with s.open_stream() as first:
        r0 = first.send(tokens=[x[0]])
        second = client.session(s.id).open_stream()
        code, msg = code_of(lambda: second.send(tokens=[x[1]]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "attached" in msg
        code, _ = code_of(lambda: client.session(s.id).step(tokens=[x[1]]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        rest = [first.send(tokens=[t]) for t in x[1:]]
    got = np.stack([r0.outputs[0]] + [r.outputs[0] for r in rest])
    np.testing.assert_allclose(got, expect, atol=ATOL)
    assert rest[-1].position == 4
    s.close()


def test_concurrent_streaming_clients_each_get_their_own_outputs(server, engine):
    C, T = 32, 6
    xs = [tokens_for(engine, T, seed=100 + i) for i in range(C)]
    expects = [reference(engine, x)[0] for x in xs]

    async def one(i):
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            s = await c.create_session()
            async with s.open_stream() as st:
                outs = [(await st.send(tokens=[t])) for t in xs[i]]
            await s.close()
            return outs

    async def all_clients():
        return await asyncio.gather(*(one(i) for i in range(C)))

    results = asyncio.run(all_clients())
    for i, outs in enumerate(results):
        assert [r.position for r in outs] == list(range(1, T + 1))
        np.testing.assert_allclose(np.stack([r.outputs[0] for r in outs]), expects[i], atol=ATOL)


def greedy_reference(eng, prompt, n):
    """Greedy decoding in-process: feed prompt, then argmax and feed, n tokens."""
    outs, state = reference(eng, prompt)
    tokens, logits = [], outs[-1]
    for _ in range(n):
        t = int(np.argmax(logits))
        tokens.append(t)
        y, state = eng.step(np.array([t], dtype=np.int64), state)
        logits = y[0]
    return tokens


def test_generate_greedy_equals_in_process_greedy(client, engine):
    prompt = tokens_for(engine, 5, seed=7)
    expect = greedy_reference(engine, prompt, 10)
    rs = list(client.generate(prompt.tolist(), max_new_tokens=10, temperature=0.0))
    assert [r.token for r in rs] == expect
    assert [r.index for r in rs] == list(range(10))
    assert [r.position for r in rs] == list(range(5, 15))  # the token is fed after its reply
    assert rs[-1].finish_reason == pb.FINISH_MAX_TOKENS
    assert all(r.finish_reason == pb.FINISH_NONE for r in rs[:-1])
    # a temporary session is closed at the end
    code, msg = code_of(lambda: client.session(rs[0].session_id).step(tokens=[1]))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in msg


def test_generate_stops_at_a_stop_token_and_continues_a_session(client, engine):
    prompt = tokens_for(engine, 4, seed=8)
    expect = greedy_reference(engine, prompt, 6)
    stop = expect[3]
    first = expect.index(stop)
    s = client.create_session()
    s.step(tokens=prompt[:-1])
    rs = list(s.generate(prompt[-1:].tolist(), max_new_tokens=6, temperature=0, stop=[stop]))
    assert [r.token for r in rs] == expect[: first + 1]
    assert rs[-1].finish_reason == pb.FINISH_STOP_TOKEN
    assert s.close() == len(prompt) + first  # every token but the last was fed


def test_generate_with_seed_is_reproducible(client, engine):
    prompt = tokens_for(engine, 3, seed=9).tolist()
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    got = list(client.generate(prompt, seed=123, **kw))
    a = [r.token for r in got]
    b = [r.token for r in client.generate(prompt, seed=123, **kw)]
    assert a == b and len(a) == 12
    # each logprob is the token's log-probability under the unfiltered distribution
    y, s = engine.prefill(np.array([prompt]), engine.new_state())
    logits = y[0, -1].astype(np.float64)
    for r in got[:3]:
        want = logits[r.token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert abs(r.logprob - want) < 1e-4, (r.logprob, want)
        y, s = engine.step(np.array([r.token]), s)
        logits = y[0].astype(np.float64)
    # the server samples as asked: the in-process engine's draw for that seed and those
    # settings, another seed's differs, and it is not greedy decoding
    assert a == list(engine.generate(prompt, seed=123, **kw))
    assert a != [r.token for r in client.generate(prompt, seed=124, **kw)]
    assert a != greedy_reference(engine, prompt, 12)


def test_top_p_zero_is_off_in_process_as_over_the_wire(client, engine):
    """top_p = 0 (the wire's default, "off") gives the tokens of top_p = 1 for the same seed,
    from Engine.generate (which refused 0) and from the server alike."""
    prompt = tokens_for(engine, 3, seed=11).tolist()
    kw = dict(max_new_tokens=12, temperature=1.0, seed=5)
    full = list(engine.generate(prompt, top_p=1.0, **kw))
    assert full != greedy_reference(engine, prompt, 12)  # sampled, not the smallest nucleus
    for off in (0, 0.0):
        assert list(engine.generate(prompt, top_p=off, **kw)) == full
        assert [r.token for r in client.generate(prompt, top_p=off, **kw)] == full


def test_generate_cancel_leaves_session_consistent(client, engine):
    prompt = tokens_for(engine, 3, seed=10)
    s = client.create_session()
    got = []
    for r in s.generate(prompt.tolist(), max_new_tokens=64, temperature=0):
        got.append(r.token)
        if len(got) == 3:
            break  # closes the iterator: cancels the call
    time.sleep(0.3)
    s.snapshot()
    fed = s.position - len(prompt)  # generated tokens the session consumed before the cancel
    time.sleep(0.2)
    s.snapshot()
    assert s.position == len(prompt) + fed, "the loop kept running after the cancel"
    assert 2 <= fed < 64
    greedy = greedy_reference(engine, prompt, fed + 1)
    assert greedy[:3] == got
    # the state is exactly prompt + the first `fed` generated tokens: the next step agrees
    nxt = np.array([greedy[fed]], dtype=np.int64)
    expect, _ = reference(engine, np.concatenate([prompt, np.array(greedy[:fed]), nxt]))
    np.testing.assert_allclose(s.step(tokens=nxt).outputs[0], expect[-1], atol=ATOL)
    s.close()


def test_snapshot_restore_fork_continue_identically(client, engine):
    x = tokens_for(engine, 9, seed=11)
    expect, _ = reference(engine, x)
    s = client.create_session()
    s.step(tokens=x[:5])
    snap = s.snapshot()
    assert s.position == 5 and isinstance(snap, bytes)
    restored = client.restore(snap)
    created = client.create_session(snapshot=snap)
    forked = s.fork()
    assert restored.position == created.position == forked.position == 5
    for h in (s, restored, created, forked):
        r = h.step(tokens=x[5:], output="all")
        np.testing.assert_allclose(r.outputs, expect[5:], atol=ATOL)
        assert r.position == 9
        h.close()


def test_named_sessions_and_ttl(client):
    s = client.create_session(session_id="my-session.1", ttl=10.0)
    assert s.id == "my-session.1"
    code, msg = code_of(lambda: client.create_session(session_id="my-session.1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("session_id")
    f = s.fork("my-fork")
    assert f.id == "my-fork"
    s.close(), f.close()


# --- error codes ---------------------------------------------------------------------------


def test_invalid_argument_names_the_field_and_changes_nothing(client, engine):
    V = int(engine.info["vocab_size"])
    x = tokens_for(engine, 3, seed=12)
    expect, _ = reference(engine, x)
    s = client.create_session()
    s.step(tokens=x[:1])
    bad = [
        (lambda: s.step(tokens=[V]), "tokens"),
        (lambda: s.step(tokens=[-1]), "tokens"),
        (lambda: s.step(tokens=[]), "tokens"),
        (lambda: s.step(values=[0.5]), "values"),
        # the client refuses top_k 0 with output="top_k" itself: the server's, by the stub
        (
            lambda: client.stub.Step(
                pb.StepRequest(session_id=s.id, tokens=[1], output=pb.OUTPUT_TOP_K)
            ),
            "top_k",
        ),  # fmt: skip
        (lambda: s.step(tokens=[1], output="top_k", top_k=V + 1), "top_k"),
        (lambda: client.session("").step(tokens=[1]), "session_id"),
        # the client refuses such an id itself: the server's check, through the bare stub
        (lambda: client.stub.Step(pb.StepRequest(session_id="bad id!", tokens=[1])), "session_id"),
        (lambda: client.create_session(ttl=-1.0), "ttl_seconds"),
        (lambda: client.restore(b"not a snapshot"), "snapshot"),
        (lambda: list(client.generate([1], max_new_tokens=0)), "max_new_tokens"),
        (lambda: list(client.generate([1], max_new_tokens=5, temperature=-1)), "temperature"),
        (lambda: list(client.generate([1], max_new_tokens=5, top_p=2.0)), "top_p"),
        (lambda: list(client.generate([], max_new_tokens=5)), "prompt"),
        (lambda: list(client.generate([V], max_new_tokens=5)), "prompt"),
        (lambda: list(client.generate([1], max_new_tokens=5, stop=[V])), "stop_tokens"),
    ]
    for fn, field in bad:
        code, msg = code_of(fn)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, msg)
        assert msg.startswith(field), (field, msg)
    # nothing applied: the session continues as if the bad requests never came
    r = s.step(tokens=x[1:], output="all")
    assert r.position == 3
    np.testing.assert_allclose(r.outputs, expect[1:], atol=ATOL)
    s.close()


def test_not_found_says_unknown_closed_or_evicted(client):
    code, msg = code_of(lambda: client.session("never-was").step(tokens=[1]))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown" in msg
    s = client.create_session()
    s.close()
    for fn in (
        lambda: s.step(tokens=[1]),
        lambda: s.snapshot(),
        lambda: s.fork(),
        lambda: s.close(),
        lambda: list(s.generate([1], max_new_tokens=2)),
        lambda: list(s.stream([[1]])),
    ):
        code, msg = code_of(fn)
        assert code == grpc.StatusCode.NOT_FOUND and "closed" in msg, msg
    short = client.create_session(ttl=0.2)
    time.sleep(0.5)
    code, msg = code_of(lambda: short.step(tokens=[1]))
    assert code == grpc.StatusCode.NOT_FOUND and "evicted" in msg


def test_resource_exhausted_for_sizes(client):
    s = client.create_session()
    code, msg = code_of(lambda: s.step(tokens=list(range(65))))  # > max_tokens_per_request
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tokens_per_request" in msg
    code, _ = code_of(lambda: client.restore(b"x" * 70_000))  # > max_message_bytes
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, msg = code_of(lambda: list(client.generate([1], max_new_tokens=65)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("max_new_tokens")
    assert s.close() == 0


def test_capacity_and_per_principal_limits(tiny_token_model):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]),
        port=0,
        device="cpu",
        max_sessions=3,
        max_sessions_per_principal=2,
        grace=0.2,
    )
    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        a, b = c.create_session(), c.create_session()
        code, msg = code_of(c.create_session)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_per_principal" in msg
        code, _ = code_of(a.fork)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # existing sessions keep working at the limit
        assert a.step(tokens=[1]).position == 1 and b.step(tokens=[2]).position == 1
        b.close()
        assert c.create_session().position == 0


def test_values_model_over_the_wire(tiny_signal_model):
    eng = Engine(tiny_signal_model["model_dir"], device="cpu")
    I = int(eng.info["d_input"])
    cfg = ServerConfig(model_dir=str(tiny_signal_model["model_dir"]), port=0, device="cpu")
    u = np.random.default_rng(13).standard_normal((6, I)).astype(np.float32)  # [T, I]
    expect, _ = reference(eng, u)
    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        assert c.info().input_kind == "values" and c.info().d_input == I
        s = c.create_session()
        r = s.step(values=u[:2], output="all")
        rest = list(s.stream(u[2:], kind="values"))
        got = np.concatenate([r.outputs, np.stack([x.outputs[0] for x in rest])])
        np.testing.assert_allclose(got, expect, atol=ATOL)
        code, msg = code_of(lambda: s.step(values=u[0, :-1] if I > 1 else [], output="last"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("values")
        code, msg = code_of(lambda: s.step(values=[float("nan")] * I))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("values")
        code, msg = code_of(lambda: s.step(tokens=[1]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("tokens")
        code, msg = code_of(lambda: list(c.generate([1], max_new_tokens=2)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "token model" in msg


def test_snapshot_of_another_model_is_refused(client, tiny_signal_model, snapshot_key_file):
    cfg = ServerConfig(
        model_dir=str(tiny_signal_model["model_dir"]),
        port=0,
        device="cpu",
        snapshot_key=snapshot_key_file,
    )
    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        snap = c.create_session().snapshot()
    code, msg = code_of(lambda: client.restore(snap))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another model" in msg


def test_snapshot_signed_with_another_key_is_refused(client, tiny_token_model):
    cfg = ServerConfig(model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu")
    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        snap = c.create_session().snapshot()  # same model, this server's own random key
    n = len(client.server_sessions()) if hasattr(client, "server_sessions") else None
    code, msg = code_of(lambda: client.restore(snap))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("snapshot: ") and "another server key" in msg
    assert n is None


def test_draining_refuses_new_work_and_ends_idle_streams(tiny_token_model):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=30.0
    )
    srv = BackgroundServer(cfg).start()
    try:
        c = Client(f"127.0.0.1:{srv.port}", timeout=40)
        s = c.create_session()
        st = s.open_stream()
        assert st.send(tokens=[1]).position == 1
        t0 = time.monotonic()
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30.0})
        stopper.start()
        stopper.join(40)
        assert time.monotonic() - t0 < 15.0  # the idle stream did not hold the 30 s grace
        code, msg = code_of(lambda: st.send(tokens=[2]))
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in msg, (code, msg)
        code, _ = code_of(c.create_session)
        assert code == grpc.StatusCode.UNAVAILABLE
        c.close()
    finally:
        srv.stop()


def test_a_generate_in_flight_finishes_while_the_server_drains(tiny_token_model):
    """In-flight work finishes within --grace: a Generate running when the server starts
    draining yields all its tokens (it was cut at its next token with UNAVAILABLE)."""
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=30.0
    )
    srv = BackgroundServer(cfg).start()
    got, n = [], 400
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            stream = c.generate([1, 2, 3], max_new_tokens=n, temperature=0.0)
            got += [next(stream).token for _ in range(5)]
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30.0})
            stopper.start()
            time.sleep(0.2)  # draining now
            got += [g.token for g in stream]
            stopper.join(30)
    finally:
        srv.stop()
    assert len(got) == n


def test_a_drain_while_a_stream_response_is_written_delivers_it(tiny_token_model, monkeypatch):
    """SIGTERM's drain arriving while a Stream writes a step's response: that response
    reaches the client and the Stream then ends UNAVAILABLE (resumable) at once. The
    attachment counted as idle there, so the drain cancelled the write: the client lost the
    reply of a step the server applied and got CANCELLED when the grace ran out."""
    import ssmstream.runtime.servicer as servicer

    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=30.0
    )
    real, calls, acked, ended = servicer.step_response, [], [], []

    def drain_while_answering(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the drain runs while this 2nd response is written
            asyncio.get_running_loop().call_soon(srv.server.service.drain)
        return real(*a, **kw)

    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=40) as c:
        s = c.create_session()
        monkeypatch.setattr(servicer, "step_response", drain_while_answering)

        def stream():
            try:
                with s.open_stream() as st:
                    for t in (1, 2, 3):
                        acked.append(st.send(tokens=[t]).position)
            except grpc.RpcError as e:
                ended.append(e.code())

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        th.join(10.0)  # well before the 30 s grace: a drained stream ends at once
        got, codes = list(acked), list(ended)
        (session,) = srv.server.store.sessions("anonymous")
        assert (session.position, got, codes) == (2, [1, 2], [grpc.StatusCode.UNAVAILABLE])


@pytest.mark.parametrize("T", [1, 3], ids=["slot-step", "prefill"])
def test_a_bug_inside_a_batch_is_internal_and_its_text_stays_in_the_log(
    server, client, engine, T, monkeypatch
):
    """Not onnxruntime failing but a bug (KeyError with internal text): INTERNAL 'internal
    error (see the server log)', as for a bug anywhere else (it had sent 'batch failed:
    <the text>'); the session keeps its state and position."""
    secret = "/srv/secret/internal_detail.py"
    s = client.create_session()
    s.step(tokens=[1])

    def bug(*a, **k):
        raise KeyError(secret)

    monkeypatch.setattr(server.server.engine, "run_slots" if T == 1 else "prefill_unchecked", bug)
    code, msg = code_of(lambda: s.step(tokens=[2] * T))
    assert code == grpc.StatusCode.INTERNAL and msg == "internal error (see the server log)"
    monkeypatch.undo()
    assert s.step(tokens=[3]).position == 2
    s.close()


def test_engine_failure_is_internal_and_changes_nothing(server, client, engine):
    x = tokens_for(engine, 3, seed=14)
    expect, _ = reference(engine, x)
    s = client.create_session()
    s.step(tokens=x[:1])
    with inject(server.server.engine, fail=1 << 30):  # the batcher's steps run the slot graph
        code, msg = code_of(lambda: s.step(tokens=x[1:2]))
        assert code == grpc.StatusCode.INTERNAL and "injected" in msg
        sessions = server.server.store.stats()["sessions"]
        code, _ = code_of(lambda: list(client.stub.Stream(iter([pb.StepRequest(tokens=[1])]))))
        assert code == grpc.StatusCode.INTERNAL
        assert server.server.store.stats()["sessions"] == sessions  # the new session is gone
    r = s.step(tokens=x[1:2], output="last")  # the session kept its state and position
    assert r.position == 2
    np.testing.assert_allclose(r.outputs[0], expect[1], atol=ATOL)
    s.close()


def test_unknown_method_and_raw_garbage_keep_the_server_healthy(server, client):
    channel = client.channel
    garbage = channel.unary_unary("/ssmstream.v1.StreamingInference/Step")
    code, _ = code_of(lambda: garbage(b"\xff\xff\xff\xff\x0f garbage", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    raw_stream = channel.stream_stream("/ssmstream.v1.StreamingInference/Stream")
    code, msg = code_of(lambda: list(raw_stream(iter([b"\x0a\xff\xff"]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("request")
    raw_gen = channel.unary_stream("/ssmstream.v1.StreamingInference/Generate")
    code, msg = code_of(lambda: list(raw_gen(b"\x12\xff", timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("request")
    nope = channel.unary_unary("/ssmstream.v1.StreamingInference/Nope")
    code, _ = code_of(lambda: nope(b"", timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    stub = pb_grpc.StreamingInferenceStub(channel)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).state_size > 0


def test_an_output_all_too_large_to_answer_is_refused_before_it_applies(tmp_path, make_toy):
    """Step / Stream with OUTPUT_ALL whose outputs would not fit in one response: refused
    with RESOURCE_EXHAUSTED naming `output`, the session unchanged; OUTPUT_LAST of the same
    inputs is answered (here 1,000 inputs x 20,000 outputs: 80 MB > 4 MiB)."""
    wide = make_toy(tmp_path / "wide", "tokens", d_out=20000)
    cfg = ServerConfig(model_dir=str(wide["model_dir"]), port=0, device="cpu", grace=0.2)
    with BackgroundServer(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        s = c.create_session()
        for call in (
            lambda: s.step(tokens=[1] * 1000, output="all"),
            lambda: list(s.stream([[1] * 1000], output="all")),
        ):
            code, msg = code_of(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and msg.startswith("output: ")
        assert s.snapshot() and s.position == 0  # nothing applied
        assert s.step(tokens=[1] * 1000).position == 1000  # OUTPUT_LAST fits
