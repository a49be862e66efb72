"""`ssmstream health`: ask a running server whether it is serving (grpc.health.v1 Check),
for container health checks and scripts that wait for a server to come up.

Prints the status (SERVING, NOT_SERVING) and exits 0 only for SERVING; 1 for any other
answer, an unknown --service, or a server that cannot be reached (Docker reads 1 as
unhealthy); 2 for a flag that cannot be used. `--wait SECONDS` asks again until the server
is serving or the time is up. The Check needs no token.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .cli import HelpFormatter
from .client_flags import add_connection_flags, connect, tls_hint

SERVING = health_pb2.HealthCheckResponse.SERVING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream health",
        description=(
            "Ask a running `ssmstream serve` whether it is serving (grpc.health.v1 Check, no "
            "token needed): prints the status; exit status 0 when SERVING, 1 otherwise or when "
            "the server cannot be reached."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--service",
        default="",
        help="the service to ask about: '' (the server), ssmstream.v1.StreamingInference, "
        "or ssmstream.StateStore (the shared store's connection)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask again until the server is serving or this many seconds have passed",
    )
    add_connection_flags(p, 3.0, "seconds each Check may take")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not 0 <= a.wait < 1e9:  # NaN too
        parser.error(f"--wait: must be >= 0 and < 1e9 seconds, got {a.wait}")
    # a refused connection is retried after 0.1-0.5 s, not grpc's backoff of 1 s growing to 2
    # minutes: --wait sees a server that comes up when it comes up
    backoff = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with connect(a, parser, keepalive=0, options=backoff) as client:
        stub = health_pb2_grpc.HealthStub(client.channel)
        end = time.monotonic() + a.wait
        while True:
            said, serving = _ask(stub, a)
            if serving or time.monotonic() >= end:
                break
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    if serving:
        print(said)
        return 0
    sys.stderr.write("".join(f"ssmstream health: {line}\n" for line in said.splitlines()))
    return 1


def _ask(stub, a: argparse.Namespace) -> tuple[str, bool]:
    """(what to print, whether SERVING) of one Check."""
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout)
    except grpc.RpcError as e:
        hint = tls_hint(e, a)
        return f"{e.code().name}: {e.details()}" + (f"\n{hint}" if hint else ""), False
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), r.status == SERVING


if __name__ == "__main__":
    sys.exit(main())
