"""Δ rescaling: a model trained on continuous signals sampled at rate r runs on the same
signals sampled at 2r (and 4r) with Δ/2 (Δ/4) and keeps its error; unscaled it does not.

The task (model/data.py, target "lowpass") is the continuous-time system
y' = (u − y)/τ, so its target does not depend on the sampling rate. Resampling by c is
absorbed by Δ → Δ/c (ssm.rescale_dt) with no retraining: the network's only
time-mixing part is the SSM, a discretized continuous system.

Measured on 64 held-out signals (seeds 0–2, 120 steps, d_model 16, 2 layers, N = 16,
r = 8, τ = 1, T = 32; target power ≈ 0.17):
    MSE at r                         0.0027–0.0072
    at 2r with Δ/2: × MSE at r       1.03–1.08     → bound ≤ 1.3
    at 2r unscaled: × rescaled MSE   5.4–11.7      → bound ≥ 3
    at 4r with Δ/4: × MSE at r       1.07–1.21     → bound ≤ 1.6
    at 4r unscaled: × rescaled MSE   18–36         → bound ≥ 8
    ‖out_2r[::2] − out_r‖² / power   0.0020–0.0029 → bound ≤ 0.01 (unscaled: 69–121 × larger,
                                                      bound ≥ 20 ×)
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from ssmstream.model import SSMNetwork
from ssmstream.model.data import SignalConfig, signal_batch
from ssmstream.model.ssm import rescale_dt
from ssmstream.model.train import TrainConfig, default_model_config, fit

RATE = 8.0
SIGNAL = SignalConfig(rate=RATE, duration=32, target="lowpass", tau=1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SSMNetwork:
    model = default_model_config(
        "signal", d_model=16, n_layers=2, d_state=16, dt_min=0.01, dt_max=0.5
    )
    cfg = TrainConfig(
        task="signal",
        signal=SIGNAL,
        out=str(tmp_path_factory.mktemp("rescale") / "ckpt"),
        batch_size=16,
        steps=120,
        warmup_steps=10,
        lr=5e-3,
        ssm_lr=5e-3,
        eval_every=120,
        progress=False,
        threads=1,
    )
    return fit(model, cfg).net.double()


@contextlib.contextmanager
def dt_rescaled(net: SSMNetwork, factor: float):
    """Inputs at `factor`× the training rate: every layer's Δ → Δ / factor, restored after."""
    saved = [layer.log_dt.data.clone() for layer in net.ssms]
    for layer in net.ssms:
        layer.log_dt.data = torch.log(rescale_dt(torch.exp(layer.log_dt.data), factor))
    try:
        yield net
    finally:
        for layer, log_dt in zip(net.ssms, saved):
            layer.log_dt.data = log_dt


@torch.no_grad()
def _run(net: SSMNetwork, rate: float, dt_factor: float):
    """Model output, target and MSE on 64 fixed held-out signals sampled at `rate`."""
    cfg = dataclasses.replace(SIGNAL, rate=rate)
    u, y = signal_batch(cfg, 64, torch.Generator().manual_seed(12345))
    with dt_rescaled(net, dt_factor):
        out = net(u.double())
    return out, y.double(), ((out - y.double()) ** 2).mean().item()


def test_rescaled_dt_keeps_the_error(trained):
    _, y, mse_r = _run(trained, RATE, 1.0)
    assert mse_r < 0.1 * y.pow(2).mean().item()  # the model did learn the filter
    _, _, mse_2r = _run(trained, 2 * RATE, 2.0)
    _, _, mse_2r_unscaled = _run(trained, 2 * RATE, 1.0)
    assert mse_2r < 1.3 * mse_r, (mse_r, mse_2r)
    assert mse_2r_unscaled > 3 * mse_2r, (mse_2r, mse_2r_unscaled)
    _, _, mse_4r = _run(trained, 4 * RATE, 4.0)
    _, _, mse_4r_unscaled = _run(trained, 4 * RATE, 1.0)
    assert mse_4r < 1.6 * mse_r, (mse_r, mse_4r)
    assert mse_4r_unscaled > 8 * mse_4r, (mse_4r, mse_4r_unscaled)


def test_rescaled_outputs_match_the_original_samples(trained):
    """Every other output at 2r with Δ/2 is (nearly) the output at r on the same signal."""
    out_r, y, _ = _run(trained, RATE, 1.0)
    out_2r, _, _ = _run(trained, 2 * RATE, 2.0)
    out_2r_unscaled, _, _ = _run(trained, 2 * RATE, 1.0)
    gap = (out_2r[:, ::2] - out_r).pow(2).mean().item()
    gap_unscaled = (out_2r_unscaled[:, ::2] - out_r).pow(2).mean().item()
    power = y.pow(2).mean().item()
    assert gap < 0.01 * power, (gap, power)
    assert gap_unscaled > 20 * gap, (gap, gap_unscaled)
