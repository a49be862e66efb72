"""Engine edges: which graph gets which thread count, device_id on a CPU engine, the graph
I/O contract (chunk_states belongs to the prefill graph only; states are float32), a model
whose outputs are float16, contiguity of what the checks return, partial aliasing of
StepBuffers, and the states an older prefill graph (no chunk_states) reports."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import InvalidInput, ModelError


def _edit_manifest(model_dir, change) -> None:
    path = model_dir / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def _rewrite_graph(model_dir, name: str, change) -> None:
    """Edit graph `name` with onnx, then record its new sha256 in the manifest."""
    onnx = pytest.importorskip("onnx")
    f = model_dir / name
    model = onnx.load(f)
    change(model)
    onnx.checker.check_model(model)
    onnx.save(model, f)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    _edit_manifest(model_dir, lambda m: m["graphs"][name.removesuffix(".onnx")].update(sha256=sha))


def _threads(session) -> int:
    return session.get_session_options().intra_op_num_threads


# --- thread options ---------------------------------------------------------------------


def test_threads_and_step_threads_reach_their_own_graphs(toy_token_model):
    """`threads` sizes the prefill graph's pool and `step_threads` the step graph's, each
    independently of the other (here the reverse of the defaults' proportions)."""
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1, step_threads=3)
    assert _threads(eng._prefill_session) == 1
    assert _threads(eng.step_session) == 3
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=3, step_threads=1)
    assert _threads(eng._prefill_session) == 3
    assert _threads(eng.step_session) == 1


def test_the_open_log_line_names_the_directory_the_model_and_the_prefill_threads(
    toy_token_model, caplog
):
    """What a server's log says it loaded: two exports that share a name (a model and its
    retrained successor) differ in their directory and step graph; and the prefill pool's
    size, which a container's CPU quota may set."""
    d = toy_token_model["model_dir"]
    with caplog.at_level("INFO", logger="ssmstream.runtime.engine"):
        eng = Engine(d, device="cpu", threads=3)
    sha = eng.info["step_sha256"]
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("opened ")]
    assert opened == [
        f"opened {eng.name!r} from {d} (step sha256 {sha[:12]}…; tokens, S={eng.state_size}, "
        "fp32) on CPUExecutionProvider; prefill on 3 threads"
    ]


# --- device -----------------------------------------------------------------------------


def test_a_cpu_engine_has_device_id_0_whatever_cuda_options_say(toy_token_model):
    """cuda_options are checked even on CPU but do not apply there: a CPU engine (and the
    slabs it makes) is device 0, so its slabs match a store's default CPU slab."""
    eng = Engine(toy_token_model["model_dir"], device="cpu", cuda_options={"device_id": 1})
    assert eng.cuda_options.device_id == 1
    assert (eng.device, eng.device_id) == ("cpu", 0)
    slab = eng.new_slab(2)
    assert (slab.device, slab.device_id) == ("cpu", 0)


def test_a_cpu_slab_has_no_scratch_row(toy_tok):
    """Only CUDA-graph steps pad with a scratch row: a CPU engine's slab of capacity n holds
    exactly n rows of S float32."""
    slab = toy_tok.new_slab(3)
    assert slab.scratch is None
    assert slab.nbytes == 3 * toy_tok.state_size * 4


# --- the graph contract -----------------------------------------------------------------


def test_a_step_graph_with_a_chunk_states_output_is_refused(make_toy, tmp_path):
    """chunk_states is an optional output of the prefill graph; a step graph that has it
    does not follow the step contract and is refused when the model opens."""
    from onnx import TensorProto
    from onnx import helper as oh

    toy = make_toy(tmp_path / "m", "tokens")

    def add_output(m):
        m.graph.node.append(oh.make_node("Identity", ["state_out"], ["chunk_states"]))
        m.graph.output.append(
            oh.make_tensor_value_info("chunk_states", TensorProto.FLOAT, ["B", toy["S"]])
        )

    _rewrite_graph(toy["model_dir"], "step.onnx", add_output)
    with pytest.raises(ModelError, match=r"step graph has inputs .*chunk_states"):
        Engine(toy["model_dir"], device="cpu", threads=1)


def test_a_step_graph_with_a_float64_state_is_refused(make_toy, tmp_path):
    """The state is float32 [B, S] by contract; a (valid) step graph whose state input and
    output are float64 is refused naming the type, not opened."""
    from onnx import TensorProto
    from onnx import helper as oh

    toy = make_toy(tmp_path / "m", "tokens")

    def to_double(m):
        g, rename = m.graph, {"state": "state_f", "state_out": "state_f_out"}
        for node in g.node:  # the cell reads state_f and writes state_f_out (float32)
            node.input[:] = [rename.get(i, i) for i in node.input]
            node.output[:] = ["state_f_out" if o == "state_out" else o for o in node.output]
        g.node.insert(0, oh.make_node("Cast", ["state"], ["state_f"], to=TensorProto.FLOAT))
        g.node.append(oh.make_node("Cast", ["state_f_out"], ["state_out"], to=TensorProto.DOUBLE))
        g.input[1].type.tensor_type.elem_type = TensorProto.DOUBLE
        g.output[1].type.tensor_type.elem_type = TensorProto.DOUBLE

    _edit_manifest(toy["model_dir"], lambda m: m["graphs"].pop("prefill"))
    _rewrite_graph(toy["model_dir"], "step.onnx", to_double)
    with pytest.raises(ModelError, match=r"step graph state is tensor\(double\).*float32"):
        Engine(toy["model_dir"], device="cpu", threads=1)


