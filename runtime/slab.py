"""StateSlab: every session's recurrent state in one buffer on the engine's device.

    slab   float32 [capacity, S]     row `slot` = the state of one session (S × 4 bytes)

On CPU the slab is a numpy array that an OrtValue shares; on CUDA it is device memory. A
batch steps through the *slot graph*, which the Engine derives from its step graph when it
opens a model (`slot_model`: two nodes and new graph inputs/outputs, no re-export):

    state      = GatherND(slab, slots)                   slots int64 [B, 1]
    output, state_out = step(input, state)               the exported step graph, unchanged
    slab_out   = ScatterND(slab, slots, state_out)

with `slab` and `slab_out` bound through IOBinding to the same OrtValue. onnxruntime's
ScatterND (CPU and CUDA) skips its copy of `data` when its output is the same buffer, so
one call reads and writes only the batch's B rows of the slab, and per step only `input`,
`slots` and `output` cross host↔device. ScatterND runs last (it needs state_out), so a
failed run leaves the slab as it was.

Row operations (read, write, copy, zero: create, restore, fork, snapshot, save/load, the
shared store's writes) move single rows; on CUDA through a one-node Identity graph bound
to raw row pointers (built here from protobuf wire bytes: no onnx dependency).
`stats` counts the bytes those row operations move in and out of the slab, so tests can
check that no step copies the slab whole.

Dimension letters: S packed state size, B rows in one step, k rows copied.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import EngineFailure, InvalidInput, ModelError, as_array, integer, zeros

SLOT_OUTPUT = "slab_out"

# --- ONNX protobuf wire format: just enough to write and edit a ModelProto -----------------
# Field numbers from onnx.proto: ModelProto{graph 7}, GraphProto{node 1, input 11, output 12},
# NodeProto{input 1, output 2, name 3, op_type 4}, ValueInfoProto{name 1, type 2},
# TypeProto{tensor_type 1}, Tensor{elem_type 1, shape 2}, TensorShapeProto{dim 1},
# Dimension{dim_value 1, dim_param 2}, ModelProto{ir_version 1, opset_import 8},
# OperatorSetIdProto{domain 1, version 2}. Element types: 1 float, 7 int64.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _field(number: int, payload: bytes | int | str) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes / str."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """The top-level fields of a message: (number, the field's own bytes, its payload)."""
    out, i = [], 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
            payload = b""
        elif wire == 2:
            n, i = _read_varint(buf, i)
            payload, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            payload = b""
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, buf[start:i], payload))
    return out


def _name(value_info: bytes) -> str:
    return next((p.decode() for n, _, p in _fields(value_info) if n == 1), "")


def _tensor_type(elem_type: int, dims: Sequence[int | str]) -> bytes:
    """TypeProto bytes of a tensor; a dim is a dim_param (str) or a dim_value (int)."""
    shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)
    return _field(1, _field(1, elem_type) + _field(2, shape))


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> bytes:
    return _field(1, name) + _field(2, _tensor_type(elem_type, dims))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str) -> bytes:
    ins = b"".join(_field(1, i) for i in inputs)
    return ins + b"".join(_field(2, o) for o in outputs) + _field(3, name) + _field(4, op)


def slot_model(step_model: bytes, state_size: int) -> bytes:
    """The slot graph (see the module docstring) from the step graph's ModelProto bytes:
    `state` and `state_out` stop being graph inputs/outputs; GatherND makes `state` from
    (slab, slots), ScatterND writes state_out into slab_out. Raises ModelError when the
    step graph does not have exactly one `state` input and one `state_out` output."""
    out, seen = bytearray(), {"state": 0, "state_out": 0}
    for number, raw, payload in _fields(step_model):
        if number != 7:
            out += raw
            continue
        graph, gather = bytearray(), _node("GatherND", ["slab", "slots"], ["state"], "slab_gather")
        for gnumber, graw, gpayload in _fields(payload):
            name = _name(gpayload) if gnumber in (11, 12) else ""
            if (gnumber, name) in ((11, "state"), (12, "state_out")):
                seen[name] += 1
                continue
            if gnumber == 1 and gather:  # nodes stay topologically sorted: the gather first
                graph += _field(1, gather)
                gather = b""
            graph += graw
        graph += _field(
            1, _node("ScatterND", ["slab", "slots", "state_out"], [SLOT_OUTPUT], "slab_scatter")
        )
        graph += _field(11, _value_info("slab", 1, ["slab_rows", state_size]))
        graph += _field(11, _value_info("slots", 7, ["B", 1]))
        graph += _field(12, _value_info(SLOT_OUTPUT, 1, ["slab_rows", state_size]))
        out += _field(7, bytes(graph))
    if seen != {"state": 1, "state_out": 1}:
        raise ModelError(f"the step graph has no single state input and state_out output: {seen}")
    return bytes(out)


