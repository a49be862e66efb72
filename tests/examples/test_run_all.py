"""benchmarks/run_all.py: each headline row's ratio and its met / NOT met verdict, on small
hand-made result dicts on both sides of the target; the report's summary line, partial or
invalid result files, and the CLI's checks (no benchmark runs: run_one is replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def ra():
    return load_script("benchmarks/run_all.py")


def ms(x):
    return {"median_ms": x}


# --- bench_export rows ------------------------------------------------------------------------


def _export_step(ort1, torch1, ort64=1.0, torch64=1.0):
    return {"bench_export": {"step": {
        "ort": {"batch": {"1": ms(ort1), "64": ms(ort64)}},
        "torch": {"batch": {"1": ms(torch1), "64": ms(torch64)}},
    }}}  # fmt: skip


def test_ort_vs_torch_is_torch_over_ort_and_judged_only_at_b1(ra):
    row = ra.row_ort_vs_torch(_export_step(0.1, 0.4), "1")
    assert row.ratio == pytest.approx(4.0) and row.met is True and row.target == ra.T_ORT
    assert "**4.00×** (0.100 ms vs 0.400 ms)" in row.value
    assert ra.row_ort_vs_torch(_export_step(0.2, 0.5), "1").met is False  # 2.5× < 3×
    row = ra.row_ort_vs_torch(_export_step(1, 1, ort64=0.1, torch64=1.0), "64")
    assert row.ratio == pytest.approx(10.0) and row.met is None and row.target == "—"


def _ttft(step_ratio, generate_ratio):
    t = {"step_ratio": step_ratio, "generate_ratio": generate_ratio, "T": 1024,
         "in_process_prefill": ms(50.0)}  # fmt: skip
    return {"bench_export": {"shipped": {"ttft": t}}}


def test_ttft_headline_is_the_worse_of_step_and_generate(ra):
    row = ra.row_ttft(_ttft(1.2, 1.8))
    assert row.ratio == pytest.approx(1.8) and row.met is False
    assert "(Step 1.20×, Generate 1.80×" in row.value
    assert ra.row_ttft(_ttft(1.6, 1.1)).met is False  # Step alone misses
    row = ra.row_ttft(_ttft(1.4, 1.1))
    assert row.ratio == pytest.approx(1.4) and row.met is True


def _position(stream, ort_prefill, torch_conv):
    return {"bench_export": {"position": {
        "stream": {"positions": {str(L): ms(v) for L, v in stream.items()}},
        "recompute": {
            "ort_prefill": {str(L): ms(v) for L, v in ort_prefill.items()},
            "torch_conv": {str(L): ms(v) for L, v in torch_conv.items()},
        },
    }}}  # fmt: skip


def test_position_row_needs_flat_recurrent_and_every_recompute_growing(ra):
    ok = _position({64: 1.0, 4096: 1.2}, {64: 2.0, 4096: 50.0}, {64: 3.0, 4096: 30.0})
    row = ra.row_position(ok)
    assert row.met is True
    assert row.ratio == pytest.approx(30.0 / 1.2)  # the cheapest recompute at the last L
    assert "recurrent 1.000 → 1.200 ms" in row.value and "(1.20×, ORT step)" in row.value
    # recurrent grows 2× over L: not flat
    grows = _position({64: 1.0, 4096: 2.0}, {64: 2, 4096: 50}, {64: 3, 4096: 30})
    assert ra.row_position(grows).met is False
    # recurrent shrinks 2×: flat (rec[-1] / rec[0] = 0.5)
    shrinks = _position({64: 2.0, 4096: 1.0}, {64: 2, 4096: 50}, {64: 3, 4096: 30})
    assert ra.row_position(shrinks).met is True
    # one recompute does not grow: the shape asked for is not there
    flat_rc = _position({64: 1.0, 4096: 1.2}, {64: 2.0, 4096: 50.0}, {64: 30.0, 4096: 3.0})
    assert ra.row_position(flat_rc).met is False


# --- bench_runtime rows -----------------------------------------------------------------------


def test_batcher_row_takes_the_on_and_off_rows_at_64_streams(ra):
    th = [  # the off row first: a filter on streams alone would pick it as "on"
        {"streams": 64, "batching": False, "tokens_per_s": 100.0},
        {"streams": 64, "batching": True, "tokens_per_s": 600.0},
        {"streams": 1, "batching": True, "tokens_per_s": 50.0},
        {"streams": 1, "batching": False, "tokens_per_s": 50.0},
    ]
    res = {"bench_runtime": {"throughput": th, "model": {"state_size": 2048}}}
    row = ra.row_batcher(res)
    assert row.ratio == pytest.approx(6.0) and row.met is True
    assert "**6.00×** (600 vs 100 tokens/s)" in row.value


def _slab(r, copying=0.5, paired=None):
    s = {"B": 64, "slot_random_vs_in_place": r, "slot_random_vs_copying": copying}
    if paired:
        s["paired_slot_random_vs_in_place"] = paired
    return {"bench_runtime_shipped": {"slab": {"summary": [s]}, "model": {"state_size": 16384}}}


def test_slab_row_met_only_at_or_below_the_in_place_step(ra):
    assert ra.row_slab(_slab(0.9)).met is True
    assert ra.row_slab(_slab(1.0)).met is True
    row = ra.row_slab(_slab(1.2, paired={"p25": 1.1, "p75": 1.3}))
    assert row.met is False and row.ratio == pytest.approx(1.2)
    assert "per round 1.10–1.30" in row.value
    row = ra.row_slab(_slab(None))  # the graph does not run in place: not judged
    assert row.met is None and row.ratio is None
    assert row.value.startswith("in-place n/a (the graph does not run in place); 0.50×")


def test_engine_overhead_row_is_judged_on_the_worst_batch(ra):
    rows = [
        {"variant": "Engine.step", "B": 1, "ratio": 1.1, "us_per_call": 0},
        {"variant": "bare InferenceSession.run", "B": 1, "ratio": 1.0, "us_per_call": 100.0},
        {"variant": "Engine.step", "B": 64, "ratio": 1.5, "us_per_call": 0},
        {"variant": "bare InferenceSession.run", "B": 64, "ratio": 1.0, "us_per_call": 900.0},
    ]
    row = ra.row_engine_overhead({"bench_runtime": {"overhead": rows, "model": {"state_size": 8}}})
    assert row.ratio == pytest.approx(1.5) and row.met is False
    assert "B = 1: **1.10×** (bare 100 µs), B = 64: **1.50×** (bare 900 µs)" == row.value


def _rss(points):
    return {"bench_runtime": {"rss": [{"tokens": t, "rss_mib": m} for t, m in points]}}


def test_rss_row_flat_means_within_2_mib_either_way_over_1m_tokens(ra):
    assert ra.row_rss(_rss([(1000, 100.0), (1_000_000, 101.5)])).met is True
    row = ra.row_rss(_rss([(1000, 100.0), (1_000_000, 97.0)]))  # shrank 3 MiB: not flat
    assert row.met is False and row.ratio == pytest.approx(-3.0)
    row = ra.row_rss(_rss([(1000, 100.0), (100_000, 100.5)]))  # a short run: not judged
    assert row.met is None and "a short run: the target is over 1 M tokens" in row.value


def _sessions(S4, slab, rss):
    s = {"S_times_4": S4, "slab_bytes_per_session": slab, "rss_bytes_per_session": rss,
         "sessions": 1000}  # fmt: skip
    return {"bench_runtime": {"sessions": s}}


def test_bytes_per_session_row(ra):
    row = ra.row_bytes_per_session(_sessions(8192, 8192, 8192 * 1.05))
    assert row.met is True and row.ratio == pytest.approx(1.05)
    row = ra.row_bytes_per_session(_sessions(8192, 8192, 8192 * 1.3))  # RSS 1.3 × S × 4
    assert row.met is False and row.ratio == pytest.approx(1.3)
    assert ra.row_bytes_per_session(_sessions(8192, 16384, 8192)).met is False  # slab ≠ S × 4


# --- bench_server rows ------------------------------------------------------------------------


def _server(runs, summary=None, bare=None):
    return {"bench_server": {"runs": runs, "summary": summary or {},
                             "bare_engine_step": bare or {"p50_ms": 0.25, "cpu_ms_per_token": 0.5},
                             "meta": {"machine": "x86_64 2 CPUs, Linux"}}}  # fmt: skip


def _run(c, on, p50=1.0, tps=100.0):
    return {"clients": c, "batching": on, "p50_ms": p50, "tokens_per_s": tps,
            "extra": {"server_cpu_ms_per_token": 0.5, "client_cpu_ms_per_token": 0.5}}  # fmt: skip


def test_grpc_overhead_row_takes_the_faster_1_client_run(ra):
    res = _server([_run(1, True, p50=0.9), _run(1, False, p50=0.6), _run(64, True, p50=9.0)])
    row = ra.row_grpc_overhead(res)
    assert row.ratio == pytest.approx(0.6 / 0.25) and row.met is True
    assert "(p50 0.60 ms vs bare Engine.step 0.25 ms)" in row.value


def test_latency_and_cpu_rows_are_met_at_or_below_their_bounds(ra):
    runs = [_run(1, True, p50=0.5)]
    for r, met in ((1.2, True), (1.3, True), (1.4, False)):
        s = {"latency_1_client_over_echo_plus_step": r, "echo_p50_ms_1_client": 0.2}
        assert ra.row_server_latency(_server(runs, s)).met is met, r
    for r, met in ((2.0, True), (3.0, True), (3.5, False)):
        s = {"server_cpu_1_client_over_step_cpu": r}
        row = ra.row_server_cpu_vs_step(_server(runs, s))
        assert row.met is met and row.ratio == pytest.approx(r), r


def test_one_client_rows_show_the_echo_step_floor_where_measured(ra):
    """The 1-client own CPU, latency and CPU ÷ step rows name the ratio the echo server that
    also runs the bare step reads (summary `echo_step`); the 64-client row and a summary
    without it name none, and the verdict stays the server's own."""
    own = {"ratio": 3.0, "server_cpu_ms_per_token": 1.0, "bare_engine_cpu_ms_per_token": 0.25,
           "echo_cpu_ms_per_token": 0.25}  # fmt: skip
    floor = {"own_cpu_ratio": 2.5, "latency_over_echo_plus_step": 1.75, "cpu_over_step": 7.25}
    s = {"own_cpu": {"1": own, "64": own}, "latency_1_client_over_echo_plus_step": 2.0,
         "echo_p50_ms_1_client": 0.2, "server_cpu_1_client_over_step_cpu": 8.0}  # fmt: skip
    runs = [_run(1, True, p50=0.5)]
    floored = _server(runs, {**s, "echo_step": floor})
    says = "a bare grpc.aio server running only the step: "
    rows = ((ra.row_own_cpu(floored, 1), "2.50×"), (ra.row_server_latency(floored), "1.75×"),
            (ra.row_server_cpu_vs_step(floored), "7.25×"))  # fmt: skip
    for row, shown in rows:
        assert f"{says}{shown})" in row.value and row.met is False, row.value
    assert says not in ra.row_own_cpu(floored, 64).value
    for row in (ra.row_own_cpu(_server(runs, s), 1), ra.row_server_latency(_server(runs, s)),
                ra.row_server_cpu_vs_step(_server(runs, s))):  # fmt: skip
        assert says not in row.value


