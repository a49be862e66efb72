"""Soak: many concurrent sessions streaming a fixed number of tokens, loopback only.

C sessions (default 256) each open one bidi `Stream` to a server subprocess and send their
own seeded token sequence, one token per request, N tokens each (closed loop), from P
client processes (one asyncio loop each). Measured and checked:

    errors          every RpcError, by status code (target 0)
    latency         per-token request → response wall time at the client, p50 / p99 / max
    RSS             the server's resident memory, sampled every --rss-interval seconds; the
                    growth from the end of warm-up (the first --warmup of the run) to the end,
                    and the least-squares slope after warm-up (target: flat)
    lost/corrupted  after the run, each session's snapshot is compared with an in-process
                    `Engine.prefill` of its N tokens from a zero state (an independent
                    computation: the prefill graph, not the step graph the server ran):
                    position must be N, state and the last output equal within tolerance

The server runs `python -m ssmstream.runtime.server` (`bench_server.ServerProc`), is stopped
with SIGTERM at the end and must exit 0. Bounded: every phase has a timeout.

    python benchmarks/soak.py                       # random-init byte model (needs torch)
    python benchmarks/soak.py --model model/        # an exported model dir (torch-free)

Writes benchmarks/results/soak.{json,md,png}.
Dimension letters: C concurrent sessions, N tokens per session, S packed state size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import queue as queues
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import BenchConfig, ServerProc, build_model  # noqa: E402
from run_all import dir_with, out_dir, run_script  # noqa: E402

log = logging.getLogger("soak")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class SoakConfig:
    model: str | None = None  # exported model dir; None: export a random-init model
    sessions: int = 256  # C
    tokens: int = 400  # N per session
    client_procs: int = 2  # P
    max_batch: int = 256
    max_batch_delay: float = 0.002
    device: str = "auto"
    warmup: float = 0.25  # fraction of the run's wall time that counts as warm-up (RSS)
    rss_interval: float = 0.25  # seconds between RSS samples
    timeout: float = 900.0  # seconds for the whole streaming phase
    atol: float = 1e-3  # state / output tolerance vs the in-process prefill
    seed: int = 0
    out: str | None = str(RESULTS)  # None: write no files
    plot: bool = True

    def __post_init__(self):
        for name in ("sessions", "tokens", "client_procs", "max_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: must be in [0, 1), got {self.warmup}")
        if self.rss_interval <= 0 or self.timeout <= 0:
            raise ValueError("rss_interval/timeout: must be > 0 seconds")


def session_tokens(seed: int, i: int, n: int, V: int) -> np.ndarray:
    """The token sequence of session i: int64 [N]."""
    return np.random.default_rng([seed, i]).integers(0, V, size=n, dtype=np.int64)


# --- client processes -------------------------------------------------------------------------


async def _stream_one(c, i: int, cfg: SoakConfig, V: int, progress) -> dict:
    """One session: create, stream N tokens, keep it open. Latencies in seconds."""
    import grpc

    tokens = session_tokens(cfg.seed, i, cfg.tokens, V).tolist()
    out = {"index": i, "id": None, "lat": [], "position": 0, "last": None, "error": None}
    try:
        s = await c.create_session(session_id=f"soak-{i}")
        out["id"] = s.id
        async with s.open_stream() as st:
            for t in tokens:
                t0 = time.perf_counter()
                r = await st.send(tokens=[t])
                out["lat"].append(time.perf_counter() - t0)
                out["position"] = r.position
                with progress.get_lock():
                    progress.value += 1
            out["last"] = r.outputs[0].tolist()
    except grpc.RpcError as e:
        out["error"] = f"{e.code().name}: {e.details()}"
    return out


async def _client_loop(target: str, indices: list[int], cfg: SoakConfig, V: int, progress):
    from ssmstream.runtime.client import AsyncClient

    async with AsyncClient(target, timeout=60) as c:
        return await asyncio.gather(*(_stream_one(c, i, cfg, V, progress) for i in indices))


def _client_proc(target, indices, cfg, V, progress, results) -> None:
    results.put(asyncio.run(_client_loop(target, indices, cfg, V, progress)))


# --- the server's memory -------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """(seconds since start, RSS bytes, tokens answered so far) every `interval` seconds."""

    def __init__(self, pid: int, interval: float, progress):
        super().__init__(daemon=True)
        self.pid, self.interval, self.progress = pid, interval, progress
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(
                    (time.monotonic() - self.t0, rss_bytes(self.pid), self.progress.value)
                )
            except OSError:
                return
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def rss_summary(samples: list[tuple[float, int, int]], warmup: float) -> dict:
    """Server RSS after warm-up: growth = median of the last third of the post-warm-up
    samples − median of the first third (robust to allocator jitter), and the
    least-squares slope (MB, MB/min)."""
    t = np.array([s[0] for s in samples], dtype=np.float64)  # [n]
    mb = np.array([s[1] for s in samples], dtype=np.float64) / 2**20  # [n]
    after = t >= warmup * t[-1]
    t_w, mb_w = t[after], mb[after]
    slope = float(np.polyfit(t_w, mb_w, 1)[0] * 60) if len(t_w) >= 3 else 0.0
    third = max(1, len(mb_w) // 3)
    early, late = float(np.median(mb_w[:third])), float(np.median(mb_w[-third:]))
    return {
        "start_mb": float(mb[0]),
        "after_warmup_mb": early,
        "end_mb": late,
        "max_mb": float(mb.max()),
        "growth_after_warmup_mb": late - early,
        "slope_after_warmup_mb_per_min": slope,
        "samples": len(samples),
    }


# --- verification -----------------------------------------------------------------------------


def verify(target: str, model_dir: Path, results: list[dict], cfg: SoakConfig, V: int) -> dict:
    """Each session's snapshot vs an in-process prefill of its tokens; closes the sessions."""
    from ssmstream.runtime.client import Client
    from ssmstream.runtime.engine import Engine

    eng = Engine(model_dir, device="cpu")
    lost, corrupted, worst = [], [], 0.0
    with Client(target, timeout=60) as c:
        for r in results:
            if r["id"] is None:
                lost.append(r["index"])
                continue
            tokens = session_tokens(cfg.seed, r["index"], cfg.tokens, V)
            y, state = eng.prefill(tokens[None], eng.new_state(1))  # [1, N, D], [1, S]
            snap = c.session(r["id"]).snapshot()
            position = c.session(r["id"]).close()
            got = _snapshot_state(snap, int(state.shape[1]))
            err = float(np.abs(got - state[0]).max())
            if r["last"] is not None:
                err = max(err, float(np.abs(np.asarray(r["last"]) - y[0, -1]).max()))
            worst = max(worst, err)
            if position != cfg.tokens:
                lost.append(r["index"])
            elif not err <= cfg.atol:
                corrupted.append(r["index"])
    return {"lost": lost, "corrupted": corrupted, "max_abs_error": worst}


