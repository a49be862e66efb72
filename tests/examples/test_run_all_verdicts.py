"""benchmarks/run_all.py: each headline target is met exactly AT its stated bound ("≥ 3×",
"≤ 1.5×", ...), the rows read the right entries of their result (the B = 64 slab summary,
the bare-run overhead row, the largest L), unit conversions, and the machine table's load
averages. Inputs are hand-made with exactly representable ratios."""

from __future__ import annotations

import json

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def ra():
    return load_script("benchmarks/run_all.py")


def ms(x):
    return {"median_ms": x}


# --- "≥ bound" and "≤ bound" targets hold at the bound itself ---------------------------------


def test_ort_speedup_of_exactly_3x_meets_the_target(ra):
    """T_ORT says "≥ 3×": torch 0.75 ms vs ORT 0.25 ms is exactly 3×."""
    step = {"ort": {"batch": {"1": ms(0.25)}}, "torch": {"batch": {"1": ms(0.75)}}}
    row = ra.row_ort_vs_torch({"bench_export": {"step": step}}, "1")
    assert row.ratio == 3.0 and row.met is True


def test_prefill_speedup_of_exactly_20x_meets_the_target(ra):
    """T_PREFILL says "≥ 20×": 20 isolated 1 ms steps vs one 1 ms prefill call is 20×."""
    e = {"prefill": {"T": 20, "prefill": ms(1.0), "steps": ms(25.0)},
         "step": {"ort": {"batch": {"1": ms(1.0)}}}}  # fmt: skip
    row = ra.row_prefill({"bench_export": e}, "probe")
    assert row.ratio == 20.0 and row.met is True


def test_ttft_of_exactly_1_5x_meets_the_target(ra):
    """T_TTFT says "≤ 1.5×"."""
    t = {"step_ratio": 1.5, "generate_ratio": 1.0, "T": 1024, "in_process_prefill": ms(50.0)}
    row = ra.row_ttft({"bench_export": {"shipped": {"ttft": t}}})
    assert row.ratio == 1.5 and row.met is True


def test_recurrent_cost_growing_exactly_1_5x_is_still_flat(ra):
    """T_POSITION reads "flat" as ≤ 1.5× over L: 1.0 → 1.5 ms is met."""
    pos = {"stream": {"positions": {"64": ms(1.0), "4096": ms(1.5)}},
           "recompute": {"ort_prefill": {"64": ms(2.0), "4096": ms(60.0)},
                         "torch_conv": {"64": ms(3.0), "4096": ms(30.0)}}}  # fmt: skip
    row = ra.row_position({"bench_export": {"position": pos}})
    assert row.met is True and row.ratio == 20.0  # 30 ms / 1.5 ms


def test_batcher_on_off_of_exactly_5x_meets_the_target(ra):
    th = [{"streams": 64, "batching": True, "tokens_per_s": 500.0},
          {"streams": 64, "batching": False, "tokens_per_s": 100.0}]  # fmt: skip
    row = ra.row_batcher({"bench_runtime": {"throughput": th, "model": {"state_size": 8}}})
    assert row.ratio == 5.0 and row.met is True


def test_engine_overhead_of_exactly_1_2x_meets_the_target(ra):
    rows = [{"variant": "Engine.step", "B": 1, "ratio": 1.2, "us_per_call": 0.0},
            {"variant": "bare InferenceSession.run", "B": 1, "ratio": 1.0,
             "us_per_call": 10.0}]  # fmt: skip
    row = ra.row_engine_overhead({"bench_runtime": {"overhead": rows, "model": {"state_size": 8}}})
    assert row.ratio == 1.2 and row.met is True


def _server(runs, summary=None):
    return {"bench_server": {"runs": runs, "summary": summary or {},
                             "bare_engine_step": {"p50_ms": 0.25, "cpu_ms_per_token": 0.5},
                             "meta": {"machine": "x86_64 2 CPUs, Linux"}}}  # fmt: skip


def _run(c, on, p50=1.0, tps=100.0, server_cpu=0.5, client_cpu=0.5):
    return {"clients": c, "batching": on, "p50_ms": p50, "tokens_per_s": tps,
            "extra": {"server_cpu_ms_per_token": server_cpu,
                      "client_cpu_ms_per_token": client_cpu}}  # fmt: skip


def test_server_rows_meet_their_targets_at_the_bound(ra):
    """gRPC overhead ≤ 3× (0.75 / 0.25), scaling ≥ 4× (400 / 100), batching on / off ≥ 5×
    (500 / 100), own CPU ≤ 1.5×."""
    res = _server([_run(1, True, p50=0.75, tps=100.0), _run(64, True, tps=500.0),
                   _run(64, False, tps=100.0)])  # fmt: skip
    row = ra.row_grpc_overhead(res)
    assert row.ratio == 3.0 and row.met is True
    res["bench_server"]["runs"][1]["tokens_per_s"] = 400.0
    row = ra.row_server_scaling(res)
    assert row.ratio == 4.0 and row.met is True
    res["bench_server"]["runs"][1]["tokens_per_s"] = 500.0
    row = ra.row_server_on_off(res)
    assert row.ratio == 5.0 and row.met is True
    own = {"ratio": 1.5, "server_cpu_ms_per_token": 1.0, "bare_engine_cpu_ms_per_token": 0.25,
           "echo_cpu_ms_per_token": 0.5}  # fmt: skip
    res["bench_server"]["summary"] = {"own_cpu": {"1": own}}
    row = ra.row_own_cpu(res, 1)
    assert row.ratio == 1.5 and row.met is True


def test_bytes_per_session_of_exactly_1_1x_meets_the_target(ra):
    s = {"S_times_4": 10, "slab_bytes_per_session": 10, "rss_bytes_per_session": 11,
         "sessions": 100}  # fmt: skip
    row = ra.row_bytes_per_session({"bench_runtime": {"sessions": s}})
    assert row.ratio == 1.1 and row.met is True