# --- bench_model, soak, bench_sessions, scale-out, GPU ------------------------------------------


def test_conv_row_needs_conv_faster_at_every_length(ra):
    rows = [
        {"L": 256, "steps_over_conv": 0.8, "max_abs_diff": 1e-6},
        {"L": 512, "steps_over_conv": 3.0, "max_abs_diff": 2e-6},
    ]
    row = ra.row_conv_vs_steps({"bench_model": {"conv_vs_steps": rows}})
    assert row.met is False  # slower at L = 256
    assert row.ratio == pytest.approx(3.0) and "**3.00×** at L = 512 (0.8× or more" in row.value
    rows[0]["steps_over_conv"] = 1.5
    assert ra.row_conv_vs_steps({"bench_model": {"conv_vs_steps": rows}}).met is True


def _soak(errors=None, lost=0, corrupted=0, exit_code=0):
    s = {"errors": errors or {}, "lost_sessions": lost, "corrupted_sessions": corrupted,
         "sessions": 4, "config": {"tokens": 10}, "latency_ms": {"p99": 5.0},
         "rss": {"growth_after_warmup_mb": 0.1}}  # fmt: skip
    if exit_code is not None:
        s["server_exit_code"] = exit_code
    return {"soak": s}


def test_soak_row_any_error_loss_corruption_or_bad_exit_is_not_met(ra):
    assert ra.row_soak(_soak()).met is True
    row = ra.row_soak(_soak(corrupted=1))
    assert row.met is False and row.ratio == 1.0
    assert ra.row_soak(_soak(lost=2)).met is False
    row = ra.row_soak(_soak(errors={"UNAVAILABLE": 2, "INTERNAL": 1}))
    assert row.met is False and row.ratio == 3.0 and "**3 errors, 0 lost" in row.value
    assert ra.row_soak(_soak(exit_code=1)).met is False  # the server did not exit cleanly
    assert ra.row_soak(_soak(exit_code=None)).met is False  # and not recorded


