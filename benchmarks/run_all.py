"""Run every benchmark of the project and write benchmarks/results/REPORT.md.

    python benchmarks/run_all.py                  # every benchmark (long: ~1 h on 2 CPUs)
    python benchmarks/run_all.py --quick          # small models, short runs (a smoke test;
                                                  #   results go to a temp dir, not results/)
    python benchmarks/run_all.py --only export server
    python benchmarks/run_all.py --report-only    # rebuild REPORT.md from results/*.json
    python benchmarks/run_all.py --only gpu       # on a GPU machine (benchmarks/gpu/README.md)
    make bench                                    # == the first line

bench_gpu runs by default only where onnxruntime's CUDA provider is usable; its rows say
which card they were taken on (a `--device cpu` smoke result is shown but not judged).

Each benchmark runs as its own subprocess (`python benchmarks/bench_*.py --out RESULTS ...`)
and writes RESULTS/NAME.{json,md,png}; one failing does not stop the others. The report
then reads the JSONs (whatever is there: a benchmark never run shows as "not measured")
and writes

    REPORT.md                   the machine, ONE table of headline ratios with their
                                targets and met / NOT met, the plots,
                                links to each benchmark's own table
    report_position.png         per-token cost vs stream position (recurrent vs recompute)
    report_throughput.png       aggregate tokens/s vs concurrent streams (Batcher, server)
    report_prefill.png          prefill vs sequential steps (ORT) and conv vs steps (torch)

next to REPORT.md. Ratios are "a / b" of two numbers measured in the same run of the
same script, so a shared, loaded machine moves both; its load average is recorded.

Dimension letters: B batch, L stream position / sequence length, T prefill length,
C concurrent streams, S packed state size.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ssmstream.runtime.config import HelpFormatter

log = logging.getLogger("run_all")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK_RESULTS = Path("/tmp/ssmstream-bench-quick")
STATUS_FILE = "run_all.json"  # what the last run_all did (exit codes, seconds)


# --- what the benchmark scripts share ----------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM raise Stopped (a SystemExit(143)) in the main thread: by default it ends the
    process at once, skipping the `finally` blocks that stop a benchmark's servers and remove its
    temporary directories (run_all's --timeout and Ctrl-C send it; so does `kill`). A second
    SIGTERM ends the process at once, as before. For a script's `__main__` block (run_script):
    a process wide setting, not one for a `main()` that tests or other scripts call."""
    if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
        signal.signal(signal.SIGTERM, _exit_on_signal)


class Stopped(SystemExit):
    """A benchmark stopped by a signal (exit_on_sigterm): status 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)


def _exit_on_signal(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Stopped(signum)


def run_script(main: Callable[[], int], name: str) -> None:
    """A benchmark's `__main__`: exit with main()'s status. A SIGTERM stops it with one line
    ("NAME: stopped by SIGTERM") and 143 after its `finally` blocks ran (exit_on_sigterm);
    Ctrl-C with one line and 130, a closed stdout pipe with 141 (as the ssmstream commands)."""
    from ssmstream.runtime.cli import run_command

    exit_on_sigterm()
    try:
        status = run_command(main, name)
    except Stopped as e:
        print(f"{name}: stopped by {e.signal.name}", file=sys.stderr)
        status = e.code
    sys.exit(status)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back until the block ends, then deliver them: Stopped from
    exit_on_sigterm, KeyboardInterrupt from Ctrl-C. For a torch export, which turns an exception
    raised inside it into its own (a long traceback, status 1) or loses it (in an import, a
    __del__; see export/cli.py's _signals_end_the_export). The same signal a second time while
    held ends the process at once. Signals without a Python handler (default, ignored) are
    left as they are, as are threads other than the main one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame) -> None:
        signal.signal(signum, signal.SIG_DFL)
        pending.append(signum)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    held = {s: h for s, h in handlers.items() if callable(h)}
    try:  # handlers put back even if a signal lands between two of these calls
        for s in held:
            signal.signal(s, hold)
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)  # its own handler runs now, outside the block


def export_model(*args, **kwargs) -> Path:
    """ssmstream.export.export_model with SIGTERM and SIGINT held until it returns (signals_held):
    the one export every benchmark calls."""
    import ssmstream.export

    with signals_held():
        return ssmstream.export.export_model(*args, **kwargs)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (else a usage error that names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def ints_at_least(low: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each >= low ("1,16,64")."""
    one = int_at_least(low)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(x) for x in text.split(",") if x.strip())
        if not values:
            raise argparse.ArgumentTypeError("no values given")
        return values

    return parse


def dir_with(name: str) -> Callable[[str], str]:
    """An argparse type: a directory holding the file `name` (manifest.json: an exported
    model; config.json: a checkpoint), checked before any work starts."""

    def parse(text: str) -> str:
        if not (Path(text) / name).is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is not a directory holding {name}")
        return text

    return parse


def out_dir(text: str) -> str:
    """An argparse type: a results directory, or a path where one can be made, that this
    process can write into; checked before any work starts (and not made here), not after it
    when the results are written."""
    if why := _unwritable(Path(text)):
        raise argparse.ArgumentTypeError(f"cannot write results into {text!r}: {why}")
    return text


