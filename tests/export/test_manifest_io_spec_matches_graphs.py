"""The manifest's graph I/O spec describes the graphs.

manifest.graphs.{step,prefill}.inputs/outputs is what a client without torch reads to feed the
graphs (dtype and shape of input, state, length, output, state_out, chunk_states). The unit
tests check parts of the input/output specs against literals; nothing compared the state
specs with what the graphs take and give. Here the manifest the exporter writes
(`base_manifest`) is checked against the export modules run on concrete B and T: every named
input and output, its dtype and its shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ssmstream.export.exporter import ExportConfig, base_manifest
from ssmstream.export.modules import PrefillGraph, StepGraph
from ssmstream.model import SSMConfig, SSMNetwork

CHUNK, MAX_CHUNKS = 8, 3
NETS = {
    "tokens-siso": dict(vocab_size=11, d_model=8, n_layers=2, d_state=4),
    "values-multihead": dict(d_input=3, d_output=2, d_model=8, n_layers=2, d_state=8, heads=2),
}
DTYPES = {"int64": torch.int64, "float32": torch.float32}


def _concrete(shape: list, B: int, T: int) -> list[int]:
    names = {"B": B, "T": T, "T/chunk": T // CHUNK}
    return [names[d] if isinstance(d, str) else d for d in shape]


def _example(spec: dict, B: int, T: int) -> torch.Tensor:
    shape = _concrete(spec["shape"], B, T)
    if spec["dtype"] == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", list(NETS))
def test_manifest_io_spec_is_what_the_graph_modules_take_and_give(kind):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(**NETS[kind])).eval()
    prefill = {"file": "prefill.onnx", "chunk": CHUNK, "max_len": CHUNK * MAX_CHUNKS}
    graphs = {"step": {"file": "step.onnx"}, "prefill": prefill}
    m = base_manifest(net, ExportConfig(chunk=CHUNK, max_chunks=MAX_CHUNKS), "n", graphs)
    B, T = 3, 2 * CHUNK
    modules = {
        "step": StepGraph(net),
        "prefill": PrefillGraph(net, chunk=CHUNK, max_chunks=MAX_CHUNKS),
    }
    for name, module in modules.items():
        spec = m["graphs"][name]
        ins = spec["inputs"]
        assert list(ins)[:2] == ["input", "state"]
        feed = [_example(ins["input"], B, T), _example(ins["state"], B, T)]
        if "length" in ins:  # optional: its default means "every input is real"
            assert ins["length"]["shape"] == [] and ins["length"]["default"] >= T
            feed.append(torch.tensor(T, dtype=DTYPES[ins["length"]["dtype"]]))
        assert int(feed[1].shape[1]) == m["state_size"]  # the state is the packed one
        with torch.no_grad():
            outs = module(*feed)
        names = ["output", "state_out"] + (["chunk_states"] if name == "prefill" else [])
        assert list(spec["outputs"]) == names
        for (out_name, out_spec), got in zip(spec["outputs"].items(), outs):
            assert list(got.shape) == _concrete(out_spec["shape"], B, T), (name, out_name)
            assert got.dtype == DTYPES[out_spec["dtype"]], (name, out_name)
        assert np.isfinite(outs[1].numpy()).all()
