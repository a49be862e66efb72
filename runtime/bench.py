"""`ssmstream bench MODEL_DIR`: quick step / prefill latency of an exported model (no torch).

Measures, on this machine, with the Engine only (no server):

    step     per-call latency p50 / p99 of Engine.step at batch B (default 1), and the
             tokens/s it implies (B / p50)
    prefill  Engine.prefill of one T-token prompt (default 256) vs T sequential steps

For the full runtime benchmark (Batcher throughput, RSS, memory per session) see
benchmarks/bench_runtime.py.

Dimension letters: B batch, T prompt length, S packed state size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .config import with_flags
from .engine import Engine
from .errors import RuntimeErrorBase

log = logging.getLogger(__name__)


def random_inputs(engine: Engine, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Tokens in [0, V) or standard-normal values, of shape `shape` (+ d_input)."""
    if engine.input_kind == "tokens":
        return rng.integers(0, engine.vocab_size, size=shape)
    return rng.standard_normal((*shape, engine.d_input)).astype(np.float32)


# bytes a run needs per state float of --batch (measured: ~7 floats, for the states in and out,
# the inputs and onnxruntime's intermediates) and per output float of --prefill (its copies)
STEP_BYTES_PER_STATE_FLOAT, PREFILL_BYTES_PER_OUTPUT_FLOAT = 8 * 4, 3 * 4


def available_bytes() -> int | None:
    """The memory a run may still take (Linux): MemAvailable of /proc/meminfo, or less where
    a cgroup (v2: a container's) limit leaves less; None where not known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def too_large(engine: Engine, batch: int, prefill: int, steps: int = 0) -> str | None:
    """Why --batch / --prefill / --steps would not fit in the memory available now (the kernel
    would kill the run instead of numpy refusing it), or None. --steps holds every step's
    inputs (8-byte tokens or float32 values) and its time at once."""
    free = available_bytes()
    if free is None:
        return None
    for flag, n, need in (
        ("--batch", batch, batch * engine.state_size * STEP_BYTES_PER_STATE_FLOAT),
        ("--prefill", prefill, prefill * engine.d_output * PREFILL_BYTES_PER_OUTPUT_FLOAT),
        ("--steps", steps, (steps + 10) * (batch * (engine.d_input or 2) * 4 + 8)),
    ):
        if need > free:
            gib = need / 2**30, free / 2**30
            return f"{flag} {n} needs about {gib[0]:.1f} GiB, {gib[1]:.1f} GiB is available"
    return None


def bench_step(engine: Engine, batch: int, steps: int, seed: int = 0) -> dict:
    """Latency of `steps` calls of Engine.step at batch `batch` (after 10 warm-up calls)."""
    rng = np.random.default_rng(seed)
    x = random_inputs(engine, rng, (steps + 10, batch))  # [steps, B(, d_in)]
    s = engine.new_state(batch)  # [B, S]
    times = np.empty(steps, dtype=np.float64)
    for i in range(steps + 10):
        t0 = time.perf_counter()
        _, s = engine.step(x[i], s)
        if i >= 10:
            times[i - 10] = time.perf_counter() - t0
    p50, p99 = np.percentile(times, [50, 99])
    return {"batch": batch, "steps": steps, "p50_us": 1e6 * p50, "p99_us": 1e6 * p99,
            "tokens_per_s": batch / p50}  # fmt: skip


def bench_prefill(engine: Engine, length: int, seed: int = 0) -> dict:
    """One prompt of `length` inputs: Engine.prefill vs `length` sequential steps."""
    rng = np.random.default_rng(seed)
    x = random_inputs(engine, rng, (1, length))  # [1, T(, d_in)]
    engine.prefill(x, engine.new_state())  # warm-up
    t0 = time.perf_counter()
    _, s_pre = engine.prefill(x, engine.new_state())
    t_prefill = time.perf_counter() - t0
    s = engine.new_state()
    t0 = time.perf_counter()
    for t in range(length):
        _, s = engine.step(x[:, t], s)
    t_steps = time.perf_counter() - t0
    return {
        "length": length,
        "prefill_ms": 1e3 * t_prefill,
        "steps_ms": 1e3 * t_steps,
        "speedup": t_steps / t_prefill,
        "max_state_diff": float(np.abs(s_pre - s).max()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("model_dir", help="an exported model directory")
    p.add_argument("--batch", type=int, default=1, help="streams per step call, B (default: 1)")
    p.add_argument("--steps", type=int, default=1000, help="timed step calls (default: 1000)")
    p.add_argument(
        "--prefill", type=int, default=256, help="prompt length T; 0: skip (default: 256)"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="where to run: auto uses CUDA when it is usable (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None,
        help="onnxruntime intra-op threads of the prefill graph (default: all cores)",
    )  # fmt: skip
    p.add_argument(
        "--step-threads", type=int, default=None,
        help="intra-op threads of the step graph (default: 1, as `ssmstream serve`)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.batch < 1 or a.steps < 1 or a.prefill < 0:
        p.error("--batch and --steps must be >= 1, --prefill >= 0")
    try:
        engine = Engine(
            a.model_dir, device=a.device, threads=a.threads, step_threads=a.step_threads
        )
        info = engine.info
        log.info("%s: %s, S=%d, %s on %s", info["name"], info["input_kind"],
                 info["state_size"], info["dtype"], engine.provider)  # fmt: skip
        if (why := too_large(engine, a.batch, a.prefill, a.steps)) is not None:
            log.error("ssmstream bench: not enough memory: %s; give a smaller one", why)
            return 2
        r = bench_step(engine, a.batch, a.steps)
        log.info("step  B=%d: p50 %.1f µs, p99 %.1f µs -> %.0f tokens/s",
                 r["batch"], r["p50_us"], r["p99_us"], r["tokens_per_s"])  # fmt: skip
        if a.prefill and engine.info["prefill_sha256"] is None:
            log.info("prefill: the model has no prefill graph (exported with --no-prefill)")
        elif a.prefill:
            r = bench_prefill(engine, a.prefill)
            log.info("prefill T=%d: %.2f ms vs %.2f ms stepping (%.1fx), state diff %.1e",
                     r["length"], r["prefill_ms"], r["steps_ms"], r["speedup"],
                     r["max_state_diff"])  # fmt: skip
    except RuntimeErrorBase as e:  # a model it cannot open, a flag's value (named)
        log.error("ssmstream bench: error: %s", with_flags(str(e)))
        return 2
    except MemoryError:  # numpy's arrays of --batch states or --prefill inputs
        log.error("ssmstream bench: not enough memory for --batch %d / --prefill %d: give "
                  "smaller ones", a.batch, a.prefill)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
