"""Runtime benchmark: Engine overhead, Batcher throughput, constant memory, bytes per session.

Measured in one process on one exported model (random init; the numbers do not depend on
the weights):

1. Engine.step overhead: time per call of `Engine.step` (validation + run) vs a bare
   `InferenceSession.run` on the same inputs (the Engine's own session, so only the Engine
   layer differs), at B = 1 and B = 64; also `Engine.step(out=StepBuffers)`, the
   allocation-free IOBinding path, and `Engine.run_slots` (the Batcher's path: B rows of a
   state slab stepped in place by the slot graph, one call). Calls are interleaved one by
   one in random order and the median per-call time reported (this machine drifts by up to
   2x between seconds).  Target: ratio <= 1.2.
2. Batcher throughput: C concurrent streams (default 1, 16, 64, 256), each an asyncio
   task with its own session sending one token per request and awaiting the answer
   (closed loop), batching on (max_batch, max_batch_delay) vs off (max_batch = 1).
   Aggregate tokens/s over a fixed window, and p50 / p99 per-token latency.
   Target: on/off >= 5 at 64 streams.
3. RSS over a long stream: one session fed N tokens (default 1 M) through Engine.step and
   SessionStore.commit; RSS sampled along the way. Target: flat.
4. Memory per session: RSS growth of a SessionStore holding 10 000 sessions whose states
   were all written, divided by 10 000, vs the slab's S × 4 bytes.
5. Slot steps ("slab"): at B = 1 and 64, one step of B sessions whose states are rows of a
   StateSlab of 1,024 rows, in the Batcher's chunks of `StepBuffers.chunk_rows` rows:
   (a) `Engine.run_slots` on B random distinct slots, (b) the same on B consecutive slots,
   (c) what a copying store does: numpy gather of the rows, `Engine.step(out=StepBuffers)`,
   numpy scatter back, and (d) the step the slot graph replaced: the plain step graph
   through an IOBinding with `state` and `state_out` bound to the same consecutive slab
   rows (timed only where that aliased run equals `Engine.step` bit for bit; else n/a).
   Interleaved call by call like section 1; median per call. Target (the issue): at
   B = 64 the slot step costs no more than the in-place step (ratio <= 1.0).

    python benchmarks/bench_runtime.py                    # exports a random-init model once
    python benchmarks/bench_runtime.py --model model/     # an exported model dir
    python benchmarks/bench_runtime.py --ckpt examples/checkpoints/byte-lm \
        --name bench_runtime_shipped                      # a checkpoint, exported once

Writes benchmarks/results/bench_runtime.{json,md,png}.
Dimension letters: B batch, C concurrent streams, S packed state size, V vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ssmstream.runtime import Batcher, Engine, SessionStore
from ssmstream.runtime.providers import trim_heap
from tqdm import tqdm

log = logging.getLogger("bench_runtime")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class BenchConfig:
    """What to measure (the CLI flags map onto these)."""

    model: str | None = None  # exported model dir; None: export a random-init model once
    ckpt: str | None = None  # or a checkpoint dir, exported once into work_dir
    work_dir: str = "/tmp/ssmstream-bench-runtime"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64
    threads: int = 1
    overhead_calls: int = 5000  # interleaved calls per variant at B = 1 (B = 64: / 32;
    #   the slab section: / 8)
    slab_capacity: int = 1024  # rows of the slab the slab section steps in
    streams: tuple[int, ...] = (1, 16, 64, 256)
    seconds: float = 2.0
    throughput_rounds: int = 5  # off/on rounds per stream count, median reported
    warmup: float = 0.3
    max_batch: int = 256
    max_batch_delay: float = 0.001
    rss_tokens: int = 1_000_000
    sessions: int = 10_000
    out: str = str(RESULTS)
    name: str = "bench_runtime"  # results file names: NAME.json / .md / .png
    sections: tuple[str, ...] = ("overhead", "throughput", "slab", "sessions", "rss")

    def __post_init__(self):
        for name in (
            "threads", "overhead_calls", "throughput_rounds", "max_batch",
            "sessions", "slab_capacity",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seconds <= 0 or self.warmup < 0 or self.max_batch_delay < 0:
            raise ValueError("seconds must be > 0, warmup and max_batch_delay >= 0")
        if self.rss_tokens < 1000:
            raise ValueError(f"rss_tokens must be >= 1000, got {self.rss_tokens}")
        unknown = set(self.sections) - {"overhead", "throughput", "slab", "sessions", "rss"}
        if unknown or not self.sections:
            raise ValueError(f"unknown sections {sorted(unknown)}")
        if self.slab_capacity < 128 + 2 * 64:  # two consecutive blocks + two random sets
            raise ValueError(f"slab_capacity must be >= 256, got {self.slab_capacity}")
        if not self.streams or min(self.streams) < 1:
            raise ValueError(f"streams must be positive counts, got {self.streams}")


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_sources_sha() -> str:
    """sha256 of the model and export sources: a cached export made by other sources is stale."""
    import ssmstream.export
    import ssmstream.model

    h = hashlib.sha256()
    for pkg in (ssmstream.model, ssmstream.export):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _stamp(model_dir: Path) -> Path:
    """The file recording the sources a cached export was made by: beside its directory, not
    in it (the exporter overwrites only a directory that holds nothing but a model). One left
    inside by an older version of this script is removed, for the same reason."""
    (model_dir / ".export-sources-sha256").unlink(missing_ok=True)
    return model_dir.with_name(model_dir.name + ".sources-sha256")


def prepare_model(cfg: BenchConfig) -> Path:
    """The model dir to benchmark: --model, or a random-init export cached in work_dir
    (re-exported when the model config or the model/export sources changed)."""
    if cfg.model:
        return Path(cfg.model)
    import torch
    from run_all import export_model
    from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

    if cfg.ckpt:
        ckpt = Path(cfg.ckpt)
        model_dir = Path(cfg.work_dir) / f"ckpt-{ckpt.absolute().name}"
        stamp = _stamp(model_dir)
        sources = (
            export_sources_sha()
            + hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
        )
        if not (stamp.exists() and stamp.read_text() == sources):
            log.info("exporting %s to %s", ckpt, model_dir)
            export_model(ckpt, model_dir, overwrite=True, name=ckpt.absolute().name)
            stamp.write_text(sources)
        return model_dir
    mcfg = SSMConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=cfg.d_state
    )
    work = Path(cfg.work_dir)
    model_dir = work / f"model-v{cfg.vocab_size}-d{cfg.d_model}-l{cfg.n_layers}-n{cfg.d_state}"
    manifest, stamp = model_dir / "manifest.json", _stamp(model_dir)
    sources = export_sources_sha()
    if (
        manifest.exists()
        and json.loads(manifest.read_text()).get("model") == mcfg.to_dict()
        and stamp.exists()
        and stamp.read_text() == sources
    ):
        return model_dir
    log.info("exporting a random-init %s to %s", mcfg, model_dir)
    torch.manual_seed(0)
    save_checkpoint(SSMNetwork(mcfg), work / "ckpt")
    export_model(work / "ckpt", model_dir, overwrite=True)
    stamp.write_text(sources)
    return model_dir


# --- 1. Engine.step overhead ----------------------------------------------------------


def _interleave(
    variants: dict[str, Callable[[], object]], n: int, rng: np.random.Generator, desc: str
) -> dict[str, list[float]]:
    """Seconds per call of each variant over n rounds (after one warm-up call each): every
    round calls every variant once, in a fresh random order, so neighbours in time share the
    machine's drift."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for name in order:
        variants[name]()  # warm-up
    clock = time.perf_counter
    for _ in tqdm(range(n), desc=desc, leave=False):
        rng.shuffle(order)
        for name in order:
            t0 = clock()
            variants[name]()
            times[name].append(clock() - t0)
    return times


