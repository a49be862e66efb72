"""ZOH of a mode whose dt·A is 0 (Re A underflowed to 0 with Im A = 0, or dt·A below the
smallest float): the integrator Ā = 1, B̄ = dt·B, as the dense Van Loan form gives for the
same singular diagonal, not 0 / 0 = NaN."""

from __future__ import annotations

import torch
from ssmstream.model import ssm
from ssmstream.model.layers import SSM


def test_diagonal_zoh_of_a_zero_mode_equals_the_dense_van_loan_form():
    A = torch.tensor([0j, -0.5 + 2j], dtype=torch.complex128)  # [N]
    B = torch.tensor([1 + 0j, 2 - 1j], dtype=torch.complex128)  # [N]
    dA, dB = ssm.discretize(A, B, torch.tensor(0.1, dtype=torch.float64), "zoh")
    dA_ref, dB_ref = ssm.discretize_dense(torch.diag(A), B[:, None], 0.1, "zoh")
    torch.testing.assert_close(dA, torch.diagonal(dA_ref), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dB, dB_ref[:, 0], rtol=1e-12, atol=1e-14)


def test_float32_zoh_where_dt_times_a_underflows_is_dt_times_b():
    A = torch.tensor([-1e-40 + 0j], dtype=torch.complex64)  # dt·A = -1e-43: below float32
    B = torch.tensor([1 + 0j], dtype=torch.complex64)
    dA, dB = ssm.discretize(A, B, torch.tensor(1e-3), "zoh")
    torch.testing.assert_close(dA, torch.ones_like(dA))
    torch.testing.assert_close(dB, 1e-3 * B)


def test_a_layer_with_a_zero_mode_trains_with_finite_outputs_and_gradients():
    """s4d-real starts with Im A = 0; a mode whose Re A underflows is an integrator: its
    convolution equals its recurrence and the gradient is finite."""
    torch.manual_seed(0)
    layer = SSM(2, d_state=4, init="s4d-real").double()
    with torch.no_grad():
        layer.log_A_real[:, 0] = -1000.0  # exp underflows: Re A = 0
    u = torch.randn(1, 6, 2, dtype=torch.float64)
    y = layer(u)
    x, steps = layer.initial_state(1), []
    for l in range(6):
        out, x = layer.step(u[:, l], x)
        steps.append(out)
    torch.testing.assert_close(y, torch.stack(steps, 1), rtol=1e-10, atol=1e-12)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
