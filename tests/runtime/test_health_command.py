"""`ssmstream health`: the status a running server reports for each service, exit 0 only for
SERVING, 1 for anything else and for a server that cannot be reached, `--wait` until one
comes up, TLS, and flags that cannot be used refused naming them (2)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from grpc_helpers import make_certs, serve
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.probe import main
from ssmstream.runtime.server import BackgroundServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_each_service_of_a_serving_server(toy_token_model, capsys):
    with serve(toy_token_model["model_dir"]) as srv:
        server = ["--server", f"127.0.0.1:{srv.port}"]
        for service in ("", "ssmstream.v1.StreamingInference"):
            assert _run([*server, "--service", service], capsys) == (0, "SERVING\n", "")
        rc, out, err = _run([*server, "--service", "nope"], capsys)
        assert (rc, out) == (1, "")
        assert err == "ssmstream health: NOT_FOUND: unknown service 'nope'\n"


def test_a_server_that_is_not_there_is_unhealthy_at_once(capsys):
    t0 = time.monotonic()
    rc, out, err = _run(["--server", f"127.0.0.1:{_free_port()}"], capsys)
    assert (rc, out) == (1, "") and err.startswith("ssmstream health: UNAVAILABLE: ")
    assert time.monotonic() - t0 < 2.5  # the 3 s deadline is not waited out


def test_wait_sees_a_server_that_comes_up(toy_token_model, capsys):
    port = _free_port()
    started, stop = threading.Event(), threading.Event()

    def start_late():
        time.sleep(1.5)
        with _serving(toy_token_model, port):
            started.set()
            stop.wait(30)

    late = threading.Thread(target=start_late, daemon=True)
    late.start()
    try:
        assert _run(["--server", f"127.0.0.1:{port}"], capsys)[0] == 1  # not up yet
        t0 = time.monotonic()
        assert _run(["--server", f"127.0.0.1:{port}", "--wait", "30"], capsys)[:2] == (
            0,
            "SERVING\n",
        )
        assert started.is_set() and time.monotonic() - t0 < 10
    finally:
        stop.set()
        late.join(30)


def _serving(model: dict, port: int) -> BackgroundServer:
    cfg = ServerConfig(model_dir=str(model["model_dir"]), port=port, device="cpu", grace=0.2)
    return BackgroundServer(cfg)


def test_tls(toy_token_model, tmp_path, capsys):
    certs = make_certs(tmp_path)
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    with serve(toy_token_model["model_dir"], **tls) as srv:
        server = ["--server", f"127.0.0.1:{srv.port}"]
        assert _run([*server, "--tls-ca", str(certs.ca)], capsys) == (0, "SERVING\n", "")
        rc, _, err = _run(server, capsys)
        assert rc == 1 and err.splitlines()[1] == (
            "ssmstream health: if the server uses TLS, connect with --tls (system roots) or "
            "--tls-ca FILE"
        )


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--timeout", "0"], "--timeout: must be > 0 seconds"),
        (["--wait", "-1"], "--wait: must be >= 0 and < 1e9 seconds"),
        (["--wait", "nan"], "--wait: must be >= 0 and < 1e9 seconds"),
        (["--server", "127.0.0.1:"], "--server: no port after the ':'"),
        (["--tls-ca", ""], "--tls-ca: is empty"),
    ],
)
def test_flags_that_cannot_be_used_exit_2_naming_them(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"ssmstream health: error: {said}" in capsys.readouterr().err
