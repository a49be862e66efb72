"""Which constant MatMul operands the int8 variant counts as trunk weights (quantized) and
which as the SSM's own (kept float32): a trunk Linear's weight, as is or transposed, and
nothing else that merely holds the same numbers."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from ssmstream.export import exporter
from ssmstream.model import SSMConfig, SSMNetwork


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """x [1, rows of w] @ a constant w, named so that only its content can say it is trunk."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])
    init = onnx.numpy_helper.from_array(w, "folded_constant")
    node = helper.make_node("MatMul", ["x", "folded_constant"], ["y"], name="mm")
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [init]))


def test_a_trunk_weight_is_recognised_by_content_and_shape():
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))
    trunk = exporter.trunk_weights(net)
    W = net.head.weight.detach().numpy()  # [5, 4]: not square
    assert exporter.non_trunk_matmuls(matmul_model(W), trunk) == []
    assert exporter.non_trunk_matmuls(matmul_model(np.ascontiguousarray(W.T)), trunk) == []
    same_bytes = W.reshape(4, 5)  # the weight's bytes in another shape: not a trunk weight
    assert exporter.non_trunk_matmuls(matmul_model(same_bytes), trunk) == ["mm"]
    other = (W + 1).reshape(5, 4)
    assert exporter.non_trunk_matmuls(matmul_model(other), trunk) == ["mm"]
