"""HTTP/2 keepalive, as the server and the clients set it on their gRPC connections.

Each side pings its peer every `seconds` while calls are open and drops the connection when a
ping goes unanswered for `timeout`: a peer that stopped (SIGSTOP, a laptop put to sleep) or
vanished without closing its socket (a lost host, a dropped network path) still has its TCP
acknowledged, or nothing says it is gone, for hours; only pings tell. Pings continue while no
data flows (grpc's default stops after 2), and every ping gets `timeout` (grpc skips a
keepalive ping while another ping, its bandwidth probe, is in flight, whose own timeout is far
longer).
"""

from __future__ import annotations

INT32 = 2**31 - 1
MAX_SECONDS = INT32 // 1000  # about 24 days: grpc takes its times as int32 milliseconds
# the server takes a client's pings as often as every second (grpc's default is one every 5
# minutes while no data flows: a client pinging sooner was sent GOAWAY "too_many_pings")
MIN_CLIENT_PING_INTERVAL = 1.0


def keepalive_options(seconds: float, timeout: float) -> list[tuple[str, int]]:
    """grpc options: ping every `seconds` (0: never), drop the connection after `timeout`."""
    if not seconds:
        return [("grpc.keepalive_time_ms", INT32)]
    return [
        ("grpc.keepalive_time_ms", milliseconds(seconds)),
        ("grpc.keepalive_timeout_ms", milliseconds(timeout)),
        ("grpc.http2.ping_timeout_ms", milliseconds(timeout)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def milliseconds(seconds: float) -> int:
    """grpc's int milliseconds for a positive number of seconds (at least 1)."""
    return max(1, round(seconds * 1000))
