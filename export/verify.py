"""Parity check of an exported model: the two views of one function must agree.

    step_vs_torch    the runtime's Engine.step (the step graph on onnxruntime's CPU provider),
                     run recurrently over a random sequence of L ≥ 4096 inputs from the zero
                     state, vs the torch network's convolution-mode forward in float64 (Δ
                     scaled by the manifest's dt_scale).
    prefill_vs_step  the runtime's Engine.prefill — chunks of Q through prefill.onnx (at
                     most max_len per call; a last partial chunk padded in the same call
                     when the graph takes `length`, else stepped through step.onnx) — vs
                     steps only: over the same L-long sequence, and over short sequences
                     (Q + 1, 3Q + 7, Q/2 + 3) starting from the non-zero state the long run
                     ended in; and the prefill's chunk_states output vs the step states at
                     the chunk ends.
    slots_vs_step    the slot graph a server runs (Engine.step_slots: the step graph with a
                     gather and a scatter by slot around it, on a state slab) vs Engine.step
                     on the same rows: 16 steps of the batch's rows scattered over a slab,
                     bit for bit (the same kernels on the same batch), other rows untouched.

The graphs are run through the runtime's public Engine, exactly as a server runs them.

Errors are max |a − b| divided by the scale of the reference (max |reference|), for the
outputs and for the final state. Each dtype has its own tolerance (TOLERANCES): fp32 is
held to 1e-4; fp16 and int8 to what their arithmetic honestly reaches.

Report (manifest "parity"):
    {"passed": bool, "dtype": str, "tolerance": {...}, "reference": str,
     "step_vs_torch":   {"length", "batch", "max_abs", "output_scale", "max_rel", "passed"},
     "step_drift":      {"max_rel", "memory_steps"}  (an estimate for the modes whose
                         memory is longer than the check, not checked: see
                         export/modules.py step_drift; a warning when it exceeds the
                         tolerance),
     "prefill_vs_step": {"lengths", "max_rel_output", "max_rel_state", "max_abs_output",
                         "max_abs_state", "passed"},
     "slots_vs_step":   {"steps", "batch", "max_abs_output", "max_abs_state", "passed"}}

Dimension letters: B batch, L length, V outputs, S packed state, Q chunk.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from ssmstream.model import SSMNetwork, load_checkpoint
from ssmstream.runtime import Engine
from ssmstream.runtime.errors import ModelError
from ssmstream.runtime.manifest import load_manifest, sha256_file
from tqdm import tqdm

from .modules import step_drift

log = logging.getLogger(__name__)

# max error / reference scale, per export dtype. fp16/int8 measured on random models
# (d_model 8–64, 4096 steps): fp16 ~4e-4 (step) / ~2e-4 (prefill); int8 ~9e-3 (step) and up
# to ~6e-2 prefill vs step (dynamic quantization ranges differ between a [B, T] prefill
# and a [B] step). The tolerances leave ~3–10x headroom over those.
TOLERANCES = {
    "fp32": {"step_vs_torch": 1e-4, "prefill_vs_step": 1e-4},
    "fp16": {"step_vs_torch": 5e-3, "prefill_vs_step": 5e-3},
    "int8": {"step_vs_torch": 5e-2, "prefill_vs_step": 1.5e-1},
}


def random_inputs(manifest: dict, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random int64 tokens [B, L] or float32 standard-normal values [B, L, d_input]."""
    if manifest["input_kind"] == "tokens":
        return rng.integers(0, manifest["vocab_size"], size=(batch, length), dtype=np.int64)
    return rng.standard_normal((batch, length, manifest["d_input"])).astype(np.float32)


def run_steps(
    engine: Engine, inputs: np.ndarray, state: np.ndarray, progress: bool = False, every: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Feed inputs [B, L, …] one position at a time -> (outputs [B, L, V], state [B, S],
    {t: the state after t inputs} for t a multiple of `every` (none when 0))."""
    outs, states = [], {}
    for t in tqdm(range(inputs.shape[1]), desc="verify: ORT steps", disable=not progress):
        out, state = engine.step(inputs[:, t], state)
        outs.append(out)
        if every and (t + 1) % every == 0:
            states[t + 1] = state
    return np.stack(outs, axis=1), state, states


def torch_reference(net: SSMNetwork, inputs: np.ndarray, dt_scale: float) -> np.ndarray:
    """The network's convolution-mode forward in float64 with every Δ scaled: [B, L, V]."""
    net64 = copy.deepcopy(net).eval().to(torch.float64)
    with torch.no_grad():
        for ssm in net64.ssms:
            ssm.log_dt += math.log(dt_scale)
        x = torch.from_numpy(inputs)
        if x.is_floating_point():
            x = x.to(torch.float64)
        return net64(x).numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |a - ref|, that divided by max |ref|); inf when anything is non-finite."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(ref))):
        return math.inf, math.inf
    err = float(np.max(np.abs(a.astype(np.float64) - ref))) if a.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err, err / max(scale, 1e-12)


