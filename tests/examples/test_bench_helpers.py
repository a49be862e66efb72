"""The pure helpers of benchmarks/*.py that compute the ratios, verdicts and statistics the
result JSONs (and so REPORT.md) carry, on hand-made inputs with exactly known answers."""

from __future__ import annotations

import pytest
from scripts import load_script

# --- bench_server: summarize, own_costs, median_run -------------------------------------------


def _runs(bs):
    def run(c, on, p50, tps, cpu, server="ssmstream"):
        return bs.Run(clients=c, batching=on, tokens=1, seconds=1.0, tokens_per_s=tps, p50_ms=p50,
                      p99_ms=1.0, mean_ms=1.0, server=server,
                      extra={"server_cpu_ms_per_token": cpu})  # fmt: skip

    runs = [
        run(1, True, 0.6, 100.0, 0.5),
        run(1, False, 0.3, 120.0, 0.75),
        run(64, True, 2.0, 600.0, 0.1875),
        run(64, False, 8.0, 100.0, 0.5),
    ]
    echo = [run(1, False, 0.2, 500.0, 0.125, "echo"), run(64, False, 1.0, 4000.0, 0.125, "echo")]
    return runs, echo


BARE = {
    "p50_ms": 0.15,
    "cpu_ms_per_token": 0.25,
    "batch_cpu_ms_per_token": {"1": 0.25, "64": 0.0625},
}


def test_server_summary_ratios_and_verdicts():
    bs = load_script("benchmarks/bench_server.py")
    runs, echo = _runs(bs)
    s = bs.summarize(BARE, runs, echo)
    # overhead: the faster of the two 1-client runs (batching off here) over the bare step
    assert s["overhead_ratio_1_client"] == pytest.approx(0.3 / 0.15) and s["overhead_ok"] is True
    assert s["tokens_per_s_64_over_1"] == pytest.approx(6.0) and s["scaling_ok"] is True
    assert s["server_minus_echo_p50_ms"] == pytest.approx(0.1)
    assert s["echo_tokens_per_s_64_over_1"] == pytest.approx(8.0)
    one, many = s["own_cpu"]["1"], s["own_cpu"]["64"]
    assert (one["own_cpu_ms_per_token"], one["ratio"], one["ok"]) == (0.25, 2.0, False)
    assert (many["own_cpu_ms_per_token"], many["ratio"], many["ok"]) == (0.125, 1.0, True)
    # latency: the batching-on run's p50 over echo p50 + bare step p50
    assert s["latency_1_client_over_echo_plus_step"] == pytest.approx(0.6 / 0.35)
    assert s["latency_ok"] is False
    assert s["server_cpu_1_client_over_step_cpu"] == pytest.approx(2.0) and s["cpu_over_step_ok"]
    assert s["batching_on_over_off_64"] == pytest.approx(6.0) and s["on_off_ok"] is True


def test_server_summary_verdicts_on_the_other_side():
    bs = load_script("benchmarks/bench_server.py")
    runs, echo = _runs(bs)
    runs[2].tokens_per_s = 300.0  # 64 clients: 3× the 1-client rate, 3× batching off
    s = bs.summarize(BARE, runs, echo)
    assert s["scaling_ok"] is False and s["on_off_ok"] is False
    no_step_cpu = dict(BARE, cpu_ms_per_token=0.0)  # not measured: no ratio, no verdict
    s = bs.summarize(no_step_cpu, runs, echo)
    assert s["server_cpu_1_client_over_step_cpu"] is None and s["cpu_over_step_ok"] is None


def test_median_run_takes_the_median_of_each_number():
    bs = load_script("benchmarks/bench_server.py")
    rs = [
        bs.Run(clients=8, batching=True, tokens=t, seconds=1.0, tokens_per_s=tps, p50_ms=p50,
               p99_ms=1.0, mean_ms=1.0, errors=e, extra={"server_cpu_ms_per_token": cpu})
        for t, tps, p50, e, cpu in ((10, 1.0, 3.0, 0, 0.1), (20, 5.0, 1.0, 1, None),
                                    (30, 3.0, 2.0, 2, 0.3))
    ]  # fmt: skip
    m = bs.median_run(rs)
    assert (m.tokens, m.tokens_per_s, m.p50_ms, m.errors) == (60, 3.0, 2.0, 3)
    assert m.extra["server_cpu_ms_per_token"] == pytest.approx(0.2)  # None left out
    assert m.extra["tokens_per_s_each"] == [1.0, 5.0, 3.0] and m.extra["repeats"] == 3


# --- bench_export: _ms, targets ---------------------------------------------------------------


def test_export_ms_median_and_p90():
    be = load_script("benchmarks/bench_export.py")
    r = be._ms([0.001 * i for i in (10, 1, 9, 2, 8, 3, 7, 4, 6, 5)])
    assert r["median_ms"] == pytest.approx(5.5) and r["p90_ms"] == pytest.approx(9.0)
    assert r["n"] == 10


def test_export_targets_judge_each_number():
    be = load_script("benchmarks/bench_export.py")
    par = {"prefill_vs_step": {"max_rel_output": 1e-6, "max_rel_state": 2e-6},
           "step_vs_torch": {"max_rel": 5e-4}}  # fmt: skip
    res = {
        "prefill": {"T": 1024, "prefill": {"median_ms": 10.0}},
        "step": {"ort": {"batch": {"1": {"median_ms": 0.25}}}},
        "parity": par,
        "ttft": {"T": 1024, "step_ratio": 1.2, "generate_ratio": 1.8},
    }
    rows = be.targets(res)
    assert [(r["value"], r["met"]) for r in rows] == [
        (pytest.approx(25.6), True),  # 1024 × 0.25 / 10
        (5e-4, False),  # the torch parity error is the worst
        (1.2, True),
        (1.8, False),
    ]


