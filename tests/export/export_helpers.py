"""Helpers shared by the tests in tests/export (import as `from export_helpers import ...`)."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime as ort
import torch
from ssmstream.model import SSMNetwork

TOKEN = dict(vocab_size=11, d_model=8, n_layers=2, d_state=8)
SIGNAL = dict(d_input=3, d_output=2, d_model=8, n_layers=1, d_state=8, heads=2,
              discretization="bilinear")  # fmt: skip
EXPORT = dict(chunk=8, max_chunks=4)  # prefill T: multiples of 8, at most 32 per call
DT_SCALE = 0.5


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_steps(step: ort.InferenceSession, x: np.ndarray, state: np.ndarray):
    """Run x [B, L, …] through the step graph -> (outputs [B, L, V], state [B, S])."""
    outs = []
    for t in range(x.shape[1]):
        out, state = step.run(None, {"input": x[:, t], "state": state})
        outs.append(out)
    return np.stack(outs, 1), state


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| (float64)."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - ref)) / np.max(np.abs(ref)))


def conv_reference(net: SSMNetwork, x: torch.Tensor, dt_scale: float = 1.0) -> torch.Tensor:
    """float64 convolution-mode forward with every Δ scaled (an independent computation)."""
    net64 = copy.deepcopy(net).to(torch.float64)
    with torch.no_grad():
        for ssm in net64.ssms:
            ssm.log_dt += math.log(dt_scale)
        return net64(x if not x.is_floating_point() else x.double())


def run_steps(step, x: torch.Tensor, state: torch.Tensor):
    """Run x [B, L, …] through a StepGraph module -> (outputs [B, L, …], state [B, S])."""
    outs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = step(x[:, t], state)
            outs.append(out)
    return torch.stack(outs, 1), state


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| of torch tensors (float64)."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
