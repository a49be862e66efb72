"""GPU step throughput: torch eager vs onnxruntime CUDA (fp32, fp16, device-resident, CUDA graphs).

For each batch size B in `--batches` and each variant, `--steps` timed steps of the token
step graph (after `--warmup` untimed ones) give:

    tokens/s = B / mean step time,   p50 = median step latency (ms),
    bytes/step = host↔device bytes moved per step (inputs, outputs, and the state when it
                 travels: Engine.step sends [B, S] in and gets [B, S] back; ResidentBatch not)

Variants: torch_eager (SSMNetwork.step, inputs from / outputs to the host each step),
ort_fp32 / ort_fp16 (Engine.step with host numpy states), ort_resident / ort_resident_fp16
(runtime/device_state.ResidentBatch), ort_cuda_graph (ResidentBatch with CUDA graphs,
every step runs the full bucket B). Parity of each variant's outputs against ort_fp32 over
the same inputs is recorded (max abs error after the timed steps' first 4 steps).

Writes benchmarks/results/bench_gpu.{json,md,png} (or `--out`). On a machine without CUDA,
`--device cpu` is a smoke mode of the same code (CUDA graphs skipped). Models: `--model-dir`
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

log = logging.getLogger("bench_gpu")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (
    "torch_eager",
    "ort_fp32",
    "ort_fp16",
    "ort_resident",
    "ort_resident_fp16",
    "ort_cuda_graph",
)


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
    work: str = ".gpu_bench"
    model_dir: str | None = None
    fp16_model_dir: str | None = None
    ckpt: str | None = None
    out: str = "benchmarks/results/bench_gpu"
    threads: int | None = None
    prepare_only: bool = False

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


# --- models ----------------------------------------------------------------------------------


def prepare_models(cfg: BenchConfig) -> dict[str, Path | None]:
    """{"ckpt", "fp32", "fp16"} directories, made in cfg.work where not given."""
    work = Path(cfg.work)
    ckpt = Path(cfg.ckpt) if cfg.ckpt else work / "ckpt"
    fp32 = Path(cfg.model_dir) if cfg.model_dir else work / "fp32"
    fp16 = Path(cfg.fp16_model_dir) if cfg.fp16_model_dir else None
    if cfg.fp16_model_dir is None and cfg.model_dir is None:
        fp16 = work / "fp16"
    if not (ckpt / "config.json").exists():
        import torch
        from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

        torch.manual_seed(0)
        mcfg = SSMConfig(
            vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=cfg.d_state
        )
        save_checkpoint(SSMNetwork(mcfg).eval(), ckpt)
        log.info("random checkpoint %s (S=%d)", ckpt, mcfg.state_size)
    for dtype, d in (("fp32", fp32), ("fp16", fp16)):
        if d is not None and not (d / "manifest.json").exists():
            from ssmstream.export import export_model

            log.info("exporting %s -> %s", dtype, d)
            export_model(ckpt, d, dtype=dtype, prefill=False, verify=False, overwrite=True)
    return {"ckpt": ckpt, "fp32": fp32, "fp16": fp16}


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


def resident_runner(model_dir: Path, device: str, B: int, threads, cuda_graph: bool = False):
    from ssmstream.runtime.device_state import ResidentBatch
    from ssmstream.runtime.engine import Engine

    opts = {"enable_cuda_graph": True} if cuda_graph else None
    eng = Engine(model_dir, device=device, threads=threads, cuda_options=opts)
    rb = ResidentBatch(eng, capacity=B, cuda_graph=cuda_graph)
    rb.join(eng.new_state(B))

    def step(x: np.ndarray):
        y = rb.step(x)
        return y, rb.stats.last_step_bytes

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
    return {
        "batch": B,
        "steps": len(lat),
        "p50_ms": 1e3 * statistics.median(lat),
        "mean_ms": 1e3 * mean,
        "tokens_per_s": B / mean,
        "bytes_per_step": int(nbytes),
        "first_outputs": np.stack(first),  # [4, B, V], for parity; dropped from the JSON
        "elapsed_s": time.perf_counter() - t_start,
    }


def run_variant(name: str, models: dict, cfg: BenchConfig, B: int):
    dev = cfg.device
    if name == "torch_eager":
        return torch_runner(models["ckpt"], dev, B)[0]
    if name in ("ort_fp16", "ort_resident_fp16") and models["fp16"] is None:
        raise LookupError("no fp16 model (pass --fp16-model-dir)")
    if name == "ort_fp32":
        return engine_runner(models["fp32"], dev, B, cfg.threads)[0]
    if name == "ort_fp16":
        return engine_runner(models["fp16"], dev, B, cfg.threads)[0]
    if name == "ort_resident":
        return resident_runner(models["fp32"], dev, B, cfg.threads)[0]
    if name == "ort_resident_fp16":
        return resident_runner(models["fp16"], dev, B, cfg.threads)[0]
    if name == "ort_cuda_graph":
        if dev != "cuda":
            raise LookupError("CUDA graphs need --device cuda")
        return resident_runner(models["fp32"], dev, B, cfg.threads, cuda_graph=True)[0]
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
    for name in ("ort_resident", "ort_cuda_graph"):
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
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


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
    return "\n".join(lines) + "\n"


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
        "(fp32, fp16, device-resident state, CUDA graphs) over batch sizes.",
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
    p.add_argument("--work", default=d.work, help="where missing models are made")
    p.add_argument("--model-dir", help="an exported fp32 model (default: made in --work)")
    p.add_argument("--fp16-model-dir", help="an exported fp16 model of the same checkpoint")
    p.add_argument("--ckpt", help="the checkpoint of --model-dir (for torch_eager)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--out", default=d.out, help="output path without suffix")
    p.add_argument("--prepare-only", action="store_true", help="make the models and stop")
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
            threads=a.threads, prepare_only=a.prepare_only,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.prepare_only:
        print(json.dumps({k: str(v) for k, v in prepare_models(cfg).items()}))
        return 0
    rep = run(cfg)
    for path in write(rep, cfg.out):
        print(path)
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