def out_file(text: str) -> str:
    """An argparse type: a file to write (or a path to which suffixes are added), in a
    directory out_dir accepts."""
    path = Path(text)
    why = _unwritable(path.parent)  # first: is_dir() raises below a directory it cannot search
    if why or path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {why or 'it is a directory'}")
    return text


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be made or written as a directory; None if it can."""
    try:  # exists() raises for a path below a directory this process cannot search
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    except OSError as e:
        return f"{e.filename or path}: {e.strerror or e}"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


# --- the benchmarks ----------------------------------------------------------------------


@dataclass
class Bench:
    """One benchmark script: its flags for a full and a quick run (`--out` is added)."""

    name: str
    script: str
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    results: str = ""  # base name of its result files (default: the script's stem)
    out_prefix: bool = False  # its --out is a path without suffix, not a directory
    needs_cuda: bool = False  # run by default only where CUDA is usable
    # its quick run caches its exported model in OUT/runtime-model (--work-dir): one cache
    # per results directory, so two checkouts do not share one
    quick_cache: bool = False

    def __post_init__(self):
        self.results = self.results or Path(self.script).stem

    def command(self, out: Path, quick: bool) -> list[str]:
        args = self.quick if quick else self.full
        if quick and self.quick_cache:
            args = [*args, "--work-dir", str(out / "runtime-model")]
        dest = out / self.results if self.out_prefix else out
        return [sys.executable, str(HERE / self.script), *args, "--out", str(dest)]


_TINY = ["--d-model", "32", "--n-layers", "2", "--d-state", "16"]
_SHORT = ["--streams", "1", "64", "--seconds", "0.5", "--rss-tokens", "5000", "--sessions", "500"]
_SMALL = ["--name", "bench_runtime_small", "--d-model", "64", "--n-layers", "2", "--d-state", "16"]
_SHIPPED = [
    "--name",
    "bench_runtime_shipped",
    "--ckpt",
    str(HERE.parent / "examples/checkpoints/byte-lm"),
]
_SHIPPED += ["--streams", "1", "16", "64", "256", "--throughput-rounds", "5"]
BENCHMARKS = [
    Bench(
        "model",
        "bench_model.py",
        quick=["--lengths", "256", "1024", "--conv-repeats", "1", "--train-steps", "2"]
        + ["--train-warmup", "1", "--train-seq-len", "256", *_TINY],
    ),
    Bench("export", "bench_export.py", quick=["--quick"]),
    Bench(
        "runtime",
        "bench_runtime.py",
        quick=[*_TINY, *_SHORT],
        quick_cache=True,
    ),
    Bench(
        "runtime_small",  # the same with a small state (S = 2048): where batching pays most
        "bench_runtime.py",
        full=_SMALL,
        quick=[*_SMALL, *_SHORT],
        results="bench_runtime_small",
        quick_cache=True,
    ),
    Bench(
        "runtime_shipped",  # the shipped byte-level LM (S = 16,384): the realistic case
        "bench_runtime.py",
        full=[*_SHIPPED, "--sections", "overhead", "throughput", "slab"],
        quick=[
            *_SHIPPED,
            *_SHORT,
            "--sections",
            "throughput",
            "slab",
            "--throughput-rounds",
            "1",
            "--overhead-calls",
            "500",
        ],
        results="bench_runtime_shipped",
        quick_cache=True,
    ),
    Bench(
        "server",
        "bench_server.py",
        quick=[*_TINY, "--clients", "1,64", "--budget", "400", "--repeats", "1"],
    ),
    Bench("sessions", "bench_sessions.py", quick=["--rounds", "3"]),  # exports the shipped model
    Bench("soak", "soak.py", quick=["--sessions", "16", "--tokens", "40"], results="soak"),
    Bench("scaleout", "bench_scaleout.py", quick=["--quick"]),  # needs redis-server, nginx
    Bench(
        "gpu",
        "bench_gpu.py",
        quick=["--batches", "1,64", "--steps", "20", "--warmup", "5"],
        out_prefix=True,
        needs_cuda=True,
    ),
]
BY_NAME = {b.name: b for b in BENCHMARKS}


def run_one(cmd: list[str], timeout: float | None) -> int | str:
    """Run one benchmark in its own process group; on timeout, Ctrl-C or SIGTERM stop the
    whole group (benchmarks start servers and worker processes of their own)."""
    proc = subprocess.Popen(cmd, cwd=HERE.parent, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return "timeout"
    except (KeyboardInterrupt, SystemExit):
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM first: each benchmark then stops its servers and removes its temporary
    directories (exit_on_sigterm); SIGKILL after a grace period, long enough for an export
    under way to finish first (signals_held: some 35 s for the shipped model on 2 busy cores)."""
    for sig, grace in ((signal.SIGTERM, 90), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_benchmarks(names: list[str], out: Path, quick: bool, timeout: float | None) -> list[dict]:
    """Run the named benchmarks one after the other; returns their status records."""
    out.mkdir(parents=True, exist_ok=True)
    status = []
    for name in names:
        bench = BY_NAME[name]
        cmd = bench.command(out, quick)
        log.info("== %s: %s", name, " ".join(cmd[1:]))
        t0 = time.perf_counter()
        rc = run_one(cmd, timeout)
        seconds = time.perf_counter() - t0
        (log.info if rc == 0 else log.error)("== %s: exit %s after %.0f s", name, rc, seconds)
        status.append({"name": name, "command": cmd[1:], "exit": rc, "seconds": seconds})
    # keep the records of benchmarks this run did not touch (an --only rerun)
    path, earlier = out / STATUS_FILE, []
    if path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("benchmarks", [])
        except json.JSONDecodeError:
            earlier = []
    ran = {s["name"] for s in status}
    record = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "benchmarks": [b for b in earlier if b.get("name") not in ran] + status,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return status


# --- reading the results -----------------------------------------------------------------


def load_results(results: Path) -> dict[str, dict]:
    """{result base name: parsed JSON} for each benchmark whose JSON exists in `results`."""
    found = {}
    for bench in BENCHMARKS:
        path = results / f"{bench.results}.json"
        if path.is_file():
            try:
                found[bench.results] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                log.warning("%s is not valid JSON (%s): left out of the report", path, e)
    return found


@dataclass
class Row:
    """One line of the headline table."""

    measure: str
    value: str  # the measured number(s), formatted
    target: str  # "≥ 3×", or "—" where there is none
    met: bool | None  # None: no target, or not measured
    source: str  # the result file it comes from
    ratio: float | None = None  # the headline number itself (for tests and tools)


# each target, stated in the terms of its measure (where only a shape is asked for, e.g.
# "flat", the bound is this report's reading of it)
T_ORT = "ORT ≥ 3× faster at B = 1"
T_PREFILL = "prefill ≥ 20× faster"
T_TTFT = "gRPC ≤ 1.5× the in-process prefill"
T_OWN_CPU = "≤ 1.5× the echo server's"
T_LATENCY = "≤ 1.3× echo + step"
T_CPU_STEP = "≤ 3× the bare step's"
T_POSITION = "recurrent flat (≤ 1.5× over L), recompute growing"
T_BATCHER = "batching on ≥ 5× the tokens/s of off"
T_ENGINE = "Engine.step ≤ 1.2× the bare call"
T_GRPC = "gRPC p50 ≤ 3× the bare step"
T_SCALING = "64 clients ≥ 4× the tokens/s of 1"
T_RSS = "flat: < 2 MiB over 1 M tokens"
T_SESSION = "slab = S × 4; RSS ≤ 1.1 × S × 4"
T_CONV = "conv faster: > 1× at every L"
T_SOAK = "0 errors / lost / corrupted"
T_GPU = "slab ORT ≥ 2× torch eager at B = 64"
T_SLAB = "slot step ≤ the in-place step"
T_FAILOVER = "0 acknowledged steps lost with write-through"
T_GPU_BYTES = "inputs + slots + outputs only"
T_REPORTED = "reported (no target)"
T_CACHE = "a cached prompt's session ready ≥ 20× sooner"
T_MISS = "a miss costs ≤ 1.05× the prefill without a cache"
T_REWIND = "rewind ≤ one chunk's replay + one checkpoint copy"


def _ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:,.0f}×"


def _median(d: dict) -> float:
    return float(d["median_ms"])


def row_ort_vs_torch(res: dict, B: str) -> Row:
    s = res["bench_export"]["step"]
    ort, torch = _median(s["ort"]["batch"][B]), _median(s["torch"]["batch"][B])
    r = torch / ort
    target, met = (T_ORT, r >= 3) if B == "1" else ("—", None)
    value = f"**{_ratio(r)}** ({ort:.3f} ms vs {torch:.3f} ms)"
    return Row(f"ORT step vs torch eager step, B = {B}", value, target, met, "bench_export", r)


def _export_model(res: dict, model: str) -> dict:
    """bench_export's results for "probe" (its top level) or "shipped" (its `shipped` part)."""
    e = res["bench_export"]
    return e if model == "probe" else e["shipped"]