def _bench_sessions(ready_speedup=25.0, miss_cost=1.0, rewind=0.8):
    m = {"ready_hit": 0.001, "ready_miss": 0.025, "miss_on": 0.0102, "miss_off": 0.0100,
         "rewind": 0.004, "chunk_step_and_snapshot": 0.005}  # fmt: skip
    r = {"model": "toy", "median_s": m, "T": 1024, "ready_speedup": ready_speedup,
         "hit_speedup": 5.0, "miss_cost": miss_cost, "rewind_vs_chunk": rewind}  # fmt: skip
    return {"bench_sessions": r}


def test_bench_sessions_rows(ra):
    assert ra.row_prefix_cache(_bench_sessions(25.0)).met is True
    row = ra.row_prefix_cache(_bench_sessions(8.9))
    assert row.met is False and row.ratio == 8.9
    assert ra.row_cache_miss(_bench_sessions(miss_cost=1.05)).met is True
    row = ra.row_cache_miss(_bench_sessions(miss_cost=1.2))
    assert row.met is False and row.value == "**1.200×** (10.20 vs 10.00 ms)"
    assert ra.row_rewind(_bench_sessions(rewind=0.8)).met is True
    row = ra.row_rewind(_bench_sessions(rewind=1.25))
    assert row.met is False and row.ratio == 1.25
    assert row.value.startswith("**1.25×** (4.00 vs 5.00")


