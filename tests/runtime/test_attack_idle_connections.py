"""Idle connections, which anyone can open without a token, do not lock clients out.

Each client connection holds one file descriptor of the server from its TCP accept on. Under
a soft limit of open files of 1024 (a login shell's or a systemd service's default), a
thousand idle connections left `ssmstream serve` no descriptor to accept the next client:
its calls timed out while the attacker's sockets sat idle. The server raises its soft limit
to the hard one at start. Here the server starts at a soft limit of 64, and 100 idle
connections are opened before a client calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ssmstream.runtime.client import Client

resource = pytest.importorskip("resource")  # POSIX only
pytestmark = pytest.mark.skipif(not Path("/proc/self/limits").is_file(), reason="needs /proc")

SOFT = 64
IDLE = 100


def _soft_limit(soft: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _limits_of(pid: int) -> tuple[str, str]:
    """(soft, hard) of 'Max open files' in /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' line")


def test_idle_connections_do_not_lock_clients_out(toy_token_model, tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * IDLE:
        pytest.skip(f"hard limit of open files {hard} leaves no room for the test")
    port_file = tmp_path / "port.json"
    cmd = [sys.executable, "-m", "ssmstream.runtime.server", str(toy_token_model["model_dir"]),
           "--port", "0", "--port-file", str(port_file), "--device", "cpu"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: _soft_limit(SOFT)
    )
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "server.log"
            ).read_text()
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        soft, hard_now = _limits_of(proc.pid)
        assert soft == hard_now  # raised from SOFT
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        time.sleep(0.5)  # the server has accepted them
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) > SOFT  # more than it started with
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            assert c.create_session().step(tokens=[1]).position == 1
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)
        log.close()
