"""Property-based: random sequences of valid and invalid requests against a real server agree
with an in-process reference at every step.

A hypothesis state machine drives one server (token toy model; rewind window W and the
prefix cache on) through CreateSession (with and without a prompt), Step, Stream (several
requests per call), Generate (greedy: on a session, cancelled part way, or on a new session
kept or not), SnapshotSession, RestoreSession (intact or bit-flipped bytes), ForkSession,
RewindSession (`ClientSession.rewind`, `regenerate` and the bare RPC) and CloseSession on a
handful of sessions, with tokens drawn from inside and outside [0, V), lengths from 0 to
past the per-request limit, prompts that repeat or extend earlier ones, random output
selections and top-k, rewind positions ahead of the session, inside, at the edge of and
before the window (also right after another rewind and a Step), closed and unknown ids.

The model keeps, per session, the float64 numpy recurrence and the inputs since its rewind
history began (`Hist`: at 0 for a new session, at the position of a fork or a restore), from
which it recomputes the state a rewind returns to; and the prompt prefixes the server's
prefix cache holds (`CacheModel`; the cache is emptied as each example starts). For every
request it predicts the set of acceptable outcomes — success, or any of the errors that
apply (code + field) — and checks:

    success  → positions and outputs equal the reference (top-k: the reference's top set);
               a prompt's `cached_tokens` is its longest prefix the cache was given,
               cut at the prefill chunks; a session made from a prompt or rewound has the
               reference's state (the reference computes a prompt from scratch)
    an error → the session is exactly as before (the reference did not move; a refused
               rewind: the server's snapshot too)

and at the end of each example every live session's snapshot (position, state) equals the
reference, and no rewind checkpoint bytes are left once all are closed. Bounded: 60
examples of 40 steps, no deadline (a loaded 2-core machine).

Dimension letters: T inputs per request, V vocabulary (11), D output width (11), S state (8),
Q prefill chunk (4), W rewind window.
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
from rel_helpers import ATOL, RTOL, Ref, decode_snapshot, idle, serve, target, wait_until
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client
from ssmstream.runtime.prefix_cache import PrefixCache

C = grpc.StatusCode
IA, RE, NF, OOR = C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.NOT_FOUND, C.OUT_OF_RANGE
V, LIMIT, MAX_NEW, MAX_LIVE = 11, 12, 6, 8
W, Q = 10, 4  # --rewind-window (not a multiple of the chunk); the toy's prefill chunk
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
# prompts: a prefix of one of a few bases (which share prefixes too) and a few more tokens
BASES = (
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8],
    [3, 1, 4, 1, 5, 9, 0, 0, 7, 7, 1, 2],
    [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5],
)
shared_prompts = st.builds(
    lambda base, k, more: base[:k] + more,
    st.sampled_from(BASES),
    st.integers(0, LIMIT),
    st.lists(valid_token, max_size=3),
)
# a prompt: ("new", tokens), or ("again", i, cut, more): the i-th prompt (mod how many) the
# cache was given in this example, whole (cut None) or its first `cut` tokens and `more`
prompts = st.one_of(
    st.tuples(st.just("new"), st.one_of(shared_prompts, token_lists)),
    st.tuples(
        st.just("again"),
        st.integers(0, 15),
        st.one_of(st.none(), st.integers(0, LIMIT)),
        st.lists(valid_token, max_size=3),
    ),
)


class Hist(Ref):
    """A reference that also keeps what a rewind needs: the state and position its rewind
    history began at, the inputs since, and the furthest position it reached — known to
    within one input after a cut Generate (`furthest` ≤ the server's ≤ `furthest_hi`: the
    token it was feeding when the cut came, taken back, still counts)."""

    def __init__(self, toy: dict, state: np.ndarray | None = None, position: int = 0):
        super().__init__(toy, state, position)
        self.start, self.x0, self.fed = position, self.x.copy(), []
        self.furthest = self.furthest_hi = position

    def feed(self, inputs) -> np.ndarray:
        y = super().feed(inputs)
        self.fed.extend(int(t) for t in np.asarray(inputs).reshape(-1))
        self.furthest = max(self.furthest, self.position)
        self.furthest_hi = max(self.furthest_hi, self.position)
        return y

    def oldest(self) -> tuple[int, int]:
        """The earliest position a rewind may reach: W back from the furthest, not before
        the history began; (for the lowest furthest, for the highest)."""
        return max(self.start, self.furthest - W), max(self.start, self.furthest_hi - W)

    def rewind(self, position: int) -> None:
        """Back to `position`, its state recomputed from where the history began."""
        r = Ref(self.toy, self.x0, self.start)
        if position > self.start:
            r.feed(self.fed[: position - self.start])
        self.x, self.position = r.x, position
        del self.fed[position - self.start :]


class CacheModel:
    """The prompt prefixes the server's prefix cache holds (one principal, a cache too large
    to evict here, emptied as each example starts): a prompt's pieces end at the multiples of
    Q and at its end; every piece of a prompt a new session consumed is cached."""

    def __init__(self):
        self.seen: set[tuple[int, ...]] = set()
        self.given: list[list[int]] = []  # the prompts, in order

    def pick(self, drawn: tuple) -> list[int]:
        """The prompt a `prompts` draw stands for."""
        if drawn[0] == "new":
            return drawn[1]
        _, i, cut, more = drawn
        earlier = self.given[i % len(self.given)] if self.given else BASES[i % len(BASES)]
        return list(earlier) if cut is None else earlier[:cut] + more

    @staticmethod
    def ends(prompt: list[int]) -> list[int]:
        ends = list(range(Q, len(prompt) + 1, Q))
        return ends if ends and ends[-1] == len(prompt) else [*ends, len(prompt)]

    def expect(self, prompt: list[int]) -> int:
        """cached_tokens for `prompt`: its longest prefix reached through cached pieces."""
        best = 0
        for end in self.ends(prompt):
            if tuple(prompt[:end]) not in self.seen:
                break
            best = end
        return best

    def add(self, prompt: list[int]) -> None:
        self.seen.update(tuple(prompt[:end]) for end in self.ends(prompt))
        self.given.append(prompt)


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

    def __init__(self, srv, client: Client, toy: dict):
        super().__init__()
        self.srv, self.c, self.toy, self.cache = srv, client, toy, CacheModel()
        # an empty prefix cache: each example (and a replay of it) sees the same server
        svc = srv.server.service
        old = svc.prefix_cache
        svc.prefix_cache = PrefixCache(old.max_bytes, old.chunk, old.model_sha)
        self.refs: dict[str, Hist] = {}  # live session id -> reference
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

    def check_state(self, sid: str) -> None:
        """The server's snapshot of a live session has the reference's position and state."""
        req = pb.SnapshotRequest(session_id=sid)
        position, state, _ = decode_snapshot(self.c.stub.SnapshotSession(req, timeout=30).data)
        assert position == self.refs[sid].position, (sid, position, self.refs[sid].position)
        np.testing.assert_allclose(state, self.refs[sid].x, atol=ATOL, rtol=RTOL)

    def check_generated(self, rs: list, ref: Hist, logits: np.ndarray, n: int) -> None:
        """Greedy responses rs after the prompt (logits: the reference's after it); the
        reference is fed what Generate leaves fed: every generated token but the last."""
        assert len(rs) == n and [r.index for r in rs] == list(range(n))
        assert len({r.session_id for r in rs}) == 1
        for i, r in enumerate(rs):
            assert r.position == ref.position
            assert logits[r.token] >= logits.max() - 1e-4  # greedy (ties within float error)
            if i + 1 < n:  # every generated token but the last is fed
                logits = ref.feed([r.token])[-1]
        assert rs[-1].finish_reason == pb.FINISH_MAX_TOKENS

    # --- rules ---

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, named=st.booleans())
    def create(self, named):
        sid = f"prop-{len(self.refs) + len(self.closed)}-{id(self) % 9973}" if named else ""
        s = self.c.create_session(session_id=sid)
        assert s.position == 0
        self.refs[s.id] = Hist(self.toy)
        return s.id

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, prompt=prompts, named=st.booleans())
    def create_with_prompt(self, prompt, named):
        prompt = self.cache.pick(prompt)
        allowed = input_errors(prompt, "prompt") if prompt else set()  # none: a plain create
        sid = f"prop-{len(self.refs) + len(self.closed)}-{id(self) % 9973}" if named else ""
        req = pb.CreateSessionRequest(session_id=sid, prompt=prompt)
        s = self.call(lambda: self.c.stub.CreateSession(req, timeout=30), allowed)
        if s is None:
            return multiple()
        cached = self.cache.expect(prompt)
        self.cache.add(prompt)
        assert s.session_id == sid or not named
        ref = self.refs[s.session_id] = Hist(self.toy)
        if prompt:
            ref.feed(prompt)  # from scratch, whatever the cache served
        assert s.position == len(prompt)
        assert s.cached_tokens == cached <= len(prompt), (prompt, s.cached_tokens, cached)
        self.check_state(s.session_id)
        return s.session_id

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
        self.check_generated(rs, ref, ref.feed(prompt)[-1], n)
        assert rs[0].session_id == sid

    @precondition(lambda self: self.refs)
    @rule(
        sid=sessions,
        prompt=st.lists(valid_token, min_size=1, max_size=LIMIT),
        n=st.integers(2, MAX_NEW),
        k=st.integers(1, MAX_NEW - 1),
    )
    def generate_cut(self, sid, prompt, n, k):
        """A Generate on a live session, cancelled after `k` responses: the session holds
        the prompt and every token the server sent but the last — at least the k − 1 read
        (it may have sent more before the cancel reached it) — in greedy order."""
        ref = self.refs.get(sid)
        if ref is None:
            return
        req = pb.GenerateRequest(session_id=sid, prompt=prompt, max_new_tokens=n, temperature=0)
        call, got = self.c.stub.Generate(req, timeout=30), []
        for r in call:
            got.append(r)
            if len(got) == min(k, n - 1):
                break
        call.cancel()
        wait_until(lambda: idle(self.srv), what="the cut Generate to let go of its session")
        req = pb.SnapshotRequest(session_id=sid)
        position, _, _ = decode_snapshot(self.c.stub.SnapshotSession(req, timeout=30).data)
        kept = position - ref.position - len(prompt)  # generated tokens the session holds
        assert len(got) - 1 <= kept <= n - 1, (len(got), kept, n)
        logits = ref.feed(prompt)[-1]
        for i in range(kept):
            if i < len(got):
                assert got[i].position == ref.position and got[i].index == i
                assert logits[got[i].token] >= logits.max() - 1e-4  # greedy
            token = got[i].token if i < len(got) else int(np.argmax(logits))
            logits = ref.feed([token])[-1]
        if kept < n - 1:  # cut while it fed the next one, maybe: that token counts as reached
            ref.furthest_hi = max(ref.furthest_hi, ref.position + 1)
        self.check_state(sid)

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, prompt=prompts, n=st.integers(0, MAX_NEW + 1), keep=st.booleans())
    def generate_new(self, prompt, n, keep):
        """Generate on a new session: its prompt may come from the prefix cache."""
        prompt = self.cache.pick(prompt)
        allowed = input_errors(prompt, "prompt")
        if not 1 <= n <= MAX_NEW:
            allowed.add((IA, "max_new_tokens"))
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0, keep_session=keep)
        rs = self.call(lambda: list(self.c.stub.Generate(req, timeout=30)), allowed)
        if rs is None:
            return multiple()
        self.cache.add(prompt)
        ref = Hist(self.toy)
        self.check_generated(rs, ref, ref.feed(prompt)[-1], n)
        sid = rs[0].session_id
        if not keep:  # closed at the end
            code = None
            try:
                self.c.stub.SnapshotSession(pb.SnapshotRequest(session_id=sid), timeout=30)
            except grpc.RpcError as e:
                code = e.code()
            assert code == NF, sid
            return multiple()
        self.refs[sid] = ref
        self.check_state(sid)
        return sid

    def rewind_session(self, sid: str, position: int, rewind) -> None:
        """RewindSession through `rewind()` (which returns the new position): allowed inside
        the window, OUT_OF_RANGE ahead of the session or before the window (then nothing
        changes)."""
        ref = self.refs.get(sid)
        allowed = self.status_errors(sid)
        if not allowed and ref.oldest()[0] <= position < ref.oldest()[1]:  # either
            try:
                s = rewind()
            except grpc.RpcError as e:
                assert matches(e, {(OOR, "position")}), (e.code(), e.details())
                s = None
        else:
            if not allowed and not ref.oldest()[0] <= position <= ref.position:
                allowed.add((OOR, "position"))
            s = self.call(rewind, allowed)
        if s is not None:
            assert s == position
            ref.rewind(position)
        if ref is not None:  # rewound to the reference's state, or refused: unchanged
            self.check_state(sid)

    @rule(sid=sessions, back=st.integers(-3, W + 4))
    def rewind(self, sid, back):
        """`ClientSession.rewind` to `back` inputs before the session's position (negative:
        ahead of it)."""
        ref = self.refs.get(sid)
        position = max(0, (ref.position if ref else 0) - back)
        self.rewind_session(sid, position, lambda: self.c.session(sid).rewind(position))

    @rule(sid=sessions, off=st.integers(-1, 1))
    def rewind_edge(self, sid, off):
        """To `off` inputs from the window's first position (negative: before it)."""
        ref = self.refs.get(sid)
        position = max(0, (ref.oldest()[0] if ref else 0) + off)
        self.rewind_session(sid, position, lambda: self.c.session(sid).rewind(position))

    @precondition(lambda self: self.refs)
    @rule(
        sid=sessions,
        back=st.integers(0, W + 2),
        tokens=st.lists(valid_token, max_size=LIMIT),
        again=st.integers(-1, W + 2),
    )
    def rewind_step_rewind(self, sid, back, tokens, again):
        """A rewind, a Step of other inputs (none: no Step), another rewind: the second
        lands among checkpoints the first one made stale, in a window the first one must
        not have widened."""
        ref = self.refs.get(sid)
        if ref is None:
            return
        self.rewind(sid, back)
        if tokens:
            req = pb.StepRequest(session_id=sid, tokens=tokens, output=pb.OUTPUT_ALL)
            resp = self.c.stub.Step(req, timeout=30)
            want = ref.feed(tokens)
            assert resp.position == ref.position
            self.check_outputs(resp, want, pb.OUTPUT_ALL, 0)
        self.rewind(sid, again)

    @precondition(lambda self: self.refs)  # (else only the ghost could be drawn)
    @rule(
        sid=st.one_of(sessions, st.just("ghost-session")),
        position=st.one_of(st.integers(0, 5 * LIMIT), st.sampled_from([2**63, 2**64 - 1])),
    )
    def rewind_to(self, sid, position):
        """The RewindSession RPC to an absolute position."""

        def rewind():
            req = pb.RewindRequest(session_id=sid, position=position)
            s = self.c.stub.RewindSession(req, timeout=30)
            assert s.session_id == sid
            return s.position

        self.rewind_session(sid, position, rewind)

    @precondition(lambda self: self.refs)
    @rule(
        sid=sessions,
        back=st.integers(-1, W + 2),
        prompt=st.lists(valid_token, min_size=1, max_size=3),
        n=st.integers(1, MAX_NEW),
    )
    def regenerate(self, sid, back, prompt, n):
        """`ClientSession.regenerate`: a rewind, then a greedy Generate from there; a
        refused rewind generates nothing."""
        ref = self.refs.get(sid)
        if ref is None:
            return
        position = max(0, ref.position - back)
        lo, hi = ref.oldest()
        call = lambda: list(  # noqa: E731
            self.c.session(sid).regenerate(position, prompt, max_new_tokens=n, temperature=0.0)
        )
        if lo <= position < hi:  # either (see Hist)
            try:
                rs = call()
            except grpc.RpcError as e:
                assert matches(e, {(OOR, "position")}), (e.code(), e.details())
                rs = None
        else:
            allowed = set() if lo <= position <= ref.position else {(OOR, "position")}
            rs = self.call(call, allowed)
        if rs is not None:
            ref.rewind(position)
            self.check_generated(rs, ref, ref.feed(prompt)[-1], n)
        self.check_state(sid)

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
        self.refs[s.session_id] = Hist(self.toy, ref.x, ref.position)  # its history starts here
        return s.session_id

    @precondition(lambda self: len(self.refs) < MAX_LIVE)
    @rule(target=sessions, sid=sessions)
    def fork(self, sid):
        allowed = self.status_errors(sid)
        req = pb.ForkRequest(session_id=sid)
        s = self.call(lambda: self.c.stub.ForkSession(req, timeout=30), allowed)
        if s is None:
            return multiple()
        parent = self.refs[sid]
        assert s.position == parent.position
        self.refs[s.session_id] = Hist(self.toy, parent.x, parent.position)  # history from here
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
    with serve(
        toy,
        max_tokens_per_request=LIMIT,
        max_new_tokens=MAX_NEW,
        max_sessions=64,
        rewind_window=W,
        prefix_cache_mb=4.0,  # never evicts here (CacheModel)
    ) as srv:
        with Client(target(srv), timeout=30) as c:
            yield srv, c


def test_random_request_sequences_agree_with_the_reference(prop_server, toy):
    srv, client = prop_server
    assert toy["chunk"] == Q and client.info().limits.rewind_window == W
    run_state_machine_as_test(
        lambda: ServerMachine(srv, client, toy),
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    assert srv.server.store.stats()["sessions"] == 0  # every example closed its sessions
    assert srv.server.service.checkpoint_budget.used == 0  # and their rewind checkpoints