def test_failover_row_counts_lost_steps_over_every_run(ra):
    runs = [
        {"lease_ttl_s": 1, "failover_s_median": 1.5, "moved": 4, "lost_steps_total": 0},
        {"lease_ttl_s": 3, "failover_s_median": 3.5, "moved": 4, "lost_steps_total": 2},
    ]
    row = ra.row_failover({"bench_scaleout": {"failover": runs}})
    assert row.met is False and row.ratio == 2.0
    assert row.value.endswith("; 2 acknowledged steps lost")
    runs[1]["lost_steps_total"] = 0
    assert ra.row_failover({"bench_scaleout": {"failover": runs}}).met is True


def _gpu(device, ort_tps=3000.0, eager_tps=1000.0, slab_bytes=None, V=16):
    io = 64 * 8 + 64 * 8 + 64 * V * 4
    env = {"device": device, "gpu": "NVIDIA H100" if device == "cuda" else None}
    results = {
        "ort_slab": [{"batch": 64, "tokens_per_s": ort_tps,
                      "bytes_per_step": io if slab_bytes is None else slab_bytes}],
        "torch_eager": [{"batch": 64, "tokens_per_s": eager_tps, "bytes_per_step": 0}],
    }  # fmt: skip
    return {"bench_gpu": {"env": env, "model": {"d_output": V}, "results": results}}


