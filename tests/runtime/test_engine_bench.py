"""`ssmstream bench`: runs on a model, its prefill agrees with stepping, bad input is refused."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from ssmstream.runtime import bench, cli
from ssmstream.runtime.engine import Engine


def test_bench_step_and_prefill(toy_token_model, toy_signal_model):
    for toy in (toy_token_model, toy_signal_model):
        eng = Engine(toy["model_dir"], device="cpu", threads=1)
        r = bench.bench_step(eng, batch=3, steps=20)
        assert r["p99_us"] >= r["p50_us"] > 0
        assert r["tokens_per_s"] == pytest.approx(3 / (r["p50_us"] * 1e-6))
        p = bench.bench_prefill(eng, 13)
        assert p["max_state_diff"] < 1e-4 and p["prefill_ms"] > 0


def test_bench_cli(toy_token_model, tmp_path, caplog):
    caplog.set_level("INFO")
    argv = ["bench", str(toy_token_model["model_dir"]), "--steps", "20", "--prefill", "9"]
    assert cli.main(argv) == 0
    assert "tokens/s" in caplog.text and "prefill T=9" in caplog.text
    assert cli.main(["bench", str(tmp_path)]) == 2  # not a model dir
    caplog.clear()
    assert cli.main(["bench", str(toy_token_model["model_dir"]), "--threads", "0"]) == 2
    assert caplog.messages == [
        "ssmstream bench: error: --threads: must be an integer in [1, 1024], got 0"
    ]
    with pytest.raises(SystemExit):
        cli.main(["bench", str(toy_token_model["model_dir"]), "--batch", "0"])


def test_bench_sets_the_step_graphs_threads_and_says_when_there_is_no_prefill(
    toy_token_model, tmp_path, caplog, monkeypatch
):
    import json
    import shutil

    made = []
    monkeypatch.setattr(bench, "Engine", lambda *a, **kw: made.append(Engine(*a, **kw)) or made[-1])
    model = str(toy_token_model["model_dir"])
    assert cli.main(["bench", model, "--steps", "5", "--prefill", "0", "--step-threads", "2"]) == 0
    assert made[-1].step_session.get_session_options().intra_op_num_threads == 2
    step_only = tmp_path / "step-only"  # a model exported with --no-prefill
    shutil.copytree(model, step_only)
    m = json.loads((step_only / "manifest.json").read_text())
    del m["graphs"]["prefill"]
    (step_only / "manifest.json").write_text(json.dumps(m))
    caplog.set_level("INFO")
    assert cli.main(["bench", str(step_only), "--steps", "5", "--prefill", "9"]) == 0
    assert "no prefill graph" in caplog.text and "prefill T=9" not in caplog.text


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t


class FakeEngine:
    """The k-th step call (1-based) takes (100 - k) µs (getting faster, so the first timed
    call is the slowest); prefill takes `prefill_s`; each step
    of bench_prefill's sequential loop takes `step_s` once `timed_steps` is set."""

    input_kind = "tokens"
    vocab_size = 7
    d_input = 1

    def __init__(self, clock, prefill_s=0.0, step_s=None):
        self.clock, self.calls, self.prefill_s, self.step_s = clock, 0, prefill_s, step_s

    def new_state(self, batch=1):
        return np.zeros((batch, 4), np.float32)

    def step(self, x, s):
        self.calls += 1
        self.clock.t += self.step_s if self.step_s is not None else (100 - self.calls) * 1e-6
        return None, s + 1

    def prefill(self, x, s):
        self.clock.t += self.prefill_s
        return None, s + x.shape[1]


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


def test_bench_step_times_exactly_the_calls_after_the_10_warm_up_calls(clock):
    r = bench.bench_step(FakeEngine(clock), batch=2, steps=20)
    times = (100 - np.arange(11, 31)) * 1e-6  # calls 11..30 (the first 10 are warm-up)
    p50, p99 = np.percentile(times, [50, 99])
    assert r["batch"] == 2 and r["steps"] == 20
    assert r["p50_us"] == pytest.approx(1e6 * p50)
    assert r["p99_us"] == pytest.approx(1e6 * p99)
    assert r["p99_us"] > r["p50_us"]  # p99 is its own percentile, not p50
    assert r["tokens_per_s"] == pytest.approx(2 / p50)


def test_bench_prefill_speedup_is_stepping_time_over_prefill_time(clock):
    eng = FakeEngine(clock, prefill_s=0.002, step_s=0.001)
    r = bench.bench_prefill(eng, 8)
    assert r["prefill_ms"] == pytest.approx(2.0)
    assert r["steps_ms"] == pytest.approx(8.0)
    assert r["speedup"] == pytest.approx(4.0)  # 8 ms of steps / 2 ms of prefill
    assert r["length"] == 8


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch", "0"], ["--prefill", "-1"]])
def test_bench_refuses_bad_counts_before_loading_the_model(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path), *argv])  # not a model dir: the check comes first
    assert e.value.code == 2
    assert "--batch and --steps must be >= 1, --prefill >= 0" in capsys.readouterr().err


