"""Session features benchmark: the prefix cache and rewind, through gRPC, on one model.

Three measures, each a ratio of two times taken in one run on one server process
(`python -m ssmstream.runtime.server`, clients in this process, rounds interleaved):

    cache hit      a session ready after its T-token prompt: `CreateSession(prompt)` when the
                   prompt is cached vs when it is new (a miss): target: the hit is ready
                   ≥ 20× sooner; and the same for the time to first token of `Generate`
                   (max_new_tokens=1) on a new session (a streaming call: more transport).
                   The floors beside it: `CreateSession` without a prompt on this server,
                   and the same call carrying the T-token prompt to a bare grpc.aio server
                   that answers at once (bench_server's echo server: no session, no cache):
                   what the transport alone costs through this client, so miss ÷ that is
                   the most any server could show here, and hit − that is what this
                   server's cache hit itself costs; the same for Generate (the echo
                   server's Generate answers one token and ends).
    cache miss     the same miss on a server with the cache on vs one with it off
                   (--prefix-cache-mb 0): target ≤ 1.05× (what caching a prompt's states
                   costs the request that fills the cache). The cache (--cache-mb) is full
                   before the rounds start, as a server's is after its first prompts: each
                   new prompt evicts old entries and its states reuse their memory. While a
                   cache is still filling, every entry is also memory the OS touches for the
                   first time (about 45 µs per 64 KiB state on this project's machine).
    rewind         `RewindSession` to a random position in the window, vs one `Step` of
                   one prefill chunk plus `SnapshotSession` (a checkpoint copy) on the same
                   server: target ≤ 1× (a rewind costs at most one chunk's replay and one
                   checkpoint copy).

    python benchmarks/bench_sessions.py --model model/   # an exported model dir
    python benchmarks/bench_sessions.py                  # exports the shipped checkpoint

Writes benchmarks/results/bench_sessions.{json,md}. Dimension letters: T prompt length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import EchoProc  # noqa: E402
from run_all import cpu_model, dir_with, export_model, int_at_least, out_dir, run_script  # noqa: E402

log = logging.getLogger("bench_sessions")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "examples" / "checkpoints" / "byte-lm"


class Server:
    """`ssmstream serve` in a subprocess on 127.0.0.1 (an ephemeral port)."""

    START_SECONDS = 120.0  # to write its port file

    def __init__(self, model: str, *flags: str):
        self.dir = tempfile.mkdtemp(prefix="bench-sessions-")
        port_file = os.path.join(self.dir, "port.json")
        cmd = [sys.executable, "-m", "ssmstream.runtime.server", model, "--port", "0",
               "--port-file", port_file, "--device", "cpu", "--log-level", "WARNING",
               *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + self.START_SECONDS
            while not os.path.exists(port_file):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {cmd}")
                time.sleep(0.05)
            self.address = f"127.0.0.1:{json.loads(Path(port_file).read_text())['port']}"
        except BaseException:  # not started, or interrupted while starting: leave nothing
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def ttft(client, prompt: list[int]) -> float:
    """Seconds from sending Generate (1 token) on a new session to its response."""
    t0 = time.perf_counter()
    for _ in client.generate(prompt, max_new_tokens=1, temperature=0.0):
        pass
    return time.perf_counter() - t0


def ready(client, prompt: list[int]) -> float:
    """Seconds for CreateSession(prompt) (the session has consumed the prompt); closed after."""
    t0 = time.perf_counter()
    s = client.create_session(prompt=prompt)
    dt = time.perf_counter() - t0
    s.close()
    return dt


def run(model: str, T: int, rounds: int, seed: int = 0, cache_mb: float = 16) -> dict:
    from ssmstream.runtime.client import Client

    rng = np.random.default_rng(seed)
    load_at_start = list(os.getloadavg())
    on = off = echo = None
    try:  # each server started is stopped, also when a later one fails to start
        on = Server(model, "--prefix-cache-mb", str(cache_mb))
        off = Server(model, "--prefix-cache-mb", "0")
        with Client(on.address, timeout=120) as c_on, Client(off.address, timeout=120) as c_off:
            info = c_on.info()
            echo = EchoProc(info.d_output)
            c_echo = Client(f"127.0.0.1:{echo.port}", timeout=120)
            V = info.vocab_size
            ttft(c_off, rng.integers(0, V, T).tolist())
            # fill the cache: a prompt caches a state per chunk (64) and one at its end
            per_prompt = (T // 64 + 1) * info.state_bytes
            for _ in range(min(500, math.ceil(cache_mb * 2**20 / per_prompt) + 2)):
                ready(c_on, rng.integers(0, V, T).tolist())
            cached = rng.integers(0, V, T).tolist()
            ttft(c_on, cached)  # fills the cache with this prompt
            new = lambda: rng.integers(0, V, T).tolist()  # noqa: E731
            measures = {  # name: one timed call
                "hit": lambda: ttft(c_on, cached),
                "miss_on": lambda: ttft(c_on, new()),
                "miss_off": lambda: ttft(c_off, new()),
                "ready_hit": lambda: ready(c_on, cached),
                "ready_miss": lambda: ready(c_on, new()),
                "ready_empty": lambda: ready(c_on, []),
                "echo_ready_prompt": lambda: ready(c_echo, cached),
                "echo_ready_empty": lambda: ready(c_echo, []),
                "echo_ttft": lambda: ttft(c_echo, cached),
            }
            times = {name: [] for name in measures}
            # interleaved, so the machine's drift hits all alike, in a new random order each
            # round: a server that sat idle answers its next call slower, and a fixed order
            # would hand one measure that cold call every round
            for _ in range(rounds):
                for name in rng.permutation(list(measures)):
                    times[name].append(measures[name]())
            c_echo.close()
            # rewind vs one chunk's Step + a snapshot, on one session
            window = int(info.limits.rewind_window)
            chunk = 64 if window else 0
            s = c_on.create_session()
            for _ in range(window // 256 + 1):
                s.step(tokens=rng.integers(0, V, 256).tolist(), output="none")
            rewind, replay = [], []
            for _ in range(rounds):
                top = s.position
                target = int(rng.integers(max(0, top - window + 1), top))
                t0 = time.perf_counter()
                s.rewind(target)
                rewind.append(time.perf_counter() - t0)
                piece = rng.integers(0, V, chunk).tolist()
                t0 = time.perf_counter()
                s.step(tokens=piece, output="none")
                s.snapshot()
                replay.append(time.perf_counter() - t0)
                if top > s.position:  # back to where the window was
                    s.step(tokens=rng.integers(0, V, top - s.position).tolist(), output="none")
    finally:
        with contextlib.ExitStack() as stopping:  # each stopped, though one stop is interrupted
            for server in (on, off, echo):
                if server is not None:
                    stopping.callback(server.stop)
    times |= {"rewind": rewind, "chunk_step_and_snapshot": replay}
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "model": model,
        "T": T,
        "rounds": rounds,
        "cache_mb": cache_mb,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "cpu": cpu_model(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),  # when taken (run_all's report shows it)
        "load_avg_start": load_at_start,
        "load_avg": list(os.getloadavg()),
        "median_s": med,
        "hit_speedup": med["miss_on"] / med["hit"],
        "ready_speedup": med["ready_miss"] / med["ready_hit"],
        "ready_ceiling": med["ready_miss"] / med["ready_empty"],
        "transport_ceiling": med["ready_miss"] / med["echo_ready_prompt"],
        "ttft_transport_ceiling": med["miss_on"] / med["echo_ttft"],
        "miss_cost": med["miss_on"] / med["miss_off"],
        "rewind_vs_chunk": med["rewind"] / med["chunk_step_and_snapshot"],
    }


def report(r: dict) -> str:
    m = r["median_s"]
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    return "\n".join([
        "# bench_sessions — prefix cache and rewind through gRPC",
        "",
        f"{r['machine']}; model {r['model']}; prompt T = {r['T']}; {r['rounds']} interleaved "
        f"rounds (medians); a full {r.get('cache_mb', 256):g} MiB cache; load average at "
        f"the end {r['load_avg']}.",
        "",
        "| measure | time | ratio | target |",
        "|---|---:|---:|---|",
        f"| session ready (CreateSession with the prompt), cached vs new prompt | "
        f"{1e3 * m['ready_hit']:.2f} vs {1e3 * m['ready_miss']:.2f} ms | "
        f"**{r['ready_speedup']:.1f}×** sooner | ≥ 20× ({ok(r['ready_speedup'] >= 20)}) |",
        f"| floor: CreateSession without a prompt | {1e3 * m['ready_empty']:.2f} ms | "
        f"{r['ready_ceiling']:.1f}× (new prompt ÷ floor: the most a cache can show here) | — |",
        f"| transport floor: CreateSession with the prompt to a bare grpc.aio server that "
        f"answers at once (without a prompt: {1e3 * m['echo_ready_empty']:.2f} ms) | "
        f"{1e3 * m['echo_ready_prompt']:.2f} ms | {r['transport_ceiling']:.1f}× (new prompt ÷ "
        f"this floor: the most any server could show here); the cache hit itself costs "
        f"{1e3 * (m['ready_hit'] - m['echo_ready_prompt']):.2f} ms above it | — |",
        f"| time to first token (Generate), cached prompt vs new prompt | {1e3 * m['hit']:.2f} vs "
        f"{1e3 * m['miss_on']:.2f} ms | **{r['hit_speedup']:.1f}×** sooner | ≥ 20× "
        f"({ok(r['hit_speedup'] >= 20)}) |",
        f"| transport floor: Generate with the prompt to the bare server (one token, then the "
        f"end) | {1e3 * m['echo_ttft']:.2f} ms | {r['ttft_transport_ceiling']:.1f}× (new "
        f"prompt ÷ this floor: the most any server could show here); the cache hit itself "
        f"costs {1e3 * (m['hit'] - m['echo_ttft']):.2f} ms above it | — |",
        f"| new prompt, cache on vs off | {1e3 * m['miss_on']:.2f} vs {1e3 * m['miss_off']:.2f} "
        f"ms | **{r['miss_cost']:.3f}×** | ≤ 1.05× ({ok(r['miss_cost'] <= 1.05)}) |",
        f"| rewind vs one chunk's Step + a snapshot | {1e3 * m['rewind']:.2f} vs "
        f"{1e3 * m['chunk_step_and_snapshot']:.2f} ms | **{r['rewind_vs_chunk']:.2f}×** | ≤ 1× "
        f"({ok(r['rewind_vs_chunk'] <= 1)}) |",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        type=dir_with("manifest.json"),
        help="exported model dir (default: export byte-lm)",
    )
    p.add_argument("--prompt-len", type=int_at_least(1), default=1024, help="T, prompt tokens")
    p.add_argument(
        "--rounds", type=int_at_least(1), default=15, help="interleaved rounds per measure"
    )
    p.add_argument(
        "--cache-mb", type=float, default=16, help="the prefix cache, filled before the rounds"
    )
    p.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-sessions-model-") as tmp:
        model = a.model
        if model is None:
            model = str(export_model(SHIPPED, Path(tmp) / "model"))
        r = run(model, a.prompt_len, a.rounds, cache_mb=a.cache_mb)
    if a.model is None:
        r["model"] = f"{SHIPPED.relative_to(ROOT)} (exported)"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sessions.json").write_text(json.dumps(r, indent=1))
    (out / "bench_sessions.md").write_text(report(r))
    log.info("%s", report(r))
    return 0


if __name__ == "__main__":
    run_script(main, "bench_sessions.py")  # a SIGTERM stops the servers, removes the model
