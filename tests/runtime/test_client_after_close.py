"""Calls made after a client's close(): every public method of both clients and of their
session and stream handles that calls the server raises grpc.RpcError CANCELLED saying the
client was closed, every time (grpc raised its own ValueError "Cannot invoke RPC on closed
channel!" or UsageError "Channel is closed."); the methods that call nothing still work.

The methods are read from the classes, so a new one fails here until it is listed. Nothing
is served: port 1 refuses, and no call reaches it."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import pytest
from ssmstream.runtime.client import (
    AsyncClient,
    AsyncClientSession,
    AsyncStreamHandle,
    Client,
    ClientSession,
    StreamHandle,
)

NOWHERE = "127.0.0.1:1"
CLIENT, STREAM = "the client was closed", "the stream's client was closed"

# method → (args, what a call after close says: None where the method calls nothing)
CALLS = {
    "client": {
        "info": ((), CLIENT),
        "create_session": ((), CLIENT),
        "restore": ((b"snapshot",), CLIENT),
        "generate": (([1],), CLIENT),
        "session": (("s-1",), None),
        "close": ((), None),
    },
    "session": {
        "step": (([1],), CLIENT),
        "stream": (([[1]],), CLIENT),
        "open_stream": ((), CLIENT),
        "generate": (([1],), CLIENT),
        "regenerate": ((0, [1]), CLIENT),
        "rewind": ((0,), CLIENT),
        "snapshot": ((), CLIENT),
        "fork": ((), CLIENT),
        "close": ((), CLIENT),
    },
    "stream": {"send": (([1],), STREAM), "close": ((), None)},
}
CLASSES = {
    "client": (Client, AsyncClient),
    "session": (ClientSession, AsyncClientSession),
    "stream": (StreamHandle, AsyncStreamHandle),
}


def _public_methods(cls) -> set[str]:
    return {n for n, v in inspect.getmembers(cls, callable) if not n.startswith("_")}


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_every_public_method_is_listed(kind):
    for cls in CLASSES[kind]:
        assert _public_methods(cls) == set(CALLS[kind]), cls.__name__


def _outcome(method, args: tuple) -> str | None:
    """What calling `method` (and taking the first item of what it returns) raised: the
    details of a CANCELLED RpcError, None where nothing was raised."""
    try:
        out = method(*args)
        if hasattr(out, "__next__"):
            next(out, None)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e
        return e.details()
    return None


async def _outcome_async(method, args: tuple) -> str | None:
    try:
        out = method(*args)
        if inspect.isawaitable(out):
            await out
        elif hasattr(out, "__anext__"):
            await anext(out, None)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e
        return e.details()
    return None


def _said(handles: dict) -> dict:
    """(kind, method) → [the first call's outcome, the second's] for every listed method."""
    return {
        (kind, name): [_outcome(getattr(handles[kind], name), args) for _ in range(2)]
        for kind, methods in CALLS.items()
        for name, (args, _) in methods.items()
    }


def _expected() -> dict:
    return {
        (kind, name): [said, said]
        for kind, methods in CALLS.items()
        for name, (_, said) in methods.items()
    }


def test_sync_calls_after_close_say_the_client_was_closed():
    c = Client(NOWHERE, timeout=5)
    s = c.session("s-1")
    handles = {"client": c, "session": s, "stream": s.open_stream()}  # opened before close
    c.close()
    assert _said(handles) == _expected()


def test_async_calls_after_close_say_the_client_was_closed():
    async def run():
        c = AsyncClient(NOWHERE, timeout=5)
        s = c.session("s-1")
        handles = {"client": c, "session": s, "stream": s.open_stream()}
        await c.close()
        said = {}
        for kind, methods in CALLS.items():
            for name, (args, _) in methods.items():
                said[kind, name] = [
                    await _outcome_async(getattr(handles[kind], name), args) for _ in range(2)
                ]
        return said

    assert asyncio.run(asyncio.wait_for(run(), 20)) == _expected()


def test_an_async_client_closed_before_any_call_opens_no_channel():
    """close() before the first call (the channel opens on first use) leaves nothing open,
    and its calls say the client was closed."""

    async def run():
        c = AsyncClient(NOWHERE, timeout=5)
        await c.close()
        return c.channel, await _outcome_async(c.info, ())

    assert asyncio.run(asyncio.wait_for(run(), 20)) == (None, CLIENT)
