"""A scale-out deployment on one machine, without Docker: redis-server, N `ssmstream serve`
replicas and nginx (deploy/nginx/nginx.conf), all on 127.0.0.1 with free ports.

    python deploy/localcluster.py MODEL_DIR --replicas 3 --persist-every 1
    ssmstream generate --server 127.0.0.1:<nginx port> "def "   # the port is printed at start

Ctrl-C stops everything. The scale-out tests and benchmarks/bench_scaleout.py use the
same classes. Needs Debian's redis-server and nginx (`make services` installs them).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGINX_CONF = HERE / "nginx" / "nginx.conf"


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in /usr/sbin (where Debian puts nginx)."""
    sbin = Path("/usr/sbin") / name
    return shutil.which(name) or (str(sbin) if sbin.exists() else None)


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


def _started(proc: subprocess.Popen, wait) -> None:
    """`wait()` for `proc` to be ready; if anything ends the wait (it exited, a deadline, a
    SIGTERM or Ctrl-C while it starts), stop the process before the error goes on: a process
    that is not yet its owner's would be left running."""
    try:
        wait()
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen | None, sig=signal.SIGKILL, timeout: float = 10.0) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class RedisProcess:
    """redis-server without persistence on a free port. stop() then start() restarts it on
    the same port, empty (as after a crash without an AOF)."""

    def __init__(self, workdir: Path):
        self.binary = find_binary("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: redis-server)")
        self.workdir, self.port = Path(workdir), free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip  (its own session: see ReplicaProcess; it stops after the replicas)
        _started(self.proc, lambda: wait_port(self.port, proc=self.proc))

    def stop(self) -> None:
        _stop(self.proc)


def nginx_config(listen: int, upstreams: list[int], workdir: Path) -> str:
    """deploy/nginx/nginx.conf pointed at local replicas and a free port, with its pid, logs
    and temp files in workdir."""
    conf = NGINX_CONF.read_text()
    servers = "".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in upstreams
    )
    conf, n = re.subn(r"(upstream ssmstream \{\n(?:\s*#.*\n|\s*hash .*\n)*)(?:\s*server .*\n)+",
                      lambda m: m.group(1) + servers, conf)  # fmt: skip
    if n != 1:
        raise ValueError(f"{NGINX_CONF}: no `upstream ssmstream {{ hash ...; server ...; }}`")
    conf, n = re.subn(r"(?m)^(\s*)listen\s+\S*50051", rf"\g<1>listen 127.0.0.1:{listen}", conf)
    if n != 1:
        raise ValueError(f"{NGINX_CONF}: no `listen 50051` line")
    q = lambda name: _quoted(f"{workdir}/{name}")  # noqa: E731 (a space, `;` in the path)
    conf = re.sub(r"/var/log/nginx/([^\s;]+)", lambda m: q(m.group(1)), conf)
    temps = "".join(
        f"    {k}_temp_path {q(k)};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temps, 1)
    return f"pid {q('nginx.pid')};\nerror_log {q('error.log')} info;\n" + conf


def _quoted(path: str) -> str:
    """A path as one nginx config word, whatever it holds."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NginxProcess:
    """nginx in the foreground with the shipped config (see nginx_config)."""

    def __init__(self, upstreams: list[int], workdir: Path):
        binary = find_binary("nginx")
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: nginx)")
        self.workdir = Path(workdir).resolve()  # nginx reads -c relative to its -p prefix
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(nginx_config(self.port, upstreams, self.workdir))
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip  (its own session: see ReplicaProcess)
        try:
            _started(self.proc, lambda: wait_port(self.port, proc=self.proc))
        except RuntimeError:
            raise RuntimeError(f"nginx failed: {self.proc.stderr.read().decode()}") from None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


class ReplicaProcess:
    """`ssmstream serve MODEL_DIR --port 0 --metrics-port 0 ...` (with this Python)."""

    def __init__(self, model_dir, args: list[str], workdir: Path, name: str):
        self.name = name
        self.port_file = Path(workdir).absolute() / f"{name}.port.json"  # not read as a flag
        self.log = Path(workdir) / f"{name}.log"
        self.port_file.unlink(missing_ok=True)
        model_dir = Path(model_dir).absolute()
        cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "serve", str(model_dir),
               "--port", "0", "--metrics-port", "0", "--port-file", str(self.port_file),
               "--replica-id", name, *args]  # fmt: skip
        with open(self.log, "w") as log:
            # its own session, as Redis's and nginx's: Ctrl-C reaches only localcluster, whose
            # stop() sends one SIGTERM (a second signal would end the replica's grace period at
            # once), and stops Redis after the replicas wrote their sessions to it
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _started(self.proc, self._wait_for_port_file)
        ports = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]

    def _wait_for_port_file(self) -> None:
        deadline = time.monotonic() + 120
        while not self.port_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no drain, no final write (a crash)."""
        _stop(self.proc)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit status."""
        _stop(self.proc, signal.SIGTERM, timeout)
        return self.proc.returncode


class LocalCluster:
    """redis + `replicas` ssmstream replicas + nginx in front; `address` is nginx's."""

    def __init__(
        self,
        model_dir,
        workdir,
        replicas: int = 3,
        persist_every: str = "1",
        lease_ttl: float = 3.0,
        extra_args: tuple[str, ...] = (),
    ):
        workdir = Path(workdir).absolute()  # "-m" would be read as a flag by the replicas
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisProcess(workdir)
        self.replicas: list[ReplicaProcess] = []
        self.nginx: NginxProcess | None = None
        try:
            for i in range(replicas):
                args = ["--state-store", self.redis.url, "--persist-every", str(persist_every),
                        "--lease-ttl", str(lease_ttl), *extra_args]  # fmt: skip
                self.replicas.append(ReplicaProcess(model_dir, args, workdir, f"replica-{i + 1}"))
            self.nginx = NginxProcess([r.port for r in self.replicas], workdir / "nginx")
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return self.nginx.address

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for r in self.replicas:
            r.terminate(10)
        self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python deploy/localcluster.py",
        description="Run redis-server, N ssmstream replicas and nginx (deploy/nginx/nginx.conf) "
        "on 127.0.0.1 until Ctrl-C: the scale-out deployment without Docker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", help="exported model directory (ssmstream export)")
    p.add_argument("--replicas", type=int, default=3, help="ssmstream serve processes")
    p.add_argument("--persist-every", default="1", help="as `ssmstream serve --persist-every`")
    p.add_argument("--lease-ttl", type=float, default=3.0, help="as `ssmstream serve`")
    p.add_argument(  # SUPPRESS: no "(default: None)" after the help
        "--workdir", default=argparse.SUPPRESS, help="logs and configs (default: a temp dir)"
    )
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas: must be >= 1, got {args.replicas}")
    workdir = Path(getattr(args, "workdir", "") or tempfile.mkdtemp(prefix="ssmstream-cluster-"))
    # SIGTERM stops it as Ctrl-C does; set before anything starts, so that one while the
    # cluster starts stops what has started (LocalCluster does)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        cluster = LocalCluster(
            args.model_dir, workdir, args.replicas, args.persist_every, args.lease_ttl
        )
    except KeyboardInterrupt:
        print("stopped while starting", flush=True)
        return 130
    print(f"nginx (clients connect here): {cluster.address}")
    for r in cluster.replicas:
        print(f"{r.name}: {r.address}  metrics http://127.0.0.1:{r.metrics_port}/metrics")
    print(f"redis: {cluster.redis.url}\nlogs: {workdir}\nCtrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
