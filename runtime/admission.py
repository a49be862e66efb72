"""`--max-concurrent-rpcs`: calls in flight at once, counted by an interceptor.

grpc's own `maximum_concurrent_rpcs` counts every call, so a server whose slots are taken by
open Streams refused its health Check too, and a load balancer then took a busy, healthy
server out. Here `grpc.health.v1.Health/Check` is neither counted nor refused; every other
call (this service's, reflection, health Watch) takes a slot from its start to its end, and
one past the limit gets RESOURCE_EXHAUSTED. With no limit the server has no interceptor.

A call counts from its start, also while its request is still arriving: grpc reads a unary
request whole (up to --max-message-bytes) before the method runs, so a limited call reads it
itself, as the first message of a request stream (on the wire the same call).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class RpcLimit(grpc.aio.ServerInterceptor):
    """At most `limit` calls at once (the methods in `exempt` are not counted)."""

    def __init__(
        self,
        limit: int,
        exempt: tuple[str, ...] = ("/grpc.health.v1.Health/Check",),
        on_refused: Callable[[], None] | None = None,
    ):
        self.limit, self.exempt, self.on_refused = limit, frozenset(exempt), on_refused
        self.running = 0  # changed on the event loop only

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        kind = next(k for k in _KINDS if getattr(handler, k) is not None)
        behavior = getattr(handler, kind)
        if not handler.request_streaming:  # counted before its request arrives, not after
            handler = handler._replace(request_streaming=True, **{kind: None})
            kind, behavior = f"stream_{kind.partition('_')[2]}", _reading_its_request(behavior)
        return handler._replace(**{kind: self._limited(behavior)})

    async def _enter(self, context) -> None:
        if self.running >= self.limit:
            if self.on_refused is not None:
                self.on_refused()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} calls in flight (--max-concurrent-rpcs); retry later",
            )
        self.running += 1

    def _limited(self, behavior):
        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                await self._enter(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.running -= 1

            return stream

        async def call(request, context):
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.running -= 1

        return call


def _reading_its_request(behavior):
    """A behavior of a unary-request method as one that takes the requests as a stream and
    reads the first itself (a unary client sends one; grpc ignores any more)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests, context):
            async for response in behavior(await _first(requests, context), context):
                yield response

        return stream

    async def call(requests, context):
        return await behavior(await _first(requests, context), context)

    return call


async def _first(requests, context):
    async for request in requests:
        return request
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, "request: the call ended before its request message"
    )