def test_gpu_rows_are_judged_only_on_a_cuda_card(ra):
    row = ra.row_gpu_speedup(_gpu("cuda"))
    assert row.met is True and row.ratio == pytest.approx(3.0) and "NVIDIA H100" in row.value
    assert ra.row_gpu_speedup(_gpu("cuda", ort_tps=1500.0)).met is False
    row = ra.row_gpu_speedup(_gpu("cpu"))  # a CPU smoke run: shown, not judged
    assert row.met is None and "CPU smoke run, not a GPU figure" in row.value
    assert ra.row_gpu_bytes(_gpu("cpu")).met is None
    named = _gpu("cpu")  # a card name beside a CPU run still does not make it a GPU figure
    named["bench_gpu"]["env"]["gpu"] = "NVIDIA H100"
    assert ra.row_gpu_speedup(named).met is None and ra.row_gpu_bytes(named).met is None
    io = 64 * 8 + 64 * 8 + 64 * 16 * 4
    row = ra.row_gpu_bytes(_gpu("cuda"))
    assert row.met is True and f"(inputs + slots + outputs = {io:,} B)" in row.value
    assert ra.row_gpu_bytes(_gpu("cuda", slab_bytes=io + 64 * 4)).met is False  # + some state


# --- report, load_results, CLI --------------------------------------------------------------


def test_summary_line_counts_met_and_lists_only_the_missed(ra, tmp_path):
    result = _bench_sessions(8.9)["bench_sessions"]
    (tmp_path / "bench_sessions.json").write_text(json.dumps(result))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    line = next(x for x in text.splitlines() if "targets met" in x)
    assert line == "2 of 3 targets met; not met: prefix cache: session ready, cached vs new prompt."


def test_invalid_json_is_left_out_not_fatal(ra, tmp_path):
    (tmp_path / "bench_model.json").write_text("{ not json")
    (tmp_path / "bench_sessions.json").write_text(json.dumps(_bench_sessions()["bench_sessions"]))
    res = ra.load_results(tmp_path)
    assert list(res) == ["bench_sessions"]
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "| training tokens/s | not measured (bench_model.json missing) |" in text


@pytest.fixture
def fake_runs(ra, monkeypatch):
    """run_one replaced: records the commands, answers with the exit codes given per script."""
    calls, codes = [], {}

    def run_one(cmd, timeout):
        calls.append((Path(cmd[1]).name, timeout))
        return codes.get(Path(cmd[1]).name, 0)

    monkeypatch.setattr(ra, "run_one", run_one)
    return calls, codes


def test_timeout_must_be_positive(ra, fake_runs, tmp_path, capsys):
    calls, _ = fake_runs
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            ra.main(["--only", "model", "--timeout", bad, "--results", str(tmp_path)])
        assert f"--timeout must be positive, got {float(bad)}" in capsys.readouterr().err
    assert calls == []


