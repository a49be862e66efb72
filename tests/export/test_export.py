"""Exported graphs run by onnxruntime: parity, prefill, batching, manifest, variants.

Every check compares two independent computations: ORT graphs vs the torch network
(recurrent step and convolution-mode forward), prefill vs step, batched vs alone.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from export_helpers import DT_SCALE, EXPORT, ort_steps, rel_err, session
from onnx import numpy_helper
from ssmstream.export import TOLERANCES, ExportError, export_model
from ssmstream.export.exporter import METADATA_KEY
from ssmstream.runtime import Engine
from ssmstream.runtime.manifest import FORMAT, FORMAT_VERSION, load_manifest, sha256_file

FP32_TOL = 1e-4
OUTS = ["output", "state_out"]  # a prefill run that does not want chunk_states


def random_inputs(m: dict, B: int, L: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if m["input_kind"] == "tokens":
        return rng.integers(0, m["vocab_size"], size=(B, L), dtype=np.int64)
    return rng.standard_normal((B, L, m["d_input"])).astype(np.float32)


def torch_conv(net, x: np.ndarray, dt_scale: float = 1.0) -> np.ndarray:
    import copy

    net64 = copy.deepcopy(net).to(torch.float64)
    with torch.no_grad():
        for ssm in net64.ssms:
            ssm.log_dt += math.log(dt_scale)
        t = torch.from_numpy(x)
        return net64(t.double() if t.is_floating_point() else t).numpy()


def warm_state(step, m: dict, B: int, seed: int) -> np.ndarray:
    """A non-zero state reached by running random inputs."""
    zero = np.zeros((B, m["state_size"]), np.float32)
    _, s = ort_steps(step, random_inputs(m, B, 29, seed), zero)
    assert np.abs(s).max() > 0.1
    return s


# --- manifest ---------------------------------------------------------------------------


def test_manifest_describes_the_model(token_model, token_net):
    m = load_manifest(token_model)  # validates format, version and every sha256
    cfg = token_net.cfg
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["model"] == cfg.to_dict() and m["name"] == "token"
    assert (m["input_kind"], m["vocab_size"], m["d_input"], m["d_output"]) == (
        "tokens", cfg.vocab_size, None, cfg.vocab_size)  # fmt: skip
    assert m["state_size"] == cfg.state_size == sum(e["size"] for e in m["state_layout"])
    assert m["state_layout"] == token_net.state_layout() and m["state_dtype"] == "float32"
    assert (m["dtype"], m["dt_scale"], m["opset"]) == ("fp32", 1.0, 20)
    for name, g in m["graphs"].items():
        f = token_model / g["file"]
        assert g["sha256"] == sha256_file(f) and g["bytes"] == f.stat().st_size
        model = onnx.load(f)
        assert g["nodes"] == len(model.graph.node)
        meta = {p.key: p.value for p in model.metadata_props}
        inner = json.loads(meta[METADATA_KEY])
        assert inner["state_layout"] == m["state_layout"] and inner["parity"] == m["parity"]
        assert "sha256" not in inner["graphs"][name]
    pre = m["graphs"]["prefill"]
    assert pre["chunk"] == EXPORT["chunk"]
    assert pre["max_len"] == EXPORT["chunk"] * EXPORT["max_chunks"]
    assert {"torch", "onnx", "onnxruntime", "ssmstream"} <= set(m["exporter"])
    p = m["parity"]
    assert p["passed"] and p["step_vs_torch"]["length"] >= 4096
    assert p["step_vs_torch"]["max_rel"] <= FP32_TOL
    q = p["prefill_vs_step"]
    assert max(q["max_rel_output"], q["max_rel_state"]) <= FP32_TOL
    sl = p["slots_vs_step"]  # the graph the server runs equals the step graph, bit for bit
    assert sl["passed"] and sl["max_abs_output"] == sl["max_abs_state"] == 0.0
    assert sl["other_rows_untouched"] and sl["steps"] == 16


def test_export_network_leaves_a_training_network_training(tmp_path):
    """Exporting a snapshot in the middle of training: the graph is the eval-mode network
    (no dropout), and the caller's network keeps training (dropout on)."""
    import copy

    from ssmstream.export import export_network
    from ssmstream.model import SSMConfig, SSMNetwork

    torch.manual_seed(3)
    net = SSMNetwork(SSMConfig(vocab_size=11, d_model=8, n_layers=2, d_state=4, dropout=0.5))
    net.train()
    net.ssms[0].eval()  # a caller's mix of modes comes back as it was
    modes = [m.training for m in net.modules()]
    out = export_network(net, tmp_path / "m", prefill=False, verify=False)
    assert [m.training for m in net.modules()] == modes and net.training
    with pytest.raises(ExportError, match="already exists"):  # refused: modes kept too
        export_network(net, out, prefill=False, verify=False)
    assert [m.training for m in net.modules()] == modes
    m = load_manifest(out)
    x = random_inputs(m, 2, 12, seed=1)
    got, _ = ort_steps(session(out / "step.onnx"), x, np.zeros((2, m["state_size"]), np.float32))
    assert rel_err(got, torch_conv(copy.deepcopy(net).eval(), x)) < FP32_TOL


