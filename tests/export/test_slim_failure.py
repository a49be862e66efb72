"""onnxslim failing on a graph (its folded constants past protobuf's 2 GB, as a large --chunk
gives: "EncodeError: Failed to serialize proto") keeps the graph as exported, with a warning,
instead of ending the export in a traceback."""

from __future__ import annotations

import logging

import onnx
import onnxslim
from onnx import TensorProto, helper
from ssmstream.export import exporter


def _graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def test_a_failing_onnxslim_keeps_the_original_graph(monkeypatch, caplog):
    class EncodeError(Exception):
        pass

    def fail(model):
        raise EncodeError("Failed to serialize proto\nmore")

    monkeypatch.setattr(onnxslim, "slim", fail)
    model = _graph()
    with caplog.at_level(logging.WARNING, logger=exporter.__name__):
        assert exporter.slim(model) is model
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "onnxslim failed (EncodeError: Failed to serialize proto); kept the original graph"
    ]
