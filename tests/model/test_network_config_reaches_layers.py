"""The network's config reaches every layer.

`discretization` and `alpha` live only in config.json, not in the weights: a network that
built its layers with the default method or α would load a checkpoint and run its trained
parameters through another discretization, yet its forward and step would still agree with
each other (both read the same layer), so the forward-vs-step tests cannot see it. Here every
layer's (dA, dB) is compared with the config's formula evaluated by hand on the layer's stored
parameters, and its A at construction with the config's S4D init formula.

Letters: H heads, N/2 complex modes, M head width.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork


def _by_hand(ssm, method: str, alpha: float):
    """(dA [H, N/2], dB [H, N/2, M]) of the layer's stored parameters (numpy complex128)."""
    p = {k: v.detach().double().numpy() for k, v in ssm.named_parameters()}
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
    dtA = np.exp(p["log_dt"])[:, None] * A
    B = p["B"][..., 0] + 1j * p["B"][..., 1]
    if method == "zoh":
        return np.exp(dtA), ((np.exp(dtA) - 1) / A)[..., None] * B
    a = {"euler": 0.0, "bilinear": 0.5, "backward_euler": 1.0}.get(method, alpha)
    den = 1 - a * dtA
    dt = np.exp(p["log_dt"])[:, None]
    return (1 + (1 - a) * dtA) / den, (dt / den)[..., None] * B


def _init_A(init: str, N: int) -> np.ndarray:
    n = np.arange(N // 2)
    if init == "s4d-lin":
        return -0.5 + 1j * math.pi * n
    if init == "s4d-inv":
        return -0.5 + 1j * (N / math.pi) * (N / (2 * n + 1) - 1)
    return -(n + 1.0) + 0j


CONFIGS = [
    dict(discretization="bilinear"),
    dict(discretization="gbt", alpha=0.3),
    dict(discretization="gbt", alpha=0.9, init="s4d-inv"),
    dict(discretization="backward_euler", init="s4d-real"),
    dict(discretization="euler", dt_min=1e-3, dt_max=1e-2),
]


@pytest.mark.parametrize("extra", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("heads", [None, 2], ids=["siso", "multihead"])
def test_every_layer_discretizes_and_inits_as_the_config_says(extra, heads):
    torch.manual_seed(0)
    cfg = SSMConfig(vocab_size=11, d_model=8, n_layers=2, d_state=8, heads=heads, **extra)
    net = SSMNetwork(cfg).double()
    for ssm in net.ssms:
        A = (-torch.exp(ssm.log_A_real) + 1j * ssm.A_imag).detach().numpy()  # [H, N/2]
        np.testing.assert_allclose(A, np.broadcast_to(_init_A(cfg.init, 8), A.shape), rtol=1e-6)
        dt = torch.exp(ssm.log_dt).detach().numpy()
        assert ((dt >= cfg.dt_min * (1 - 1e-9)) & (dt <= cfg.dt_max * (1 + 1e-9))).all()
        with torch.no_grad():
            dA, dB, _ = ssm.discrete()
        want_dA, want_dB = _by_hand(ssm, cfg.discretization, cfg.alpha)
        np.testing.assert_allclose(dA.numpy(), want_dA, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dB.numpy(), want_dB, rtol=1e-12, atol=1e-14)


def test_a_loaded_checkpoint_runs_its_configured_discretization(tmp_path):
    """A bilinear gbt(α = 0.3) checkpoint, loaded: its output is the closed form of that
    discretization on the stored weights (differs from zoh and from α = ½ on the same ones)."""
    from ssmstream.model import load_checkpoint, save_checkpoint

    torch.manual_seed(4)
    cfg = SSMConfig(vocab_size=11, d_model=8, n_layers=1, d_state=8, discretization="gbt",
                    alpha=0.3, dt_min=0.05, dt_max=0.5)  # fmt: skip
    net = load_checkpoint(save_checkpoint(SSMNetwork(cfg), tmp_path / "ck")).double()
    ssm = net.ssms[0]
    with torch.no_grad():
        dA, dB, _ = ssm.discrete()
    want_dA, want_dB = _by_hand(ssm, "gbt", 0.3)
    np.testing.assert_allclose(dA.numpy(), want_dA, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dB.numpy(), want_dB, rtol=1e-12, atol=1e-14)
    for method, alpha in (("zoh", 0.5), ("gbt", 0.5)):  # the check can fail
        assert np.abs(dA.numpy() - _by_hand(ssm, method, alpha)[0]).max() > 1e-4
