"""A short soak in the suite: benchmarks/soak.py's `run_soak` (the same code as the full run)
with 256 concurrent sessions × 24 tokens on the toy model, server in a subprocess.

Checks: no errors, every session at position N with the state and last output of an
in-process prefill of its tokens (no lost or corrupted state), the server's RSS flat after
warm-up, and a clean exit on SIGTERM. The full soak (256 × 400 tokens on a real-size model)
is `python benchmarks/soak.py`; its results are in benchmarks/results/soak.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import soak  # noqa: E402


def test_short_soak_has_no_errors_no_lost_state_and_flat_memory(toy, tmp_path):
    cfg = soak.SoakConfig(
        sessions=256, tokens=24, client_procs=1, max_batch=256, device="cpu",
        warmup=0.3, rss_interval=0.05, timeout=120, out=None, plot=False,
    )  # fmt: skip
    r = soak.run_soak(toy["model_dir"], cfg, tmp_path)
    assert r["errors"] == {}, r["error_messages"]
    assert r["tokens_answered"] == 256 * 24
    assert r["lost_sessions"] == 0 and r["corrupted_sessions"] == 0
    assert r["max_abs_error_vs_prefill"] < 1e-4
    assert r["server_exit_code"] == 0
    # flat after warm-up (medians of the first / last third of the samples after it); the
    # full soak (100k tokens) bounds a per-token leak far tighter
    assert r["rss"]["growth_after_warmup_mb"] < 5.0, r["rss"]
    assert r["latency_ms"]["p99"] > 0
