"""The connection flags of `ssmstream generate` and `ssmstream health` as the Client they make
takes them (no call is made: nothing listens on port 1), and the TLS hint, which is said
only of the UNAVAILABLE failures a TLS mismatch gives."""

from __future__ import annotations

import grpc
import pytest
from grpc_helpers import RpcFailure
from ssmstream.runtime.client_flags import add_connection_flags, connect, tls_hint


def _parsed(*argv):
    p = __import__("argparse").ArgumentParser()
    add_connection_flags(p, 3.0, "seconds")
    return p.parse_args(["--server", "127.0.0.1:1", *argv]), p


@pytest.mark.parametrize("argv, tls", [((), False), (("--tls",), True)], ids=["plain", "tls"])
def test_tls_flag_reaches_the_client(argv, tls):
    a, p = _parsed(*argv)
    with connect(a, p) as c:
        assert (c.credentials is not None) is tls
        assert c.timeout == 3.0


@pytest.mark.parametrize(
    "code, details, argv",
    [
        (grpc.StatusCode.INTERNAL, "Socket closed", ()),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Socket closed", ()),
        (grpc.StatusCode.INTERNAL, "Tls handshake failed", ("--tls",)),
    ],
    ids=["internal-plain", "deadline-plain", "internal-tls"],
)
def test_no_tls_hint_for_a_failure_that_is_not_unavailable(code, details, argv):
    a, _ = _parsed(*argv)
    assert tls_hint(RpcFailure(code, details), a) is None
    hint = tls_hint(RpcFailure(grpc.StatusCode.UNAVAILABLE, details), a)
    assert hint is not None and "TLS" in hint


@pytest.mark.parametrize("argv", [("--tls-ca", "ca.pem"), ("--tls-cert", "c.pem")], ids=str)
def test_a_certificate_flag_alone_counts_as_tls_for_the_hint(argv):
    a, _ = _parsed(*argv)
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert tls_hint(RpcFailure(unavailable, "Socket closed"), a) is None
    hint = tls_hint(RpcFailure(unavailable, "Ssl handshake failed: x"), a)
    assert hint is not None and hint.startswith("the TLS handshake failed")


def test_a_handshake_failure_said_in_capitals_still_gets_the_hint():
    a, _ = _parsed("--tls")
    details = "Handshake failed with fatal error SSL_ERROR_SSL"
    hint = tls_hint(RpcFailure(grpc.StatusCode.UNAVAILABLE, details), a)
    assert hint is not None and hint.startswith("the TLS handshake failed")


def test_the_default_server_is_the_local_default_port():
    p = __import__("argparse").ArgumentParser()
    add_connection_flags(p, 3.0, "seconds")
    a = p.parse_args([])
    assert (a.server, a.tls, a.tls_ca, a.tls_cert, a.tls_key) == (
        "127.0.0.1:50051",
        False,
        None,
        None,
        None,
    )
