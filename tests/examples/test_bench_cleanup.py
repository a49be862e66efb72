"""The benchmarks leave nothing behind and survive their own caches: SIGTERM stops their
servers and removes their temporary directories (run_all.exit_on_sigterm), a server that does
not start is killed and its directory removed, one that did start is stopped when the next
fails, and a cached export made by other sources (or of other sizes) is made again."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from scripts import ROOT, load_script

build_toy = load_script("tests/runtime/conftest.py").build_toy


def test_exit_on_sigterm_raises_system_exit_143_once():
    ra = load_script("benchmarks/run_all.py")
    before = signal.getsignal(signal.SIGTERM)
    try:
        ra.exit_on_sigterm()
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between two bytecodes
        assert e.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one: at once
    finally:
        signal.signal(signal.SIGTERM, before)


# --- bench_sessions' servers ------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Where tempfile puts the servers' directories (to see that they are removed)."""
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_a_server_that_does_not_start_leaves_no_directory(tmp_path, scratch):
    bench = load_script("benchmarks/bench_sessions.py")
    with pytest.raises(RuntimeError, match="server did not start"):
        bench.Server(str(tmp_path / "no-such-model"))
    assert list(scratch.iterdir()) == []


def test_a_server_past_its_start_deadline_is_killed(tmp_path, scratch, monkeypatch):
    bench = load_script("benchmarks/bench_sessions.py")
    toy = build_toy(tmp_path / "toy", V=11, d_out=11)
    started = []

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(bench.subprocess, "Popen", Popen)
    monkeypatch.setattr(bench.Server, "START_SECONDS", 0.2)  # before it writes its port file
    with pytest.raises(RuntimeError, match="server did not start"):
        bench.Server(str(toy["model_dir"]))
    assert started[0].returncode == -signal.SIGKILL
    assert list(scratch.iterdir()) == []


def test_the_first_server_is_stopped_when_the_second_fails_to_start(monkeypatch):
    bench = load_script("benchmarks/bench_sessions.py")
    made = []

    class Server:
        def __init__(self, model, *flags):
            if made:
                raise RuntimeError("server did not start")
            made.append(self)
            self.stopped = False

        def stop(self):
            self.stopped = True

    monkeypatch.setattr(bench, "Server", Server)
    with pytest.raises(RuntimeError, match="server did not start"):
        bench.run("model", T=4, rounds=1)
    assert made[0].stopped


def test_a_sigterm_during_one_servers_stop_still_stops_the_others(monkeypatch):
    # exit_on_sigterm raises SystemExit wherever the signal lands, also inside the first
    # stop() of the cleanup: the servers after it were left running
    bench = load_script("benchmarks/bench_sessions.py")
    made = []

    class Server:
        def __init__(self, model, *flags):
            made.append(self)
            self.address, self.stopped = "127.0.0.1:1", False

        def stop(self):
            self.stopped = True
            if self is made[0]:
                raise SystemExit(143)

    def no_client(*a, **k):
        raise RuntimeError("no server here")

    monkeypatch.setattr(bench, "Server", Server)
    monkeypatch.setattr("ssmstream.runtime.client.Client", no_client)
    with pytest.raises(SystemExit):
        bench.run("model", T=4, rounds=1)
    assert len(made) == 2 and all(s.stopped for s in made)


def test_an_echo_server_that_does_not_report_its_port_is_stopped():
    bench = load_script("benchmarks/bench_server.py")
    started = []

    class EchoProc(bench.EchoProc):
        START_SECONDS = 0.001  # before the spawned process has imported anything

        def stop(self):
            started.append(self.proc)
            super().stop()

    with pytest.raises(queue.Empty):
        EchoProc(11)
    assert len(started) == 1 and started[0].exitcode == -signal.SIGTERM


SPAWN_THEN_SIGTERM = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import multiprocessing.util as util
import bench_server
from run_all import exit_on_sigterm

real = util.spawnv_passfds

