"""Device-resident batch state: the recurrent state of B streams stays where the graph runs.

`Engine.step(inputs, states)` moves the whole state both ways on every step, host → device
and back: 2·B·S·4 bytes per step next to B·(in + d_out) bytes of inputs and outputs. Here
the state of the active batch lives in two device buffers bound with IOBinding,

    slab[p] : float32 [capacity, S]      p ∈ {0, 1}, rows [0, B) active
    step:     (input [B], slab[p][:B]) -> (output [B, d_out], slab[1-p][:B]);  p ← 1 - p

so a step moves only the inputs in and the outputs out (double buffering: the graph never
reads and writes the same buffer). Streams join by copying their rows in (h2d, k·S·4 bytes)
and leave by copying their rows out (d2h) and moving the last active row into the hole
(device → device), never the whole slab through the host. Row copies run a one-node
Identity graph (built here, with no onnx dependency) with IOBinding to raw row pointers.

With `cuda_graph=True` (engine opened with `CudaOptions(enable_cuda_graph=True)`), every step
runs the full `capacity` rows with fixed device buffers for inputs and outputs, so that
onnxruntime can capture one CUDA graph per state buffer parity (`gpu_graph_id` 1 and 2) and
replay it; it then moves capacity rows of inputs and outputs per step.

The same code runs with device "cpu" (the buffers are host OrtValues), which is how the
tests on machines without a GPU prove the bookkeeping: N resident steps == N `Engine.step`
calls, and the bytes counted per step == inputs + outputs.

    rb = ResidentBatch(engine, capacity=64)
    ids = rb.join(engine.new_state(3))     # 3 streams, row order == rb.ids
    y = rb.step(tokens)                    # tokens [3] in rb.ids order -> y [3, d_out]
    states = rb.leave([ids[1]])            # [1, S] back on the host; the others stay

Dimension letters: B active streams, S packed state size, k rows copied, d_out outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .engine import Engine
from .errors import EngineFailure, InvalidInput

log = logging.getLogger(__name__)

TransferHook = Callable[[str, int], None]  # (direction "h2d" | "d2h", bytes)


# --- a one-node Identity graph, serialized by hand (protobuf wire format) --------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int | str) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes / str."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_model(elem_type: int = 1, opset: int = 17, ir_version: int = 8) -> bytes:
    """ModelProto bytes of `y = Identity(x)`, x and y of `elem_type` (1: float) and shape [k, w].

    Field numbers from onnx.proto: ModelProto{ir_version 1, graph 7, opset_import 8},
    GraphProto{node 1, name 2, input 11, output 12}, NodeProto{input 1, output 2, op_type 4},
    ValueInfoProto{name 1, type 2}, TypeProto{tensor_type 1}, Tensor{elem_type 1, shape 2},
    TensorShapeProto{dim 1}, Dimension{dim_param 2}, OperatorSetIdProto{domain 1, version 2}.
    """
    shape = _field(2, _field(1, _field(2, "k")) + _field(1, _field(2, "w")))
    ttype = _field(1, _field(1, elem_type) + shape)

    def value(name: str) -> bytes:
        return _field(1, name) + _field(2, ttype)

    node = _field(1, "x") + _field(2, "y") + _field(4, "Identity")
    graph = _field(1, node) + _field(2, "copy_rows") + _field(11, value("x"))
    graph += _field(12, value("y"))
    opset_id = _field(1, "") + _field(2, opset)
    return _field(1, ir_version) + _field(7, graph) + _field(8, opset_id)


# --- transfer accounting ---------------------------------------------------------------------


@dataclass
class TransferStats:
    """Host↔device bytes: totals, and those of the last step (join/leave copies excluded)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    steps: int = 0
    last_step_h2d: int = 0
    last_step_d2h: int = 0

    @property
    def last_step_bytes(self) -> int:
        return self.last_step_h2d + self.last_step_d2h


def prometheus_transfer_hook(registry=None) -> TransferHook:
    """A hook counting bytes in `ssmstream_device_transfer_bytes_total{direction}`.

    Needs prometheus-client (the `serve` extra); `registry` defaults to the global one.
    """
    from prometheus_client import REGISTRY, Counter

    counter = Counter(
        "ssmstream_device_transfer_bytes",
        "Host<->device bytes moved by device-resident batches",
        ["direction"],
        registry=registry if registry is not None else REGISTRY,
    )
    return lambda direction, n: counter.labels(direction=direction).inc(n)


# --- the resident batch ----------------------------------------------------------------------