# --- a float16-output model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_toy(make_toy, tmp_path_factory):
    """The token toy (step graph only) with its outputs cast to float16, as an fp16 export's
    outputs are; its state stays float32."""
    pytest.importorskip("onnx")
    from onnx import TensorProto
    from onnx import helper as oh

    toy = make_toy(tmp_path_factory.mktemp("toy_fp16"), "tokens")

    def half_output(m):
        g = m.graph
        for node in g.node:
            node.output[:] = ["output_f32" if o == "output" else o for o in node.output]
        g.node.append(oh.make_node("Cast", ["output_f32"], ["output"], to=TensorProto.FLOAT16))
        g.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16

    _edit_manifest(toy["model_dir"], lambda m: m["graphs"].pop("prefill"))
    _rewrite_graph(toy["model_dir"], "step.onnx", half_output)
    return toy


def test_float16_outputs_through_fresh_buffered_and_slot_steps(fp16_toy):
    """A model with float16 outputs: step returns float16 close to the float64 reference;
    StepBuffers and slot steps give float16 outputs equal to plain steps; a slot step moves
    per row 8 + 8 bytes in (int64 token and slot) and 2 · d_out bytes out."""
    toy = fp16_toy
    eng = Engine(toy["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(7)
    B, S, d_out = 3, toy["S"], toy["d_out"]
    x = rng.integers(0, toy["V"], size=B)
    s = (rng.standard_normal((B, S)) * 0.3).astype(np.float32)
    y, s_new = eng.step(x, s)
    assert y.dtype == np.float16 and s_new.dtype == np.float32
    ref_y, ref_s = toy["reference"](x[:, None], s)
    np.testing.assert_allclose(y, ref_y[:, 0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(s_new, ref_s, rtol=1e-5, atol=1e-5)

    buf = eng.step_buffers(4)
    assert buf.outputs.dtype == np.float16
    yb, sb = eng.step(x, s, out=buf)
    np.testing.assert_array_equal(yb, y)
    np.testing.assert_array_equal(sb, s_new)

    slab = eng.new_slab(5)
    slab.array[[4, 1, 2]] = s
    ys = eng.step_slots(x, [4, 1, 2], slab, out=buf)
    assert ys.dtype == np.float16
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_array_equal(slab.array[[4, 1, 2]], s_new)
    assert eng.slot_row_bytes == (8 + 8, 2 * d_out)
    assert slab.stats.step_bytes_out == B * 2 * d_out


# --- what the checks return ------------------------------------------------------------


def test_checked_inputs_and_states_are_c_contiguous(toy_tok):
    """check_inputs / check_states promise C-contiguous arrays (what IOBinding binds by
    address): strided int64 tokens and a strided float32 state come back contiguous with
    the same values, and a buffered step on them equals a plain step on copies."""
    eng = toy_tok
    rng = np.random.default_rng(2)
    wide = rng.integers(0, eng.vocab_size, size=(3, 8)).astype(np.int64)
    x = wide[:, ::2]  # [3, 4], not contiguous
    got = eng.check_inputs(x, time_axis=True)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, x)
    tokens = wide[::2, 0]  # [2], stride 8 elements
    got = eng.check_inputs(tokens)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, tokens)

    s_wide = (rng.standard_normal((2, 2 * eng.state_size)) * 0.3).astype(np.float32)
    s = s_wide[:, ::2]  # [2, S] float32, not contiguous
    got = eng.check_states(s, 2)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, s)
    buf = eng.step_buffers(2)
    y, s_new = eng.step(tokens, s, out=buf)
    want_y, want_s = eng.step(tokens.copy(), s.copy())
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(s_new, want_s)


def test_integer_states_are_refused_naming_the_field(toy_tok):
    """States are float32 (float64 is converted); integer states are refused, not cast."""
    for dtype in (np.int32, np.int64, np.uint8):
        with pytest.raises(InvalidInput, match="float32") as e:
            toy_tok.check_states(np.zeros((1, toy_tok.state_size), dtype=dtype), 1)
        assert e.value.field == "states"


def test_states_overlapping_part_of_the_step_buffers_outputs_are_refused(toy_tok):
    """A buffered step writes out.new_states while reading the states: states that overlap
    any part of new_states (not only the very same array) are refused."""
    eng = toy_tok
    buf = eng.step_buffers(4)
    with pytest.raises(InvalidInput) as e:
        eng.step(np.array([1, 2]), buf.new_states[1:3], out=buf)
    assert e.value.field == "states"
    y, s = eng.step(np.array([1, 2]), buf.states[:2], out=buf)  # states[] is the input buffer
    want_y, want_s = eng.step(np.array([1, 2]), eng.new_state(2))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(s, want_s)


# --- prefill states ----------------------------------------------------------------------


def test_an_older_prefill_graph_reports_the_state_after_each_of_its_calls(
    toy_token_model_without_chunk_states,
):
    """Without chunk_states, prefill_unchecked(states={}) reports the state at the end of
    every prefill graph call and at T: chunk 4, max_len 12, T = 29 -> calls of 12, 12, 4
    inputs then one step -> {12, 24, 28, 29}, each equal to the reference recurrence."""
    toy = toy_token_model_without_chunk_states
    eng = Engine(toy["model_dir"], device="cpu", threads=1)
    assert not eng.prefill_chunk_states and not eng.prefill_any_length
    rng = np.random.default_rng(9)
    x = rng.integers(0, toy["V"], size=(1, 29))
    s0 = (rng.standard_normal((1, toy["S"])) * 0.2).astype(np.float32)
    states = {}
    eng.prefill_unchecked(x, s0, states)
    assert sorted(states) == [12, 24, 28, 29]
    for t, st in states.items():
        _, ref = toy["reference"](x[:, :t], s0)
        np.testing.assert_allclose(st, ref, rtol=1e-4, atol=1e-4)
