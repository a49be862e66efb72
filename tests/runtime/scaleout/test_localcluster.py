"""deploy/localcluster.py's parts, one at a time (test_replicas runs the whole cluster).

Fast: no ssmstream replica is started (ReplicaProcess is driven with a stand-in executable,
LocalCluster / main with stand-in process classes); redis-server / nginx run for real where
installed, on 127.0.0.1 free ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import localcluster as lc
from services import require

# --- find_binary / wait_port / _stop -----------------------------------------------------


def test_find_binary_looks_on_path_then_in_usr_sbin(monkeypatch, tmp_path):
    which = shutil.which("redis-server") or shutil.which("python3")
    name = Path(which).name
    assert lc.find_binary(name) == which  # found on PATH (not only in /usr/sbin)
    if not Path("/usr/sbin/nginx").exists():
        pytest.skip("no /usr/sbin/nginx")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: Debian's /usr/sbin
    assert lc.find_binary("nginx") == "/usr/sbin/nginx"
    assert lc.find_binary("no-such-binary") is None


def test_wait_port_raises_at_once_when_the_process_exited():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^process exited with 3$"):
        lc.wait_port(lc.free_port(), timeout=3.0, proc=proc)
    assert time.monotonic() - t0 < 1.0


def test_wait_port_waits_for_a_listener_and_times_out_naming_the_port():
    port = lc.free_port()
    with pytest.raises(TimeoutError, match=rf"nothing listens on 127\.0\.0\.1:{port} after 0\.3s"):
        lc.wait_port(port, timeout=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        lc.wait_port(s.getsockname()[1], timeout=2.0)  # returns


def _ready(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\n"
                             "import time\nwhile True: time.sleep(0.05)"],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline() == b"ready\n"
    return proc


def test_stop_defaults_to_sigkill_a_crash_not_a_graceful_exit():
    """RedisProcess.stop / ReplicaProcess.kill rely on _stop's default being SIGKILL (no
    drain, no final write); a process that exits 0 on SIGTERM must die of SIGKILL."""
    proc = _ready("import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))")
    lc._stop(proc, timeout=5)
    assert proc.returncode == -signal.SIGKILL


def test_stop_escalates_to_sigkill_after_the_timeout():
    proc = _ready("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    lc._stop(proc, signal.SIGTERM, timeout=0.5)
    assert proc.poll() == -signal.SIGKILL


# --- RedisProcess ----------------------------------------------------------------------------


def test_redis_restarts_empty_on_the_same_port(tmp_path):
    require("redis-server")
    redis_py = pytest.importorskip("redis")
    r = lc.RedisProcess(tmp_path)
    try:
        port = r.port
        assert r.url == f"redis://127.0.0.1:{port}/0"
        db = redis_py.Redis.from_url(r.url)
        # no persistence (no RDB save points, no append-only file), on 127.0.0.1 only
        assert db.config_get("save") == {"save": ""}
        assert db.config_get("appendonly") == {"appendonly": "no"}
        assert db.config_get("bind") == {"bind": "127.0.0.1"}
        redis_py.Redis.from_url(r.url).set("k", "v")
        time.sleep(1.2)  # past an everysec fsync of an append-only file, were there one
        r.stop()
        assert r.proc.returncode == -signal.SIGKILL  # a crash
        r.start()
        assert r.port == port
        assert redis_py.Redis.from_url(r.url).get("k") is None  # came back empty
    finally:
        r.stop()


def test_redis_missing_binary_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setattr(lc, "find_binary", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=r"redis-server is not installed \(Debian: redis-server\)"
    ):
        lc.RedisProcess(tmp_path)


# --- nginx_config / NginxProcess -----------------------------------------------------------


def test_nginx_config_points_the_shipped_config_at_local_replicas(tmp_path):
    conf = lc.nginx_config(41234, [1111, 2222], tmp_path)
    lines = conf.splitlines()
    assert lines[0] == f'pid "{tmp_path}/nginx.pid";'
    assert lines[1] == f'error_log "{tmp_path}/error.log" info;'
    servers = [ln.strip() for ln in lines if ln.strip().startswith("server 127.0.0.1:")]
    assert servers == ["server 127.0.0.1:1111 max_fails=1 fail_timeout=2s;",
                       "server 127.0.0.1:2222 max_fails=1 fail_timeout=2s;"]  # fmt: skip
    # the upstream keeps its consistent hash on the clients' session header
    block = conf.split("upstream ssmstream {", 1)[1].split("}", 1)[0]
    assert "hash $ssmstream_route consistent;" in block
    assert "server ssmstream" not in conf and "replica-1:50051" not in conf
    code = [ln.strip() for ln in lines if not ln.strip().startswith("#")]
    listens = [ln for ln in code if ln.startswith("listen")]
    assert len(listens) == 1 and listens[0].startswith("listen 127.0.0.1:41234 "), listens
    assert not any("50051" in ln for ln in code)
    assert "/var/log/nginx" not in conf  # logs in the workdir
    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f'    {k}_temp_path "{tmp_path}/{k}";' in lines


def test_nginx_config_moves_every_log_path_into_the_workdir(monkeypatch, tmp_path):
    # a log directive with more words after its path (a format, a level) kept /var/log/nginx
    conf = tmp_path / "nginx.conf"
    extra = "    access_log /var/log/nginx/access.log combined;\n"
    extra += "    error_log /var/log/nginx/e.log warn;\n"
    conf.write_text(lc.NGINX_CONF.read_text().replace("http {\n", "http {\n" + extra, 1))
    monkeypatch.setattr(lc, "NGINX_CONF", conf)
    out = lc.nginx_config(41234, [1111], tmp_path / "w d")
    assert "/var/log/nginx" not in out
    assert f'access_log "{tmp_path}/w d/access.log" combined;' in out
    assert f'error_log "{tmp_path}/w d/e.log" warn;' in out


def test_nginx_config_refuses_a_config_it_cannot_rewrite(monkeypatch, tmp_path):
    shipped = lc.NGINX_CONF.read_text()
    bad = tmp_path / "nginx.conf"
    monkeypatch.setattr(lc, "NGINX_CONF", bad)
    bad.write_text(shipped.replace("upstream ssmstream", "upstream other"))
    with pytest.raises(
        ValueError, match=r"no `upstream ssmstream \{ hash \.\.\.; server \.\.\.; \}`"
    ):
        lc.nginx_config(1, [2], tmp_path)
    bad.write_text(shipped.replace("50051", "50052"))
    with pytest.raises(ValueError, match=r"no `listen 50051` line"):
        lc.nginx_config(1, [2], tmp_path)


def test_nginx_failure_reports_nginx_s_own_error(monkeypatch, tmp_path):
    require("nginx")
    monkeypatch.setattr(lc, "nginx_config", lambda listen, ups, wd: "no_such_directive 1;\n")
    with pytest.raises(RuntimeError) as e:
        lc.NginxProcess([1], tmp_path)
    msg = str(e.value)
    assert msg.startswith("nginx failed: ") and "no_such_directive" in msg and "[emerg]" in msg


def test_nginx_stop_is_graceful_and_frees_the_port(tmp_path):
    """SIGTERM (not SIGKILL): nginx removes its pid file and its workers go with it."""
    require("nginx")
    ng = lc.NginxProcess([lc.free_port()], tmp_path / "ng")
    assert (ng.workdir / "nginx.pid").is_file()
    ng.stop()
    assert ng.proc.returncode == 0
    assert not (ng.workdir / "nginx.pid").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ng.port)) != 0


STARTER = """import sys, time
sys.path.insert(0, {deploy!r})
import localcluster as lc
redis = lc.RedisProcess({workdir!r})
nginx = lc.NginxProcess([lc.free_port()], {workdir!r} + "/ng")
print(redis.proc.pid, nginx.proc.pid, flush=True)
time.sleep(60)
"""


def test_ctrl_c_in_the_terminal_reaches_neither_redis_nor_nginx(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the foreground process group) is for localcluster
    alone: its stop() drains the replicas, which write their sessions to Redis, and only
    then stops Redis (had Redis had the SIGINT too, it would be gone before they drain)."""
    require("redis-server"), require("nginx")
    code = STARTER.format(deploy=str(Path(lc.__file__).parent), workdir=str(tmp_path))
    proc = subprocess.Popen(  # a terminal's foreground group: SIGINT at its default
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    pids = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert len(pids) == 2
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(10) != 0  # the starter got it (KeyboardInterrupt)...
        time.sleep(0.3)  # (time for Redis and nginx to exit, had they had it)
        for pid in pids:  # ...and neither of them: both still run
            assert _alive(pid), pid
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """Whether a process (not our child: its parent exited) runs and is no zombie (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- ReplicaProcess (with a stand-in for `python -m ssmstream.runtime.server`) ------------


FAKE = """#!{python}
import json, sys, time
args = sys.argv[1:]
mode = {mode!r}
if mode == "exit":
    print("boom: no model here", flush=True)
    sys.exit(3)
port_file = args[args.index("--port-file") + 1]
time.sleep(0.3)
with open(port_file, "w") as f:
    json.dump({{"port": 1234, "metrics_port": 5678}}, f)
while True:
    time.sleep(0.05)
"""


def fake_python(tmp_path: Path, mode: str) -> str:
    path = tmp_path / f"fake-python-{mode}"
    path.write_text(FAKE.format(python=sys.executable, mode=mode))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_replica_ignores_a_stale_port_file(monkeypatch, tmp_path):
    monkeypatch.setattr(lc.sys, "executable", fake_python(tmp_path, "serve"))
    (tmp_path / "r1.port.json").write_text(json.dumps({"port": 1, "metrics_port": 2}))
    r = lc.ReplicaProcess("model", [], tmp_path, "r1")
    try:
        assert (r.port, r.metrics_port) == (1234, 5678)  # the new file, not the stale one
        assert r.address == "127.0.0.1:1234"
        assert os.getsid(r.proc.pid) != os.getsid(0)  # its own session
    finally:
        r.kill()


@pytest.mark.timeout(30)
def test_replica_that_exits_is_reported_at_once_with_its_log(monkeypatch, tmp_path):
    monkeypatch.setattr(lc.sys, "executable", fake_python(tmp_path, "exit"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"replica r2 did not start:\nboom: no model here"):
        lc.ReplicaProcess("model", [], tmp_path, "r2")
    assert time.monotonic() - t0 < 5  # not the 120 s deadline


@pytest.fixture
def started(monkeypatch) -> list[subprocess.Popen]:
    """The processes localcluster starts in the test; any still running at its end killed."""
    procs, real_popen = [], lc.subprocess.Popen

    def popen(*a, **k):
        procs.append(real_popen(*a, **k))
        return procs[-1]

    monkeypatch.setattr(lc.subprocess, "Popen", popen)
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_replica_interrupted_while_it_starts_is_stopped(monkeypatch, tmp_path, started):
    # a SIGTERM (localcluster's handler: KeyboardInterrupt) in the wait for its port file had
    # left the replica running in its own session, orphaned
    monkeypatch.setattr(lc.sys, "executable", fake_python(tmp_path, "serve"))
    real_sleep = lc.time.sleep

    def sleep(seconds):
        if not hasattr(sleep, "done"):
            sleep.done = True
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(lc.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        lc.ReplicaProcess("model", [], tmp_path, "r3")
    assert len(started) == 1 and started[0].poll() is not None


def test_redis_interrupted_while_it_starts_is_stopped(monkeypatch, tmp_path, started):
    require("redis-server")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, "wait_port", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lc.RedisProcess(tmp_path)
    assert len(started) == 1 and started[0].poll() is not None


# --- LocalCluster / main (stand-in processes) -------------------------------------------


class FakeRedis:
    made: list = []

    def __init__(self, workdir):
        self.url, self.stopped = "redis://127.0.0.1:7/0", False
        FakeRedis.made.append(self)

    def stop(self):
        self.stopped = True


def test_cluster_passes_the_scale_out_flags_to_named_replicas(monkeypatch, tmp_path):
    made = []

    class FakeReplica:
        def __init__(self, model_dir, args, workdir, name):
            self.model_dir, self.args, self.name, self.port = model_dir, args, name, 100 + len(made)
            made.append(self)

        def terminate(self, timeout=30.0):
            self.terminated = timeout

    class FakeNginx:
        def __init__(self, upstreams, workdir):
            self.upstreams, self.workdir, self.address = upstreams, workdir, "127.0.0.1:9"

        def stop(self):
            self.stopped = True

    monkeypatch.setattr(lc, "RedisProcess", FakeRedis)
    monkeypatch.setattr(lc, "ReplicaProcess", FakeReplica)
    monkeypatch.setattr(lc, "NginxProcess", FakeNginx)
    c = lc.LocalCluster("m", tmp_path, 2, "4", 1.5, extra_args=("--grace", "1"))
    assert [r.name for r in made] == ["replica-1", "replica-2"]
    for r in made:
        assert r.args == ["--state-store", "redis://127.0.0.1:7/0", "--persist-every", "4",
                          "--lease-ttl", "1.5", "--grace", "1"]  # fmt: skip
    assert c.nginx.upstreams == [100, 101] and c.nginx.workdir == tmp_path / "nginx"
    assert c.address == "127.0.0.1:9"
    c.stop()
    assert c.nginx.stopped and [r.terminated for r in made] == [10, 10] and c.redis.stopped


@pytest.mark.parametrize(
    "error",
    [RuntimeError("replica replica-2 did not start"), KeyboardInterrupt()],
    ids=["failed", "interrupted"],  # main's SIGTERM handler raises KeyboardInterrupt: no Exception
)
def test_cluster_that_fails_to_start_stops_what_it_started(monkeypatch, tmp_path, error):
    started = []

    class FailingReplica:
        def __init__(self, model_dir, args, workdir, name):
            if started:
                raise error
            started.append(self)

        def terminate(self, timeout=30.0):
            self.terminated = True

    FakeRedis.made.clear()
    monkeypatch.setattr(lc, "RedisProcess", FakeRedis)
    monkeypatch.setattr(lc, "ReplicaProcess", FailingReplica)
    with pytest.raises(type(error)) as raised:
        lc.LocalCluster("m", tmp_path, 3)
    assert raised.value is error
    (redis,) = FakeRedis.made
    assert redis.stopped  # nothing left running
    assert started[0].terminated


def test_paths_reach_the_replicas_absolute_not_as_flags(monkeypatch, tmp_path):
    """A relative model dir or workdir named "-m" would be read as a flag by the replica's
    argument parser (and redis-server's): every path on their command lines is absolute."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lc.sys, "executable", fake_python(tmp_path, "serve"))
    (tmp_path / "-w").mkdir()
    r = lc.ReplicaProcess("-m", [], Path("-w"), "r5")
    try:
        cmd = r.proc.args
        assert cmd[cmd.index("serve") + 1] == str(tmp_path / "-m")
        assert cmd[cmd.index("--port-file") + 1] == str(tmp_path / "-w" / "r5.port.json")
    finally:
        r.kill()
    got = {}

    class Recording(FakeRedis):
        def __init__(self, workdir):
            super().__init__(workdir)
            got["redis"] = workdir

    class Replica:
        def __init__(self, model_dir, args, workdir, name):
            got["replica"], self.port = workdir, 1

        def terminate(self, timeout=30.0):
            pass

    class Nginx:
        def __init__(self, upstreams, workdir):
            got["nginx"], self.address = workdir, "127.0.0.1:9"

        def stop(self):
            pass

    monkeypatch.setattr(lc, "RedisProcess", Recording)
    monkeypatch.setattr(lc, "ReplicaProcess", Replica)
    monkeypatch.setattr(lc, "NginxProcess", Nginx)
    lc.LocalCluster("m", "-c", 1).stop()
    assert got == {"redis": tmp_path / "-c", "replica": tmp_path / "-c",
                   "nginx": tmp_path / "-c" / "nginx"}  # fmt: skip


def test_main_prints_the_addresses_and_stops_the_cluster(monkeypatch, tmp_path, capsys):
    got = {}

    class R:
        name, address, metrics_port = "replica-1", "127.0.0.1:5001", 9101

    class FakeCluster:
        def __init__(self, *args):
            got["args"] = args
            self.address, self.replicas = "127.0.0.1:8000", [R()]
            self.redis = FakeRedis(None)

        def stop(self):
            got["stopped"] = got.get("stopped", 0) + 1

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, "LocalCluster", FakeCluster)
    monkeypatch.setattr(lc.time, "sleep", interrupt)
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = lc.main(["mdir", "--replicas", "1", "--persist-every", "4", "--lease-ttl", "2.5",
                      "--workdir", str(tmp_path)])  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, old)
    assert rc == 0
    assert got["args"] == ("mdir", tmp_path, 1, "4", 2.5)
    assert got["stopped"] == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nginx (clients connect here): 127.0.0.1:8000"
    assert out[1] == "replica-1: 127.0.0.1:5001  metrics http://127.0.0.1:9101/metrics"
    assert out[2] == "redis: redis://127.0.0.1:7/0" and out[-1] == "stopping"