def row_prefill(res: dict, model: str = "probe") -> Row:
    """One prefill call of T inputs vs T × the median isolated ORT step (B = 1, the step
    timed in its own process), as the prefill target is stated; the interleaved step loop
    beside it."""
    e = _export_model(res, model)
    p = e["prefill"]
    T, pre, loop = p["T"], _median(p["prefill"]), _median(p["steps"])
    step = _median((e["step"]["ort"] if model == "probe" else e["step"])["batch"]["1"])
    r = T * step / pre
    value = (
        f"**{_ratio(r)}** ({pre:.1f} ms vs {T:,} × {step:.3f} ms); vs {T:,} steps in a loop "
        f"beside the prefill session: {_ratio(loop / pre)}"
    )
    measure = f"prefill T = {T} (one call) vs {T} isolated ORT steps, {model} model"
    return Row(measure, value, T_PREFILL, r >= 20, "bench_export", r)


def row_ttft(res: dict, model: str = "shipped") -> Row:
    """Time to first token of a T-token prompt through gRPC (unary Step, Generate) ÷ the
    in-process prefill of the same prompt; the worse of the two is the headline."""
    t = _export_model(res, model)["ttft"]
    step, gen = float(t["step_ratio"]), float(t["generate_ratio"])
    r = max(step, gen)
    value = (
        f"**{_ratio(r)}** (Step {_ratio(step)}, Generate {_ratio(gen)}; in-process prefill "
        f"{_median(t['in_process_prefill']):.1f} ms)"
    )
    measure = f"time to first token, {t['T']:,}-token prompt, gRPC vs in-process ({model} model)"
    return Row(measure, value, T_TTFT, r <= 1.5, "bench_export", r)


def position_series(res: dict) -> tuple[str, list[int], list[float], dict[str, dict]]:
    """(source, positions L, recurrent ms at L, {recompute label: {L: ms}}) of the best data.

    bench_export measures the next token's cost at position L directly (ORT step vs
    recomputing the prefix); without it, bench_model's torch figures stand in (mean
    torch step per token over L tokens vs one conv forward over L).
    """
    if "bench_export" in res:
        pos = res["bench_export"]["position"]
        Ls = sorted(int(L) for L in pos["stream"]["positions"])
        rec = [_median(pos["stream"]["positions"][str(L)]) for L in Ls]
        rc = pos["recompute"]
        if "positions" in rc:  # first version: torch conv forward only
            recompute = {"torch conv forward over prefix": rc["positions"]}
        else:
            recompute = {
                "ORT prefill over prefix": rc.get("ort_prefill", {}),
                "torch conv forward over prefix": rc.get("torch_conv", {}),
            }
        recompute = {k: {int(L): _median(v) for L, v in d.items()} for k, d in recompute.items()}
        return "bench_export", Ls, rec, {k: d for k, d in recompute.items() if d}
    rows = res["bench_model"]["conv_vs_steps"]
    Ls = [int(r["L"]) for r in rows]
    rec = [r["step_us_per_token"] / 1e3 for r in rows]
    conv = {int(r["L"]): float(r["conv_ms"]) for r in rows}
    return "bench_model", Ls, rec, {"torch conv forward over prefix": conv}


def row_position(res: dict) -> Row:
    source, Ls, rec, recompute = position_series(res)
    L0, L1 = Ls[0], Ls[-1]
    flat = rec[-1] / rec[0]
    cheapest = min(d[L1] for d in recompute.values() if L1 in d)
    r = cheapest / rec[-1]
    growing = all(d[max(d)] > d[min(d)] for d in recompute.values())
    what = "ORT step" if source == "bench_export" else "torch eager step (mean over L)"
    value = (
        f"recompute / recurrent at L = {L1:,}: **{_ratio(r)}**; recurrent {rec[0]:.3f} → "
        f"{rec[-1]:.3f} ms from L = {L0:,} ({_ratio(flat)}, {what})"
    )
    return Row(
        "per-token cost at position L: recurrent vs recompute the prefix",
        value,
        T_POSITION,
        flat <= 1.5 and growing,
        source,
        r,
    )


def _throughput(res: dict, name: str, C: int, batching: bool) -> float:
    return next(
        float(r["tokens_per_s"])
        for r in res[name]["throughput"]
        if r["streams"] == C and r["batching"] == batching
    )


def row_batcher(res: dict, name: str = "bench_runtime") -> Row:
    on, off = _throughput(res, name, 64, True), _throughput(res, name, 64, False)
    r = on / off
    S = res[name]["model"]["state_size"]
    value = f"**{_ratio(r)}** ({on:,.0f} vs {off:,.0f} tokens/s)"
    return Row(f"Batcher on / off, 64 streams (S = {S:,})", value, T_BATCHER, r >= 5, name, r)


def row_slab(res: dict, name: str = "bench_runtime_shipped") -> Row:
    """The slot step (Engine.run_slots, 64 random slots of a slab) / the in-place step it
    replaced (step graph with state and state_out aliased), B = 64, median per call."""
    s = next(x for x in res[name]["slab"]["summary"] if x["B"] == 64)
    S = res[name]["model"]["state_size"]
    measure = f"slot step vs in-place step, B = 64 (S = {S:,})"
    copying = s["slot_random_vs_copying"]
    tail = f"{_ratio(copying)} of gather + step + scatter"
    r = s["slot_random_vs_in_place"]
    if r is None:
        value = f"in-place n/a (the graph does not run in place); {tail}"
        return Row(measure, value, T_SLAB, None, name, None)
    q = s.get("paired_slot_random_vs_in_place") or {}
    spread = f", per round {q['p25']:.2f}–{q['p75']:.2f}" if q else ""
    value = f"**{_ratio(r)}** (median per call{spread}); {tail}"
    return Row(measure, value, T_SLAB, r <= 1.0, name, r)


def row_engine_overhead(res: dict, name: str = "bench_runtime") -> Row:
    rows = res[name]["overhead"]
    ratio = {
        int(o["B"]): float(o["ratio"]) for o in rows if o["variant"] == "Engine.step"
    }  # B -> Engine.step / bare run
    bare = {int(o["B"]): o["us_per_call"] for o in rows if o["variant"].startswith("bare")}
    S = res[name]["model"]["state_size"]
    worst = max(ratio.values())
    value = ", ".join(
        f"B = {B}: **{_ratio(ratio[B])}** (bare {bare[B]:,.0f} µs)" for B in sorted(ratio)
    )
    return Row(
        f"Engine.step vs bare InferenceSession.run (S = {S:,})",
        value,
        T_ENGINE,
        worst <= 1.2,
        name,
        worst,
    )


def _server_runs(res: dict) -> dict[tuple[int, bool], dict]:
    return {(int(r["clients"]), bool(r["batching"])): r for r in res["bench_server"]["runs"]}


def row_grpc_overhead(res: dict) -> Row:
    srv = res["bench_server"]
    runs = _server_runs(res)
    one = min((r for (c, _), r in runs.items() if c == 1), key=lambda r: r["p50_ms"])
    bare = float(srv["bare_engine_step"]["p50_ms"])
    r = float(one["p50_ms"]) / bare
    value = f"**{_ratio(r)}** (p50 {one['p50_ms']:.2f} ms vs bare Engine.step {bare:.2f} ms)"
    return Row("gRPC per-token overhead, 1 client", value, T_GRPC, r <= 3, "bench_server", r)


