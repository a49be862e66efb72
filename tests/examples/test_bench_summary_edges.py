"""bench_server.summarize / median_run: each verdict holds exactly at its target, the derived
floors and in-situ ratios, and how repeats are folded into one row (sums of tokens and
seconds, medians of latencies)."""

from __future__ import annotations

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def bs():
    return load_script("benchmarks/bench_server.py")


def _run(bs, c, on, p50=1.0, tps=100.0, cpu=0.5, server="ssmstream", **extra):
    return bs.Run(clients=c, batching=on, tokens=1, seconds=1.0, tokens_per_s=tps, p50_ms=p50,
                  p99_ms=1.0, mean_ms=1.0, server=server,
                  extra={"server_cpu_ms_per_token": cpu, **extra})  # fmt: skip


BARE = {"p50_ms": 0.25, "cpu_ms_per_token": 0.5, "batch_cpu_ms_per_token": {"1": 0.25, "64": 0.25}}


def test_every_server_verdict_is_met_at_its_target(bs):
    """overhead ≤ 3× (0.75 / 0.25), scaling ≥ 4× (400 / 100), own CPU ≤ 1.5×
    ((1.0 − 0.25) / 0.5), batching on / off ≥ 5× (500 / 100)."""
    runs = [_run(bs, 1, True, p50=0.75, tps=100.0, cpu=1.0),
            _run(bs, 64, True, tps=400.0, cpu=1.0), _run(bs, 64, False, tps=80.0)]  # fmt: skip
    echo = [_run(bs, 1, False, p50=0.5, cpu=0.5, server="echo"),
            _run(bs, 64, False, cpu=0.5, server="echo")]  # fmt: skip
    s = bs.summarize(BARE, runs, echo)
    assert s["overhead_ratio_1_client"] == 3.0 and s["overhead_ok"] is True
    assert s["tokens_per_s_64_over_1"] == 4.0 and s["scaling_ok"] is True
    assert s["own_cpu"]["1"]["ratio"] == 1.5 and s["own_cpu"]["1"]["ok"] is True
    assert s["batching_on_over_off_64"] == 5.0 and s["on_off_ok"] is True


def test_floor_overhead_ratio_is_echo_plus_step_over_step(bs):
    """The least overhead a grpc.aio server running the step could show: (echo p50 + step
    p50) / step p50 = (0.5 + 0.25) / 0.25."""
    s = bs.summarize(BARE, [_run(bs, 1, True, p50=1.0)], [_run(bs, 1, False, p50=0.5,
                                                                 server="echo")])  # fmt: skip
    assert s["floor_overhead_ratio"] == pytest.approx(3.0)
    assert s["server_minus_echo_p50_ms"] == pytest.approx(0.5)


def test_outside_jobs_ratio_is_the_servers_cpu_outside_its_onnxruntime_calls(bs):
    """(server CPU − in-situ job time) ÷ echo CPU, per token: (1.0 − 0.5) / 0.25 = 2."""
    runs = [_run(bs, 1, True, cpu=1.0, server_job_ms_per_token=0.5)]
    echo = [_run(bs, 1, False, cpu=0.25, server="echo")]
    o = bs.summarize(BARE, runs, echo)["own_cpu"]["1"]
    assert o["own_cpu_ms_per_token"] == pytest.approx(0.75)
    assert o["outside_jobs_ratio"] == pytest.approx(2.0)


def test_echo_step_floor_is_scored_by_the_servers_formulas(bs):
    """The echo server that also runs the bare step (CPU 0.75, p50 0.6) against the echo
    (CPU 0.25, p50 0.5) and the bare step (CPU 0.5, engine at B = 1 0.25, p50 0.25): own CPU
    (0.75 − 0.25) / 0.25 = 2, CPU ÷ step 0.75 / 0.5 = 1.5, p50 0.6 / (0.5 + 0.25) = 0.8,
    the step adds 0.75 − 0.25 = 0.5 ms (1× the bare step's CPU); the server (CPU 1.0, p50 0.7)
    is 0.25 ms CPU and 0.1 ms p50 above it. Shown in the report; absent without the run."""
    runs = [_run(bs, 1, True, p50=0.7, cpu=1.0)]
    echo = [_run(bs, 1, False, p50=0.5, cpu=0.25, server="echo")]
    floor = [_run(bs, 1, False, p50=0.6, cpu=0.75, server="echo+step")]
    f = bs.summarize(BARE, runs, echo, floor)["echo_step"]
    assert f["own_cpu_ratio"] == pytest.approx(2.0)
    assert f["cpu_over_step"] == pytest.approx(1.5)
    assert f["latency_over_echo_plus_step"] == pytest.approx(0.8)
    assert f["step_in_situ_ms_per_token"] == pytest.approx(0.5)
    assert f["step_in_situ_over_bare"] == pytest.approx(1.0)
    assert f["server_cpu_above_ms_per_token"] == pytest.approx(0.25)
    assert f["server_p50_above_ms"] == pytest.approx(0.1)
    line = [x for x in bs.own_cost_lines({"echo_step": f}) if "echo+step" in x]
    assert len(line) == 1 and "**2.00×**" in line[0] and "0.250 ms CPU per token" in line[0]
    assert "echo_step" not in bs.summarize(BARE, runs, echo)
    assert "echo_step" not in bs.summarize(BARE, runs, [], floor)  # no echo: no ratios


def test_median_run_sums_seconds_and_takes_the_median_p99(bs):
    rs = [bs.Run(clients=4, batching=True, tokens=10, seconds=s, tokens_per_s=1.0, p50_ms=1.0,
                 p99_ms=p99, mean_ms=m) for s, p99, m in ((1.0, 5.0, 2.0), (2.0, 30.0, 1.0),
                                                           (4.0, 7.0, 3.0))]  # fmt: skip
    m = bs.median_run(rs)
    assert m.seconds == 7.0 and m.tokens == 30
    assert m.p99_ms == 7.0 and m.mean_ms == 2.0
