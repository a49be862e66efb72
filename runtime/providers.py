"""onnxruntime providers and session options for ssmstream's graphs (torch-free).

The CUDA provider is requested only when it is usable (`cuda_usable`: built into this
onnxruntime and a CUDA driver loads), else onnxruntime logs an error and falls back
silently; `CudaOptions` are its options.

Measured by benchmarks/bench_export.py on this project's graphs: a step graph at B = 1
is ~100 small kernels, so per-node dispatch dominates and a parallel executor or many
threads only add synchronization; the prefill graph is a few large batched MatMuls that
do profit from intra-op threads. Both want full graph optimization (constant folding
computes the prefill's Toeplitz / chunk tables once at session start; LayerNorm, GELU
and MatMul+Add fusions cut the node count).

Thread pools: onnxruntime's intra-op threads spin while they wait for work by default.
Between two tokens of a stream the step graph is idle, so spinning threads burn whole
cores for nothing: with all 16 cores of a host in the step graph's pool a server spent
14.5 ms of CPU per token against a 0.13 ms step. So the step graph runs on the calling
thread alone (`STEP_THREADS`: a pool of one thread is no pool), and no pool spins
(`session.intra_op.allow_spinning` = 0): a waiting worker sleeps. The prefill graph keeps
a pool, for its large MatMuls. Its workers do not spin either, measured on a 2-core CPU with
the shipped model (T = 1,024, medians): alone, a prefill took 9.9-10.2 ms, 7.7-7.9 ms with
spinning (but then the pool burned ~30 ms of CPU after each call) and 8.6-8.8 ms spinning
only within a call (`session.force_spinning_stop` = 1: no CPU after it); with a thread
stepping another stream beside it, as a server does, spinning within calls made the prefill
no faster (17-20 ms either way) and that thread's steps 15% fewer.

    session_options(threads=None, spinning=False)  ->  ort.SessionOptions
    trim_heap()                                    ->  bool   (once after opening a prefill graph)

Constant folding of the prefill tables is transient work of a few hundred MB for a large
model (H·N/2·Q-sized intermediates per layer); glibc keeps that freed memory in the heap,
so the process RSS stays high until `trim_heap()` hands it back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InvalidInput, integer

CGROUP_ROOT = "/sys/fs/cgroup"  # a container's own cgroup (its cgroup namespace)


def default_threads() -> int:
    """Physical-ish core count available to this process (at least 1): the cores it may run
    on, or fewer where a CPU quota caps them (`cpu_quota`)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, n if quota is None else min(n, quota))


def cpu_quota() -> int | None:
    """The cores a cgroup CPU quota lets this process use, rounded up (`docker run --cpus
    1.5`, a Kubernetes CPU limit: 2); None without one. The quota does not show in the
    affinity mask: a container limited to 2 of a host's 64 cores would run 64 threads,
    throttled to 2 cores' time."""
    root = CGROUP_ROOT  # read at each call (tests point it elsewhere)
    try:  # cgroup v2: "max 100000" (no quota) or "<quota> <period>" in microseconds
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1: a quota of -1 is none
            quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text()
            period = Path(root, "cpu", "cpu.cfs_period_us").read_text()
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