def test_bench_says_when_the_batch_does_not_fit_in_memory(toy_token_model, monkeypatch, caplog):
    """numpy cannot allocate the states (a batch within the estimate of what is available):
    one line, status 2."""

    def too_big(engine, batch, steps):
        raise MemoryError

    monkeypatch.setattr(bench, "bench_step", too_big)
    argv = ["bench", str(toy_token_model["model_dir"]), "--batch", "1000"]
    assert cli.main(argv) == 2
    assert "not enough memory for --batch 1000 / --prefill 256" in caplog.text


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--batch", "5000000"], "--batch 5000000 needs about 1.2 GiB, 1.0 GiB is available"),
        (["--prefill", "100000000"], "--prefill 100000000 needs about 5.6 GiB, 1.0 GiB is"),
    ],
)
def test_bench_refuses_what_would_not_fit_in_the_memory_available(
    toy_token_model, monkeypatch, caplog, flags, said
):
    """A --batch or --prefill whose arrays would take more than the memory available now
    (the kernel kills the run, where numpy allocates lazily) is refused before it runs:
    ~32 bytes per state float of the batch (toy S = 8), ~12 per output float of a prompt
    (toy D = 5)."""
    ran = []

    def step(engine, batch, steps):
        ran.append(batch)
        return {"batch": batch, "p50_us": 1.0, "p99_us": 1.0, "tokens_per_s": 1.0}

    def prefill(engine, length):
        ran.append(length)
        return {"length": length, "prefill_ms": 1, "steps_ms": 1, "speedup": 1, "max_state_diff": 0}

    monkeypatch.setattr(bench, "bench_step", step)
    monkeypatch.setattr(bench, "bench_prefill", prefill)
    monkeypatch.setattr(bench, "available_bytes", lambda: 2**30)
    argv = ["bench", str(toy_token_model["model_dir"]), *flags]
    assert cli.main(argv) == 2
    assert f"ssmstream bench: not enough memory: {said}" in caplog.text and not ran
    monkeypatch.setattr(bench, "available_bytes", lambda: None)  # not known: not checked
    assert cli.main(argv) == 0 and ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_bytes_reads_meminfo():
    with open("/proc/meminfo") as f:
        total = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemTotal:"))
    assert 0 < bench.available_bytes() <= total


def test_available_bytes_takes_a_cgroup_limit_that_leaves_less(monkeypatch, tmp_path):
    (tmp_path / "memory.max").write_text("3000000\n")
    (tmp_path / "memory.current").write_text("1000000\n")
    real = bench.Path
    monkeypatch.setattr(bench, "Path", lambda p: tmp_path if p == "/sys/fs/cgroup" else real(p))
    assert bench.available_bytes() == 2_000_000  # well below MemAvailable
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable
    assert bench.available_bytes() > 2_000_000


def test_bench_prefill_reports_how_far_prefill_is_from_stepping(clock):
    """max_state_diff is prefill's final state against the state after the same inputs
    stepped one at a time (here prefill ends 0.5 off)."""

    class OffPrefill(FakeEngine):
        def prefill(self, x, s):
            y, s = super().prefill(x, s)
            return y, s + 0.5

    r = bench.bench_prefill(OffPrefill(clock, prefill_s=0.001, step_s=0.001), 6)
    assert r["max_state_diff"] == pytest.approx(0.5)


def test_bench_prefill_times_a_call_after_a_warm_up_call(clock):
    """The first prefill (onnxruntime's first run of a shape: allocations) is not the one
    timed."""

    class SlowFirstPrefill(FakeEngine):
        def prefill(self, x, s):
            self.clock.t += 1.0 if self.calls == 0 else 0.002
            self.calls += 1
            return None, s + x.shape[1]

    r = bench.bench_prefill(SlowFirstPrefill(clock, step_s=0.001), 4)
    assert r["prefill_ms"] == pytest.approx(2.0)


def test_bench_opens_the_engine_with_the_device_and_threads_asked_for(toy_token_model, monkeypatch):
    made = []

    def engine(model_dir, **kw):
        made.append(kw)
        return Engine(
            model_dir, device="cpu", threads=kw["threads"], step_threads=kw["step_threads"]
        )

    monkeypatch.setattr(bench, "Engine", engine)
    model = str(toy_token_model["model_dir"])
    argv = ["bench", model, "--device", "cuda", "--threads", "1", "--step-threads", "2",
            "--steps", "2", "--prefill", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    assert made == [{"device": "cuda", "threads": 1, "step_threads": 2}]


def test_available_bytes_is_memavailable_not_memtotal(monkeypatch, tmp_path):
    import io

    meminfo = "MemTotal:       8388608 kB\nMemFree:  1024 kB\nMemAvailable:   1048576 kB\n"
    real_open = open

    def fake_open(path, *a, **kw):
        return io.StringIO(meminfo) if path == "/proc/meminfo" else real_open(path, *a, **kw)

    monkeypatch.setattr(bench, "open", fake_open, raising=False)
    real = bench.Path
    monkeypatch.setattr(bench, "Path", lambda p: tmp_path if p == "/sys/fs/cgroup" else real(p))
    assert bench.available_bytes() == 1048576 * 1024  # no cgroup files here: MemAvailable
