"""Provider options: what the CUDA provider is asked for (checked on the option strings, which
is what onnxruntime reads; tests/gpu runs them on a device where there is one)."""

from __future__ import annotations

import pytest
from ssmstream.runtime.config import parse_config
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.providers import CudaOptions


def test_fp32_means_fp32_unless_tf32_is_asked_for():
    """onnxruntime's CUDA provider runs fp32 MatMuls in TF32 unless use_tf32 is 0."""
    assert CudaOptions().provider_options()["use_tf32"] == "0"
    assert CudaOptions(use_tf32=True).provider_options()["use_tf32"] == "1"
    assert CudaOptions.parse({"use_tf32": True}).use_tf32 is True
    with pytest.raises(InvalidInput, match="use_tf32"):
        CudaOptions(use_tf32="yes")
    assert parse_config(["model/"]).tf32 is False
    assert parse_config(["model/", "--tf32"]).tf32 is True


def test_cuda_graphs_only_for_the_slot_graph():
    """Only the slot graph runs on fixed device buffers (its buckets); the plain step takes
    numpy states and the prefill a variable T."""
    o = CudaOptions(enable_cuda_graph=True)
    assert o.provider_options("slots")["enable_cuda_graph"] == "1"
    assert o.provider_options("step")["enable_cuda_graph"] == "0"
    assert o.provider_options("prefill")["enable_cuda_graph"] == "0"