def test_main_stopped_while_the_cluster_starts_says_so(monkeypatch, tmp_path, capsys):
    # its SIGTERM handler is set before the cluster starts (it was set after: a SIGTERM while
    # redis and the replicas started killed main and left them running)
    seen = {}

    class StartingCluster:
        def __init__(self, *args):
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            raise KeyboardInterrupt  # what that handler raises; LocalCluster stops its parts

    monkeypatch.setattr(lc, "LocalCluster", StartingCluster)
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = lc.main(["mdir", "--replicas", "1", "--workdir", str(tmp_path)])
    except KeyboardInterrupt:  # not pytest's own: fail this test, not the session
        pytest.fail("main let the KeyboardInterrupt out")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert rc == 130
    assert seen["handler"] not in (old, signal.SIG_DFL)
    assert capsys.readouterr().out.splitlines() == ["stopped while starting"]


def test_nginx_runs_in_a_workdir_whose_path_has_a_space_quote_or_semicolon(tmp_path):
    # the paths went into its config unquoted: "invalid number of arguments in pid directive"
    require("nginx")
    nginx = lc.NginxProcess([lc.free_port()], tmp_path / 'my "cluster"; dir')
    try:
        assert nginx.proc.poll() is None
        assert (tmp_path / 'my "cluster"; dir' / "nginx.pid").is_file()
    finally:
        nginx.stop()


