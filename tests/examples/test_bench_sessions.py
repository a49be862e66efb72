"""benchmarks/bench_sessions.py runs end to end on a toy model (a smoke run: one round, short
prompts) and its report states each target; the ratios themselves come from real runs."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_bench_sessions_smoke(tmp_path, monkeypatch):
    runtime_conftest = _load(ROOT / "tests" / "runtime" / "conftest.py", "bench_toy_conftest")
    toy = runtime_conftest.build_toy(tmp_path / "toy", "tokens", V=11, d_out=11)
    bench = _load(ROOT / "benchmarks" / "bench_sessions.py", "bench_sessions_smoke")
    scratch = tmp_path / "scratch"  # where the servers' temporary directories go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = bench.run(str(toy["model_dir"]), T=16, rounds=1, cache_mb=0.01)
    assert list(scratch.iterdir()) == []  # each server's directory removed when it stopped
    keys = ("hit", "miss_on", "miss_off", "rewind", "ready_hit", "ready_miss", "ready_empty")
    for key in (*keys, "echo_ready_prompt", "echo_ready_empty"):
        assert r["median_s"][key] > 0
    m = r["median_s"]
    assert r["transport_ceiling"] == m["ready_miss"] / m["echo_ready_prompt"]
    text = bench.report(r)
    for words in ("session ready", "floor", "transport floor", "time to first token",
                  "cache on vs off", "rewind"):  # fmt: skip
        assert words in text