def test_graph_io_contract(token_model, signal_model):
    for d, dtype in ((token_model, onnx.TensorProto.INT64), (signal_model, onnx.TensorProto.FLOAT)):
        m = load_manifest(d)
        for name in ("step", "prefill"):
            g = onnx.load(d / m["graphs"][name]["file"]).graph
            ins = {i.name: i.type.tensor_type for i in g.input}
            outs = {o.name: o.type.tensor_type for o in g.output}
            extra = ["chunk_states"] if name == "prefill" else []
            optional = ["length"] if name == "prefill" else []  # has a default: all real
            assert list(ins) == ["input", "state", *optional]
            defaults = {i.name: numpy_helper.to_array(i) for i in g.initializer}
            for opt in optional:
                assert ins[opt].elem_type == onnx.TensorProto.INT64 and not ins[opt].shape.dim
                assert defaults[opt] == m["graphs"][name]["inputs"][opt]["default"] > 2**40
            assert list(outs) == ["output", "state_out", *extra]
            assert ins["input"].elem_type == dtype
            for t in (ins["state"], outs["state_out"], outs["output"]):
                assert t.elem_type == onnx.TensorProto.FLOAT
            assert ins["state"].shape.dim[0].dim_param  # dynamic batch
            assert ins["state"].shape.dim[1].dim_value == m["state_size"]
            if name == "prefill":
                assert ins["input"].shape.dim[1].dim_param == "T"
                assert outs["chunk_states"].shape.dim[2].dim_value == m["state_size"]


# chunk Q = 8, at most 32 inputs a call (EXPORT): T -> the inputs of each prefill call (a
# padded chunk takes r ≥ Q/4 inputs after whole chunks, r ≥ Q/2 alone; the rest is stepped)
CALLS = {3: [], 5: [5], 17: [16], 19: [19], 40: [32, 8], 67: [32, 32]}


