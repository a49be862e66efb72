"""Connections both ends watch: a frozen client's calls end (the server's --keepalive), a
frozen server's end at the client (Client(keepalive=...)), the server takes the clients'
pings, and a connection with no calls is closed after --max-connection-idle (clients
reconnect).

A peer that stops without closing its socket (SIGSTOP here; a laptop put to sleep, a
partitioned network) answers no HTTP/2 ping, while its kernel still acknowledges TCP: only
pings tell. A frozen client's open Stream held its session's attachment and an RPC slot; a
client's Stream to a frozen server waited for its answer forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_helpers import ServerProcess, serve, target
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
                deadline = time.monotonic() + (4 if keepalive else 2)  # (pings: ~1 s)
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


def test_connection_options_say_what_the_flags_say():
    c = ServerConfig(model_dir="m", keepalive=2.5, keepalive_timeout=0.25, max_connection_idle=0)
    assert dict(connection_options(c)) == {
        "grpc.keepalive_time_ms": 2500,
        "grpc.keepalive_timeout_ms": 250,
        "grpc.http2.ping_timeout_ms": 250,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.http2.min_ping_interval_without_data_ms": 1000,
    }
    off = ServerConfig(model_dir="m", keepalive=0, max_connection_idle=90)
    assert dict(connection_options(off)) == {
        "grpc.keepalive_time_ms": 2**31 - 1,
        "grpc.http2.min_ping_interval_without_data_ms": 1000,
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


@pytest.mark.parametrize("keepalive", [1.0, 0], ids=["pings", "no-pings"])
def test_a_stream_to_a_frozen_server_ends_at_the_client(toy_token_model, tmp_path, keepalive):
    server = ServerProcess(toy_token_model["model_dir"], "--device", "cpu", workdir=tmp_path)
    try:
        with Client(server.address, keepalive=keepalive, keepalive_timeout=0.5) as c:
            stream = c.create_session().open_stream()
            assert stream.send(tokens=[1]).position == 1
            os.kill(server.proc.pid, signal.SIGSTOP)
            failed: list[grpc.RpcError] = []

            def send():
                try:
                    stream.send(tokens=[2])
                except grpc.RpcError as e:
                    failed.append(e)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(5 if keepalive else 2)  # (pings: ~1 s)
            if not keepalive:  # nothing watches the connection: the send still waits
                assert sender.is_alive()
                return
            assert not sender.is_alive() and failed
            assert failed[0].code() == grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()


def test_the_server_takes_a_clients_pings_on_a_quiet_stream(toy_token_model):
    """A client pinging every second while its Stream is quiet is not sent GOAWAY
    ("too_many_pings", after 2 pings within grpc's default 5 minutes)."""
    with serve(toy_token_model["model_dir"]) as srv:
        with Client(target(srv), keepalive=1.0) as c:
            with c.create_session().open_stream() as stream:
                assert stream.send(tokens=[1]).position == 1
                time.sleep(4.5)  # 4 pings, no data
                assert stream.send(tokens=[2]).position == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keepalive": 0.5}, "keepalive: must be 0 (no pings) or in [1, 2147483] seconds, got 0.5"),
        ({"keepalive": -1}, "keepalive: must be 0 (no pings) or in [1, 2147483] seconds"),
        ({"keepalive": "30"}, "keepalive: must be a number"),
        ({"keepalive_timeout": 0}, "keepalive_timeout: must be in [0.001, 2147483] seconds"),
    ],
)
def test_a_clients_bad_keepalive_names_the_argument(kwargs, message):
    with pytest.raises(ValueError) as e:
        Client("127.0.0.1:1", **kwargs)
    assert str(e.value).startswith(message)
