"""Exporter details the other export tests leave open: what the conversion cache is keyed
on, the prefill graph's `length` default on a cache hit, onnxslim's 5% allowance, the node
order toposort keeps, the int8 weight type and Gemm weights, the torch.onnx logger level,
the symbolic dim names inside the graph and the recorded library versions.

Conversions, onnxslim and torch.onnx.export are stubbed where a test is about the code
around them, as in test_export_units.py.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from onnx import TensorProto, helper
from ssmstream.export import exporter
from ssmstream.export.exporter import ExportConfig
from ssmstream.model import SSMConfig, SSMNetwork


def tiny_net(seed=0) -> SSMNetwork:
    torch.manual_seed(seed)
    return SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))


def chain_model(n_nodes: int = 1, pad: int = 0) -> onnx.ModelProto:
    """x -> Identity × n_nodes -> y, with `pad` bytes of doc string."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}")
             for i in range(n_nodes)]  # fmt: skip
    nodes[0].input[0] = "x"
    y = helper.make_tensor_value_info(f"t{n_nodes}", TensorProto.FLOAT, [1])
    g = helper.make_graph(nodes, "g", [x], [y])
    g.doc_string = "p" * pad
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture
def conversions(monkeypatch):
    """exporter.convert with an empty cache and a stub conversion; returns the build log."""
    calls = []
    monkeypatch.setattr(exporter, "_CONVERTED", type(exporter._CONVERTED)())
    monkeypatch.setattr(exporter, "torch_to_onnx", lambda *a, **k: chain_model())
    monkeypatch.setattr(exporter, "slim", lambda m: m)

    def convert(net, cfg, graph="prefill"):
        def build():
            calls.append(graph)
            return None, (), {}

        return exporter.convert(net, graph, cfg, build)

    return calls, convert


@pytest.mark.parametrize("other", [dict(chunk=32), dict(opset=18)], ids=["chunk", "opset"])
def test_conversion_cache_key_includes_chunk_and_opset(conversions, other):
    """A prefill graph for another chunk length, or for another opset, is a conversion of
    its own: reusing the cached one would ship a graph whose chunk (or opset) is not the
    one the manifest records."""
    calls, convert = conversions
    net = tiny_net()
    convert(net, ExportConfig())
    convert(net, ExportConfig())  # same content: reused
    assert len(calls) == 1
    convert(net, ExportConfig(**other))
    assert len(calls) == 2


def test_a_cached_prefill_conversion_keeps_its_length_default(conversions):
    """The prefill graph's `length` input has its default initializer (every input real)
    also when the conversion comes from the cache, and exactly once."""
    calls, convert = conversions
    net = tiny_net()
    for _ in range(2):
        model = convert(net, ExportConfig())
        inits = [i for i in model.graph.initializer if i.name == "length"]
        assert len(inits) == 1
        assert onnx.numpy_helper.to_array(inits[0]) == 1 << 62
    assert len(calls) == 1  # the second model was the cached one
    step = convert(net, ExportConfig(), graph="step")
    assert not [i for i in step.graph.initializer if i.name == "length"]


def test_slim_keeps_a_graph_up_to_5_percent_larger(monkeypatch):
    """Folding a few constants may grow a graph a little: a slimmed graph with fewer nodes
    and ~3% more bytes is kept (over 5% is refused, see test_export_units.py)."""
    import onnxslim

    original = chain_model(n_nodes=3, pad=2000)
    size = original.ByteSize()
    grown = chain_model(n_nodes=2, pad=2000 + int(0.03 * size))
    assert 1.01 * size < grown.ByteSize() < 1.05 * size
    monkeypatch.setattr(onnxslim, "slim", lambda m: grown)
    assert exporter.slim(original) is grown


