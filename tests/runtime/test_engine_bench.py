"""`ssmstream bench`: runs on a model, its prefill agrees with stepping, bad input is refused."""

from __future__ import annotations

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
