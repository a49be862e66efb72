"""The export-only torch modules (real arithmetic) against the network's own two views.

StepGraph run recurrently and PrefillGraph run chunk-wise must both equal the network's
convolution-mode forward (float64), for every discretization and head layout, from zero
and non-zero states, and with Δ scaled.
"""

from __future__ import annotations

import math

import pytest
import torch
from export_helpers import conv_reference, rel, run_steps
from ssmstream.export.modules import PrefillGraph, PrefillSSM, StepGraph
from ssmstream.model import SSMConfig, SSMNetwork

TOL = 1e-4  # max |error| / max |reference| in float32


def make_net(seed: int = 0, **kw) -> SSMNetwork:
    torch.manual_seed(seed)
    base = dict(d_model=8, n_layers=2, d_state=8)
    if "d_input" not in kw:
        base["vocab_size"] = 13
    return SSMNetwork(SSMConfig(**{**base, **kw})).eval()


def inputs(net: SSMNetwork, B: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = net.cfg
    if cfg.input_kind == "tokens":
        return torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    return torch.randn(B, L, cfg.d_input, generator=g)


DISCRETIZATIONS = [
    dict(discretization="zoh"),
    dict(discretization="bilinear"),
    dict(discretization="backward_euler"),
    dict(discretization="gbt", alpha=0.3),
    # forward Euler is only stable for small Δ·|A|: keep Δ small
    dict(discretization="euler", dt_min=1e-3, dt_max=1e-2),
]


@pytest.mark.parametrize("disc", DISCRETIZATIONS, ids=lambda d: d["discretization"])
def test_step_and_prefill_equal_conv_forward_siso_tokens(disc):
    net = make_net(**disc)
    x = inputs(net, B=2, L=192)
    ref = conv_reference(net, x)
    state0 = torch.zeros(2, net.cfg.state_size)
    y_step, s_step = run_steps(StepGraph(net), x, state0)
    with torch.no_grad():
        y_pre, s_pre, _ = PrefillGraph(net, chunk=16, max_chunks=12)(x, state0)
    assert rel(y_step, ref) < TOL
    assert rel(y_pre, ref) < TOL
    assert rel(s_pre, s_step) < TOL


@pytest.mark.parametrize("heads", [None, 2, 1], ids=["siso", "multihead", "mimo"])
@pytest.mark.parametrize("mode_path", [False, True], ids=["kernel", "modes"])
def test_head_layouts_continuous_inputs(heads, mode_path):
    net = make_net(seed=3, d_input=3, d_output=2, heads=heads)
    x = inputs(net, B=3, L=128)
    ref = conv_reference(net, x)
    state0 = torch.zeros(3, net.cfg.state_size)
    y_step, s_step = run_steps(StepGraph(net), x, state0)
    pre = PrefillGraph(net, chunk=16, max_chunks=8, mode_path=mode_path)
    with torch.no_grad():
        y_pre, s_pre, _ = pre(x, state0)
    assert rel(y_step, ref) < TOL
    assert rel(y_pre, ref) < TOL
    assert rel(s_pre, s_step) < TOL


@pytest.mark.parametrize("T", [16, 48, 128])
@pytest.mark.parametrize("heads", [None, 4])
def test_prefill_from_nonzero_state_equals_steps(T, heads):
    net = make_net(seed=5, heads=heads)
    step = StepGraph(net)
    warm, state = run_steps(step, inputs(net, 2, 37, seed=7), torch.zeros(2, net.cfg.state_size))
    assert state.abs().max() > 0.1  # a real, non-zero starting state
    x = inputs(net, 2, T, seed=8)
    y_step, s_step = run_steps(step, x, state)
    with torch.no_grad():
        y_pre, s_pre, _ = PrefillGraph(net, chunk=16, max_chunks=8)(x, state)
    assert rel(y_pre, y_step) < TOL
    assert rel(s_pre, s_step) < TOL


@pytest.mark.parametrize("heads", [None, 2, 1], ids=["siso", "multihead", "mimo"])
@pytest.mark.parametrize("mode_path", [False, True], ids=["kernel", "modes"])
@pytest.mark.parametrize("T", [1, 5, 16, 37, 47, 48])
def test_a_padded_last_chunk_gives_the_state_after_the_real_inputs(T, heads, mode_path):
    """Inputs padded to whole chunks (garbage after the real T) with `length` = T: the outputs
    of the real inputs and the final state equal T steps from a non-zero state; without
    `length` (or with a whole last chunk) the graph is the plain one."""
    net = make_net(seed=11, d_input=3, d_output=2, heads=heads)
    step = StepGraph(net)
    _, state = run_steps(step, inputs(net, 2, 29, seed=12), torch.zeros(2, net.cfg.state_size))
    x = inputs(net, 2, T, seed=13)
    y_step, s_step = run_steps(step, x, state)
    Q = 16
    padded = torch.cat([x, 100 * inputs(net, 2, -T % Q, seed=14)], 1)  # large garbage after T
    pre = PrefillGraph(net, chunk=Q, max_chunks=4, mode_path=mode_path)
    with torch.no_grad():
        y_pre, s_pre, ends = pre(padded, state, torch.tensor(T))
        y_all, s_all, ends_all = pre(padded, state)  # no length: every input is real
    assert rel(y_pre[:, :T], y_step) < TOL
    assert rel(s_pre, s_step) < TOL
    assert torch.equal(y_pre, y_all) and torch.equal(ends, ends_all)  # only state_out differs
    if T % Q == 0:
        assert torch.equal(s_pre, s_all)  # a whole last chunk: the carry's own S_n, unchanged
    else:
        assert rel(s_all, s_step) > 1e-2  # the padding is not part of the stream


def test_step_equals_network_step_on_packed_state():
    """The export module's packed state is the network's pack_state of its complex state."""
    net = make_net(seed=2, heads=2)
    x = inputs(net, 2, 20)
    states = net.initial_state(2)
    packed = torch.zeros(2, net.cfg.state_size)
    step = StepGraph(net)
    with torch.no_grad():
        for t in range(20):
            ref, states = net.step(x[:, t], states)
            out, packed = step(x[:, t], packed)
            assert rel(out, ref) < TOL
    assert rel(packed, net.pack_state(states)) < TOL


def test_dt_scale_matches_scaled_torch_model():
    net = make_net(seed=4)
    x = inputs(net, 2, 96)
    s = 0.37
    ref = conv_reference(net, x, dt_scale=s)
    state0 = torch.zeros(2, net.cfg.state_size)
    y, _ = run_steps(StepGraph(net, dt_scale=s), x, state0)
    with torch.no_grad():
        y_pre, _, _ = PrefillGraph(net, dt_scale=s, chunk=16, max_chunks=6)(x, state0)
    assert rel(y, ref) < TOL
    assert rel(y_pre, ref) < TOL
    assert rel(y, conv_reference(net, x)) > 1e-3  # the scale really changed the function


def test_modules_hold_no_complex_tensors():
    net = make_net(heads=2)
    for module in (StepGraph(net), PrefillGraph(net, chunk=8, max_chunks=2)):
        for name, t in list(module.named_buffers()) + list(module.named_parameters()):
            assert not t.is_complex(), name


def test_fp16_variant_keeps_state_float32():
    net = make_net()
    x = inputs(net, 2, 64)
    state0 = torch.zeros(2, net.cfg.state_size)
    y, s = run_steps(StepGraph(net, dtype="fp16"), x, state0)
    with torch.no_grad():
        y_pre, s_pre, _ = PrefillGraph(net, dtype="fp16", chunk=16, max_chunks=4)(x, state0)
    for t in (y, s, y_pre, s_pre):
        assert t.dtype == torch.float32
    ref = conv_reference(net, x)
    assert rel(y, ref) < 5e-3 and rel(y_pre, ref) < 5e-3
    assert rel(s_pre, s) < 5e-3


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        PrefillGraph(make_net(), chunk=12)


@pytest.mark.parametrize("mode_path", [False, True], ids=["kernel", "modes"])
def test_a_mode_that_decays_to_exactly_zero_in_one_step(mode_path):
    """A mode with Δ·Re A = -1000 has dA = exp(-1000) = 0 even in float64. Its powers are
    dA^0 = 1 and 0 after: the prefill's tables (built from log|dA|) stay finite and equal
    the steps and the network's own forward."""
    net = make_net(seed=3, heads=2)
    with torch.no_grad():
        for ssm in net.ssms:
            ssm.log_A_real[0, 0] = math.log(1000.0) - ssm.log_dt[0]  # Δ·|Re A| = 1000
    step = StepGraph(net)
    _, state = run_steps(step, inputs(net, 2, 19, seed=4), torch.zeros(2, net.cfg.state_size))
    x = inputs(net, 2, 32, seed=5)
    y_step, s_step = run_steps(step, x, state)
    with torch.no_grad():
        y_pre, s_pre, _ = PrefillGraph(net, chunk=16, max_chunks=4, mode_path=mode_path)(x, state)
        y0, _, _ = PrefillGraph(net, chunk=16, max_chunks=4, mode_path=mode_path)(
            x, torch.zeros_like(state)
        )
    assert torch.isfinite(y_pre).all() and torch.isfinite(s_pre).all()
    assert rel(y_pre, y_step) < TOL and rel(s_pre, s_step) < TOL
    assert rel(y0, conv_reference(net, x)) < TOL


def values_net(**kw) -> SSMNetwork:
    torch.manual_seed(0)
    cfg = dict(vocab_size=None, d_input=3, d_output=2, d_model=8, n_layers=2, d_state=4)
    return SSMNetwork(SSMConfig(**{**cfg, **kw})).eval()


def test_fp16_step_graph_takes_float32_values():
    """A continuous-input fp16 graph takes float32 inputs (cast to fp16 inside) and
    computes what the fp32 graph does, to fp16 precision."""
    net = values_net()
    x = torch.randn(2, 3)
    state = torch.zeros(2, net.cfg.state_size)
    with torch.no_grad():
        y16, s16 = StepGraph(net, dtype="fp16")(x, state)
        y32, s32 = StepGraph(net, dtype="fp32")(x, state)
    assert y16.dtype == s16.dtype == torch.float32
    torch.testing.assert_close(y16, y32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s16, s32, atol=2e-2, rtol=2e-2)


def test_prefill_ssm_takes_the_path_it_is_asked_for():
    """Mode_path=True/False overrides the layer's own choice (the tests of both paths
    rely on it); None follows the layer."""
    ssm = values_net().ssms[0]  # SISO: the layer itself uses the kernel path
    assert ssm.uses_mode_path is False
    forced = PrefillSSM(ssm, 1.0, 8, 3, mode_path=True)
    assert forced.mode_path is True and hasattr(forced, "Rq") and not hasattr(forced, "W2")
    own = PrefillSSM(ssm, 1.0, 8, 3)
    assert own.mode_path is False and hasattr(own, "W2")
    wide = values_net(heads=1).ssms[0]  # one 8-wide head: M² > N/2
    assert wide.uses_mode_path is True
    assert PrefillSSM(wide, 1.0, 8, 3, mode_path=False).mode_path is False
