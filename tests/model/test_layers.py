"""Tests of ssmstream.model.layers.SSM: the convolution view equals the recurrence view.

For SISO (heads=None → H = D, M = 1), multi-head (H = 4, M = 2) and MIMO (H = 1, M = D),
for every discretization, `forward` over L = 1024 equals 1024 repeated `step`s:
to 1e-9 in float64 and to F32_TOL in float32, relative to the scale of the SSM part
y − D·u (the skip term is the same code in both views and would hide errors). The layer's kernel
equals `ssm.ssm_kernel` computed element by element, its two convolution paths (explicit
kernel / mode-space scan) agree, and the inits give the A of their formulas.

Letters: B batch, L length, D d_model, H heads, M head width, N d_state (N/2 modes).
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from ssmstream.model import (
    SSMConfig,
    SSMNetwork,
    ssm,
)
from ssmstream.model.layers import SSM

L = 1024
D, N = 8, 8  # d_model, d_state (N/2 = 4 complex modes)
F64_TOL = 1e-9
# float32: forward (FFT over 2L) and 1024 sequential steps round differently. Measured max
# error relative to the SSM-part scale (these seeds): forward vs step 4e-7 … 6e-6 (largest for
# MIMO, whose SSM part is small next to D·u); float32 forward vs float64 up to 2.8e-5. Bound 1e-4.
# (float64 measures 1e-16 … 1e-14 against its 1e-9 bound.)
F32_TOL = 1e-4

SHAPES = {"siso": None, "multihead": 4, "mimo": 1}
METHODS = ("zoh", "bilinear", "backward_euler", "gbt", "euler")
# Euler is only conditionally stable: |1 + ΔA| < 1 needs Δ < 1/(1/4 + π²n²) for the
# S4D-Lin mode n (= 0.011 for n = 3); its tests draw Δ from [1e-3, 1e-2] and assert |Ā| < 1.
# "gbt" runs at α = 0.75 (A-stable for α ≥ ½).
DT_MAX = {"euler": 1e-2}


def make_layer(heads, method, seed=0, dtype=torch.float64, **kw) -> SSM:
    torch.manual_seed(seed)
    layer = SSM(
        D, N, heads, discretization=method, alpha=0.75, dt_max=DT_MAX.get(method, 0.1), **kw
    )
    return layer.to(dtype).eval()


def run_steps(layer: SSM, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over u [B, L, D] -> (y [B, L, D], final state)."""
    x = layer.initial_state(u.shape[0])
    ys = []
    for l in range(u.shape[1]):
        y, x = layer.step(u[:, l], x)
        ys.append(y)
    return torch.stack(ys, 1), x


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |a − b| / max |scale| (scale defaults to b)."""
    return float((a - b).abs().max() / (b if scale is None else scale).abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_repeated_steps(shape, method):
    layer64 = make_layer(SHAPES[shape], method)
    layer32 = copy.deepcopy(layer64).float()
    dA, _, _ = layer64.discrete()
    assert dA.abs().max() < 1  # stable: the comparison is over a decaying, not exploding, kernel
    u = torch.randn(2, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y_conv = layer64(u)
        y_step, _ = run_steps(layer64, u)
        ssm_part = y_conv - u * layer64.D  # [B, L, D]: what the SSM itself adds
        err64 = rel_err(y_step, y_conv, ssm_part)
        y_conv32 = layer32(u.float())
        y_step32, _ = run_steps(layer32, u.float())
        err32 = rel_err(y_step32.double(), y_conv32.double(), ssm_part)
        err32_vs64 = rel_err(y_conv32.double(), y_conv, ssm_part)
    assert y_conv.shape == (2, L, D) and y_conv32.dtype == torch.float32
    assert ssm_part.abs().max() > 1e-2  # a real signal, not a vanishing one
    assert err64 < F64_TOL, f"float64 forward vs step: {err64:.2e}"
    assert err32 < F32_TOL, f"float32 forward vs step: {err32:.2e}"
    # and float32 is float32-accurate against the float64 computation
    assert err32_vs64 < F32_TOL, f"float32 vs float64 forward: {err32_vs64:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_a_layer_discretizes_with_its_own_method_alpha_and_dt_scale(method):
    """discrete() from the raw parameters by hand: the layer's method and GBT alpha and
    the dt_scale reach ssm.discretize (forward and step both read discrete(), so their
    agreement alone cannot show a wrong alpha)."""
    torch.manual_seed(0)
    layer = SSM(4, 8, None, "s4d-lin", method, alpha=0.75).double()
    A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag).unsqueeze(-1)
    dt = torch.exp(layer.log_dt)[:, None, None] * 1.5
    B = torch.view_as_complex(layer.B)
    dA, dB = ssm.discretize(A, B, dt, method, alpha=0.75)
    got_dA, got_dB, _ = layer.discrete(dt_scale=1.5)
    torch.testing.assert_close(got_dA, dA.squeeze(-1))
    torch.testing.assert_close(got_dB, dB)
    if method == "gbt":  # and alpha 0.75 is not the bilinear 0.5
        other, _ = ssm.discretize(A, B, dt, "gbt", alpha=0.5)
        assert (got_dA - other.squeeze(-1)).abs().max() > 1e-6


@pytest.mark.parametrize("init", ["s4d-inv", "s4d-real"])
def test_forward_equals_steps_for_other_inits(init):
    layer = make_layer(None, "zoh", init=init)
    u = torch.randn(1, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        y = layer(u)
        assert rel_err(run_steps(layer, u)[0], y, y - u * layer.D) < F64_TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_ssm_kernel_elementwise(shape):
    layer = make_layer(SHAPES[shape], "bilinear")
    H, M, Lk = layer.heads, layer.M, 64
    with torch.no_grad():
        K = layer.kernel(Lk)  # [H, M, M, L]
        dA, dB, C = layer.discrete()  # [H, N/2], [H, N/2, M], [H, M, N/2]
    assert K.shape == (H, M, M, Lk)
    for h in range(H):
        for p in range(M):
            for m in range(M):
                ref = 2 * ssm.ssm_kernel(dA[h], dB[h, :, m], C[h, p], Lk).real
                torch.testing.assert_close(K[h, p, m], ref, rtol=1e-12, atol=1e-13)
    for p, m in {(0, 0), (M - 1, 0), (0, M - 1)}:  # one entry alone: the same numbers
        with torch.no_grad():
            one = layer.kernel(Lk, entry=(p, m))
        torch.testing.assert_close(one, K[:, p, m], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("heads", [None, 4, 2, 1])
def test_kernel_and_mode_paths_agree(heads):
    layer = make_layer(heads, "zoh")
    u = torch.randn(2, 300, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    uh = u.transpose(1, 2).reshape(2, layer.heads, layer.M, 300)  # [B, H, M, L]
    with torch.no_grad():
        a, b = layer.conv_kernel_path(uh), layer.conv_mode_path(uh)
    assert rel_err(a, b) < 1e-12
    assert layer.uses_mode_path == (layer.M**2 > N // 2)  # MIMO (M = 8): modes; SISO: kernel


def test_final_state_of_steps_equals_mode_scan_state():
    """The last state of the recurrence is the scan's state at l = L-1 (MIMO)."""
    layer = make_layer(1, "zoh")
    u = torch.randn(2, 200, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, x = run_steps(layer, u)
        dA, dB, _ = layer.discrete()
        v = torch.einsum("hnm,blm->bhnl", dB, u.to(dB.dtype))  # H = 1: [B, 1, N/2, L]
        X = ssm.diagonal_scan(dA, v)
    torch.testing.assert_close(x, X[..., -1], rtol=1e-11, atol=1e-12)


def test_mimo_forward_is_fast_at_long_length():
    """MIMO conv mode is O(L log L): L = 8192 with D = 64 in well under a few seconds, and no
    M²·L kernel is built (the kernel path would hold 64·64·8192 complex numbers)."""
    torch.manual_seed(0)
    layer = SSM(64, 16, heads=1).eval()
    assert layer.uses_mode_path
    layer.kernel = None  # the mode path must not build the kernel
    u = torch.randn(1, 8192, 64, dtype=torch.float32)
    with torch.inference_mode():
        layer(u[:, :64])  # warm-up
        t0 = time.perf_counter()
        y = layer(u)
        dt = time.perf_counter() - t0
    assert y.shape == u.shape and torch.isfinite(y).all()
    assert dt < 3.0, f"MIMO forward L=8192 took {dt:.2f}s"


# --- parameters and inits ----------------------------------------------------------------------


def test_inits_give_the_formula_values():
    N2 = N // 2
    expect = {
        "s4d-lin": [complex(-0.5, math.pi * n) for n in range(N2)],
        "s4d-inv": [complex(-0.5, N / math.pi * (N / (2 * n + 1) - 1)) for n in range(N2)],
        "s4d-real": [complex(-(n + 1), 0.0) for n in range(N2)],
    }
    for init, values in expect.items():
        layer = SSM(D, N, heads=2, init=init)
        A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag).detach()  # [H, N/2]
        want = torch.tensor(values, dtype=torch.complex64).expand(2, N2)
        torch.testing.assert_close(A, want, rtol=1e-6, atol=1e-5)
    # s4d-inv by hand at N = 8, n = 0: imag = 8/π · 7
    assert SSM(D, N, init="s4d-inv").A_imag[0, 0].item() == pytest.approx(56 / math.pi, rel=1e-6)


