"""AsyncClient.close() while its calls are in flight: every call it ends raises an RpcError
(CANCELLED "the client was closed"), as the sync client's do, not asyncio.CancelledError,
which made a task nobody cancelled end as cancelled (and an asyncio.gather or TaskGroup
around it with it). A task that is itself cancelled stays cancelled. The sync client's calls
say the same (grpc said "Channel closed!"), as do calls made after close()
(test_client_after_close.py).

The stand-in server holds every call it gets until the client cancels it."""

from __future__ import annotations

import asyncio
import sys
import threading

import grpc
import pytest
from grpc_helpers import stand_in
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import AsyncClient, Client


class Holder(pb_grpc.StreamingInferenceServicer):
    """Answers no call: each waits until its client cancels it (at most 30 s)."""

    def __init__(self):
        self.arrived = threading.Semaphore(0)

    def _hold(self, request, context):
        self.arrived.release()
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "held")

    GetModelInfo = CreateSession = RestoreSession = ForkSession = _hold
    CloseSession = RewindSession = SnapshotSession = Step = _hold

    def Generate(self, request, context):
        self._hold(request, context)
        yield pb.GenerateResponse()  # not reached

    def Stream(self, request_iterator, context):
        next(request_iterator)
        self._hold(None, context)
        yield pb.StepResponse()  # not reached


@pytest.fixture(scope="module")
def holder():
    with stand_in(Holder()) as h:
        yield h


async def _first(it):
    async for r in it:
        return r


CALLS = {
    "info": lambda c, s: c.info(),
    "create_session": lambda c, s: c.create_session(),
    "restore": lambda c, s: c.restore(b"snapshot"),
    "step": lambda c, s: s.step(tokens=[1]),
    "rewind": lambda c, s: s.rewind(0),
    "snapshot": lambda c, s: s.snapshot(),
    "fork": lambda c, s: s.fork(),
    "close": lambda c, s: s.close(),
    "generate": lambda c, s: _first(s.generate([1], max_new_tokens=2)),
    "stream": lambda c, s: _first(s.stream([[1]])),
}


async def _held(holder, name):
    """A client and a task whose call `name` the server holds."""
    c = AsyncClient(holder.target, timeout=10)
    task = asyncio.ensure_future(CALLS[name](c, c.session("s-1")))
    assert await asyncio.to_thread(holder.arrived.acquire, True, 10)
    return c, task


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_call_in_flight_when_its_async_client_closes_is_cancelled_not_a_cancelled_task(
    holder, name
):
    async def run():
        c, task = await _held(holder, name)
        await c.close()
        with pytest.raises(grpc.RpcError) as e:
            await task
        return e.value.code(), e.value.details(), task.cancelled()

    got = asyncio.run(asyncio.wait_for(run(), 20))
    assert got == (grpc.StatusCode.CANCELLED, "the client was closed", False)


@pytest.mark.skipif(  # before it, a close under the call is taken as what ended it
    sys.version_info < (3, 11), reason="a task tells it is being cancelled from Python 3.11"
)
@pytest.mark.parametrize("name", ["step", "generate"])
def test_a_call_whose_task_is_cancelled_as_its_client_closes_stays_cancelled(holder, name):
    async def run():
        c, task = await _held(holder, name)
        task.cancel()
        await c.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(asyncio.wait_for(run(), 20)) is True


SYNC_CALLS = {
    "info": lambda c, s: c.info(),
    "step": lambda c, s: s.step(tokens=[1]),
    "rewind": lambda c, s: s.rewind(0),
    "generate": lambda c, s: next(s.generate([1], max_new_tokens=2)),
    "stream": lambda c, s: next(s.stream([[1]])),
}


@pytest.mark.parametrize("name", sorted(SYNC_CALLS))
def test_a_call_in_flight_when_its_sync_client_closes_says_the_client_was_closed(holder, name):
    c = Client(holder.target, timeout=10)
    said = []

    def call():
        try:
            SYNC_CALLS[name](c, c.session("s-1"))
        except grpc.RpcError as e:
            said.append((e.code(), e.details()))

    t = threading.Thread(target=call)
    t.start()
    assert holder.arrived.acquire(timeout=10)
    c.close()
    t.join(10)
    assert said == [(grpc.StatusCode.CANCELLED, "the client was closed")]
