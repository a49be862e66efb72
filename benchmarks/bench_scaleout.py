"""Scale-out benchmark: replicas behind nginx sharing sessions through Redis.

Three measurements, every process on this machine (deploy/localcluster.py: redis-server,
N `ssmstream serve` replicas, nginx with deploy/nginx/nginx.conf):

  throughput   aggregate tokens/s of C closed-loop Stream clients (one token per request,
               each its own session) through nginx, for 1, 2, 3 replicas; plus 1 replica
               without nginx and Redis (the baseline). On a 2-core machine the replicas,
               nginx, Redis and the clients share the same 2 cores, so more replicas cannot
               add throughput here; the point is what the layers cost and that nothing
               breaks. Per-core scaling needs a machine with cores to spare.
  persistence  per-token latency p50 and tokens/s of 1 replica (direct, no nginx) with the
               in-memory store, write-behind (--persist-every 100ms), every 8th step, and
               write-through (--persist-every 1): the cost of each mode per token.
  failover     3 replicas, write-through; SIGKILL the replica holding most sessions while C
               clients stream; per moved session, the time from the kill to its first token
               served by another replica (clients resume from SnapshotSession's position),
               and the acknowledged steps lost (0 expected).

    python benchmarks/bench_scaleout.py --model .demo/model
    python benchmarks/bench_scaleout.py --model DIR --clients 32 --seconds 5 --quick

Writes benchmarks/results/bench_scaleout.{json,md}. Client and servers share the cores:
read ratios within one run, and the load average it records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
from localcluster import LocalCluster, ReplicaProcess  # noqa: E402
from run_all import dir_with, export_model, int_at_least, out_dir, run_script  # noqa: E402
from ssmstream.runtime.client import AsyncClient, resumable_error  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


async def client_loop(address: str, seconds: float, warmup: float, V: int, seed: int) -> dict:
    """One session, one Stream, closed loop for warmup + seconds; latencies after warm-up."""
    rng = np.random.default_rng(seed)
    async with AsyncClient(address, timeout=60) as client:
        s = await client.create_session()
        lat = []
        async with s.open_stream() as st:
            t_start = time.perf_counter()
            t_end = t_start + warmup + seconds
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    break
                await st.send(tokens=[int(rng.integers(0, V))], output="none")
                if t0 >= t_start + warmup:
                    lat.append(time.perf_counter() - t0)
        await s.close()
    return {"latencies": lat}


def measure(address: str, clients: int, seconds: float, warmup: float, V: int) -> dict:
    async def run():
        return await asyncio.gather(
            *(client_loop(address, seconds, warmup, V, i) for i in range(clients))
        )

    results = asyncio.run(run())
    lat = np.concatenate([r["latencies"] for r in results]) * 1e3  # ms
    return {
        "clients": clients,
        "tokens": int(lat.size),
        "tokens_per_s": lat.size / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def shipped_model(work_dir: Path) -> str:
    """examples/checkpoints/byte-lm exported to work_dir/model, unless it is newer than the
    model/ and export/ sources already."""
    out = work_dir / "model"
    sources = [*ROOT.glob("model/*.py"), *ROOT.glob("export/*.py")]
    manifest = out / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime > max(f.stat().st_mtime for f in sources):
        return str(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ROOT / "examples" / "checkpoints" / "byte-lm"
    print(f"exporting {ckpt} to {out}", flush=True)
    export_model(ckpt, out, overwrite=True)  # signals held: a `kill` lets it clean up first
    return str(out)


def vocab(model: str) -> int:
    manifest = json.loads((Path(model) / "manifest.json").read_text())
    return int(manifest.get("vocab_size") or 256)


def bench_throughput(a, workdir: Path, V: int) -> list[dict]:
    rows = []
    base = ReplicaProcess(a.model, ["--threads", "1"], workdir, "baseline")
    try:
        r = measure(base.address, a.clients, a.seconds, a.warmup, V)
        rows.append({"setup": "1 replica, direct, memory store", "replicas": 1, **r})
        print(f"  baseline: {r['tokens_per_s']:.0f} tokens/s, p50 {r['p50_ms']:.2f} ms")
    finally:
        base.terminate()
    for n in a.replicas:
        with LocalCluster(a.model, workdir / f"r{n}", n, a.persist_every, 3.0,
                          extra_args=("--threads", "1")) as c:  # fmt: skip
            r = measure(c.address, a.clients, a.seconds, a.warmup, V)
        rows.append({"setup": f"{n} replica(s) via nginx, redis {a.persist_every}",
                     "replicas": n, **r})  # fmt: skip
        print(f"  {n} replicas: {r['tokens_per_s']:.0f} tokens/s, p50 {r['p50_ms']:.2f} ms")
    return rows


def bench_persistence(a, workdir: Path, V: int) -> list[dict]:
    from localcluster import RedisProcess

    redis = RedisProcess(workdir)
    rows = []
    try:
        for mode in ("memory", "100ms", "8", "1"):
            args = ["--threads", "1"]
            if mode != "memory":
                args += ["--state-store", redis.url, "--persist-every", mode]
            rep = ReplicaProcess(a.model, args, workdir, f"persist-{mode}")
            try:
                for C in (1, a.clients):
                    r = measure(rep.address, C, a.seconds, a.warmup, V)
                    rows.append({"mode": mode, **r})
                    print(f"  {mode:>6} C={C:3d}: p50 {r['p50_ms']:.3f} ms, "
                          f"{r['tokens_per_s']:.0f} tokens/s")  # fmt: skip
            finally:
                rep.terminate()
    finally:
        redis.stop()
    return rows


async def resuming_stream(address, sid, V, stop_at, kill_time, seed) -> dict:
    """Stream until stop_at (monotonic); on failure resume from the server's position."""
    rng = np.random.default_rng(seed)
    acked, lost, resumed_at, failed = 0, 0, None, False
    async with AsyncClient(address, timeout=60) as client:
        s = client.session(sid)
        while time.monotonic() < stop_at:
            try:
                async with s.open_stream() as st:
                    while time.monotonic() < stop_at:
                        r = await st.send(tokens=[int(rng.integers(0, V))], output="none")
                        acked = r.position
                        if failed and resumed_at is None:
                            resumed_at = time.monotonic()
            except grpc.RpcError as e:
                if not resumable_error(e):
                    raise
                failed = True
                while True:
                    try:
                        await s.snapshot()
                        break
                    except grpc.RpcError as e2:
                        if not resumable_error(e2):
                            raise
                        await asyncio.sleep(0.02)
                lost += max(0, acked - s.position)
                acked = s.position
    return {"moved": failed, "lost": lost,
            "failover_s": None if resumed_at is None else resumed_at - kill_time[0]}  # fmt: skip


