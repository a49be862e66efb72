"""The gating identity: a sigmoid gate is a backward-Euler step of a leaky integrator.

The gated recurrence (GRU-style, with input-dependent or learned gate logit z)

    x_t = (1 − σ(z)) x_{t−1} + σ(z) u_t

is the backward-Euler discretization of  ẋ = −x + u  (A = −1, B = 1) with step Δ = e^z:

    Ā = (1 − ΔA)⁻¹ = 1 / (1 + e^z) = 1 − σ(z),    B̄ = (1 − ΔA)⁻¹ Δ B = e^z / (1 + e^z) = σ(z).

The gate is computed here with `torch.sigmoid`, the discretization with
`ssmstream.model.ssm.discretize(..., "backward_euler")`: two independent computations. In
the layers Δ is `exp(SSM.log_dt)`, so z is exactly the stored `log_dt`; the last test runs an
`SSM` layer (S4D-Real init with one mode, so A = −1; SISO, so B = 1) and checks that its
state follows the gated recurrence with z = log_dt.

Letters: H channels, L length.
"""

from __future__ import annotations

import torch
from ssmstream.model import ssm
from ssmstream.model.layers import SSM

F64 = torch.float64


def _gated(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ(z)) x_{t−1} + σ(z) u_t from x_{−1} = 0. u: [H, L], z: [H] -> x [H, L]."""
    g = torch.sigmoid(z)  # [H]
    x, xs = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        x = (1 - g) * x + g * u[:, t]
        xs.append(x)
    return torch.stack(xs, 1)


def test_backward_euler_of_a_leaky_integrator_is_the_sigmoid_gate():
    z = torch.linspace(-12.0, 12.0, 97, dtype=F64)  # [H]: gates from ~6e-6 to ~1 - 6e-6
    A = torch.full_like(z, -1.0).to(torch.complex128)  # ẋ = −x + u
    B = torch.ones_like(A)
    dA, dB = ssm.discretize(A, B, torch.exp(z), "backward_euler")
    torch.testing.assert_close(dA.real, 1 - torch.sigmoid(z), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dB.real, torch.sigmoid(z), rtol=1e-12, atol=1e-15)
    assert dA.imag.abs().max() == 0 and dB.imag.abs().max() == 0


def test_the_identity_needs_backward_euler_and_step_e_to_the_z():
    """Neither another discretization nor another step gives the gate (the test can fail)."""
    z = torch.tensor([-1.0, 0.3, 2.0], dtype=F64)
    A = torch.full_like(z, -1.0).to(torch.complex128)
    B = torch.ones_like(A)
    gate = torch.sigmoid(z)
    for method in ("euler", "bilinear", "zoh"):
        _, dB = ssm.discretize(A, B, torch.exp(z), method)
        assert (dB.real - gate).abs().max() > 1e-3, method
    _, dB = ssm.discretize(A, B, z.abs(), "backward_euler")  # Δ = |z| instead of e^z
    assert (dB.real - gate).abs().max() > 1e-3


def test_an_ssm_layer_with_a_minus_one_runs_the_gated_recurrence_with_z_log_dt():
    H, L = 5, 40
    layer = SSM(H, d_state=2, init="s4d-real", discretization="backward_euler").to(F64)
    with torch.no_grad():
        layer.log_dt.copy_(torch.tensor([-4.0, -1.0, 0.0, 1.5, 3.0], dtype=F64))  # z per channel
    A = -torch.exp(layer.log_A_real) + 1j * layer.A_imag  # [H, 1]: one mode per channel
    torch.testing.assert_close(A, torch.full((H, 1), -1.0 + 0j, dtype=torch.complex128))
    u = torch.randn(1, L, H, generator=torch.Generator().manual_seed(0), dtype=F64)  # [1, L, H]
    x, xs = layer.initial_state(1), []
    with torch.no_grad():
        for t in range(L):
            _, x = layer.step(u[:, t], x)  # x: [1, H, 1] complex
            xs.append(x[0, :, 0])
    states = torch.stack(xs, 1)  # [H, L]
    expected = _gated(u[0].T, layer.log_dt.detach())  # [H, L]
    torch.testing.assert_close(states.real, expected, rtol=1e-12, atol=1e-12)
    assert states.imag.abs().max() == 0
