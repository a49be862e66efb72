"""Protobuf fuzz: arbitrary bytes as request payloads of every RPC, on a raw channel.

`channel.unary_unary / unary_stream / stream_stream` without serializers send the bytes as
they are, so the server's deserializer sees them. Two sources per RPC (hypothesis):

    random bytes          st.binary(max_size=300)
    mutated messages      a valid serialized request of that RPC with bytes flipped, cut,
                          inserted or duplicated (these decode often, into odd field values)

Whatever arrives, the call must end with OK or a documented client-error status (never
UNKNOWN / INTERNAL, never a hang), the server must log no error, stay SERVING, and a control
session that no payload names must keep exactly the reference's state.
Covered in tests/runtime (not repeated): one garbage payload each for Step, Stream, Generate
and an unknown method (test_unknown_method_and_raw_garbage_keep_the_server_healthy).

RewindSession also gets well-formed requests at random positions (in the window, before it,
ahead of the session up to 2**64 - 1, on sessions a Stream is attached to): each one leaves
the session at the reference's state where it was rewound to, or where it was.

Dimension letters: V vocabulary (11), S state size (8).
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import Ref, assert_matches, idle, serve, target, wait_until
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client

C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
ALSO_ALLOWED = {"RewindSession": {C.OUT_OF_RANGE}}  # a position ahead or outside the window
WINDOW, CHUNK = 8, 4  # the server's --rewind-window; the toy's prefill chunk
SERVICE = pb.DESCRIPTOR.services_by_name["StreamingInference"]
SEED_ID = "fuzz-seed"

SEEDS = {  # one valid request per RPC, to mutate
    "GetModelInfo": pb.GetModelInfoRequest(),
    "CreateSession": pb.CreateSessionRequest(session_id="fuzz-new", ttl_seconds=5.0),
    "CloseSession": pb.CloseSessionRequest(session_id=SEED_ID),
    "Step": pb.StepRequest(session_id=SEED_ID, tokens=[1, 2, 3], output=pb.OUTPUT_TOP_K, top_k=2),
    "Stream": pb.StepRequest(session_id=SEED_ID, tokens=[4]),
    "Generate": pb.GenerateRequest(
        session_id=SEED_ID,
        prompt=[1, 2],
        max_new_tokens=3,
        temperature=0.7,
        top_k=4,
        top_p=0.9,
        seed=5,
        stop_tokens=[3],
    ),  # fmt: skip
    "SnapshotSession": pb.SnapshotRequest(session_id=SEED_ID),
    "RestoreSession": pb.RestoreRequest(snapshot=b"SSMSNAP\0" + bytes(80), session_id="fz"),
    "ForkSession": pb.ForkRequest(session_id=SEED_ID, new_session_id="fuzz-fork"),
    "RewindSession": pb.RewindRequest(session_id=SEED_ID, position=3),
}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    b = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "set"]))
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del b[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            b += b[i : i + draw(st.integers(1, 16))]
        elif op == "set" and b:
            b[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(b)


def payloads(name: str):
    seed = SEEDS[name].SerializeToString()
    return st.one_of(st.binary(max_size=300), mutated(seed))


def raw_call(channel: grpc.Channel, name: str, messages: list[bytes]) -> grpc.StatusCode:
    m = SERVICE.methods_by_name[name]
    path = f"/{SERVICE.full_name}/{name}"
    try:
        if m.client_streaming:
            list(channel.stream_stream(path)(iter(messages), timeout=20))
        elif m.server_streaming:
            list(channel.unary_stream(path)(messages[0], timeout=20))
        else:
            channel.unary_unary(path)(messages[0], timeout=20)
    except grpc.RpcError as e:
        return e.code()
    return C.OK


@pytest.fixture(scope="module")
def fuzz_server(toy):
    kw = dict(max_new_tokens=8, max_tokens_per_request=32, max_message_bytes=64 * 1024,
              rewind_window=WINDOW)  # fmt: skip
    with serve(toy, max_sessions=4096, **kw) as srv, Client(target(srv), timeout=30) as c:
        control, ref = c.create_session(), Ref(toy)
        ref.feed([5, 6, 7])
        control.step(tokens=[5, 6, 7])
        yield srv, c, control, ref


@pytest.mark.parametrize("name", list(SEEDS))
def test_random_payloads_get_a_client_error_and_the_server_stays_healthy(name, fuzz_server, caplog):
    srv, client, control, ref = fuzz_server
    caplog.set_level(logging.WARNING)
    try:
        client.session(SEED_ID).close()  # a fresh seed session for each RPC
    except grpc.RpcError:
        pass
    client.create_session(session_id=SEED_ID, prompt=[1, 2, 3, 4, 5, 6])  # a history to rewind
    allowed = ALLOWED | ALSO_ALLOWED.get(name, set())
    seen: dict[grpc.StatusCode, int] = {}
    n_messages = st.integers(1, 3) if SERVICE.methods_by_name[name].client_streaming else st.just(1)

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.data())
    def fuzz(data):
        messages = [data.draw(payloads(name)) for _ in range(data.draw(n_messages))]
        code = raw_call(client.channel, name, messages)
        seen[code] = seen.get(code, 0) + 1
        assert code in allowed, (name, code, messages)

    fuzz()
    assert sum(seen.values()) >= 60 and set(seen) - {C.OK}, seen  # it did get refusals
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:3]]
    with grpc.insecure_channel(target(srv)) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_matches(control, ref)  # untouched by anything the fuzzer sent
    nxt = control.step(tokens=[8]).outputs[0]
    np.testing.assert_allclose(nxt, ref.feed([8])[-1], atol=1e-4, rtol=1e-4)


def _rewind_position(rng: np.random.Generator, kind: str, n: int) -> int:
    """A position of `kind` for a session at position n (see the test below)."""
    if kind == "in":
        return int(rng.integers(max(0, n - WINDOW), n, endpoint=True))
    if kind == "just before":  # where the checkpoint the window starts from still is
        return int(rng.integers(max(0, n - WINDOW - CHUNK), n - WINDOW))
    if kind == "before":
        return int(rng.integers(0, n - WINDOW))
    if kind == "ahead":
        return n + int(rng.integers(1, 4))
    if kind == "far":
        return int(rng.integers(2**63 - 1, 2**64 - 1, dtype=np.uint64, endpoint=True))
    return int(rng.integers(0, n + 3))  # attached: anywhere


def test_rewind_to_random_positions_lands_on_the_reference_or_changes_nothing(
    fuzz_server, toy, caplog
):
    """60 sessions fed random tokens in random pieces, each rewound to a random position of
    one kind in turn: in the window (the last WINDOW inputs: the state of the reference
    there), before it (OUT_OF_RANGE, also within a chunk of it, where the checkpoint the
    window starts from still is), ahead of the session or far ahead up to 2**64 - 1
    (OUT_OF_RANGE), or anywhere with a Stream attached (FAILED_PRECONDITION). A refused
    rewind changes nothing."""
    srv, client, control, ref = fuzz_server
    caplog.set_level(logging.WARNING)
    rng = np.random.default_rng(0)
    kinds = ("in", "just before", "before", "ahead", "far", "attached")
    seen: dict[tuple[str, grpc.StatusCode], int] = {}
    for i in range(60):
        kind = kinds[i % len(kinds)]
        n = int(rng.integers(WINDOW + 1 if "before" in kind else 0, 25))
        tokens = rng.integers(0, 11, n).tolist()
        position = _rewind_position(rng, kind, n)
        s, at = client.create_session(), 0
        while at < n:
            piece = int(rng.integers(1, 7))
            s.step(tokens=tokens[at : at + piece])
            at += piece
        stream = s.open_stream() if kind == "attached" else None
        if stream is not None:
            stream.send(tokens=[7])  # the session is attached to it from here
            tokens.append(7)
        try:
            s.rewind(position)
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
        finally:
            if stream is not None:
                stream.close()
        want = {"in": C.OK, "attached": C.FAILED_PRECONDITION}.get(kind, C.OUT_OF_RANGE)
        assert code == want, (kind, tokens, position, code)
        seen[kind, code] = seen.get((kind, code), 0) + 1
        expected, fed = Ref(toy), tokens[:position] if code == C.OK else tokens
        if fed:
            expected.feed(fed)
        if stream is not None:  # the closed Stream detaches soon after
            wait_until(lambda: idle(srv), what="the closed Stream to detach")
        assert_matches(s, expected)
        s.close()

    assert len(seen) == len(kinds), seen
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:3]]
    assert_matches(control, ref)