def spawn(exe, args, fds):  # the child is spawned; its preparation data is not written yet
    pid = real(exe, args, fds)
    if "spawn_main" in str(args):  # (not the resource tracker)
        print(pid, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # its handler runs here
    return pid

exit_on_sigterm()
util.spawnv_passfds = spawn
bench_server.EchoProc(11)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_sigterm_while_the_echo_server_is_spawned_stops_it(tmp_path):
    """bench_sessions got SIGTERM just as it spawned its echo server (between the spawn and
    the write of the child's preparation data): the child, not yet known to multiprocessing,
    died on an EOFError traceback instead of being stopped."""
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", SPAWN_THEN_SIGTERM, str(ROOT / "benchmarks")],
            stdout=subprocess.PIPE, stderr=err, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 143, log.read_text()
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10  # the child ends (or prints its traceback) after the parent
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)
    assert "Traceback" not in log.read_text(), log.read_text()


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in _descendants(k)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
@pytest.mark.parametrize(
    ("sig", "status", "line"),
    [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_to_bench_sessions_stops_its_servers_and_removes_its_directories(
    sig, status, line, tmp_path
):
    """SIGTERM to the benchmark alone (as `kill PID`): its servers had kept running. Ctrl-C
    (SIGINT) had ended it with a KeyboardInterrupt traceback. Either: one line, 128 + signal."""
    toy = build_toy(tmp_path / "toy", V=11, d_out=11)
    scratch, log = tmp_path / "scratch", tmp_path / "stderr"
    scratch.mkdir()
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_sessions.py"), "--model",
           str(toy["model_dir"]), "--prompt-len", "16", "--rounds", "100000",
           "--cache-mb", "0.01", "--out", str(tmp_path / "out")]  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(scratch)}, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while len(list(scratch.glob("bench-sessions-*/port.json"))) < 2:  # both servers up
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        servers = _descendants(proc.pid)
        assert servers
        proc.send_signal(sig)
        assert proc.wait(60) == status, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    # multiprocessing's resource tracker (of the echo server's queue) ends on its own once the
    # benchmark has gone: a few milliseconds later
    deadline = time.monotonic() + 10
    while [pid for pid in servers if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in servers if _running(pid)] == []
    assert list(scratch.glob("bench-sessions-*")) == []  # the servers' and the model's dirs
    err = log.read_text()
    assert err.endswith(f"bench_sessions.py: {line}\n") and "Traceback" not in err, err


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


# --- cached exports -----------------------------------------------------------------------------


def test_bench_runtime_reexports_its_cache_after_the_sources_change(
    tmp_path, monkeypatch, graphs_without_torch
):
    """The stamp it wrote into the model dir made the exporter refuse to overwrite it."""
    import ssmstream.export

    br = load_script("benchmarks/bench_runtime.py")
    quick = functools.partial(ssmstream.export.export_model, prefill=False, verify=False)
    monkeypatch.setattr(ssmstream.export, "export_model", quick)  # the same overwrite checks
    cfg = br.BenchConfig(work_dir=str(tmp_path), vocab_size=16, d_model=8, n_layers=1, d_state=4)
    model = br.prepare_model(cfg)
    first = (model / "manifest.json").stat().st_mtime_ns
    assert br.prepare_model(cfg) == model  # the same sources: the cache is used
    assert (model / "manifest.json").stat().st_mtime_ns == first
    monkeypatch.setattr(br, "export_sources_sha", lambda: "model/ or export/ edited")
    assert br.prepare_model(cfg) == model
    assert (model / "manifest.json").stat().st_mtime_ns != first  # exported again
    assert not (model / ".export-sources-sha256").exists()


def test_bench_gpu_remakes_its_cached_models_when_the_size_flags_change(
    tmp_path, graphs_without_torch
):
    bg = load_script("benchmarks/bench_gpu.py")
    sizes = dict(vocab=16, d_model=8, n_layers=1, d_state=4)
    models = bg.prepare_models(bg.BenchConfig(device="cpu", work=str(tmp_path), **sizes))
    for d in (models["fp32"], models["fp16"]):
        assert json.loads((d / "manifest.json").read_text())["model"]["d_state"] == 4
    models = bg.prepare_models(
        bg.BenchConfig(device="cpu", work=str(tmp_path), **{**sizes, "d_state": 8})
    )
    assert json.loads((models["ckpt"] / "config.json").read_text())["model"]["d_state"] == 8
    for d in (models["fp32"], models["fp16"]):
        assert json.loads((d / "manifest.json").read_text())["model"]["d_state"] == 8


def test_bench_gpu_remakes_its_cached_models_for_another_checkpoint_of_the_same_size(
    tmp_path, graphs_without_torch
):
    # the cache had been kept when the network config matched: torch_eager then ran the
    # given checkpoint and the ORT variants another one's weights
    import torch
    from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
    from ssmstream.runtime.manifest import sha256_file

    bg = load_script("benchmarks/bench_gpu.py")
    cfg = SSMConfig(vocab_size=16, d_model=8, n_layers=1, d_state=4)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_checkpoint(SSMNetwork(cfg), tmp_path / name)
        models = bg.prepare_models(
            bg.BenchConfig(device="cpu", work=str(tmp_path / "work"), ckpt=str(tmp_path / name))
        )
        weights = sha256_file(tmp_path / name / "model.safetensors")
        for d in (models["fp32"], models["fp16"]):
            assert (
                json.loads((d / "manifest.json").read_text())["source"]["weights_sha256"] == weights
            )
