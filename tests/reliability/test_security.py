"""Security beyond tests/runtime/test_server_security.py: what one principal can learn or do
to another's sessions, per-principal limits, bearer-header variants, secrets in errors, and
TLS / mTLS failure modes with certificates generated here (openssl CLI).

Covered there (not repeated): UNAUTHENTICATED on every RPC without / with a wrong / empty
token, NOT_FOUND ("unknown") for another principal's session on Step, Stream, Generate,
SnapshotSession, ForkSession, CloseSession, health open and reflection behind auth, the
constant-time token check, TLS, plaintext-to-TLS and mTLS without a client certificate, and
no token in the in-process logs. Tokens in a subprocess server's DEBUG log: test_persistence.

Dimension letters: V vocabulary (11), S state size (8).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_helpers import make_certs
from rel_helpers import Ref, assert_matches, code_of, decode_snapshot, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.auth import TokenTable
from ssmstream.runtime.client import Client

C = grpc.StatusCode
ALICE, BOB = "tok-alice-8e1f77a2", "tok-bob-19c3b5d0"


@pytest.fixture(scope="module")
def auth_server(toy, tmp_path_factory):
    f = tmp_path_factory.mktemp("auth") / "tokens"
    f.write_text(f"{ALICE} alice\n{BOB} bob\n")
    with serve(toy, auth_tokens=str(f), max_sessions_per_principal=3, max_new_tokens=4) as srv:
        yield srv


def test_another_principal_learns_nothing_and_changes_nothing(auth_server, toy):
    t = target(auth_server)
    with Client(t, token=ALICE, timeout=30) as alice, Client(t, token=BOB, timeout=30) as bob:
        mine, ref = alice.create_session(session_id="alice-private"), Ref(toy)
        mine.step(tokens=[1, 2, 3])
        ref.feed([1, 2, 3])
        gone = alice.create_session(session_id="alice-gone")
        gone.close()
        # a closed session of alice's looks to bob like one that never existed
        code, msg = code_of(lambda: bob.session(gone.id).snapshot())
        assert code == C.NOT_FOUND and msg.endswith("(unknown)")
        # bob cannot hijack the id through fork / restore, nor stream into it
        theirs = bob.create_session()
        for fn, field in (
            (lambda: theirs.fork(new_session_id=mine.id), "new_session_id"),
            (lambda: bob.restore(theirs.snapshot(), session_id=mine.id), "session_id"),
        ):
            code, msg = code_of(fn)
            assert code == C.INVALID_ARGUMENT and msg.startswith(f"{field}:"), msg
        reqs = [pb.StepRequest(session_id=theirs.id, tokens=[4]),
                pb.StepRequest(session_id=mine.id, tokens=[5])]  # fmt: skip
        code, msg = code_of(lambda: list(bob.stub.Stream(iter(reqs), metadata=bob.metadata)))
        assert code == C.INVALID_ARGUMENT and msg.startswith("session_id:")
        # snapshot bytes are a capability: whoever holds them may restore a copy of their own
        snap = mine.snapshot()
        copy = bob.restore(snap)
        assert copy.position == 3
        copy.step(tokens=[9])  # ... which is bob's, and independent of alice's
        assert_matches(mine, ref)
        r = mine.step(tokens=[6])
        np.testing.assert_allclose(r.outputs[0], ref.feed([6])[-1], atol=1e-4)
        for s in (mine, theirs, copy):
            s.close()


def test_sessions_per_principal_limit_is_per_principal(auth_server):
    """alice at 3 sessions: every RPC that would make a 4th is RESOURCE_EXHAUSTED; bob is not
    affected; alice's sessions keep working."""
    t = target(auth_server)
    with Client(t, token=ALICE, timeout=30) as alice, Client(t, token=BOB, timeout=30) as bob:
        close_all(auth_server, alice, "alice")
        mine = [alice.create_session() for _ in range(3)]
        snap = mine[0].snapshot()
        for fn in (
            alice.create_session,
            lambda: alice.restore(snap),
            lambda: alice.create_session(snapshot=snap),
            mine[1].fork,
            lambda: list(alice.stub.Stream(iter([pb.StepRequest(tokens=[1])]),
                                           metadata=alice.metadata)),
            lambda: list(alice.generate([1], max_new_tokens=2)),
        ):  # fmt: skip
            code, msg = code_of(fn)
            assert code == C.RESOURCE_EXHAUSTED and "max_per_principal=3" in msg, msg
        theirs = bob.create_session()  # bob has his own allowance
        assert [s.step(tokens=[2]).position for s in mine] == [1, 1, 1]
        mine[2].close()
        assert alice.create_session().position == 0
        theirs.close()
        close_all(auth_server, alice, "alice")


