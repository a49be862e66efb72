"""The slot graph is made by editing the step graph's protobuf bytes: fields it does not know,
of any wire type (fixed-width ones included: a newer ONNX may add such fields), pass through
unchanged, the slab and slots it adds are declared with their shapes, and the graph made
from them gathers and scatters the right slab row."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from ssmstream.runtime.slab import SLOT_OUTPUT, slot_model

S = 3


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


# field 1000 as fixed64 (wire type 1) and field 1001 as fixed32 (wire type 5)
FIXED = _varint(1000 << 3 | 1) + struct.pack("<d", 2.5) + _varint(1001 << 3 | 5) + b"\1\2\3\4"


def _step_model() -> bytes:
    """state_out = state + input; output = 2 * state_out; with the fixed-width fields in both
    the ModelProto and its GraphProto."""
    f = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["state", "input"], ["state_out"]),
            helper.make_node("Add", ["state_out", "state_out"], ["output"]),
        ],
        "step",
        [f("input", TensorProto.FLOAT, ["B", S]), f("state", TensorProto.FLOAT, ["B", S])],
        [f("output", TensorProto.FLOAT, ["B", S]), f("state_out", TensorProto.FLOAT, ["B", S])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph_bytes = FIXED + model.graph.SerializeToString()
    model.ClearField("graph")
    return (
        FIXED
        + model.SerializeToString()
        + _varint(7 << 3 | 2)
        + _varint(len(graph_bytes))
        + graph_bytes
    )


def test_fixed_width_fields_pass_through_and_the_slot_graph_steps_its_row():
    data = slot_model(_step_model(), S)
    assert data.count(FIXED) == 2  # in the model and in its graph, unchanged
    m = onnx.load_from_string(data)
    assert [v.name for v in m.graph.input] == ["input", "slab", "slots"]
    assert [v.name for v in m.graph.output] == ["output", SLOT_OUTPUT]
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*m.graph.input, *m.graph.output]}  # fmt: skip
    assert declared["slab"] == declared[SLOT_OUTPUT] == ["slab_rows", S]
    assert declared["slots"] == ["B", 1]
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    slab = np.arange(4 * S, dtype=np.float32).reshape(4, S)
    x = np.full((1, S), 10.0, np.float32)
    output, slab_out = sess.run(
        ["output", SLOT_OUTPUT], {"input": x, "slab": slab, "slots": np.array([[2]], np.int64)}
    )
    np.testing.assert_array_equal(output, 2 * (slab[2:3] + x))
    np.testing.assert_array_equal(slab_out[2], slab[2] + x[0])
    np.testing.assert_array_equal(np.delete(slab_out, 2, 0), np.delete(slab, 2, 0))