def row_server_scaling(res: dict) -> Row:
    runs = _server_runs(res)
    a, b = float(runs[(64, True)]["tokens_per_s"]), float(runs[(1, True)]["tokens_per_s"])
    r = a / b
    value = f"**{_ratio(r)}** ({a:,.0f} vs {b:,.0f} tokens/s, batching on)"
    return Row("server tokens/s, 64 vs 1 client", value, T_SCALING, r >= 4, "bench_server", r)


def _step_floor(res: dict, key: str) -> str:
    """'; a bare grpc.aio server running only the step: N×' — the same ratio of the echo
    server that also runs the bare step (bench_server's summary `echo_step`, 1 client), where
    it was measured; '' otherwise."""
    floor = res["bench_server"]["summary"].get("echo_step") or {}
    return (
        f"; a bare grpc.aio server running only the step: {_ratio(floor[key])}"
        if key in floor
        else ""
    )


def row_own_cpu(res: dict, C: int) -> Row:
    """The server's own CPU per token (server − the bare batched Engine at B = C) ÷ the bare
    grpc.aio echo server's, at C clients (bench_server's summary)."""
    o = res["bench_server"]["summary"]["own_cpu"][str(C)]
    r = float(o["ratio"])
    server, bare = o["server_cpu_ms_per_token"], o["bare_engine_cpu_ms_per_token"]
    value = (
        f"**{_ratio(r)}** ({server:.3f} − {bare:.3f} ms vs echo "
        f"{o['echo_cpu_ms_per_token']:.3f} ms per token"
        f"{_step_floor(res, 'own_cpu_ratio') if C == 1 else ''})"
    )
    measure = f"server's own CPU per token vs a bare grpc.aio echo server, {C} client(s)"
    return Row(measure, value, T_OWN_CPU, r <= 1.5, "bench_server", r)


def row_server_latency(res: dict) -> Row:
    s, srv = res["bench_server"]["summary"], res["bench_server"]
    r = float(s["latency_1_client_over_echo_plus_step"])
    one = _server_runs(res)[(1, True)]  # the run the ratio was computed from (batching on)
    bare = float(srv["bare_engine_step"]["p50_ms"])
    value = (
        f"**{_ratio(r)}** (p50 {one['p50_ms']:.3f} ms vs echo {s['echo_p50_ms_1_client']:.3f} + "
        f"step {bare:.3f} ms{_step_floor(res, 'latency_over_echo_plus_step')})"
    )
    measure = "server p50 at 1 client vs echo p50 + bare step p50"
    return Row(measure, value, T_LATENCY, r <= 1.3, "bench_server", r)


def row_server_cpu_vs_step(res: dict) -> Row:
    s, srv = res["bench_server"]["summary"], res["bench_server"]
    r = float(s["server_cpu_1_client_over_step_cpu"])
    step = srv["bare_engine_step"]["cpu_ms_per_token"]
    value = (
        f"**{_ratio(r)}** (bare Engine.step {step:.3f} ms CPU per token"
        f"{_step_floor(res, 'cpu_over_step')})"
    )
    measure = "server CPU per token at 1 client vs the bare step's"
    return Row(measure, value, T_CPU_STEP, r <= 3, "bench_server", r)


def row_server_on_off(res: dict) -> Row:
    """Batching on ÷ off at 64 clients through the server, with how busy the machine's cores
    were (server + client CPU per token × tokens/s): at ~all cores the clients' own CPU
    caps what any server could show."""
    runs = _server_runs(res)
    on, off = runs[(64, True)], runs[(64, False)]
    r = float(on["tokens_per_s"]) / float(off["tokens_per_s"])
    cores = re.search(r"(\d+) CPUs", res["bench_server"]["meta"]["machine"])

    def busy(x):
        cpu = x["extra"]["server_cpu_ms_per_token"] + x["extra"]["client_cpu_ms_per_token"]
        return x["tokens_per_s"] * cpu / 1e3

    value = (
        f"**{_ratio(r)}** ({on['tokens_per_s']:,.0f} vs {off['tokens_per_s']:,.0f} tokens/s); "
        f"cores busy (server + clients): {busy(on):.1f} on, {busy(off):.1f} off, of "
        f"{cores.group(1) if cores else '?'}"
    )
    measure = "server tokens/s at 64 clients, batching on vs off"
    return Row(measure, value, T_BATCHER, r >= 5, "bench_server", r)


def row_rss(res: dict) -> Row:
    rss = {int(r["tokens"]): float(r["rss_mib"]) for r in res["bench_runtime"]["rss"]}
    lo, hi = min(rss), max(rss)
    growth = rss[hi] - rss[lo]
    value = f"**{growth:+.2f} MiB** ({rss[lo]:.1f} → {rss[hi]:.1f} MiB)"
    if hi < 1_000_000:
        value += "; a short run: the target is over 1 M tokens"
    return Row(
        f"RSS growth, one stream, {lo:,} → {hi:,} tokens",
        value,
        T_RSS,
        abs(growth) < 2 if hi >= 1_000_000 else None,
        "bench_runtime",
        growth,
    )


def row_bytes_per_session(res: dict) -> Row:
    s = res["bench_runtime"]["sessions"]
    S4, slab, rss = (
        int(s["S_times_4"]),
        int(s["slab_bytes_per_session"]),
        s["rss_bytes_per_session"],
    )
    r = float(rss) / S4
    value = (
        f"slab {slab:,} B = S × 4 = {S4:,} B; RSS **{rss:,.0f} B** per session "
        f"(**{_ratio(r)}**, {s['sessions']:,} sessions)"
    )
    return Row(
        "bytes per session vs S × 4",
        value,
        T_SESSION,
        slab == S4 and r <= 1.1,
        "bench_runtime",
        r,
    )


def row_conv_vs_steps(res: dict) -> Row:
    rows = res["bench_model"]["conv_vs_steps"]
    last = max(rows, key=lambda r: r["L"])
    r = float(last["steps_over_conv"])
    lo = min(float(x["steps_over_conv"]) for x in rows)
    err = max(float(x["max_abs_diff"]) for x in rows)
    value = (
        f"**{_ratio(r)}** at L = {last['L']:,} ({lo:.1f}× or more from L = {rows[0]['L']:,}); "
        f"max abs(conv − steps) {err:.1e}"
    )
    return Row(
        "torch conv forward vs L sequential torch steps",
        value,
        T_CONV,
        lo > 1,
        "bench_model",
        r,
    )


def row_training(res: dict) -> Row:
    t, meta = res["bench_model"]["train"], res["bench_model"].get("meta", {})
    value = (
        f"**{t['tokens_per_s']:,.0f} tokens/s** (B = {t['batch']}, L = {t['seq_len']}, "
        f"{t['parameters']:,} parameters, {meta.get('device', 'cpu')}, "
        f"{meta.get('torch_threads', '?')} thread(s))"
    )
    return Row("training tokens/s", value, "—", None, "bench_model", float(t["tokens_per_s"]))