STEP_THREADS = 1  # intra-op threads of the step graph (see the module docstring)
MAX_THREADS = 1024  # more than any machine's cores: onnxruntime takes minutes to start 10⁵
# (train's torch threads have the same bound, model/train.py: model never imports runtime)


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """SessionOptions for ssmstream graphs.

    Args:
        threads: intra-op threads; None → all cores available to this process. 1 runs the
            graph on the calling thread (no pool): what the step graph wants.
        spinning: let idle intra-op threads spin for work (lower latency between
            back-to-back calls, a busy core per thread while idle); off by default.
    Returns:
        options with full graph optimization, sequential execution, no inter-op pool.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    spin = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3  # errors only; ORT warns about unused initializers otherwise
    return so


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim(0)`); False where unavailable."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False


ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
CONV_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


@dataclass
class CudaOptions:
    """CUDAExecutionProvider options (onnxruntime's names; see its CUDA EP documentation).

    device_id: GPU ordinal. arena_extend_strategy: how the memory arena grows.
    cudnn_conv_algo_search: cuDNN convolution algorithm search (the step graph has no conv;
    the prefill graph may). enable_cuda_graph: capture the slot graph once per batch bucket
    (1, 2, 4, ...; Engine.run_slots pads a batch to its bucket with the slab's scratch row)
    and replay it; the plain step and the prefill graphs are never captured.
    gpu_mem_limit: arena limit in bytes (0: no limit). use_tf32: let fp32 MatMuls run in
    TF32 (faster on Ampere and later, about 1e-3 relative error; onnxruntime turns it on
    unless told otherwise, so fp32 here means fp32 unless this is set).
    """

    device_id: int = 0
    arena_extend_strategy: str = "kNextPowerOfTwo"
    cudnn_conv_algo_search: str = "HEURISTIC"
    enable_cuda_graph: bool = False
    gpu_mem_limit: int = 0
    use_tf32: bool = False

    def __post_init__(self):
        for name in ("device_id", "gpu_mem_limit"):
            integer(getattr(self, name), f"cuda_options.{name}")
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise InvalidInput(
                "cuda_options.arena_extend_strategy",
                f"must be one of {ARENA_STRATEGIES}, got {self.arena_extend_strategy!r}",
            )
        if self.cudnn_conv_algo_search not in CONV_SEARCHES:
            raise InvalidInput(
                "cuda_options.cudnn_conv_algo_search",
                f"must be one of {CONV_SEARCHES}, got {self.cudnn_conv_algo_search!r}",
            )
        if not isinstance(self.use_tf32, (bool, np.bool_)):
            raise InvalidInput("cuda_options.use_tf32", f"must be a bool, got {self.use_tf32!r}")
        if not isinstance(self.enable_cuda_graph, (bool, np.bool_)):
            raise InvalidInput(
                "cuda_options.enable_cuda_graph", f"must be a bool, got {self.enable_cuda_graph!r}"
            )

    @classmethod
    def parse(cls, options: CudaOptions | dict | None) -> CudaOptions:
        """A CudaOptions from itself, None (defaults) or a dict (unknown keys are an error)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise InvalidInput("cuda_options", f"must be a dict or CudaOptions, got {options!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidInput(
                "cuda_options", f"unknown option(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**options)

    def provider_options(self, graph: str = "step") -> dict[str, str]:
        """The CUDAExecutionProvider option strings for `graph` ("step", "slots", "prefill")."""
        o = {
            k: str(v) for k, v in asdict(self).items() if k not in ("enable_cuda_graph", "use_tf32")
        }
        o["use_tf32"] = "1" if self.use_tf32 else "0"  # onnxruntime's default is TF32 on
        o["device_id"], o["gpu_mem_limit"] = str(int(self.device_id)), str(int(self.gpu_mem_limit))
        if self.gpu_mem_limit == 0:
            del o["gpu_mem_limit"]
        o["enable_cuda_graph"] = "1" if (self.enable_cuda_graph and graph == "slots") else "0"
        return o


def cuda_usable() -> tuple[bool, str]:
    """(usable, why not): the CUDA provider is built in, a CUDA driver can be loaded and it
    sees at least one GPU (cuInit, cuDeviceGetCount: a driver mounted into a container
    without a GPU, or CUDA_VISIBLE_DEVICES="", loads but has none)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDAExecutionProvider"
    # the driver is libcuda on Linux, nvcuda.dll on Windows (find_library looks for cuda.dll)
    names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll", ctypes.util.find_library("cuda") or ""]
    for name in filter(None, names):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        return _gpus(driver)
    return False, "no CUDA driver (libcuda) could be loaded"


def _gpus(driver) -> tuple[bool, str]:
    """(the driver sees a GPU, why not), from the CUDA driver API."""
    try:
        rc = driver.cuInit(0)
        n = ctypes.c_int(0)
        if rc == 0:
            rc = driver.cuDeviceGetCount(ctypes.pointer(n))
    except AttributeError as e:  # not a CUDA driver after all
        return False, f"the CUDA driver library lacks {e}"
    if rc != 0:
        return False, f"the CUDA driver found no usable GPU (CUresult {rc})"
    if n.value < 1:
        return False, "the CUDA driver sees no GPU"
    return True, ""