def test_report_only_refuses_skip(ra, fake_runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ra.main(["--report-only", "--skip", "gpu", "--results", str(tmp_path)])
    assert (
        "--report-only runs nothing: it takes no --quick, --only or --skip"
        in capsys.readouterr().err
    )
    assert fake_runs[0] == []


def test_a_timed_out_benchmark_fails_the_run(ra, fake_runs, tmp_path):
    calls, codes = fake_runs
    codes["bench_model.py"] = "timeout"
    assert ra.main(["--only", "model", "export", "--results", str(tmp_path), "--timeout", "5"]) == 1
    assert calls == [("bench_model.py", 5.0), ("bench_export.py", 5.0)]
    status = json.loads((tmp_path / "run_all.json").read_text())
    assert [(b["name"], b["exit"]) for b in status["benchmarks"]] == [
        ("model", "timeout"),
        ("export", 0),
    ]
    codes["bench_model.py"] = 3
    assert ra.main(["--only", "model", "--results", str(tmp_path)]) == 1
    codes["bench_model.py"] = 0
    assert ra.main(["--only", "model", "--results", str(tmp_path)]) == 0


def test_only_rerun_keeps_the_other_benchmarks_records_and_skip_skips(ra, fake_runs, tmp_path):
    calls, _ = fake_runs
    assert ra.main(["--only", "model", "export", "--results", str(tmp_path)]) == 0
    assert ra.main(["--only", "export", "soak", "--skip", "soak", "--results", str(tmp_path)]) == 0
    assert [c for c, _ in calls] == ["bench_model.py", "bench_export.py", "bench_export.py"]
    status = json.loads((tmp_path / "run_all.json").read_text())
    # model's record kept, export's replaced
    assert [b["name"] for b in status["benchmarks"]] == ["model", "export"]


def test_a_zero_denominator_gives_a_not_in_row_not_a_crash(ra):
    th = [{"streams": 64, "batching": True, "tokens_per_s": 600.0},
          {"streams": 64, "batching": False, "tokens_per_s": 0.0}]  # fmt: skip
    rows = ra.headline_rows({"bench_runtime": {"throughput": th, "model": {"state_size": 8}}})
    row = next(r for r in rows if r.measure == "Batcher on / off, 64 streams")
    assert row.met is None and row.value.startswith("not in bench_runtime.json (ZeroDivisionError")


def test_write_through_row_is_write_through_over_memory_at_the_most_clients(ra):
    p = [{"mode": m, "clients": c, "tokens_per_s": t} for m, c, t in (
        ("memory", 1, 1000.0), ("memory", 32, 4000.0), ("100ms", 1, 900.0), ("100ms", 32, 3600.0),
        ("1", 1, 800.0), ("1", 32, 2000.0))]  # fmt: skip
    row = ra.row_write_through({"bench_scaleout": {"persistence": p}})
    assert row.ratio == pytest.approx(0.5) and row.met is None
    assert row.value == ("write-through 0.50×, write-behind 100 ms 0.90× the tokens/s of the "
                         "in-memory store (32 clients)")  # fmt: skip


def test_prefill_row_uses_the_b1_step_of_each_model(ra):
    p = {"T": 1024, "prefill": ms(10.0), "steps": ms(300.0)}
    e = {"prefill": p, "step": {"ort": {"batch": {"1": ms(0.25), "64": ms(5.0)}}},
         "shipped": {"prefill": p, "step": {"batch": {"1": ms(0.125), "64": ms(4.0)}}}}  # fmt: skip
    row = ra.row_prefill({"bench_export": e}, "probe")
    assert row.ratio == pytest.approx(25.6) and row.met is True
    assert (
        "(10.0 ms vs 1,024 × 0.250 ms); vs 1,024 steps in a loop beside the prefill session: 30.0×"
        in row.value
    )
    row = ra.row_prefill({"bench_export": e}, "shipped")
    assert row.ratio == pytest.approx(12.8) and row.met is False


def test_a_result_without_its_model_field_still_gives_a_report(ra, tmp_path):
    """An older or partial result JSON: its row in the machine table says what is missing,
    the report is still written (a KeyError had aborted it)."""
    m = {"ready_hit": 0.001, "ready_miss": 0.025, "miss_on": 0.0102, "miss_off": 0.0100,
         "rewind": 0.004, "chunk_step_and_snapshot": 0.005}  # fmt: skip
    r = {"median_s": m, "T": 1024, "ready_speedup": 25.0, "hit_speedup": 5.0, "miss_cost": 1.0,
         "rewind_vs_chunk": 0.8}  # no "model": an older bench_sessions.json  # fmt: skip
    (tmp_path / "bench_sessions.json").write_text(json.dumps(r))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    assert "3 of 3 targets met" in (tmp_path / "REPORT.md").read_text()


def test_the_machine_table_names_each_benchmarks_recorded_cpu(ra, tmp_path):
    """The CPU column shows what a result records (bench_server's meta.cpu, bench_sessions'
    top-level cpu beside its `machine` string) and 'not recorded' where it records none; the
    report's own CPU line says it is only where the report was built."""
    (tmp_path / "bench_sessions.json").write_text(json.dumps(_bench_sessions()["bench_sessions"]))
    server = _server([_run(1, True)])["bench_server"]
    server["meta"]["cpu"] = "Example CPU 9000"
    server["config"] = {"d_model": 8, "n_layers": 1, "d_state": 4}
    (tmp_path / "bench_server.json").write_text(json.dumps(server))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "REPORT.md").read_text().splitlines()
    row = next(x for x in lines if x.startswith("| [bench_server]"))
    assert row.split(" | ")[2] == "Example CPU 9000"
    row = next(x for x in lines if x.startswith("| [bench_sessions]"))
    assert row.split(" | ")[2] == "not recorded"
    assert any(x.startswith("- this report was built on: ") for x in lines)
    sessions = {**_bench_sessions()["bench_sessions"], "machine": "x86_64", "cpu": "Other CPU"}
    (tmp_path / "bench_sessions.json").write_text(json.dumps(sessions))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "REPORT.md").read_text().splitlines()
    row = next(x for x in lines if x.startswith("| [bench_sessions]"))
    assert row.split(" | ")[2] == "Other CPU"


