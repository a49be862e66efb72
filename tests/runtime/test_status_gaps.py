"""runtime/status.py: what the unit tests of grpc_errors / DecodeGuard left open — which
errors are logged, a method that aborts the RPC itself, a unary request that did not decode,
a real protobuf DecodeError, and a method the server does not have.

The fakes here stand in for grpc's servicer context; the expected status codes and
messages come from the module docstring and runtime/errors.py."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.errors import INTERNAL_ERROR, LimitExceeded
from ssmstream.runtime.status import SERVICE_NAME, DecodeGuard, Malformed, grpc_errors
from test_status import Details, Metrics


class Context:
    """Records every abort and, like grpc.aio, ends the call with grpc.aio.AbortError."""

    def __init__(self):
        self.aborts = []

    def time_remaining(self):
        return None  # no deadline

    async def abort(self, code, message):
        self.aborts.append((code, message))
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, exc=None):
        self.metrics, self.exc, self.ran = Metrics(), exc, False

    @grpc_errors
    async def Unary(self, request, context):
        self.ran = True
        if self.exc is not None:
            raise self.exc
        return "reply"

    @grpc_errors
    async def SelfAborting(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    @grpc_errors
    async def SelfAbortingStream(self, request, context):
        yield 1
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")


def _run_unary(s, name, request=None):
    ctx = Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(getattr(s, name)(object() if request is None else request, ctx))
    return ctx


def test_unexpected_errors_are_logged_and_runtime_errors_are_not(caplog):
    """A bug (KeyError) is logged with its traceback and answered INTERNAL without details; a
    deliberate refusal (LimitExceeded) is answered with its own code and not logged."""
    s = Servicer(KeyError("secret detail"))
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.status"):
        ctx = _run_unary(s, "Unary")
    assert ctx.aborts == [(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)]
    (record,) = caplog.records
    assert "Unary" in record.getMessage() and record.exc_info[0] is KeyError
    caplog.clear()
    s = Servicer(LimitExceeded("full"))
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.status"):
        ctx = _run_unary(s, "Unary")
    assert ctx.aborts == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")]
    assert caplog.records == []


def test_a_unary_method_returns_its_reply():
    """A method that succeeds answers with what it returned; nothing is counted."""
    s = Servicer()
    assert asyncio.run(s.Unary(object(), Context())) == "reply"
    assert s.metrics.errors == []


def test_a_method_that_aborts_itself_keeps_its_status(caplog):
    """A method that ends the RPC with context.abort is not turned into a second, INTERNAL
    abort (nor logged or counted as an internal error), unary and streaming alike."""
    s = Servicer()
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.status"):
        ctx = _run_unary(s, "SelfAborting")
    assert ctx.aborts == [(grpc.StatusCode.PERMISSION_DENIED, "not yours")]

    async def drain(ctx):
        return [r async for r in s.SelfAbortingStream(object(), ctx)]

    ctx = Context()
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.status"):
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(drain(ctx))
    assert ctx.aborts == [(grpc.StatusCode.PERMISSION_DENIED, "not yours")]
    assert "INTERNAL" not in s.metrics.errors and caplog.records == []


def test_a_malformed_unary_request_is_refused_before_the_method_runs():
    """A unary request that did not decode is INVALID_ARGUMENT naming the request; the
    method does not run (it would have raised its own error)."""
    s = Servicer(KeyError("would be internal"))
    ctx = _run_unary(s, "Unary", Malformed(ValueError("bad")))
    assert not s.ran
    assert ctx.aborts == [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "request: not a valid protobuf message of this RPC (ValueError)",
        )
    ]
    assert s.metrics.errors == ["INVALID_ARGUMENT"]


def test_decode_guard_turns_a_protobuf_decode_error_into_a_placeholder():
    """The real deserializer of a request message raises protobuf's DecodeError (not a
    ValueError) on truncated bytes: the guard still returns a Malformed placeholder, and
    valid bytes still decode."""
    handler = grpc.unary_unary_rpc_method_handler(
        lambda r, c: r, request_deserializer=pb.StepRequest.FromString
    )

    async def continuation(details):
        return handler

    ours = asyncio.run(
        DecodeGuard().intercept_service(continuation, Details(f"/{SERVICE_NAME}/Step"))
    )
    with pytest.raises(Exception) as raw:
        pb.StepRequest.FromString(b"\x0a\xff\xff")
    assert not isinstance(raw.value, ValueError)  # the case a ValueError-only guard misses
    placeholder = ours.request_deserializer(b"\x0a\xff\xff")
    assert isinstance(placeholder, Malformed) and type(placeholder.error) is type(raw.value)
    good = pb.StepRequest(session_id="s", tokens=[1, 2])
    assert ours.request_deserializer(good.SerializeToString()) == good


def test_decode_guard_passes_on_a_method_the_server_does_not_have():
    """No handler for the method (grpc answers UNIMPLEMENTED): the guard returns None too."""

    async def continuation(details):
        return None

    got = asyncio.run(
        DecodeGuard().intercept_service(continuation, Details(f"/{SERVICE_NAME}/Nope"))
    )
    assert got is None