def _snapshot_state(data: bytes, S: int) -> np.ndarray:
    """The float32 [S] state inside SnapshotSession bytes (format: runtime/sessions.py)."""
    import struct

    head = struct.Struct("<8sIQQH")
    sha_len = head.unpack_from(data)[4]
    return np.frombuffer(data, dtype="<f4", count=S, offset=head.size + sha_len)


# --- the run ----------------------------------------------------------------------------------


def run_soak(model_dir: Path, cfg: SoakConfig, workdir: Path) -> dict:
    """Start a server, stream, sample RSS, verify, stop. Returns the result dict."""
    from tqdm import tqdm

    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    if manifest["input_kind"] != "tokens":
        raise ValueError("model: the soak streams tokens; give a token model")
    V = int(manifest["vocab_size"])
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    server = ServerProc(Path(model_dir), workdir, cfg.max_batch, cfg.max_batch_delay, cfg.device)
    target = f"127.0.0.1:{server.port}"
    ctx = multiprocessing.get_context("spawn")
    progress, queue = ctx.Value("q", 0), ctx.Queue()
    P = min(cfg.client_procs, cfg.sessions)
    shares = [list(range(p, cfg.sessions, P)) for p in range(P)]
    sampler = RssSampler(server.proc.pid, cfg.rss_interval, progress)
    total = cfg.sessions * cfg.tokens
    results: list[dict] = []
    exit_code = None
    try:
        sampler.start()
        t0 = time.monotonic()
        procs = [
            ctx.Process(target=_client_proc, args=(target, share, cfg, V, progress, queue))
            for share in shares
        ]
        for p in procs:
            p.start()
        with tqdm(total=total, unit="tok", desc=f"soak {cfg.sessions} sessions") as bar:
            while len(results) < cfg.sessions:
                if time.monotonic() - t0 > cfg.timeout:
                    raise TimeoutError(f"soak did not finish within {cfg.timeout}s")
                try:
                    results += queue.get(timeout=0.2)
                except queues.Empty:
                    if not any(p.is_alive() for p in procs) and queue.empty():
                        raise RuntimeError("a client process died") from None
                bar.update(progress.value - bar.n)
            bar.update(progress.value - bar.n)
        seconds = time.monotonic() - t0
        for p in procs:
            p.join(30)
        sampler.stop()
        checked = verify(target, Path(model_dir), results, cfg, V)
    finally:
        with contextlib.ExitStack() as stopping:  # the server stopped, though SIGTERM lands
            stopping.callback(server.stop)  # in the sampler's stop (callbacks run last first)
            stopping.callback(sampler.stop)
        exit_code = server.proc.returncode
    lat_ms = 1e3 * np.asarray([x for r in results for x in r["lat"]], dtype=np.float64)
    errors: dict[str, int] = {}
    for r in results:
        if r["error"]:
            code = r["error"].split(":", 1)[0]
            errors[code] = errors.get(code, 0) + 1
    answered = int(lat_ms.size)
    return {
        "config": asdict(cfg),
        "meta": {
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "load_average_at_start": load_at_start,
            "model": manifest.get("name"),
            "state_size": int(manifest["state_size"]),
            "vocab_size": V,
        },
        "sessions": cfg.sessions,
        "tokens_sent": total,
        "tokens_answered": answered,
        "seconds": seconds,
        "tokens_per_s": answered / seconds,
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)) if answered else None,
            "p99": float(np.percentile(lat_ms, 99)) if answered else None,
            "max": float(lat_ms.max()) if answered else None,
        },
        "errors": errors,
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:10],
        "lost_sessions": len(checked["lost"]),
        "corrupted_sessions": len(checked["corrupted"]),
        "max_abs_error_vs_prefill": checked["max_abs_error"],
        "rss": rss_summary(sampler.samples, cfg.warmup),
        "rss_timeline": [(round(t, 3), b, n) for t, b, n in sampler.samples],
        "server_exit_code": exit_code,
    }


