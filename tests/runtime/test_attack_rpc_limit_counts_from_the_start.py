"""--max-concurrent-rpcs counts a call from its start, also while its request is arriving.

grpc reads a unary request whole (up to --max-message-bytes) before the method runs. Counted
only from there, calls whose request never finished arriving took no slot: a client could
open any number of them, each holding up to --max-message-bytes in the server, past the
limit that was to bound the calls in flight."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_helpers import serve
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import server as server_module
from ssmstream.runtime.admission import RpcLimit
from ssmstream.runtime.status import SERVICE_NAME

LIMIT = 2
WAIT = 5.0  # s: deadline of the calls that hold a slot; a refusal comes in milliseconds


class _Kept(RpcLimit):
    """The server's RpcLimit, kept where the test can read its count."""

    made: list[RpcLimit] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made.append(self)


@pytest.fixture
def limited(toy_token_model, monkeypatch):
    monkeypatch.setattr(server_module, "RpcLimit", _Kept)
    with serve(toy_token_model["model_dir"], max_concurrent_rpcs=LIMIT) as srv:
        yield srv, _Kept.made[-1]


async def _code(call) -> grpc.StatusCode:
    try:
        await call
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


def test_calls_whose_request_has_not_arrived_take_their_slots(limited):
    srv, limit = limited

    async def go() -> tuple:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            release = asyncio.Event()

            async def unfinished_request():  # no message, and the request side stays open
                await release.wait()
                return
                yield

            holders = [
                asyncio.ensure_future(
                    _code(
                        ch.stream_unary(f"/{SERVICE_NAME}/{m}")(unfinished_request(), timeout=WAIT)
                    )
                )
                for m in ("Step", "CreateSession")
            ]
            await asyncio.sleep(0.3)  # both calls have started on the server
            info = ch.unary_unary(
                f"/{SERVICE_NAME}/GetModelInfo",
                request_serializer=pb.GetModelInfoRequest.SerializeToString,
                response_deserializer=pb.ModelInfo.FromString,
            )
            while_held = await _code(info(pb.GetModelInfoRequest(), timeout=WAIT))
            release.set()  # the holders' requests end without a message
            held = await asyncio.gather(*holders)
            after = await _code(info(pb.GetModelInfoRequest(), timeout=WAIT))
            return while_held, held, after

    while_held, held, after = asyncio.run(go())
    assert while_held == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a call that ends without its request message is refused, and gives its slot back
    assert held == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert after == grpc.StatusCode.OK
    assert srv.call(_running(limit)) == 0  # read on the server's loop, which changes it


async def _running(limit: RpcLimit) -> int:
    return limit.running
