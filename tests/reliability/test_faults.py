"""Faults while serving: clients that vanish, competing attachments, onnxruntime failing inside
a batch, deadlines expiring mid-batch, idle-TTL eviction racing steps, a full server.

Faults are injected at the onnxruntime call itself (`inject`: the engine's InferenceSession
wrapped to sleep or raise) or by killing a client process. After each, every session
involved is checked against the float64 numpy reference of the toy model: its position is
one the client could have caused and its state (snapshot) is exactly the reference at that
position — a request applies fully or not at all.

Covered in tests/runtime (not repeated): a client closing its Stream and resuming
(test_stream_disconnect_leaves_the_session_resumable), a second Stream / Step on an attached
session (test_second_attach_is_refused_and_the_first_is_unaffected), a cancelled Generate
(test_generate_cancel_leaves_session_consistent), one unary Step failing in ORT
(test_engine_failure_is_internal_and_changes_nothing).

Dimension letters: V vocabulary (11), S state size (8), T inputs per request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
from faults import inject
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_helpers import Ref, code_of, decode_snapshot, idle, serve, target
from rel_helpers import wait_until as wait
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import service as service_module
from ssmstream.runtime.client import AsyncClient, Client

C = grpc.StatusCode
V = 11


def seq(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, V, size=n).tolist()


def check_consistent(toy, c: Client, sid: str, fed: list, candidates=None) -> int:
    """The session's position is one of `candidates` (default: any prefix of `fed`) and its
    state is the reference after fed[:position]. Returns the position."""
    position, state, _ = decode_snapshot(c.session(sid).snapshot())
    if candidates is not None:
        assert position in candidates, (sid, position, candidates)
    assert position <= len(fed), (sid, position, len(fed))
    ref = Ref(toy)
    if position:
        ref.feed(fed[:position])
    np.testing.assert_allclose(state, ref.x, atol=1e-4, rtol=1e-4)
    return position


def serving(srv) -> bool:
    with grpc.insecure_channel(target(srv)) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def srv(toy):
    with serve(toy, max_new_tokens=100_000, session_ttl=30.0, max_tokens_per_request=64) as s:
        yield s


@pytest.fixture()
def client(srv):
    with Client(target(srv), timeout=30) as c:
        yield c


# --- clients that vanish ----------------------------------------------------------------------

KILLED_CLIENT = textwrap.dedent(
    """
    import sys, threading
    from ssmstream.protos import inference_pb2 as pb
    from ssmstream.runtime.client import Client

    address, stream_sid, gen_sid, tokens = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    c = Client(address, timeout=120)
    out = threading.Lock()

    def say(*words):
        with out:
            print(*words, flush=True)

    def stream():   # pipelined: every request is sent without waiting for responses
        reqs = (pb.StepRequest(session_id=stream_sid, tokens=[int(t)]) for t in tokens.split(","))
        for r in c.stub.Stream(reqs):
            say("stream", r.position)

    def generate(sid, tag):
        for r in c.session(sid).generate([1, 2, 3], max_new_tokens=50000, temperature=0):
            say(tag, r.index)

    threads = [threading.Thread(target=stream),
               threading.Thread(target=generate, args=(gen_sid, "gen")),
               threading.Thread(target=generate, args=("", "tmp"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
)


def test_client_killed_mid_stream_and_mid_generate(srv, client, toy):
    """SIGKILL a client process with a pipelined Stream, a Generate on a session and a
    Generate on a temporary session in flight: the sessions stay intact (state == the
    reference at their position) and resumable, the temporary one is closed, nothing stays
    attached or queued."""
    tokens = seq(1, 20_000)
    stream_s, gen_s = client.create_session(), client.create_session()
    baseline = srv.server.store.stats()["sessions"]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, target(srv), stream_s.id, gen_s.id,
         ",".join(map(str, tokens))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = {"stream": 0, "gen": 0, "tmp": 0}
    try:
        deadline = time.monotonic() + 60
        while min(seen.values()) < 30 and time.monotonic() < deadline:
            tag, n = proc.stdout.readline().split()
            seen[tag] = max(seen[tag], int(n))
        assert min(seen.values()) >= 30, seen
        assert srv.server.store.stats()["sessions"] == baseline + 1  # the temporary one
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    wait(lambda: idle(srv), what="server-side cleanup of the killed client's calls")
    assert srv.server.store.stats()["sessions"] == baseline  # temporary session closed

    # the stream session: a prefix of what was sent, at least what the client saw acknowledged
    p = check_consistent(toy, client, stream_s.id, tokens)
    assert p >= seen["stream"]
    # the generate session: the prompt plus the first greedy tokens, each sent before it was fed
    position, state, _ = decode_snapshot(gen_s.snapshot())
    fed = position - 3
    assert fed >= seen["gen"]  # response i is sent before token i is fed ... token i-1 was fed
    greedy = Ref(toy).greedy([1, 2, 3], fed + 1)
    ref = Ref(toy)
    ref.feed([1, 2, 3, *greedy[:fed]])
    np.testing.assert_allclose(state, ref.x, atol=1e-4, rtol=1e-4)

    # both resume: a new Stream on each continues exactly
    ref_s = Ref(toy)
    ref_s.feed(tokens[:p])
    with stream_s.open_stream() as st:
        got = [st.send(tokens=[t]).outputs[0] for t in tokens[p : p + 3]]
    np.testing.assert_allclose(np.stack(got), ref_s.feed(tokens[p : p + 3]), atol=1e-4)
    rs = list(gen_s.generate([greedy[fed]], max_new_tokens=3, temperature=0))
    assert [r.token for r in rs] == ref.greedy([greedy[fed]], 3)
    stream_s.close(), gen_s.close()


def test_stream_cancelled_while_its_creating_request_runs_leaves_no_session(
    srv, client, monkeypatch
):
    """A Stream whose first request creates the session, cancelled before the response: the
    client never learned the id, so the session must not be left behind. The step runs on
    the batcher's worker: a lone stream's step runs on the event loop (`inline`), which sees
    the cancel only after the response went out, and then keeps the session as one whose id
    the client may have read (this test failed when run alone, with no other session active)."""
    monkeypatch.setattr(srv.server.batcher, "inline", False)
    baseline = srv.server.store.stats()["sessions"]
    gate = threading.Event()
    try:
        with inject(srv.server.engine, gate=gate) as fault:
            call = client.stub.Stream(iter([pb.StepRequest(tokens=[1])]))
            wait(lambda: fault.calls, what="the creating step to run in onnxruntime")
            call.cancel()  # the step is held in onnxruntime: no response can have left
            time.sleep(0.2)  # (lets the cancel reach the server before the step ends)
            gate.set()
            wait(lambda: idle(srv), what="the cancelled stream to end")
    finally:
        gate.set()
    assert srv.server.store.stats()["sessions"] == baseline


# --- competing attachments ------------------------------------------------------------------


def test_generate_and_stream_exclude_each_other(srv, client, toy, monkeypatch):
    # each refusal below waits DETACH_WAIT while the Generate runs on: a short wait keeps the
    # tokens it generates meanwhile (a few hundred here) well under the reference's count
    monkeypatch.setattr(service_module, "DETACH_WAIT", 0.05)
    tokens = seq(2, 6)
    s = client.create_session()
    with Client(target(srv), timeout=30) as other:
        theirs = other.session(s.id)
        with s.open_stream() as st:  # attached to a Stream: a Generate elsewhere is refused
            first = st.send(tokens=tokens[:1])
            code, msg = code_of(lambda: list(theirs.generate([1], max_new_tokens=2)))
            assert code == C.FAILED_PRECONDITION and "attached to an open Stream" in msg
            rest = [st.send(tokens=[t]) for t in tokens[1:3]]
        got = np.stack([first.outputs[0]] + [r.outputs[0] for r in rest])
        np.testing.assert_allclose(got, Ref(toy).feed(tokens[:3]), atol=1e-4)

        gen = s.generate([tokens[3]], max_new_tokens=50_000, temperature=0)
        next(gen)  # a Generate is running: Stream, Step and Generate elsewhere are refused
        for fn in (
            lambda: list(theirs.stream([[1]])),
            lambda: theirs.step(tokens=[1]),
            lambda: list(theirs.generate([1], max_new_tokens=2)),
        ):
            code, msg = code_of(fn)
            assert code == C.FAILED_PRECONDITION and "attached to an open Generate" in msg
        gen.close()  # cancels
        wait(lambda: idle(srv), what="the cancelled Generate to end")
        # the session is consistent and free again
        greedy = Ref(toy).greedy(tokens[:4], 5000)
        p = check_consistent(toy, client, s.id, [*tokens[:4], *greedy])
        assert 5 <= p < 5004
        assert theirs.step(tokens=[1]).position == p + 1
    s.close()


def test_close_from_elsewhere_ends_the_attached_stream_cleanly(srv, client):
    """Closing is not attaching: the owner may close a session another client streams on;
    that stream's next request gets NOT_FOUND (closed), and nothing is left attached."""
    s = client.create_session()
    with s.open_stream() as st:
        st.send(tokens=[1])
        assert client.session(s.id).close() == 1
        code, msg = code_of(lambda: st.send(tokens=[2]))
        assert code == C.NOT_FOUND and "closed" in msg
    wait(lambda: idle(srv), what="the stream to end")


# --- onnxruntime failing inside a batch -------------------------------------------------------


async def _step_all(address: str, sids: list[str], tokens: list[int], timeouts=None):
    """One unary Step per session, sent together; per session its StepResponse or RpcError."""
    async with AsyncClient(address) as c:

        async def one(i):
            req = pb.StepRequest(session_id=sids[i], tokens=[tokens[i]])
            t = None if timeouts is None else timeouts[i]
            try:
                return await c.stub.Step(req, timeout=t)
            except grpc.RpcError as e:
                return e

        return await asyncio.gather(*(one(i) for i in range(len(sids))))


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn() in a thread; its result lands in box["r"] (its exception in box["e"])."""
    box: dict = {}

    def run():
        try:
            box["r"] = fn()
        except Exception as e:  # handed to the test, which asserts on it
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_ort_failure_inside_a_batch(srv, client, toy):
    """One ORT step call fails for a batch of 4 sessions: each gets INTERNAL and keeps its
    state; a prefill queued behind it and the steps after it succeed; health stays SERVING.

    The batch is made deterministic: a blocker step holds the engine's worker (its ORT call
    waits on a gate) until all four steps and the prefill are queued behind it."""
    batcher = srv.server.batcher
    sessions = [client.create_session() for _ in range(4)]
    prefixes = [seq(10 + i, 3) for i in range(4)]
    for s, p in zip(sessions, prefixes):
        s.step(tokens=p)
    blocker, bystander = client.create_session(), client.create_session()
    ids, nxt, gate = [s.id for s in sessions], [5, 6, 7, 8], threading.Event()
    # the blocker alone would run inline, holding the event loop for its (here: gated) step,
    # whenever the four sessions' last requests are older than the activity window (20 ms)
    # by then; this scenario is about requests queueing behind a worker that runs onnxruntime
    batcher.inline = False
    try:
        with inject(srv.server.engine, fail=1, after=1, gate=gate) as fault:
            t0, b0 = _in_thread(lambda: blocker.step(tokens=[1]))
            wait(lambda: fault.calls, what="the blocker to hold the worker")
            t1, b1 = _in_thread(lambda: asyncio.run(_step_all(target(srv), ids, nxt)))
            wait(lambda: batcher.pending() == 5, what="four steps queued behind the blocker")
            t2, b2 = _in_thread(lambda: bystander.step(tokens=seq(20, 8), output="all"))
            wait(lambda: batcher.pending() == 6, what="the prefill queued")
            gate.set()
            for t in (t0, t1, t2):
                t.join(30)
    finally:
        gate.set()
        batcher.inline = True
    assert fault.fail == 0 and len(fault.calls) == 2, fault.calls  # blocker, then the four
    assert b0["r"].position == 1  # the blocker's own call succeeded
    for r in b1["r"]:
        assert isinstance(r, grpc.RpcError) and r.code() == C.INTERNAL, r
        assert "injected kernel failure" in r.details()
    np.testing.assert_allclose(b2["r"].outputs, Ref(toy).feed(seq(20, 8)), atol=1e-4)
    for s, p, t in zip(sessions, prefixes, nxt):  # previous state kept; the retry works
        check_consistent(toy, client, s.id, p, candidates={3})
        r = s.step(tokens=[t])
        assert r.position == 4
        np.testing.assert_allclose(r.outputs[0], Ref(toy).feed([*p, t])[-1], atol=1e-4)
        s.close()
    blocker.close(), bystander.close()
    assert serving(srv)


def test_ort_failure_in_the_second_prefill_piece_applies_nothing(srv, client, toy):
    """T = 16 runs as two prefill calls (12 + 4); the second fails: nothing is committed."""
    x = seq(30, 16)
    s = client.create_session()
    s.step(tokens=[4])
    with inject(srv.server.engine, graph="prefill", fail=1, after=1) as fault:
        code, msg = code_of(lambda: s.step(tokens=x))
    assert code == C.INTERNAL and len(fault.calls) == 2
    check_consistent(toy, client, s.id, [4], candidates={1})
    r = s.step(tokens=x, output="all")
    np.testing.assert_allclose(r.outputs, Ref(toy).feed([4, *x])[1:], atol=1e-4)
    s.close()


# --- deadlines --------------------------------------------------------------------------------


def test_deadline_expiring_mid_batch(srv, client, toy):
    """Four steps queued behind a blocker run as one ORT call that takes 1.5 s; one has a
    0.8 s deadline, which expires while that call runs. The other three get their results;
    the expired one applies fully (it was running) and its session is consistent."""
    batcher = srv.server.batcher
    sessions = [client.create_session() for _ in range(4)]
    blocker, gate = client.create_session(), threading.Event()
    ids, nxt = [s.id for s in sessions], [1, 2, 3, 4]
    # the blocker alone would run inline, holding the event loop for its (here: gated)
    # step; this scenario is about requests queueing behind a worker that runs onnxruntime
    batcher.inline = False
    try:
        with inject(srv.server.engine, delay=1.5, delay_from=1, gate=gate) as fault:
            t0, _ = _in_thread(lambda: blocker.step(tokens=[1]))
            wait(lambda: fault.calls, what="the blocker to hold the worker")
            dropped = batcher.stats.cancelled
            t1, b1 = _in_thread(
                lambda: asyncio.run(_step_all(target(srv), ids, nxt, timeouts=[0.8, 30, 30, 30]))
            )
            wait(lambda: batcher.pending() == 5, what="four steps queued behind the blocker")
            gate.set()
            t0.join(30), t1.join(30)
    finally:
        gate.set()
        batcher.inline = True
    rs = b1["r"]
    assert isinstance(rs[0], grpc.RpcError) and rs[0].code() == C.DEADLINE_EXCEEDED
    for r, t in zip(rs[1:], nxt[1:]):
        np.testing.assert_allclose(np.asarray(r.outputs), Ref(toy).feed([t])[-1], atol=1e-4)
    assert len(fault.calls) == 2  # the four ran as one call
    wait(lambda: idle(srv), what="the batch to finish")
    # running when the deadline hit → applied; unless the machine took so long to queue it and
    # start the batch that the deadline hit while it still waited: then the batcher dropped it
    # (and counted it cancelled), and the other three ran alone
    dropped = batcher.stats.cancelled - dropped
    assert dropped in (0, 1)
    p = check_consistent(toy, client, ids[0], [1], candidates={1 - dropped})
    r = sessions[0].step(tokens=[9])  # and it continues from there, exactly
    np.testing.assert_allclose(r.outputs[0], Ref(toy).feed([1][:p] + [9])[-1], atol=1e-4)
    for s in (*sessions, blocker):
        s.close()


def test_deadline_expiring_while_queued_drops_the_request(srv, client, toy):
    """A Step waiting behind its session's running step (held by a gate) whose deadline
    expires while it waits is dropped when its turn comes, not run: the session holds the
    first step only, and the batcher counts one request cancelled."""
    batcher = srv.server.batcher
    queued, gate = client.create_session(), threading.Event()

    def waiting() -> list:  # requests queued behind their session's running one (only ours)
        return [r for q in list(batcher._waiting.values()) for r in list(q)]

    # the first step alone would run inline, holding the event loop for its (here: gated)
    # step; this scenario is about a request queueing behind a worker that runs onnxruntime
    batcher.inline = False
    try:
        with inject(srv.server.engine, gate=gate) as fault:
            first, _ = _in_thread(lambda: queued.step(tokens=[5]))
            wait(lambda: fault.calls, what="the first step to hold the worker")
            dropped = batcher.stats.cancelled
            req = pb.StepRequest(session_id=queued.id, tokens=[6])
            # the deadline only has to outlast the trip to the queue (a stalled machine: a
            # second or two); nothing runs until the gate opens, whenever it expires
            call = client.stub.Step.future(req, timeout=4.0)
            wait(lambda: len(waiting()) == 1 or call.done(), what="the second step queued")
            assert len(waiting()) == 1, "the second step never queued (deadline hit first?)"
            code, _ = code_of(call.result)
            assert code == C.DEADLINE_EXCEEDED
            # the server cancels its handler at the deadline too (its own timer): only once
            # the queued request is cancelled does the first step end
            wait(lambda: all(r.future.cancelled() for r in waiting()), what="the cancel")
            gate.set()
            first.join(30)
            wait(lambda: idle(srv), what="the queue to drain")
    finally:
        gate.set()
        batcher.inline = True
    assert len(fault.calls) == 1, fault.calls  # the second never reached onnxruntime
    assert batcher.stats.cancelled - dropped == 1
    check_consistent(toy, client, queued.id, [5, 6], candidates={1})  # the second was dropped
    queued.close()


def test_stream_deadline_mid_request_leaves_the_session_consistent(srv, client, toy):
    s = client.create_session()
    with inject(srv.server.engine, delay=0.4):
        reqs = iter([pb.StepRequest(session_id=s.id, tokens=[2])])
        code, _ = code_of(lambda: list(client.stub.Stream(reqs, timeout=0.15)))
        assert code == C.DEADLINE_EXCEEDED
        wait(lambda: idle(srv), what="the stream to end")
    p = check_consistent(toy, client, s.id, [2], candidates={0, 1})
    with s.open_stream() as st:  # detached: a new Stream attaches and continues
        r = st.send(tokens=[3])
    assert r.position == p + 1
    np.testing.assert_allclose(r.outputs[0], Ref(toy).feed([2][:p] + [3])[-1], atol=1e-4)
    s.close()


# --- idle-TTL eviction racing steps ---------------------------------------------------------------


def test_a_step_in_flight_outlives_its_ttl_then_the_session_is_evicted(toy):
    """TTL 0.1 s, a step that takes 0.5 s, the evictor running every 0.075 s: the running
    session is not evicted under the step (no use-after-evict) and the step's result is
    committed; once idle past its TTL it is evicted and its slot is reused cleanly."""
    with serve(toy, session_ttl=0.3, max_sessions=2) as srv, Client(target(srv), timeout=30) as c:
        s = c.create_session(ttl=0.1)
        with inject(srv.server.engine, delay=0.5):
            r = s.step(tokens=[7])
        assert r.position == 1
        np.testing.assert_allclose(r.outputs[0], Ref(toy).feed([7])[-1], atol=1e-4)
        time.sleep(0.4)
        code, msg = code_of(lambda: s.step(tokens=[1]))
        assert code == C.NOT_FOUND and "evicted" in msg
        fresh = [c.create_session() for _ in range(2)]  # both slots, one of them s's old one
        for f in fresh:
            np.testing.assert_allclose(f.step(tokens=[7]).outputs[0], r.outputs[0], atol=0)


def test_eviction_racing_many_steps(toy):
    """12 workers step sessions with a 50-150 ms TTL at random intervals around it, for 2 s,
    with the evictor running every 50 ms and slots reused by replacement sessions: every
    answer is the reference's or NOT_FOUND (evicted) — never another session's state."""
    stats = {"ok": 0, "evicted": 0}
    lock, errors = threading.Lock(), []
    with serve(toy, session_ttl=0.2, max_sessions=16) as srv:
        address = target(srv)

        def worker(w: int) -> None:
            rng = np.random.default_rng(w)
            end = time.monotonic() + 2.0
            with Client(address, timeout=30) as c:
                while time.monotonic() < end:
                    s, ref = c.create_session(ttl=float(rng.uniform(0.05, 0.15))), Ref(toy)
                    while time.monotonic() < end:
                        t = int(rng.integers(0, V))
                        try:
                            got = s.step(tokens=[t]).outputs[0]
                        except grpc.RpcError as e:
                            if e.code() != C.NOT_FOUND or "evicted" not in e.details():
                                errors.append((e.code(), e.details()))
                            with lock:
                                stats["evicted"] += 1
                            break
                        want = ref.feed([t])[-1]
                        if not np.allclose(got, want, atol=1e-4):
                            errors.append(("wrong output", s.id, ref.position))
                        with lock:
                            stats["ok"] += 1
                        time.sleep(float(rng.uniform(0.0, 0.2)))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert stats["ok"] > 50 and stats["evicted"] > 10, stats
        assert srv.server.store.stats()["evicted"] >= stats["evicted"]


# --- a full server -------------------------------------------------------------------------------


def test_at_max_sessions_new_sessions_are_refused_and_streams_go_on(toy):
    """max_sessions = 4, all four streaming: every RPC that would create a session gets
    RESOURCE_EXHAUSTED while the four streams keep getting the reference's outputs."""
    with serve(toy, max_sessions=4, max_new_tokens=8) as srv, Client(target(srv)) as c:
        sessions = [c.create_session() for _ in range(4)]
        seqs = [seq(40 + i, 60) for i in range(4)]
        outs: list[list] = [[] for _ in range(4)]
        go = threading.Event()

        def run(i: int) -> None:
            with sessions[i].open_stream() as st:
                for j, t in enumerate(seqs[i]):
                    outs[i].append(st.send(tokens=[t]).outputs[0])
                    if i == 0 and j == 5:  # session 0 is at position 6
                        go.set()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        go.wait(30)
        snap = c.session(sessions[0].id).snapshot()
        refusals = [
            c.create_session,
            lambda: c.create_session(snapshot=snap),
            lambda: c.restore(snap),
            lambda: c.session(sessions[1].id).fork(),
            lambda: list(c.stub.Stream(iter([pb.StepRequest(tokens=[1])]), timeout=30)),
            lambda: list(c.generate([1], max_new_tokens=2)),
            lambda: list(c.generate([1], max_new_tokens=2, keep_session=True)),
        ]
        for fn in refusals:
            code, msg = code_of(fn)
            assert code == C.RESOURCE_EXHAUSTED and "capacity=4" in msg, (code, msg)
        for t in threads:
            t.join(60)
        for i in range(4):
            np.testing.assert_allclose(np.stack(outs[i]), Ref(toy).feed(seqs[i]), atol=1e-4)
        assert srv.server.store.stats()["sessions"] == 4
        sessions[0].close()
        assert c.restore(snap).position == decode_snapshot(snap)[0] >= 6  # a free slot again
