"""benchmarks/bench_sessions.py runs end to end on a toy model (a smoke run: one round, short
prompts) and its report states each target; the ratios themselves come from real runs."""

from __future__ import annotations

import tempfile

from scripts import load_script


def test_bench_sessions_smoke(tmp_path, monkeypatch):
    toy = load_script("tests/runtime/conftest.py").build_toy(tmp_path / "toy", V=11, d_out=11)
    bench = load_script("benchmarks/bench_sessions.py")
    scratch = tmp_path / "scratch"  # where the servers' temporary directories go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = bench.run(str(toy["model_dir"]), T=16, rounds=1, cache_mb=0.01)
    assert list(scratch.iterdir()) == []  # each server's directory removed when it stopped
    keys = ("hit", "miss_on", "miss_off", "rewind", "ready_hit", "ready_miss", "ready_empty")
    for key in (*keys, "echo_ready_prompt", "echo_ready_empty", "echo_ttft"):
        assert r["median_s"][key] > 0
    m = r["median_s"]
    assert r["transport_ceiling"] == m["ready_miss"] / m["echo_ready_prompt"]
    assert r["ttft_transport_ceiling"] == m["miss_on"] / m["echo_ttft"]
    assert r["ready_speedup"] == m["ready_miss"] / m["ready_hit"]  # > 1: the hit is faster
    assert r["hit_speedup"] == m["miss_on"] / m["hit"]
    assert r["ready_ceiling"] == m["ready_miss"] / m["ready_empty"]
    assert r["miss_cost"] == m["miss_on"] / m["miss_off"]  # ≤ 1.05: the cache costs little
    assert r["rewind_vs_chunk"] == m["rewind"] / m["chunk_step_and_snapshot"]
    text = bench.report(r)
    for words in ("session ready", "floor", "transport floor", "time to first token",
                  "Generate with the prompt to the bare server", "cache on vs off",
                  "rewind"):  # fmt: skip
        assert words in text
