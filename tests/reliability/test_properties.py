"""Property-based: random sequences of valid and invalid requests against a real server agree
with an in-process reference at every step.

A hypothesis state machine drives one server (token toy model) through CreateSession, Step,
Stream (several requests per call), Generate (greedy), SnapshotSession, RestoreSession
(intact or bit-flipped bytes), ForkSession and CloseSession on a handful of sessions, with
tokens drawn from inside and outside [0, V), lengths from 0 to past the per-request limit,
random output selections and top-k, closed and unknown ids. The model keeps, per session, the
float64 numpy recurrence (`Ref`). For every request it predicts the set of acceptable
outcomes — success, or any of the errors that apply (code + field) — and checks:

    success  → positions and outputs equal the reference (top-k: the reference's top set)
    an error → the session is exactly as before (the reference did not move)

and at the end of each example every live session's snapshot (position, state) equals the
reference. Bounded: 20 examples of 25 steps, no deadline (a loaded 2-core machine).

Dimension letters: T inputs per request, V vocabulary (11), D output width (5), S state (8).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from rel_helpers import ATOL, RTOL, Ref, decode_snapshot, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client

C = grpc.StatusCode
IA, RE, NF = C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.NOT_FOUND
V, LIMIT, MAX_NEW, MAX_LIVE = 11, 12, 6, 8
OUTPUTS = [pb.OUTPUT_LAST, pb.OUTPUT_ALL, pb.OUTPUT_TOP_K, pb.OUTPUT_NONE]

valid_token = st.integers(0, V - 1)
any_token = st.one_of(
    valid_token, st.integers(-3, V + 3), st.sampled_from([-(2**63), 2**63 - 1, V, -1])
)
token_lists = st.one_of(
    st.lists(valid_token, min_size=1, max_size=LIMIT),  # mostly valid requests
    st.lists(valid_token, min_size=1, max_size=3),
    st.lists(any_token, min_size=0, max_size=LIMIT + 3),
)


def input_errors(tokens: list[int], field: str = "tokens") -> set:
    """Every (code, field) a request with these inputs may be refused with."""
    errs = set()
    if not tokens:
        errs.add((IA, field))
    if len(tokens) > LIMIT:
        errs.add((RE, field))
    if any(not 0 <= t < V for t in tokens):
        errs.add((IA, field))
    return errs


def output_errors(output: int, top_k: int) -> set:
    if output == pb.OUTPUT_TOP_K and not 1 <= top_k <= V:
        return {(IA, "top_k")}
    if output != pb.OUTPUT_TOP_K and top_k:
        return {(IA, "top_k")}
    return set()


def matches(err: grpc.RpcError, allowed: set) -> bool:
    """The error is one of the allowed (code, field-or-reason) outcomes."""
    code, msg = err.code(), err.details() or ""
    for c, what in allowed:
        if code == c and (msg.startswith(f"{what}:") or f"({what})" in msg):
            return True
    return False


class ServerMachine(RuleBasedStateMachine):
    """Sessions on the server vs their references (see the module docstring)."""

    sessions = Bundle("sessions")
    snapshots = Bundle("snapshots")

    def __init__(self, client: Client, toy: dict):
        super().__init__()
        self.c, self.toy = client, toy
        self.refs: dict[str, Ref] = {}  # live session id -> reference
        self.closed: set[str] = set()

    # --- helpers ---

    def status_errors(self, sid: str) -> set:
        if sid in self.closed:
            return {(NF, "closed")}
        if sid not in self.refs:
            return {(NF, "unknown")}
        return set()

    def call(self, fn, allowed: set):
        """Run fn; an error must be allowed; success must be allowed (allowed has no error
        that *must* happen: any error in `allowed` applies, so success is wrong then)."""
        try:
            result = fn()
        except grpc.RpcError as e:
            assert allowed and matches(e, allowed), (e.code(), e.details(), allowed)
            return None
        assert not allowed, f"succeeded although it must fail with one of {allowed}"
        return result

    def check_outputs(self, resp: pb.StepResponse, want: np.ndarray, output: int, k: int):
        """want: reference outputs [T, D] of this request."""
        if output == pb.OUTPUT_NONE:
            assert not resp.outputs and not resp.top_tokens
        elif output == pb.OUTPUT_TOP_K:
            z = want[-1]
            lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))  # [V] reference log-probs
            top = list(resp.top_tokens)
            assert len(top) == k == len(set(top))
            np.testing.assert_allclose(resp.top_logprobs, lp[top], atol=1e-4)
            rest = np.delete(lp, top)
            assert rest.size == 0 or rest.max() <= lp[top].min() + 1e-4  # a true top-k set
            assert all(np.diff(resp.top_logprobs) <= 1e-6)  # most likely first
        else:
            rows = want if output == pb.OUTPUT_ALL else want[-1:]
            got = np.asarray(resp.outputs, np.float32).reshape(resp.rows, resp.cols)
            np.testing.assert_allclose(got, rows, atol=ATOL, rtol=RTOL)

    # --- rules ---

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, named=st.booleans())
    def create(self, named):
        sid = f"prop-{len(self.refs) + len(self.closed)}-{id(self) % 9973}" if named else ""
        s = self.c.create_session(session_id=sid)
        assert s.position == 0
        self.refs[s.id] = Ref(self.toy)
        return s.id

    @rule(
        sid=st.one_of(sessions, st.just("ghost-session")),
        tokens=token_lists,
        output=st.sampled_from(OUTPUTS),
        top_k=st.one_of(st.just(0), st.integers(0, V + 2)),
    )
    def step(self, sid, tokens, output, top_k):
        if output == pb.OUTPUT_TOP_K and top_k == 0:
            top_k = 3
        allowed = input_errors(tokens) | output_errors(output, top_k) | self.status_errors(sid)
        req = pb.StepRequest(session_id=sid, tokens=tokens, output=output, top_k=top_k)
        resp = self.call(lambda: self.c.stub.Step(req, timeout=30), allowed)
        if resp is not None:
            ref = self.refs[sid]
            want = ref.feed(tokens)
            assert resp.position == ref.position
            self.check_outputs(resp, want, output, top_k)

    @rule(sid=sessions, batches=st.lists(token_lists, min_size=1, max_size=4))
    def stream(self, sid, batches):
        reqs = [
            pb.StepRequest(session_id=sid if i == 0 else "", tokens=b)
            for i, b in enumerate(batches)
        ]
        got, error = [], None
        try:
            for r in self.c.stub.Stream(iter(reqs), timeout=30):
                got.append(r)
        except grpc.RpcError as e:
            error = e
        ref = self.refs.get(sid)
        for i, tokens in enumerate(batches):  # in order: applied until the first refusal
            allowed = input_errors(tokens) | (self.status_errors(sid) if i == 0 else set())
            if allowed:
                assert error is not None and len(got) == i, (i, len(got), allowed)
                assert matches(error, allowed), (error.code(), error.details(), allowed)
                return
            assert i < len(got), (error and error.details(), i)
            want = ref.feed(tokens)
            assert got[i].position == ref.position and got[i].session_id == sid
            self.check_outputs(got[i], want, pb.OUTPUT_LAST, 0)
        assert error is None and len(got) == len(batches)

    @rule(sid=sessions, prompt=token_lists, n=st.integers(0, MAX_NEW + 1))
    def generate(self, sid, prompt, n):
        allowed = input_errors(prompt, "prompt") | self.status_errors(sid)
        if not 1 <= n <= MAX_NEW:
            allowed.add((IA, "max_new_tokens"))
        req = pb.GenerateRequest(session_id=sid, prompt=prompt, max_new_tokens=n, temperature=0)
        rs = self.call(lambda: list(self.c.stub.Generate(req, timeout=30)), allowed)
        if rs is None:
            return
        ref = self.refs[sid]
        logits = ref.feed(prompt)[-1]
        assert len(rs) == n and [r.index for r in rs] == list(range(n))
        for i, r in enumerate(rs):
            assert r.position == ref.position
            assert logits[r.token] >= logits.max() - 1e-4  # greedy (ties within float error)
            if i + 1 < n:  # every generated token but the last is fed
                logits = ref.feed([r.token])[-1]
        assert rs[-1].finish_reason == pb.FINISH_MAX_TOKENS

    @rule(target=snapshots, sid=sessions)
    def snapshot(self, sid):
        allowed = self.status_errors(sid)
        req = pb.SnapshotRequest(session_id=sid)
        snap = self.call(lambda: self.c.stub.SnapshotSession(req, timeout=30), allowed)
        if snap is None:
            return multiple()
        ref = self.refs[sid]
        position, state, _ = decode_snapshot(snap.data)
        assert position == snap.position == ref.position
        np.testing.assert_allclose(state, ref.x, atol=ATOL, rtol=RTOL)
        return (snap.data, ref.copy())

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, snap=snapshots, flip=st.one_of(st.none(), st.integers(0, 200)))
    def restore(self, snap, flip):
        data, ref = snap
        if flip is not None:
            b = bytearray(data)
            b[flip % len(b)] ^= 1 << (flip % 8)
            data = bytes(b)
        allowed = {(IA, "snapshot")} if flip is not None else set()
        s = self.call(lambda: self.c.stub.RestoreSession(pb.RestoreRequest(snapshot=data)), allowed)
        if s is None:
            return multiple()
        assert s.position == ref.position
        self.refs[s.session_id] = ref.copy()
        return s.session_id

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, sid=sessions)
    def fork(self, sid):
        allowed = self.status_errors(sid)
        req = pb.ForkRequest(session_id=sid)
        s = self.call(lambda: self.c.stub.ForkSession(req, timeout=30), allowed)
        if s is None:
            return multiple()
        assert s.position == self.refs[sid].position
        self.refs[s.session_id] = self.refs[sid].copy()
        return s.session_id

    @rule(sid=consumes(sessions))
    def close(self, sid):
        allowed = self.status_errors(sid)
        req = pb.CloseSessionRequest(session_id=sid)
        s = self.call(lambda: self.c.stub.CloseSession(req, timeout=30), allowed)
        if s is not None:
            assert s.position == self.refs.pop(sid).position
            self.closed.add(sid)

    def teardown(self):
        seen = {}
        for sid in self.refs:  # close everything first, so a failure leaves no sessions
            seen[sid] = decode_snapshot(self.c.session(sid).snapshot())
            self.c.session(sid).close()
        for sid, (position, state, _) in seen.items():
            assert position == self.refs[sid].position, sid
            np.testing.assert_allclose(state, self.refs[sid].x, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def prop_server(toy):
    with serve(toy, max_tokens_per_request=LIMIT, max_new_tokens=MAX_NEW, max_sessions=64) as srv:
        with Client(target(srv), timeout=30) as c:
            yield srv, c


def test_random_request_sequences_agree_with_the_reference(prop_server, toy):
    srv, client = prop_server
    run_state_machine_as_test(
        lambda: ServerMachine(client, toy),
        settings=settings(
            max_examples=20,
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    assert srv.server.store.stats()["sessions"] == 0  # every example closed its sessions
