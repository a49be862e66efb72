"""Helpers of the gRPC tests (tests/runtime/test_server*.py, test_client*.py): certificates
made with the openssl CLI, a server in this process or a subprocess that reports its port, a
stand-in servicer served for client tests, a metrics scrape."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.auth import ANONYMOUS
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import BackgroundServer


class RpcFailure(grpc.RpcError):
    """A call's failure as grpc raises it: code() and details() (None: a status without a
    message)."""

    def __init__(self, code: grpc.StatusCode, details: str | None = None):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def serve(model_dir, **kw) -> BackgroundServer:
    """A server in this process (CPU, port 0, short grace); use it as a context manager."""
    cfg = ServerConfig(model_dir=str(model_dir), port=0, device="cpu", grace=0.2, **kw)
    return BackgroundServer(cfg)


@contextmanager
def stand_in(servicer, workers: int = 4) -> Iterator:
    """Serve `servicer` (a stand-in for the server's, for client tests) on 127.0.0.1; sets
    its `target`. Stopped at the end."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_StreamingInferenceServicer_to_server(servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield servicer
    finally:
        server.stop(0)


class Deaf(pb_grpc.StreamingInferenceServicer):
    """A stand-in that answers a Stream's first request, then never ends the call (not even
    on a half-close) until its client cancels it: `ended` (the latest call's) is set then."""

    def __init__(self):
        self.ended = threading.Event()

    def Stream(self, request_iterator, context):
        next(request_iterator)
        self.ended = ended = threading.Event()
        yield pb.StepResponse(session_id="s-1", position=1)
        context.add_callback(ended.set)
        ended.wait(30)


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def position_on_server(srv, sid: str) -> int:
    """The position the in-process server's store holds for an anonymous session."""
    return srv.server.store.get(sid, ANONYMOUS).position


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(d: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client one."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to generate test certificates")
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=ssmstream-test-ca", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "1",
                 "-extfile", f"{who}.ext", cwd=d)  # fmt: skip
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


class ServerProcess:
    """`python -m ssmstream.runtime.server MODEL_DIR --port 0 ...` in a subprocess."""

    def __init__(self, model_dir, *args: str, workdir: Path, env: dict | None = None):
        self.port_file = workdir / f"port-{time.monotonic_ns()}.json"
        self.log = workdir / f"server-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "ssmstream.runtime.server", str(model_dir), "--port", "0",
               "--port-file", str(self.port_file), *args]  # fmt: skip
        self._log_f = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.is_file():
                return json.loads(self.port_file.read_text())["port"]
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not report its port:\n{self.output()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        if not self._log_f.closed:
            self._log_f.flush()
        return self.log.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log_f.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log_f.closed:
            self._log_f.close()


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format → {'name{labels}': value} (comments dropped)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