class ResidentBatch:
    """The state of up to `capacity` streams kept in device memory (see the module docstring).

    Args:
        engine: an open Engine; its step session runs the steps, on its device.
        capacity: most streams at once (the slab rows).
        cuda_graph: fixed-shape steps for CUDA graph capture (engine must be on CUDA with
            `enable_cuda_graph`); every step then runs all `capacity` rows.
        on_transfer: called with ("h2d" | "d2h", bytes) for every host↔device copy.
    Attributes: ids (active stream ids in row order), stats (TransferStats), device.
    Not thread-safe: drive one ResidentBatch from one thread.
    """

    def __init__(
        self,
        engine: Engine,
        capacity: int,
        cuda_graph: bool = False,
        on_transfer: TransferHook | None = None,
    ):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise InvalidInput("capacity", f"must be a positive integer, got {capacity!r}")
        if capacity < 1:
            raise InvalidInput("capacity", f"must be a positive integer, got {capacity!r}")
        if cuda_graph and not (engine.device == "cuda" and engine.cuda_options.enable_cuda_graph):
            raise InvalidInput(
                "cuda_graph",
                "needs an Engine on CUDA opened with cuda_options enable_cuda_graph=True "
                f"(this one runs on {engine.provider})",
            )
        self.engine, self.capacity, self.cuda_graph = engine, int(capacity), bool(cuda_graph)
        self.device, self.device_id = engine.device, engine.device_id
        self.on_transfer = on_transfer
        self.stats = TransferStats()
        self.ids: list[int] = []
        self._next_id = 0
        S, C = engine.state_size, self.capacity
        self._row_bytes = 4 * S
        # two state slabs on the device, float32 [C, S] each; rows [0, B) of slab[p] are live
        self._slabs = [
            ort.OrtValue.ortvalue_from_shape_and_type(
                [C, S], np.float32, self.device, self.device_id
            )
            for _ in range(2)
        ]
        self._p = 0
        # host staging for inputs and outputs (pinned by nothing; ORT copies from / into them)
        self._in_shape = engine._step_in_shape
        self._in_dtype, self._out_dtype = engine._step_in_dtype, engine._out_dtype
        self._x_host = np.zeros((C, *self._in_shape), dtype=self._in_dtype)  # [C(, d_in)]
        self._y_host = np.zeros((C, engine.d_output), dtype=self._out_dtype)  # [C, d_out]
        self._sess = engine.step_session
        if self.cuda_graph:  # fixed device buffers for inputs and outputs
            self._x_dev = ort.OrtValue.ortvalue_from_numpy(self._x_host, "cuda", self.device_id)
            self._y_dev = ort.OrtValue.ortvalue_from_numpy(self._y_host, "cuda", self.device_id)
            self._graph_io = [self._bind_graph(p) for p in (0, 1)]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": str(self.device_id)}), *providers]
        self._copier = ort.InferenceSession(identity_model(), so, providers=providers)
        log.info(
            "resident batch: capacity %d, S=%d, %.1f MiB x2 on %s%s",
            C, S, C * self._row_bytes / 2**20, self.device,
            " (CUDA graphs)" if self.cuda_graph else "",
        )  # fmt: skip

    # --- bookkeeping -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def _count(self, direction: str, nbytes: int) -> None:
        if direction == "h2d":
            self.stats.h2d_bytes += nbytes
        else:
            self.stats.d2h_bytes += nbytes
        if self.on_transfer is not None:
            self.on_transfer(direction, nbytes)

    def _row_ptr(self, p: int, row: int) -> int:
        return self._slabs[p].data_ptr() + row * self._row_bytes

    def _copy_rows(self, src: tuple[str, int], dst: tuple[str, int], k: int) -> None:
        """Copy k contiguous float32 state rows from src (device, ptr) to dst (device, ptr)."""
        io = self._copier.io_binding()
        S = self.engine.state_size
        io.bind_input("x", src[0], self.device_id, np.float32, [k, S], src[1])
        io.bind_output("y", dst[0], self.device_id, np.float32, [k, S], dst[1])
        try:
            self._copier.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own exception types
            raise EngineFailure(f"copying {k} state rows failed: {e}") from e

    def _rows_of(self, ids: Sequence[int], field: str) -> list[int]:
        where = {sid: r for r, sid in enumerate(self.ids)}
        rows = []
        for sid in ids:
            if sid not in where:
                raise InvalidInput(field, f"stream id {sid!r} is not in this batch")
            rows.append(where[sid])
        if len(set(rows)) != len(rows):
            raise InvalidInput(field, "contains a stream id twice")
        return rows

    # --- joining, leaving, reading ------------------------------------------------------------

    def join(self, states) -> list[int]:
        """Add k streams with initial states float32 [k, S] (h2d: k·S·4 bytes); their ids."""
        s = np.asarray(states)
        if s.ndim != 2 or s.shape[0] < 1:
            raise InvalidInput("states", f"must have shape [k, S], k >= 1, got {s.shape}")
        k = s.shape[0]
        s = self.engine.check_states(s, k, "states")
        if len(self.ids) + k > self.capacity:
            raise InvalidInput(
                "states", f"{k} more streams exceed the capacity {self.capacity} "
                f"({len(self.ids)} active)"
            )  # fmt: skip
        s = np.ascontiguousarray(s)
        self._copy_rows(
            ("cpu", s.ctypes.data), (self.device, self._row_ptr(self._p, len(self.ids))), k
        )
        self._count("h2d", s.nbytes)
        new = list(range(self._next_id, self._next_id + k))
        self._next_id += k
        self.ids.extend(new)
        return new

    def read(self, ids: Sequence[int]) -> np.ndarray:
        """The current states of `ids`, float32 [k, S] on the host (d2h: k·S·4 bytes)."""
        rows = self._rows_of(list(ids), "ids")
        out = np.empty((len(rows), self.engine.state_size), dtype=np.float32)  # [k, S]
        for i, r in enumerate(rows):
            self._copy_rows(
                (self.device, self._row_ptr(self._p, r)), ("cpu", out[i].ctypes.data), 1
            )
        self._count("d2h", out.nbytes)
        return out

    def leave(self, ids: Sequence[int]) -> np.ndarray:
        """Remove streams; returns their states float32 [k, S] (in `ids` order).

        Each hole is filled by moving the last active row into it on the device, so the
        other streams' states never leave it; their order in `self.ids` changes accordingly.
        """
        ids = list(ids)
        states = self.read(ids)
        for r in sorted(self._rows_of(ids, "ids"), reverse=True):
            last = len(self.ids) - 1
            if r != last:
                src = (self.device, self._row_ptr(self._p, last))
                self._copy_rows(src, (self.device, self._row_ptr(self._p, r)), 1)
                self.ids[r] = self.ids[last]
            self.ids.pop()
        return states

    # --- stepping -----------------------------------------------------------------------------

    def _bind_graph(self, p: int) -> ort.IOBinding:
        """The fixed binding for CUDA graph steps from slab[p] to slab[1 - p] (all rows)."""
        io = self._sess.io_binding()
        io.bind_ortvalue_input("input", self._x_dev)
        io.bind_ortvalue_input("state", self._slabs[p])
        io.bind_ortvalue_output("output", self._y_dev)
        io.bind_ortvalue_output("state_out", self._slabs[1 - p])
        return io

    def step(self, inputs) -> np.ndarray:
        """One step of every active stream.

        Args:
            inputs: tokens [B] | values [B, d_in], row i for stream `self.ids[i]`.
        Returns:
            outputs [B, d_out] — a view that the next step overwrites (copy it to keep it).
        """
        B = len(self.ids)
        if B == 0:
            raise InvalidInput("inputs", "the batch has no streams (join some first)")
        x = self.engine.check_inputs(inputs, "inputs")
        if x.shape[0] != B:
            raise InvalidInput("inputs", f"has {x.shape[0]} rows, the batch has {B} streams")
        p = self._p
        try:
            if self.cuda_graph:
                self._x_host[:B] = x
                self._x_dev.update_inplace(self._x_host)  # h2d: all C rows
                ro = ort.RunOptions()
                ro.add_run_config_entry("gpu_graph_id", str(p + 1))
                self._sess.run_with_iobinding(self._graph_io[p], ro)
                y = self._y_dev.numpy()[:B]  # d2h: all C rows
                h2d, d2h = self._x_host.nbytes, self._y_host.nbytes
            else:
                io = self._sess.io_binding()
                S, dev, did = self.engine.state_size, self.device, self.device_id
                io.bind_cpu_input("input", x)
                io.bind_input("state", dev, did, np.float32, [B, S], self._row_ptr(p, 0))
                shape = [B, self.engine.d_output]
                io.bind_output("output", "cpu", 0, self._out_dtype, shape, self._y_host.ctypes.data)
                io.bind_output("state_out", dev, did, np.float32, [B, S], self._row_ptr(1 - p, 0))
                self._sess.run_with_iobinding(io)
                y = self._y_host[:B]
                h2d, d2h = x.nbytes, y.nbytes
        except Exception as e:  # onnxruntime's own exception types
            raise EngineFailure(f"resident step failed for batch {B}: {e}") from e
        self._p = 1 - p
        self._count("h2d", h2d)
        self._count("d2h", d2h)
        st = self.stats
        st.steps, st.last_step_h2d, st.last_step_d2h = st.steps + 1, h2d, d2h
        return y
