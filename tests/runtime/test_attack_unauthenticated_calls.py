"""A caller without a valid token is refused before the server reads any of its request.

grpc reads a unary request whole (up to --max-message-bytes) before the method's behavior
runs. A caller that sends all of a large message but its last byte, on many calls at once,
would have the server hold that much per call until it hung up, without a token. The
refusal must come as the call starts: here the caller sends no request message at all and
never half-closes, and still gets UNAUTHENTICATED at once, on every RPC of the service."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_helpers import serve
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import Client
from ssmstream.runtime.status import SERVICE_NAME

TOKEN = "tok-alice-5d1e0c9b"
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["StreamingInference"].methods]
WAIT = 5.0  # s: the call's deadline; a refusal comes in milliseconds


@pytest.fixture(scope="module")
def auth_server(toy_token_model, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("attack_auth") / "tokens"
    tokens.write_text(f"{TOKEN} alice\n")
    with serve(toy_token_model["model_dir"], auth_tokens=str(tokens)) as srv:
        yield srv


async def _call_without_a_request(port: int, method: str, metadata) -> grpc.StatusCode:
    """Open `method` as a stream (on the wire a unary call is one too), send no message and
    keep the request side open until the call ends; its status code."""
    ended = asyncio.Event()

    async def no_requests():
        await ended.wait()
        return
        yield  # an async generator that yields nothing

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(f"/{SERVICE_NAME}/{method}")(
            no_requests(), metadata=metadata, timeout=WAIT
        )
        try:
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            ended.set()


def test_every_rpc_refuses_an_unknown_caller_before_reading_its_request(auth_server):
    callers = {"no token": (), "wrong token": (("authorization", "Bearer tok-mallory"),)}

    async def go() -> dict:
        calls = {
            (who, m): _call_without_a_request(auth_server.port, m, md)
            for who, md in callers.items()
            for m in METHODS
        }
        codes = await asyncio.gather(*calls.values())
        return dict(zip(calls, codes))

    codes = asyncio.run(go())
    assert len(METHODS) == 10
    assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED)
    with Client(f"127.0.0.1:{auth_server.port}", token=TOKEN, timeout=30) as c:
        assert c.create_session().step(tokens=[1]).position == 1  # the server serves on
