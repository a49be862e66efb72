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


class _Driver:
    """A stand-in for libcuda: cuInit's result and the GPUs it reports."""

    def __init__(self, init: int, gpus: int):
        self.init, self.gpus = init, gpus

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, n):
        n.contents.value = self.gpus
        return 0


@pytest.mark.parametrize(
    "driver, usable, why",
    [
        (_Driver(0, 2), True, ""),
        (_Driver(100, 0), False, "no usable GPU (CUresult 100)"),  # CUDA_ERROR_NO_DEVICE
        (_Driver(0, 0), False, "sees no GPU"),
        (object(), False, "lacks"),  # a library of that name that is not a CUDA driver
    ],
)
def test_cuda_is_usable_only_when_the_driver_sees_a_gpu(monkeypatch, driver, usable, why):
    """A driver that loads is not enough (a container with the driver mounted and no GPU,
    CUDA_VISIBLE_DEVICES=""): requesting CUDA there makes onnxruntime log errors and fall
    back; cuda_usable asks the driver for its GPUs first."""
    from ssmstream.runtime import providers

    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(providers.ctypes, "CDLL", lambda name: driver)
    got, reason = providers.cuda_usable()
    assert got is usable and why in reason
