"""benchmarks/bench_gpu.py in its CPU smoke mode, on the cached tiny export (a few seconds).

Checks the report's structure and two facts computed independently of the bench's
counters: Engine.step moves inputs + 2 states + outputs per step, the slab step inputs +
slots + outputs only (from the model's S and V); the variants compute the same outputs
(ORT fp32 vs slab vs torch eager); and the state floor is 2·B·S·4 bytes at the bandwidth.
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
    assert set(res) == {"torch_eager", "ort_fp32", "ort_slab", "ort_slab_graph"}
    assert set(rep["skipped"]) == {"ort_fp16", "ort_slab_fp16"}
    for name in res:
        assert [r["batch"] for r in res[name]] == [1, 4]
    for r in res["ort_fp32"]:
        B = r["batch"]
        assert r["bytes_per_step"] == B * 8 + 2 * B * S * 4 + B * V * 4
        assert r["tokens_per_s"] > 0 and r["p50_ms"] > 0 and r["steps"] == 4
    for r in res["ort_slab"] + res["ort_slab_graph"]:  # B = 1, 4 are buckets: no padding
        B = r["batch"]
        assert r["bytes_per_step"] == B * 8 + B * 8 + B * V * 4  # tokens, slots, logits: no state
        assert (r["bytes_in_per_step"], r["bytes_out_per_step"]) == (B * 16, B * V * 4)
        assert r["max_abs_err_vs_ort_fp32"] < 1e-4
    floor = {(f["model"], f["batch"]): f for f in rep["floor"]}
    assert set(floor) == {(m, B) for m in ("fp32", "fp16") for B in (64, 1024)}
    for (_, B), f in floor.items():  # not measured at B = 1, 4; the floor at 4800 GB/s
        assert f["ratio"] is None and f["floor_ms"] == pytest.approx(1e3 * 2 * B * S * 4 / 4800e9)
    for r in res["torch_eager"]:
        assert r["max_abs_err_vs_ort_fp32"] < 1e-3
    tr = rep["traffic"]  # the slot graph's passes over the state, counted statically
    ops = {n["op"]: n["bytes_per_row"] for n in tr["nodes"]}
    assert ops["GatherND"] == ops["ScatterND"] == 2 * 4 * S  # one row read + written, each
    assert tr["bytes_per_row"] == sum(n["bytes_per_row"] for n in tr["nodes"])
    assert tr["passes"] == pytest.approx(tr["bytes_per_row"] / (8 * S)) and tr["passes"] > 3
    assert "the floor" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--device", "tpu"])
    with pytest.raises(SystemExit):
        bench.main(["--variants", "ort_fp64"])
    assert "--variants" in capsys.readouterr().err
