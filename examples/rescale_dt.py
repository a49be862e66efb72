"""Δ rescaling: run a model trained at sampling rate r on the same signal sampled at c·r.

An SSM layer is a discretized continuous system x'(t) = A x(t) + B u(t). Sampling the
input c times as densely only changes the step between samples, so the trained network
runs unchanged on the new rate once every Δ is divided by c (no retraining):

    trained at r:   x_k = Ā x_{k-1} + B̄ u_k,  Ā = exp(ΔA)
    input at c·r:   Δ → Δ / c      (`ssmstream export --dt-scale 1/c`, ssm.rescale_dt)

This script takes the shipped signal checkpoint (examples/checkpoints/signal: the
low-pass task y' = (u − y)/τ of model/data.py, trained at rate r = 8), exports it twice,

    model_r    dt_scale = 1        (the training rate)
    model_cr   dt_scale = 1 / c    (inputs at c·r, default c = 2 → dt_scale 0.5)

and streams the same held-out continuous signals, sampled at r and at c·r, sample by
sample through the runtime Engine (onnxruntime, the recurrent step graph), then prints

    MSE at r (model_r)             the trained error
    MSE at c·r (model_cr)          rescaled: close to the MSE at r
    MSE at c·r (model_r)           unscaled: clearly worse (the filter runs c× too slow)
    gap  |out_cr[::c] − out_r|²    the rescaled outputs at the shared sample times match

all relative to the target's power. `main()` returns these numbers (tests check them).

Measured with the shipped checkpoint (64 signals, c = 2; ORT and the torch conv forward
agree to 1e-6, so these are the model's numbers, not the export's):

    MSE / power at r                     1.3e-3
    MSE / power at 2r, Δ/2 (rescaled)    3.8e-3   (2.8× the error at r, still < 0.4 % of power)
    MSE / power at 2r, Δ   (unscaled)    2.1e-1   (55× the rescaled error)
    gap at shared sample times           2.8e-3 rescaled, 2.1e-1 unscaled

Rescaling is not perfectly free: trained at r, the network also learned the sampled
problem (e.g. the ~Δ/2 lag of holding each input sample for one step), which at c·r is
Δ/(2c); a model stopped earlier (larger error at r) shows ratios nearer 1
(tests/model/test_rescale.py: 1.03–1.08 after 120 steps). The unscaled model, whose
filters run c× too slowly, is wrong by far more than either.

    python examples/rescale_dt.py                         # c = 2
    python examples/rescale_dt.py --factor 4 --work /tmp/rescale [--reuse]

Dimension letters: B signals (streams), L samples per signal, S packed state size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ssmstream.export import export_model
from ssmstream.model.data import SignalConfig, signal_batch
from ssmstream.model.flags import said_of_flags
from ssmstream.model.train import HelpFormatter
from ssmstream.runtime import Engine
from ssmstream.runtime.providers import MAX_THREADS

log = logging.getLogger("rescale_dt")

ROOT = Path(__file__).resolve().parents[1]
SIGNAL_CKPT = ROOT / "examples" / "checkpoints" / "signal"


MAX_FACTOR = 256


@dataclasses.dataclass
class RescaleConfig:
    """What the demonstration runs (the CLI flags map onto these)."""

    ckpt: str = str(SIGNAL_CKPT)  # a checkpoint trained by `ssmstream train --task signal`
    factor: float = 2.0  # c: the new sampling rate is c·r
    signals: int = 64  # B held-out signals
    seed: int = 12345  # their generator seed (training used other seeds)
    work: str | None = None  # where the two exports go (None: a temporary directory)
    prefill: bool = False  # also export prefill.onnx (this demo streams sample by sample)
    verify: bool = True  # run the exporter's parity check on each export
    reuse: bool = False  # keep an export in `work` made from the same weights and dt_scale
    threads: int | None = 1  # onnxruntime intra-op threads

    def __post_init__(self):
        if not 0 < self.factor <= MAX_FACTOR:  # it streams c·r samples, one step at a time
            raise ValueError(f"factor must be in (0, {MAX_FACTOR}], got {self.factor}")
        if self.signals < 1:
            raise ValueError(f"signals must be at least 1, got {self.signals}")
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:  # before exports
            raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {self.threads}")
        if not (Path(self.ckpt) / "config.json").is_file():
            raise ValueError(f"ckpt: {self.ckpt!r} is not a checkpoint directory (no config.json)")


def training_signal(ckpt: str | Path) -> SignalConfig:
    """The SignalConfig the checkpoint was trained on (config.json → train.signal)."""
    meta = json.loads((Path(ckpt) / "config.json").read_text())
    train = meta.get("train") or {}
    if train.get("task") != "signal" or "signal" not in train:
        raise ValueError(f"ckpt: {str(ckpt)!r} was not trained on the signal task")
    return SignalConfig(**train["signal"])


def reusable(model_dir: Path, ckpt: str | Path, dt_scale: float, prefill: bool) -> bool:
    """Does model_dir hold a passing export of these weights at this dt_scale?"""
    try:
        m = json.loads((model_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    weights = hashlib.sha256((Path(ckpt) / "model.safetensors").read_bytes()).hexdigest()
    return (
        m.get("dt_scale") == dt_scale
        and m.get("source", {}).get("weights_sha256") == weights
        and ("prefill" in m.get("graphs", {})) == prefill
        and m.get("parity", {}).get("passed") is not False
    )


def stream(eng: Engine, u: np.ndarray) -> np.ndarray:
    """Feed u [B, L, d_in] one sample at a time through the step graph → outputs [B, L, d_out]."""
    B, L, _ = u.shape
    s = eng.new_state(B)  # float32 [B, S]
    out = np.empty((B, L, eng.d_output), dtype=np.float32)
    for k in range(L):
        out[:, k], s = eng.step(u[:, k], s)  # [B, d_in] → [B, d_out], [B, S]
    return out


def run(cfg: RescaleConfig) -> dict:
    """Export at dt_scale 1 and 1/c, stream the signals at r and c·r, return the errors."""
    sig_r = training_signal(cfg.ckpt)
    sig_cr = dataclasses.replace(sig_r, rate=sig_r.rate * cfg.factor)
    c = int(round(cfg.factor))
    with tempfile.TemporaryDirectory(prefix="ssmstream-rescale-") as tmp:
        work = Path(cfg.work or tmp)
        dirs = {}
        for name, dt_scale in (("model_r", 1.0), ("model_cr", 1.0 / cfg.factor)):
            if cfg.reuse and reusable(work / name, cfg.ckpt, dt_scale, cfg.prefill):
                log.info("reusing the export in %s (dt_scale %g)", work / name, dt_scale)
                dirs[name] = work / name
                continue
            t0 = time.perf_counter()
            dirs[name] = export_model(
                cfg.ckpt,
                work / name,
                dt_scale=dt_scale,
                prefill=cfg.prefill,
                verify=cfg.verify,
                overwrite=True,
            )
            log.info(
                "exported %s (dt_scale %g) in %.1f s", name, dt_scale, time.perf_counter() - t0
            )
        engines = {name: Engine(d, device="cpu", threads=cfg.threads) for name, d in dirs.items()}
        parity = {
            name: eng.manifest.get("parity", {}).get("passed") for name, eng in engines.items()
        }

        # the same continuous signals, sampled at r and at c·r (same generator seed)
        u_r, y_r = (t.numpy() for t in signal_batch(sig_r, cfg.signals, _gen(cfg.seed)))
        u_cr, y_cr = (t.numpy() for t in signal_batch(sig_cr, cfg.signals, _gen(cfg.seed)))
        t0 = time.perf_counter()
        out_r = stream(engines["model_r"], u_r)  # [B, L, 1]
        out_cr = stream(engines["model_cr"], u_cr)  # [B, c·L, 1]
        out_cr_unscaled = stream(engines["model_r"], u_cr)  # [B, c·L, 1]
        seconds = time.perf_counter() - t0

    mse = lambda a, b: float(np.mean((a.astype(np.float64) - b) ** 2))  # noqa: E731
    power = float(np.mean(y_r.astype(np.float64) ** 2))
    res = {
        "rate": sig_r.rate,
        "factor": cfg.factor,
        "dt_scale": 1.0 / cfg.factor,
        "signals": cfg.signals,
        "samples_r": int(u_r.shape[1]),
        "samples_cr": int(u_cr.shape[1]),
        "target_power": power,
        "mse_r": mse(out_r, y_r),
        "mse_cr_rescaled": mse(out_cr, y_cr),
        "mse_cr_unscaled": mse(out_cr_unscaled, y_cr),
        "parity_passed": parity,
        "stream_seconds": seconds,
    }
    if c == cfg.factor and u_cr.shape[1] == c * u_r.shape[1]:
        # sample k of the r signal is sample c·k of the c·r one: the outputs should agree
        res["gap_rescaled"] = mse(out_cr[:, ::c], out_r) / power
        res["gap_unscaled"] = mse(out_cr_unscaled[:, ::c], out_r) / power
    res["rescaled_over_r"] = res["mse_cr_rescaled"] / res["mse_r"]
    res["unscaled_over_rescaled"] = res["mse_cr_unscaled"] / res["mse_cr_rescaled"]
    return res


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def report(res: dict) -> str:
    r, c = res["rate"], res["factor"]
    p = res["target_power"]
    rows = [
        ("model_r  (dt_scale 1)", f"{r:g}", res["mse_r"]),
        (f"model_cr (dt_scale {res['dt_scale']:g})", f"{c * r:g}", res["mse_cr_rescaled"]),
        ("model_r  (dt_scale 1), unscaled", f"{c * r:g}", res["mse_cr_unscaled"]),
    ]
    lines = [
        f"{res['signals']} held-out signals, target power {p:.4f}; "
        f"{res['samples_r']} samples at rate {r:g}, {res['samples_cr']} at rate {c * r:g}",
        "",
        f"{'exported model':<36} {'rate':>6} {'MSE':>10} {'MSE / power':>12}",
    ]
    lines += [f"{name:<36} {rate:>6} {m:>10.2e} {m / p:>12.2e}" for name, rate, m in rows]
    lines += [
        "",
        f"MSE rescaled at {c:g}r / MSE at r:  {res['rescaled_over_r']:.2f}×",
        f"MSE unscaled / rescaled at {c:g}r:  {res['unscaled_over_rescaled']:.1f}×",
    ]
    if "gap_rescaled" in res:
        lines.append(
            f"|out_{c:g}r[::{c:g}] − out_r|² / power:  rescaled {res['gap_rescaled']:.1e}, "
            f"unscaled {res['gap_unscaled']:.1e}"
        )
    return "\n".join(lines)


FIELDS = [f.name for f in dataclasses.fields(RescaleConfig)]  # each is its --flag


def build_parser() -> argparse.ArgumentParser:
    d = RescaleConfig()
    p = argparse.ArgumentParser(
        description="Export the shipped signal model at dt-scale 1 and 1/c, run both with the "
        "runtime Engine on the same continuous signals sampled at r and c·r, and print the "
        "errors: the Δ-rescaled model keeps its error, the unscaled one does not.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", default=d.ckpt, help="signal-task checkpoint directory")
    p.add_argument("--factor", type=float, default=d.factor, help="c: new sampling rate = c·r")
    p.add_argument("--signals", type=int, default=d.signals, help="held-out signals (streams)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the held-out signals")
    p.add_argument(
        "--work", default=None, help="keep the two exports here (none: a temporary directory)"
    )
    p.add_argument(
        "--prefill",
        action=argparse.BooleanOptionalAction,
        default=d.prefill,
        help="also export prefill.onnx",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=d.verify,
        help="run the exporter's parity check",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse exports in --work made from the same weights and dt_scale",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="onnxruntime threads")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the demonstration; returns the numbers it printed (see `run`)."""
    parser = build_parser()
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(message)s")  # warnings from the libraries the export uses
    for name in (log.name, "ssmstream"):  # this demo's and the exporter's progress
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        cfg = RescaleConfig(
            ckpt=a.ckpt,
            factor=a.factor,
            signals=a.signals,
            seed=a.seed,
            work=a.work,
            prefill=a.prefill,
            verify=a.verify,
            reuse=a.reuse,
            threads=a.threads,
        )
        res = run(cfg)
    except ValueError as e:  # RescaleConfig's messages start with the field: said as its flag
        parser.error(said_of_flags(str(e), FIELDS, values=False))
    print(json.dumps(res, indent=2) if a.json else report(res))
    return res


if __name__ == "__main__":
    from ssmstream.runtime.cli import run_command

    sys.exit(run_command(lambda: main() and 0, "rescale_dt.py"))  # main returns the numbers