def test_prefix_cache_of_exactly_20x_and_rewind_of_exactly_1x_meet_their_targets(ra):
    m = {"ready_hit": 0.001, "ready_miss": 0.02, "rewind": 0.005,
         "chunk_step_and_snapshot": 0.005}  # fmt: skip
    r = {"median_s": m, "T": 1024, "ready_speedup": 20.0, "hit_speedup": 5.0,
         "rewind_vs_chunk": 1.0}  # fmt: skip
    assert ra.row_prefix_cache({"bench_sessions": r}).met is True
    row = ra.row_rewind({"bench_sessions": r})
    assert row.ratio == 1.0 and row.met is True


def test_gpu_speedup_of_exactly_2x_meets_the_target(ra):
    g = {"env": {"device": "cuda", "gpu": "card"}, "model": {"d_output": 4},
         "results": {"ort_slab": [{"batch": 64, "tokens_per_s": 2000.0}],
                     "torch_eager": [{"batch": 64, "tokens_per_s": 1000.0}]}}  # fmt: skip
    row = ra.row_gpu_speedup({"bench_gpu": g})
    assert row.ratio == 2.0 and row.met is True


# --- which entries a row reads ----------------------------------------------------------------


def test_slab_row_reads_the_b64_summary_whatever_its_place(ra):
    summary = [
        {"B": 1, "slot_random_vs_in_place": 3.0, "slot_random_vs_copying": 3.0},
        {"B": 64, "slot_random_vs_in_place": 0.8, "slot_random_vs_copying": 0.5},
        {"B": 256, "slot_random_vs_in_place": 2.0, "slot_random_vs_copying": 2.0},
    ]
    res = {"bench_runtime_shipped": {"slab": {"summary": summary}, "model": {"state_size": 8}}}
    row = ra.row_slab(res)
    assert row.ratio == 0.8 and row.met is True and "0.50× of gather" in row.value


def test_engine_overhead_prints_the_bare_runs_time_not_another_variants(ra):
    """bench_runtime writes four variants per B; the µs shown is the bare session's."""
    rows = []
    for B, bare_us in ((1, 100.0), (64, 900.0)):
        rows += [
            {"variant": "bare InferenceSession.run", "B": B, "ratio": 1.0, "us_per_call": bare_us},
            {"variant": "Engine.step", "B": B, "ratio": 1.1, "us_per_call": 1.1 * bare_us},
            {"variant": "Engine.step(out=StepBuffers)", "B": B, "ratio": 1.05, "us_per_call": 7.0},
            {"variant": "Engine.run_slots", "B": B, "ratio": 0.9, "us_per_call": 8.0},
        ]
    row = ra.row_engine_overhead({"bench_runtime": {"overhead": rows, "model": {"state_size": 8}}})
    assert row.value == "B = 1: **1.10×** (bare 100 µs), B = 64: **1.10×** (bare 900 µs)"


def test_position_row_with_only_one_recompute_series(ra):
    """An export result that timed only the ORT prefill: the missing torch series is left out,
    the row is still judged on the one there."""
    pos = {"stream": {"positions": {"64": ms(1.0), "4096": ms(1.2)}},
           "recompute": {"ort_prefill": {"64": ms(2.0), "4096": ms(48.0)}}}  # fmt: skip
    row = ra.row_position({"bench_export": {"position": pos}})
    assert row.met is True and row.ratio == pytest.approx(40.0)


def test_position_row_from_bench_model_converts_microseconds_to_ms(ra):
    """Without bench_export, bench_model's torch step (µs per token) stands in, in ms."""
    rows = [{"L": 256, "step_us_per_token": 1000.0, "conv_ms": 2.0},
            {"L": 1024, "step_us_per_token": 1100.0, "conv_ms": 11.0}]  # fmt: skip
    row = ra.row_position({"bench_model": {"conv_vs_steps": rows}})
    assert row.source == "bench_model" and row.ratio == pytest.approx(10.0)  # 11 ms / 1.1 ms
    assert "recurrent 1.000 → 1.100 ms" in row.value and row.met is True


def test_server_on_off_row_counts_busy_cores(ra):
    """cores busy = tokens/s × (server + client CPU ms per token) / 1000."""
    res = _server([_run(64, True, tps=2000.0, server_cpu=0.25, client_cpu=0.75),
                   _run(64, False, tps=400.0, server_cpu=0.5, client_cpu=0.5)])  # fmt: skip
    row = ra.row_server_on_off(res)
    assert "cores busy (server + clients): 2.0 on, 0.4 off, of 2" in row.value


def test_machine_table_shows_the_load_at_start_and_end(ra, tmp_path):
    """bench_sessions records os.getloadavg() at start and end; the table shows the
    1-minute figure of each."""
    m = {"ready_hit": 0.001, "ready_miss": 0.025, "miss_on": 0.0102, "miss_off": 0.0100,
         "rewind": 0.004, "chunk_step_and_snapshot": 0.005}  # fmt: skip
    r = {"model": "toy", "median_s": m, "T": 1024, "ready_speedup": 25.0, "hit_speedup": 5.0,
         "miss_cost": 1.0, "rewind_vs_chunk": 0.8, "load_avg_start": [1.5, 0.5, 0.25],
         "load_avg": [2.0, 0.75, 0.25]}  # fmt: skip
    (tmp_path / "bench_sessions.json").write_text(json.dumps(r))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    line = next(x for x in (tmp_path / "REPORT.md").read_text().splitlines()
                if x.startswith("| [bench_sessions]"))  # fmt: skip
    assert "| 1.5 → 2.0 |" in line