def row_soak(res: dict) -> Row:
    s = res["soak"]
    errors = sum(s["errors"].values())
    bad = errors + s["lost_sessions"] + s["corrupted_sessions"]
    value = (
        f"**{errors} errors, {s['lost_sessions']} lost, {s['corrupted_sessions']} corrupted** "
        f"({s['sessions']} sessions × {s['config']['tokens']} tokens, p99 "
        f"{s['latency_ms']['p99']:.0f} ms, RSS {s['rss']['growth_after_warmup_mb']:+.1f} MB "
        f"after warm-up)"
    )
    return Row(
        "soak: concurrent sessions over gRPC",
        value,
        T_SOAK,
        bad == 0 and s.get("server_exit_code") == 0,
        "soak",
        float(bad),
    )


def row_prefix_cache(res: dict) -> Row:
    r = res["bench_sessions"]
    m = r["median_s"]
    value = (
        f"**{r['ready_speedup']:.1f}×** ({1e3 * m['ready_hit']:.2f} vs "
        f"{1e3 * m['ready_miss']:.2f} ms, T = {r['T']:,}; Generate's first token "
        f"{r['hit_speedup']:.1f}×"
        + (f", at most {r['ttft_transport_ceiling']:.1f}× over its transport floor"
           if "echo_ttft" in m else "")
        + ")"
    )  # fmt: skip
    if "echo_ready_prompt" in m:
        value += (
            f"; transport floor (the same call to a bare grpc.aio server that answers at once) "
            f"{1e3 * m['echo_ready_prompt']:.2f} ms, so at most {r['transport_ceiling']:.1f}× "
            f"through this client; the hit costs "
            f"{1e3 * (m['ready_hit'] - m['echo_ready_prompt']):.2f} ms above it"
        )
    elif "ready_empty" in m:
        value += (
            f"; floor: CreateSession without a prompt {1e3 * m['ready_empty']:.2f} ms, so at most "
            f"{r['ready_ceiling']:.1f}× through this client"
        )
    measure = "prefix cache: session ready, cached vs new prompt"
    ok = r["ready_speedup"] >= 20
    return Row(measure, value, T_CACHE, ok, "bench_sessions", r["ready_speedup"])


def _sessions_ratio(res: dict, measure: str, target: str, ratio: str, times: tuple, bound: float,
                    digits: int = 2) -> Row:  # fmt: skip
    """A bench_sessions ratio of two median times (keys of median_s), met when ≤ bound."""
    r = res["bench_sessions"]
    a, b = (1e3 * r["median_s"][k] for k in times)
    value = f"**{r[ratio]:.{digits}f}×** ({a:.2f} vs {b:.2f} ms)"
    return Row(measure, value, target, r[ratio] <= bound, "bench_sessions", r[ratio])


def row_cache_miss(res: dict) -> Row:
    measure = "prefix cache: a new prompt, cache on vs off"
    return _sessions_ratio(res, measure, T_MISS, "miss_cost", ("miss_on", "miss_off"), 1.05, 3)


def row_rewind(res: dict) -> Row:
    measure = "rewind vs one chunk's Step + a snapshot"
    times = ("rewind", "chunk_step_and_snapshot")
    return _sessions_ratio(res, measure, T_REWIND, "rewind_vs_chunk", times, 1)


def row_scaleout_throughput(res: dict) -> Row:
    r = res["bench_scaleout"]
    direct = next(x for x in r["throughput"] if "direct" in x["setup"])
    proxied = [x for x in r["throughput"] if "nginx" in x["setup"]]
    value = " / ".join(f"{x['tokens_per_s']:.0f}" for x in proxied) + (
        f" tokens/s for {' / '.join(str(x['replicas']) for x in proxied)} replicas via nginx "
        f"vs {direct['tokens_per_s']:.0f} direct ({direct['clients']} clients; 2 cores are "
        "the ceiling)"
    )
    return Row("scale-out: replicas behind nginx", value, T_REPORTED, None,
               "bench_scaleout")  # fmt: skip


def row_write_through(res: dict) -> Row:
    p = {(x["mode"], x["clients"]): x for x in res["bench_scaleout"]["persistence"]}
    C = max(c for _, c in p)
    ratio = p[("1", C)]["tokens_per_s"] / p[("memory", C)]["tokens_per_s"]
    behind = p[("100ms", C)]["tokens_per_s"] / p[("memory", C)]["tokens_per_s"]
    value = (f"write-through {ratio:.2f}×, write-behind 100 ms {behind:.2f}× the tokens/s of "
             f"the in-memory store ({C} clients)")  # fmt: skip
    return Row("scale-out: persistence cost", value, T_REPORTED, None,
               "bench_scaleout", ratio)  # fmt: skip


def row_failover(res: dict) -> Row:
    runs = res["bench_scaleout"]["failover"]
    lost = sum(f["lost_steps_total"] for f in runs)
    value = (
        "; ".join(
            f"lease {f['lease_ttl_s']:g} s: first token elsewhere after "
            f"{f['failover_s_median']:.2f} s (median of {f['moved']} moved sessions)"
            for f in runs
        )
        + f"; {lost} acknowledged steps lost"
    )
    return Row("scale-out: failover after SIGKILL", value, T_FAILOVER, lost == 0,
               "bench_scaleout", float(lost))  # fmt: skip


def _gpu(res: dict) -> tuple[dict, str | None]:
    """(bench_gpu result, the card's name or None for a CPU smoke run)."""
    g = res["bench_gpu"]
    return g, g["env"].get("gpu") if g["env"].get("device") == "cuda" else None


def _gpu_row(g: dict, variant: str, B: int) -> dict:
    return next(r for r in g["results"][variant] if r["batch"] == B and "tokens_per_s" in r)


def row_gpu_speedup(res: dict) -> Row:
    g, card = _gpu(res)
    ort, eager = _gpu_row(g, "ort_slab", 64), _gpu_row(g, "torch_eager", 64)
    r = ort["tokens_per_s"] / eager["tokens_per_s"]
    where = card or "CPU smoke run, not a GPU figure"
    value = (
        f"**{_ratio(r)}** ({ort['tokens_per_s']:,.0f} vs {eager['tokens_per_s']:,.0f} "
        f"tokens/s; {where})"
    )
    measure = "GPU: ORT CUDA, state in a device slab vs torch eager step, B = 64"
    return Row(measure, value, T_GPU, (r >= 2) if card else None, "bench_gpu", r)


def row_gpu_bytes(res: dict) -> Row:
    g, card = _gpu(res)
    B, V = 64, int(g["model"]["d_output"])
    slab_bytes = _gpu_row(g, "ort_slab", B)["bytes_per_step"]
    io = B * 8 + B * 8 + B * V * 4  # int64 tokens and slots in, float32 logits out
    value = f"**{slab_bytes:,} B** slab (inputs + slots + outputs = {io:,} B)"
    try:
        value += (
            f"; Engine.step with host states {_gpu_row(g, 'ort_fp32', B)['bytes_per_step']:,} B"
        )
    except (KeyError, StopIteration):
        pass
    measure = "GPU: host↔device bytes per step, B = 64"
    return Row(
        measure, value, T_GPU_BYTES, (slab_bytes <= io) if card else None, "bench_gpu", slab_bytes
    )


