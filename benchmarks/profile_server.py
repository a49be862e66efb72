"""Where the server's CPU goes while it streams: py-spy flame graphs of the server process
and a table of its hottest functions, at C concurrent closed-loop Stream clients (default
1 and 64; each client sends one token per request and waits for the answer).

For each C the server (`python -m ssmstream.runtime.server`, batching on) starts, the
clients stream for the whole window, and py-spy samples the server twice for `--seconds`
each: once into an SVG flame graph, once into collapsed stacks for the table. py-spy
cannot tell a thread blocked in epoll or on a queue from a busy one, so the table counts
those samples as waiting and gives the other areas' shares of the busy samples. gRPC's
poller thread runs native code only (no Python frame below `Thread.run`): py-spy without
--native cannot split its waiting from its work, so it is an area of its own.

    python benchmarks/profile_server.py                    # the shipped checkpoint, exported
    python benchmarks/profile_server.py --model model/ --clients 1,64 --seconds 1

Needs py-spy (in the `dev` extras). Writes benchmarks/results/profile_server_{C}client(s).svg
and profile_server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import ServerProc  # noqa: E402

log = logging.getLogger("profile_server")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "examples" / "checkpoints" / "byte-lm"

# Innermost frames that block: the event loop in epoll, the batcher's worker on its queue.
WAITS = ("EpollSelector.select (", "Batcher._work (")
POLLER = "Thread.run (threading.py"  # innermost: gRPC's poller thread (native code below)
# A busy sample is charged to the area of its innermost frame that names one.
AREAS = (
    ("onnxruntime (the step itself)", ("onnxruntime",)),
    ("ssmstream runtime (Python)", ("runtime/",)),
    ("asyncio event loop and gRPC callbacks", ("asyncio/",)),
)
OTHER = "other (imports, native)"


async def _stream(target: str, V: int, until: float, seed: int) -> int:
    """One closed-loop client until `until` (time.monotonic); returns tokens answered."""
    import numpy as np
    from ssmstream.runtime.client import AsyncClient

    rng, n = np.random.default_rng(seed), 0
    async with AsyncClient(target) as c:
        s = await c.create_session()
        async with s.open_stream() as st:
            while time.monotonic() < until:
                await st.send(tokens=[int(rng.integers(V))])
                n += 1
        await s.close()
    return n


def _clients(target: str, V: int, C: int, until: float, out: list) -> None:
    async def all_():
        return await asyncio.gather(*(_stream(target, V, until, i) for i in range(C)))

    out.extend(asyncio.run(all_()))


def pyspy(pid: int, seconds: float, rate: int, fmt: str, path: Path) -> None:
    secs = str(max(1, round(seconds)))
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", secs, "--rate", str(rate),
           "--format", fmt, "--output", str(path), "--nonblocking"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def summarize(collapsed: Path, top: int = 15) -> tuple[dict, list]:
    """({"waiting": share of all samples, area: share of the busy samples}, the `top`
    busy functions by own samples, as shares of the busy samples) of py-spy's raw output."""
    areas, own, waiting, busy = collections.Counter(), collections.Counter(), 0, 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames, n = stack.split(";"), int(n)
        if frames[-1].startswith(WAITS):
            waiting += n
            continue
        busy += n
        own[frames[-1]] += n
        if frames[-1].startswith(POLLER):
            areas["gRPC poller thread (native: waiting and working)"] += n
            continue
        area = next(
            (name for f in reversed(frames) for name, keys in AREAS if any(k in f for k in keys)),
            OTHER,
        )
        areas[area] += n
    b = max(busy, 1)
    shares = {"waiting (epoll, the worker's queue), of all samples": waiting / (waiting + b)}
    shares |= {a: n / b for a, n in areas.most_common()}
    return shares, [(f, n / b) for f, n in own.most_common(top)]


def profile(model: str, C: int, seconds: float, rate: int, workdir: Path, out: Path) -> dict:
    server = ServerProc(Path(model), workdir, max_batch=256, delay=0.002, device="cpu")
    try:
        from ssmstream.runtime.client import Client

        with Client(f"127.0.0.1:{server.port}") as c:
            V = c.info().vocab_size
        until = time.monotonic() + 2 * seconds + 4.0  # warm-up, two profiles, slack
        answered: list[int] = []
        t = threading.Thread(
            target=_clients, args=(f"127.0.0.1:{server.port}", V, C, until, answered)
        )
        t.start()
        time.sleep(1.5)  # sessions created, streams warm
        name = f"profile_server_{C}client{'s' if C > 1 else ''}"
        pyspy(server.proc.pid, seconds, rate, "flamegraph", out / f"{name}.svg")
        raw = workdir / f"{name}.txt"
        pyspy(server.proc.pid, seconds, rate, "raw", raw)
        t.join()
    finally:
        server.stop()
    areas, top = summarize(raw)
    return {"clients": C, "tokens": sum(answered), "areas": areas, "top": top, "svg": name}


def report(results: list[dict], seconds: float, rate: int) -> str:
    lines = [
        "# profile_server — where the server's CPU goes while it streams",
        "",
        f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}; py-spy, {rate} "
        f"samples/s for {seconds:g} s per profile; clients on the same machine. Shares are of "
        "the busy samples (see the script's docstring). Reproduce: "
        "`python benchmarks/profile_server.py`.",
        "",
    ]
    for r in results:
        C = r["clients"]
        lines += [f"## {C} client{'s' if C > 1 else ''} ([flame graph]({r['svg']}.svg))", ""]
        lines += [f"{r['tokens']:,} tokens answered during the window.", ""]
        lines += ["| area | share |", "|:---|---:|"]
        lines += [f"| {a} | {100 * s:.1f}% |" for a, s in r["areas"].items()]
        lines += ["", "| busy function (own samples) | share |", "|:---|---:|"]
        lines += [f"| `{f[:110]}` | {100 * s:.1f}% |" for f, s in r["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="exported model dir (default: export byte-lm)")
    p.add_argument("--clients", default="1,64", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=1.0, help="profile length per client count")
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("py-spy") is None:
        p.error("py-spy is not installed: pip install py-spy (it is in the dev extras)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            from ssmstream.export import export_model

            model = str(export_model(SHIPPED, Path(tmp) / "model"))
        results = []
        for C in (int(c) for c in a.clients.split(",")):
            log.info("profiling the server at %d client(s)", C)
            results.append(profile(model, C, a.seconds, a.rate, Path(tmp), out))
    text = report(results, a.seconds, a.rate)
    (out / "profile_server.md").write_text(text)
    log.info("%s", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
