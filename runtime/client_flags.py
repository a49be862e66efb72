"""The flags of the commands that talk to a running server (`ssmstream generate`,
`ssmstream health`): its address, TLS and a timeout, checked before any call; the Client
they make; and what to try where a connection failed as a TLS mismatch does."""

from __future__ import annotations

import argparse

import grpc

from .cli import said_of_flags
from .client import Client

# Client's TLS arguments -> the flags that give them
TLS_FLAGS = {
    "root_certificates": "--tls-ca", "client_cert": "--tls-cert", "client_key": "--tls-key"
}  # fmt: skip


def add_connection_flags(p: argparse.ArgumentParser, timeout: float, timeout_help: str) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--tls-ca", default=None, help="PEM CA to verify the server (implies TLS)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM client key (mTLS)")
    p.add_argument("--timeout", type=float, default=timeout, help=timeout_help)


def connect(a: argparse.Namespace, parser: argparse.ArgumentParser, **kw) -> Client:
    """A Client of the flags' server, or the parser's error naming the flag (exit 2) for an
    address or TLS file that cannot be used, before any call. `kw` go to Client."""
    if not a.server.isprintable():  # a control character, a lone surrogate (a codec error)
        parser.error(f"--server: not a host:port address, got {a.server!r}")
    if a.server.endswith(":"):  # an empty $PORT: grpc would take port 443
        parser.error(f"--server: no port after the ':', got {a.server!r}")
    if not a.timeout > 0:  # NaN too: every call would fail DEADLINE_EXCEEDED
        parser.error(f"--timeout: must be > 0 seconds (inf: no limit), got {a.timeout}")
    try:
        return Client(
            a.server,
            tls=a.tls,
            root_certificates=a.tls_ca,
            client_cert=a.tls_cert,
            client_key=a.tls_key,
            timeout=a.timeout if a.timeout < 1e9 else None,  # grpc takes no larger deadline
            **kw,
        )
    except ValueError as e:  # a bad TLS file or pair, named by its flag
        parser.error(said_of_flags(str(e), TLS_FLAGS))
        raise


def tls_hint(e: grpc.RpcError, a: argparse.Namespace) -> str | None:
    """What to try where a connection failed as a TLS mismatch does: grpc says "Socket
    closed" of a plaintext client that a TLS server hangs up on, and "Tls handshake failed" of
    a TLS client that reached a plaintext server, neither naming TLS as the cause."""
    details = e.details() or ""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    tls = bool(a.tls or a.tls_ca or a.tls_cert)
    if not tls and "Socket closed" in details:
        return "if the server uses TLS, connect with --tls (system roots) or --tls-ca FILE"
    if tls and "handshake failed" in details.lower():
        return (
            "the TLS handshake failed: the server may be plaintext (leave out --tls and "
            "--tls-ca), or its certificate not one --tls-ca (or the system roots) verifies"
        )
    return None