# (measure shown when the data is missing, source, target, row function)
ROWS: list[tuple[str, str, str, Callable[[dict], Row]]] = [
    (
        "ORT step vs torch eager step, B = 1",
        "bench_export",
        T_ORT,
        lambda r: row_ort_vs_torch(r, "1"),
    ),
    (
        "ORT step vs torch eager step, B = 64",
        "bench_export",
        "—",
        lambda r: row_ort_vs_torch(r, "64"),
    ),
    (
        "prefill T = 1024 vs 1024 isolated ORT steps, probe model",
        "bench_export",
        T_PREFILL,
        lambda r: row_prefill(r, "probe"),
    ),
    (
        "prefill T = 1024 vs 1024 isolated ORT steps, shipped model",
        "bench_export",
        T_PREFILL,
        lambda r: row_prefill(r, "shipped"),
    ),
    (
        "time to first token, gRPC vs in-process (shipped model)",
        "bench_export",
        T_TTFT,
        lambda r: row_ttft(r, "shipped"),
    ),
    (
        "per-token cost at position L: recurrent vs recompute",
        "bench_export",
        T_POSITION,
        row_position,
    ),
    ("Batcher on / off, 64 streams", "bench_runtime", T_BATCHER, row_batcher),
    (
        "Batcher on / off, 64 streams (small state)",
        "bench_runtime_small",
        T_BATCHER,
        lambda r: row_batcher(r, "bench_runtime_small"),
    ),
    (
        "Batcher on / off, 64 streams (shipped model)",
        "bench_runtime_shipped",
        T_BATCHER,
        lambda r: row_batcher(r, "bench_runtime_shipped"),
    ),
    (
        "slot step vs in-place step, B = 64 (shipped model)",
        "bench_runtime_shipped",
        T_SLAB,
        row_slab,
    ),
    ("Engine.step vs bare InferenceSession.run", "bench_runtime", T_ENGINE, row_engine_overhead),
    (
        "Engine.step vs bare InferenceSession.run (small state)",
        "bench_runtime_small",
        T_ENGINE,
        lambda r: row_engine_overhead(r, "bench_runtime_small"),
    ),
    ("gRPC per-token overhead, 1 client", "bench_server", T_GRPC, row_grpc_overhead),
    ("server tokens/s, 64 vs 1 client", "bench_server", T_SCALING, row_server_scaling),
    (
        "server's own CPU per token vs echo, 1 client",
        "bench_server",
        T_OWN_CPU,
        lambda r: row_own_cpu(r, 1),
    ),
    (
        "server's own CPU per token vs echo, 64 clients",
        "bench_server",
        T_OWN_CPU,
        lambda r: row_own_cpu(r, 64),
    ),
    ("server p50 vs echo + step, 1 client", "bench_server", T_LATENCY, row_server_latency),
    ("server CPU per token vs the bare step", "bench_server", T_CPU_STEP, row_server_cpu_vs_step),
    ("server batching on / off, 64 clients", "bench_server", T_BATCHER, row_server_on_off),
    ("RSS growth, one stream, 1,000 → 1,000,000 tokens", "bench_runtime", T_RSS, row_rss),
    ("bytes per session vs S × 4", "bench_runtime", T_SESSION, row_bytes_per_session),
    ("torch conv forward vs L sequential torch steps", "bench_model", T_CONV, row_conv_vs_steps),
    ("training tokens/s", "bench_model", "—", row_training),
    ("prefix cache: session ready", "bench_sessions", T_CACHE, row_prefix_cache),
    ("prefix cache: miss cost", "bench_sessions", T_MISS, row_cache_miss),
    ("rewind vs one chunk's Step + a snapshot", "bench_sessions", T_REWIND, row_rewind),
    ("soak: concurrent sessions over gRPC", "soak", T_SOAK, row_soak),
    (
        "scale-out: replicas behind nginx",
        "bench_scaleout",
        T_REPORTED,
        row_scaleout_throughput,
    ),
    ("scale-out: persistence cost", "bench_scaleout", T_REPORTED, row_write_through),
    ("scale-out: failover after SIGKILL", "bench_scaleout", T_FAILOVER, row_failover),
    ("GPU: ORT CUDA slab state vs torch eager, B = 64", "bench_gpu", T_GPU, row_gpu_speedup),
    ("GPU: host↔device bytes per step, B = 64", "bench_gpu", T_GPU_BYTES, row_gpu_bytes),
]


def headline_rows(res: dict) -> list[Row]:
    """The table: one Row per measure; a missing result or field gives a 'not measured' row."""
    rows = []
    for measure, source, target, fn in ROWS:
        try:
            rows.append(fn(res))
        except (KeyError, IndexError, TypeError, ValueError, StopIteration, ZeroDivisionError) as e:
            if source in res:
                why = f"not in {source}.json ({type(e).__name__}: {e})"
            else:
                why = f"not measured ({source}.json missing)"
            rows.append(Row(measure, why, target, None, source))
    return rows


# --- plots -------------------------------------------------------------------------------


def _x_ticks(ax, xs) -> None:
    """Label a log x axis at the measured points only (no 3×10² minor labels)."""
    xs = sorted(set(xs))
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)


