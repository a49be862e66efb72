"""Tests of ssmstream.model.network: SSMConfig validation, forward == repeated step, packed state.

The recurrence runs the way the runtime runs it: the state goes through `pack_state`
(float [B, S]) and `unpack_state` at every step. Token and continuous networks, SISO /
multi-head / MIMO, every discretization in float64 (to 1e-9 of the output scale) over
L = 1024; float32 per shape and input kind to F32_TOL. (The layer tests cover float32 for
every discretization; here the cost is the Python step loop, so float32 runs per shape.)

Letters: B batch, L length, D d_model, H heads, N d_state, S packed state size.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from ssmstream.model import (
    SSMConfig,
    SSMNetwork,
)
from ssmstream.model.layers import SSM
from ssmstream.model.network import Block

L = 1024
F64_TOL = 1e-9
# float32 measured (these seeds): 2.2e-7 … 1.1e-6 of the output scale; bound with ≥ 45× headroom
F32_TOL = 5e-5
SHAPES = {"siso": None, "multihead": 4, "mimo": 1}
METHODS = ("zoh", "bilinear", "backward_euler", "gbt", "euler")
# Euler is only conditionally stable (|1 + ΔA| < 1): Δ ≤ 1e-2 keeps every S4D-Lin mode of
# N = 8 inside the unit circle (asserted below). gbt runs at α = 0.75.
DT_MAX = {"euler": 1e-2}


def make_net(kind: str, heads, method: str = "zoh", seed: int = 0, **kw) -> SSMNetwork:
    io = {"vocab_size": 16} if kind == "tokens" else {"d_input": 3, "d_output": 2}
    cfg = SSMConfig(
        **io, d_model=8, n_layers=2, d_state=8, heads=heads, discretization=method,
        alpha=0.75, dt_max=DT_MAX.get(method, 0.1), **kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    return SSMNetwork(cfg).double().eval()


def make_input(net: SSMNetwork, Bsz: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if net.cfg.input_kind == "tokens":
        return torch.randint(0, net.cfg.vocab_size, (Bsz, length), generator=g)
    return torch.randn(Bsz, length, net.cfg.d_input, generator=g, dtype=torch.float64)


def run_steps_packed(net: SSMNetwork, inp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Repeated `step`, the state held packed [B, S] between steps -> outputs [B, L, d_out]."""
    packed = net.pack_state(net.initial_state(inp.shape[0])).to(dtype)  # [B, S]
    assert packed.shape == (inp.shape[0], net.cfg.state_size)
    outs = []
    for l in range(inp.shape[1]):
        y, states = net.step(inp[:, l], net.unpack_state(packed))
        packed = net.pack_state(states)
        outs.append(y)
    return torch.stack(outs, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_network_forward_equals_steps_float64(shape, method):
    net = make_net("tokens", SHAPES[shape], method)
    assert all(ssm.discrete()[0].abs().max() < 1 for ssm in net.ssms)  # stable modes
    tokens = make_input(net, 2, L, seed=1)
    with torch.inference_mode():
        y_conv = net(tokens)  # [B, L, V]
        y_step = run_steps_packed(net, tokens, torch.float64)
    assert y_conv.shape == (2, L, 16)
    err = rel_err(y_step, y_conv)
    assert err < F64_TOL, f"float64 network forward vs step: {err:.2e}"


@pytest.mark.parametrize("kind", ["tokens", "values"])
@pytest.mark.parametrize("shape", SHAPES)
def test_network_forward_equals_steps_float32(kind, shape):
    """float32 network, state packed as float32 [B, S] (what a session stores)."""
    net = make_net(kind, SHAPES[shape], "zoh", glu=(kind == "tokens")).float()
    inp = make_input(net, 2, L, seed=2)
    inp = inp if kind == "tokens" else inp.float()
    with torch.inference_mode():
        y_conv = net(inp)
        y_step = run_steps_packed(net, inp, torch.float32)
    assert y_conv.dtype == y_step.dtype == torch.float32
    assert y_conv.shape == (2, L, 16 if kind == "tokens" else 2)
    err = rel_err(y_step, y_conv)
    assert err < F32_TOL, f"float32 network forward vs step: {err:.2e}"


def test_continuous_network_float64_with_dropout_in_eval_mode():
    """d_input network, Linear (not GLU) output, dropout set but inactive in eval mode."""
    net = make_net("values", None, "bilinear", glu=False, dropout=0.2)
    assert not net.training
    inp = make_input(net, 1, L, seed=3)
    with torch.inference_mode():
        assert rel_err(run_steps_packed(net, inp, torch.float64), net(inp)) < F64_TOL


def test_state_carries_memory_across_the_sequence():
    """Changing only the first input changes the last output: the state is really used."""
    net = make_net("tokens", 4)
    tokens = make_input(net, 1, 256, seed=4)
    other = tokens.clone()
    other[0, 0] = (tokens[0, 0] + 1) % 16
    with torch.inference_mode():
        a, b = net(tokens)[0, -1], net(other)[0, -1]
    assert (a - b).abs().max() > 1e-6 * a.abs().max()
    # and a split run (forward over a prefix, then steps) carries it the same way
    with torch.inference_mode():
        y_full = run_steps_packed(net, tokens, torch.float64)
    torch.testing.assert_close(y_full, net(tokens), rtol=1e-10, atol=1e-10)


# --- packed state ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip_and_layout(shape):
    net = make_net("tokens", SHAPES[shape]).float()
    cfg = net.cfg
    H = cfg.n_heads
    g = torch.Generator().manual_seed(5)
    states = [
        torch.complex(torch.randn(3, H, 4, generator=g), torch.randn(3, H, 4, generator=g))
        for _ in range(cfg.n_layers)
    ]
    packed = net.pack_state(states)  # [B, S]
    assert packed.shape == (3, cfg.n_layers * H * cfg.d_state) == (3, cfg.state_size)
    assert packed.dtype == torch.float32
    back = net.unpack_state(packed)
    for x, y in zip(states, back):
        assert torch.equal(x, y)
    assert torch.equal(net.pack_state(back), packed)
    # the layout says where each layer's (re, im) block lies
    layout = net.state_layout()
    assert [e["offset"] for e in layout] == [0, 2 * H * 4]
    for e, x in zip(layout, states):
        assert e["shape"] == [2, H, 4] and e["size"] == 2 * H * 4
        block = packed[:, e["offset"] : e["offset"] + e["size"]].reshape(3, 2, H, 4)
        assert torch.equal(block[:, 0], x.real) and torch.equal(block[:, 1], x.imag)


# --- config --------------------------------------------------------------------------------


def test_config_defaults_properties_and_dict_round_trip():
    tok = SSMConfig(vocab_size=256, d_model=16, heads=4)
    assert tok.input_kind == "tokens" and tok.d_output == 256
    assert tok.n_heads == 4 and tok.state_size == 4 * 4 * 64
    sig = SSMConfig(d_input=3, d_model=8)
    assert sig.input_kind == "values" and sig.d_output == 3 and sig.n_heads == 8
    assert SSMConfig.from_dict(tok.to_dict()) == tok
    with pytest.raises(ValueError, match=r"unknown config fields \['colour'\]"):
        SSMConfig.from_dict({**sig.to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"vocab_size": None}, "exactly one of vocab_size"),
        ({"d_input": 2}, "exactly one of vocab_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": None, "d_input": -1}, "d_input"),
        ({"d_output": 0}, "d_output"),
        ({"d_model": 0}, "d_model"),
        ({"n_layers": 0}, "n_layers"),
        ({"d_state": 7}, "d_state"),
        ({"d_state": -2}, "d_state"),
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"init": "hippo"}, "init"),
        ({"discretization": "rk4"}, "discretization"),
        ({"alpha": 1.5}, "alpha"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_max"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_names_the_field(kwargs, name):
    args = {"vocab_size": 16, "d_model": 8, "d_state": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        SSMConfig(**args)


# --- bad input ------------------------------------------------------------------------------


def test_bad_inputs_and_states_name_the_argument():
    tok = make_net("tokens", 4).float()
    with pytest.raises(ValueError, match=r"input must be int64 \[B, L\] tokens"):
        tok(torch.zeros(2, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"input must be int64 \[B, L\] tokens"):
        tok(torch.zeros(2, 5, 1, dtype=torch.long))
    states = tok.initial_state(2)
    with pytest.raises(ValueError, match=r"input must be int64 \[B\] tokens"):
        tok.step(torch.zeros(2, 5, dtype=torch.long), states)
    with pytest.raises(ValueError, match="states must hold 2 layer states, got 1"):
        tok.step(torch.zeros(2, dtype=torch.long), states[:1])
    with pytest.raises(ValueError, match=r"states\[1\] must be complex \[2, 4, 4\]"):
        tok.step(torch.zeros(2, dtype=torch.long), [states[0], states[1][:1]])
    with pytest.raises(ValueError, match=r"states\[0\] must be complex"):
        tok.step(torch.zeros(2, dtype=torch.long), [states[0].real, states[1]])
    with pytest.raises(ValueError, match=r"packed state must be \[B, S=64\], got shape \(2, 63\)"):
        tok.unpack_state(torch.zeros(2, 63, dtype=torch.float32))

    sig = make_net("values", None).float()
    with pytest.raises(ValueError, match=r"input must be float \[B, L, 3\]"):
        sig(torch.zeros(2, 5, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"input must be float \[B, 3\]"):
        sig.step(torch.zeros(2, 5, 3, dtype=torch.float32), sig.initial_state(2))


def test_float32_step_matches_float64_reference():
    """One network in float32 and a float64 copy: step outputs agree to float32 precision."""
    net64 = make_net("tokens", 1)
    net32 = copy.deepcopy(net64).float()
    tokens = make_input(net64, 2, 64, seed=6)
    with torch.inference_mode():
        a = run_steps_packed(net32, tokens, torch.float32)
        b = run_steps_packed(net64, tokens, torch.float64)
    assert rel_err(a.double(), b) < 1e-5


def _tiny(**kw) -> SSMNetwork:
    torch.manual_seed(0)
    return SSMNetwork(
        SSMConfig(**{"vocab_size": 16, "d_model": 8, "n_layers": 2, "d_state": 4, **kw})
    )


@pytest.mark.parametrize(
    "dt_min, dt_max", [(1e-3, math.inf), (1e-3, 1e300), (1e-300, 1e-3), (0.0, 1e-3), (0.1, 0.01)]
)
def test_config_refuses_a_dt_range_float32_cannot_hold_naming_it(dt_min, dt_max):
    """Δ is a float32 parameter: dt_max = 1e300 made it inf (the loss NaN from the first
    step, said as "training diverged"), dt_min = 1e-300 made it 0."""
    want = re.escape(
        "need 1.18e-38 <= dt_min <= dt_max <= 3.4e+38 (float32's range), got "
        f"dt_min={dt_min}, dt_max={dt_max}"
    )
    with pytest.raises(ValueError, match=want):
        SSMConfig(vocab_size=16, d_model=8, d_state=4, dt_min=dt_min, dt_max=dt_max)
    with pytest.raises(ValueError, match=want):
        SSM(4, 4, dt_min=dt_min, dt_max=dt_max)


def test_config_accepts_alpha_zero_and_one():
    for a in (0.0, 1.0):
        cfg = SSMConfig(vocab_size=16, d_model=8, d_state=4, discretization="gbt", alpha=a)
        assert cfg.alpha == a


def test_unpack_state_refuses_a_3d_or_1d_packed_state():
    net = _tiny()
    S = net.cfg.state_size
    with pytest.raises(
        ValueError, match=rf"packed state must be \[B, S={S}\], got shape \(2, {S}, 3\)"
    ):
        net.unpack_state(torch.zeros(2, S, 3))
    with pytest.raises(ValueError, match=rf"packed state must be \[B, S={S}\], got shape \({S},\)"):
        net.unpack_state(torch.zeros(S))


def test_step_refuses_too_many_layer_states():
    net = _tiny()
    states = net.initial_state(2)
    with pytest.raises(ValueError, match="states must hold 2 layer states, got 3"):
        net.step(torch.zeros(2, dtype=torch.long), [*states, states[0]])


def test_step_refuses_a_real_state_of_the_right_shape():
    net = _tiny()
    states = net.initial_state(2)
    with pytest.raises(
        ValueError, match=r"states\[1\] must be complex \[2, 8, 2\], got torch.float32"
    ):
        net.step(torch.zeros(2, dtype=torch.long), [states[0], states[1].real.contiguous()])


def test_packed_state_puts_real_parts_first():
    net = _tiny()
    states = [
        torch.complex(torch.full((1, 8, 2), float(i + 1)), torch.full((1, 8, 2), -float(i + 1)))
        for i in range(2)
    ]
    packed = net.pack_state(states)
    assert packed[0, :16].eq(1).all() and packed[0, 16:32].eq(-1).all()
    assert packed[0, 32:48].eq(2).all() and packed[0, 48:].eq(-2).all()


F64 = torch.float64


def test_block_applies_dropout_after_gelu_and_after_out():
    cfg = SSMConfig(vocab_size=8, d_model=6, n_layers=1, d_state=4, dropout=0.5)
    torch.manual_seed(0)
    block = Block(cfg).double().train()
    y = torch.randn(3, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    got = block._mix(y)
    torch.manual_seed(7)
    h = torch.nn.functional.dropout(torch.nn.functional.gelu(y), 0.5, training=True)
    want = torch.nn.functional.dropout(block.out(h), 0.5, training=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    block.eval()  # no dropout at all in eval mode
    torch.testing.assert_close(
        block._mix(y), block.out(torch.nn.functional.gelu(y)), rtol=0, atol=0
    )


def test_step_refuses_a_non_tensor_layer_state_naming_its_type():
    from ssmstream.model.network import SSMNetwork

    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=8, d_model=4, n_layers=2, d_state=4))
    states = net.initial_state(2)
    tok = torch.zeros(2, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"^states\[1\] must be complex \[2, 4, 2\], got NoneType$"
    ):
        net.step(tok, [states[0], None])
    with pytest.raises(ValueError, match=r"^states\[0\] must be complex \[2, 4, 2\], got list$"):
        net.step(tok, [states[0].tolist(), states[1]])


def test_state_layout_of_three_layers_tiles_the_packed_state():
    """Each layer's offset is the sum of the sizes before it (not just the previous one's),
    and unpack_state reads each layer from that block: with three layers the third starts at
    2 · size, where a packed state built by concatenation puts it."""
    net = SSMNetwork(SSMConfig(vocab_size=8, d_model=4, n_layers=3, d_state=4, heads=2))
    layout = net.state_layout()  # per layer [2, H=2, N/2=2]: 8 floats
    assert [(e["layer"], e["offset"], e["size"]) for e in layout] == [
        (0, 0, 8),
        (1, 8, 8),
        (2, 16, 8),
    ]
    packed = torch.arange(24, dtype=torch.float32).reshape(1, 24)
    states = net.unpack_state(packed)
    for i, x in enumerate(states):
        block = torch.arange(8 * i, 8 * i + 8, dtype=torch.float32).reshape(2, 2, 2)
        assert torch.equal(x[0].real, block[0]) and torch.equal(x[0].imag, block[1])
    assert torch.equal(net.pack_state(states), packed)
