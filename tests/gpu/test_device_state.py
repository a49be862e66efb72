"""ResidentBatch (runtime/device_state.py) on the CPU device: the same steps as Engine.step.

Two independent computations: the resident batch (state rows kept in two bound OrtValue
slabs, copied only on join / leave) against per-stream `Engine.step` calls with host
states (and the toy models' numpy reference). Bytes are checked against the sizes of the
arrays the caller handed in and got back, not against the counter's own arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.device_state import (
    ResidentBatch,
    TransferStats,
    identity_model,
    prometheus_transfer_hook,
)
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import InvalidInput


def test_identity_model_is_a_valid_onnx_identity():
    onnx = pytest.importorskip("onnx")
    m = onnx.load_from_string(identity_model())
    onnx.checker.check_model(m, full_check=True)
    (node,) = m.graph.node
    assert node.op_type == "Identity" and list(node.input) == ["x"] and list(node.output) == ["y"]
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["k", "w"] and m.graph.input[0].type.tensor_type.elem_type == 1
    assert m.opset_import[0].version == 17


def _inputs(eng: Engine, rng, B: int) -> np.ndarray:
    if eng.input_kind == "tokens":
        return rng.integers(0, eng.vocab_size, size=B).astype(np.int64)  # [B]
    return rng.standard_normal((B, eng.d_input)).astype(np.float32)  # [B, d_in]


@pytest.mark.parametrize("which", ["toy_token_model", "toy_signal_model", "tiny_token_model"])
def test_resident_steps_with_joins_and_leaves_equal_engine_steps(which, request):
    model = request.getfixturevalue(which)
    eng = Engine(model["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(0)
    S = eng.state_size
    rb = ResidentBatch(eng, capacity=6)
    host: dict[int, np.ndarray] = {}  # stream id -> [1, S] state stepped with Engine.step

    def join(k):
        states = rng.standard_normal((k, S)).astype(np.float32) * 0.1  # [k, S]
        for sid, s in zip(rb.join(states), states, strict=True):
            host[sid] = s[None].copy()

    join(3)
    for t in range(12):
        if t == 3:
            join(2)  # 5 streams
        if t == 5:
            gone = [rb.ids[1], rb.ids[3]]
            back = rb.leave(gone)  # holes at rows 1 and 3 filled from the end
            for sid, s in zip(gone, back, strict=True):
                np.testing.assert_allclose(s, host.pop(sid)[0], rtol=1e-5, atol=1e-6)
        if t == 8:
            join(3)  # back to 6 == capacity
        x = _inputs(eng, rng, len(rb))
        y = rb.step(x).copy()
        for i, sid in enumerate(rb.ids):
            y_ref, host[sid] = eng.step(x[i : i + 1], host[sid])
            np.testing.assert_allclose(y[i], y_ref[0], rtol=1e-5, atol=1e-5)
    assert sorted(rb.ids) == sorted(host) and len(rb) == 6
    got = rb.read(rb.ids)
    want = np.concatenate([host[sid] for sid in rb.ids])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resident_matches_the_numpy_reference(toy_token_model):
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(1)
    B, T = 4, 10
    x0 = rng.standard_normal((B, eng.state_size)).astype(np.float32)
    tokens = rng.integers(0, eng.vocab_size, size=(B, T))
    rb = ResidentBatch(eng, capacity=B)
    rb.join(x0)
    ys = np.stack([rb.step(tokens[:, t]).copy() for t in range(T)], axis=1)  # [B, T, d_out]
    y_ref, x_ref = toy_token_model["reference"](tokens, x0)
    np.testing.assert_allclose(ys, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rb.read(rb.ids), x_ref, rtol=1e-5, atol=1e-5)


def test_bytes_per_step_are_inputs_plus_outputs_only(toy_signal_model):
    eng = Engine(toy_signal_model["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(2)
    seen: list[tuple[str, int]] = []
    rb = ResidentBatch(eng, capacity=8, on_transfer=lambda d, n: seen.append((d, n)))
    states = eng.new_state(5)
    rb.join(states)
    assert seen == [("h2d", states.nbytes)] and rb.stats.h2d_bytes == 5 * eng.state_size * 4
    steps = 7
    in_bytes = out_bytes = 0
    for _ in range(steps):
        x = _inputs(eng, rng, 5)
        y = rb.step(x)
        in_bytes, out_bytes = in_bytes + x.nbytes, out_bytes + y.nbytes
        assert rb.stats.last_step_bytes == x.nbytes + y.nbytes  # no state bytes
        assert rb.stats.last_step_bytes < 2 * states.nbytes  # what Engine.step moves on top
    st = rb.stats
    assert st.steps == steps
    assert st.h2d_bytes == states.nbytes + in_bytes and st.d2h_bytes == out_bytes
    back = rb.leave(rb.ids[:2])
    assert rb.stats.d2h_bytes == out_bytes + back.nbytes and back.shape == (2, eng.state_size)
    h2d = sum(n for d, n in seen if d == "h2d")
    d2h = sum(n for d, n in seen if d == "d2h")
    assert (h2d, d2h) == (rb.stats.h2d_bytes, rb.stats.d2h_bytes)


def test_prometheus_hook_counts_bytes(toy_token_model):
    prometheus_client = pytest.importorskip("prometheus_client")
    reg = prometheus_client.CollectorRegistry()
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    rb = ResidentBatch(eng, capacity=2, on_transfer=prometheus_transfer_hook(reg))
    rb.join(eng.new_state(2))
    y = rb.step(np.array([1, 2], dtype=np.int64))
    name = "ssmstream_device_transfer_bytes_total"
    assert reg.get_sample_value(name, {"direction": "h2d"}) == 2 * eng.state_size * 4 + 16
    assert reg.get_sample_value(name, {"direction": "d2h"}) == y.nbytes


def test_bad_arguments_name_the_field(toy_token_model):
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    S = eng.state_size
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidInput, match="capacity"):
            ResidentBatch(eng, capacity=bad)
    with pytest.raises(InvalidInput, match="cuda_graph"):
        ResidentBatch(eng, capacity=2, cuda_graph=True)
    rb = ResidentBatch(eng, capacity=2)
    with pytest.raises(InvalidInput, match="inputs.*no streams"):
        rb.step(np.array([1]))
    with pytest.raises(InvalidInput, match="states.*shape"):
        rb.join(np.zeros(S, dtype=np.float32))
    with pytest.raises(InvalidInput, match="states"):
        rb.join(np.zeros((1, S + 1), dtype=np.float32))
    with pytest.raises(InvalidInput, match="capacity"):
        rb.join(eng.new_state(3))
    assert len(rb) == 0 and rb.stats == TransferStats()  # rejected joins moved nothing
    ids = rb.join(eng.new_state(2))
    with pytest.raises(InvalidInput, match="inputs.*2 streams"):
        rb.step(np.array([1, 2, 3]))
    with pytest.raises(InvalidInput, match="inputs"):
        rb.step(np.array([1, eng.vocab_size]))
    with pytest.raises(InvalidInput, match="ids.*not in this batch"):
        rb.leave([ids[0], 99])
    with pytest.raises(InvalidInput, match="ids.*twice"):
        rb.read([ids[0], ids[0]])
    assert rb.ids == ids  # the failed leave removed nobody