def identity_model(elem_type: int = 1, opset: int = 17, ir_version: int = 8) -> bytes:
    """ModelProto bytes of `y = Identity(x)`, x and y of `elem_type` (1: float), shape [k, w]."""
    graph = _field(1, _node("Identity", ["x"], ["y"], "copy_rows")) + _field(2, "copy_rows")
    graph += _field(11, _value_info("x", elem_type, ["k", "w"]))
    graph += _field(12, _value_info("y", elem_type, ["k", "w"]))
    opset_id = _field(1, "") + _field(2, opset)
    return _field(1, ir_version) + _field(7, graph) + _field(8, opset_id)


# --- the slab --------------------------------------------------------------------------------


@dataclass
class SlabStats:
    """Rows and bytes the row operations moved into and out of the slab (a step moves none:
    its rows stay inside onnxruntime), and the slot steps with the bytes they moved between
    the host and the device: inputs and slots in, outputs out."""

    rows_in: int = 0
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    steps: int = 0
    step_bytes_in: int = 0
    step_bytes_out: int = 0


class StateSlab:
    """float32 [capacity, S] on `device` ("cpu" | "cuda"); see the module docstring.

    Attributes: capacity, state_size, device, device_id, value (the OrtValue a step binds),
    nbytes, row_bytes, stats (SlabStats), scratch (with scratch=True: the row after the
    last slot, which CUDA graph buckets step as padding; else None). Row operations are
    safe from several threads; a caller keeps a row from being stepped while it reads or
    writes it (SessionStore does).
    """

    def __init__(
        self,
        capacity: int,
        state_size: int,
        device: str = "cpu",
        device_id: int = 0,
        scratch: bool = False,
    ):
        self.capacity = integer(capacity, "capacity", 1)
        self.state_size = integer(state_size, "state_size", 1)
        if device not in ("cpu", "cuda"):
            raise InvalidInput("device", f"must be 'cpu' or 'cuda', got {device!r}")
        self.device, self.device_id = device, integer(device_id, "device_id")
        self.row_bytes = 4 * self.state_size
        # one more row for the padding of CUDA graph buckets: slots never name it
        self.scratch = self.capacity if scratch else None
        rows = self.capacity + (1 if scratch else 0)
        self.nbytes = rows * self.row_bytes
        self.stats = SlabStats()
        self._lock = threading.Lock()  # the stats, and the copier's bindings
        if device == "cpu":
            # zero pages cost no memory until first touched; the OrtValue shares the array
            self.array = zeros((rows, self.state_size), np.float32, "capacity")
            self.value = ort.OrtValue.ortvalue_from_numpy(self.array)
            self._copier = None
            return
        self.array = None
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, self.state_size], np.float32, "cuda", self.device_id
        )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        providers = [("CUDAExecutionProvider", {"device_id": str(self.device_id)})]
        self._copier = ort.InferenceSession(identity_model(), so, providers=providers)
        per_copy = max(1, min(rows, (64 << 20) // self.row_bytes))  # at most 64 MiB of zeros
        blank = np.zeros((per_copy, self.state_size), dtype=np.float32)
        for start in range(0, rows, len(blank)):  # device memory comes uninitialized
            k = min(len(blank), rows - start)
            self._copy(("cpu", blank.ctypes.data), ("cuda", self._ptr(start)), k)

    def __repr__(self) -> str:
        return (
            f"StateSlab(capacity={self.capacity}, state_size={self.state_size}, "
            f"device={self.device!r}, {self.nbytes / 2**20:.1f} MiB)"
        )

    # --- slots -----------------------------------------------------------------------------

    def check_slots(self, slots, field: str = "slots") -> np.ndarray:
        """Slot numbers as int64 [B, 1] for the slot graph: each in [0, capacity) and none
        twice (two writes of one row in one step would race), else InvalidInput."""
        s = as_array(slots, field)
        if s.dtype.kind not in "iu" or s.ndim != 1 or s.size == 0:
            raise InvalidInput(
                field, f"must be a non-empty 1-D integer array, got {s.dtype} {s.shape}"
            )
        lo, hi = int(s.min()), int(s.max())
        if lo < 0 or hi >= self.capacity:
            bad = lo if lo < 0 else hi
            raise InvalidInput(field, f"slot {bad} is outside [0, capacity={self.capacity})")
        if s.size > 1 and np.unique(s).size != s.size:
            raise InvalidInput(field, "holds a slot twice")
        return np.ascontiguousarray(s, dtype=np.int64).reshape(-1, 1)

    def _check_slot(self, slot, field: str = "slot") -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise InvalidInput(field, f"must be an integer, got {slot!r}")
        if not 0 <= slot < self.capacity:
            raise InvalidInput(field, f"slot {slot} is outside [0, capacity={self.capacity})")
        return int(slot)

    # --- row operations ----------------------------------------------------------------------

    def _ptr(self, row: int) -> int:
        return self.value.data_ptr() + row * self.row_bytes

    def _copy(self, src: tuple[str, int], dst: tuple[str, int], k: int) -> None:
        """Copy k contiguous rows from src (device, pointer) to dst (device, pointer) (CUDA)."""
        with self._lock:
            io = self._copier.io_binding()
            shape = [k, self.state_size]
            io.bind_input("x", src[0], self.device_id, np.float32, shape, src[1])
            io.bind_output("y", dst[0], self.device_id, np.float32, shape, dst[1])
            try:
                self._copier.run_with_iobinding(io)
            except Exception as e:  # onnxruntime's own exception types
                raise EngineFailure(f"copying {k} state rows failed: {e}") from e

    def _count(self, rows_in: int = 0, rows_out: int = 0) -> None:
        with self._lock:
            st = self.stats
            st.rows_in += rows_in
            st.rows_out += rows_out
            st.bytes_in += rows_in * self.row_bytes
            st.bytes_out += rows_out * self.row_bytes

    def read(self, slot: int) -> np.ndarray:
        """A host copy of one row: float32 [S]."""
        slot = self._check_slot(slot)
        self._count(rows_out=1)
        if self.array is not None:
            return self.array[slot].copy()
        row = np.empty(self.state_size, dtype=np.float32)
        self._copy(("cuda", self._ptr(slot)), ("cpu", row.ctypes.data), 1)
        return row

    def read_rows(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """Host copies of several rows: float32 [k, S] (k = 0 allowed). On CUDA, each run of
        consecutive slots is one copy (live sessions sit packed at the low slots)."""
        slots = [self._check_slot(s, "slots") for s in slots]
        self._count(rows_out=len(slots))
        if self.array is not None:
            return self.array[slots]
        out = np.empty((len(slots), self.state_size), dtype=np.float32)  # [k, S]
        order = sorted(range(len(slots)), key=slots.__getitem__)
        i = 0
        while i < len(order):
            j = i + 1  # order[i:j]: slots ascending by one
            while j < len(order) and slots[order[j]] == slots[order[j - 1]] + 1:
                j += 1
            run = np.empty((j - i, self.state_size), dtype=np.float32)
            self._copy(("cuda", self._ptr(slots[order[i]])), ("cpu", run.ctypes.data), j - i)
            out[order[i:j]] = run
            i = j
        return out

    def write(self, slot: int, state: np.ndarray) -> None:
        """Set one row to `state` (float32 [S], finite: checked by the caller)."""
        slot = self._check_slot(slot)
        state = np.ascontiguousarray(state, dtype=np.float32)
        if state.shape != (self.state_size,):
            raise InvalidInput("state", f"must have shape [{self.state_size}], got {state.shape}")
        self._count(rows_in=1)
        if self.array is not None:
            self.array[slot] = state
        else:
            self._copy(("cpu", state.ctypes.data), ("cuda", self._ptr(slot)), 1)

    def zero(self, slot: int) -> None:
        """Row `slot` = zeros: the state of a stream before its first input."""
        self.write(slot, np.zeros(self.state_size, dtype=np.float32))

    def copy(self, src: int, dst: int) -> None:
        """Row dst = row src, on the device."""
        src, dst = self._check_slot(src, "src"), self._check_slot(dst, "dst")
        self._count(rows_in=1, rows_out=1)
        if self.array is not None:
            self.array[dst] = self.array[src]
        else:
            self._copy(("cuda", self._ptr(src)), ("cuda", self._ptr(dst)), 1)