def verify_graphs(
    model_dir: str | os.PathLike,
    manifest: dict,
    net: SSMNetwork | None = None,
    steps: int = 4096,
    batch: int = 2,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> dict:
    """Run the parity checks on the graphs in model_dir as described by `manifest`.

    Args:
        net: the torch network the graphs were exported from; None skips step_vs_torch.
        steps: L, length of the long random sequence (≥ 4096 for a real check).
    Returns:
        the parity report (see the module docstring).
    """
    model_dir = Path(model_dir)
    rng = np.random.default_rng(seed)
    dtype = manifest["dtype"]
    tol = TOLERANCES[dtype]
    S = manifest["state_size"]
    graphs = manifest["graphs"]
    engine = Engine(model_dir, device="cpu", threads=threads, check_sha=False)
    Q = engine.prefill_chunk or 0
    report: dict = {
        "dtype": dtype,
        "tolerance": dict(tol),
        "reference": "torch convolution-mode forward, float64, Δ × dt_scale",
        "metric": "max |error| / max |reference|",
        "seed": seed,
    }
    x = random_inputs(manifest, batch, steps, rng)  # [B, L, …]
    zero = np.zeros((batch, S), dtype=np.float32)
    out_s, state_s, ends_s = run_steps(engine, x, zero, progress, Q)  # [B, L, V], [B, S]
    passed = True
    if net is not None:
        ref = torch_reference(net, x, manifest["dt_scale"])
        err, rel = _rel(out_s, ref)
        ok = rel <= tol["step_vs_torch"]
        report["step_vs_torch"] = {
            "length": steps,
            "batch": batch,
            "max_abs": err,
            "output_scale": float(np.max(np.abs(ref))) if np.all(np.isfinite(ref)) else math.inf,
            "max_rel": rel,
            "passed": bool(ok),
        }
        if not np.all(np.isfinite(ref)):
            report["step_vs_torch"]["error"] = (
                "the torch reference is not finite: the model diverges over this length "
                "(unstable discretization?)"
            )
        passed &= ok
        drift = step_drift(net, manifest["dt_scale"], beyond=steps)
        report["step_drift"] = {"max_rel": drift["max_rel"], "memory_steps": drift["memory"]}
        if drift["max_rel"] > tol["step_vs_torch"]:
            log.warning(
                "slow modes (memory up to %.3g steps, beyond the %d checked): over streams that "
                "long the step graph's float32 dA may drift up to ~%.1e relative from the exact "
                "recurrence (tolerance %g); the prefill graph does not (docs: README, Limits)",
                drift["memory"],
                steps,
                drift["max_rel"],
                tol["step_vs_torch"],
            )
    else:
        report["step_vs_torch"] = {"skipped": "no torch checkpoint given"}
    if "prefill" in graphs:
        rel_o, rel_s, abs_o, abs_s = [], [], [], []
        ends_p: dict = {}
        out_p, state_p = engine.prefill_unchecked(x, zero, ends_p)
        cases = [(out_p, out_s, state_p, state_s)]
        cases += [(None, None, ends_p[t], ends_s[t]) for t in ends_s if t in ends_p]
        lengths = [steps]
        # the runtime's three ways to end a prompt (Engine._prefill_span): whole chunks then
        # steps (r < Q/4), whole chunks and a padded one in one call, a padded chunk alone
        for T in (Q + 1, 2 * Q + Q // 4 + 1, Q // 2 + 3):
            xs = random_inputs(manifest, batch, T, rng)
            o1, s1, _ = run_steps(engine, xs, state_s)
            o2, s2 = engine.prefill(xs, state_s)
            cases.append((o2, o1, s2, s1))
            lengths.append(T)
        for o2, o1, s2, s1 in cases:
            if o2 is not None:
                e, r = _rel(o2, o1.astype(np.float64))
                abs_o.append(e), rel_o.append(r)
            e, r = _rel(s2, s1.astype(np.float64))
            abs_s.append(e), rel_s.append(r)
        ok = max(rel_o + rel_s) <= tol["prefill_vs_step"]
        report["prefill_vs_step"] = {
            "lengths": lengths,
            "nonzero_initial_state": lengths[1:],
            "chunk_states_checked": sum(t in ends_p for t in ends_s),
            "batch": batch,
            "max_abs_output": max(abs_o),
            "max_rel_output": max(rel_o),
            "max_abs_state": max(abs_s),
            "max_rel_state": max(rel_s),
            "passed": bool(ok),
        }
        passed &= ok
    report["slots_vs_step"] = slots_vs_step(engine, manifest, state_s, rng)
    passed &= report["slots_vs_step"]["passed"]
    report["passed"] = bool(passed)
    return report


def slots_vs_step(
    engine: Engine, manifest: dict, states: np.ndarray, rng: np.random.Generator, steps: int = 16
) -> dict:
    """The slot step on rows of a slab vs the plain step on the same states (see the module
    docstring); `states` [B, S] start the batch's rows, the slab's other rows are random."""
    B, S = states.shape
    slab = engine.new_slab(3 * B)
    others = (rng.standard_normal((3 * B, S)) * 0.1).astype(np.float32)
    for row, x in enumerate(others):
        slab.write(row, x)
    slots = rng.choice(3 * B, size=B, replace=False)  # scattered, unordered
    for row, x in zip(slots, states):
        slab.write(int(row), x)
    s, err_o, err_s = states, 0.0, 0.0
    for _ in range(steps):
        x = random_inputs(manifest, B, 1, rng)[:, 0]
        want, s = engine.step(x, s)
        got = engine.step_slots(x, slots, slab)
        d_o = np.abs(got.astype(np.float64) - want)
        d_s = np.abs(slab.read_rows(slots).astype(np.float64) - s)
        # a NaN or inf anywhere is an infinite error (Python's max would skip a NaN)
        err_o = max(err_o, float(d_o.max()) if np.isfinite(d_o).all() else np.inf)
        err_s = max(err_s, float(d_s.max()) if np.isfinite(d_s).all() else np.inf)
    rest = np.setdiff1d(np.arange(3 * B), slots)
    untouched = bool(np.array_equal(slab.read_rows(rest), others[rest]))
    return {
        "steps": steps,
        "batch": B,
        "max_abs_output": err_o,
        "max_abs_state": err_s,
        "other_rows_untouched": untouched,
        "passed": err_o == 0.0 and err_s == 0.0 and untouched,
    }


def verify_model(
    model_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None, steps: int = 4096
) -> dict:
    """Re-run the parity check of an exported model directory (sha256 of the graphs checked).

    The torch reference comes from `ckpt`, else from the checkpoint recorded in the manifest
    (when it still exists); without one only prefill_vs_step is checked.
    """
    manifest = load_manifest(model_dir)
    source = manifest.get("source")
    source = source if isinstance(source, dict) else {}  # a hand edit: no recorded checkpoint
    recorded = source.get("checkpoint")
    if ckpt is None and isinstance(recorded, str) and recorded and Path(recorded).is_dir():
        ckpt = recorded
        weights = Path(ckpt) / "model.safetensors"
        sha = source.get("weights_sha256")
        if sha and weights.is_file() and sha256_file(weights) != sha:
            raise ModelError(
                f"the checkpoint recorded in {model_dir}'s manifest, {ckpt}, has other weights "
                "now (retrained since the export): pass --ckpt with the exported weights"
            )
    net = None
    if ckpt is not None:
        net = load_checkpoint(ckpt)
        if net.cfg.to_dict() != manifest.get("model"):
            raise ModelError(
                f"checkpoint {str(ckpt)!r} does not match {model_dir}: its model config differs"
            )
    report = verify_graphs(model_dir, manifest, net, steps=steps)
    report["checkpoint"] = str(ckpt) if ckpt is not None else None
    skipped = report.get("step_vs_torch")
    if ckpt is None and isinstance(skipped, dict) and "skipped" in skipped:  # why, and what to do
        skipped["skipped"] = (
            f"the checkpoint recorded in the manifest, {recorded}, is not there any more; "
            "pass --ckpt"
            if isinstance(recorded, str) and recorded
            else "no checkpoint given or recorded in the manifest; pass --ckpt"
        )
    return report
