"""Who is told which name: SessionService, a Python API, names its own parameters in its
errors (`ttl`, `stop`), while the gRPC server names the request's fields, which are called
`ttl_seconds` and `stop_tokens` (the same mistake, the same message otherwise). Each refusal
makes no session and leaves the existing one as it was."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_helpers import serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.auth import ANONYMOUS
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore

V = 11  # the toy model's vocabulary (tests/runtime/conftest.py)
TTL = "must be finite, in (0, 60] seconds (0: default), got -1"
STOP = f"token {V} is outside [0, vocab_size={V})"


def test_the_service_names_its_parameters(toy_tok):
    async def main():
        store = SessionStore(toy_tok.state_size, capacity=8)
        batcher = Batcher(toy_tok, store, max_batch=4, max_batch_delay=0.0)
        await batcher.start()
        svc = SessionService(toy_tok, store, batcher, ServiceLimits(max_ttl=60.0))
        try:
            s, _ = await svc.create("p", prompt=[1, 2, 3])
            state, snap = store.read(s).copy(), (await svc.snapshot("p", s.id))[0]
            refusals = [
                (lambda: svc.create("p", ttl=-1), "ttl", TTL),
                (lambda: svc.restore("p", snap, ttl=-1), "ttl", TTL),
                (lambda: anext(svc.generate("p", s.id, [4], 2, stop=[V])), "stop", STOP),
                (lambda: anext(svc.generate("p", "", [4], 2, stop=[V])), "stop", STOP),
            ]
            for call, field, words in refusals:
                with pytest.raises(InvalidInput) as e:
                    await call()
                assert (e.value.field, str(e.value)) == (field, f"{field}: {words}")
            assert len(store) == 1 and s.position == 3
            assert np.array_equal(store.read(s), state)
        finally:
            await batcher.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_server_names_the_request_fields(toy_token_model):
    with serve(toy_token_model["model_dir"], session_ttl=60.0) as srv:
        with grpc.insecure_channel(target(srv)) as channel:
            stub = pb_grpc.StreamingInferenceStub(channel)
            s = stub.CreateSession(pb.CreateSessionRequest(prompt=[1, 2, 3]))
            snap = stub.SnapshotSession(pb.SnapshotRequest(session_id=s.session_id))
            held = srv.server.store.get(s.session_id, ANONYMOUS)
            state = srv.server.store.read(held).copy()
            refusals = [
                (
                    lambda: stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=-1)),
                    "ttl_seconds",
                ),
                (
                    lambda: stub.RestoreSession(
                        pb.RestoreRequest(snapshot=snap.data, ttl_seconds=-1)
                    ),
                    "ttl_seconds",
                ),
                (
                    lambda: list(
                        stub.Generate(
                            pb.GenerateRequest(
                                session_id=s.session_id,
                                prompt=[4],
                                max_new_tokens=2,
                                stop_tokens=[V],
                            )
                        )
                    ),
                    "stop_tokens",
                ),
            ]
            for call, field in refusals:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                words = TTL if field == "ttl_seconds" else STOP
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details() == f"{field}: {words}"
            assert len(srv.server.store) == 1 and held.position == 3
            assert np.array_equal(srv.server.store.read(held), state)
