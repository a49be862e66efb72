"""Server benchmark: per-token latency and aggregate tokens/s over gRPC `Stream`.

For C concurrent clients (default 1, 16, 64, 256), each with its own session and its own
bidi Stream, every client sends one token per request and waits for its response
(closed loop). Measured at the client:

    latency  = wall time of one request → response (per token), p50 / p99 over all clients
    tokens/s = tokens answered / wall time of the measured window, all clients together

with batching on (--max-batch B, --max-batch-delay d) and off (--max-batch 1). The gRPC
overhead ratio is  p50 per-token latency at 1 client ÷ p50 of a bare in-process
`Engine.step` on one session (same model, same machine). Targets: the gRPC overhead
ratio ≤ 3 at 1 client; tokens/s at 64 clients ≥ 4 × tokens/s at 1 client.

The floor: the same clients against a bare grpc.aio echo server (`echo_server`: a
StreamingInference whose Stream answers each request at once with a prebuilt StepResponse
of the model's size, no session, no engine) — what Python grpc.aio itself costs on this
machine. Its p50 at 1 client + the bare step is the least any grpc.aio server that runs
the step could show, and its own 64-vs-1 tokens/s ratio is the most the clients and the
transport leave room for (--no-echo skips it).

The server's own cost per token, each as a ratio of two numbers of the same run:

    own CPU ratio  = (server CPU ms/token − bare batched Engine CPU ms/token at B = C)
                     ÷ echo server CPU ms/token at C            target ≤ 1.5 at C = 1 and 64
    latency ratio  = server p50 at 1 client ÷ (echo p50 at 1 client + bare step p50)
                                                               target ≤ 1.3
    CPU ÷ step     = server CPU ms/token at 1 client ÷ bare Engine.step CPU ms/token (B = 1)
                                                               target ≤ 3
    batching on ÷ off = tokens/s at 64 clients, --max-batch B vs 1

where the bare batched Engine runs B = C streams in-process, as the Batcher does (slot steps
on B rows of a state slab, `Engine.run_slots`), and its CPU time is the process's
(onnxruntime's threads included).

The server runs in a subprocess (`python -m ssmstream.runtime.server`), the clients in other
processes (--client-procs, each one asyncio loop of AsyncClient streams), so client and
server do not share a GIL; on a small machine they still share the cores, which the
report states, with each side's CPU time per token. --server-cpus pins the servers (echo
included) and the bare Engine to a CPU set, e.g. `--server-cpus 0` for one core; the
clients keep the rest. Clients start measuring together, after a warm-up, at one
wall-clock time.

    python benchmarks/bench_server.py                     # builds a random-init model
    python benchmarks/bench_server.py --model model/      # an exported model dir

Writes benchmarks/results/bench_server.{json,md,png}.
Dimension letters: C concurrent clients, S packed state size.
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
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import (  # noqa: E402
    cpu_model,
    dir_with,
    export_model,
    int_at_least,
    ints_at_least,
    out_dir,
    run_script,
    signals_held,
)

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
    echo: bool = True  # also measure the bare grpc.aio echo floor
    repeats: int = 3  # rounds over every (server, C); each row is the median round
    threads: int | None = None  # onnxruntime intra-op threads of server and bare engine
    server_cpus: tuple[int, ...] | None = None  # CPU set of servers and bare engine; None: all
    max_batch: int = 256
    max_batch_delay: float = 0.002
    device: str = "auto"
    server_args: tuple[str, ...] = ()  # more `ssmstream serve` flags, e.g. ("--cuda-graphs",)
    out: str = str(RESULTS)
    seed: int = 0


@dataclass
class Run:
    clients: int
    batching: bool  # for the echo floor: False
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0
    server: str = "ssmstream"  # or "echo": the bare grpc.aio floor
    extra: dict = field(default_factory=dict)


def build_model(cfg: BenchConfig, workdir: Path) -> Path:
    """Export a random-init token model (the server's speed does not depend on training)."""
    import torch
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


def bare_batch_cpu(eng, B: int, tokens: int = 4000) -> float:
    """CPU ms per token of the bare Engine stepping B streams as the Batcher does: slot steps
    (`Engine.run_slots`) on the B rows of a state slab, one onnxruntime call per
    `chunk_rows` rows; at least 50 calls. The process's CPU time (onnxruntime's threads
    included)."""
    V = int(eng.info["vocab_size"])
    rng = np.random.default_rng(1)
    buf = eng.step_buffers(B)
    slab = eng.new_slab(B)  # [B, S] on the engine's device
    slots = np.arange(B)
    calls = max(50, tokens // B)
    xs = rng.integers(0, V, size=(calls + 10, B), dtype=np.int64)  # [calls + warm-up, B]

    c = buf.chunk_rows  # the Batcher's rows per onnxruntime call

    def one(x):
        for i in range(0, B, c):  # as Batcher._step_part fills its buffers per call
            n = min(c, B - i)
            buf.inputs[:n] = x[i : i + n]
            buf.slots[:n, 0] = slots[i : i + n]
            eng.run_slots(slab, n, buf)

    for x in xs[:10]:
        one(x)
    cpu0 = time.process_time()
    for x in xs[10:]:
        one(x)
    return 1e3 * (time.process_time() - cpu0) / (calls * B)


def bare_step_latency(eng, n: int = 2000) -> dict:
    """p50/p99 of Engine.step on one session in-process, ms; and its CPU ms per token."""
    V = int(eng.info["vocab_size"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=n + 50, dtype=np.int64)  # [n + warmup]
    state = eng.new_state(1)  # [1, S]
    times = []
    for i, t in enumerate(tokens):
        if i == 50:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        _, state = eng.step(np.array([t], dtype=np.int64), state)
        if i >= 50:
            times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    ms = 1e3 * np.asarray(times, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_ms_per_token": 1e3 * cpu / n,
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
        cpus: tuple[int, ...] | None = None,
        extra: tuple[str, ...] = (),
    ):
        port_file = workdir / f"port-{max_batch}.json"
        port_file.unlink(missing_ok=True)
        self.log_path = workdir / f"server-{max_batch}.log"
        cmd = [
            sys.executable, "-m", "ssmstream.runtime.server", str(model_dir),
            "--port", "0", "--port-file", str(port_file), "--device", device,
            "--max-batch", str(max_batch), "--max-batch-delay", str(delay),
            "--max-sessions", "1024", "--log-level", "WARNING", "--metrics-port", "0",
        ]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        cmd += list(extra)
        self._log = open(self.log_path, "w")
        with pinned(cpus):  # inherited across fork and exec (no preexec_fn: this process
            # may run gRPC threads, and Python code between fork and exec can deadlock)
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not port_file.is_file():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server failed to start:\n{self.log_path.read_text()}")
                time.sleep(0.05)
            ports = json.loads(port_file.read_text())
            self.port, self.metrics_port = ports["port"], ports.get("metrics_port")
        except BaseException:  # not started, or interrupted while starting: leave no process
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def echo_server(
    port_queue,
    d_output: int,
    cpus: tuple[int, ...] | None = None,
    model: Path | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """A bare grpc.aio StreamingInference (run in its own process, on `cpus` if given):
    CreateSession and CloseSession answer at once, Stream answers every request with one
    prebuilt StepResponse of [1, d_output] outputs, Generate with one GenerateResponse and
    ends. What the transport costs, without sessions or an engine.

    With `model` ("echo+step"), Stream first runs the bare step on the request's token
    (Engine.step_slots on one row of a slab, on the event loop, as a lone stream's step runs
    in the server) and answers with its outputs, encoded as the server encodes them: what a
    grpc.aio server costs that does nothing but the step, without sessions, batcher or
    checks. Fed one token per request."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    import grpc
    from ssmstream.protos import inference_pb2 as pb
    from ssmstream.protos import inference_pb2_grpc as pb_grpc

    sid = "echo-0123456789abcdef01"  # as long as a real session id
    response = pb.StepResponse(session_id=sid, position=1, rows=1, cols=d_output)
    response.outputs.extend([0.5] * d_output)
    step = None
    if model is not None:
        from ssmstream.runtime.engine import Engine
        from ssmstream.runtime.servicer import step_response

        eng = Engine(model, device=device, threads=threads)
        slab, buf, slot = eng.new_slab(1), eng.step_buffers(1), np.zeros(1, dtype=np.int64)

        def step(req, position):
            x = np.array((req.tokens[0],), dtype=np.int64)
            return step_response(sid, position, eng.step_slots(x, slot, slab, buf), req)

    class Echo(pb_grpc.StreamingInferenceServicer):
        async def CreateSession(self, request, context):  # at the prompt's end, as a server
            return pb.Session(session_id=sid, position=len(request.prompt))

        async def CloseSession(self, request, context):
            return pb.Session(session_id=sid)

        async def Stream(self, request_iterator, context):
            position = 0
            async for req in request_iterator:
                position += 1
                yield response if step is None else step(req, position)

        async def Generate(self, request, context):
            yield pb.GenerateResponse(
                session_id=sid, token=1, position=len(request.prompt) + 1, index=0
            )

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_StreamingInferenceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


class EchoProc:
    """echo_server in a process of its own; `port` once it is serving. `step`: echo_server's
    model, device and threads (echo+step). One that does not report its port in time, or whose
    start is interrupted (Ctrl-C, SIGTERM), is stopped before the exception leaves."""

    START_SECONDS = 60.0

    def __init__(self, d_output: int, cpus: tuple[int, ...] | None = None, **step):
        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        args = (ports, d_output, cpus)
        self.proc = ctx.Process(target=echo_server, args=args, kwargs=step, daemon=True)
        try:
            # a signal inside start() (between the spawn and the write of the child's
            # preparation data) left a child that died on an EOFError traceback, unstopped:
            # held until start() returns, it lands here, where the child is stopped
            with signals_held():
                self.proc.start()
            self.port = ports.get(timeout=self.START_SECONDS)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.pid is None:  # never started
            return
        self.proc.terminate()
        self.proc.join(10)


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


def _import_client() -> None:
    """Pool initializer: import the client before the CPU clock of _client_proc starts."""
    import ssmstream.runtime.client  # noqa: F401


def _client_proc(args) -> tuple[list, float]:
    """A client process: its share of the C streams on one asyncio loop; returns their
    results and the CPU seconds the process spent (connecting and warm-up included)."""
    cpu0 = time.process_time()
    results = asyncio.run(_clients(*args))
    return results, time.process_time() - cpu0


def engine_jobs(metrics_port: int | None) -> tuple[float, float] | None:
    """(seconds the server's onnxruntime calls took so far, how many there were): the sum
    and count of its ssmstream_batch_latency_seconds histogram (each call's wall time, in
    the server; a batch of more than chunk_rows sessions is several calls)."""
    if metrics_port is None:
        return None
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ssmstream_batch_latency_seconds_"):
                found[sample.name.rsplit("_", 1)[1]] = sample.value
    return (found["sum"], found["count"]) if {"sum", "count"} <= found.keys() else None


def process_cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """user + system CPU time of a process, or of its thread `tid` (Linux /proc), None
    elsewhere."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
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
    metrics_port: int | None = None,
) -> Run:
    """C closed-loop clients spread over `procs` processes, started together."""
    P = max(1, min(procs, C))
    shares = [list(range(i, C, P)) for i in range(P)]  # client seeds per process
    start_at = time.time() + 2.0 + 0.02 * C  # after every client's warm-up
    args = [(target, V, n, warmup, share, start_at) for share in shares]
    ctx = multiprocessing.get_context("spawn")
    cpu0 = process_cpu_seconds(server_pid) if server_pid else None
    loop0 = process_cpu_seconds(server_pid, server_pid) if server_pid else None  # main thread
    job0 = engine_jobs(metrics_port)
    with ctx.Pool(P, initializer=_import_client) as pool:
        parts = pool.map(_client_proc, args)
    cpu1 = process_cpu_seconds(server_pid) if server_pid else None
    loop1 = process_cpu_seconds(server_pid, server_pid) if server_pid else None
    job1 = engine_jobs(metrics_port)
    results = [r for part, _ in parts for r in part]
    client_cpu = sum(cpu for _, cpu in parts)
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
            "client_cpu_ms_per_token": 1e3 * client_cpu / (C * (n + warmup)),
            # of it, the main thread's: the event loop (gRPC's callbacks and, in ssmstream,
            # the servicer, the service and the batcher's scheduling; a lone stream's step)
            "server_loop_cpu_ms_per_token": None
            if loop0 is None or loop1 is None
            else 1e3 * (loop1 - loop0) / (C * (n + warmup)),
            # the server's onnxruntime calls (batched steps), timed inside it: the step as it
            # runs there, between gRPC's work, rather than in the bare Engine's tight loop
            "server_job_ms_per_token": None
            if job0 is None or job1 is None
            else 1e3 * (job1[0] - job0[0]) / (C * (n + warmup)),
            # sessions per onnxruntime call in the server (a batch runs as one or more calls
            # of at most chunk_rows sessions): the bare Engine's figure at B = C assumes C
            "server_mean_batch": None
            if job0 is None or job1 is None or job1[1] == job0[1]
            else C * (n + warmup) / (job1[1] - job0[1]),
        },
    )


def median_run(rs: list[Run]) -> Run:
    """One row from the repeats of a (server, batching, C): the median of each number."""

    def med(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    extra = {
        k: med([r.extra.get(k) for r in rs])
        for k in (
            "server_cpu_ms_per_token",
            "server_loop_cpu_ms_per_token",
            "client_cpu_ms_per_token",
            "server_job_ms_per_token",
            "server_mean_batch",
        )
    }
    extra.update(
        client_processes=rs[0].extra.get("client_processes"),
        repeats=len(rs),
        p50_ms_each=[r.p50_ms for r in rs],
        tokens_per_s_each=[r.tokens_per_s for r in rs],
    )
    return Run(
        clients=rs[0].clients,
        batching=rs[0].batching,
        tokens=sum(r.tokens for r in rs),
        seconds=sum(r.seconds for r in rs),
        tokens_per_s=med([r.tokens_per_s for r in rs]),
        p50_ms=med([r.p50_ms for r in rs]),
        p99_ms=med([r.p99_ms for r in rs]),
        mean_ms=med([r.mean_ms for r in rs]),
        errors=sum(r.errors for r in rs),
        server=rs[0].server,
        extra=extra,
    )


def summarize(
    bare: dict, runs: list[Run], echo_runs: list[Run] = (), step_runs: list[Run] = ()
) -> dict:
    """The gRPC overhead ratio and the 64-vs-1-client scaling, and the echo floors bounding them."""
    by = {(r.clients, r.batching): r for r in runs}
    echo = {r.clients: r for r in echo_runs}
    ones = [r for r in (by.get((1, True)), by.get((1, False))) if r]
    best_one = min(ones, key=lambda r: r.p50_ms) if ones else None
    ratio = best_one.p50_ms / bare["p50_ms"] if best_one else None
    scaling = None
    if (64, True) in by and (1, True) in by:
        scaling = by[(64, True)].tokens_per_s / by[(1, True)].tokens_per_s
    summary = {
        "overhead_ratio_1_client": ratio,
        "overhead_ratio_target": 3.0,
        "overhead_ok": None if ratio is None else ratio <= 3.0,
        "tokens_per_s_64_over_1": scaling,
        "scaling_target": 4.0,
        "scaling_ok": None if scaling is None else scaling >= 4.0,
    }
    if 1 in echo:
        floor = echo[1].p50_ms
        summary["echo_p50_ms_1_client"] = floor
        # the least overhead ratio a grpc.aio server that runs the step could show here
        summary["floor_overhead_ratio"] = (floor + bare["p50_ms"]) / bare["p50_ms"]
        if best_one:
            summary["server_minus_echo_p50_ms"] = best_one.p50_ms - floor
    if 1 in echo and 64 in echo:
        summary["echo_tokens_per_s_64_over_1"] = echo[64].tokens_per_s / echo[1].tokens_per_s
    summary.update(own_costs(bare, by, echo))
    step_floor = next((r for r in step_runs if r.clients == 1), None)
    if step_floor is not None and 1 in echo:
        summary["echo_step"] = echo_step_floor(bare, step_floor, echo[1], by.get((1, True)))
    return summary


def echo_step_floor(bare: dict, floor: Run, echo: Run, server: Run | None) -> dict | None:
    """What the 1-client targets leave room for: the echo server that also runs the bare step
    (`floor`) scored by the same formulas as this server, the CPU the step costs when it runs
    between gRPC's work (floor − echo, against the bare step's CPU in a tight loop), and this
    server's CPU and p50 above that floor (its sessions, batcher, checks and metrics)."""
    cpu = floor.extra.get("server_cpu_ms_per_token")
    echo_cpu = echo.extra.get("server_cpu_ms_per_token")
    step_cpu = bare.get("cpu_ms_per_token")
    engine = bare.get("batch_cpu_ms_per_token", {}).get("1", step_cpu)
    if cpu is None or engine is None or not echo_cpu or not step_cpu:
        return None
    out = {
        "cpu_ms_per_token": cpu,
        "p50_ms": floor.p50_ms,
        "own_cpu_ratio": (cpu - engine) / echo_cpu,  # the own CPU target's formula
        "cpu_over_step": cpu / step_cpu,  # the CPU ÷ step target's formula
        "latency_over_echo_plus_step": floor.p50_ms / (echo.p50_ms + bare["p50_ms"]),
        "step_in_situ_ms_per_token": cpu - echo_cpu,
        "step_in_situ_over_bare": (cpu - echo_cpu) / step_cpu,
    }
    server_cpu = None if server is None else server.extra.get("server_cpu_ms_per_token")
    if server_cpu is not None:
        out["server_cpu_above_ms_per_token"] = server_cpu - cpu
        out["server_p50_above_ms"] = server.p50_ms - floor.p50_ms
    return out


OWN_CPU_TARGET = 1.5  # (server − bare batched Engine) CPU per token ÷ echo CPU per token
LATENCY_TARGET = 1.3  # 1-client p50 ÷ (echo p50 + bare step p50)
CPU_OVER_STEP_TARGET = 3.0  # 1-client server CPU per token ÷ bare step CPU per token
ON_OFF_TARGET = 5.0  # tokens/s at 64 clients, batching on ÷ off


def own_costs(bare: dict, by: dict, echo: dict) -> dict:
    """The server's own per-token costs against the echo floor and the bare Engine (batching
    on), each with its target and whether it is met (None where a number is missing)."""

    def cpu(r):
        return None if r is None else r.extra.get("server_cpu_ms_per_token")

    def verdict(ratio, target, most=True):
        return None if ratio is None else (ratio <= target if most else ratio >= target)

    out: dict = {"own_cpu": {}}
    for C in sorted({c for c, batching in by if batching}):
        server, floor = cpu(by.get((C, True))), cpu(echo.get(C))
        engine = bare.get("batch_cpu_ms_per_token", {}).get(str(C))
        if None in (server, floor, engine):
            continue
        own = server - engine
        job = by[(C, True)].extra.get("server_job_ms_per_token")
        out["own_cpu"][str(C)] = {
            "server_cpu_ms_per_token": server,
            "bare_engine_cpu_ms_per_token": engine,
            "own_cpu_ms_per_token": own,
            "echo_cpu_ms_per_token": floor,
            "ratio": own / floor,
            "target": OWN_CPU_TARGET,
            "ok": own / floor <= OWN_CPU_TARGET,
            # the same with the onnxruntime calls as timed inside the server (no target)
            "in_situ_job_ms_per_token": job,
            "outside_jobs_ratio": None if job is None else (server - job) / floor,
            "server_mean_batch": by[(C, True)].extra.get("server_mean_batch"),
            # the event loop's thread alone, this server's vs the echo server's
            "loop_cpu_ms_per_token": by[(C, True)].extra.get("server_loop_cpu_ms_per_token"),
            "echo_loop_cpu_ms_per_token": echo[C].extra.get("server_loop_cpu_ms_per_token"),
        }
    one = by.get((1, True))
    latency = None
    if one is not None and 1 in echo:
        latency = one.p50_ms / (echo[1].p50_ms + bare["p50_ms"])
    out["latency_1_client_over_echo_plus_step"] = latency
    out["latency_target"] = LATENCY_TARGET
    out["latency_ok"] = verdict(latency, LATENCY_TARGET)
    step_cpu = bare.get("cpu_ms_per_token")
    cpu_over_step = None if cpu(one) is None or not step_cpu else cpu(one) / step_cpu
    out["server_cpu_1_client_over_step_cpu"] = cpu_over_step
    out["cpu_over_step_target"] = CPU_OVER_STEP_TARGET
    out["cpu_over_step_ok"] = verdict(cpu_over_step, CPU_OVER_STEP_TARGET)
    on, off = by.get((64, True)), by.get((64, False))
    on_off = None if on is None or off is None else on.tokens_per_s / off.tokens_per_s
    out["batching_on_over_off_64"] = on_off
    out["on_off_target"] = ON_OFF_TARGET
    out["on_off_ok"] = verdict(on_off, ON_OFF_TARGET, most=False)
    return out


def write_report(
    cfg: BenchConfig,
    bare: dict,
    runs: list[Run],
    meta: dict,
    echo_runs: list[Run] = (),
    step_runs: list[Run] = (),
) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(bare, runs, echo_runs, step_runs)
    result = {
        "config": asdict(cfg),
        "meta": meta,
        "bare_engine_step": bare,
        "runs": [asdict(r) for r in runs],  # this server
        "echo_runs": [asdict(r) for r in echo_runs],  # the bare grpc.aio floor
        "echo_step_runs": [asdict(r) for r in step_runs],  # the floor with the bare step
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
        f"p99 {bare['p99_ms']:.3f} ms, CPU {bare.get('cpu_ms_per_token', float('nan')):.3f} "
        "ms/token; bare batched Engine CPU ms/token at B = "
        + ", ".join(f"{B}: {v:.3f}" for B, v in bare.get("batch_cpu_ms_per_token", {}).items())
        + f". Servers and bare Engine on CPUs {cfg.server_cpus or 'all'}. `echo` rows: the "
        "same clients against a bare grpc.aio server that answers each Stream request at once "
        "(no session, no engine); `echo+step`: the same server running the bare step on each "
        "request before it answers (on the event loop, no session, no batcher, no checks).",
        "",
        "| server | clients | batching | tokens | tokens/s | p50 ms | p99 ms | mean ms "
        "| server CPU ms/token | client CPU ms/token |",
        "|:---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(x):
        return "n/a" if x is None else f"{x:.3f}"

    for r in [*echo_runs, *step_runs, *sorted(runs, key=lambda r: (r.clients, not r.batching))]:
        batching = "-" if r.server.startswith("echo") else "on" if r.batching else "off"
        lines.append(
            f"| {r.server} | {r.clients} | {batching} | {r.tokens} | "
            f"{r.tokens_per_s:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.mean_ms:.3f} | "
            f"{ms(r.extra.get('server_cpu_ms_per_token'))} | "
            f"{ms(r.extra.get('client_cpu_ms_per_token'))} |"
        )
    ratio, scaling = summary["overhead_ratio_1_client"], summary["tokens_per_s_64_over_1"]
    lines.append("")
    if ratio is not None:
        lines.append(
            f"- gRPC overhead at 1 client: p50 {ratio * bare['p50_ms']:.3f} ms ÷ bare "
            f"{bare['p50_ms']:.3f} ms = **{ratio:.2f}×** (target ≤ 3×: "
            f"{'met' if ratio <= 3 else 'NOT met'})"
        )
    if "floor_overhead_ratio" in summary:
        lines.append(
            f"- floor: echo p50 at 1 client {summary['echo_p50_ms_1_client']:.3f} ms; "
            f"(echo + bare step) ÷ bare step = **{summary['floor_overhead_ratio']:.2f}×**, "
            "the least a grpc.aio server running the step could show on this machine"
            + (
                f"; this server adds {summary['server_minus_echo_p50_ms']:.3f} ms to the echo "
                "p50 (the step included)"
                if "server_minus_echo_p50_ms" in summary
                else ""
            )
        )
    if scaling is not None:
        lines.append(
            f"- tokens/s at 64 clients ÷ 1 client (batching on): **{scaling:.1f}×** "
            f"(target ≥ 4×: {'met' if scaling >= 4 else 'NOT met'})"
        )
    echo_scaling = summary.get("echo_tokens_per_s_64_over_1")
    if echo_scaling is not None:
        lines.append(
            f"- the echo server's own 64 ÷ 1 ratio: **{echo_scaling:.1f}×** (clients and "
            "transport alone, the clients on the same cores)"
        )
    lines += own_cost_lines(summary)
    (out / "bench_server.md").write_text("\n".join(lines) + "\n")
    _plot([*runs, *echo_runs], bare, out / "bench_server.png")
    return result


def own_cost_lines(summary: dict) -> list[str]:
    """The report's lines for `own_costs` (batching on)."""

    def met(ok):
        return "n/a" if ok is None else "met" if ok else "NOT met"

    lines = []
    for C, o in summary.get("own_cpu", {}).items():
        lines.append(
            f"- server's own CPU per token at {C} client(s): server "
            f"{o['server_cpu_ms_per_token']:.3f} − bare batched Engine (B = {C}) "
            f"{o['bare_engine_cpu_ms_per_token']:.3f} = {o['own_cpu_ms_per_token']:.3f} ms ÷ echo "
            f"server {o['echo_cpu_ms_per_token']:.3f} ms = **{o['ratio']:.2f}×** (target ≤ "
            f"{o['target']:g}×: {met(o['ok'])})"
        )
        if o.get("in_situ_job_ms_per_token") is not None:
            job, bare = o["in_situ_job_ms_per_token"], o["bare_engine_cpu_ms_per_token"]
            lines.append(
                f"  - the onnxruntime calls' wall time inside that server: {job:.3f} ms/token "
                f"(the bare Engine's {bare:.3f} runs alone with warm caches; a call's wall time "
                f"also holds its waits for a core and for the GIL); the server's CPU outside "
                f"them ÷ echo = "
                f"**{o['outside_jobs_ratio']:.2f}×** (no target: where the rest goes)"
            )
        loop, echo_loop = o.get("loop_cpu_ms_per_token"), o.get("echo_loop_cpu_ms_per_token")
        if loop is not None and echo_loop:
            rest = o["server_cpu_ms_per_token"] - loop
            echo_rest = o["echo_cpu_ms_per_token"] - echo_loop
            lines.append(
                f"  - by thread: the event loop's {loop:.3f} ms/token vs the echo server's "
                f"{echo_loop:.3f} (**{loop / echo_loop:.2f}×**); the other threads (engine worker, "
                f"gRPC's pollers) {rest:.3f} vs {echo_rest:.3f} ms/token"
            )
        if o.get("server_mean_batch") is not None:
            lines.append(
                f"  - sessions per onnxruntime call in that server: "
                f"{o['server_mean_batch']:.1f} (the bare Engine's figure is for {C})"
            )
    r = summary.get("latency_1_client_over_echo_plus_step")
    if r is not None:
        lines.append(
            f"- p50 at 1 client ÷ (echo p50 + bare step p50): **{r:.2f}×** (target ≤ "
            f"{summary['latency_target']:g}×: {met(summary['latency_ok'])})"
        )
    r = summary.get("server_cpu_1_client_over_step_cpu")
    if r is not None:
        lines.append(
            f"- server CPU per token at 1 client ÷ bare `Engine.step` CPU per token: "
            f"**{r:.2f}×** (target ≤ {summary['cpu_over_step_target']:g}×: "
            f"{met(summary['cpu_over_step_ok'])})"
        )
    r = summary.get("batching_on_over_off_64")
    if r is not None:
        lines.append(
            f"- tokens/s at 64 clients, batching on ÷ off: **{r:.1f}×** (target ≥ "
            f"{summary['on_off_target']:g}×: {met(summary['on_off_ok'])})"
        )
    f = summary.get("echo_step")
    if f:
        lines.append(
            f"- floor with the step (`echo+step`, 1 client): {f['cpu_ms_per_token']:.3f} ms CPU "
            f"per token, p50 {f['p50_ms']:.3f} ms. Scored by the formulas above it would read "
            f"own CPU **{f['own_cpu_ratio']:.2f}×** the echo's, p50 "
            f"**{f['latency_over_echo_plus_step']:.2f}×** echo + step, CPU "
            f"**{f['cpu_over_step']:.2f}×** the bare step's: the least a server that runs the "
            f"step could read on this machine. Adding the step to the echo server adds "
            f"{f['step_in_situ_ms_per_token']:.3f} ms CPU per token, "
            f"**{f['step_in_situ_over_bare']:.1f}×** the bare step's CPU in a tight loop: run "
            "once per request, between gRPC's work and the waits for the client, the step "
            "meets cold caches, and gRPC's work around it slows too"
            + (
                f". This server spends {f['server_cpu_above_ms_per_token']:.3f} ms CPU per "
                f"token and {f['server_p50_above_ms']:.3f} ms of p50 above that floor (sessions, "
                "batcher, checks, metrics)"
                if "server_cpu_above_ms_per_token" in f
                else ""
            )
        )
    return lines


def _plot(runs: list[Run], bare: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    series = (
        ("ssmstream", True, "o-", "C0", "batching on"),
        ("ssmstream", False, "s--", "C1", "batching off"),
        ("echo", False, "^:", "C2", "bare grpc.aio echo (floor)"),
    )
    for server, batching, style, color, label in series:
        rs = sorted(
            (r for r in runs if r.server == server and r.batching == batching),
            key=lambda r: r.clients,
        )
        if not rs:
            continue
        cs = [r.clients for r in rs]
        a1.plot(cs, [r.tokens_per_s for r in rs], style, color=color, label=label)
        a2.plot(cs, [r.p50_ms for r in rs], style, color=color, label=f"p50, {label}")
        a2.plot(cs, [r.p99_ms for r in rs], style, color=color, alpha=0.4, label=f"p99, {label}")
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


@contextlib.contextmanager
def pinned(cpus: tuple[int, ...] | None):
    """Run the block with this process on `cpus` (no-op for None)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure(
    cfg: BenchConfig, model: Path, work: Path, V: int, d_output: int
) -> tuple[dict, dict[tuple[str, bool, int], list[Run]]]:
    """Every server (echo floor, batching on, batching off) runs at once, idle but for the
    one measured: each round measures the bare step, then each C against each server in
    turn, so a change in the machine's load hits all of them alike."""
    from ssmstream.runtime.engine import Engine

    cpus = cfg.server_cpus
    with pinned(cpus):
        eng = Engine(model, device=cfg.device, threads=cfg.threads)
    procs, targets = [], []  # targets: (server, batching, pid, port)
    measured: dict[tuple[str, bool, int], list[Run]] = {}
    bares, batch_cpu = [], {}
    try:
        if cfg.echo:
            procs.append(EchoProc(d_output, cpus))
            targets.append(("echo", False, procs[-1].proc.pid, procs[-1].port, None))
            if 1 in cfg.clients:  # a lone stream's step, unbatched: a floor at 1 client only
                procs.append(
                    EchoProc(d_output, cpus, model=model, device=cfg.device, threads=cfg.threads)
                )
                targets.append(("echo+step", False, procs[-1].proc.pid, procs[-1].port, None))
        for batching in (True, False):
            max_batch = cfg.max_batch if batching else 1
            procs.append(
                ServerProc(
                    model,
                    work,
                    max_batch,
                    cfg.max_batch_delay,
                    cfg.device,
                    cfg.threads,
                    cpus,
                    cfg.server_args,
                )  # fmt: skip
            )
            p = procs[-1]
            targets.append(("ssmstream", batching, p.proc.pid, p.port, p.metrics_port))
        for i in range(cfg.repeats):
            with pinned(cpus):
                bares.append(bare_step_latency(eng))
                for C in cfg.clients:
                    B = min(C, cfg.max_batch)
                    batch_cpu.setdefault(str(C), []).append(bare_batch_cpu(eng, B))
            log.info(
                "round %d: bare Engine.step p50 %.3f ms, CPU ms/token by B %s", i,
                bares[-1]["p50_ms"], {C: round(v[-1], 4) for C, v in batch_cpu.items()},
            )  # fmt: skip
            for C in cfg.clients:
                n = cfg.tokens_per_client or max(20, cfg.budget // C)
                for server, batching, pid, port, metrics_port in targets:
                    if server == "echo+step" and C != 1:
                        continue
                    r = run_load(
                        f"127.0.0.1:{port}", C, V, n, cfg.warmup, batching, cfg.client_procs, pid,
                        metrics_port,
                    )  # fmt: skip
                    r.server = server
                    measured.setdefault((server, batching, C), []).append(r)
                    log.info(
                        "C=%3d %-9s %-12s %6.0f tok/s  p50 %.3f ms  p99 %.3f ms  "
                        "CPU ms/token server %.3f client %.3f",
                        C, server, "" if server.startswith("echo") else f"batching={batching}",
                        r.tokens_per_s, r.p50_ms, r.p99_ms,
                        r.extra["server_cpu_ms_per_token"] or float("nan"),
                        r.extra["client_cpu_ms_per_token"],
                    )  # fmt: skip
    finally:
        for proc in procs:
            proc.stop()
    bare = {
        "p50_ms": float(np.median([b["p50_ms"] for b in bares])),
        "p99_ms": float(np.median([b["p99_ms"] for b in bares])),
        "p50_ms_each": [b["p50_ms"] for b in bares],
        "cpu_ms_per_token": float(np.median([b["cpu_ms_per_token"] for b in bares])),
        # bare Engine stepping B = min(C, max_batch) streams, by C
        "batch_cpu_ms_per_token": {C: float(np.median(v)) for C, v in batch_cpu.items()},
        "provider": bares[0]["provider"],
        "state_size": bares[0]["state_size"],
    }
    return bare, measured


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = BenchConfig()
    p.add_argument(
        "--model", type=dir_with("manifest.json"), help="exported model dir (default: build one)"
    )
    p.add_argument("--d-model", type=int, default=d.d_model, help="random model: d_model")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="random model: layers")
    p.add_argument("--d-state", type=int, default=d.d_state, help="random model: d_state")
    p.add_argument(
        "--clients", type=ints_at_least(1), default=d.clients, help="comma-separated client counts"
    )
    p.add_argument(
        "--budget", type=int_at_least(1), default=d.budget, help="measured tokens per run"
    )
    p.add_argument(
        "--tokens-per-client", type=int_at_least(0), default=0,
        help="override the budget split (0: the budget's)",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=int_at_least(1), default=d.max_batch, help="batching on: max batch"
    )
    p.add_argument("--max-batch-delay", type=float, default=d.max_batch_delay, help="seconds")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--client-procs", type=int_at_least(0), default=0, help="client processes; 0: min(4, CPUs)"
    )
    p.add_argument(
        "--threads", type=int_at_least(1), help="onnxruntime threads (server and bare step)"
    )
    p.add_argument("--no-echo", action="store_true", help="skip the bare grpc.aio echo floor")
    p.add_argument(
        "--server-cpus", default=None, help="CPU list for servers and bare engine, e.g. 0 or 0,1"
    )
    p.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=d.repeats,
        help="rounds; each row is the median round",
    )
    p.add_argument(
        "--server-arg", action="append", default=[], dest="server_args",
        help="one more `ssmstream serve` flag for both servers (repeatable), "
        "e.g. --server-arg=--cuda-graphs",
    )  # fmt: skip
    p.add_argument("--out", type=out_dir, default=d.out, help="results directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = BenchConfig(
        model=a.model,
        d_model=a.d_model,
        n_layers=a.n_layers,
        d_state=a.d_state,
        clients=a.clients,
        budget=a.budget,
        tokens_per_client=a.tokens_per_client,
        max_batch=a.max_batch,
        max_batch_delay=a.max_batch_delay,
        device=a.device,
        server_args=tuple(a.server_args),
        out=a.out,
        client_procs=a.client_procs or min(4, os.cpu_count() or 1),
        echo=not a.no_echo,
        repeats=a.repeats,
        threads=a.threads,
        server_cpus=tuple(int(c) for c in a.server_cpus.split(",")) if a.server_cpus else None,
    )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(cfg.model) if cfg.model else build_model(cfg, work)
        with open(model / "manifest.json") as f:
            manifest = json.load(f)
        V = int(manifest["vocab_size"])
        bare, measured = measure(cfg, model, work, V, int(manifest["d_output"]))
    runs = [median_run(rs) for (name, _, _), rs in measured.items() if name == "ssmstream"]
    echo_runs = [median_run(rs) for (name, _, _), rs in measured.items() if name == "echo"]
    step_runs = [median_run(rs) for (name, _, _), rs in measured.items() if name == "echo+step"]
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average": load_at_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    result = write_report(cfg, bare, runs, meta, echo_runs, step_runs)
    log.info("summary: %s", json.dumps(result["summary"]))
    log.info("wrote %s/bench_server.{json,md,png}", cfg.out)
    return 0


if __name__ == "__main__":
    run_script(main, "bench_server.py")  # a SIGTERM stops the servers, removes the temporary model
