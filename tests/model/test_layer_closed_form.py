"""The SSM layer against a closed form of its raw parameters.

The layer tests compare `forward` with `step`, but both read the same `SSM.discrete()`, and
`discrete()` is checked against `ssm.discretize` for dA and dB only: how the stored C enters the
output (C, not its conjugate) was checked by nothing. Here the layer's outputs are computed a
second, independent way — numpy, straight from the stored tensors (log_A_real, A_imag, log_dt,
B and C as re/im pairs, D), with the discretization formulas written out and the recurrence run
by hand — and both views of the layer must equal it.

Also: SSMConfig accepts a GBT α of 0 and 1 (the closed interval), so the layer must too, and
gbt(0) / gbt(1) must be forward / backward Euler.

Letters: B batch, L length, D d_model, H heads, M head width, N/2 complex modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ssmstream.model.layers import SSM


def _discretize_np(A, dt, B, method, alpha):
    """dA [H, N/2], dB [H, N/2, M] by the textbook formulas (numpy complex128)."""
    dtA = dt[:, None] * A  # [H, N/2]
    if method == "zoh":
        dA = np.exp(dtA)
        return dA, ((dA - 1) / A)[..., None] * B
    a = {"euler": 0.0, "bilinear": 0.5, "backward_euler": 1.0}.get(method, alpha)
    den = 1 - a * dtA
    return (1 + (1 - a) * dtA) / den, (dt[:, None] / den)[..., None] * B


def closed_form(layer: SSM, u: np.ndarray) -> np.ndarray:
    """y [B, L, D] of the layer from its stored parameters:
    x_t = dA x_{t-1} + dB u_t,  y_t = 2 Re(C x_t) + D u_t,  per head, from x = 0."""
    p = {k: v.detach().double().numpy() for k, v in layer.named_parameters()}
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]  # [H, N/2]
    dt = np.exp(p["log_dt"])  # [H]
    B = p["B"][..., 0] + 1j * p["B"][..., 1]  # [H, N/2, M]
    C = p["C"][..., 0] + 1j * p["C"][..., 1]  # [H, M(p), N/2]
    dA, dB = _discretize_np(A, dt, B, layer.discretization, layer.alpha)
    Bsz, L, D = u.shape
    H, M = layer.heads, layer.M
    uh = u.reshape(Bsz, L, H, M)  # channel h·M + m
    x = np.zeros((Bsz, H, dA.shape[1]), dtype=complex)
    y = np.zeros((Bsz, L, H, M))
    for t in range(L):
        x = dA * x + np.einsum("hnm,bhm->bhn", dB, uh[:, t])
        y[:, t] = 2 * np.einsum("hpn,bhn->bhp", C, x).real
    return y.reshape(Bsz, L, D) + u * p["D"]


@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
@pytest.mark.parametrize("heads", [None, 2, 1], ids=["siso", "multihead", "mimo"])
def test_layer_output_is_the_closed_form_of_its_stored_parameters(heads, method):
    torch.manual_seed(0)
    layer = SSM(8, 8, heads, discretization=method, alpha=0.3).double().eval()
    u = torch.randn(2, 96, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = closed_form(layer, u.numpy())
    ssm_scale = np.abs(ref - u.numpy() * layer.D.detach().numpy()).max()
    assert ssm_scale > 1e-2  # the SSM part is a real signal
    with torch.no_grad():
        y_conv = layer(u).numpy()
        x, ys = layer.initial_state(2), []
        for t in range(u.shape[1]):
            y, x = layer.step(u[:, t], x)
            ys.append(y)
        y_step = torch.stack(ys, 1).numpy()
    assert np.abs(y_conv - ref).max() / ssm_scale < 1e-9
    assert np.abs(y_step - ref).max() / ssm_scale < 1e-9


@pytest.mark.parametrize("alpha, named", [(0.0, "euler"), (1.0, "backward_euler")])
def test_gbt_layer_takes_alpha_at_both_ends_and_is_the_named_method(alpha, named):
    """SSMConfig takes α in [0, 1]; so does the layer, and gbt(α) is its named member."""
    torch.manual_seed(0)
    gbt = SSM(4, 4, discretization="gbt", alpha=alpha, dt_max=1e-2).double()
    torch.manual_seed(0)
    ref = SSM(4, 4, discretization=named, dt_max=1e-2).double()
    with torch.no_grad():
        for got, want in zip(gbt.discrete(), ref.discrete()):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
