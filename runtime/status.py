"""Runtime errors → gRPC status codes, in one place, and the guard for undecodable requests.

    InvalidInput → INVALID_ARGUMENT, SessionNotFound → NOT_FOUND, LimitExceeded →
    RESOURCE_EXHAUSTED, OutOfRange → OUT_OF_RANGE, SessionBusy / ModelError →
    FAILED_PRECONDITION, Unavailable → UNAVAILABLE, EngineFailure → INTERNAL, CorruptState →
    DATA_LOSS; anything else → INTERNAL (logged, details not sent).

`grpc_errors` wraps each servicer method; `DecodeGuard` turns request bytes that are not a
valid message into a placeholder the wrapped method refuses with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import NoReturn

import grpc
from ssmstream.protos import inference_pb2 as pb

from .errors import (
    INTERNAL_ERROR,
    CorruptState,
    EngineFailure,
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    RuntimeErrorBase,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from .service import call_time_left

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StreamingInference"].full_name

STATUS_OF = (  # first match wins (the classes are disjoint: the order is for reading)
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineFailure, grpc.StatusCode.INTERNAL),
    (CorruptState, grpc.StatusCode.DATA_LOSS),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a runtime error becomes."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_ERROR


def deadline_passed(context) -> bool:
    """The call's deadline has passed: grpc has answered DEADLINE_EXCEEDED for it, and a
    response or status sent now is dropped (a status fails in grpc's core)."""
    left = context.time_remaining()
    return left is not None and left <= 0


def end_as_expired() -> NoReturn:
    """End a call whose deadline passed as grpc ends a call it cancels (`grpc_errors`
    counts the DEADLINE_EXCEEDED its client got)."""
    raise asyncio.CancelledError


def _sees_deadline(context) -> None:
    """The service's waits see what the call's deadline leaves (a test's stand-in context
    may be None: no deadline)."""
    if context is not None:
        call_time_left.set(context.time_remaining)


def grpc_errors(method):
    """Decorator for servicer methods (coroutines or async generators): runtime errors
    end the RPC with their status code (`status_of`), anything unexpected with INTERNAL
    (logged, details not sent), and each non-OK status is counted in the metrics. A
    request that did not decode (DecodeGuard) is INVALID_ARGUMENT. A call whose deadline
    passed meanwhile ends quietly (`end_as_expired`); one that grpc cancelled (the client
    cancelled it, its deadline passed, the server stopped) counts as CANCELLED or
    DEADLINE_EXCEEDED. The service sees what the call's deadline leaves (`call_time_left`).
    """

    async def fail(self, exc: Exception, context) -> None:
        code, message = status_of(exc)
        if not isinstance(exc, RuntimeErrorBase):
            log.exception("unexpected error in %s", method.__name__)
        if deadline_passed(context):  # a status sent now fails in grpc's core (a traceback)
            cancelled(self, context)  # counted as the DEADLINE_EXCEEDED its client got
            end_as_expired()
        self.metrics.count_error(code.name)
        await context.abort(code, message)

    def cancelled(self, context) -> None:
        expired = deadline_passed(context)
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        self.metrics.count_error(code.name)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def gen(self, request, context):
            _sees_deadline(context)
            try:
                check_decoded(request)
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the latter: cancelled while grpc
                cancelled(self, context)  # wrote a response (it then closes the generator)
                raise
            except Exception as exc:
                await fail(self, exc, context)

        return gen

    @functools.wraps(method)
    async def call(self, request, context):
        _sees_deadline(context)
        try:
            check_decoded(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            cancelled(self, context)
            raise
        except Exception as exc:
            await fail(self, exc, context)

    return call


class Malformed:
    """What request bytes that are not a valid message deserialize to (see DecodeGuard)."""

    def __init__(self, error: Exception):
        self.error = error


def check_decoded(request) -> None:
    """Raise InvalidInput when `request` is a Malformed placeholder (no-op otherwise)."""
    if isinstance(request, Malformed):
        raise InvalidInput("request", _not_a_message(request))


def _not_a_message(request: Malformed) -> str:
    return f"not a valid protobuf message of this RPC ({type(request.error).__name__})"


def _guard_deserializer(deserialize):
    def guarded(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf raises DecodeError (and others on odd input)
            return Malformed(e)

    return guarded


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message become a `Malformed` placeholder, refused
    with INVALID_ARGUMENT instead of grpc's UNKNOWN and a logged traceback (an ERROR log line
    per call: the health Check needs no token). This service's servicer refuses it itself
    (`check_decoded`, via `grpc_errors` and per Stream message: its behaviors are not
    wrapped, no cost per message); the other services' behaviors (health, reflection) are
    wrapped to refuse it before they see it."""

    def __init__(self, prefix: str = f"/{SERVICE_NAME}/"):
        self.prefix = prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        handler = handler._replace(
            request_deserializer=_guard_deserializer(handler.request_deserializer)
        )
        if handler_call_details.method.startswith(self.prefix):
            return handler
        return _refusing_malformed(handler)


async def _refuse(request: Malformed, context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {_not_a_message(request)}")


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, Malformed):
            await _refuse(request, context)
        yield request


async def _result(value):
    return await value if inspect.isawaitable(value) else value


def _refusing_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (of an async servicer) with a Malformed request refused before its
    behavior runs; for streamed requests, as each arrives. A behavior that streams its
    responses is wrapped in its own style: an async generator, or a coroutine that writes
    them with context.write (grpc refuses a mix of the two)."""
    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    behavior = getattr(handler, kind)
    streamed_requests = kind.startswith("stream_")

    async def arguments(request, context):
        if streamed_requests:
            return _checked(request, context)
        if isinstance(request, Malformed):
            await _refuse(request, context)
        return request

    if kind.endswith("_stream") and inspect.isasyncgenfunction(behavior):

        async def wrapped(request, context):
            async for response in behavior(await arguments(request, context), context):
                yield response

    else:

        async def wrapped(request, context):
            return await _result(behavior(await arguments(request, context), context))

    return handler._replace(**{kind: wrapped})


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
