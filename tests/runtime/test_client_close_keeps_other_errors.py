"""A sync call that fails with the server's own status while the client is being closed (from
another thread) raises that status: only a call that the close ended (CANCELLED) is said as
"the client was closed". A stream handle closed before its client keeps saying "this stream
was closed". The stub is a stand-in: no call reaches a server."""

from __future__ import annotations

import grpc
import pytest
from grpc_helpers import RpcFailure
from ssmstream.runtime.client import Client


class _ClosedWhileItFails:
    def __init__(self, client: Client, code: grpc.StatusCode):
        self.client, self.code = client, code

    def GetModelInfo(self, request, **kw):
        self.client.closed = True  # close() in another thread, before the answer arrives
        raise RpcFailure(self.code, "the server's own words")


@pytest.mark.parametrize(
    "code, said",
    [
        (grpc.StatusCode.NOT_FOUND, "the server's own words"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "the server's own words"),
        (grpc.StatusCode.CANCELLED, "the client was closed"),
    ],
    ids=["not-found", "deadline", "cancelled"],
)
def test_a_failure_during_close_keeps_its_status_unless_cancelled(code, said):
    with Client("127.0.0.1:1") as c:
        c.stub = _ClosedWhileItFails(c, code)
        with pytest.raises(grpc.RpcError) as e:
            c.info()
    assert (e.value.code(), e.value.details()) == (code, said)


class _Call:
    """A Stream call that is never answered and ends when asked."""

    def __init__(self, requests, **kw):
        self.requests = requests

    def cancel(self):
        return True

    def add_done_callback(self, callback):
        callback(self)


class _StreamStub:
    Stream = _Call


def test_a_closed_stream_handle_says_so_after_its_client_closes_too():
    """The first reason a handle ended is the one its sends are refused with."""
    c = Client("127.0.0.1:1")
    c.stub = _StreamStub()
    stream = c.session("s").open_stream()
    stream.close()
    c.close()
    with pytest.raises(grpc.RpcError) as e:
        stream.send(tokens=[1])
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.CANCELLED,
        "this stream was closed",
    )