def test_parameter_shapes_dt_range_and_state():
    torch.manual_seed(5)
    layer = SSM(12, 6, heads=3, dt_min=0.01, dt_max=0.02)
    H, M, N2 = 3, 4, 3
    assert layer.log_A_real.shape == (H, N2) and layer.B.shape == (H, N2, M, 2)
    assert layer.C.shape == (H, M, N2, 2) and layer.D.shape == (12,) and layer.log_dt.shape == (H,)
    dt = layer.log_dt.exp()
    assert ((dt >= 0.01 * (1 - 1e-6)) & (dt <= 0.02 * (1 + 1e-6))).all()
    x = layer.initial_state(5)
    assert x.shape == (5, H, N2) and x.dtype == torch.complex64 and not x.any()
    assert layer.double().initial_state(1).dtype == torch.complex128
    # on the parameters' device ("meta" stands for a GPU here: no data, no CUDA needed)
    assert layer.to("meta").initial_state(2).device == torch.device("meta")
    assert {id(p) for p in layer.ssm_parameters()} == {
        id(layer.log_A_real),
        id(layer.A_imag),
        id(layer.log_dt),
        id(layer.B),
    }


def test_step_keeps_batch_rows_independent():
    layer = make_layer(4, "zoh")
    u = torch.randn(3, 20, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y_all, _ = run_steps(layer, u)
        y_one, _ = run_steps(layer, u[1:2])
    torch.testing.assert_close(y_all[1:2], y_one, rtol=1e-13, atol=1e-14)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"d_model": 0}, "d_model"),
        ({"d_state": 7}, "d_state"),
        ({"d_state": 0}, "d_state"),
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"init": "hippo"}, "init"),
        ({"discretization": "rk4"}, "discretization"),
        ({"discretization": "gbt", "alpha": -0.1}, "alpha"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": -1e-3}, "dt_min"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_max"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
    args = {"d_model": 8, "d_state": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        SSM(**args)


def test_bad_shapes_name_the_argument():
    layer = SSM(8, 4, heads=2)
    with pytest.raises(ValueError, match=r"u must be \[B, L >= 1, 8\]"):
        layer(torch.zeros(4, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"u must be \[B, L >= 1, 8\], got shape \(1, 5, 7\)"):
        layer(torch.zeros(1, 5, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="u must be"):
        layer(torch.zeros(1, 0, 8, dtype=torch.float32))
    x = layer.initial_state(2)
    with pytest.raises(ValueError, match=r"u must be \[B, 8\]"):
        layer.step(torch.zeros(2, 1, 8, dtype=torch.float32), x)
    with pytest.raises(ValueError, match=r"x must be complex \[3, 2, 2\]"):
        layer.step(torch.zeros(3, 8, dtype=torch.float32), x)
    with pytest.raises(ValueError, match="x must be complex"):
        layer.step(torch.zeros(2, 8, dtype=torch.float32), x.real.contiguous())


def test_layer_accepts_dt_min_equal_dt_max_and_uses_that_dt():
    layer = SSM(4, 4, dt_min=0.01, dt_max=0.01)
    torch.testing.assert_close(layer.log_dt.exp(), torch.full((4,), 0.01), rtol=1e-6, atol=0)
    cfg = SSMConfig(vocab_size=4, d_model=4, d_state=4, dt_min=0.01, dt_max=0.01)
    assert SSMNetwork(cfg).cfg.dt_max == 0.01


def test_layer_refuses_an_infinite_dt_max_like_the_config_does():
    """An infinite Δ made every output NaN; SSMConfig already refused it."""
    with pytest.raises(ValueError, match=r"need 1.18e-38 <= dt_min <= dt_max .*dt_max=inf"):
        SSM(4, 4, dt_max=math.inf)


F64 = torch.float64


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler", "backward_euler"])
def test_alpha_outside_0_1_is_ignored_by_non_gbt_methods(method):
    torch.manual_seed(0)
    a = SSM(4, 4, discretization=method, alpha=5.0)
    torch.manual_seed(0)
    b = SSM(4, 4, discretization=method)
    for x, y in zip(a.discrete(), b.discrete()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 5.0"):
        SSM(4, 4, discretization="gbt", alpha=5.0)


def test_multihead_b_and_c_init_have_variance_one_over_m():
    torch.manual_seed(1)
    M = 16
    layer = SSM(64, 512, heads=4)  # M = 16, 4 * 256 * 16 = 16384 complex draws each
    B = torch.view_as_complex(layer.B.detach())
    C = torch.view_as_complex(layer.C.detach())
    assert B.abs().pow(2).mean().item() == pytest.approx(1 / M, rel=0.05)
    assert C.abs().pow(2).mean().item() == pytest.approx(1 / M, rel=0.05)
    siso = SSM(4, 4)
    assert torch.equal(siso.B.detach(), torch.view_as_real(torch.ones(4, 2, 1, dtype=torch.cfloat)))


@pytest.mark.parametrize("heads", [None, 1, 3])
def test_zero_d_model_is_refused_naming_d_model(heads):
    with pytest.raises(ValueError, match=r"^d_model must be positive, got 0$"):
        SSM(0, 4, heads=heads)
