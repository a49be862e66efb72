"""Where the server's CPU goes while it streams: py-spy flame graphs of the server process
and a table of its hottest functions, at C concurrent closed-loop Stream clients (default
1 and 64; each client sends one token per request and waits for the answer).

For each C the server (`python -m ssmstream.runtime.server`, batching on) starts, the
clients stream through both profiles, and py-spy samples the server twice for `--seconds`
each:

  * every thread, into an SVG flame graph (onnxruntime's step, which runs without the
    GIL, shows there; so do threads blocked in epoll or on a queue: py-spy cannot tell
    them from busy ones without --native);
  * only the thread holding the GIL (`--gil`), into the table: the server's Python and
    Cython work, which one core at a time can do. gRPC's Cython callbacks show as
    `Handle._run`, the step's Python glue under `runtime/`.

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
from run_all import (  # noqa: E402
    dir_with,
    export_model,
    int_at_least,
    ints_at_least,
    out_dir,
    run_script,
)

log = logging.getLogger("profile_server")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "examples" / "checkpoints" / "byte-lm"

# A GIL sample is charged to the area of its innermost frame that names one.
AREAS = (
    ("onnxruntime's Python wrapper", ("onnxruntime",)),
    ("ssmstream runtime", ("runtime/",)),
    ("asyncio event loop and gRPC's Cython callbacks", ("asyncio/",)),
)
OTHER = "other"


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


def pyspy_path() -> str | None:
    """py-spy next to this Python (a venv's bin, not necessarily on PATH), else on PATH."""
    here = str(Path(sys.executable).parent)
    return shutil.which("py-spy", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def pyspy(pid: int, seconds: int, rate: int, fmt: str, path: Path, *flags: str) -> None:
    cmd = [pyspy_path() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
           "--rate", str(rate), "--format", fmt, "--output", str(path), "--nonblocking",
           *flags]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def summarize(collapsed: Path, seconds: int, rate: int, top: int = 15) -> tuple[dict, list]:
    """({"GIL held": share of the samples py-spy could take, area: share of the GIL
    samples}, the `top` functions by own GIL samples) of py-spy's raw --gil output."""
    areas, own, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames, n = stack.split(";"), int(n)
        total += n
        own[frames[-1]] += n
        area = next(
            (name for f in reversed(frames) for name, keys in AREAS if any(k in f for k in keys)),
            OTHER,
        )
        areas[area] += n
    t = max(total, 1)
    shares = {"GIL held (share of the sampling window)": total / (seconds * rate)}
    shares |= {a: n / t for a, n in areas.most_common()}
    return shares, [(f, n / t) for f, n in own.most_common(top)]


def profile(model: str, C: int, seconds: int, rate: int, workdir: Path, out: Path) -> dict:
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
        pyspy(server.proc.pid, seconds, rate, "raw", raw, "--gil")
        t.join()
    finally:
        server.stop()
    areas, top = summarize(raw, seconds, rate)
    return {"clients": C, "tokens": sum(answered), "areas": areas, "top": top, "svg": name}


def report(results: list[dict], seconds: int, rate: int, model: str) -> str:
    lines = [
        "# profile_server — where the server's CPU goes while it streams",
        "",
        f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}; model {model}; "
        f"the server batches (--max-batch 256, 2 ms); py-spy, {rate} "
        f"samples/s for {seconds} s per profile; clients on the same machine. The flame "
        "graphs sample every thread; the tables only the one holding the GIL, as shares of its "
        "samples (see the script's docstring). Reproduce: `python benchmarks/profile_server.py`.",
        "",
    ]
    for r in results:
        C = r["clients"]
        lines += [f"## {C} client{'s' if C > 1 else ''} ([flame graph]({r['svg']}.svg))", ""]
        lines += [f"{r['tokens']:,} tokens answered while the clients ran (both profiles).", ""]
        lines += ["| area | share |", "|:---|---:|"]
        lines += [f"| {a} | {100 * s:.1f}% |" for a, s in r["areas"].items()]
        lines += ["", "| function, own GIL samples | share |", "|:---|---:|"]
        lines += [f"| `{f[:110]}` | {100 * s:.1f}% |" for f, s in r["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        type=dir_with("manifest.json"),
        help="exported model dir (default: export byte-lm)",
    )
    p.add_argument(
        "--clients", type=ints_at_least(1), default=(1, 64), help="comma-separated client counts"
    )
    p.add_argument(
        "--seconds", type=int_at_least(1), default=1, help="profile length per client count"
    )
    p.add_argument("--rate", type=int_at_least(1), default=500, help="py-spy samples per second")
    p.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if pyspy_path() is None:
        p.error("py-spy is not installed: pip install py-spy (it is in the dev extras)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, label = a.model, a.model
        if model is None:
            model = str(export_model(SHIPPED, Path(tmp) / "model"))
            label = f"{SHIPPED.relative_to(ROOT)} (exported)"
        results = []
        for C in a.clients:
            log.info("profiling the server at %d client(s)", C)
            results.append(profile(model, C, a.seconds, a.rate, Path(tmp), out))
    text = report(results, a.seconds, a.rate, label)
    (out / "profile_server.md").write_text(text)
    log.info("%s", text)
    return 0


if __name__ == "__main__":
    run_script(main, "profile_server.py")  # a SIGTERM stops the server, removes the temporary model
