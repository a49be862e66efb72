"""onnxruntime session options tuned for ssmstream's step and prefill graphs (torch-free).

Measured by benchmarks/bench_export.py on this project's graphs: a step graph at B = 1
is ~100 small kernels, so per-node dispatch dominates and a parallel executor or many
threads only add synchronization; the prefill graph is a few large batched MatMuls that
do profit from intra-op threads. Both want full graph optimization (constant folding
computes the prefill's Toeplitz / chunk tables once at session start; LayerNorm, GELU
and MatMul+Add fusions cut the node count).

    session_options(threads=None)  ->  ort.SessionOptions
    trim_heap()                    ->  bool   (call once after opening a prefill graph)

Constant folding of the prefill tables is transient work of a few hundred MB for a large
model (H·N/2·Q-sized intermediates per layer); glibc keeps that freed memory in the heap,
so the process RSS stays high until `trim_heap()` hands it back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import onnxruntime as ort


def default_threads() -> int:
    """Physical-ish core count available to this process (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, n)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions for ssmstream graphs.

    Args:
        threads: intra-op threads; None → all cores available to this process. Pass 1 for
            latency-critical B = 1 stepping when several sessions share the machine.
    Returns:
        options with full graph optimization, sequential execution, no inter-op pool,
        spinning threads allowed (lowest latency for back-to-back steps).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
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
