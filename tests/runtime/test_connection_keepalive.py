"""Connections the server watches: a frozen client's calls end (--keepalive), and a
connection with no calls is closed after --max-connection-idle (clients reconnect).

A client that stops without closing its socket (SIGSTOP here; a laptop put to sleep, a
partitioned network) answers no HTTP/2 ping, while its kernel still acknowledges TCP: only
the server's pings tell. Its open Stream held the session's attachment and an RPC slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import connection_options

FROZEN_CLIENT = """
import sys, time
from ssmstream.runtime.client import Client
with Client(sys.argv[1], timeout=10) as c:
    s = c.create_session(session_id="frozen")
    stream = s.open_stream()
    stream.send(tokens=[1])
    print("attached", flush=True)
    time.sleep(60)
"""


def _refused(c: Client) -> bool:
    """Whether a call is refused for --max-concurrent-rpcs (the frozen Stream holds it)."""
    try:
        c.info()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        return True
    return False


@pytest.mark.parametrize("keepalive", [0.5, 0], ids=["pings", "no-pings"])
def test_a_frozen_clients_stream_ends_and_frees_its_session(toy_token_model, keepalive):
    with serve(
        toy_token_model["model_dir"], keepalive=keepalive, keepalive_timeout=0.5,
        max_concurrent_rpcs=1,
    ) as srv:  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-c", FROZEN_CLIENT, target(srv)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline() == "attached\n"
            os.kill(proc.pid, signal.SIGSTOP)
            with Client(target(srv), timeout=5) as c:
                deadline = time.monotonic() + 4
                while _refused(c) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not keepalive:  # nothing watches the connection: the slot stays taken
                    assert _refused(c)
                    return
                assert not _refused(c)
                s = c.session("frozen", position=1)  # detached: a Stream may attach again
                with s.open_stream() as stream:
                    assert stream.send(tokens=[2]).position == 2
        finally:
            proc.kill()
            proc.wait(10)


def test_a_connection_without_calls_is_closed_and_the_client_reconnects(toy_token_model):
    with serve(toy_token_model["model_dir"], max_connection_idle=0.3) as srv:
        with Client(target(srv), timeout=5) as c:
            s = c.create_session()
            assert s.step(tokens=[1]).position == 1
            states: list[grpc.ChannelConnectivity] = []
            c.channel.subscribe(states.append)
            time.sleep(1.0)
            assert states[0] == grpc.ChannelConnectivity.READY
            assert states[-1] == grpc.ChannelConnectivity.IDLE  # the server closed it
            assert s.step(tokens=[2]).position == 2  # a new connection, the same session
            assert states[-1] == grpc.ChannelConnectivity.READY


def test_connection_options_say_what_the_flags_say():
    c = ServerConfig(model_dir="m", keepalive=2.5, keepalive_timeout=0.25, max_connection_idle=0)
    assert dict(connection_options(c)) == {
        "grpc.keepalive_time_ms": 2500,
        "grpc.keepalive_timeout_ms": 250,
        "grpc.http2.ping_timeout_ms": 250,
        "grpc.http2.max_pings_without_data": 0,
    }
    off = ServerConfig(model_dir="m", keepalive=0, max_connection_idle=90)
    assert dict(connection_options(off)) == {
        "grpc.keepalive_time_ms": 2**31 - 1,
        "grpc.max_connection_idle_ms": 90_000,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keepalive": -1}, "keepalive: must be 0 or in [0.001, 2147483] seconds, got -1"),
        ({"keepalive": 0.0001}, "keepalive: must be 0 or in [0.001, 2147483] seconds"),
        ({"keepalive": float("nan")}, "keepalive: must be 0 or in"),
        ({"keepalive_timeout": 0}, "keepalive_timeout: must be in [0.001, 2147483] seconds"),
        ({"max_connection_idle": 1e7}, "max_connection_idle: must be 0 or in"),
        ({"max_connection_idle": True}, "max_connection_idle: must be 0 or in"),
    ],
)
def test_bad_connection_times_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as e:
        ServerConfig(model_dir="m", **kwargs)
    assert str(e.value).startswith(message)
