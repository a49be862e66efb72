"""runtime/status.py: grpc_errors counts each refusal in the metrics it aborts with, and
DecodeGuard guards only this service's methods (health, reflection keep their own)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from ssmstream.runtime.errors import SessionNotFound
from ssmstream.runtime.status import (
    SERVICE_NAME,
    DecodeGuard,
    Malformed,
    deadline_passed,
    end_as_expired,
    grpc_errors,
)


class Aborted(Exception):
    pass


class Context:
    def __init__(self, time_remaining=None):
        self.aborted = None
        self.left = time_remaining

    def time_remaining(self):
        return self.left

    async def abort(self, code, message):
        self.aborted = (code, message)
        raise Aborted


class Metrics:
    def __init__(self):
        self.errors = []

    def count_error(self, code: str) -> None:
        self.errors.append(code)


class Servicer:
    def __init__(self):
        self.metrics, self.ran = Metrics(), False

    @grpc_errors
    async def Snapshot(self, request, context):
        self.ran = True
        raise SessionNotFound("abc")

    @grpc_errors
    async def Generate(self, request, context):
        self.ran = True
        yield 1


def test_a_refused_call_is_counted_by_its_code():
    s, ctx = Servicer(), Context()
    with pytest.raises(Aborted):
        asyncio.run(s.Snapshot(object(), ctx))
    assert ctx.aborted[0] == grpc.StatusCode.NOT_FOUND and "abc" in ctx.aborted[1]
    assert s.metrics.errors == ["NOT_FOUND"]


def test_a_call_whose_deadline_passed_is_not_aborted_but_ends_as_grpc_ends_it():
    """A refusal of a call whose deadline passed meanwhile: a status sent now fails in
    grpc's core, which logs an ERROR with a traceback. It ends as grpc ends a call it
    cancels, counted as what the client saw."""
    s, ctx = Servicer(), Context(time_remaining=0.0)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(s.Snapshot(object(), ctx))
    assert ctx.aborted is None and s.metrics.errors == ["DEADLINE_EXCEEDED"]


class Cancelled:
    """Methods that grpc cancels (the client cancelled, or the deadline passed) while
    they wait, or that end a call whose deadline passed themselves (end_as_expired)."""

    def __init__(self):
        self.metrics = Metrics()

    @grpc_errors
    async def Unary(self, request, context):
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    @grpc_errors
    async def Streaming(self, request, context):
        yield 1
        raise asyncio.CancelledError

    @grpc_errors
    async def HandsOut(self, request, context):
        if deadline_passed(context):  # as servicer._handed_out
            end_as_expired()
        return "handed out"


@pytest.mark.parametrize(
    "left, code", [(None, "CANCELLED"), (3.0, "CANCELLED"), (0.0, "DEADLINE_EXCEEDED")]
)
@pytest.mark.parametrize("rpc", ["Unary", "Streaming"])
def test_a_call_grpc_cancels_is_counted_as_what_its_client_got(rpc, left, code):
    """A cancelled call counts as CANCELLED, or DEADLINE_EXCEEDED when its deadline passed
    (an expired call that applied its inputs was not counted at all). Nothing is aborted:
    grpc has ended the call."""
    s, ctx = Cancelled(), Context(time_remaining=left)

    async def call():
        if rpc == "Streaming":
            return [r async for r in s.Streaming(object(), ctx)]
        return await s.Unary(object(), ctx)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call())
    assert ctx.aborted is None and s.metrics.errors == [code]


def test_a_session_handed_out_after_the_deadline_counts_once():
    """end_as_expired (the servicer's _handed_out past the deadline) counts one
    DEADLINE_EXCEEDED: grpc_errors counts it, end_as_expired itself no longer does."""
    s = Cancelled()
    assert asyncio.run(s.HandsOut(object(), Context(time_remaining=1.0))) == "handed out"
    assert s.metrics.errors == []
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(s.HandsOut(object(), Context(time_remaining=0.0)))
    assert s.metrics.errors == ["DEADLINE_EXCEEDED"]


def test_a_stream_cancelled_while_grpc_writes_a_response_is_counted():
    """A real grpc.aio server; the client never reads, so the server's write of a 1 MiB
    response blocks (flow control), then cancels. The cancel lands in grpc's write, outside
    the generator, which grpc then closes (GeneratorExit, not CancelledError): counted
    CANCELLED as well."""

    class Blocked:
        def __init__(self):
            self.metrics, self.closed = Metrics(), asyncio.Event()

        @grpc_errors
        async def Gen(self, request, context):
            try:
                while True:
                    yield b"x" * (1 << 20)
            finally:
                self.closed.set()

    async def main():
        s = Blocked()
        gen = grpc.unary_stream_rpc_method_handler(
            s.Gen, request_deserializer=bytes, response_serializer=bytes
        )
        handler = grpc.method_handlers_generic_handler("t.T", {"Gen": gen})
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 24)])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            options = [("grpc.max_receive_message_length", 1 << 24)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
                call = ch.unary_stream("/t.T/Gen", request_serializer=bytes,
                                       response_deserializer=bytes)(b"")  # fmt: skip
                await asyncio.sleep(0.5)  # unread: the server's writes block
                call.cancel()
                await asyncio.wait_for(s.closed.wait(), 10)
                await asyncio.sleep(0.1)
        finally:
            await server.stop(None)
        return s.metrics.errors

    assert asyncio.run(main()) == ["CANCELLED"]


def test_a_malformed_stream_request_is_refused_before_the_method_runs_and_counted():
    s, ctx = Servicer(), Context()

    async def drain():
        return [r async for r in s.Generate(Malformed(ValueError("bad")), ctx)]

    with pytest.raises(Aborted):
        asyncio.run(drain())
    assert not s.ran
    assert ctx.aborted == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request: not a valid protobuf message of this RPC (ValueError)",
    )
    assert s.metrics.errors == ["INVALID_ARGUMENT"]


class Details:
    def __init__(self, method):
        self.method = method


def test_decode_guard_wraps_the_behaviors_of_other_services_only():
    """This service's servicer refuses a Malformed request itself (its behaviors are not
    wrapped: no cost per message); another service's (health, reflection) is refused before
    its behavior runs."""

    def deserialize(data: bytes):
        raise ValueError("not protobuf")

    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=deserialize)

    async def continuation(details):
        return handler

    guard = DecodeGuard()
    other = asyncio.run(
        guard.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))
    )
    assert other.unary_unary is not handler.unary_unary
    assert isinstance(other.request_deserializer(b"\xff"), Malformed)
    ours = asyncio.run(guard.intercept_service(continuation, Details(f"/{SERVICE_NAME}/Step")))
    assert ours is not handler and ours.unary_unary is handler.unary_unary
    placeholder = ours.request_deserializer(b"\xff")
    assert isinstance(placeholder, Malformed) and str(placeholder.error) == "not protobuf"