def scrape_active(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("ssmstream_sessions_active "):
            return float(line.split()[-1])
    return 0.0


def run_failover(a, workdir: Path, V: int, lease_ttl: float) -> dict:
    with LocalCluster(a.model, workdir / f"failover-{lease_ttl:g}", 3, "1", lease_ttl,
                      extra_args=("--threads", "1")) as c:  # fmt: skip

        async def run():
            async with AsyncClient(c.address, timeout=60) as client:
                sids = [(await client.create_session()).id for _ in range(a.clients)]
            kill_time = [0.0]
            stop_at = time.monotonic() + 3.0 + lease_ttl + 4.0
            tasks = [asyncio.create_task(resuming_stream(c.address, sid, V, stop_at, kill_time, i))
                     for i, sid in enumerate(sids)]  # fmt: skip
            await asyncio.sleep(2.0)
            held = [scrape_active(r.metrics_port) for r in c.replicas]
            victim = c.replicas[int(np.argmax(held))]
            kill_time[0] = time.monotonic()
            victim.kill()
            return await asyncio.gather(*tasks), held

        results, held = asyncio.run(run())
    moved = [r for r in results if r["moved"]]
    times = [r["failover_s"] for r in moved if r["failover_s"] is not None]
    out = {
        "lease_ttl_s": lease_ttl,
        "sessions": len(results),
        "sessions_per_replica_before": held,
        "moved": len(moved),
        "failover_s_median": float(np.median(times)) if times else None,
        "failover_s_max": float(max(times)) if times else None,
        "lost_steps_total": int(sum(r["lost"] for r in results)),
    }
    print(f"  lease {lease_ttl:g}s: {out['moved']} sessions moved, failover median "
          f"{out['failover_s_median']:.2f} s, max {out['failover_s_max']:.2f} s, "
          f"lost {out['lost_steps_total']}")  # fmt: skip
    return out


def table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A markdown section: title, header row, one row per list of cells."""
    return [
        "", f"## {title}", "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]  # fmt: skip


def write_report(res: dict, out: Path) -> None:
    m = res["meta"]
    lines = [
        "# bench_scaleout",
        "",
        f"Machine: {m['machine']}, load average at start {m['load_average']}. Replicas, nginx, "
        "Redis and the clients all share these cores.",
    ]
    lines += table(
        "Throughput through nginx",
        ["setup", "clients", "tokens/s", "p50 ms", "p99 ms"],
        [[r["setup"], r["clients"], f"{r['tokens_per_s']:.0f}", f"{r['p50_ms']:.2f}",
          f"{r['p99_ms']:.2f}"] for r in res["throughput"]],
    )  # fmt: skip
    lines += table(
        "Persistence cost (1 replica, direct)",
        ["--persist-every", "clients", "p50 ms", "p99 ms", "tokens/s"],
        [[r["mode"], r["clients"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
          f"{r['tokens_per_s']:.0f}"] for r in res["persistence"]],
    )  # fmt: skip
    lines += table(
        "Failover (3 replicas, write-through, SIGKILL one)",
        ["lease TTL s", "sessions", "moved", "failover median s", "max s", "lost steps"],
        [[f"{f['lease_ttl_s']:g}", f["sessions"], f["moved"], f"{f['failover_s_median']:.2f}",
          f"{f['failover_s_max']:.2f}", f["lost_steps_total"]] for f in res["failover"]],
    )  # fmt: skip
    (out / "bench_scaleout.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=dir_with("manifest.json"),
        help="exported model dir (ssmstream export); default: the shipped byte-lm checkpoint, "
        "exported into --work-dir (again only when model/ or export/ changed)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ssmstream-bench-scaleout"
    )
    p.add_argument("--clients", type=int_at_least(1), default=32, help="concurrent Stream clients")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--replicas", type=int_at_least(1), nargs="+", default=[1, 2, 3])
    p.add_argument("--persist-every", default="100ms", help="mode of the throughput runs")
    p.add_argument("--lease-ttl", type=float, nargs="+", default=[1.0, 3.0],
                   help="failover runs, one per lease TTL")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="1 s points, 8 clients (smoke run)")
    p.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup, a.clients, a.lease_ttl = 1.0, 0.3, 8, [1.0]
    a.model = a.model or shipped_model(a.work_dir)
    V = vocab(a.model)
    a.out = Path(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {
        "meta": {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "model": str(a.model),
            "clients": a.clients,
            "seconds": a.seconds,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        work = Path(tmp)
        print("throughput:")
        res["throughput"] = bench_throughput(a, work, V)
        print("persistence:")
        res["persistence"] = bench_persistence(a, work, V)
        print("failover:")
        res["failover"] = [run_failover(a, work, V, ttl) for ttl in a.lease_ttl]
    (a.out / "bench_scaleout.json").write_text(json.dumps(res, indent=1))
    write_report(res, a.out)
    print(f"wrote {a.out / 'bench_scaleout.json'} and bench_scaleout.md")
    return 0


if __name__ == "__main__":
    run_script(main, "bench_scaleout.py")  # a SIGTERM stops its replicas, redis and nginx