def test_nginx_runs_in_a_workdir_whose_path_has_a_backslash(tmp_path):
    # nginx reads a backslash in a quoted word as an escape (backslash-t: a tab): doubled
    require("nginx")
    workdir = tmp_path / "back\\tslash"
    nginx = lc.NginxProcess([lc.free_port()], workdir)
    try:
        assert nginx.proc.poll() is None
        assert (workdir / "nginx.pid").is_file()
    finally:
        nginx.stop()


def test_localcluster_takes_a_relative_workdir_and_refuses_no_replicas(
    tmp_path, monkeypatch, capsys
):
    """nginx reads -c relative to its -p prefix: a relative workdir is made absolute (it
    failed after Redis and the replicas had started); --replicas 0 is a usage error before
    anything starts."""
    require("nginx")
    monkeypatch.chdir(tmp_path)
    nginx = lc.NginxProcess([lc.free_port()], Path("cluster") / "nginx")
    try:
        assert nginx.proc.poll() is None and nginx.workdir.is_absolute()
    finally:
        nginx.stop()
    with pytest.raises(SystemExit) as e:
        lc.main(["model", "--replicas", "0", "--workdir", "unused"])
    assert e.value.code == 2 and "--replicas" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()


def test_help_states_each_default_once(capsys):
    """--workdir's default is a temp dir made at start: its help says so, without
    argparse's "(default: None)" after it."""
    with pytest.raises(SystemExit):
        lc.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "logs and configs (default: a temp dir)" in out and "None" not in out
