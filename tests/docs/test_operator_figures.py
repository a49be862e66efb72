"""The figures the operator pages state about the shipped model, the committed benchmark results
and the size of the randomized tests, against what they describe: the README's scale-out
persistence and failover rows are bench_scaleout.json's, the soak figures of the README and the
guarantees page are soak.json's, the README Limits' "slowest memory" is the shipped
checkpoint's, the scale-out page's write size is a snapshot of the shipped model, the compose
file's Redis keeps its data as that page says, and the guarantees page counts the fuzz and
property tests as they run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from ssmstream.protos import inference_pb2

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SCALEOUT = (ROOT / "docs" / "scaleout.md").read_text()
GUARANTEES = (ROOT / "docs" / "guarantees.md").read_text()
CKPT = ROOT / "examples" / "checkpoints" / "byte-lm"


def readme_row(words: str) -> str:
    """The 'measured' cell of the README's benchmark row whose measure contains `words`."""
    (row,) = [ln for ln in README.splitlines() if ln.startswith("| ") and words in ln]
    return row.split("|")[2]


def test_the_persistence_and_failover_rows_show_the_committed_scale_out_results():
    res = json.loads((ROOT / "benchmarks/results/bench_scaleout.json").read_text())
    at32 = {r["mode"]: r["tokens_per_s"] for r in res["persistence"] if r["clients"] == 32}
    through, behind = at32["1"] / at32["memory"], at32["100ms"] / at32["memory"]
    row = readme_row("write-through (`--persist-every 1`) vs in-memory store")
    assert f"{through:.2f}× the tokens/s; write-behind 100 ms: {behind:.2f}×" in row, row
    row = readme_row("failover after SIGKILL")
    shown = " / ".join(
        f"{f['failover_s_median']:.2f} s (lease {f['lease_ttl_s']:g} s)" for f in res["failover"]
    )
    assert f"first token elsewhere after {shown}" in row, (row, shown)
    lost = sum(f["lost_steps_total"] for f in res["failover"])
    assert f"{lost} acknowledged steps lost" in row, (row, lost)


def test_the_shipped_models_slowest_memory_is_within_the_parity_check_as_the_limits_say():
    from ssmstream.export.exporter import ExportConfig
    from ssmstream.export.modules import step_drift
    from ssmstream.export.verify import TOLERANCES
    from ssmstream.model.checkpoint import load_checkpoint

    steps, tol = ExportConfig().verify_steps, TOLERANCES["fp32"]["step_vs_torch"]
    text = " ".join(README.split())
    ((said_tol, said_steps),) = re.findall(r"past the (\S+) the ([\d,]+)-step parity check", text)
    assert (float(said_tol), int(said_steps.replace(",", ""))) == (tol, steps)
    drift = step_drift(load_checkpoint(CKPT), dt_scale=1.0, beyond=steps)
    memory = drift["memory"]
    (stated,) = re.findall(r"The shipped model's slowest memory is ~([\d,]+) steps", text)
    assert int(stated.replace(",", "")) == round(memory, -2), (stated, memory)
    assert "steps, within the check" in text and memory < steps and drift["max_rel"] == 0.0


def test_a_write_of_the_shipped_model_is_the_size_the_scale_out_page_states():
    from ssmstream.model.checkpoint import read_checkpoint_meta
    from ssmstream.model.network import SSMConfig
    from ssmstream.runtime.snapshots import SnapshotKey, encode_snapshot

    S = SSMConfig.from_dict(read_checkpoint_meta(CKPT)["model"]).state_size
    (kib,) = re.findall(
        r"S × 4 bytes plus a small header\s+per write, (\d+) KiB for the shipped", SCALEOUT
    )
    assert S * 4 == int(kib) * 1024, (S, kib)
    snap = encode_snapshot(SnapshotKey(b"k" * 32), "0" * 64, np.zeros(S, np.float32), 7)
    assert 0 < len(snap) - S * 4 < 256  # the header is small


def hypothesis_settings(test_file: str) -> list[dict[str, int]]:
    """The integer arguments of each `@settings(...)` in a test file."""
    source = (ROOT / "tests" / "reliability" / test_file).read_text()
    return [
        {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", block)}
        for block in re.findall(r"settings\((.*?)\)", source, re.S)
    ]


def test_the_guarantees_page_sizes_the_fuzz_and_property_tests_as_they_run():
    (fuzz,) = hypothesis_settings("test_fuzz.py")
    rpcs = len(inference_pb2.DESCRIPTOR.services_by_name["StreamingInference"].methods)
    per_rpc = fuzz["max_examples"]
    stated = (
        f"{per_rpc * rpcs} fuzz payloads ({per_rpc} random or mutated per RPC, all {rpcs} RPCs)"
    )
    assert stated in " ".join(GUARANTEES.split()), stated
    (machine,) = hypothesis_settings("test_properties.py")
    n, k = machine["max_examples"], machine["stateful_step_count"]
    stated = f"{n} random request sequences of {k} steps"
    assert stated in " ".join(GUARANTEES.split()), stated


def test_the_compose_redis_keeps_its_data_across_a_restart_as_the_scale_out_page_says():
    import yaml

    text = " ".join(SCALEOUT.split())
    assert "(AOF or RDB persistence, as `deploy/docker-compose.yml` and the Kubernetes" in text
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes", command
    (volume,) = redis["volumes"]
    name, _, path = volume.partition(":")
    assert path == "/data" and name in compose["volumes"], volume  # a named volume, kept


def test_the_soak_figures_are_the_committed_soak_run():
    r = json.loads((ROOT / "benchmarks/results/soak.json").read_text())
    n, tokens, lat, rss = r["sessions"], r["config"]["tokens"], r["latency_ms"], r["rss"]
    errors = sum(r["errors"].values())
    lost, corrupted = r["lost_sessions"], r["corrupted_sessions"]
    row = readme_row(f"soak: {n} sessions × {tokens} tokens over gRPC")
    assert f"{errors} errors, {lost} lost, {corrupted} corrupted; p99 {lat['p99']:.0f} ms" in row
    text = " ".join(GUARANTEES.split())
    stated = (
        f"{n} concurrent sessions × {tokens} tokens = {r['tokens_answered']:,} tokens over "
        f"`Stream` on a random-init byte model (S = {r['meta']['state_size']}) in "
        f"{r['seconds']:.0f} s ({r['tokens_per_s']:.0f} tokens/s, "
        f"{r['config']['client_procs']} client processes on the same 2 cores): {errors} errors, "
        f"{lost} lost, {corrupted} corrupted sessions (snapshot vs in-process prefill: max abs "
        f"error {r['max_abs_error_vs_prefill']:.1e}), per-token latency p50 {lat['p50']:.0f} ms, "
        f"p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; server RSS "
        f"{rss['after_warmup_mb']:.0f} MB after warm-up, {rss['end_mb']:.0f} MB at the end "
        f"(one +{rss['growth_after_warmup_mb']:.0f} MB allocator step, then flat); exit "
        f"{r['server_exit_code']} after SIGTERM"
    )
    assert stated.replace("e-0", "e-") in text, stated