def _overhead_at(engine: Engine, bare, B: int, cfg: BenchConfig) -> list[dict]:
    rng = np.random.default_rng(B)
    x = rng.integers(0, engine.vocab_size, size=B)  # [B] int64
    s = (rng.standard_normal((B, engine.state_size)) * 0.1).astype(np.float32)  # [B, S]
    buf = engine.step_buffers(B)
    np.testing.assert_allclose(engine.step(x, s)[0], bare.run(None, {"input": x, "state": s})[0])
    variants = {
        "bare InferenceSession.run": lambda: bare.run(None, {"input": x, "state": s}),
        "Engine.step": lambda: engine.step(x, s),
        "Engine.step(out=StepBuffers)": lambda: engine.step(x, s, out=buf),
    }
    # the Batcher's path, in one call of all B rows (as the bare run): a slab of its own,
    # whose rows advance by one step per call
    slab, slot_buf = engine.new_slab(B), engine.step_buffers(B)
    slot_buf.inputs[:B] = x
    slot_buf.slots[:B, 0] = np.arange(B)
    if slab.array is not None:
        slab.array[:] = s
    variants["Engine.run_slots"] = lambda: engine.run_slots(slab, B, slot_buf)
    n = max(50, cfg.overhead_calls // (1 if B == 1 else 32))
    times = _interleave(variants, n, rng, f"overhead B={B}")
    base = statistics.median(times["bare InferenceSession.run"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"B": B, "variant": name, "us_per_call": 1e6 * med, "ratio": med / base})
    return rows


def bench_overhead(engine: Engine, cfg: BenchConfig) -> list[dict]:
    bare = engine.step_session  # the same onnxruntime session: only the Engine layer differs
    return [row for B in (1, 64) for row in _overhead_at(engine, bare, B, cfg)]


# --- 2. Batcher throughput ------------------------------------------------------------


async def _throughput(engine: Engine, streams: int, batching: bool, cfg: BenchConfig) -> dict:
    store = SessionStore(engine.state_size, capacity=streams, slab=engine.new_slab(streams))
    max_batch, delay = (cfg.max_batch, cfg.max_batch_delay) if batching else (1, 0.0)
    batcher = Batcher(engine, store, max_batch, delay)
    await batcher.start()
    loop = asyncio.get_running_loop()
    begin = loop.time() + cfg.warmup
    end = begin + cfg.seconds
    latencies: list[float] = []

    async def client(i: int) -> int:
        s = store.create()
        tok = np.array([i % engine.vocab_size], dtype=np.int64)  # [1]
        done = 0
        while True:
            t0 = loop.time()
            if t0 >= end:
                return done
            await batcher.step(s, tok)
            if t0 >= begin:
                latencies.append(loop.time() - t0)
                done += 1

    stats0 = None

    async def mark() -> None:
        nonlocal stats0
        await asyncio.sleep(max(0.0, begin - loop.time()))
        stats0 = (batcher.stats.batches, batcher.stats.steps)

    marker = asyncio.ensure_future(mark())
    counts = await asyncio.gather(*(client(i) for i in range(streams)))
    await marker
    await batcher.close()
    tokens = sum(counts)
    batches = batcher.stats.batches - stats0[0]
    lat = np.array(latencies) * 1e3  # ms
    return {
        "streams": streams,
        "batching": batching,
        "slab_device": store.slab.device,
        "max_batch": max_batch,
        "max_batch_delay_ms": 1e3 * delay,
        "tokens": tokens,
        "tokens_per_s": tokens / cfg.seconds,
        "p50_ms": float(np.percentile(lat, 50)) if tokens else None,
        "p99_ms": float(np.percentile(lat, 99)) if tokens else None,
        "mean_batch": (batcher.stats.steps - stats0[1]) / batches if batches else 0.0,
    }


def _alternate(rounds: int, run: Callable[[bool], dict]) -> list[dict]:
    """`rounds` rounds of run(False) and run(True), in alternating order (load drift hits
    both). Returns the row with the median tokens/s of each (False first), with every
    round's tokens/s; the True row also has `pair_ratios`, True / False of each round."""
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for k in range(rounds):
        for flag in (False, True) if k % 2 == 0 else (True, False):
            runs[flag].append(run(flag))
            log.info("%s", runs[flag][-1])
    rows = []
    for flag in (False, True):
        by_speed = sorted(runs[flag], key=lambda r: r["tokens_per_s"])
        rows.append(dict(by_speed[len(by_speed) // 2]))
        rows[-1]["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs[flag]]
    rows[1]["pair_ratios"] = [
        b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[False], runs[True])
    ]
    return rows


def bench_throughput(engine: Engine, cfg: BenchConfig) -> list[dict]:
    """Per stream count, `throughput_rounds` alternating rounds of batching off and on."""
    rows = []
    for streams in tqdm(cfg.streams, desc="batcher throughput", leave=False):
        rows += _alternate(
            cfg.throughput_rounds,
            lambda on, C=streams: asyncio.run(_throughput(engine, C, on, cfg)),
        )
    return rows


# --- 5. slot steps vs the in-place step and a copying store -------------------------------

SLOT_RANDOM = "Engine.run_slots, random slots"
SLOT_CONSECUTIVE = "Engine.run_slots, consecutive slots"
COPYING = "gather + Engine.step(out=StepBuffers) + scatter"
IN_PLACE = "in-place step (state, state_out aliased)"
IN_PLACE_NA = "n/a (the graph does not run in place)"


def _aliased_bindings(engine: Engine, slab_rows: np.ndarray, buf, c: int) -> list:
    """Per chunk of c rows, the IOBinding of the plain step graph with `state` and
    `state_out` both bound to those rows of `slab_rows` (C-contiguous [B, S] rows of the
    slab), `input` to buf.inputs[:n] and `output` to buf.outputs[:n], by address: the
    removed `Engine.step_in_place` (whose bindings were cached, as these are)."""
    sess, S = engine.step_session, engine.state_size
    B, x, y = slab_rows.shape[0], buf.inputs, buf.outputs
    out = []
    for i in range(0, B, c):
        n, rows = min(c, B - i), slab_rows[i : i + c]
        io = sess.io_binding()
        io.bind_input("input", "cpu", 0, x.dtype, [n, *x.shape[1:]], x.ctypes.data)
        io.bind_input("state", "cpu", 0, np.float32, [n, S], rows.ctypes.data)
        io.bind_output("state_out", "cpu", 0, np.float32, [n, S], rows.ctypes.data)
        io.bind_output("output", "cpu", 0, y.dtype, [n, *y.shape[1:]], y.ctypes.data)
        out.append(io)
    return out


def _slab_at(engine: Engine, B: int, cfg: BenchConfig) -> tuple[list[dict], dict]:
    """(rows: one per variant, with its median µs per call, and checks) at batch B."""
    rng = np.random.default_rng(1000 + B)
    S, V, cap = engine.state_size, engine.vocab_size, cfg.slab_capacity
    slab = engine.new_slab(cap)
    slab.array[:] = (rng.standard_normal((cap, S)) * 0.1).astype(np.float32)  # [cap, S]
    # disjoint rows per variant (none warms another's cache): two consecutive blocks, then
    # two random sets (distinct, unsorted, as the Batcher sends them) from the rest
    block_b, block_d = np.arange(0, B), np.arange(B, 2 * B)
    pool = rng.permutation(np.arange(2 * B, cap))
    random_a, random_c = pool[:B], pool[B : 2 * B]
    x = rng.integers(0, V, size=B)  # [B] int64
    bufs = {k: engine.step_buffers(B) for k in "abcd"}
    c = bufs["a"].chunk_rows  # the Batcher's rows per onnxruntime call
    arr = slab.array

    def slot_chunk(buf, slots):
        def run(i: int, n: int) -> np.ndarray:  # as Batcher._step_part fills its buffers
            buf.inputs[:n] = x[i : i + n]
            buf.slots[:n, 0] = slots[i : i + n]
            return engine.run_slots(slab, n, buf)

        return run

    def copy_chunk(i: int, n: int) -> np.ndarray:  # what the copying store did per chunk
        buf, rows = bufs["c"], random_c[i : i + n]
        states = buf.states[:n]
        np.take(arr, rows, axis=0, out=states, mode="clip")  # gather
        y, new = engine.step(x[i : i + n], states, out=buf)
        arr[rows] = new  # scatter
        return y

    aliased = _aliased_bindings(engine, arr[block_d[0] : block_d[-1] + 1], bufs["d"], c)

    def in_place_chunk(i: int, n: int) -> np.ndarray:
        bufs["d"].inputs[:n] = x[i : i + n]
        engine.step_session.run_with_iobinding(aliased[i // c])
        return bufs["d"].outputs[:n]

    def chunked(run_chunk, collect: list | None = None) -> None:
        for i in range(0, B, c):
            y = run_chunk(i, min(c, B - i))
            if collect is not None:
                collect.append(y.copy())

    chunk_fns = {
        SLOT_RANDOM: (slot_chunk(bufs["a"], random_a), random_a),
        SLOT_CONSECUTIVE: (slot_chunk(bufs["b"], block_b), block_b),
        COPYING: (copy_chunk, random_c),
        IN_PLACE: (in_place_chunk, block_d),
    }
    # checks, on fresh random states: each variant's outputs and new rows vs a plain
    # Engine.step of the same states (bit for bit decides whether the aliased run is timed)
    checks = {}
    for name, (fn, rows) in chunk_fns.items():
        equal, err = True, 0.0
        for _ in range(3):
            s0 = (rng.standard_normal((B, S)) * 0.5).astype(np.float32)  # [B, S]
            arr[rows] = s0
            want_y, want_s = engine.step(x, s0)
            got: list[np.ndarray] = []
            chunked(fn, got)
            got_y, got_s = np.concatenate(got), arr[rows]
            equal &= np.array_equal(got_y, want_y) and np.array_equal(got_s, want_s)
            err = max(err, float(np.abs(got_y - want_y).max()), float(np.abs(got_s - want_s).max()))
        checks[name] = {"bit_equal_to_engine_step": bool(equal), "max_abs_err": err}
    variants = {name: (lambda fn=fn: chunked(fn)) for name, (fn, _) in chunk_fns.items()}
    if not checks[IN_PLACE]["bit_equal_to_engine_step"]:
        log.warning("B=%d: the aliased step differs from Engine.step: not timed", B)
        del variants[IN_PLACE]
    n = max(50, cfg.overhead_calls // (1 if B == 1 else 8))
    times = _interleave(variants, n, rng, f"slab B={B}")
    med = {k: statistics.median(t) for k, t in times.items()}

    def paired(a: str, b: str) -> dict | None:
        """a / b per round (the two ran within the same round): median and quartiles."""
        if a not in times or b not in times:
            return None
        q = np.percentile(np.array(times[a]) / np.array(times[b]), [25, 50, 75])
        return {"p25": float(q[0]), "median": float(q[1]), "p75": float(q[2])}

    rows = []
    for name in chunk_fns:
        m = med.get(name)
        rows.append(
            {
                "B": B,
                "variant": name,
                "us_per_call": None if m is None else 1e6 * m,
                "vs_in_place": None if m is None or IN_PLACE not in med else m / med[IN_PLACE],
                "vs_copying": None if m is None else m / med[COPYING],
                **checks[name],
            }
        )
    summary = {
        "B": B,
        "calls": n,
        "chunk_rows": c,
        "chunks": -(-B // c),
        "in_place_runs": checks[IN_PLACE]["bit_equal_to_engine_step"],
        "slot_random_vs_in_place": next(
            r["vs_in_place"] for r in rows if r["variant"] == SLOT_RANDOM
        ),
        "slot_random_vs_copying": next(
            r["vs_copying"] for r in rows if r["variant"] == SLOT_RANDOM
        ),
        "slot_consecutive_vs_in_place": next(
            r["vs_in_place"] for r in rows if r["variant"] == SLOT_CONSECUTIVE
        ),
        "paired_slot_random_vs_in_place": paired(SLOT_RANDOM, IN_PLACE),
        "paired_slot_consecutive_vs_in_place": paired(SLOT_CONSECUTIVE, IN_PLACE),
        "paired_slot_random_vs_copying": paired(SLOT_RANDOM, COPYING),
    }
    return rows, summary


def bench_slab(engine: Engine, cfg: BenchConfig) -> dict:
    """Section 5 at B = 1 and 64 (see the module docstring)."""
    if engine.device != "cpu":
        log.warning("the slab section compares with host-memory copies: CPU only, skipped")
        return {}
    rows, summaries = [], []
    for B in (1, 64):
        r, s = _slab_at(engine, B, cfg)
        rows += r
        summaries.append(s)
        log.info("slab B=%d: %s", B, s)
    return {"capacity": cfg.slab_capacity, "rows": rows, "summary": summaries}


# --- 3. RSS over a long stream -------------------------------------------------------


def bench_rss(engine: Engine, cfg: BenchConfig) -> list[dict]:
    store = SessionStore(engine.state_size, capacity=1)
    s = store.create()
    marks = sorted({m for m in (1000, 10_000, 100_000, 200_000, 500_000) if m < cfg.rss_tokens})
    marks.append(cfg.rss_tokens)
    tokens = np.random.default_rng(0).integers(0, engine.vocab_size, size=(4099, 1))  # [n, 1]
    rows, t0, done = [], time.perf_counter(), 0
    with tqdm(total=cfg.rss_tokens, desc="RSS stream", unit="tok", leave=False) as bar:
        for m in marks:
            for i in range(done, m):
                _, new = engine.step(tokens[i % 4099], store.read(s)[None])
                store.commit(s, new[0], 1)
            bar.update(m - done)
            done = m
            rows.append(
                {"tokens": m, "rss_mib": rss_bytes() / 2**20, "seconds": time.perf_counter() - t0}
            )
    assert s.position == cfg.rss_tokens
    return rows


# --- 4. memory per session -----------------------------------------------------------


def bench_sessions(engine: Engine, cfg: BenchConfig) -> dict:
    S, n = engine.state_size, cfg.sessions
    rng = np.random.default_rng(0)
    row = rng.standard_normal(S).astype(np.float32)  # [S]
    gc.collect()
    trim_heap()  # memory freed by earlier sections must not shrink RSS during the count
    before = rss_bytes()
    store = SessionStore(S, capacity=n, ttl=3600.0)
    for _ in tqdm(range(n), desc="sessions", leave=False):
        store.commit(store.create(), row, 1)  # touches every page of the slot
    after = rss_bytes()
    return {
        "sessions": n,
        "state_size": S,
        "slab_bytes_per_session": store.bytes_per_session,
        "S_times_4": 4 * S,
        "rss_bytes_per_session": (after - before) / n,
        "bookkeeping_bytes_per_session": (after - before) / n - store.bytes_per_session,
    }


# --- report --------------------------------------------------------------------------


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = result["config"]["name"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["model"]
    load, load_end = (
        "n/a" if v is None else "/".join(f"{x:.1f}" for x in v)
        for v in (result.get("loadavg_start"), result.get("loadavg_end"))
    )
    lines = [
        f"# {name}",
        "",
        f"Model: {m['name']} (tokens, V={m['vocab_size']}, S={m['state_size']}), "
        f"{result['provider']}, onnxruntime threads={result['config']['threads']}; "
        f"machine: {result['machine']}; load average {load} (start) -> {load_end} (end).",
        "",
    ]
    if "overhead" in result:
        lines += [
            "## Engine.step overhead vs bare InferenceSession.run (target <= 1.2x)",
            "",
            "| B | variant | µs / call | ratio |",
            "|---|---|---|---|",
        ]
        rows = result["overhead"]
        for r in rows:
            us, ratio = r["us_per_call"], r["ratio"]
            lines.append(f"| {r['B']} | {r['variant']} | {us:.1f} | {ratio:.3f} |")
        bare = {r["B"]: r["us_per_call"] for r in rows if r["variant"].startswith("bare")}
        lines += [
            "",
            f"The step graph alone gains {bare[1] / (bare[64] / 64):.1f}x per token from B = 1 to "
            f"B = 64 ({bare[1]:.0f} µs vs {bare[64] / 64:.0f} µs per token): the ceiling of what "
            "batching can add beyond saving the per-call overhead.",
        ]
    if "throughput" in result:
        lines += [
            "",
            "## Batcher throughput, closed-loop streams (target on/off >= 5x at 64)",
            "",
            "| streams | batching | tokens/s | p50 ms | p99 ms | mean batch | on/off |",
            "|---|---|---|---|---|---|---|",
        ]
        off = {r["streams"]: r["tokens_per_s"] for r in result["throughput"] if not r["batching"]}
        for r in result["throughput"]:
            base = off[r["streams"]]
            speedup = r["tokens_per_s"] / base if r["batching"] and base else None
            mode = "on" if r["batching"] else "off"
            lines.append(
                f"| {r['streams']} | {mode} | {r['tokens_per_s']:.0f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch']:.1f} | "
                f"{'' if speedup is None else f'{speedup:.1f}x'} |"
            )
        paired = [r for r in result["throughput"] if r.get("pair_ratios")]
        if paired:
            lines += [
                "",
                "tokens/s: the median of the rounds; on/off of each round pair (back to back, "
                "in alternating order), median [all]: "
                + "; ".join(
                    f"{r['streams']} streams {statistics.median(r['pair_ratios']):.1f}x "
                    f"[{', '.join(f'{x:.1f}' for x in r['pair_ratios'])}]"
                    for r in paired
                )
                + ".",
            ]
    if result.get("slab"):
        lines += _slab_lines(result["slab"], result["config"])
    if "rss" in result:
        lines += [
            "",
            "## RSS over one long stream",
            "",
            "| tokens | RSS MiB | seconds |",
            "|---|---|---|",
        ]
        for r in result["rss"]:
            lines.append(f"| {r['tokens']:,} | {r['rss_mib']:.1f} | {r['seconds']:.1f} |")
    if "sessions" in result:
        s = result["sessions"]
        lines += [
            "",
            f"## Memory per session ({s['sessions']:,} sessions)",
            "",
            f"slab bytes per session {s['slab_bytes_per_session']:,} (S × 4 = {s['S_times_4']:,}); "
            f"RSS growth per session {s['rss_bytes_per_session']:,.0f} bytes "
            f"(bookkeeping {s['bookkeeping_bytes_per_session']:,.0f}).",
            "",
        ]
    (out / f"{name}.md").write_text("\n".join(lines))
    plot(result, out / f"{name}.png")


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _slab_lines(slab: dict, config: dict) -> list[str]:
    """The slab section's tables: per B, µs per call of each variant and its ratios."""
    chunk = {s["B"]: s for s in slab["summary"]}
    lines = [
        "",
        f"## Slot steps vs the in-place step and a copying store (slab of {slab['capacity']:,} "
        "rows)",
        "",
        "One step of B sessions whose states are rows of the slab, in the Batcher's chunks "
        "of `chunk_rows` rows ("
        + ", ".join(
            f"B = {b}: {s['chunks']} call(s) of <= {s['chunk_rows']}" for b, s in chunk.items()
        )
        + "); every variant on its own rows, interleaved call by call in random order, "
        "median per call. In-place: the plain step graph with `state` and `state_out` bound "
        "to the same consecutive slab rows (the removed `Engine.step_in_place`), timed only "
        "where that aliased run equals `Engine.step` bit for bit.",
        "",
        "| B | variant | µs / call | vs in-place | vs gather+step+scatter | = Engine.step |",
        "|---|---|---|---|---|---|",
    ]
    for r in slab["rows"]:
        us = IN_PLACE_NA if r["us_per_call"] is None else f"{r['us_per_call']:.1f}"
        same = "bit for bit" if r["bit_equal_to_engine_step"] else f"max err {r['max_abs_err']:.1e}"
        lines.append(
            f"| {r['B']} | {r['variant']} | {us} | {_x(r['vs_in_place'])} | "
            f"{_x(r['vs_copying'])} | {same} |"
        )
    lines += ["", "Per-round ratios (the two variants in the same round), median [p25, p75]:", ""]
    for s in slab["summary"]:
        parts = []
        for key, label in (
            ("paired_slot_random_vs_in_place", "slot (random) / in-place"),
            ("paired_slot_consecutive_vs_in_place", "slot (consecutive) / in-place"),
            ("paired_slot_random_vs_copying", "slot (random) / gather+step+scatter"),
        ):
            q = s.get(key)
            parts.append(
                f"{label} {IN_PLACE_NA}" if q is None
                else f"{label} {q['median']:.3f} [{q['p25']:.3f}, {q['p75']:.3f}]"
            )  # fmt: skip
        lines.append(f"- B = {s['B']} ({s['calls']} rounds): " + "; ".join(parts) + ".")
    at64 = chunk.get(64, {})
    r = at64.get("slot_random_vs_in_place")
    verdict = (
        f"in-place {IN_PLACE_NA}" if r is None
        else f"slot (random slots) / in-place = {r:.3f}: {'met' if r <= 1.0 else 'NOT met'}"
    )  # fmt: skip
    lines += ["", f"Target: the B = 64 slot step costs no more than the in-place step: {verdict}."]
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "throughput" not in result or "rss" not in result:
        return  # a partial run (--sections): the plot needs both
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for batching, style in ((False, "o--"), (True, "o-")):
        rows = [r for r in result["throughput"] if r["batching"] == batching]
        ax1.plot(
            [r["streams"] for r in rows],
            [r["tokens_per_s"] for r in rows],
            style,
            label=f"batching {'on' if batching else 'off'}",
        )
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="tokens / s")
    ax1.set_title("Batcher aggregate throughput")
    ax1.legend()
    rss = result["rss"]
    ax2.plot([r["tokens"] for r in rss], [r["rss_mib"] for r in rss], "o-")
    ax2.set(xscale="log", xlabel="tokens streamed into one session", ylabel="RSS (MiB)")
    ax2.set_ylim(0, max(r["rss_mib"] for r in rss) * 1.2)
    ax2.set_title("RSS over one long stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OBSOLETE_SECTIONS = ("in_place",)  # in-place vs copied Batcher (Engine.step_in_place: removed)
SECTIONS = {
    "overhead": bench_overhead,
    "throughput": bench_throughput,
    "slab": bench_slab,
    "sessions": bench_sessions,
    "rss": bench_rss,
}


def run(cfg: BenchConfig) -> dict:
    model_dir = prepare_model(cfg)
    engine = Engine(model_dir, device="auto", threads=cfg.threads, step_threads=cfg.threads)
    info = engine.info
    result = {
        "config": asdict(cfg),
        "model": {k: info[k] for k in ("name", "vocab_size", "state_size", "d_output", "dtype")},
        "provider": engine.provider,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),  # when taken (run_all's report shows it)
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    previous = Path(cfg.out) / f"{cfg.name}.json"
    if set(cfg.sections) != set(SECTIONS) and previous.exists():
        # a partial rerun: keep the other sections of the earlier result
        old = json.loads(previous.read_text())
        for gone in OBSOLETE_SECTIONS:  # measured by code that no longer exists
            old.pop(gone, None)
        if old.get("model") != result["model"]:
            raise ValueError(f"{previous} is a result of another model; rerun all sections")
        result = {**old, **result}
    for name, fn in SECTIONS.items():
        if name in cfg.sections:
            result[name] = fn(engine, cfg)
    result["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_report(result, Path(cfg.out))
    return result


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    from run_all import dir_with, out_dir

    d = BenchConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=dir_with("manifest.json"),
        help="exported model dir (default: export a random-init model)",
    )
    p.add_argument(
        "--ckpt",
        type=dir_with("config.json"),
        help="a checkpoint dir to export once (into --work-dir) and measure",
    )
    p.add_argument("--work-dir", default=d.work_dir, help="where the random-init model is cached")
    p.add_argument("--d-model", type=int, default=d.d_model, help="random-init model width")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="random-init model depth")
    p.add_argument("--d-state", type=int, default=d.d_state, help="random-init model state N")
    p.add_argument("--threads", type=int, default=d.threads, help="onnxruntime intra-op threads")
    p.add_argument("--streams", type=int, nargs="+", default=list(d.streams), help="stream counts")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured window per run")
    p.add_argument(
        "--throughput-rounds", type=int, default=d.throughput_rounds,
        help="off/on rounds per stream count (median reported)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="batching on: max batch")
    p.add_argument(
        "--max-batch-delay", type=float, default=d.max_batch_delay, help="batching on: delay (s)"
    )
    p.add_argument("--rss-tokens", type=int, default=d.rss_tokens, help="tokens in the RSS stream")
    p.add_argument("--sessions", type=int, default=d.sessions, help="sessions for memory/session")
    p.add_argument(
        "--overhead-calls", type=int, default=d.overhead_calls,
        help="interleaved calls per variant at B = 1 (overhead, slab; fewer at B = 64)",
    )  # fmt: skip
    p.add_argument(
        "--slab-capacity", type=int, default=d.slab_capacity, help="slab rows (slab section)"
    )
    p.add_argument("--out", type=out_dir, default=d.out, help="results directory")
    p.add_argument("--name", default=d.name, help="base name of the result files")
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(d.sections),
        help="what to measure; a partial run keeps the other sections of NAME.json",
    )
    p.add_argument("--from-json", help="only re-render the report of an earlier result JSON")
    a = p.parse_args(argv)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        write_report(result, Path(a.out))
        raise SystemExit(0)
    return BenchConfig(
        model=a.model,
        ckpt=a.ckpt,
        work_dir=a.work_dir,
        d_model=a.d_model,
        n_layers=a.n_layers,
        d_state=a.d_state,
        threads=a.threads,
        streams=tuple(a.streams),
        seconds=a.seconds,
        throughput_rounds=a.throughput_rounds,
        max_batch=a.max_batch,
        max_batch_delay=a.max_batch_delay,
        rss_tokens=a.rss_tokens,
        sessions=a.sessions,
        overhead_calls=a.overhead_calls,
        slab_capacity=a.slab_capacity,
        out=a.out,
        name=a.name,
        sections=tuple(a.sections),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        log.error("%s", e)
        return 2
    result = run(cfg)
    sys.stdout.write((Path(cfg.out) / f"{cfg.name}.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    from run_all import run_script

    run_script(main, "bench_runtime.py")  # an export under way removes its temporary directory
