"""benchmarks/bench_gpu.py in its CPU smoke mode, on the cached tiny export (a few seconds).

Checks the report's structure and two facts computed independently of the bench's
counters: Engine.step moves inputs + 2 states + outputs per step, the resident batch
inputs + outputs only (from the model's S and V); and the variants compute the same
outputs (ORT fp32 vs resident vs torch eager).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_cpu_smoke(tiny_token_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _bench()
    out = tmp_path / "bench_gpu"
    argv = [
        "--device", "cpu", "--batches", "1,4", "--steps", "4", "--warmup", "1",
        "--model-dir", str(tiny_token_model["model_dir"]),
        "--ckpt", str(tiny_token_model["ckpt_dir"]), "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "ort_fp32" in out.with_suffix(".md").read_text()
    cfg = tiny_token_model["config"]
    S, V = cfg.state_size, cfg.vocab_size
    res = rep["results"]
    assert set(res) == {"torch_eager", "ort_fp32", "ort_resident"}
    assert set(rep["skipped"]) == {"ort_fp16", "ort_resident_fp16", "ort_cuda_graph"}
    for name in res:
        assert [r["batch"] for r in res[name]] == [1, 4]
    for r in res["ort_fp32"]:
        B = r["batch"]
        assert r["bytes_per_step"] == B * 8 + 2 * B * S * 4 + B * V * 4
        assert r["tokens_per_s"] > 0 and r["p50_ms"] > 0 and r["steps"] == 4
    for r in res["ort_resident"]:
        assert r["bytes_per_step"] == r["batch"] * 8 + r["batch"] * V * 4  # no state
        assert r["max_abs_err_vs_ort_fp32"] < 1e-4
    for r in res["torch_eager"]:
        assert r["max_abs_err_vs_ort_fp32"] < 1e-3
    with pytest.raises(SystemExit):
        bench.main(["--device", "tpu"])
    with pytest.raises(SystemExit):
        bench.main(["--variants", "ort_fp64"])
    assert "--variants" in capsys.readouterr().err
