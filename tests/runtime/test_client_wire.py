"""The client against a stand-in server that records what reaches it: every call about a
session carries `x-session-id: <id>` (the header a sticky proxy hashes), in both clients;
an async stream that ends without a response, a client closed under a send and a task
cancelled while its handle closes each end a send as they say.

The stand-in answers each call at once (a Stream request with one response), except a
Stream of the session "hold" (its first request is never answered) and of "end" (the
server ends the Stream after its first request, with no response)."""

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


class Recorder(pb_grpc.StreamingInferenceServicer):
    """Records (method, x-session-id or None) of every call; answers with the ids asked."""

    def __init__(self):
        self.calls: list[tuple[str, str | None]] = []
        self.held = threading.Event()  # a "hold" or "end" Stream got its first request

    def _note(self, method: str, context) -> None:
        self.calls.append((method, dict(context.invocation_metadata()).get("x-session-id")))

    def GetModelInfo(self, request, context):
        self._note("GetModelInfo", context)
        return pb.ModelInfo()

    def CreateSession(self, request, context):
        self._note("CreateSession", context)
        return pb.Session(session_id=request.session_id)

    def RestoreSession(self, request, context):
        self._note("RestoreSession", context)
        return pb.Session(session_id=request.session_id)

    def ForkSession(self, request, context):
        self._note("ForkSession", context)
        return pb.Session(session_id=request.new_session_id)

    def CloseSession(self, request, context):
        self._note("CloseSession", context)
        return pb.Session(session_id=request.session_id)

    def RewindSession(self, request, context):
        self._note("RewindSession", context)
        return pb.Session(session_id=request.session_id, position=request.position)

    def SnapshotSession(self, request, context):
        self._note("SnapshotSession", context)
        return pb.Snapshot(session_id=request.session_id, data=b"snap")

    def Step(self, request, context):
        self._note("Step", context)
        return pb.StepResponse(session_id=request.session_id, position=len(request.tokens))

    def Generate(self, request, context):
        self._note("Generate", context)
        yield pb.GenerateResponse(session_id=request.session_id, token=1, position=1)

    def Stream(self, request_iterator, context):
        self._note("Stream", context)
        for req in request_iterator:
            if req.session_id in ("hold", "end"):
                self.held.set()
                if req.session_id == "end":
                    return  # OK, with no response
                ended = threading.Event()
                context.add_callback(ended.set)
                ended.wait(30)  # until the client cancels the call
                return
            yield pb.StepResponse(session_id=req.session_id, position=len(req.tokens))


@pytest.fixture
def recorder():
    with stand_in(Recorder(), workers=8) as rec:
        yield rec


# what each call sends as x-session-id: the id of the session it is about (a fork: its source)
EXPECTED = [
    ("CreateSession", "s-1"),
    ("Step", "s-1"),
    ("Stream", "s-1"),  # stream()
    ("Stream", "s-1"),  # open_stream()
    ("Generate", "s-1"),
    ("RewindSession", "s-1"),
    ("SnapshotSession", "s-1"),
    ("ForkSession", "s-1"),
    ("RestoreSession", "s-3"),
    ("CloseSession", "s-1"),
    ("GetModelInfo", None),  # about no session
]


def test_every_call_about_a_session_sends_its_id_for_the_sticky_proxy(recorder):
    with Client(recorder.target, timeout=10) as c:
        s = c.create_session(session_id="s-1")
        s.step(tokens=[1])
        assert [r.position for r in s.stream([[1, 2]])] == [2]
        with s.open_stream() as h:
            assert h.send(tokens=[1]).position == 1
        assert len(list(s.generate([1], max_new_tokens=1))) == 1
        s.rewind(0)
        s.snapshot()
        assert s.fork("s-2").id == "s-2"
        assert c.restore(b"snap", session_id="s-3").id == "s-3"
        s.close()
        c.info()
    assert recorder.calls == EXPECTED


