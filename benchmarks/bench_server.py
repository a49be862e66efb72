"""Server benchmark: per-token latency and aggregate tokens/s over gRPC `Stream`.

For C concurrent clients (default 1, 16, 64, 256), each with its own session and its own
bidi Stream, every client sends one token per request and waits for its response
(closed loop). Measured at the client:

    latency  = wall time of one request → response (per token), p50 / p99 over all clients
    tokens/s = tokens answered / wall time of the measured window, all clients together

with batching on (--max-batch B, --max-batch-delay d) and off (--max-batch 1). The gRPC
overhead ratio is  p50 per-token latency at 1 client ÷ p50 of a bare in-process
`Engine.step` on one session (same model, same machine). Targets (issue 6): ratio ≤ 3 at
1 client; tokens/s at 64 clients ≥ 4 × tokens/s at 1 client.

The server runs in a subprocess (`python -m ssmstream.runtime.server`), the clients in this
processes (--client-procs, each one asyncio loop of AsyncClient streams), so client and
server do not share a GIL; on a small machine they still share the cores, which the
report states. Clients start measuring together, after a warm-up, at one wall-clock time.

    python benchmarks/bench_server.py                     # builds a random-init model
    python benchmarks/bench_server.py --model model/      # an exported model dir

Writes benchmarks/results/bench_server.{json,md,png}.
Dimension letters: C concurrent clients, S packed state size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_server")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class BenchConfig:
    model: str | None = None  # exported model dir; None: export a random-init model
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 32  # the shipped example's size (examples/checkpoints/byte-lm)
    vocab_size: int = 256
    clients: tuple[int, ...] = (1, 16, 64, 256)
    tokens_per_client: int = 0  # 0: auto (about `budget` tokens in all, at least 20 each)
    budget: int = 3000
    warmup: int = 5
    client_procs: int = 0  # processes the clients are spread over; 0: min(4, CPUs)
    threads: int | None = None  # onnxruntime intra-op threads of server and bare engine
    max_batch: int = 256
    max_batch_delay: float = 0.002
    device: str = "auto"
    out: str = str(RESULTS)
    seed: int = 0


@dataclass
class Run:
    clients: int
    batching: bool
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0
    extra: dict = field(default_factory=dict)


def build_model(cfg: BenchConfig, workdir: Path) -> Path:
    """Export a random-init token model (the server's speed does not depend on training)."""
    import torch
    from ssmstream.export import export_model
    from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

    torch.manual_seed(cfg.seed)
    net = SSMNetwork(
        SSMConfig(
            vocab_size=cfg.vocab_size,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            d_state=cfg.d_state,
        )
    )
    ckpt, model = workdir / "ckpt", workdir / "model"
    save_checkpoint(net, ckpt)
    export_model(ckpt, model)
    return model


def bare_step_latency(
    model_dir: Path, device: str, threads: int | None = None, n: int = 2000
) -> dict:
    """p50/p99 of Engine.step on one session in-process, ms."""
    from ssmstream.runtime.engine import Engine

    eng = Engine(model_dir, device=device, threads=threads)
    V = int(eng.info["vocab_size"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=n + 50, dtype=np.int64)  # [n + warmup]
    state = eng.new_state(1)  # [1, S]
    times = []
    for i, t in enumerate(tokens):
        t0 = time.perf_counter()
        _, state = eng.step(np.array([t], dtype=np.int64), state)
        if i >= 50:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * np.asarray(times, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "provider": eng.info.get("provider"),
        "state_size": int(eng.info["state_size"]),
    }


class ServerProc:
    """The server under test in a subprocess; `port` once it is serving."""

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        max_batch: int,
        delay: float,
        device: str,
        threads: int | None = None,
    ):
        port_file = workdir / f"port-{max_batch}.json"
        port_file.unlink(missing_ok=True)
        self.log_path = workdir / f"server-{max_batch}.log"
        cmd = [
            sys.executable, "-m", "ssmstream.runtime.server", str(model_dir),
            "--port", "0", "--port-file", str(port_file), "--device", device,
            "--max-batch", str(max_batch), "--max-batch-delay", str(delay),
            "--max-sessions", "1024", "--log-level", "WARNING",
        ]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not port_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server failed to start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = json.loads(port_file.read_text())["port"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


async def _client(target: str, V: int, n: int, warmup: int, seed: int, start_at: float):
    """One closed-loop Stream client; returns (latencies s, first send, last receive)."""
    from ssmstream.runtime.client import AsyncClient

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=n + warmup, dtype=np.int64).tolist()
    lat = []
    async with AsyncClient(target) as c:
        s = await c.create_session()
        async with s.open_stream() as st:
            for t in tokens[:warmup]:
                await st.send(tokens=[t])
            await asyncio.sleep(max(0.0, start_at - time.time()))
            first = time.time()
            for t in tokens[warmup:]:
                t0 = time.perf_counter()
                await st.send(tokens=[t])
                lat.append(time.perf_counter() - t0)
            last = time.time()
        await s.close()
    return lat, first, last


async def _clients(target, V, n, warmup, seeds, start_at):
    return await asyncio.gather(*(_client(target, V, n, warmup, i, start_at) for i in seeds))


def _client_proc(args) -> list:
    """A client process: its share of the C streams on one asyncio loop."""
    return asyncio.run(_clients(*args))


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(
    target: str,
    C: int,
    V: int,
    n: int,
    warmup: int,
    batching: bool,
    procs: int,
    server_pid: int | None = None,
) -> Run:
    """C closed-loop clients spread over `procs` processes, started together."""
    P = max(1, min(procs, C))
    shares = [list(range(i, C, P)) for i in range(P)]  # client seeds per process
    start_at = time.time() + 2.0 + 0.02 * C  # after every client's warm-up
    args = [(target, V, n, warmup, share, start_at) for share in shares]
    ctx = multiprocessing.get_context("spawn")
    cpu0 = process_cpu_seconds(server_pid) if server_pid else None
    with ctx.Pool(P) as pool:
        results = [r for part in pool.map(_client_proc, args) for r in part]
    cpu1 = process_cpu_seconds(server_pid) if server_pid else None
    lat = [x for r, _, _ in results for x in r]
    seconds = max(r[2] for r in results) - min(r[1] for r in results)
    ms = 1e3 * np.asarray(lat, dtype=np.float64)
    return Run(
        clients=C,
        batching=batching,
        tokens=len(lat),
        seconds=seconds,
        tokens_per_s=len(lat) / seconds,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        extra={
            "client_processes": P,
            # server CPU per token answered, warm-up and session setup included: a cost
            # measure that other load on the machine disturbs less than wall time
            "server_cpu_ms_per_token": None
            if cpu0 is None or cpu1 is None
            else 1e3 * (cpu1 - cpu0) / (C * (n + warmup)),
        },
    )


def write_report(cfg: BenchConfig, bare: dict, runs: list[Run], meta: dict) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    by = {(r.clients, r.batching): r for r in runs}
    one = by.get((1, True)) or by.get((1, False))
    one_off = by.get((1, False))
    best_one = min((r for r in (by.get((1, True)), one_off) if r), key=lambda r: r.p50_ms)
    ratio = best_one.p50_ms / bare["p50_ms"]
    scaling = None
    if (64, True) in by and one is not None:
        scaling = by[(64, True)].tokens_per_s / by[(1, True)].tokens_per_s
    summary = {
        "overhead_ratio_1_client": ratio,
        "overhead_ratio_target": 3.0,
        "overhead_ok": ratio <= 3.0,
        "tokens_per_s_64_over_1": scaling,
        "scaling_target": 4.0,
        "scaling_ok": None if scaling is None else scaling >= 4.0,
    }
    result = {
        "config": asdict(cfg),
        "meta": meta,
        "bare_engine_step": bare,
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    (out / "bench_server.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# bench_server — gRPC Stream per-token latency and throughput",
        "",
        f"{meta['machine']}; provider {bare['provider']}; model S={bare['state_size']} "
        f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, d_state={cfg.d_state}, "
        f"vocab={cfg.vocab_size}); clients ({cfg.client_procs} processes) and server on the "
        f"same machine; load average (1, 5, 15 min) at start {meta['load_average']}, "
        f"at end {meta.get('load_average_end')}.",
        "",
        f"Bare `Engine.step` (1 session, in-process): p50 {bare['p50_ms']:.3f} ms, "
        f"p99 {bare['p99_ms']:.3f} ms.",
        "",
        "| clients | batching | tokens | tokens/s | p50 ms | p99 ms | mean ms "
        "| server CPU ms/token |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r.clients, not r.batching)):
        cpu = r.extra.get("server_cpu_ms_per_token")
        cpu_text = "n/a" if cpu is None else f"{cpu:.3f}"
        lines.append(
            f"| {r.clients} | {'on' if r.batching else 'off'} | {r.tokens} | "
            f"{r.tokens_per_s:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.mean_ms:.3f} | "
            f"{cpu_text} |"
        )
    lines += [
        "",
        f"- gRPC overhead at 1 client: p50 {best_one.p50_ms:.3f} ms ÷ bare {bare['p50_ms']:.3f} "
        f"ms = **{ratio:.2f}×** (target ≤ 3×: {'met' if ratio <= 3 else 'NOT met'})",
    ]
    if scaling is not None:
        lines.append(
            f"- tokens/s at 64 clients ÷ 1 client (batching on): **{scaling:.1f}×** "
            f"(target ≥ 4×: {'met' if scaling >= 4 else 'NOT met'})"
        )
    (out / "bench_server.md").write_text("\n".join(lines) + "\n")
    _plot(runs, bare, out / "bench_server.png")
    return result


def _plot(runs: list[Run], bare: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for batching, style in ((True, "o-"), (False, "s--")):
        rs = sorted((r for r in runs if r.batching == batching), key=lambda r: r.clients)
        if not rs:
            continue
        label = "batching on" if batching else "batching off"
        cs = [r.clients for r in rs]
        a1.plot(cs, [r.tokens_per_s for r in rs], style, label=label)
        a2.plot(cs, [r.p50_ms for r in rs], style, label=f"p50, {label}")
        a2.plot(cs, [r.p99_ms for r in rs], style, alpha=0.4, label=f"p99, {label}")
    a2.axhline(bare["p50_ms"], color="k", lw=0.8, ls=":", label="bare Engine.step p50")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent Stream clients")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("aggregate tokens/s")
    a2.set_ylabel("per-token latency (ms)")
    a2.set_yscale("log")
    fig.suptitle("ssmstream server: gRPC Stream, one token per request")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = BenchConfig()
    p.add_argument("--model", default=d.model, help="exported model dir (default: build one)")
    p.add_argument("--d-model", type=int, default=d.d_model, help="random model: d_model")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="random model: layers")
    p.add_argument("--d-state", type=int, default=d.d_state, help="random model: d_state")
    p.add_argument("--clients", default="1,16,64,256", help="comma-separated client counts")
    p.add_argument("--budget", type=int, default=d.budget, help="measured tokens per run")
    p.add_argument("--tokens-per-client", type=int, default=0, help="override the budget split")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="batching on: max batch")
    p.add_argument("--max-batch-delay", type=float, default=d.max_batch_delay, help="seconds")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--client-procs", type=int, default=0, help="client processes; 0: min(4, CPUs)")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (server and bare step)"
    )
    p.add_argument("--out", default=d.out, help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = BenchConfig(
        model=a.model,
        d_model=a.d_model,
        n_layers=a.n_layers,
        d_state=a.d_state,
        clients=tuple(int(c) for c in a.clients.split(",")),
        budget=a.budget,
        tokens_per_client=a.tokens_per_client,
        max_batch=a.max_batch,
        max_batch_delay=a.max_batch_delay,
        device=a.device,
        out=a.out,
        client_procs=a.client_procs or min(4, os.cpu_count() or 1),
        threads=a.threads,
    )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(cfg.model) if cfg.model else build_model(cfg, work)
        bare = bare_step_latency(model, cfg.device, cfg.threads)
        log.info("bare Engine.step: p50 %.3f ms (%s)", bare["p50_ms"], bare["provider"])
        with open(model / "manifest.json") as f:
            V = int(json.load(f)["vocab_size"])
        runs = []
        for batching in (True, False):
            server = ServerProc(
                model,
                work,
                cfg.max_batch if batching else 1,
                cfg.max_batch_delay,
                cfg.device,
                cfg.threads,
            )
            try:
                for C in cfg.clients:
                    n = cfg.tokens_per_client or max(20, cfg.budget // C)
                    r = run_load(
                        f"127.0.0.1:{server.port}",
                        C,
                        V,
                        n,
                        cfg.warmup,
                        batching,
                        cfg.client_procs,
                        server.proc.pid,
                    )
                    log.info(
                        "C=%3d batching=%-5s %6.0f tok/s  p50 %.3f ms  p99 %.3f ms  cpu %s",
                        C, batching, r.tokens_per_s, r.p50_ms, r.p99_ms,
                        r.extra["server_cpu_ms_per_token"],
                    )  # fmt: skip
                    runs.append(r)
            finally:
                server.stop()
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average": load_at_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    result = write_report(cfg, bare, runs, meta)
    log.info("summary: %s", json.dumps(result["summary"]))
    log.info("wrote %s/bench_server.{json,md,png}", cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
