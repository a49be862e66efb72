"""Real redis-server and nginx processes on loopback for the scale-out tests.

Both come from Debian's packages (`make test` installs them where it can: see the
Makefile's `services` target); `require(binary)` skips a test, saying why, where one is
missing. Every process binds 127.0.0.1 on a free port and is stopped by its fixture.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def require(binary: str) -> str:
    sbin = Path("/usr/sbin") / binary  # nginx lives there, outside a plain user's PATH
    path = shutil.which(binary) or (str(sbin) if sbin.exists() else None)
    if path is None:
        pytest.skip(
            f"{binary} is not installed (Debian package; `make test` installs it when run as "
            f"root with apt-get)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisProcess:
    """redis-server without persistence on a free port; stop() / start() again on the same
    port (Redis restarted empty, as after a crash without an AOF)."""

    def __init__(self, workdir: Path):
        self.binary = require("redis-server")
        self.workdir, self.port = workdir, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def nginx_config(listen: int, upstreams: list[int], workdir: Path) -> str:
    """The shipped deploy/nginx/nginx.conf, pointed at local replicas and a free port, with its
    pid, logs and temp files in workdir."""
    conf = NGINX_CONF.read_text()
    servers = "".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in upstreams
    )
    conf, n = re.subn(r"(upstream ssmstream \{\n(?:\s*#.*\n|\s*hash .*\n)*)(?:\s*server .*\n)+",
                      lambda m: m.group(1) + servers, conf)  # fmt: skip
    assert n == 1, "deploy/nginx/nginx.conf: upstream ssmstream { hash ...; server ...; } not found"
    conf, n = re.subn(r"(?m)^(\s*)listen\s+\S*50051", rf"\g<1>listen 127.0.0.1:{listen}", conf)
    assert n == 1, "deploy/nginx/nginx.conf: listen ...:50051 not found"
    conf = conf.replace("/var/log/nginx/", f"{workdir}/")
    temps = "".join(
        f"    {k}_temp_path {workdir}/{k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temps, 1)
    return f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log info;\n" + conf


class NginxProcess:
    """nginx in the foreground with the shipped config (see nginx_config)."""

    def __init__(self, upstreams: list[int], workdir: Path):
        binary = require("nginx")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(nginx_config(self.port, upstreams, workdir))
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError:
            raise RuntimeError(f"nginx failed: {self.proc.stderr.read().decode()}") from None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