def test_toposort_leaves_an_already_sorted_graph_as_it_is():
    """Nodes already in a valid order keep that order (independent ones included)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("c", "d")]
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="n0"),
        helper.make_node("Neg", ["x"], ["b"], name="n1"),
        helper.make_node("Add", ["a", "b"], ["c"], name="n2"),
        helper.make_node("Abs", ["x"], ["d"], name="n3"),
        helper.make_node("Relu", ["x"], ["e"], name="n4"),
    ]
    g = helper.make_graph(nodes, "g", [x], outs)
    exporter.toposort(g)
    assert [n.name for n in g.node] == ["n0", "n1", "n2", "n3", "n4"]


def test_toposort_moves_only_what_must_move():
    """A node placed before its producer moves just after it; the rest keep their order."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])
    nodes = [
        helper.make_node("Add", ["a", "x"], ["c"], name="late"),  # reads a, made below
        helper.make_node("Neg", ["x"], ["b"], name="n1"),
        helper.make_node("Identity", ["x"], ["a"], name="n2"),
        helper.make_node("Abs", ["x"], ["d"], name="n3"),
    ]
    g = helper.make_graph(nodes, "g", [x], [out])
    exporter.toposort(g)
    assert [n.name for n in g.node] == ["n1", "n2", "late", "n3"]


def _weight_model(op: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "trunk.W")
    b = onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "trunk.b")
    if op == "Gemm":
        node = helper.make_node("Gemm", ["a", "trunk.W", "trunk.b"], ["y"], name="lin", transB=1)
        inits = [w, b]
    else:
        node = helper.make_node("MatMul", ["a", "trunk.W"], ["y"], name="lin")
        inits = [w]
    return helper.make_model(helper.make_graph([node], "g", [a], [y], inits), ir_version=10,
                             opset_imports=[helper.make_opsetid("", 20)])  # fmt: skip


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_int8_quantizes_matmul_and_gemm_weights_to_uint8(tmp_path, op):
    """A trunk weight of a MatMul and of a Gemm (nn.Linear exports as either) is stored as
    uint8 (U8U8: no U8S8 saturation on CPUs without VNNI), and the graph still computes
    the float product to int8 precision."""
    import onnxruntime as ort

    model = _weight_model(op)
    onnx.save(model, tmp_path / "f.onnx")
    exporter.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", [])
    q = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in q.graph.node]
    assert "MatMulInteger" in ops and op not in ops
    weights = {i.name: i.data_type for i in q.graph.initializer}
    assert weights["trunk.W_quantized"] == TensorProto.UINT8
    assert TensorProto.INT8 not in weights.values()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    W = onnx.numpy_helper.to_array(model.graph.initializer[0])
    ref = x @ (W.T if op == "Gemm" else W)
    if op == "Gemm":
        ref = ref + onnx.numpy_helper.to_array(model.graph.initializer[1])
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"a": x}
    )[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


class _FakeProgram:
    model_proto = chain_model()


@pytest.mark.parametrize("fails", [False, True], ids=["converted", "failed"])
def test_torch_to_onnx_puts_the_torch_onnx_log_level_back(monkeypatch, fails):
    """The torch.onnx logger is quieted only during the conversion: its level afterwards is
    the caller's, whether the conversion worked or raised."""

    def fake_export(*a, **k):
        assert logging.getLogger("torch.onnx").level == logging.ERROR  # quiet meanwhile
        if fails:
            raise RuntimeError("conversion failed")
        return _FakeProgram()

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    torch_log = logging.getLogger("torch.onnx")
    old = torch_log.level
    torch_log.setLevel(logging.DEBUG)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="conversion failed"):
                exporter.torch_to_onnx(torch.nn.Identity(), (), {}, 20, ["y"])
        else:
            assert exporter.torch_to_onnx(torch.nn.Identity(), (), {}, 20, ["y"]) is not None
        assert torch_log.level == logging.DEBUG
    finally:
        torch_log.setLevel(old)


def test_rename_dims_renames_value_info_too():
    """'8*chunks' becomes 'T' on the graph's inputs, outputs and its inner value_info, so
    no annotation in the file keeps the export's internal name."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "8*chunks"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "8*chunks"])
    mid = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["B", "8*chunks", 3])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    g.value_info.append(mid)
    model = helper.make_model(g)
    exporter._rename_dims(model, {"8*chunks": "T"})
    for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert dims[:2] == ["B", "T"], v.name


def test_manifest_records_each_library_version():
    """The manifest's exporter block names the versions of the libraries actually used."""
    import onnxruntime
    import onnxscript

    v = exporter.versions()
    assert v["torch"] == torch.__version__
    assert v["onnx"] == onnx.__version__
    assert v["onnxruntime"] == onnxruntime.__version__
    assert v["onnxscript"] == onnxscript.__version__