def close_all(srv, client: Client, principal: str) -> None:
    """Close every session of `principal` (the client must be that principal's)."""
    for s in srv.server.store.sessions(principal):
        client.session(s.id).close()


@pytest.mark.parametrize(
    "header, ok",
    [
        (f"Bearer {ALICE}", True),
        (f"bearer {ALICE}", True),  # the scheme is case-insensitive (RFC 7235)
        (f"Bearer   {ALICE}  ", True),  # surrounding blanks
        (f"  Bearer {ALICE}", True),  # leading blanks: grpc passes them on
        ("Bearer", False),
        (f"Bearer {ALICE[:-1]}", False),  # a prefix of a valid token
        (f"Bearer {ALICE}x", False),
        (f"Bearer {ALICE.upper()}", False),  # tokens are case-sensitive
        (f"Token {ALICE}", False),
        (ALICE, False),
    ],
)
def test_bearer_header_variants(auth_server, header, ok):
    with grpc.insecure_channel(target(auth_server)) as ch:
        call = ch.unary_unary(
            "/ssmstream.v1.StreamingInference/GetModelInfo",
            request_serializer=pb.GetModelInfoRequest.SerializeToString,
            response_deserializer=pb.ModelInfo.FromString,
        )
        md = (("authorization", header),)
        if ok:
            assert call(pb.GetModelInfoRequest(), metadata=md, timeout=10).state_size > 0
        else:
            code, msg = code_of(lambda: call(pb.GetModelInfoRequest(), metadata=md, timeout=10))
            assert code == C.UNAUTHENTICATED and ALICE not in msg


def test_a_second_authorization_header_is_not_a_fallback(auth_server):
    """Only the first authorization entry counts: a wrong one first is refused."""
    with grpc.insecure_channel(target(auth_server)) as ch:
        call = ch.unary_unary("/ssmstream.v1.StreamingInference/GetModelInfo")
        md = (("authorization", "Bearer wrong-one"), ("authorization", f"Bearer {BOB}"))
        code, _ = code_of(lambda: call(b"", metadata=md, timeout=10))
        assert code == C.UNAUTHENTICATED


def test_token_file_errors_never_quote_a_token(tmp_path):
    secret = "s3cr3t-do-not-print-81f0"
    for text in (f"{secret} alice extra\n", f"{secret} alice\n{secret} bob\n", f"{secret}\n"):
        f = tmp_path / "tokens"
        f.write_text(text)
        with pytest.raises(ValueError) as e:
            TokenTable.from_file(f)
        assert str(e.value).startswith("auth_tokens:") and secret not in str(e.value)


# --- TLS / mTLS failure modes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls-a"))


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls-b"))  # another CA, same names


def test_tls_client_to_a_plaintext_server_fails(toy, certs):
    with serve(toy) as srv, Client(target(srv), root_certificates=certs.ca, timeout=5) as c:
        code, _ = code_of(c.info)
        assert code == C.UNAVAILABLE


def test_mtls_refuses_a_client_certificate_of_another_ca_and_still_needs_the_token(
    toy, certs, foreign_certs, tmp_path
):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n")
    tls = dict(
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
        auth_tokens=str(tokens),
    )
    with serve(toy, **tls) as srv:
        t = target(srv)
        own = dict(root_certificates=certs.ca, client_cert=certs.client_cert,
                   client_key=certs.client_key)  # fmt: skip
        foreign = dict(root_certificates=certs.ca, client_cert=foreign_certs.client_cert,
                       client_key=foreign_certs.client_key)  # fmt: skip
        with Client(t, token=ALICE, timeout=5, **foreign) as c:
            assert code_of(c.info)[0] == C.UNAVAILABLE  # handshake refused
        with Client(t, timeout=10, **own) as c:  # a valid certificate is not a login
            assert code_of(c.info)[0] == C.UNAUTHENTICATED
        with Client(t, token=ALICE, timeout=10, **own) as c:
            s = c.create_session()
            assert decode_snapshot(s.snapshot())[0] == 0 and s.close() == 0
