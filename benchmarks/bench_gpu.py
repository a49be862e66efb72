"""GPU step throughput: torch eager vs onnxruntime CUDA (fp32, fp16, state in a device slab).

For each batch size B in `--batches` and each variant, `--steps` timed steps of the token
step graph (after `--warmup` untimed ones) give:

    tokens/s = B / mean step time,   p50 = median step latency (ms),
    bytes/step = host↔device bytes moved per step (inputs, outputs, and the state when it
                 travels: Engine.step sends [B, S] in and gets [B, S] back; a slab step not)

Variants: torch_eager (SSMNetwork.step, inputs from / outputs to the host each step),
ort_fp32 / ort_fp16 (Engine.step with host numpy states), ort_slab / ort_slab_fp16 (the
states in a StateSlab of B rows on the device, `Engine.new_slab(B)`, every step
`Engine.run_slots(slab, B, buffers)` over all B rows: only tokens, slots and outputs cross
host↔device; its bytes/step is the slab's own count, `slab.stats.step_bytes_in/out`).
Parity of each variant's outputs against ort_fp32 over the same inputs is recorded (max
abs error after the timed steps' first 4 steps).

ort_slab_graph: ort_slab with CUDA graphs (`cuda_options={"enable_cuda_graph": True}`,
the server's `--cuda-graphs`): each batch bucket is captured once and replayed, with fixed
device buffers for tokens, slots and outputs (B is a bucket here: no padding). On CPU the
same code runs without capture (onnxruntime ignores the graph id there).

Per model (fp32, fp16), the slab variant's p50 step time at B = 64 and 1024 is also set
against the state's memory floor, 2·B·S·4 bytes (each state row read and written once)
÷ `--bandwidth-gbs` (default 4800 GB/s, an H200's HBM3e): "ms per step ÷ floor". The
bandwidth is taken as given, not measured (on CPU the ratio only checks the arithmetic).

The passes over the state are also counted, statically, in the slot graph the Engine runs
(`state_traffic`): per batch row, the bytes its nodes read and write in state-sized tensors
(at least S/8 elements per row; views such as Reshape move nothing), ÷ the floor 2·S·4. A
graph that touched the state once each way would score 1; what it scores above that is the
ceiling on "ms per step ÷ floor" that no device can beat.

Writes benchmarks/results/bench_gpu.{json,md,png} (or `--out`). On a machine without CUDA,
`--device cpu` is a smoke mode of the same code (tiny sizes). Models: `--model-dir`
(fp32), `--fp16-model-dir`, `--ckpt`; missing ones are made in `--work` (a random network
of the `--d-model/--n-layers/--d-state/--vocab` size, exported without parity check).
See benchmarks/gpu/README.md for running it on the GPU machine.

Dimension letters: B batch, S packed state size, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ssmstream.runtime.manifest import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import dir_with, export_model, out_file, run_script  # noqa: E402

log = logging.getLogger("bench_gpu")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("torch_eager", "ort_fp32", "ort_fp16", "ort_slab", "ort_slab_fp16", "ort_slab_graph")
SLAB_VARIANTS = {"fp32": "ort_slab", "fp16": "ort_slab_fp16"}  # model -> its slab variant
FLOOR_BATCHES = (64, 1024)
H200_GBS = 4800.0  # HBM3e bandwidth of an H200, GB/s


@dataclass
class BenchConfig:
    device: str = "cuda"
    batches: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 256, 1024])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 50
    warmup: int = 10
    max_seconds: float = 20.0  # per (variant, batch); larger batches of that variant skipped
    vocab: int = 256
    d_model: int = 256
    n_layers: int = 4
    d_state: int = 64
    work: str = str(ROOT / ".gpu_bench")  # in the repository, wherever it is run from
    model_dir: str | None = None
    fp16_model_dir: str | None = None
    ckpt: str | None = None
    out: str = str(ROOT / "benchmarks" / "results" / "bench_gpu")
    threads: int | None = None
    prepare_only: bool = False
    bandwidth_gbs: float = H200_GBS  # the device's memory bandwidth, for the state floor

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batches must be positive integers, got {self.batches}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        if not self.bandwidth_gbs > 0:
            raise ValueError(f"--bandwidth-gbs must be > 0, got {self.bandwidth_gbs}")


# --- models ----------------------------------------------------------------------------------


def prepare_models(cfg: BenchConfig) -> dict[str, Path | None]:
    """{"ckpt", "fp32", "fp16"} directories, made in cfg.work where not given; made again
    where the cached ones are of another size than the flags ask (or another checkpoint's)."""
    work = Path(cfg.work)
    ckpt = Path(cfg.ckpt) if cfg.ckpt else work / "ckpt"
    fp32 = Path(cfg.model_dir) if cfg.model_dir else work / "fp32"
    fp16 = Path(cfg.fp16_model_dir) if cfg.fp16_model_dir else None
    if cfg.fp16_model_dir is None and cfg.model_dir is None:
        fp16 = work / "fp16"
    if cfg.ckpt is None:
        import torch
        from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

        mcfg = SSMConfig(
            vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=cfg.d_state
        )
        if _recorded(ckpt / "config.json") != mcfg.to_dict():
            torch.manual_seed(0)
            save_checkpoint(SSMNetwork(mcfg).eval(), ckpt)
            log.info("random checkpoint %s (S=%d)", ckpt, mcfg.state_size)
    for dtype, d, given in (("fp32", fp32, cfg.model_dir), ("fp16", fp16, cfg.fp16_model_dir)):
        if d is None or given:  # a given model exists (parse_args checked) and is used as is
            continue
        if _exported_from(d) != sha256_file(ckpt / "model.safetensors"):
            log.info("exporting %s -> %s", dtype, d)
            export_model(ckpt, d, dtype=dtype, prefill=False, verify=False, overwrite=True)
    return {"ckpt": ckpt, "fp32": fp32, "fp16": fp16}


def _exported_from(model_dir: Path) -> str | None:
    """The sha256 of the weights a model was exported from (its manifest's source); None
    where there is no model."""
    try:
        return json.loads((model_dir / "manifest.json").read_text())["source"]["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recorded(path: Path) -> dict | None:
    """The network config a checkpoint's config.json records (its "model"); None where
    there is none."""
    try:
        return json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


# --- runners: each returns step(x [B] int64) -> (y [B, V] host array, bytes moved) -----------


def torch_runner(ckpt: Path, device: str, B: int):
    import torch
    from ssmstream.model import load_checkpoint

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    net = load_checkpoint(ckpt).to(dev).eval()
    states = [x.to(dev) for x in net.initial_state(B)]
    S = net.cfg.state_size

    @torch.inference_mode()
    def step(x: np.ndarray):
        nonlocal states
        y, states = net.step(torch.from_numpy(x).to(dev), states)
        y = y.float().cpu().numpy()  # synchronizes
        return y, x.nbytes + y.nbytes

    return step, S


def engine_runner(model_dir: Path, device: str, B: int, threads):
    from ssmstream.runtime.engine import Engine

    eng = Engine(model_dir, device=device, threads=threads)
    s = eng.new_state(B)

    def step(x: np.ndarray):
        nonlocal s
        s_in = s
        y, s = eng.step(x, s_in)
        return y, x.nbytes + s_in.nbytes + y.nbytes + s.nbytes

    return step, eng


def slab_runner(model_dir: Path, device: str, B: int, threads, graphs: bool = False):
    """Steps of all B rows of a StateSlab on the device (zeros, as Engine.new_state);
    `step.slab` is the slab, whose stats count each step's host↔device bytes. graphs: CUDA
    graphs of the slot step (Engine.cuda_graphs; forced on CPU, where nothing is captured)."""
    from ssmstream.runtime.engine import Engine

    options = {"enable_cuda_graph": True} if graphs else None
    eng = Engine(model_dir, device=device, threads=threads, cuda_options=options)
    if graphs:
        eng.cuda_graphs = True  # on CUDA already so; on CPU the bucket path without capture
    slab = eng.new_slab(B)
    buf = eng.step_buffers(B)
    buf.slots[:B, 0] = np.arange(B)
    st = slab.stats

    def step(x: np.ndarray):
        before = st.step_bytes_in + st.step_bytes_out
        buf.inputs[:B] = x
        y = eng.run_slots(slab, B, buf)  # a view of buf.outputs
        return y, st.step_bytes_in + st.step_bytes_out - before

    step.slab = slab
    return step, eng


# --- measuring -------------------------------------------------------------------------------


def measure(step, B: int, V: int, cfg: BenchConfig, seed: int = 0) -> dict:
    """Warm up, then time cfg.steps steps on the same token sequence for every variant."""
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, V, size=(cfg.warmup + cfg.steps, B)).astype(np.int64)  # [T, B]
    lat, first = [], []
    nbytes = 0
    t_start = time.perf_counter()
    for t in range(len(xs)):
        t0 = time.perf_counter()
        y, nbytes = step(xs[t])
        dt = time.perf_counter() - t0
        if t < 4:
            first.append(np.array(y, dtype=np.float32, copy=True))
        if t >= cfg.warmup:
            lat.append(dt)
        if time.perf_counter() - t_start > cfg.max_seconds and len(lat) >= 3:
            break
    mean = sum(lat) / len(lat)
    extra = {}
    slab = getattr(step, "slab", None)
    if slab is not None:  # the slab's own count, over every step it ran
        st = slab.stats
        extra = {
            "bytes_in_per_step": st.step_bytes_in // st.steps,
            "bytes_out_per_step": st.step_bytes_out // st.steps,
        }
    return {
        "batch": B,
        "steps": len(lat),
        "p50_ms": 1e3 * statistics.median(lat),
        "mean_ms": 1e3 * mean,
        "tokens_per_s": B / mean,
        "bytes_per_step": int(nbytes),
        **extra,
        "first_outputs": np.stack(first),  # [4, B, V], for parity; dropped from the JSON
        "elapsed_s": time.perf_counter() - t_start,
    }


def run_variant(name: str, models: dict, cfg: BenchConfig, B: int):
    dev = cfg.device
    if name == "torch_eager":
        return torch_runner(models["ckpt"], dev, B)[0]
    if name in ("ort_fp16", "ort_slab_fp16") and models["fp16"] is None:
        raise LookupError("no fp16 model (pass --fp16-model-dir)")
    if name == "ort_fp32":
        return engine_runner(models["fp32"], dev, B, cfg.threads)[0]
    if name == "ort_fp16":
        return engine_runner(models["fp16"], dev, B, cfg.threads)[0]
    if name == "ort_slab":
        return slab_runner(models["fp32"], dev, B, cfg.threads)[0]
    if name == "ort_slab_fp16":
        return slab_runner(models["fp16"], dev, B, cfg.threads)[0]
    if name == "ort_slab_graph":
        return slab_runner(models["fp32"], dev, B, cfg.threads, graphs=True)[0]
    raise ValueError(name)


def device_info(device: str) -> dict:
    import onnxruntime as ort

    info = {
        "device": device,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "machine": platform.node(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    return info


def run(cfg: BenchConfig) -> dict:
    from ssmstream.runtime.manifest import load_manifest

    models = prepare_models(cfg)
    man = load_manifest(models["fp32"])
    V, S = int(man["d_output"]), int(man["state_size"])
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    reference: dict[int, np.ndarray] = {}
    order = ["ort_fp32"] + [v for v in cfg.variants if v != "ort_fp32"]  # reference first
    for name in order:
        if name not in cfg.variants and name != "ort_fp32":
            continue
        rows = results.setdefault(name, [])
        for B in cfg.batches:
            try:
                step = run_variant(name, models, cfg, B)
                r = measure(step, B, V, cfg)
            except LookupError as e:
                skipped[name] = str(e)
                results.pop(name, None)
                break
            except Exception as e:  # a failure at one size (e.g. out of memory) is a result
                log.warning("%s B=%d failed: %s", name, B, e)
                rows.append({"batch": B, "error": f"{type(e).__name__}: {e}"[:300]})
                break
            first = r.pop("first_outputs")
            if name == "ort_fp32":
                reference[B] = first
            elif B in reference:
                r["max_abs_err_vs_ort_fp32"] = float(np.abs(first - reference[B]).max())
            rows.append(r)
            log.info(
                "%-18s B=%-5d %10.0f tok/s  p50 %.3f ms  %d B/step",
                name, B, r["tokens_per_s"], r["p50_ms"], r["bytes_per_step"],
            )  # fmt: skip
            if r["elapsed_s"] > cfg.max_seconds:
                log.info(
                    "%s: over %.0f s at B=%d, larger batches skipped", name, cfg.max_seconds, B
                )
                break
    if "ort_fp32" not in cfg.variants:
        results.pop("ort_fp32", None)
    summary = {}
    eager = {r["batch"]: r for r in results.get("torch_eager", []) if "tokens_per_s" in r}
    for rows in results.values():
        for r in rows:
            if "tokens_per_s" in r and r["batch"] in eager:
                r["speedup_vs_torch_eager"] = r["tokens_per_s"] / eager[r["batch"]]["tokens_per_s"]
    for name in ("ort_slab", "ort_slab_graph"):
        at64 = [r for r in results.get(name, []) if r["batch"] == 64 and "tokens_per_s" in r]
        if at64 and "speedup_vs_torch_eager" in at64[0]:
            summary[f"{name}_vs_torch_eager_at_64"] = at64[0]["speedup_vs_torch_eager"]
    return {
        "config": asdict(cfg),
        "model": {"state_size": S, "d_output": V, "state_bytes": 4 * S, "name": man.get("name")},
        "env": device_info(cfg.device),
        "results": results,
        "skipped": skipped,
        "summary": summary,
        "floor": state_floor(results, S, cfg.bandwidth_gbs),
        "traffic": state_traffic(models["fp32"]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


VIEW_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Shape")  # no bytes move


def state_traffic(model_dir: Path) -> dict:
    """The slot graph's passes over the state (see the module docstring): bytes per batch
    row read and written by each node in state-sized tensors, and their sum ÷ 2·S·4."""
    import onnx
    from onnx import shape_inference
    from ssmstream.runtime.manifest import load_manifest
    from ssmstream.runtime.slab import slot_model

    man = load_manifest(model_dir)
    S = int(man["state_size"])
    step = (Path(model_dir) / man["graphs"]["step"]["file"]).read_bytes()
    model = shape_inference.infer_shapes(onnx.load_from_string(slot_model(step, S)))
    g = model.graph
    per_row = {}  # tensor -> bytes per batch row, where its shape is [B, known dims...]
    for vi in [*g.value_info, *g.input, *g.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) > 1 and all(dims[1:]):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
            per_row[vi.name] = itemsize * int(np.prod(dims[1:]))
    big = S * 4 // 8
    nodes = []
    for n in g.node:
        if n.op_type in VIEW_OPS:
            continue
        ins = [i for i in n.input if not (n.op_type == "ScatterND" and i == "slab")]  # aliased
        moved = sum(per_row.get(x, 0) for x in [*ins, *n.output] if per_row.get(x, 0) >= big)
        if moved:
            nodes.append({"op": n.op_type, "name": n.name, "bytes_per_row": moved})
    total = sum(n["bytes_per_row"] for n in nodes)
    return {"state_bytes": 4 * S, "bytes_per_row": total, "passes": total / (8 * S), "nodes": nodes}


def state_floor(results: dict, S: int, bandwidth_gbs: float) -> list[dict]:
    """Per model (fp32, fp16) and B in FLOOR_BATCHES: the slab variant's p50 ms per step ÷
    the state read+write floor, 2·B·S·4 bytes at `bandwidth_gbs` (no new measurement)."""
    out = []
    for model, variant in SLAB_VARIANTS.items():
        for B in FLOOR_BATCHES:
            floor_ms = 1e3 * 2 * B * S * 4 / (bandwidth_gbs * 1e9)
            r = next(
                (r for r in results.get(variant, []) if r["batch"] == B and "p50_ms" in r), None
            )
            out.append(
                {
                    "model": model,
                    "variant": variant,
                    "batch": B,
                    "floor_ms": floor_ms,
                    "p50_ms": None if r is None else r["p50_ms"],
                    "ratio": None if r is None else r["p50_ms"] / floor_ms,
                }
            )
    return out


# --- reporting -------------------------------------------------------------------------------


def to_markdown(rep: dict) -> str:
    env, m = rep["env"], rep["model"]
    card = env.get("gpu") or f"{env['device']} (no GPU)"
    lines = [
        f"# bench_gpu — {card}",
        "",
        f"onnxruntime {env['onnxruntime']}, torch {env.get('torch')}, model S={m['state_size']} "
        f"({m['state_bytes']} B/stream), V={m['d_output']}; {rep['when']}.",
        "",
        "| variant | B | tokens/s | p50 ms | host↔device B/step | vs torch eager "
        "| max abs err vs ort_fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in rep["results"].items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['batch']} | error: {r['error'][:80]} | | | | |")
                continue
            sp = r.get("speedup_vs_torch_eager")
            err = r.get("max_abs_err_vs_ort_fp32")
            lines.append(
                f"| {name} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.3f} | "
                f"{r['bytes_per_step']} | {'' if sp is None else f'{sp:.2f}×'} | "
                f"{'' if err is None else f'{err:.2e}'} |"
            )
    for name, why in rep["skipped"].items():
        lines.append(f"\n- {name} skipped: {why}")
    if rep["summary"]:
        lines.append(f"\nSummary: {json.dumps(rep['summary'])}")
    lines += floor_lines(rep)
    tr = rep.get("traffic")
    if tr:
        ops = ", ".join(
            f"{n['op']} {n['bytes_per_row'] / tr['state_bytes']:.1f}" for n in tr["nodes"]
        )
        sizes = tr["bytes_per_row"] / tr["state_bytes"]
        lines.append(
            f"\nState traffic of the slot graph (fp32): {sizes:.1f} "
            f"state sizes read + written per row and step = **{tr['passes']:.1f}× the floor** "
            f"(one read and one write). Per node, in state sizes: {ops}."
        )
    return "\n".join(lines) + "\n"


def floor_lines(rep: dict) -> list[str]:
    """One line per model: its slab step's p50 ÷ the state read+write floor."""
    floor = rep.get("floor") or []
    if not floor:
        return []
    bw = rep["config"]["bandwidth_gbs"]
    where = (
        ""
        if rep["env"]["device"] == "cuda"
        else " (a CPU smoke run: the ratio is not a GPU figure)"
    )
    lines = [
        "",
        f"ms per step ÷ state read+write floor (2·B·S·4 bytes at {bw:g} GB/s, "
        f"--bandwidth-gbs, not measured){where}:",
        "",
    ]
    for model in dict.fromkeys(f["model"] for f in floor):
        rows = [f for f in floor if f["model"] == model]
        parts = [
            f"B = {f['batch']}: not measured (floor {1e3 * f['floor_ms']:.3g} µs)"
            if f["ratio"] is None
            else f"B = {f['batch']}: {f['p50_ms']:.3f} ms ÷ {1e3 * f['floor_ms']:.3g} µs = "
            f"{f['ratio']:,.0f}×"
            for f in rows
        ]
        lines.append(f"- {model} ({rows[0]['variant']}): " + "; ".join(parts))
    return lines


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in rep["results"].items():
        ok = [r for r in rows if "tokens_per_s" in r]
        if ok:
            bs = [r["batch"] for r in ok]
            a.plot(bs, [r["tokens_per_s"] for r in ok], marker="o", label=name)
            b.plot(bs, [r["p50_ms"] for r in ok], marker="o", label=name)
    for ax, ylab in ((a, "tokens/s"), (b, "p50 step latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(f"bench_gpu on {rep['env'].get('gpu') or rep['env']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rep: dict, out: str) -> list[Path]:
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")]
    paths[0].write_text(json.dumps(rep, indent=1))
    paths[1].write_text(to_markdown(rep))
    plot(rep, paths[2])
    return paths


def parse_args(argv=None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        description="Step throughput and latency of torch eager vs onnxruntime CUDA "
        "(fp32, fp16, states in a device slab) over batch sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default=d.device, choices=["cuda", "cpu"], help="cpu: smoke mode")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="comma-separated B")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per (variant, B)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument(
        "--max-seconds", type=float, default=d.max_seconds,
        help="time cap per (variant, B); larger B of that variant are skipped after it",
    )  # fmt: skip
    p.add_argument("--vocab", type=int, default=d.vocab, help="model made when none given")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-layers", type=int, default=d.n_layers)
    p.add_argument("--d-state", type=int, default=d.d_state)
    p.add_argument("--work", default=d.work, help="where missing models are made (a cache)")
    model, checkpoint = dir_with("manifest.json"), dir_with("config.json")
    p.add_argument(
        "--model-dir", type=model, help="an exported fp32 model (default: made in --work)"
    )
    p.add_argument(
        "--fp16-model-dir", type=model, help="an exported fp16 model of the same checkpoint"
    )
    p.add_argument("--ckpt", type=checkpoint, help="the checkpoint of --model-dir (torch_eager)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--out", type=out_file, default=d.out, help="output path without suffix")
    p.add_argument("--prepare-only", action="store_true", help="make the models and stop")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=d.bandwidth_gbs,
        help="device memory bandwidth in GB/s for the state floor (default: an H200)",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("bench_gpu", "ssmstream"):  # not the exporters' own INFO chatter
        logging.getLogger(name).setLevel(logging.DEBUG if a.verbose else logging.INFO)
    try:
        cfg = BenchConfig(
            device=a.device,
            batches=[int(b) for b in a.batches.split(",") if b],
            variants=[v for v in a.variants.split(",") if v],
            steps=a.steps, warmup=a.warmup, max_seconds=a.max_seconds, vocab=a.vocab,
            d_model=a.d_model, n_layers=a.n_layers, d_state=a.d_state, work=a.work,
            model_dir=a.model_dir, fp16_model_dir=a.fp16_model_dir, ckpt=a.ckpt, out=a.out,
            threads=a.threads, prepare_only=a.prepare_only, bandwidth_gbs=a.bandwidth_gbs,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.prepare_only:  # exports need no GPU
        print(json.dumps({k: str(v) for k, v in prepare_models(cfg).items()}))
        return 0
    if cfg.device == "cuda":  # else every variant would fail, one by one, after the exports
        from ssmstream.runtime.providers import cuda_usable

        usable, why = cuda_usable()
        if not usable:
            print(
                f"bench_gpu: CUDA is not usable: {why} (--device cpu: a smoke run)", file=sys.stderr
            )
            return 1
    rep = run(cfg)
    for path in write(rep, cfg.out):
        print(path)
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    run_script(main, "bench_gpu.py")  # an export under way removes its temporary directory