def test_every_call_about_a_session_sends_its_id_for_the_sticky_proxy_async(recorder):
    async def run():
        async with AsyncClient(recorder.target, timeout=10) as c:
            s = await c.create_session(session_id="s-1")
            await s.step(tokens=[1])
            assert [r.position async for r in s.stream([[1, 2]])] == [2]
            async with s.open_stream() as h:
                assert (await h.send(tokens=[1])).position == 1
            assert len([r async for r in s.generate([1], max_new_tokens=1)]) == 1
            await s.rewind(0)
            await s.snapshot()
            assert (await s.fork("s-2")).id == "s-2"
            assert (await c.restore(b"snap", session_id="s-3")).id == "s-3"
            await s.close()
            await c.info()

    asyncio.run(asyncio.wait_for(run(), 30))
    assert recorder.calls == EXPECTED


def test_an_async_stream_the_server_ends_without_a_response_is_a_usage_error(recorder):
    async def run():
        async with AsyncClient(recorder.target, timeout=10) as c:
            async with c.session("end").open_stream() as h:
                with pytest.raises(grpc.aio.UsageError, match="^stream ended without a response$"):
                    await h.send(tokens=[1])

    asyncio.run(asyncio.wait_for(run(), 30))


async def _send_held(c: AsyncClient, recorder: Recorder):
    """A handle, and a task whose send the server has received and will never answer."""
    h = c.session("hold").open_stream()
    task = asyncio.ensure_future(h.send(tokens=[1]))
    assert await asyncio.to_thread(recorder.held.wait, 10)
    return h, task


def test_an_async_send_in_flight_when_its_client_closes_says_the_client_was_closed(recorder):
    """Not asyncio.CancelledError (a task cancelled though nothing cancelled it)."""

    async def run():
        c = AsyncClient(recorder.target, timeout=10)
        _, task = await _send_held(c, recorder)
        await c.close()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await task
        return e.value.code(), e.value.details(), task.cancelled()

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == (grpc.StatusCode.CANCELLED, "the stream's client was closed", False)


@pytest.mark.skipif(  # before it, a close under the call is taken as what ended it
    sys.version_info < (3, 11), reason="a task tells it is being cancelled from Python 3.11"
)
def test_a_send_whose_task_is_cancelled_as_its_handle_closes_stays_cancelled(recorder):
    """The task was cancelled: that wins over the close under it (an RpcError would be
    raised into a task its owner cancelled)."""

    async def run():
        async with AsyncClient(recorder.target, timeout=10) as c:
            h, task = await _send_held(c, recorder)
            task.cancel()
            await h.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            return task.cancelled()

    assert asyncio.run(asyncio.wait_for(run(), 30)) is True


def test_an_async_close_under_a_call_that_is_ending_still_ends_it(recorder):
    """A send's task cancelled just before its handle closes: grpc may be ending the call as
    close() half-closes it, and refuse the half-close (its ExecuteBatchError), which close()
    raised instead of ending the stream."""
    from grpc._cython import cygrpc

    async def run():
        async with AsyncClient(recorder.target, timeout=10) as c:
            h, task = await _send_held(c, recorder)

            async def refused():
                raise cygrpc.ExecuteBatchError('Failed "execute_batch"')

            h._call.done_writing = refused
            task.cancel()
            await h.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            return h._call.cancelled()

    assert asyncio.run(asyncio.wait_for(run(), 30)) is True


def test_an_async_send_after_its_client_closed_says_the_client_was_closed(recorder):
    """Not "cancelled by an earlier send's cancellation": no send was cancelled."""

    async def run():
        c = AsyncClient(recorder.target, timeout=10)
        h = c.session("s-1").open_stream()
        assert (await h.send(tokens=[1, 2])).position == 2
        await c.close()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.send(tokens=[3])
        return e.value.code(), e.value.details()

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == (grpc.StatusCode.CANCELLED, "the stream's client was closed")