def _figure(ncols: int, width: float = 5.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_position(res: dict, path: Path) -> Path | None:
    """Per-token cost at stream position L: recurrent step (flat) vs recompute (growing)."""
    try:
        source, Ls, rec, recompute = position_series(res)
    except KeyError:
        return None
    fig, (ax,) = _figure(1, 7)
    label = "recurrent ORT step" if source == "bench_export" else "torch eager step (mean)"
    ax.loglog(Ls, rec, "o-", label=label)
    for (name, d), marker in zip(recompute.items(), "s^v"):
        xs = sorted(d)
        ax.loglog(xs, [d[L] for L in xs], marker + "--", label=f"recompute: {name}")
    _x_ticks(ax, Ls)
    ax.set(
        xlabel="stream position L (tokens)",
        ylabel="cost of the next token (ms)",
        title=f"per-token cost vs position ({source})",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_throughput(res: dict, path: Path) -> Path | None:
    """Aggregate tokens/s vs concurrent streams: Batcher (in-process) and gRPC server."""
    series = []  # (label, style, [C], [tokens/s])
    for name, tag in (("bench_runtime", "Batcher"), ("bench_runtime_small", "Batcher, small S")):
        if name not in res or "throughput" not in res[name]:
            continue
        S = res[name].get("model", {}).get("state_size", "?")
        for on in (True, False):
            pts = sorted(
                (r["streams"], r["tokens_per_s"])
                for r in res[name]["throughput"]
                if r["batching"] == on
            )
            if pts:
                style = (
                    ("o-" if on else "o:") if name == "bench_runtime" else ("^-" if on else "^:")
                )
                label = f"{tag} (S={S:,}), batching {'on' if on else 'off'}"
                series.append((label, style, *zip(*pts)))
    if "bench_server" in res:
        runs = res["bench_server"]["runs"]
        S = res["bench_server"].get("bare_engine_step", {}).get("state_size")
        for on in (True, False):
            pts = sorted((r["clients"], r["tokens_per_s"]) for r in runs if r["batching"] == on)
            if pts:
                size = f"{S:,}" if isinstance(S, int) else "?"
                label = f"gRPC server (S={size}), batching {'on' if on else 'off'}"
                series.append((label, "s-" if on else "s:", *zip(*pts)))
    if not series:
        return None
    fig, (ax,) = _figure(1, 7)
    for label, style, xs, ys in series:
        ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log", base=2)
    _x_ticks(ax, [x for _, _, xs, _ in series for x in xs])
    ax.set(
        xlabel="concurrent streams (one token per request, closed loop)",
        ylabel="aggregate tokens/s",
        title="throughput vs concurrent streams",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def plot_prefill(res: dict, path: Path) -> Path | None:
    """Parallel vs sequential: ORT prefill vs T steps; torch conv forward vs L steps."""
    have_export = "prefill" in res.get("bench_export", {})
    have_model = "conv_vs_steps" in res.get("bench_model", {})
    if not (have_export or have_model):
        return None
    fig, axes = _figure(int(have_export) + int(have_model))
    axes = list(axes)
    if have_export:
        ax, p = axes.pop(0), res["bench_export"]["prefill"]
        vals = [_median(p["prefill"]), _median(p["steps"])]
        bars = ax.bar(["prefill, 1 call", f"{p['T']} steps"], vals, color=["C0", "C1"])
        ax.bar_label(bars, [f"{v:.1f} ms" for v in vals])
        ax.set_yscale("log")
        ax.set(
            ylabel="ms (median)",
            title=f"ORT: prefill T={p['T']} vs steps ({_ratio(vals[1] / vals[0])})",
        )
    if have_model:
        ax, rows = axes.pop(0), res["bench_model"]["conv_vs_steps"]
        Ls = [r["L"] for r in rows]
        ax.loglog(Ls, [r["conv_ms"] for r in rows], "o-", label="conv forward (FFT), one call")
        ax.loglog(Ls, [r["steps_ms"] for r in rows], "s-", label="L sequential steps")
        _x_ticks(ax, Ls)
        ax.set(xlabel="sequence length L", ylabel="ms", title="torch: conv forward vs steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


PLOTS = {
    "report_position.png": ("Per-token cost vs stream position", plot_position),
    "report_throughput.png": ("Throughput vs concurrent streams", plot_throughput),
    "report_prefill.png": ("Prefill vs sequential steps", plot_prefill),
}


# --- the report --------------------------------------------------------------------------


def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load(res: dict, name: str) -> str:
    """'start → end' 1-minute load averages a benchmark recorded, as far as it did."""
    r = res[name]
    pairs = {
        "bench_model": (r.get("meta", {}).get("loadavg"), None),
        "bench_export": (r.get("load_before"), r.get("load_after")),
        "bench_runtime": (r.get("loadavg_start"), r.get("loadavg_end")),
        "bench_runtime_small": (r.get("loadavg_start"), r.get("loadavg_end")),
        "bench_runtime_shipped": (r.get("loadavg_start"), r.get("loadavg_end")),
        "bench_server": (r.get("meta", {}).get("load_average"), None),
        "soak": (r.get("meta", {}).get("load_average_at_start"), None),
        "bench_sessions": (r.get("load_avg_start"), r.get("load_avg")),
        "bench_scaleout": (r.get("meta", {}).get("load_average"), None),
        "bench_gpu": (None, None),
    }.get(name, (None, None))
    parts = [f"{p[0]:.1f}" for p in pairs if p]
    return " → ".join(parts) or "not recorded"


def _cpu_of(res: dict, name: str) -> str:
    """The CPU a benchmark's results say they were measured on: their `cpu`, at the top or
    under `machine` or `meta` ('not recorded' for the benchmarks, and older results, that
    do not record it)."""
    r = res[name]
    for record in (r, r.get("machine"), r.get("meta")):
        if isinstance(record, dict) and isinstance(record.get("cpu"), str):
            return record["cpu"]
    return "not recorded"


def _model_of(res: dict, name: str) -> str:
    r = res[name]
    if name == "bench_model":
        c = r["config"]
        return f"torch, d_model {c['d_model']}, {c['n_layers']} layers, N {c['d_state']}"
    if name == "bench_export":
        m = r["model"]
        return (
            f"d_model {m['d_model']}, {m['n_layers']} layers, N {m['d_state']}; "
            f"S = {r['state_size']:,}"
        )
    if name.startswith("bench_runtime"):
        c = r["config"]
        given = c.get("ckpt") or c.get("model")  # its own sizes; the size flags went unused
        sizes = given or f"d_model {c['d_model']}, {c['n_layers']} layers, N {c['d_state']}"
        return f"{sizes}; S = {r['model']['state_size']:,}; {r.get('provider', '?')}"
    if name == "bench_server":
        c = r["config"]
        bare = r.get("bare_engine_step", {})
        return (
            f"d_model {c['d_model']}, {c['n_layers']} layers, N {c['d_state']}; "
            f"S = {bare.get('state_size', 0):,}; {bare.get('provider', '?')}"
        )
    if name == "soak":
        return f"S = {r['meta']['state_size']:,}"
    if name == "bench_sessions":
        return f"{r['model']}; prompt T = {r['T']:,}"
    if name == "bench_scaleout":
        return f"{r['meta']['model']}; {r['meta']['clients']} clients"
    if name == "bench_gpu":
        card = r["env"].get("gpu") or f"{r['env'].get('device')} smoke run (no GPU)"
        return f"S = {r['model']['state_size']:,}; {card}"
    return ""


def _written(r: dict, path: Path) -> str:
    """When a result was taken: the time its JSON records (meta.time, meta.date or a
    top-level time / when, by benchmark), else its file's mtime, which a fresh clone or a
    copy resets: marked as such."""
    meta = r.get("meta") if isinstance(r.get("meta"), dict) else {}
    for when in (meta.get("time"), meta.get("date"), r.get("time"), r.get("when")):
        try:
            return f"{datetime.datetime.fromisoformat(when):%Y-%m-%d %H:%M}"
        except (TypeError, ValueError):
            continue
    return f"{datetime.datetime.fromtimestamp(path.stat().st_mtime):%Y-%m-%d %H:%M} (file time)"


def _shown(path: Path) -> str:
    """A results path as the reader knows it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(HERE.parent).as_posix()
    except ValueError:
        return str(path)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def gpu_line(res: dict) -> str:
    card = _gpu(res)[1] if "bench_gpu" in res else None
    if card:
        return (
            f"- GPU figures (the bench_gpu rows) were taken on **{card}**; every other figure "
            "is the CPU above (onnxruntime CPUExecutionProvider or torch CPU)."
        )
    return "- no GPU figures: every number is onnxruntime's CPUExecutionProvider or torch CPU."


def render(res: dict, results: Path, report: Path, plots: dict[str, Path | None]) -> str:
    rows = headline_rows(res)
    met = sum(r.met is True for r in rows)
    missed = [r for r in rows if r.met is False]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    now = datetime.datetime.now().isoformat(timespec="seconds")
    rebuild = "python benchmarks/run_all.py --report-only"  # with the paths it was built from
    if results.resolve() != RESULTS.resolve():
        rebuild += f" --results {shlex.quote(_shown(results))}"
    if report.resolve() != (results / "REPORT.md").resolve():
        rebuild += f" --report {shlex.quote(_shown(report))}"
    lines = [
        "# ssmstream — benchmark report",
        "",
        f"Built {now} by `benchmarks/run_all.py` from the results in "
        f"`{_shown(results)}/` (rebuild: `{rebuild}`; rerun everything: `make bench`).",
        "",
        "## Machine",
        "",
        f"- this report was built on: {cpu_model()}, **{_cores()} cores** available to this "
        f"process ({os.cpu_count()} online); {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}. The development machines differ between "
        "sessions (CPU model, cache sizes): each benchmark's CPU is in the table below where "
        "its results record one, and a ratio compares two numbers of one run on one machine",
        f"- load average when this report was built: {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min). The development machine's cores are shared with "
        "other work, so absolute times move; each ratio below divides two numbers of one run.",
        gpu_line(res),
        "",
        "| benchmark | results written | CPU | load average (1 min) at start → end | model |",
        "|---|---|---|---|---|",
    ]
    for bench in BENCHMARKS:
        name = bench.results
        if name not in res:
            lines.append(f"| {name} | no results yet | | | |")
            continue
        when = _written(res[name], results / f"{name}.json")
        try:
            model = _model_of(res, name)
        except (KeyError, TypeError, AttributeError) as e:  # an older or partial result
            model = f"not recorded ({type(e).__name__}: {e})"
        lines.append(
            f"| [{name}]({_rel(results / f'{name}.md', report.parent)}) | "
            f"{when} | {_cpu_of(res, name)} | {_load(res, name)} | {model} |"
        )
    lines += [
        "",
        "## Headline ratios",
        "",
        f"{met} of {sum(r.met is not None for r in rows)} targets met"
        + (f"; not met: {', '.join(r.measure for r in missed)}." if missed else "."),
        "",
        "| measure | measured | target | met? | source |",
        "|---|---|---|:---:|---|",
    ]
    for r in rows:
        mark = {True: "✅ met", False: "❌ NOT met", None: "—"}[r.met]
        lines.append(f"| {r.measure} | {r.value} | {r.target} | {mark} | {r.source} |")
    lines += [
        "",
        "Each target is stated in the terms of its measure; where only a shape is asked for "
        '("flat", "growing", "conv faster") the stated bound is this report\'s reading of it. '
        "The per-benchmark pages linked above hold the full tables (all batch sizes, stream "
        "counts, p50 / p99 latencies, positions).",
        "",
        "## Plots",
        "",
    ]
    for file, (title, _) in PLOTS.items():
        path = plots.get(file)
        if path is None:
            lines += [f"**{title}**: not measured yet.", ""]
        else:
            lines += [f"**{title}**", "", f"![{title}]({_rel(path, report.parent)})", ""]
    others = [
        (bench.results, results / f"{bench.results}.png")
        for bench in BENCHMARKS
        if (results / f"{bench.results}.png").is_file()
    ]
    if others:
        lines += ["Each benchmark's own plot:", ""]
        lines += [f"- [{n}.png]({_rel(p, report.parent)})" for n, p in others]
        lines.append("")
    status = results / STATUS_FILE
    if status.is_file():
        s = json.loads(status.read_text())
        lines += [
            "## Last `run_all.py` run",
            "",
            f"{s['time']}{' (quick mode)' if s.get('quick') else ''}:",
            "",
            "| benchmark | exit | seconds |",
            "|---|---|---|",
        ]
        lines += [f"| {b['name']} | {b['exit']} | {b['seconds']:.0f} |" for b in s["benchmarks"]]
        lines.append("")
    return "\n".join(lines)


def write_report(results: Path, report: Path | None = None) -> tuple[Path, list[Row]]:
    """Read results/*.json, draw the plots next to `report`, write it; returns (path, rows)."""
    results = Path(results)
    report = Path(report) if report else results / "REPORT.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    res = load_results(results)
    plots = {}
    for file, (_, fn) in PLOTS.items():
        target = report.parent / file
        try:
            plots[file] = fn(res, target)
        except ImportError as e:
            log.warning("no plots: %s (pip install 'ssmstream[plots]')", e)
            plots[file] = None
    report.write_text(render(res, results, report, plots) + "\n")
    log.info("wrote %s (%d result files)", report, len(res))
    return report, headline_rows(res)


# --- CLI ---------------------------------------------------------------------------------


def default_names() -> list[str]:
    """Every benchmark; those that need CUDA only where it is usable (else logged)."""
    from ssmstream.runtime.providers import cuda_usable

    usable, why = cuda_usable()
    if not usable:
        skipped = [b.name for b in BENCHMARKS if b.needs_cuda]
        log.info("skipping %s: %s (run it with --only on a GPU machine)", skipped, why)
    return [b.name for b in BENCHMARKS if usable or not b.needs_cuda]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the project's benchmarks (each as a subprocess) and write REPORT.md: "
        "the machine, one table of headline ratios with their targets, and PNG plots.",
        epilog="benchmarks: " + ", ".join(f"{b.name} ({b.script})" for b in BENCHMARKS),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small models and short runs (a smoke test); results default to {QUICK_RESULTS}",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the report from the existing result JSONs",
    )
    p.add_argument(
        "--only", nargs="+", choices=list(BY_NAME), metavar="NAME", help="run only these"
    )
    p.add_argument(
        "--skip", nargs="+", choices=list(BY_NAME), default=[], metavar="NAME", help="skip these"
    )
    p.add_argument(
        "--results",
        type=out_dir,
        default=None,
        help=f"results directory (default: {RESULTS}, or {QUICK_RESULTS} with --quick)",
    )
    p.add_argument(
        "--report", type=out_file, default=None, help="report to write (default: RESULTS/REPORT.md)"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (none: no limit)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.report_only and (a.quick or a.only or a.skip):
        parser.error("--report-only runs nothing: it takes no --quick, --only or --skip")
    if a.timeout is not None and a.timeout <= 0:
        parser.error(f"--timeout must be positive, got {a.timeout}")
    results = Path(a.results) if a.results else (QUICK_RESULTS if a.quick else RESULTS)
    failed = []
    if not a.report_only:
        names = [n for n in (a.only or default_names()) if n not in a.skip]
        status = run_benchmarks(names, results, a.quick, a.timeout)
        failed = [s["name"] for s in status if s["exit"] != 0]
    elif not results.is_dir():
        parser.error(f"--results {str(results)!r} is not a directory")
    report, rows = write_report(results, a.report)
    sys.stdout.write(report.read_text())
    if failed:
        log.error("benchmarks that failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    run_script(main, "run_all.py")  # a `kill` of run_all stops the running benchmark's group too