@pytest.mark.parametrize("T", sorted(CALLS))
def test_engine_prefills_any_length_and_equals_steps(token_model, signal_model, T):
    """A prompt that is not a multiple of the chunk runs through the prefill graph with its
    last chunk padded (no steps after it), unless its r inputs past the whole chunks are
    few (then they are stepped: 1 of 17, 3 of 67, a 3-input prompt). Outputs, the final
    state and the states reported at chunk and call ends equal a step-by-step run from a
    non-zero state (the recurrence vs the chunked scan)."""
    for d in (token_model, signal_model):
        eng = Engine(d, device="cpu")
        Q = eng.prefill_chunk
        assert (Q, eng.prefill_max_len) == (8, 32)
        assert eng.prefill_any_length and eng.info["prefill_any_length"]
        m = load_manifest(d)
        s0 = np.random.default_rng(7).standard_normal((2, m["state_size"])).astype(np.float32)
        x = random_inputs(m, 2, T, seed=8)
        states: dict = {}
        calls = []  # the input shape of each prefill graph call

        def spy(names, feed, _run=eng._prefill_session.run, _calls=calls):
            _calls.append(feed["input"].shape)
            return _run(names, feed)

        eng._prefill_session.run = spy
        out, s = eng.prefill_unchecked(x, s0, states)
        assert calls == [(2, -(-n // Q) * Q, *x.shape[2:]) for n in CALLS[T]]
        span = sum(CALLS[T])
        assert sorted(states) == sorted({*range(Q, span + 1, Q), span, T} - {0})
        ref_out, ref_s = [], s0
        for t in range(T):
            o, ref_s = eng.step(x[:, t], ref_s)
            ref_out.append(o)
            if t + 1 in states:
                assert np.abs(states[t + 1] - ref_s).max() <= 1e-4 * np.abs(ref_s).max()
        ref_out = np.stack(ref_out, 1)
        assert np.abs(out - ref_out).max() <= 1e-4 * np.abs(ref_out).max()
        assert np.abs(s - ref_s).max() <= 1e-4 * np.abs(ref_s).max()


def test_prefill_chunk_states_are_the_step_states_at_chunk_ends(token_model):
    """The prefill's chunk_states [B, T / Q, S] equal the state a step-by-step run reaches
    after each chunk (two computations: the chunked scan's carry vs the recurrence)."""
    m = load_manifest(token_model)
    Q = m["graphs"]["prefill"]["chunk"]
    step, prefill = session(token_model / "step.onnx"), session(token_model / "prefill.onnx")
    x = random_inputs(m, 2, 3 * Q, seed=5)
    s0 = np.random.default_rng(6).standard_normal((2, m["state_size"])).astype(np.float32)
    _, s_end, ends = prefill.run(None, {"input": x, "state": s0})
    assert ends.shape == (2, 3, m["state_size"])
    s = s0
    for t in range(3 * Q):
        _, s = step.run(None, {"input": x[:, t], "state": s})
        if (t + 1) % Q == 0:
            assert rel_err(ends[:, (t + 1) // Q - 1], s) < FP32_TOL
    np.testing.assert_array_equal(ends[:, -1], s_end)


# --- parity -----------------------------------------------------------------------------


def test_ort_step_equals_torch_step_and_conv_forward(token_model, token_net):
    m = load_manifest(token_model)
    step = session(token_model / "step.onnx")
    x = random_inputs(m, 2, 600, seed=3)
    y_ort, s_ort = ort_steps(step, x, np.zeros((2, m["state_size"]), np.float32))
    conv = torch_conv(token_net, x)
    states, outs = token_net.initial_state(2), []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, states = token_net.step(torch.from_numpy(x[:, t]), states)
            outs.append(out.numpy())
    y_torch_step = np.stack(outs, 1)
    assert rel_err(y_ort, conv) < FP32_TOL
    assert rel_err(y_torch_step, conv) < FP32_TOL
    assert rel_err(s_ort, token_net.pack_state(states).numpy()) < FP32_TOL


def test_signal_model_parity_multihead_bilinear(signal_model, signal_net):
    m = load_manifest(signal_model)
    assert m["input_kind"] == "values" and m["d_input"] == 3 and m["d_output"] == 2
    assert m["parity"]["passed"] and m["parity"]["step_vs_torch"]["max_rel"] <= FP32_TOL
    step, prefill = session(signal_model / "step.onnx"), session(signal_model / "prefill.onnx")
    x = random_inputs(m, 2, 300, seed=4)
    zero = np.zeros((2, m["state_size"]), np.float32)
    y_step, s_step = ort_steps(step, x, zero)
    assert rel_err(y_step, torch_conv(signal_net, x, dt_scale=DT_SCALE)) < FP32_TOL
    y_pre, s_pre = prefill.run(OUTS, {"input": x[:, :32], "state": zero})
    assert rel_err(y_pre, y_step[:, :32]) < FP32_TOL


@pytest.mark.parametrize("T", [8, 16, 32])
def test_prefill_then_steps_equals_steps_only(token_model, T):
    m = load_manifest(token_model)
    step, prefill = session(token_model / "step.onnx"), session(token_model / "prefill.onnx")
    state = warm_state(step, m, 3, seed=T)
    x = random_inputs(m, 3, T + 5, seed=100 + T)
    y_ref, s_ref = ort_steps(step, x, state)
    y_pre, s = prefill.run(OUTS, {"input": x[:, :T], "state": state})
    y_rest, s = ort_steps(step, x[:, T:], s)
    assert y_pre.shape == (3, T, m["d_output"])
    assert rel_err(np.concatenate([y_pre, y_rest], 1), y_ref) < FP32_TOL
    assert rel_err(s, s_ref) < FP32_TOL


def test_batch_independence(token_model):
    """B sessions in one call == each session alone (step and prefill)."""
    m = load_manifest(token_model)
    step, prefill = session(token_model / "step.onnx"), session(token_model / "prefill.onnx")
    B = 4
    states = warm_state(step, m, B, seed=9)
    x = random_inputs(m, B, 16, seed=10)
    y_all, s_all = step.run(None, {"input": x[:, 0], "state": states})
    p_all, ps_all = prefill.run(OUTS, {"input": x, "state": states})
    for b in range(B):
        y_b, s_b = step.run(None, {"input": x[b : b + 1, 0], "state": states[b : b + 1]})
        np.testing.assert_allclose(y_all[b : b + 1], y_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_all[b : b + 1], s_b, rtol=1e-5, atol=1e-6)
        p_b, ps_b = prefill.run(OUTS, {"input": x[b : b + 1], "state": states[b : b + 1]})
        np.testing.assert_allclose(p_all[b : b + 1], p_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ps_all[b : b + 1], ps_b, rtol=1e-5, atol=1e-6)


RUN_FROM_MANIFEST = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort

    d = sys.argv[1]
    m = json.load(open(f"{d}/manifest.json"))
    B, S, V = 3, m["state_size"], m["d_output"]
    rng = np.random.default_rng(0)

    def inputs(shape):
        if m["input_kind"] == "tokens":
            return rng.integers(0, m["vocab_size"], size=shape, dtype=np.int64)
        return rng.standard_normal((*shape, m["d_input"])).astype(np.float32)

    step = ort.InferenceSession(f"{d}/{m['graphs']['step']['file']}",
                                providers=["CPUExecutionProvider"])
    state = np.zeros((B, S), dtype=np.float32)
    for _ in range(5):
        out, state = step.run(None, {"input": inputs((B,)), "state": state})
    assert out.shape == (B, V) and out.dtype == np.float32, out.shape
    assert state.shape == (B, S) and state.dtype == np.float32
    T = 2 * m["graphs"]["prefill"]["chunk"]
    pre = ort.InferenceSession(f"{d}/{m['graphs']['prefill']['file']}",
                               providers=["CPUExecutionProvider"])
    out, state2 = pre.run(["output", "state_out"], {"input": inputs((B, T)), "state": state})
    assert out.shape == (B, T, V) and state2.shape == (B, S)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state2))
    assert "torch" not in sys.modules and "ssmstream" not in sys.modules
    print("ok")
    """
)


def test_manifest_alone_runs_the_graphs(token_model, signal_model):
    """A fresh process with only json + numpy + onnxruntime runs both graphs."""
    for d in (token_model, signal_model):
        r = subprocess.run(
            [sys.executable, "-c", RUN_FROM_MANIFEST, str(d)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --- variants ---------------------------------------------------------------------------


def test_dt_scale_export_matches_scaled_torch_model(signal_model, signal_net):
    m = load_manifest(signal_model)
    assert m["dt_scale"] == DT_SCALE and m["parity"]["passed"]
    x = random_inputs(m, 2, 256, seed=11)
    zero = np.zeros((2, m["state_size"]), np.float32)
    y, _ = ort_steps(session(signal_model / "step.onnx"), x, zero)
    y_pre, _ = session(signal_model / "prefill.onnx").run(OUTS, {"input": x[:, :32], "state": zero})
    scaled = torch_conv(signal_net, x, dt_scale=DT_SCALE)
    assert rel_err(y, scaled) < FP32_TOL
    assert rel_err(y_pre, scaled[:, :32]) < FP32_TOL
    assert rel_err(y, torch_conv(signal_net, x)) > 1e-3  # not the unscaled model


def test_int8_variant(int8_model, token_model):
    m = load_manifest(int8_model)
    assert m["dtype"] == "int8" and m["parity"]["passed"]
    tol = TOLERANCES["int8"]
    assert m["parity"]["tolerance"] == tol
    assert m["parity"]["step_vs_torch"]["max_rel"] <= tol["step_vs_torch"]
    g = onnx.load(int8_model / "step.onnx").graph
    ops = {n.op_type for n in g.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    # only trunk weights are quantized: the SSM's constants (and so its recurrence) stay fp32
    ints = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    quantized = [i.name for i in g.initializer if i.data_type in ints and len(i.dims) == 2]
    assert quantized and all(n.startswith("trunk.") for n in quantized), quantized
    ssm = [i for i in g.initializer if i.name.startswith("ssm.")]
    assert ssm and all(i.data_type == onnx.TensorProto.FLOAT for i in ssm)
    # the prefill graph too: its folded Toeplitz / chunk-end tables are SSM constants
    g = onnx.load(int8_model / "prefill.onnx").graph
    weights = [n.input[1] for n in g.node if n.op_type == "MatMulInteger"]
    assert weights and all(w.startswith("trunk.") for w in weights), weights
    x = random_inputs(m, 2, 200, seed=12)
    zero = np.zeros((2, m["state_size"]), np.float32)
    y8, s8 = ort_steps(session(int8_model / "step.onnx"), x, zero)
    y32, _ = ort_steps(session(token_model / "step.onnx"), x, zero)
    assert s8.dtype == np.float32
    assert rel_err(y8, y32) <= tol["step_vs_torch"]
    assert rel_err(y8, y32) > 1e-6  # it is a different (quantized) computation


def test_int8_quantizes_the_same_trunk_weights_in_both_graphs_of_a_values_model(
    signal_ckpt, signal_net, signal_model, tmp_path
):
    """A values model's prefill graph holds its encoder weight transposed, folded into a
    constant of another name: it stayed float32 there while the step graph quantized it,
    so the two graphs computed the first layer differently. Both quantize every trunk Linear
    (the quantized weights dequantize to the trunk's, within one uint8 step) and nothing else.
    With signal_model's options: its fp32 graphs come from this process's conversion cache."""
    from ssmstream.export.modules import Trunk

    model = export_model(
        signal_ckpt, tmp_path / "int8", dtype="int8", dt_scale=DT_SCALE, verify=False, **EXPORT
    )
    linears = [m.weight.detach().numpy() for m in Trunk(signal_net, torch.float32).modules()
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    for graph in ("step", "prefill"):
        g = onnx.load(model / f"{graph}.onnx").graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
        found = []
        for n in g.node:
            if n.op_type != "MatMulInteger" or n.input[1] not in inits:
                continue
            scale, zero = (
                inits[f"{n.input[1][: -len('_quantized')]}_{x}"] for x in ("scale", "zero_point")
            )
            w = (inits[n.input[1]].astype(np.float32) - zero.astype(np.float32)) * scale
            match = [i for i, W in enumerate(linears) for V in (W, W.T)
                     if w.shape == V.shape and np.abs(w - V).max() <= scale.max()]  # fmt: skip
            assert match, f"{graph}: a quantized weight {w.shape} that is no trunk Linear"
            found += match[:1]
        assert sorted(found) == list(range(len(linears))), (graph, found)


def test_int8_of_graphs_onnxslim_did_not_touch(token_ckpt, tmp_path):
    """Without onnxslim (--no-optimize, or when slimming would grow a graph) the converted
    graphs carry shape annotations the quantizer's own inference contradicts: it failed
    with an onnx InferenceError traceback. Both graphs quantize and open."""
    out = export_model(
        token_ckpt, tmp_path / "m", dtype="int8", optimize=False, verify=False, **EXPORT
    )
    for name in ("step", "prefill"):
        g = onnx.load(out / f"{name}.onnx").graph
        assert any(n.op_type == "MatMulInteger" for n in g.node), name
        session(out / f"{name}.onnx")


def test_fp16_variant(fp16_model, token_net):
    m = load_manifest(fp16_model)
    assert m["dtype"] == "fp16" and m["parity"]["passed"]
    g = onnx.load(fp16_model / "step.onnx").graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
    assert g.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # state stays fp32
    x = random_inputs(m, 2, 200, seed=13)
    zero = np.zeros((2, m["state_size"]), np.float32)
    y, s = ort_steps(session(fp16_model / "step.onnx"), x, zero)
    assert y.dtype == np.float32 and s.dtype == np.float32
    assert rel_err(y, torch_conv(token_net, x)) <= TOLERANCES["fp16"]["step_vs_torch"]


# --- the runtime's slot step (GatherND -> step.onnx -> ScatterND, derived at load) ------


@pytest.mark.parametrize("which", ["token_model", "signal_model", "int8_model", "fp16_model"])
def test_every_exported_graph_is_valid_onnx(which, request):
    """onnx's full checker accepts each graph as written, the prefill graph's If included
    (the int8 quantizer reorders nodes; the exporter sorts them again)."""
    model_dir = request.getfixturevalue(which)
    for graph in load_manifest(model_dir)["graphs"].values():
        onnx.checker.check_model(str(model_dir / graph["file"]), full_check=True)


@pytest.mark.parametrize("which", ["token_model", "signal_model", "int8_model", "fp16_model"])
def test_exported_step_graphs_step_slab_rows_like_the_plain_step(which, request):
    """The Engine derives its slot graph from every variant's step graph as exported: it
    gives the plain step's outputs and new states bit for bit, written into the stepped
    rows of the slab only, over several steps of slots in no particular order."""
    from ssmstream.runtime import Engine

    model_dir = request.getfixturevalue(which)
    m = load_manifest(model_dir)
    assert "in_place" not in m["graphs"]["step"]  # the exporter no longer marks step graphs
    eng = Engine(model_dir, device="cpu", threads=1)
    states = warm_state(session(model_dir / "step.onnx"), m, 8, seed=21)
    slab = eng.new_slab(8)
    for i, row in enumerate(states):
        slab.write(i, row)
    slots = np.array([5, 0, 3])
    x = random_inputs(m, len(slots), 4, seed=22)
    for t in range(x.shape[1]):
        y_ref, s_ref = eng.step(x[:, t], states[slots])
        y = eng.step_slots(x[:, t], slots, slab)
        np.testing.assert_array_equal(y, y_ref)
        states[slots] = s_ref
        np.testing.assert_array_equal(slab.read_rows(range(8)), states)  # others untouched


def test_manifests_with_the_old_in_place_flag_still_load(token_model, tmp_path):
    """Models exported before the slot graph carry graphs.step.in_place: still valid."""
    from ssmstream.runtime import Engine

    old = tmp_path / "old"
    shutil.copytree(token_model, old)
    m = json.loads((old / "manifest.json").read_text())
    m["graphs"]["step"]["in_place"] = True
    (old / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(old)["graphs"]["step"]["in_place"] is True
    eng = Engine(old, device="cpu", threads=1)
    x = np.array([1, 2], dtype=np.int64)
    y, _ = eng.step(x, eng.new_state(2))
    y_ref, _ = Engine(token_model, device="cpu", threads=1).step(x, eng.new_state(2))
    np.testing.assert_array_equal(y, y_ref)


def test_rewind_replays_a_long_remainder_in_the_prefill_graph(token_model):
    """A session fed one token at a time, rewound to every position in its window: a
    remainder of at least half a chunk after the checkpoint is replayed by one padded prefill
    call (within the fp32 prefill-vs-step bound of the state it had), a shorter one by steps
    (bit-identical: the same step kernels)."""
    import asyncio

    from ssmstream.runtime.batcher import Batcher
    from ssmstream.runtime.service import ServiceLimits, SessionService
    from ssmstream.runtime.sessions import SessionStore

    eng = Engine(token_model, device="cpu")
    Q, V = eng.prefill_chunk, eng.vocab_size

    async def main():
        store = SessionStore(eng.state_size, capacity=4)
        batcher = Batcher(eng, store, max_batch=4, max_batch_delay=0.0)
        await batcher.start()
        limits = ServiceLimits(max_tokens_per_request=64, rewind_window=3 * Q)
        svc = SessionService(eng, store, batcher, limits)
        s, _ = await svc.create("p")
        seen = {}
        for tok in np.random.default_rng(3).integers(0, V, 3 * Q + 5):
            await svc.step("p", s.id, np.array([tok]))
            seen[s.position] = svc.store.read(s)
        calls = []

        def spy(names, feed, _run=eng._prefill_session.run):
            calls.append(int(feed.get("length", feed["input"].shape[1])))
            return _run(names, feed)

        eng._prefill_session.run = spy
        top = s.position
        for target in range(top - 1, top - 3 * Q, -1):
            calls.clear()
            await svc.rewind("p", s.id, target)
            r = target % Q  # inputs replayed after the checkpoint at a chunk end
            got, want = svc.store.read(s), seen[target]
            if r >= Q // 2:
                assert calls == [r]
                assert np.abs(got - want).max() <= FP32_TOL * np.abs(want).max()
            else:
                assert calls == [] and np.array_equal(got, want)
            await svc.step("p", s.id, np.array([1]))  # move on, so the next rewind replays
            await svc.rewind("p", s.id, target)
        await batcher.close()

    asyncio.run(main())


def test_the_slot_check_fails_a_slot_graph_that_returns_nan(token_model):
    """verify's slot-vs-step check counts a NaN or inf as an infinite error (Python's max had
    skipped it, so a slot graph returning NaN passed with error 0)."""
    from ssmstream.export.verify import slots_vs_step

    eng = Engine(token_model, device="cpu")
    m = load_manifest(token_model)
    states = np.zeros((2, eng.state_size), np.float32)
    good = slots_vs_step(eng, m, states, np.random.default_rng(0), steps=2)
    assert good["passed"] and good["max_abs_output"] == 0.0
    real = eng.step_slots

    def nan_slots(x, slots, slab):
        out = real(x, slots, slab)
        for row in slots:
            slab.write(int(row), np.full(eng.state_size, np.nan, np.float32))
        return np.full_like(out, np.nan)

    eng.step_slots = nan_slots
    bad = slots_vs_step(eng, m, states, np.random.default_rng(0), steps=2)
    assert not bad["passed"] and bad["max_abs_output"] == bad["max_abs_state"] == np.inf
