"""Provider options: what the CUDA provider is asked for (checked on the option strings, which
is what onnxruntime reads; tests/gpu runs them on a device where there is one)."""

from __future__ import annotations

import pytest
from ssmstream.runtime import providers
from ssmstream.runtime.config import parse_config
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.providers import CudaOptions, session_options


class Driver:
    """libcuda as ctypes sees it: initializes and reports one GPU."""

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, n):
        n.contents.value = 1
        return 0


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


def test_threads_none_means_every_core_of_this_process(monkeypatch):
    monkeypatch.setattr(providers, "default_threads", lambda: 3)
    assert session_options(None).intra_op_num_threads == 3
    assert session_options(2).intra_op_num_threads == 2
    with pytest.raises(ValueError, match="threads must be >= 1 or None, got 0"):
        session_options(0)


def test_no_gpu_mem_limit_is_passed_when_unlimited():
    """gpu_mem_limit 0 means no limit: the option is left out (onnxruntime's default,
    unlimited) rather than passed as a limit of "0"."""
    assert "gpu_mem_limit" not in CudaOptions().provider_options()
    assert CudaOptions(gpu_mem_limit=1 << 30).provider_options()["gpu_mem_limit"] == str(1 << 30)


def test_unknown_cuda_options_are_named():
    with pytest.raises(InvalidInput) as e:
        CudaOptions.parse({"device_id": 0, "arena": "big", "zz": 1})
    assert e.value.field == "cuda_options"
    assert "unknown option(s) ['arena', 'zz']" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"arena_extend_strategy": "kDoubling"}, "cuda_options.arena_extend_strategy"),
        ({"device_id": True}, "cuda_options.device_id"),
        ({"gpu_mem_limit": False}, "cuda_options.gpu_mem_limit"),
        ({"enable_cuda_graph": "yes"}, "cuda_options.enable_cuda_graph"),
        ({"enable_cuda_graph": 1}, "cuda_options.enable_cuda_graph"),
    ],
)
def test_bad_cuda_options_name_the_field(kwargs, field):
    with pytest.raises(InvalidInput) as e:
        CudaOptions(**kwargs)
    assert e.value.field == field


def test_cuda_usable_tries_the_next_driver_name_when_one_does_not_load(monkeypatch):
    """libcuda.so.1 missing but libcuda.so present (a dev install): that driver is asked."""

    tried = []

    def cdll(name):
        tried.append(name)
        if name == "libcuda.so.1":
            raise OSError("libcuda.so.1: cannot open shared object file")
        return Driver()

    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(providers.ctypes, "CDLL", cdll)
    assert providers.cuda_usable() == (True, "")
    assert tried[:2] == ["libcuda.so.1", "libcuda.so"]


def test_cuda_is_found_through_the_windows_driver(monkeypatch):
    """Windows' CUDA driver is nvcuda.dll (there is no libcuda, and find_library("cuda")
    looks for cuda.dll): with onnxruntime-gpu and a GPU there, CUDA is usable."""

    def cdll(name):
        if name != "nvcuda.dll":
            raise OSError(f"{name}: cannot be loaded")
        return Driver()

    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(providers.ctypes, "CDLL", cdll)
    monkeypatch.setattr(providers.ctypes.util, "find_library", lambda name: None)
    assert providers.cuda_usable() == (True, "")


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        (
            {"cudnn_conv_algo_search": "FAST"},
            "cuda_options.cudnn_conv_algo_search",
            "must be one of ('EXHAUSTIVE', 'HEURISTIC', 'DEFAULT'), got 'FAST'",
        ),
        ({"use_tf32": "no"}, "cuda_options.use_tf32", "must be a bool, got 'no'"),
        ({"use_tf32": 0}, "cuda_options.use_tf32", "must be a bool, got 0"),
    ],
)
def test_bad_cuda_options_name_the_field_and_the_value(kwargs, field, words):
    with pytest.raises(InvalidInput) as e:
        CudaOptions(**kwargs)
    assert e.value.field == field
    assert words in str(e.value)
    with pytest.raises(InvalidInput) as e:  # the same through parse (the server's dict)
        CudaOptions.parse(kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("options", ["device_id=1", ["device_id"], 0])
def test_cuda_options_that_are_not_a_dict_are_refused_naming_them(options):
    with pytest.raises(InvalidInput) as e:
        CudaOptions.parse(options)
    assert e.value.field == "cuda_options"
    assert f"must be a dict or CudaOptions, got {options!r}" in str(e.value)


def test_session_options_optimize_fully_and_never_spin_unless_asked():
    import onnxruntime as ort
    from ssmstream.runtime.providers import session_options

    so = session_options(2)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    assert so.log_severity_level == 3  # errors only: no warnings at every session start
    for pool in ("intra_op", "inter_op"):
        assert so.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"
        spin = session_options(2, spinning=True)
        assert spin.get_session_config_entry(f"session.{pool}.allow_spinning") == "1"


def test_a_build_without_the_cuda_provider_is_not_usable_even_with_a_driver(monkeypatch):

    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(providers.ctypes, "CDLL", lambda name: Driver())
    assert providers.cuda_usable() == (False, "this onnxruntime build has no CUDAExecutionProvider")


def test_default_cuda_options_are_the_documented_provider_strings():
    """What an engine with no cuda_options asks the CUDA provider for, string by string."""
    assert CudaOptions().provider_options("step") == {
        "device_id": "0",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",
        "enable_cuda_graph": "0",
    }


def test_default_threads_counts_the_cores_this_process_may_run_on(monkeypatch, tmp_path):
    monkeypatch.setattr(providers, "CGROUP_ROOT", str(tmp_path))  # no CPU quota there
    monkeypatch.setattr(providers.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert providers.default_threads() == 3
    monkeypatch.delattr(providers.os, "sched_getaffinity")  # not on Linux: every core
    monkeypatch.setattr(providers.os, "cpu_count", lambda: 6)
    assert providers.default_threads() == 6
    monkeypatch.setattr(providers.os, "cpu_count", lambda: None)  # unknown: one
    assert providers.default_threads() == 1


@pytest.mark.parametrize(
    "files, cores",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, docker run --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files (not Linux, not a container)
    ],
)
def test_a_cgroup_cpu_quota_caps_the_default_threads(monkeypatch, tmp_path, files, cores):
    """A container limited to a few of a host's cores (docker --cpus, a Kubernetes CPU
    limit) still sees every core in its affinity mask: the prefill pool would run a thread
    per host core, throttled to the quota's time."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(providers, "CGROUP_ROOT", str(tmp_path), raising=False)
    monkeypatch.setattr(providers.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert providers.default_threads() == (64 if cores is None else cores)
    assert providers.session_options().intra_op_num_threads == (64 if cores is None else cores)
