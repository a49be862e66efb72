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
from rel_helpers import Ref, assert_matches, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client

C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
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
    kw = dict(max_new_tokens=8, max_tokens_per_request=32, max_message_bytes=64 * 1024)
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
    client.create_session(session_id=SEED_ID)
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
        assert code in ALLOWED, (name, code, messages)

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
