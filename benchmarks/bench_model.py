"""Model benchmark (torch): the two views of one SSM network, and training throughput.

1. Convolution vs recurrence. For L = 256 … 8192, one sequence (B = 1) through
       conv     net(x)                     one FFT convolution per layer, O(L log L)
       steps    L × net.step(x_l, state)   the recurrence, O(L) sequential steps
   timed on the same random-init network and the same tokens; the outputs are compared
   (max |conv − steps| over the logits) so the table also shows they agree. The step
   path is PyTorch eager (it re-discretizes each call); the exported ONNX step graph is
   measured in bench_export / bench_runtime.
2. Training tokens/s: forward + backward + AdamW (the trainer's param groups and loss)
   on random byte windows, B × L tokens per step, after warm-up steps.

    python benchmarks/bench_model.py                 # defaults: the default byte LM
    python benchmarks/bench_model.py --lengths 256 1024 --train-steps 3

Writes benchmarks/results/bench_model.{json,md,png}. The CPU figures come from the
machine the script runs on (its core count and load average are recorded).
Dimension letters: B batch, L sequence length, D d_model, N d_state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.model.train import TrainConfig, loss_fn, make_optimizer
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import out_dir, run_script  # noqa: E402

log = logging.getLogger("bench_model")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class BenchConfig:
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    conv_repeats: int = 3
    train_batch: int = 16
    train_seq_len: int = 512
    train_steps: int = 8
    train_warmup: int = 2
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: str = str(RESULTS)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "d_state", "conv_repeats", "train_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"lengths must be positive integers, got {self.lengths}")
        if self.train_steps <= 0 or self.train_warmup < 0 or self.train_seq_len <= 0:
            raise ValueError("train_steps and train_seq_len must be positive, train_warmup ≥ 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def conv_vs_steps(net: SSMNetwork, L: int, repeats: int, device: torch.device) -> dict:
    """Time net(x) (median of `repeats`) and L sequential steps (once) on x int64 [1, L]."""
    x = torch.randint(0, net.cfg.vocab_size, (1, L), dtype=torch.long, device=device)  # [1, L]
    net(x[:, : min(L, 64)])  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        y_conv = net(x)  # [1, L, V]
        _sync(device)
        times.append(time.perf_counter() - t0)
    states = net.initial_state(1)
    for l in range(8):  # warm-up
        net.step(x[:, l], states)
    outs = []
    _sync(device)
    t0 = time.perf_counter()
    for l in tqdm(range(L), desc=f"steps L={L}", leave=False, mininterval=1.0):
        y, states = net.step(x[:, l], states)  # [1, V]
        outs.append(y)
    _sync(device)
    t_steps = time.perf_counter() - t0
    y_steps = torch.stack(outs, dim=1)  # [1, L, V]
    t_conv = statistics.median(times)
    return {
        "L": L,
        "conv_ms": t_conv * 1e3,
        "steps_ms": t_steps * 1e3,
        "steps_over_conv": t_steps / t_conv,
        "conv_us_per_token": t_conv / L * 1e6,
        "step_us_per_token": t_steps / L * 1e6,
        "max_abs_diff": (y_conv - y_steps).abs().max().item(),
    }


def train_throughput(cfg: BenchConfig, model_cfg: SSMConfig, device: torch.device) -> dict:
    """tokens/s of forward + backward + AdamW on random byte windows [B, L]."""
    torch.manual_seed(cfg.seed)
    net = SSMNetwork(model_cfg).to(device).train()
    tcfg = TrainConfig(steps=cfg.train_warmup + cfg.train_steps + 1, warmup_steps=0)
    opt, sched = make_optimizer(net, tcfg)
    B, L = cfg.train_batch, cfg.train_seq_len
    g = torch.Generator().manual_seed(cfg.seed)
    times = []
    for i in tqdm(range(cfg.train_warmup + cfg.train_steps), desc="train steps", leave=False):
        w = torch.randint(0, 256, (B, L + 1), generator=g, dtype=torch.long).to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn("text", net(w[:, :-1]), w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        _sync(device)
        if i >= cfg.train_warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "batch": B,
        "seq_len": L,
        "steps_timed": len(times),
        "step_ms_median": step_s * 1e3,
        "tokens_per_s": B * L / step_s,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def write_report(cfg: BenchConfig, results: dict) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(results, indent=2) + "\n")
    m, tr = results["meta"], results["train"]
    lines = [
        "# bench_model — convolution vs recurrence, training throughput (torch)",
        "",
        f"Model: byte LM, d_model={cfg.d_model}, n_layers={cfg.n_layers}, "
        f"d_state={cfg.d_state} ({tr['parameters']:,} parameters), zoh, SISO. "
        f"Device: {m['device']} ({m['cpu']}, {m['cpu_count']} cores, torch threads "
        f"{m['torch_threads']}, load average at start {m['loadavg']}), torch {m['torch']}.",
        "",
        "## Forward over one sequence (B = 1): conv mode vs L sequential `step`s",
        "",
        "| L | conv (ms) | L steps (ms) | steps / conv | conv µs/token | step µs/token "
        "| max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["conv_vs_steps"]:
        lines.append(
            f"| {r['L']} | {r['conv_ms']:.1f} | {r['steps_ms']:.0f} | "
            f"{r['steps_over_conv']:.0f}× | {r['conv_us_per_token']:.1f} | "
            f"{r['step_us_per_token']:.0f} | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "conv: median of "
        f"{cfg.conv_repeats} runs; steps: one pass of PyTorch eager `net.step` (re-discretizes "
        "each call). The ONNX step graph used for serving is benchmarked separately.",
        "",
        "## Training throughput (forward + backward + AdamW)",
        "",
        "| batch | seq_len | step (ms, median) | tokens/s |",
        "|---:|---:|---:|---:|",
        f"| {tr['batch']} | {tr['seq_len']} | {tr['step_ms_median']:.0f} | "
        f"{tr['tokens_per_s']:,.0f} |",
        "",
        f"Median over {tr['steps_timed']} steps after {cfg.train_warmup} warm-up steps.",
        "",
    ]
    if m["loadavg"][0] >= m["cpu_count"]:
        lines += [
            f"Note: the machine was oversubscribed (1-min load average {m['loadavg'][0]} on "
            f"{m['cpu_count']} cores, shared with other jobs): the timings are noisy and slow; "
            "ratios within this run are the meaningful part.",
            "",
        ]
    (out / "bench_model.md").write_text("\n".join(lines))
    _plot(results, out / "bench_model.png")
    return results


def _plot(results: dict, path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib missing: no %s", path)
        return
    rows = results["conv_vs_steps"]
    Ls = [r["L"] for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.loglog(Ls, [r["conv_ms"] for r in rows], "o-", label="conv mode (FFT)")
    ax1.loglog(Ls, [r["steps_ms"] for r in rows], "s-", label="L sequential steps")
    ax1.set(xlabel="L", ylabel="ms per sequence", title="one sequence, B = 1")
    ax2.semilogx(Ls, [r["conv_us_per_token"] for r in rows], "o-", label="conv mode")
    ax2.semilogx(Ls, [r["step_us_per_token"] for r in rows], "s-", label="step")
    ax2.set(xlabel="L", ylabel="µs per token", title="per-token cost")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"bench_model on {results['meta']['device']}: "
        f"training {results['train']['tokens_per_s']:,.0f} tokens/s"
    )
    fig.savefig(path, dpi=110)


def run(cfg: BenchConfig) -> dict:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model_cfg = SSMConfig(
        vocab_size=256, d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=cfg.d_state
    )
    torch.manual_seed(cfg.seed)
    net = SSMNetwork(model_cfg).to(device).eval()
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = []
    for L in cfg.lengths:
        rows.append(conv_vs_steps(net, L, cfg.conv_repeats, device))
        r = rows[-1]
        log.info(
            "L=%d conv %.1f ms, steps %.0f ms (%.0f×), max diff %.1e",
            L, r["conv_ms"], r["steps_ms"], r["steps_over_conv"], r["max_abs_diff"],
        )  # fmt: skip
    train = train_throughput(cfg, model_cfg, device)
    log.info("training: %.0f tokens/s", train["tokens_per_s"])
    results = {"config": asdict(cfg), "meta": meta, "conv_vs_steps": rows, "train": train}
    return write_report(cfg, results)


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--d-model", type=int, default=d.d_model, help="D, width of the network")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="SSM blocks")
    p.add_argument("--d-state", type=int, default=d.d_state, help="N, state per channel")
    p.add_argument("--lengths", type=int, nargs="+", default=d.lengths, help="L values")
    p.add_argument("--conv-repeats", type=int, default=d.conv_repeats, help="conv timings")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="B for training")
    p.add_argument("--train-seq-len", type=int, default=d.train_seq_len, help="L for training")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="timed train steps")
    p.add_argument("--train-warmup", type=int, default=d.train_warmup, help="untimed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"), help="torch device")
    p.add_argument("--seed", type=int, default=d.seed, help="init and data seed")
    p.add_argument("--out", type=out_dir, default=d.out, help="results directory")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items()})
    except ValueError as e:
        p.error(str(e))
    run(cfg)
    log.info("wrote %s/bench_model.{json,md,png}", cfg.out)
    return 0


if __name__ == "__main__":
    run_script(main, "bench_model.py")