def test_a_runtime_benchmark_of_a_given_checkpoint_is_labelled_by_it_not_by_unused_flags(ra):
    """bench_runtime --ckpt records the size flags' defaults too (d_state 64); the report
    had labelled the shipped model (d_state 32) with them."""
    config = {"ckpt": "examples/checkpoints/byte-lm", "model": None, "d_model": 128,
              "n_layers": 4, "d_state": 64}  # fmt: skip
    res = {"bench_runtime_shipped": {"config": config, "model": {"state_size": 16384},
                                     "provider": "CPUExecutionProvider"}}  # fmt: skip
    label = ra._model_of(res, "bench_runtime_shipped")
    assert label == "examples/checkpoints/byte-lm; S = 16,384; CPUExecutionProvider"
    res["bench_runtime_shipped"]["config"] = {**config, "ckpt": None}
    assert ra._model_of(res, "bench_runtime_shipped").startswith("d_model 128, 4 layers, N 64;")


def test_quick_runtime_model_cache_is_per_results_dir(ra, tmp_path):
    """The quick runs cached their model in one fixed /tmp dir, shared by every checkout."""
    for name in ("runtime", "runtime_small", "runtime_shipped"):
        cmd = ra.BY_NAME[name].command(tmp_path, quick=True)
        assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / "runtime-model")
        assert "--work-dir" not in ra.BY_NAME[name].command(tmp_path, quick=False)


def test_results_written_is_the_time_the_json_records(ra, tmp_path):
    """Not the file's mtime (a fresh clone's time): that only where nothing is recorded."""
    path = tmp_path / "x.json"
    path.write_text("{}")
    assert ra._written({"meta": {"time": "2026-11-25T23:58:41"}}, path) == "2026-11-25 23:58"
    assert ra._written({"meta": {"date": "2026-12-05 07:23"}}, path) == "2026-12-05 07:23"
    assert ra._written({"when": "2026-01-02 03:04:05"}, path) == "2026-01-02 03:04"
    assert ra._written({"time": "2026-01-02T03:04:05"}, path) == "2026-01-02 03:04"
    assert ra._written({"meta": {"time": None}}, path).endswith("(file time)")
    server = _server([_run(1, True)])["bench_server"]
    server["meta"]["time"] = "2020-02-03T04:05:06"
    server["config"] = {"d_model": 8, "n_layers": 1, "d_state": 4}
    (tmp_path / "bench_server.json").write_text(json.dumps(server))
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "REPORT.md").read_text().splitlines()
    row = next(x for x in lines if x.startswith("| [bench_server]"))
    assert row.split(" | ")[1] == "2020-02-03 04:05"


def test_rebuild_hint_names_the_results_and_report_it_was_built_from(ra, tmp_path):
    assert ra.main(["--report-only", "--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert f"(rebuild: `python benchmarks/run_all.py --report-only --results {tmp_path}`;" in text
    report = tmp_path / "other" / "R.md"
    assert ra.main(["--report-only", "--results", str(tmp_path), "--report", str(report)]) == 0
    assert f"--report-only --results {tmp_path} --report {report}`;" in report.read_text()
