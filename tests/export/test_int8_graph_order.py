"""An int8 build puts the quantized graph's nodes back in an order onnx accepts (each after
what it reads), whatever order the quantizer wrote them in."""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper
from ssmstream.export import exporter
from ssmstream.export.exporter import ExportConfig
from ssmstream.model import SSMConfig, SSMNetwork


def chain() -> onnx.ModelProto:
    """x -> a -> b -> y through three Identity nodes, in order."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Identity", [i], [o], name=f"n_{o}")
             for i, o in (("x", "a"), ("a", "b"), ("b", "y"))]  # fmt: skip
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 20)])  # fmt: skip


def test_an_int8_graph_is_saved_in_topological_order(tmp_path, monkeypatch):
    def quantize_out_of_order(src, dst, exclude):
        model = onnx.load(src)
        nodes = list(model.graph.node)[::-1]  # every node before what it reads
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, dst)

    monkeypatch.setattr(exporter, "convert", lambda net, g, cfg, build: chain())
    monkeypatch.setattr(exporter, "quantize_int8", quantize_out_of_order)
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))
    exporter.build_graphs(net, ExportConfig(dtype="int8", prefill=False), tmp_path)
    saved = onnx.load(tmp_path / "step.onnx")
    assert [n.name for n in saved.graph.node] == ["n_a", "n_b", "n_y"]
    onnx.checker.check_model(saved)
