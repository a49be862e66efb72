"""examples/stream_client.py against in-process servers of hand-built toy models: it closes
every session it makes, sends the bearer token from SSMSTREAM_TOKEN, and on a values model
streams a sine wave over all d_input channels through one session's state (its outputs
recomputed here with the toy's float64 reference recurrence)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scripts import load_script

grpc_helpers = load_script("tests/runtime/grpc_helpers.py")


@pytest.fixture(scope="module")
def sc():
    return load_script("examples/stream_client.py")


def test_token_model_session_and_fork_are_closed(sc, byte_toy, capsys):
    """After the two continuations no session is left open on the server."""
    with grpc_helpers.serve(byte_toy["model_dir"]) as srv:
        assert sc.main(["abc", "--server", grpc_helpers.target(srv),
                        "--max-new-tokens", "2"]) == 0  # fmt: skip
        stats = srv.server.store.stats()
        assert (stats["created"], stats["forked"]) == (1, 1)
        assert len(srv.server.store) == 0
    assert capsys.readouterr().out.count("--- ") == 2


def test_values_model_streams_all_channels_through_one_state(sc, values_toy, caplog):
    """32 samples of sin(0.3 t) on every input channel, fed in order through one state:
    each logged output equals the reference recurrence's; the session is then closed."""
    caplog.set_level("INFO", logger="stream_client")
    with grpc_helpers.serve(values_toy["model_dir"]) as srv:
        assert sc.main(["--server", grpc_helpers.target(srv)]) == 0
        assert len(srv.server.store) == 0
    rows = [r.args for r in caplog.records if r.getMessage().startswith("t=")]
    assert [t for t, _, _ in rows] == list(range(32))
    u = np.array([[math.sin(0.3 * t)] * 3 for t in range(32)])[None]  # [1, 32, 3]
    want, _ = values_toy["reference"](u, np.zeros((1, values_toy["S"])))  # [1, 32, 5]
    got = np.array([[float(v) for v in y.split(", ")] for _, _, y in rows])  # [32, 5], 3 decimals
    np.testing.assert_allclose(got, want[0], atol=1.5e-3, rtol=0)
    np.testing.assert_allclose([u0 for _, u0, _ in rows], u[0, :, 0], rtol=0, atol=1e-12)


def test_bearer_token_comes_from_the_environment(sc, byte_toy, monkeypatch, tmp_path, capsys):
    """A server that requires a bearer token accepts the one in SSMSTREAM_TOKEN."""

    tokens = tmp_path / "tokens"
    tokens.write_text("tok-0123456789abcdef alice\n")
    with grpc_helpers.serve(byte_toy["model_dir"], auth_tokens=str(tokens)) as srv:
        argv = ["ab", "--server", grpc_helpers.target(srv), "--max-new-tokens", "2"]
        monkeypatch.delenv("SSMSTREAM_TOKEN", raising=False)
        assert sc.main(argv) == 1  # one line, no traceback
        assert capsys.readouterr().err.startswith("stream_client.py: UNAUTHENTICATED: ")
        monkeypatch.setenv("SSMSTREAM_TOKEN", "tok-0123456789abcdef")
        assert sc.main(argv) == 0
    assert "--- fork " in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--max-new-tokens", "0", "--max-new-tokens: must be an integer in [1, "),
        ("--temperature", "-1", "--temperature: "),
        ("--seed", "-1", "--seed: "),
        ("--seed", str(2**64 - 1), "--seed: "),  # the fork's seed is one more
    ],
)
def test_a_bad_sampling_flag_is_a_usage_error_before_any_session(
    sc, byte_toy, capsys, flag, value, says
):
    with grpc_helpers.serve(byte_toy["model_dir"]) as srv:
        with pytest.raises(SystemExit) as e:
            sc.main(["abc", "--server", grpc_helpers.target(srv), flag, value])
        assert e.value.code == 2 and srv.server.store.stats()["created"] == 0
    assert says in capsys.readouterr().err


def test_sessions_are_closed_when_a_continuation_fails(sc, byte_toy, monkeypatch, capsys):
    """An error after the fork (here the second Generate) still closes both sessions, and
    is said in one line (status 1), not a traceback."""
    import grpc
    from ssmstream.runtime import client as client_mod

    class Gone(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "the server went away"

    real, calls = client_mod.ClientSession.generate, []

    def generate(self, *a, **kw):
        calls.append(self.id)
        if len(calls) == 2:
            raise Gone()
        return real(self, *a, **kw)

    monkeypatch.setattr(client_mod.ClientSession, "generate", generate)
    with grpc_helpers.serve(byte_toy["model_dir"]) as srv:
        assert sc.main(["abc", "--server", grpc_helpers.target(srv), "--max-new-tokens", "2"]) == 1
        assert capsys.readouterr().err == ("stream_client.py: UNAVAILABLE: the server went away\n")
        stats = srv.server.store.stats()
        assert (stats["created"], stats["forked"], len(srv.server.store)) == (1, 1, 0)


def test_an_unreachable_server_or_a_bad_tls_file_is_one_line(sc, tmp_path, capsys):
    assert sc.main(["abc", "--server", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.startswith("stream_client.py: UNAVAILABLE: ")
    with pytest.raises(SystemExit) as e:
        sc.main(["abc", "--tls-ca", str(tmp_path / "none.pem")])
    assert e.value.code == 2 and "root_certificates (--tls-ca): cannot read" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:  # the mTLS pair goes to the client, which needs both
        sc.main(["abc", "--tls-ca", str(tmp_path / "none.pem"), "--tls-cert", "c.pem"])
    assert e.value.code == 2 and "client_cert/client_key: give both for mTLS" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:
        sc.main(["abc", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", "k.pem"])
    assert e.value.code == 2 and "client_key (--tls-key): cannot read" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_sent_as_its_bytes(sc, byte_toy):
    # a command-line argument with a byte that is not UTF-8 arrives surrogate-escaped: it
    # had raised UnicodeEncodeError (`ssmstream generate` sends os.fsencode's bytes)
    with grpc_helpers.serve(byte_toy["model_dir"]) as srv:
        argv = ["caf\udce9", "--server", grpc_helpers.target(srv), "--max-new-tokens", "2"]
        assert sc.main(argv) == 0


def test_a_prompt_that_is_not_utf8_is_printed_replaced_not_raised(sc, byte_toy, monkeypatch):
    # the continuation was printed with the prompt's str: its lone surrogate made a UTF-8
    # stdout raise after both sessions had generated
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a UTF-8 terminal
    monkeypatch.setattr("sys.stdout", out)
    with grpc_helpers.serve(byte_toy["model_dir"]) as srv:
        argv = ["caf\udce9", "--server", grpc_helpers.target(srv), "--max-new-tokens", "2"]
        assert sc.main(argv) == 0
    out.flush()
    assert out.buffer.getvalue().count("caf\ufffd".encode()) == 2
