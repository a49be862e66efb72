"""The bad-input battery: every RPC × every kind of malformed request, table-driven.

For each case, a *victim* session and a *control* session are fed the same prefix; the bad
request (aimed at the victim wherever the RPC takes a session) must end with the documented
status code and a message naming the field (`field: ...`), create or remove no session,
and leave the victim exactly as the control that never saw it: the same position, the same
state (snapshot bytes decoded, compared bit for bit) and the same next output — which also
equals the float64 numpy reference of the toy model.

Already covered elsewhere (not repeated): requests after close and unknown ids on every
session RPC (tests/runtime/test_server.py::test_not_found_says_unknown_closed_or_evicted), a
snapshot taken on a real server of another model (test_snapshot_of_another_model_is_refused).

Dimension letters: T inputs per request, V vocabulary (11), S state size (8), I d_input (3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from rel_helpers import Ref, code_of, decode_snapshot, make_snapshot, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client

C = grpc.StatusCode
IA, RE = C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED
FP, NF, OR = C.FAILED_PRECONDITION, C.NOT_FOUND, C.OUT_OF_RANGE
Req = pb.StepRequest
TOP_K, NONE = pb.OUTPUT_TOP_K, pb.OUTPUT_NONE
V, LIMIT, MAX_NEW, MAX_MSG, TTL = 11, 16, 8, 16 * 1024, 60.0
I64_MAX, I64_MIN, U32_MAX = 2**63 - 1, -(2**63), 2**32 - 1
PREFIX_TOKENS = [3, 1, 4, 1, 5]  # T=5: one prefill chunk of 4 + one step
NEXT_TOKEN = 9
PREFIX_VALUES = np.linspace(-1, 1, 5 * 3, dtype=np.float32).reshape(5, 3)  # [T, I]
NEXT_VALUES = np.array([[0.25, -0.5, 0.75]], dtype=np.float32)  # [1, I]
BAD_IDS = ["bad id!", "x" * 129, "-leading-dash", "caf\u00e9", "a/b", " ", "nul\x00"]
NAN, INF = math.nan, math.inf


@dataclass
class Ctx:
    """What a case builds its request from (one victim/control pair per case)."""

    client: Client
    stub: object
    victim: str
    other: str  # another live session of the same principal
    snap: bytes  # the victim's valid snapshot
    sha: str  # this model's step sha
    S: int


@dataclass
class Case:
    name: str
    call: Callable[[Ctx], object]  # performs the bad RPC (raises grpc.RpcError)
    code: grpc.StatusCode
    field: str | None = None  # the message must start with "<field>:"
    text: str | None = None  # ... or contain this
    fed: list = dataclasses.field(default_factory=list)  # inputs the victim legitimately took first


def stream(ctx: Ctx, *reqs: pb.StepRequest) -> list:
    return list(ctx.stub.Stream(iter(reqs), timeout=10))


def step(ctx: Ctx, **kw) -> pb.StepResponse:
    kw.setdefault("session_id", ctx.victim)
    return ctx.stub.Step(Req(**kw), timeout=10)


def generate(ctx: Ctx, victim: bool = True, **kw) -> list:
    kw.setdefault("prompt", [1])
    kw.setdefault("max_new_tokens", 2)
    if victim:
        kw.setdefault("session_id", ctx.victim)
    return list(ctx.stub.Generate(pb.GenerateRequest(**kw), timeout=10))


def create(ctx: Ctx, **kw) -> pb.Session:
    return ctx.stub.CreateSession(pb.CreateSessionRequest(**kw), timeout=10)


def restore(ctx: Ctx, **kw) -> pb.Session:
    return ctx.stub.RestoreSession(pb.RestoreRequest(**kw), timeout=10)


def fork(ctx: Ctx, **kw) -> pb.Session:
    kw.setdefault("session_id", ctx.victim)
    return ctx.stub.ForkSession(pb.ForkRequest(**kw), timeout=10)


def rewind(ctx: Ctx, **kw) -> pb.Session:
    kw.setdefault("session_id", ctx.victim)
    return ctx.stub.RewindSession(pb.RewindRequest(**kw), timeout=10)


def snapshot(ctx: Ctx, session_id: str) -> pb.Snapshot:
    return ctx.stub.SnapshotSession(pb.SnapshotRequest(session_id=session_id), timeout=10)


def close(ctx: Ctx, session_id: str) -> pb.Session:
    return ctx.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=10)


def flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x10
    return bytes(b)


def state_of(ctx: Ctx) -> tuple[int, np.ndarray]:
    position, state, _ = decode_snapshot(ctx.snap)
    return position, state


# Each entry: (name, how to make the snapshot bytes from ctx, code, field or text)
BAD_SNAPSHOTS = [
    ("garbage", lambda c: b"not a snapshot at all", IA, "snapshot"),
    ("truncated", lambda c: c.snap[:-7], IA, "snapshot"),
    ("header-only", lambda c: c.snap[:30], IA, "snapshot"),
    ("bit-flipped-state", lambda c: flip(c.snap, len(c.snap) - 40), IA, "snapshot"),
    ("bit-flipped-position", lambda c: flip(c.snap, 12), IA, "snapshot"),
    ("bit-flipped-checksum", lambda c: flip(c.snap, len(c.snap) - 1), IA, "snapshot"),
    ("trailing-bytes", lambda c: make_snapshot(*state_of(c), c.sha)[:-32] + b"\0" * 4,
     IA, "snapshot"),
    ("future-version", lambda c: make_snapshot(*state_of(c), c.sha, version=3),
     IA, "snapshot"),
    ("unsigned-v1", lambda c: make_snapshot(*state_of(c), c.sha, version=1, secret=None),
     IA, "snapshot"),
    ("another-key", lambda c: make_snapshot(*state_of(c), c.sha, secret=b"k" * 32),
     IA, "snapshot"),
    ("forged-huge-state", lambda c: make_snapshot(
        5, np.full(c.S, 3e38), c.sha, secret=b"attacker-guess-key-0000"), IA, "snapshot"),
    ("another-model", lambda c: make_snapshot(*state_of(c), "f" * 64), FP,
     "another model"),
    ("wrong-state-size", lambda c: make_snapshot(5, np.zeros(c.S + 1), c.sha),
     FP, "state size"),
    ("nan-state", lambda c: make_snapshot(5, np.full(c.S, np.nan), c.sha), IA,
     "snapshot"),
    ("inf-state", lambda c: make_snapshot(5, np.full(c.S, np.inf), c.sha), IA,
     "snapshot"),
    ("position-beyond-uint64-headroom", lambda c: make_snapshot(2**64 - 1, state_of(c)[1], c.sha),
     IA, "snapshot"),
]  # fmt: skip


def _snapshot_cases() -> list[Case]:
    out = []
    for name, make, code, what in BAD_SNAPSHOTS:
        kw = {"field": what} if code == IA else {"text": what}
        out.append(
            Case(f"CreateSession-snapshot-{name}",
                 lambda c, m=make: create(c, snapshot=m(c)), code, **kw)
        )  # fmt: skip
        out.append(
            Case(f"RestoreSession-snapshot-{name}",
                 lambda c, m=make: restore(c, snapshot=m(c)), code, **kw)
        )  # fmt: skip
    return out


def _id_cases() -> list[Case]:
    """A malformed session id on every RPC that takes one."""
    out = []
    for i, bad in enumerate(BAD_IDS):
        out += [
            Case(f"Step-id{i}", lambda c, b=bad: step(c, session_id=b, tokens=[1]),
                 IA, "session_id"),
            Case(f"Stream-id{i}", lambda c, b=bad: stream(c, Req(session_id=b, tokens=[1])),
                 IA, "session_id"),
            Case(f"Generate-id{i}", lambda c, b=bad: generate(c, session_id=b),
                 IA, "session_id"),
            Case(f"CreateSession-id{i}", lambda c, b=bad: create(c, session_id=b),
                 IA, "session_id"),
            Case(f"RestoreSession-id{i}",
                 lambda c, b=bad: restore(c, snapshot=c.snap, session_id=b),
                 IA, "session_id"),
            Case(f"ForkSession-id{i}", lambda c, b=bad: fork(c, session_id=b),
                 IA, "session_id"),
            Case(f"ForkSession-new-id{i}", lambda c, b=bad: fork(c, new_session_id=b),
                 IA, "new_session_id"),
            Case(f"SnapshotSession-id{i}",
                 lambda c, b=bad: snapshot(c, b),
                 IA, "session_id"),
            Case(f"CloseSession-id{i}",
                 lambda c, b=bad: close(c, b),
                 IA, "session_id"),
        ]  # fmt: skip
    return out


TOKEN_CASES: list[Case] = [
    # --- Step ---
    Case("Step-empty-request", lambda c: c.stub.Step(Req(), timeout=10),
         IA, "session_id"),
    Case("Step-no-session-id", lambda c: step(c, session_id="", tokens=[1]),
         IA, "session_id"),
    Case("Step-no-inputs", lambda c: step(c), IA, "tokens"),
    Case("Step-token-eq-vocab", lambda c: step(c, tokens=[V]), IA, "tokens"),
    Case("Step-token-negative", lambda c: step(c, tokens=[-1]), IA, "tokens"),
    Case("Step-token-int64-max", lambda c: step(c, tokens=[I64_MAX]), IA, "tokens"),
    Case("Step-token-int64-min", lambda c: step(c, tokens=[I64_MIN]), IA, "tokens"),
    Case("Step-prefill-bad-token-in-middle", lambda c: step(c, tokens=[1, 2, 3, 4, V, 5, 6, 7, 8]),
         IA, "tokens"),
    Case("Step-prefill-int64-min-last", lambda c: step(c, tokens=[0] * 8 + [I64_MIN]),
         IA, "tokens"),
    Case("Step-values-to-token-model", lambda c: step(c, values=[0.5]), IA, "values"),
    Case("Step-tokens-and-values", lambda c: step(c, tokens=[1], values=[0.5]),
         IA, "values"),
    Case("Step-T-over-limit", lambda c: step(c, tokens=[1] * (LIMIT + 1)),
         RE, "tokens"),
    Case("Step-T-far-over-limit", lambda c: step(c, tokens=[1] * 4000),
         RE, "tokens"),
    Case("Step-oversized-message", lambda c: step(c, tokens=[1] * (MAX_MSG + 100)),
         RE, text="larger than max"),
    Case("Step-unknown-output", lambda c: step(c, tokens=[1], output=99),
         IA, "output"),
    Case("Step-negative-output", lambda c: step(c, tokens=[1], output=-1),
         IA, "output"),
    Case("Step-top-k-zero", lambda c: step(c, tokens=[1], output=TOP_K, top_k=0),
         IA, "top_k"),
    Case("Step-top-k-over-vocab", lambda c: step(c, tokens=[1], output=TOP_K, top_k=V + 1),
         IA, "top_k"),
    Case("Step-top-k-uint32-max",
         lambda c: step(c, tokens=[1], output=TOP_K, top_k=U32_MAX),
         IA, "top_k"),
    Case("Step-top-k-without-top-k-output", lambda c: step(c, tokens=[1], top_k=3),
         IA, "top_k"),
    Case("Step-top-k-with-output-none", lambda c: step(c, tokens=[1], output=NONE, top_k=2),
         IA, "top_k"),
    # --- Stream ---
    Case("Stream-first-request-empty", lambda c: stream(c, Req(session_id=c.victim)),
         IA, "tokens"),
    Case("Stream-bad-token-second-request",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[2]), Req(tokens=[V])),
         IA, "tokens", fed=[2]),
    Case("Stream-int64-min-third-request",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[2]),
                          Req(tokens=[7, 8]), Req(tokens=[I64_MIN])),
         IA, "tokens", fed=[2, 7, 8]),
    Case("Stream-switches-session",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[2]),
                          Req(session_id=c.other, tokens=[3])),
         IA, "session_id", fed=[2]),
    Case("Stream-T-over-limit",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[1] * (LIMIT + 1))),
         RE, "tokens"),
    Case("Stream-oversized-second-message",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[2]),
                          Req(tokens=[1] * (MAX_MSG + 100))),
         RE, text="larger than max", fed=[2]),
    Case("Stream-top-k-out-of-range",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[1], output=TOP_K,
                                            top_k=V + 1)),
         IA, "top_k"),
    Case("Stream-unknown-output",
         lambda c: stream(c, Req(session_id=c.victim, tokens=[1], output=5)),
         IA, "output"),
    Case("Stream-values-to-token-model",
         lambda c: stream(c, Req(session_id=c.victim, values=[1.0])),
         IA, "values"),
    Case("Stream-new-session-bad-first-request",
         lambda c: stream(c, Req(tokens=[-1])), IA, "tokens"),
    # --- Generate (on the victim; a few on a temporary session) ---
    Case("Generate-empty-request",
         lambda c: list(c.stub.Generate(pb.GenerateRequest(), timeout=10)),
         IA, "prompt"),
    Case("Generate-empty-prompt", lambda c: generate(c, prompt=[]), IA, "prompt"),
    Case("Generate-prompt-eq-vocab", lambda c: generate(c, prompt=[V]), IA, "prompt"),
    Case("Generate-prompt-negative", lambda c: generate(c, prompt=[1, -1]),
         IA, "prompt"),
    Case("Generate-prompt-int64-min", lambda c: generate(c, prompt=[I64_MIN]),
         IA, "prompt"),
    Case("Generate-prompt-int64-max-temporary", lambda c: generate(c, False, prompt=[I64_MAX]),
         IA, "prompt"),
    Case("Generate-prompt-over-limit", lambda c: generate(c, prompt=[1] * (LIMIT + 1)),
         RE, "prompt"),
    Case("Generate-oversized-message", lambda c: generate(c, prompt=[1] * (MAX_MSG + 100)),
         RE, text="larger than max"),
    Case("Generate-max-new-tokens-zero", lambda c: generate(c, max_new_tokens=0),
         IA, "max_new_tokens"),
    Case("Generate-max-new-tokens-over-limit", lambda c: generate(c, max_new_tokens=MAX_NEW + 1),
         IA, "max_new_tokens"),
    Case("Generate-max-new-tokens-uint32-max-temporary",
         lambda c: generate(c, False, max_new_tokens=U32_MAX), IA, "max_new_tokens"),
    Case("Generate-temperature-negative", lambda c: generate(c, temperature=-1.0),
         IA, "temperature"),
    Case("Generate-temperature-nan", lambda c: generate(c, temperature=NAN),
         IA, "temperature"),
    Case("Generate-temperature-inf", lambda c: generate(c, temperature=INF),
         IA, "temperature"),
    Case("Generate-top-p-negative", lambda c: generate(c, top_p=-0.5), IA, "top_p"),
    Case("Generate-top-p-over-one", lambda c: generate(c, top_p=1.5), IA, "top_p"),
    Case("Generate-top-p-nan", lambda c: generate(c, top_p=NAN), IA, "top_p"),
    Case("Generate-top-k-over-vocab", lambda c: generate(c, top_k=V + 1),
         IA, "top_k"),
    Case("Generate-stop-token-negative", lambda c: generate(c, stop_tokens=[-1]),
         IA, "stop_tokens"),
    Case("Generate-stop-token-eq-vocab-temporary", lambda c: generate(c, False, stop_tokens=[2, V]),
         IA, "stop_tokens"),
    Case("Generate-stop-tokens-over-vocab", lambda c: generate(c, stop_tokens=[1] * (V + 1)),
         IA, "stop_tokens"),
    Case("Generate-unknown-session", lambda c: generate(c, session_id="never-created"),
         NF, text="unknown"),
    # --- CreateSession / RestoreSession ---
    Case("CreateSession-id-in-use", lambda c: create(c, session_id=c.victim),
         IA, "session_id"),
    Case("CreateSession-ttl-negative", lambda c: create(c, ttl_seconds=-1.0),
         IA, "ttl_seconds"),
    Case("CreateSession-ttl-nan", lambda c: create(c, ttl_seconds=NAN),
         IA, "ttl_seconds"),
    Case("CreateSession-ttl-inf", lambda c: create(c, ttl_seconds=INF),
         IA, "ttl_seconds"),
    Case("CreateSession-ttl-over-server-ttl", lambda c: create(c, ttl_seconds=TTL + 1),
         IA, "ttl_seconds"),
    Case("CreateSession-oversized-snapshot", lambda c: create(c, snapshot=b"\0" * (MAX_MSG + 1)),
         RE, text="larger than max"),
    Case("RestoreSession-empty-request",
         lambda c: c.stub.RestoreSession(pb.RestoreRequest(), timeout=10),
         IA, "snapshot"),
    Case("RestoreSession-id-in-use", lambda c: restore(c, snapshot=c.snap, session_id=c.other),
         IA, "session_id"),
    Case("RestoreSession-ttl-negative", lambda c: restore(c, snapshot=c.snap, ttl_seconds=-5.0),
         IA, "ttl_seconds"),
    Case("RestoreSession-ttl-nan", lambda c: restore(c, snapshot=c.snap, ttl_seconds=NAN),
         IA, "ttl_seconds"),
    Case("RestoreSession-oversized", lambda c: restore(c, snapshot=b"\0" * (MAX_MSG + 1)),
         RE, text="larger than max"),
    # --- ForkSession / SnapshotSession / CloseSession ---
    Case("ForkSession-empty-request", lambda c: c.stub.ForkSession(pb.ForkRequest(), timeout=10),
         IA, "session_id"),
    Case("ForkSession-new-id-in-use", lambda c: fork(c, new_session_id=c.other),
         IA, "new_session_id"),
    Case("ForkSession-new-id-is-itself", lambda c: fork(c, new_session_id=c.victim),
         IA, "new_session_id"),
    Case("ForkSession-unknown", lambda c: fork(c, session_id="never-created"),
         NF, text="unknown"),
    Case("SnapshotSession-empty-request",
         lambda c: c.stub.SnapshotSession(pb.SnapshotRequest(), timeout=10),
         IA, "session_id"),
    Case("CloseSession-empty-request",
         lambda c: c.stub.CloseSession(pb.CloseSessionRequest(), timeout=10),
         IA, "session_id"),
    # --- RewindSession / CreateSession with a prompt ---
    Case("RewindSession-empty-request",
         lambda c: c.stub.RewindSession(pb.RewindRequest(), timeout=10), IA, "session_id"),
    Case("RewindSession-ahead", lambda c: rewind(c, position=len(PREFIX_TOKENS) + 1),
         OR, "position"),
    Case("RewindSession-uint64-max", lambda c: rewind(c, position=2**64 - 1), OR, "position"),
    Case("RewindSession-unknown", lambda c: rewind(c, session_id="never-created"),
         NF, text="unknown"),
    Case("CreateSession-prompt-out-of-range", lambda c: create(c, prompt=[1, V]), IA, "prompt"),
    Case("CreateSession-prompt-negative", lambda c: create(c, prompt=[-1]), IA, "prompt"),
    Case("CreateSession-prompt-and-snapshot", lambda c: create(c, prompt=[1], snapshot=c.snap),
         IA, "prompt"),
    Case("CreateSession-prompt-over-limit", lambda c: create(c, prompt=[1] * (LIMIT + 1)),
         RE, "prompt"),
    *_id_cases(),
    *_snapshot_cases(),
]  # fmt: skip

VALUE_CASES: list[Case] = [
    Case("values-nan", lambda c: step(c, values=[0.0, NAN, 0.0]), IA, "values"),
    Case("values-inf", lambda c: step(c, values=[INF, 0.0, 0.0]), IA, "values"),
    Case("values-minus-inf-second-row", lambda c: step(c, values=[0.0] * 3 + [0.0, 0.0, -INF]),
         IA, "values"),
    Case("values-float32-overflow", lambda c: step(c, values=[1e39, 0.0, 0.0]),
         IA, "values"),
    Case("values-wrong-length", lambda c: step(c, values=[0.1, 0.2, 0.3, 0.4]),
         IA, "values"),
    Case("values-one-short", lambda c: step(c, values=[0.1, 0.2]), IA, "values"),
    Case("values-empty", lambda c: step(c), IA, "values"),
    Case("values-tokens-to-values-model", lambda c: step(c, tokens=[1]),
         IA, "tokens"),
    Case("values-T-over-limit", lambda c: step(c, values=[0.1] * (3 * (LIMIT + 1))),
         RE, "values"),
    Case("values-top-k-output", lambda c: step(c, values=[0.1] * 3, output=TOP_K, top_k=1),
         IA, "output"),
    Case("values-oversized-message", lambda c: step(c, values=[0.5] * (MAX_MSG // 4 + 10)),
         RE, text="larger than max"),
    Case("values-Stream-nan-second-request",
         lambda c: stream(c, Req(session_id=c.victim, values=[0.1, 0.2, 0.3]),
                          Req(values=[NAN, 0.0, 0.0])),
         IA, "values", fed=[[0.1, 0.2, 0.3]]),
    Case("values-Generate", lambda c: generate(c), FP, text="token model"),
    Case("values-Generate-temporary", lambda c: generate(c, False), FP,
         text="token model"),
]  # fmt: skip


def _server_kw() -> dict:
    return dict(
        max_tokens_per_request=LIMIT,
        max_new_tokens=MAX_NEW,
        max_message_bytes=MAX_MSG,
        session_ttl=TTL,
        max_sessions=64,
    )


@pytest.fixture(scope="module")
def token_server(toy):
    with serve(toy, **_server_kw()) as srv, Client(target(srv), timeout=30) as c:
        yield srv, c


@pytest.fixture(scope="module")
def values_server(toy_values):
    with serve(toy_values, **_server_kw()) as srv, Client(target(srv), timeout=30) as c:
        yield srv, c


def run_case(case: Case, srv, client: Client, model: dict) -> None:
    tokens = model["kind"] == "tokens"
    prefix, nxt = (PREFIX_TOKENS, [NEXT_TOKEN]) if tokens else (PREFIX_VALUES, NEXT_VALUES)
    kind = "tokens" if tokens else "values"
    victim, control, other = (client.create_session() for _ in range(3))
    for s in (victim, control):
        s.step(**{kind: prefix})
    ctx = Ctx(
        client, client.stub, victim.id, other.id, victim.snapshot(),
        srv.server.engine.info["step_sha256"], model["S"],
    )  # fmt: skip
    store = srv.server.store
    sessions = store.stats()["sessions"]

    code, msg = code_of(lambda: case.call(ctx))

    assert code == case.code, (case.name, code, msg)
    if case.field is not None:
        assert msg.startswith(f"{case.field}:"), (case.name, msg)
    if case.text is not None:
        assert case.text in msg, (case.name, msg)
    assert store.stats()["sessions"] == sessions, f"{case.name}: created or removed a session"
    assert other.snapshot() and other.position == 0, f"{case.name}: touched another session"
    # the victim == a control that never saw the bad request (bit for bit) == the reference
    ref = Ref(model)
    ref.feed(prefix)
    for x in case.fed:
        control.step(**{kind: [x]})
        ref.feed([x])
    v_pos, v_state, _ = decode_snapshot(victim.snapshot())
    c_pos, c_state, _ = decode_snapshot(control.snapshot())
    assert v_pos == c_pos == ref.position, (case.name, v_pos, c_pos, ref.position)
    np.testing.assert_array_equal(v_state, c_state)
    v_next = victim.step(**{kind: nxt}).outputs[0]
    c_next = control.step(**{kind: nxt}).outputs[0]
    np.testing.assert_array_equal(v_next, c_next)
    np.testing.assert_allclose(v_next, ref.feed(nxt)[-1], atol=1e-4, rtol=1e-4)
    for s in (victim, control, other):
        s.close()


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: c.name)
def test_bad_request_on_token_model(case, token_server, toy):
    srv, client = token_server
    run_case(case, srv, client, toy)


@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: c.name)
def test_bad_request_on_values_model(case, values_server, toy_values):
    srv, client = values_server
    run_case(case, srv, client, toy_values)


def test_battery_covers_every_rpc():
    """Each RPC of the service that takes input appears in the battery."""
    from ssmstream.protos.inference_pb2 import DESCRIPTOR

    methods = {m.name for m in DESCRIPTOR.services_by_name["StreamingInference"].methods}
    covered = {c.name.split("-")[0] for c in TOKEN_CASES}
    # GetModelInfo takes no fields: only undecodable bytes can be wrong (test_fuzz.py)
    assert methods - covered == {"GetModelInfo"}, methods - covered
    assert len(TOKEN_CASES) + len(VALUE_CASES) >= 150


def test_the_guarantees_page_counts_the_cases_of_this_table():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "guarantees.md").read_text()
    t, v = len(TOKEN_CASES), len(VALUE_CASES)
    assert f"`test_bad_input.py` ({t + v} cases)" in text
    assert f"{t + v} table cases ({t} on a token model over all 9 session RPCs, {v} on a" in text