def test_export_steps_are_taken_at_their_faster_thread_count_per_batch_size():
    """The step the prefill target divides by is the fastest of its runs at B = 1 (the
    runtime's 1 thread where that wins), and each batch size takes its own fastest run."""
    be = load_script("benchmarks/bench_export.py")

    def run(threads, b1, b64):
        return {"threads": threads, "batch": {"1": {"median_ms": b1}, "64": {"median_ms": b64}}}

    runs = [run(None, 0.53, 26.0), run(1, 0.45, 41.0), run(None, 0.57, 27.0), run(1, 0.48, 45.8)]
    best = be.fastest_per_batch(runs)
    assert best["threads"] == {"1": 1, "64": None}
    assert {B: s["median_ms"] for B, s in best["batch"].items()} == {"1": 0.45, "64": 26.0}
    assert be._threads(best["threads"]) == "1 thread at B = 1, all cores at B = 64"
    res = {"prefill": {"T": 1024, "prefill": {"median_ms": 10.0}}, "step": {"ort": best}}
    res["parity"] = {"prefill_vs_step": {"max_rel_output": 0, "max_rel_state": 0},
                     "step_vs_torch": {"max_rel": 0}}  # fmt: skip
    assert be.targets(res)[0]["value"] == pytest.approx(1024 * 0.45 / 10)


# --- soak: rss_summary ------------------------------------------------------------------------


def test_soak_rss_growth_is_late_third_minus_early_third_after_warmup():
    soak = load_script("benchmarks/soak.py")
    mb = [100, 100, 100, 10, 12, 50, 50, 50, 20, 22]  # t = 0..9 s; warm-up: t < 0.25 × 9
    r = soak.rss_summary([(float(t), int(m * 2**20), 0) for t, m in enumerate(mb)], 0.25)
    assert (r["after_warmup_mb"], r["end_mb"]) == (11.0, 21.0)
    assert r["growth_after_warmup_mb"] == pytest.approx(10.0)
    assert (r["start_mb"], r["max_mb"], r["samples"]) == (100.0, 100.0, 10)


# --- profile_server: summarize ----------------------------------------------------------------


def test_profile_summarize_charges_the_innermost_named_frame(tmp_path):
    ps = load_script("benchmarks/profile_server.py")
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "main.py:run;asyncio/base_events.py:_run_once;runtime/engine.py:step;"
        "onnxruntime/capi/session.py:run 30\n"
        "main.py:run;asyncio/base_events.py:_run_once;runtime/server.py:handle 10\n"
        "main.py:run;asyncio/base_events.py:select 20\n"
        "main.py:run;foo.py:bar 40\n"
    )
    shares, top = ps.summarize(raw, seconds=2, rate=100)
    assert shares == {
        "GIL held (share of the sampling window)": 0.5,
        "other": 0.4,
        "onnxruntime's Python wrapper": 0.3,
        "asyncio event loop and gRPC's Cython callbacks": 0.2,
        "ssmstream runtime": 0.1,
    }
    assert top == [
        ("foo.py:bar", 0.4),
        ("onnxruntime/capi/session.py:run", 0.3),
        ("asyncio/base_events.py:select", 0.2),
        ("runtime/server.py:handle", 0.1),
    ]


# --- bench_gpu: state_floor -------------------------------------------------------------------


def test_gpu_state_floor_ratio_is_measured_over_floor():
    bg = load_script("benchmarks/bench_gpu.py")
    S, bw = 1024, 100.0
    out = bg.state_floor({"ort_slab": [{"batch": 64, "p50_ms": 2.0}]}, S, bw)
    f = {(x["model"], x["batch"]): x for x in out}
    floor = 1e3 * 2 * 64 * S * 4 / (bw * 1e9)
    assert f[("fp32", 64)]["floor_ms"] == pytest.approx(floor)
    assert f[("fp32", 64)]["ratio"] == pytest.approx(2.0 / floor)
    assert f[("fp32", 1024)]["ratio"] is None and f[("fp16", 64)]["p50_ms"] is None


# --- bench_runtime: _alternate ----------------------------------------------------------------


def test_alternate_keeps_the_median_round_and_on_over_off_pairs():
    br = load_script("benchmarks/bench_runtime.py")
    values = {False: iter([100.0, 300.0, 200.0]), True: iter([600.0, 900.0, 1200.0])}
    order = []

    def run(flag):
        order.append(flag)
        return {"batching": flag, "tokens_per_s": next(values[flag])}

    off, on = br._alternate(3, run)
    assert order == [False, True, True, False, False, True]
    assert off["tokens_per_s"] == 200.0 and on["tokens_per_s"] == 900.0
    assert off["rounds_tokens_per_s"] == [100.0, 300.0, 200.0]
    assert on["pair_ratios"] == [6.0, 3.0, 6.0]


# --- bench_scaleout: table --------------------------------------------------------------------


def test_scaleout_table_is_valid_markdown():
    so = load_script("benchmarks/bench_scaleout.py")
    assert so.table("T", ["a", "b"], [[1, 2]]) == ["", "## T", "", "| a | b |", "|---|---|",
                                                    "| 1 | 2 |"]  # fmt: skip