def write_report(result: dict, out: Path, plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    m, lat, rss = result["meta"], result["latency_ms"], result["rss"]
    cfg = result["config"]
    lines = [
        "# soak — concurrent sessions streaming over gRPC (loopback)",
        "",
        f"{m['machine']}; model {m['model']} (S={m['state_size']}, vocab={m['vocab_size']}); "
        f"server and {cfg['client_procs']} client processes on the same machine; load average "
        f"at start {m['load_average_at_start']}; {m['time']}.",
        "",
        "| sessions | tokens each | tokens | seconds | tokens/s | p50 ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['sessions']} | {cfg['tokens']} | {result['tokens_answered']} | "
        f"{result['seconds']:.1f} | {result['tokens_per_s']:.0f} | {lat['p50']:.2f} | "
        f"{lat['p99']:.2f} | {lat['max']:.2f} |",
        "",
        f"- errors: **{sum(result['errors'].values())}** {result['errors'] or ''}",
        f"- lost sessions: **{result['lost_sessions']}**, corrupted: "
        f"**{result['corrupted_sessions']}** (snapshot vs in-process prefill, max abs error "
        f"{result['max_abs_error_vs_prefill']:.2e}, tolerance {cfg['atol']:g})",
        f"- server RSS: {rss['start_mb']:.1f} MB at start, {rss['after_warmup_mb']:.1f} MB after "
        f"warm-up ({100 * cfg['warmup']:.0f}% of the run), {rss['end_mb']:.1f} MB at the end "
        f"(medians of the first / last third after warm-up), max {rss['max_mb']:.1f} MB "
        f"(growth {rss['growth_after_warmup_mb']:+.1f} MB, slope "
        f"{rss['slope_after_warmup_mb_per_min']:+.2f} MB/min, {rss['samples']} samples)",
        f"- server exit status after SIGTERM: {result['server_exit_code']}",
    ]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    if plot:
        _plot(result, out / "soak.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = np.asarray(result["rss_timeline"], dtype=np.float64)  # [n, 3]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(tl[:, 0], tl[:, 1] / 2**20, color="C0", label="server RSS (MB)")
    ax.axvline(result["config"]["warmup"] * tl[-1, 0], color="k", ls=":", lw=0.8, label="warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax2 = ax.twinx()
    ax2.plot(tl[:, 0], tl[:, 2], color="C1", alpha=0.6, label="tokens answered")
    ax2.set_ylabel("tokens answered")
    fig.legend(loc="lower right", fontsize=8)
    ax.set_title(f"soak: {result['sessions']} sessions × {result['config']['tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", type=dir_with("manifest.json"),
        help="exported token model dir (default: build one)",
    )  # fmt: skip
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent sessions C")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per session N")
    p.add_argument("--client-procs", type=int, default=d.client_procs, help="client processes")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="server --max-batch")
    p.add_argument("--max-batch-delay", type=float, default=d.max_batch_delay, help="seconds")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction (RSS)")
    p.add_argument("--rss-interval", type=float, default=d.rss_interval, help="seconds")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds for the streaming")
    p.add_argument("--out", type=out_dir, default=d.out, help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = SoakConfig(
            model=a.model, sessions=a.sessions, tokens=a.tokens, client_procs=a.client_procs,
            max_batch=a.max_batch, max_batch_delay=a.max_batch_delay, device=a.device,
            warmup=a.warmup, rss_interval=a.rss_interval, timeout=a.timeout, out=a.out,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if cfg.model:
            model = Path(cfg.model)
        else:
            log.info("exporting a random-init byte model (bench_server's default size)")
            model = build_model(BenchConfig(), work)
        result = run_soak(model, cfg, work)
    write_report(result, Path(cfg.out), plot=cfg.plot)
    lat = result["latency_ms"]
    log.info(
        "%d sessions × %d tokens: %d errors, %d lost, %d corrupted, p50 %.2f ms, p99 %.2f ms, "
        "RSS growth after warm-up %+.1f MB",
        cfg.sessions, cfg.tokens, sum(result["errors"].values()), result["lost_sessions"],
        result["corrupted_sessions"], lat["p50"], lat["p99"],
        result["rss"]["growth_after_warmup_mb"],
    )  # fmt: skip
    log.info("wrote %s/soak.{json,md,png}", cfg.out)
    ok = not result["errors"] and not result["lost_sessions"] and not result["corrupted_sessions"]
    return 0 if ok and result["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    run_script(main, "soak.py")  # a SIGTERM stops the server and removes the temporary model
