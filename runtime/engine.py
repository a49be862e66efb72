"""Engine: runs an exported model's step and prefill graphs with onnxruntime (no torch).

The exported step graph is the recurrence of the whole network, one time step for a
batch of B independent streams:

    x_k = Ā x_{k-1} + B̄ u_k,   y_k = C x_k + D u_k      (per layer, with the MLP in between)
    step(input [B] | [B, d_in], state [B, S]) -> (output [B, d_out], state_out [B, S])

and the prefill graph computes T such steps at once (chunked scan):

    prefill(input [B, T] | [B, T, d_in], state [B, S][, length]) -> (output [B, T, d_out],
                                                                   state_out [B, S], ...)

with T a multiple of the manifest's `graphs.prefill.chunk` and at most its `max_len`; graphs
exported since the optional `length` input (`prefill_any_length`) also take a last chunk
that ends in padding, `length` saying how many inputs are real. `Engine.prefill` accepts any
T: the prefill graph takes it in pieces of at most max_len (a last partial chunk padded when
the graph takes `length`, unless that call would hold under half a chunk; older graphs: whole
chunks only), the step graph the rest.

This is the edge embedding API:

    eng = Engine("model/")                    # CUDA when usable, else CPU
    s = eng.new_state()                       # float32 [1, S] zeros
    out, s = eng.step(np.array([tok]), s)     # out: [1, d_out]

On CUDA the provider takes `CudaOptions` (device id, arena growth, cuDNN conv algorithm
search, TF32, CUDA graphs of the slot steps: `enable_cuda_graph`, see `run_slots`).

`step` returns fresh arrays. For a loop that allocates nothing in steady state, pass
preallocated `StepBuffers` (`out=eng.step_buffers(max_batch)`): onnxruntime writes into
them through a cached IOBinding and the returned arrays are views of them.

Served sessions keep their states where the model runs: `new_slab(capacity)` gives a
StateSlab [capacity, S] on the engine's device (runtime/slab.py), and
`step_slots(inputs, slots, slab)` steps the rows `slots` of it in one onnxruntime call of
the *slot graph* (derived from step.onnx when the model opens): it gathers the rows, steps
them and scatters the new states back in place; only inputs, slots and outputs cross
host↔device.

    slab = eng.new_slab(1024)
    y = eng.step_slots(np.array([tok_a, tok_b]), [3, 17], slab)   # rows 3 and 17 step

Dimension letters: B batch, T time steps, S packed state size, V vocabulary,
d_in / d_out input / output features.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Generator, Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import EngineFailure, InvalidInput, ModelError, as_array, as_tokens, integer, zeros
from .generation import GenerateConfig, Generation
from .manifest import METADATA_KEY, load_manifest
from .providers import (
    MAX_THREADS,
    STEP_THREADS,
    CudaOptions,
    cuda_usable,
    session_options,
    trim_heap,
)
from .slab import SLOT_OUTPUT, StateSlab, slot_model

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
GRAPH_INPUTS = ("input", "state")
GRAPH_OUTPUTS = ("output", "state_out")
CHUNK_STATES = (
    "chunk_states"  # optional prefill output [B, T / chunk, S]: the state after each chunk
)
# optional prefill input int64 []: how many inputs are real (the last chunk may end in padding)
LENGTH = "length"
# manifest fields checked against the copy embedded in each graph (Engine._check_embedded)
EMBEDDED_FIELDS = ("input_kind", "vocab_size", "d_input", "d_output", "state_size", "dtype")
GRAPH_FIELDS = ("chunk", "max_len")  # ... and these of graphs.<name>
_ORT_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


# Generate samples the next input from the outputs (logits): more outputs than the vocabulary
# would sample ids the model cannot take (fewer: it samples among the first d_output ids)
NOT_LOGITS = (
    "generate samples token ids from the outputs; this model's d_output={} is more than its "
    "vocab_size={}"
)


# onnxruntime runs a CUDA-graph session normally this many times (its default
# min_num_runs_before_cuda_graph_capture is 2) and captures on the next run; a bucket's
# first runs step only the scratch row: with the slab bound as both input and output, the
# runs before the capture would otherwise step the batch's rows more than once.
GRAPH_WARMUPS = 4


class _Graph:
    """One CUDA-graph bucket of b rows: fixed device buffers for inputs, slots and outputs
    (a captured graph replays with the addresses it was captured with), host staging for
    them, the IOBinding and the RunOptions naming the graph."""

    def __init__(self, engine: Engine, slab: StateSlab, b: int):
        dev, did = slab.device, slab.device_id
        self.slab = slab  # the graph replays with its buffer (and keeps id(slab) taken)
        self.x_host = np.zeros((b, *engine._step_in_shape), dtype=engine._step_in_dtype)
        self.slots_host = np.full((b, 1), slab.scratch, dtype=np.int64)  # [b, 1]
        new = ort.OrtValue.ortvalue_from_shape_and_type
        self.x = new(list(self.x_host.shape), self.x_host.dtype, dev, did)
        self.slots = new([b, 1], np.int64, dev, did)
        self.y = new([b, engine.d_output], engine._out_dtype, dev, did)
        self.io = engine._slot_session.io_binding()
        self.io.bind_ortvalue_input("input", self.x)
        self.io.bind_ortvalue_input("slots", self.slots)
        self.io.bind_ortvalue_input("slab", slab.value)
        self.io.bind_ortvalue_output(SLOT_OUTPUT, slab.value)
        self.io.bind_ortvalue_output("output", self.y)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(next(engine._graph_ids)))
        self.x.update_inplace(self.x_host)
        self.slots.update_inplace(self.slots_host)  # all slots = scratch: no session moves
        for _ in range(GRAPH_WARMUPS):
            engine._slot_session.run_with_iobinding(self.io, self.run_options)


# State bytes per onnxruntime call on the StepBuffers path: a larger batch runs as several
# calls on row slices. A chunk that fits the per-core L2 cache with its outputs and
# intermediates costs less per stream than one call over the whole batch (benchmarks/
# bench_runtime.py, "chunked steps"); outputs are the same row by row whatever the chunks
# (the step graph has no op whose rounding depends on the row count).
STEP_CHUNK_BYTES = 2 << 20


class StepBuffers:
    """Preallocated arrays for allocation-free steps of up to `max_batch` streams.

    inputs [max_batch] | [max_batch, d_in], states [max_batch, S], slots int64
    [max_batch, 1]: for the caller to fill; outputs [max_batch, d_out], new_states
    [max_batch, S]: written by `Engine.step(..., out=self)` (outputs also by `run_slots`).
    `Engine.step` runs as onnxruntime calls of at most `chunk_rows` streams (`chunk_bytes` of
    state each, at least one stream; the Batcher splits its slot steps the same way); one
    IOBinding per (first row, rows) is cached, and one per (slab, B) for slot steps. Use one
    StepBuffers from one thread at a time (steps of two threads through one at once write
    each other's rows: wrong results, not an error); the arrays a step returns are views
    that the next step with these buffers overwrites.
    """

    def __init__(self, engine: Engine, max_batch: int, chunk_bytes: int = STEP_CHUNK_BYTES):
        max_batch, chunk_bytes = (
            integer(max_batch, "max_batch", 1),
            integer(chunk_bytes, "chunk_bytes", 1),
        )
        S = engine.state_size
        self.engine, self.max_batch = engine, max_batch
        self.chunk_rows = max(1, min(max_batch, chunk_bytes // (4 * S)))
        self.states = zeros((max_batch, S), np.float32, "max_batch")  # [max_batch, S]
        self.new_states = zeros((max_batch, S), np.float32, "max_batch")  # [max_batch, S]
        self.inputs = np.zeros((max_batch, *engine._step_in_shape), dtype=engine._step_in_dtype)
        self.outputs = np.zeros((max_batch, engine.d_output), dtype=engine._out_dtype)
        self.slots = np.zeros((max_batch, 1), dtype=np.int64)  # [max_batch, 1]
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._slot_bindings: dict[int, ort.IOBinding] = {}  # B -> binding, for self._slab
        self._slab: StateSlab | None = None
        self._values: list[ort.OrtValue] = []  # keeps the bound OrtValues alive

    def binding(self, start: int, B: int) -> ort.IOBinding:
        """The IOBinding whose outputs are outputs[start:start + B], new_states[start:start + B]."""
        io = self._bindings.get((start, B))
        if io is None:
            eng, rows = self.engine, slice(start, start + B)
            io = eng._step_session.io_binding()
            for name, arr in (("output", self.outputs[rows]), ("state_out", self.new_states[rows])):
                value = ort.OrtValue.ortvalue_from_numpy(arr)  # host memory; ORT copies into it
                io.bind_ortvalue_output(name, value)
                self._values.append(value)
            self._bindings[(start, B)] = io
        return io

    def slot_binding(self, slab: StateSlab, B: int) -> ort.IOBinding:
        """The IOBinding of a slot step of B rows of `slab`: inputs[:B], slots[:B] and
        outputs[:B] bound by address, `slab` as both `slab` and `slab_out` (one buffer)."""
        if slab is not self._slab:  # the bindings hold one slab's buffer
            self._slot_bindings.clear()
            self._slab = slab
        io = self._slot_bindings.get(B)
        if io is None:
            eng = self.engine
            io = eng._slot_session.io_binding()
            x = self.inputs[:B]
            io.bind_input("input", "cpu", 0, x.dtype, list(x.shape), x.ctypes.data)
            io.bind_input("slots", "cpu", 0, np.int64, [B, 1], self.slots.ctypes.data)
            io.bind_ortvalue_input("slab", slab.value)
            io.bind_ortvalue_output(SLOT_OUTPUT, slab.value)
            y = self.outputs[:B]
            io.bind_output("output", "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)
            self._slot_bindings[B] = io
        return io


class Engine:
    """An exported model opened with onnxruntime (see the module docstring).

    Args:
        model_dir: directory with manifest.json, step.onnx and (optionally) prefill.onnx.
        device: "auto" (CUDA when usable, else CPU), "cpu" or "cuda" (an error when not usable).
        threads: onnxruntime intra-op threads of the prefill graph (None: all cores of this
            process).
        step_threads: intra-op threads of the step graph (None: `STEP_THREADS`, i.e. the
            calling thread alone: a step is ~100 small kernels, more threads only add
            synchronization). No pool spins while idle (providers.py).
        cuda_options: CudaOptions or a dict of its fields (e.g. {"device_id": 0}); checked
            even when CUDA is not used.
        check_sha: verify each graph file against the manifest's sha256.

    Attributes: manifest, info, provider, device ("cpu" | "cuda"), device_id, cuda_options,
    input_kind, vocab_size, d_input, d_output, state_size, prefill_chunk (None without a
    prefill graph), prefill_max_len, prefill_any_length (the prefill graph takes a padded last
    chunk: prompts of any length run in it), cuda_graphs (slot steps replay CUDA graphs),
    slot_row_bytes ((in, out) host<->device bytes per row of a slot step).
    Thread-safe: `step`, `prefill` and `generate` calls may come from several threads at
    once. StepBuffers excepted: one shared by threads at once gives wrong outputs and states,
    and nothing checks (use a StepBuffers per thread).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "auto",
        threads: int | None = None,
        cuda_options: CudaOptions | dict | None = None,
        check_sha: bool = True,
        step_threads: int | None = None,
    ):
        if device not in DEVICES:
            raise InvalidInput("device", f"must be one of {DEVICES}, got {device!r}")
        threads = integer(threads, "threads", 1, MAX_THREADS, none=True)
        step_threads = integer(step_threads, "step_threads", 1, MAX_THREADS, none=True)
        self.cuda_options = CudaOptions.parse(cuda_options)
        m = self.manifest = load_manifest(model_dir, check_sha=check_sha)  # (checks the path)
        self.model_dir = Path(model_dir)
        self.name = str(m["name"])
        self.input_kind = m["input_kind"]
        self.vocab_size = m.get("vocab_size")
        self.d_input = m.get("d_input")
        self.d_output = int(m["d_output"])
        self.state_size = int(m["state_size"])

        if device != "cpu":  # decided once: one log line when CUDA is not usable
            usable, why = cuda_usable()
            if not usable and device == "cuda":
                raise InvalidInput(
                    "device",
                    f"'cuda' requested but CUDA is not usable: {why} "
                    "(install onnxruntime-gpu and a CUDA driver, or choose cpu or auto)",
                )
            if not usable:
                log.info("CUDA not usable (%s); running on CPU", why)
                device = "cpu"
        providers = self._providers(device, "step")
        slot_providers = self._providers(device, "slots")
        opts = session_options(step_threads or STEP_THREADS)
        graphs = m["graphs"]
        try:
            self._step_session = self._open(graphs["step"]["file"], opts, providers)
        except ModelError as e:
            if device != "auto" or len(providers) == 1:
                raise
            log.warning("CUDA session failed (%s); falling back to CPU", e)
            providers = ["CPUExecutionProvider"]
            self._step_session = self._open(graphs["step"]["file"], opts, providers)
        self.provider = self._step_session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise InvalidInput("device", f"'cuda' requested but onnxruntime runs {self.provider}")
        on_cuda = self.provider == "CUDAExecutionProvider"
        if not on_cuda:  # onnxruntime fell back by itself: the other graphs ask for CPU alone
            providers = slot_providers = ["CPUExecutionProvider"]
        self.device = "cuda" if on_cuda else "cpu"
        self.device_id = self.cuda_options.device_id if on_cuda else 0
        self.cuda_graphs = on_cuda and bool(self.cuda_options.enable_cuda_graph)
        if self.cuda_options.enable_cuda_graph and not on_cuda:
            log.warning("CUDA graphs requested, but the engine runs on %s: not used", self.provider)
        if self.cuda_options.use_tf32 and not on_cuda:
            log.warning("TF32 requested, but the engine runs on %s: not used", self.provider)
        self._graph_ids = itertools.count(1)  # one gpu_graph_id per captured bucket
        self._graphs: dict[tuple[int, int], _Graph] = {}  # (id(slab), rows) -> its graph
        self._graph_lock = threading.Lock()  # one graph run (its staging buffers) at a time
        self._prefill_session = None
        self.prefill_chunk = self.prefill_max_len = None
        if "prefill" in graphs:
            prefill_providers = self._providers("cuda", "prefill") if on_cuda else providers
            self._prefill_session = self._open(
                graphs["prefill"]["file"], session_options(threads), prefill_providers
            )
            trim_heap()  # ORT frees the prefill's build-time tables but glibc keeps the pages
            self._check_embedded(self._prefill_session, "prefill")
            self.prefill_chunk = int(graphs["prefill"].get("chunk", 1))
            max_len = int(graphs["prefill"].get("max_len", 0)) or 4096
            self.prefill_max_len = max(self.prefill_chunk, max_len - max_len % self.prefill_chunk)
        self._check_embedded(self._step_session, "step")
        self._check_graph(self._step_session, "step", time_axis=False)
        self.prefill_chunk_states = False  # the prefill graph reports chunk-end states
        self.prefill_any_length = False  # ... and takes `length` (graphs exported since)
        if self._prefill_session is not None:
            self._check_graph(self._prefill_session, "prefill", time_axis=True)
            outs = [o.name for o in self._prefill_session.get_outputs()]
            self.prefill_chunk_states = CHUNK_STATES in outs
            defaults = self._prefill_session.get_overridable_initializers()
            self.prefill_any_length = LENGTH in {i.name for i in defaults}
        step_in = self._step_session.get_inputs()[0]
        self._step_in_dtype = np.dtype(_ORT_TYPES[step_in.type])
        self._step_in_shape = () if self.input_kind == "tokens" else (self.d_input,)
        # an fp16 export casts its float32 values to float16 in the graph: larger ones are inf
        self._value_limit = float(np.finfo(np.float16).max) if m["dtype"] == "fp16" else None
        self._out_dtype = np.dtype(_ORT_TYPES[self._step_session.get_outputs()[0].type])
        slot_graph = slot_model(
            (self.model_dir / graphs["step"]["file"]).read_bytes(), self.state_size
        )
        # host<->device bytes per row of a slot step: input and slot in, outputs out
        row_in = self._step_in_dtype.itemsize * (self.d_input or 1) + 8
        self.slot_row_bytes = (row_in, self._out_dtype.itemsize * self.d_output)
        try:
            self._slot_session = self._open(
                graphs["step"]["file"], opts, slot_providers, slot_graph
            )
        except ModelError as e:
            if not self.cuda_graphs:
                raise
            # e.g. onnxruntime placed a node on the CPU: no CUDA graph for this model
            log.warning("CUDA graphs unavailable for this model (%s); stepping without them", e)
            self.cuda_graphs = False
            self._slot_session = self._open(graphs["step"]["file"], opts, providers, slot_graph)
        self.info = self._make_info()
        cuda = f" {self.cuda_options.provider_options()}" if self.device == "cuda" else ""
        prefill = self._prefill_session  # its pool's size as the session holds it
        pool = (
            f"; prefill on {prefill.get_session_options().intra_op_num_threads} threads"
            if prefill is not None
            else ""
        )
        log.info(
            "opened %r from %s (step sha256 %s…; %s, S=%d, %s) on %s%s%s", self.name,
            self.model_dir, self.info["step_sha256"][:12], self.input_kind, self.state_size,
            m["dtype"], self.provider, cuda, pool,
        )  # fmt: skip

    # --- opening -------------------------------------------------------------------------

    def _providers(self, device: str, graph: str) -> list:
        """The provider list for `graph` on `device` (CUDA first unless "cpu"; the caller
        has checked that CUDA is usable)."""
        if device == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", self.cuda_options.provider_options(graph))
        return [cuda, "CPUExecutionProvider"]

    def _open(
        self, file: str, opts: ort.SessionOptions, providers: list, model: bytes | None = None
    ) -> ort.InferenceSession:
        """An onnxruntime session of `file` (or of `model`, bytes derived from it)."""
        path = self.model_dir / file
        if model is not None:  # bytes: say where external weights (if any) are
            key = "session.model_external_initializers_file_folder_path"
            opts.add_session_config_entry(key, str(self.model_dir))
        try:
            return ort.InferenceSession(model or str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own unrelated exception types
            what = f"the slot graph of {path}" if model else path
            raise ModelError(f"onnxruntime cannot open {what}: {e}") from e

    def _check_embedded(self, session: ort.InferenceSession, name: str) -> None:
        """The manifest's shape fields against the copy the exporter embedded in the graph
        itself (metadata "ssmstream.manifest", covered by the graph's sha256): an edited
        manifest.json must not make the runtime check inputs against another vocabulary, size
        its outputs wrong or call the graph with the wrong chunk."""
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if not text:
            return  # a graph written without it (by hand, or by an older exporter)
        entry = self.manifest["graphs"][name]
        try:
            own = json.loads(text)
            graph = own["graphs"].get(name, {})
            fields = [(k, self.manifest.get(k), own[k]) for k in EMBEDDED_FIELDS if k in own]
            fields += [
                (f"graphs.{name}.{k}", entry.get(k), graph[k]) for k in GRAPH_FIELDS if k in graph
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        for key, given, exported in fields:
            if given != exported:
                raise ModelError(
                    f"manifest.json: {key} is {given!r}, the {name} graph was exported with "
                    f"{exported!r}: the manifest was edited; re-export the model"
                )

    def _check_graph(self, sess: ort.InferenceSession, name: str, time_axis: bool) -> None:
        """The graph's I/O names, ranks and state size match the contract and manifest."""
        ins = {i.name: i for i in sess.get_inputs()}
        outs = {o.name: o for o in sess.get_outputs()}
        extra = {CHUNK_STATES} if time_axis else set()  # the prefill may also give chunk ends
        if set(ins) != set(GRAPH_INPUTS) or not set(GRAPH_OUTPUTS) <= set(outs) <= {
            *GRAPH_OUTPUTS,
            *extra,
        }:
            raise ModelError(
                f"{name} graph has inputs {sorted(ins)} and outputs {sorted(outs)}; "
                f"expected {list(GRAPH_INPUTS)} -> {list(GRAPH_OUTPUTS)}"
            )
        lead = 2 if time_axis else 1
        rank = lead if self.input_kind == "tokens" else lead + 1
        if len(ins["input"].shape) != rank:
            raise ModelError(
                f"{name} graph input has rank {len(ins['input'].shape)}, expected {rank}"
            )
        for arg in (ins["state"], outs["state_out"]):
            if arg.shape[-1] != self.state_size or arg.type != "tensor(float)":
                raise ModelError(
                    f"{name} graph {arg.name} is {arg.type} {arg.shape}; "
                    f"manifest says float32 [B, {self.state_size}]"
                )
        for arg in (ins["input"], outs["output"]):
            if arg.type not in _ORT_TYPES:
                raise ModelError(f"{name} graph {arg.name} has unsupported type {arg.type}")

    def _make_info(self) -> dict:
        m, g = self.manifest, self.manifest["graphs"]
        return {
            "name": self.name,
            "input_kind": self.input_kind,
            "vocab_size": self.vocab_size,
            "d_input": self.d_input,
            "d_output": self.d_output,
            "state_size": self.state_size,
            "state_bytes": 4 * self.state_size,
            "dtype": m["dtype"],
            "provider": self.provider,
            "device": self.device,
            "step_sha256": g["step"].get("sha256", ""),  # absent while being exported
            "prefill_sha256": g["prefill"].get("sha256") if "prefill" in g else None,
            "prefill_chunk": self.prefill_chunk,
            "prefill_max_len": self.prefill_max_len,
            "prefill_any_length": self.prefill_any_length,
            "opset": m.get("opset"),
            "dt_scale": m.get("dt_scale"),
            "model": m.get("model", {}),
            "parity_passed": (m.get("parity") or {}).get("passed"),
            "model_dir": str(self.model_dir),
        }

    @property
    def step_session(self) -> ort.InferenceSession:
        """The onnxruntime session of step.onnx (for benchmarks and advanced use)."""
        return self._step_session

    # --- validation ----------------------------------------------------------------------

    def new_state(self, batch: int = 1) -> np.ndarray:
        """Zero states: float32 [batch, S]."""
        return zeros((integer(batch, "batch", 1), self.state_size), np.float32, "batch")

    def step_buffers(self, max_batch: int = 1, chunk_bytes: int = STEP_CHUNK_BYTES) -> StepBuffers:
        """Preallocated buffers for `step(..., out=buffers)` and `run_slots` (see StepBuffers)."""
        return StepBuffers(self, max_batch, chunk_bytes)

    def new_slab(self, capacity: int) -> StateSlab:
        """A zeroed StateSlab [capacity, S] on this engine's device (runtime/slab.py)."""
        return StateSlab(
            capacity, self.state_size, self.device, self.device_id, scratch=self.cuda_graphs
        )

    def check_inputs(
        self, inputs, field: str = "inputs", time_axis: bool = False, lead: str | None = None
    ) -> np.ndarray:
        """Validate and convert model inputs; raise InvalidInput naming `field`.

        time_axis=False: tokens int [B] (a scalar is [1]) or values float [B, d_in].
        time_axis=True:  tokens int [B, T] or values float [B, T, d_in], T >= 1.
        Tokens must lie in [0, vocab_size) (bytes are byte ids); values must be finite. `lead`
        names the leading dimensions in messages (default "B" / "B, T"; the Batcher checks one
        request, "T").
        Returns a C-contiguous int64 / float32 (the graph's input dtype) array.
        """
        x = as_tokens(inputs, field) if self.input_kind == "tokens" else as_array(inputs, field)
        if x.dtype == np.int64 and x.ndim == (2 if time_axis else 1) and x.size:
            # fast path for the common case: int64 tokens of the right rank
            if self.input_kind == "tokens" and x.flags.c_contiguous:
                lo, hi = (int(x.flat[0]),) * 2 if x.size == 1 else (x.min(), x.max())
                if lo >= 0 and hi < self.vocab_size:
                    return x
        lead = lead or ("B, T" if time_axis else "B")
        kind = "" if field == self.input_kind else f"{self.input_kind} "  # not "tokens: tokens …"
        if self.input_kind == "tokens":
            if x.ndim == 0 and not time_axis:
                x = x.reshape(1)
            if x.dtype.kind not in "iu" and x.size:  # an empty list is float64: said empty
                raise InvalidInput(field, f"must be integer token ids, got dtype {x.dtype}")
            if x.ndim != (2 if time_axis else 1) or x.size == 0:
                raise InvalidInput(
                    field, f"{kind}must have shape [{lead}] (non-empty), got {x.shape}"
                )
            if x.dtype.kind == "u":
                bad = x >= self.vocab_size
            else:
                bad = (x < 0) | (x >= self.vocab_size)
            if bad.any():
                v = x[bad].flat[0]
                raise InvalidInput(field, f"token {v} is outside [0, vocab_size={self.vocab_size})")
            return np.ascontiguousarray(x, dtype=np.int64)
        if x.dtype.kind not in "fiu":
            raise InvalidInput(field, f"{kind}must be real numbers, got dtype {x.dtype}")
        rank = 3 if time_axis else 2
        if x.ndim != rank or x.shape[-1] != self.d_input or x.size == 0:
            raise InvalidInput(
                field, f"{kind}must have shape [{lead}, d_input={self.d_input}], got {x.shape}"
            )
        with np.errstate(over="ignore"):  # an overflow to inf is reported just below
            x = np.ascontiguousarray(x, dtype=self._step_in_dtype)
        if not np.isfinite(x).all():
            raise InvalidInput(field, f"{kind}contain NaN or inf (or overflow float32)")
        if self._value_limit is not None and np.abs(x).max() > self._value_limit:
            raise InvalidInput(
                field,
                f"{kind or 'any '}beyond ±{self._value_limit:g} overflow this fp16 export's inputs",
            )
        return x

    def check_states(self, states, batch: int, field: str = "states") -> np.ndarray:
        """float32 [batch, S] (C-contiguous; converted if needed) or InvalidInput."""
        s = as_array(states, field)
        if s.dtype == np.float32 and s.shape == (batch, self.state_size) and s.flags.c_contiguous:
            return s
        if s.shape != (batch, self.state_size):
            raise InvalidInput(
                field, f"must have shape [{batch}, S={self.state_size}], got {s.shape}"
            )
        if s.dtype != np.float32:
            if s.dtype.kind != "f":
                raise InvalidInput(field, f"must be float32, got {s.dtype}")
            with np.errstate(over="ignore"):  # an overflow to inf is reported just below
                s32 = s.astype(np.float32)
            if (np.isinf(s32) & np.isfinite(s)).any():
                raise InvalidInput(field, "has values beyond the float32 range (±3.4e38)")
            s = s32
        return np.ascontiguousarray(s)

    # --- running -------------------------------------------------------------------------

    def step(self, inputs, states, out: StepBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One time step for B streams.

        Args:
            inputs: tokens int [B] (or a scalar) | values float [B, d_in].
            states: float32 [B, S]. Not checked for NaN or inf (np.isfinite added 17% at
                B = 1 and 30% at B = 64 to the shipped model's step on a 2-core CPU): a
                state gone bad gives NaN outputs; `generate` refuses one.
            out: optional StepBuffers (B <= out.max_batch) to write into instead of allocating.
        Returns:
            (outputs [B, d_out], new_states float32 [B, S]); `states` is not modified.
        Raises InvalidInput (bad inputs or states), EngineFailure (onnxruntime failed).
        """
        x = self.check_inputs(inputs, "inputs")
        s = self.check_states(states, x.shape[0])
        return self.step_unchecked(x, s, out)

    def step_unchecked(
        self, x: np.ndarray, s: np.ndarray, out: StepBuffers | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`step` for inputs already returned by check_inputs / check_states (no validation)."""
        B = x.shape[0]
        try:
            if out is None:
                y, s_new = self._step_session.run(None, {"input": x, "state": s})
                return y, s_new
            self._check_buffers(out)
            if B > out.max_batch:
                raise InvalidInput("out", f"holds {out.max_batch} streams, the batch has {B}")
            if np.may_share_memory(s, out.new_states):
                raise InvalidInput("states", "must not share memory with out.new_states")
            c = out.chunk_rows
            for i in range(0, B, c):  # [c] / [c, d_in], [c, S] row slices: contiguous
                io = out.binding(i, min(c, B - i))
                io.bind_cpu_input("input", x[i : i + c])
                io.bind_cpu_input("state", s[i : i + c])
                self._step_session.run_with_iobinding(io)
            return out.outputs[:B], out.new_states[:B]
        except InvalidInput:
            raise
        except Exception as e:  # onnxruntime's own exception types (Fail, RuntimeException, ...)
            raise EngineFailure(f"step graph failed for batch {B}: {e}") from e

    def _check_buffers(self, out: StepBuffers) -> None:
        if not isinstance(out, StepBuffers) or out.engine is not self:
            raise InvalidInput("out", "must be StepBuffers of this engine (step_buffers())")

    def step_slots(
        self, inputs, slots, slab: StateSlab, out: StepBuffers | None = None
    ) -> np.ndarray:
        """One time step for the sessions whose states are the rows `slots` of `slab`: their
        new states are written over those rows, in one onnxruntime call.

        Args:
            inputs: tokens int [B] | values float [B, d_in]; row i for slot slots[i].
            slots: B distinct row numbers of `slab`.
            slab: a StateSlab of this engine (`new_slab`).
            out: optional StepBuffers (B <= out.max_batch) to run in; the outputs are then a
                view of out.outputs.
        Returns outputs [B, d_out]. Raises InvalidInput (nothing runs), EngineFailure (the
        slab is unchanged: the scatter is the graph's last node).
        """
        if not isinstance(slab, StateSlab):
            raise InvalidInput("slab", "must be a StateSlab of this engine (new_slab)")
        x = self.check_inputs(inputs, "inputs")
        rows = slab.check_slots(slots)
        B = x.shape[0]
        if rows.shape[0] != B:
            raise InvalidInput("slots", f"has {rows.shape[0]} slots for {B} inputs")
        if (slab.device, slab.device_id, slab.state_size) != (
            self.device, self.device_id, self.state_size
        ):  # fmt: skip
            raise InvalidInput("slab", f"{slab!r} is not a slab of this engine ({self.device})")
        if out is not None:
            self._check_buffers(out)
        buf = out if out is not None else StepBuffers(self, B)
        if B > buf.max_batch:
            raise InvalidInput("out", f"holds {buf.max_batch} streams, the batch has {B}")
        buf.inputs[:B] = x
        buf.slots[:B] = rows
        y = self.run_slots(slab, B, buf)
        return y if out is not None else y.copy()

    def run_slots(self, slab: StateSlab, B: int, out: StepBuffers) -> np.ndarray:
        """`step_slots` on inputs and slots already in out.inputs[:B] and out.slots[:B],
        valid (checked inputs; distinct slots of `slab`): the Batcher's per-token path.
        Returns outputs [B, d_out], a view of out.outputs.

        With CUDA graphs (`cuda_graphs`: CudaOptions enable_cuda_graph on CUDA) the batch
        runs in the captured graph of its bucket (the next power of two, b rows): inputs
        and slots are padded (slots with the slab's scratch row) and copied into the
        bucket's fixed device buffers; b rows of inputs, slots and outputs cross.
        """
        try:
            if self.cuda_graphs:
                with self._graph_lock:
                    g = self._graphs.get((id(slab), 1 << (B - 1).bit_length()))
                    if g is None:  # not captured at start (a Batcher captures its buckets)
                        g = self.capture_graphs(slab, B)[-1]
                    g.x_host[:B] = out.inputs[:B]
                    g.slots_host[:B] = out.slots[:B]
                    g.slots_host[B:] = slab.scratch
                    g.x.update_inplace(g.x_host)
                    g.slots.update_inplace(g.slots_host)
                    self._slot_session.run_with_iobinding(g.io, g.run_options)
                    y = g.y.numpy()  # [b, d_out] on the host
                out.outputs[:B] = y[:B]
                rows = len(y)  # the bucket's: its padding crosses too
            else:
                self._slot_session.run_with_iobinding(out.slot_binding(slab, B))
                rows = B
        except InvalidInput:
            raise
        except Exception as e:  # onnxruntime's own exception types
            raise EngineFailure(f"slot step failed for batch {B}: {e}") from e
        st = slab.stats
        st.steps += 1
        st.step_bytes_in += rows * self.slot_row_bytes[0]
        st.step_bytes_out += rows * self.slot_row_bytes[1]
        return out.outputs[:B]

    def capture_graphs(self, slab: StateSlab, max_batch: int) -> list[_Graph]:
        """The CUDA graphs of `slab`'s slot steps for the buckets 1, 2, 4, ... up to the one
        of `max_batch` rows, captured now where missing (a capture runs GRAPH_WARMUPS times
        on the scratch row). The Batcher captures its buckets before serving: a capture
        must not run while other threads copy slab rows on the device."""
        if slab.scratch is None:
            raise InvalidInput(
                "slab", "CUDA graph steps need a slab with a scratch row (Engine.new_slab)"
            )
        graphs, b = [], 1
        while True:
            key = (id(slab), b)
            if key not in self._graphs:
                self._graphs[key] = _Graph(self, slab, b)
            graphs.append(self._graphs[key])
            if b >= max_batch:
                return graphs
            b *= 2

    def prefill(self, inputs, states) -> tuple[np.ndarray, np.ndarray]:
        """T time steps for B streams: full chunks via the prefill graph, the rest via step.

        Args:
            inputs: tokens int [B, T] | values float [B, T, d_in], T >= 1.
            states: float32 [B, S].
        Returns:
            (outputs [B, T, d_out], new_states float32 [B, S]), equal to T calls of `step`.
        """
        x = self.check_inputs(inputs, "inputs", time_axis=True)
        s = self.check_states(states, x.shape[0])
        return self.prefill_unchecked(x, s)

    def _prefill_span(self, T: int) -> int:
        """How many of T inputs go through the prefill graph (the rest is stepped).

        Whole chunks always. With `prefill_any_length` also the r inputs after them, in a
        chunk padded in the same call, when that beats stepping them: measured on this
        project's CPU (shipped model, C = 64), a padded chunk added to a call of whole chunks
        costs about 10-16 steps, a call of one padded chunk alone about 28; so r ≥ C/4, or
        r ≥ C/2 when the call has no whole chunk."""
        C, L = self.prefill_chunk, self.prefill_max_len
        if self._prefill_session is None or T < 2:
            return 0
        r = T % C
        if not self.prefill_any_length or not r:
            return T - r
        alone = T % L < C  # the last call would hold the padded chunk only
        return T if r >= (C // 2 if alone else C // 4) else T - r

    def prefill_unchecked(
        self, x: np.ndarray, s: np.ndarray, states: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`prefill` for inputs already validated (check_inputs(time_axis=True), check_states).

        states: when a dict, it is filled with {t: the state after the first t inputs,
        float32 [B, S]} at every chunk end the prefill graph reports (`prefill_chunk_states`;
        else at the end of each prefill graph call) and at T.
        """
        B, T = x.shape[:2]
        outputs = np.empty((B, T, self.d_output), dtype=self._out_dtype)  # [B, T, d_out]
        t = 0
        C = self.prefill_chunk
        names = ["output", "state_out"]
        if states is not None and self.prefill_chunk_states:
            names.append(CHUNK_STATES)
        end = self._prefill_span(T)  # inputs [0, end) go through the prefill graph
        while t < end:
            n = min(end - t, self.prefill_max_len)
            feed = {"input": np.ascontiguousarray(x[:, t : t + n]), "state": s}  # [B, n(, d_in)]
            if n % C:  # a last chunk of padding after the n inputs; the graph is told n
                pad = np.zeros((B, C - n % C, *x.shape[2:]), dtype=x.dtype)
                feed["input"] = np.concatenate([feed["input"], pad], 1)  # [B, ⌈n / C⌉·C(, d_in)]
                feed[LENGTH] = np.array(n, dtype=np.int64)
            try:
                y, s, *ends = self._prefill_session.run(names, feed)
            except Exception as e:  # onnxruntime's own exception types
                raise EngineFailure(f"prefill graph failed for [B={B}, T={n}]: {e}") from e
            outputs[:, t : t + n] = y[:, :n]
            if states is not None:
                for k in range(n // C if ends else 0):  # ends[0]: [B, ⌈n / C⌉, S]
                    states[t + (k + 1) * C] = ends[0][:, k]
                states[t + n] = s
            t += n
        while t < T:
            y, s = self.step_unchecked(np.ascontiguousarray(x[:, t]), s)
            outputs[:, t] = y
            t += 1
        if states is not None:
            states[T] = s
        return outputs, s

    # --- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt: int | Iterable[int],
        state: np.ndarray | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[int] = (),
    ) -> Generator[int, None, None]:
        """Stream sampled tokens after `prompt` (token models only).

        Args:
            prompt: at least one token id not yet fed to `state` (sampling starts from
                the logits of the last one); a single id may be given as an int. After a
                generate the state holds every yielded token too: to continue, send only
                tokens that came after them.
            state: None (start from zeros) or a finite float32 [S] / [1, S] array, updated in place:
                once iteration has started and the iterator ends or is closed, it holds the
                state after the prompt and every token yielded (the step for the last one
                runs only then). The prompt is consumed at the first `next()`, as it was
                when generate was called.
            max_new_tokens: at most this many tokens are yielded.
            temperature, top_k, top_p, seed: see runtime/sampling.py.
            stop: token ids that end the generation (the stop token is yielded).
        Returns:
            an iterator of ints. Arguments are checked here, before the first token.
        """
        if self.input_kind != "tokens":
            raise InvalidInput("prompt", "generate needs a token model; this model takes values")
        if self.d_output > self.vocab_size:
            raise ModelError(NOT_LOGITS.format(self.d_output, self.vocab_size))
        if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool):
            prompt = [prompt]
        elif not isinstance(prompt, (np.ndarray, Iterable)):
            raise InvalidInput("prompt", f"must be token ids, got {type(prompt).__name__}")
        elif not isinstance(prompt, np.ndarray):
            prompt = list(prompt)
        prompt = as_array(prompt, "prompt")
        if prompt.ndim != 1:
            raise InvalidInput("prompt", f"must be one sequence of token ids, got {prompt.shape}")
        if not prompt.size:  # as the server says it (not the [1, 0] shape checked below)
            raise InvalidInput("prompt", "needs at least one token")
        # a copy: the prompt is fed at the first next(), and the caller's array (which the
        # check may hand back as it is) may have been written since
        p = self.check_inputs(prompt[None], "prompt", time_axis=True).copy()  # [1, T]
        config = GenerateConfig.check(
            self.vocab_size, max_new_tokens, temperature, top_k, top_p, seed, stop
        )
        target = None
        if state is not None:
            target = state
            if (
                not isinstance(state, np.ndarray)
                or state.dtype != np.float32
                or not state.flags.c_contiguous
                or not state.flags.writeable
            ):
                raise InvalidInput(
                    "state", "must be a writeable C-contiguous float32 array (updated in place)"
                )
            if state.shape not in ((self.state_size,), (1, self.state_size)):
                raise InvalidInput(
                    "state", f"must be [S] or [1, S] with S={self.state_size}, got {state.shape}"
                )
            if not np.isfinite(state).all():
                raise InvalidInput("state", "contains NaN or inf")
            s0 = state.reshape(1, self.state_size).copy()
        else:
            s0 = self.new_state(1)
        return self._generate(p, s0, target, config)

    def _generate(self, prompt, s, target, config: GenerateConfig) -> Generator[int, None, None]:
        """Drive the generation loop (runtime/generation.py) on one state [1, S]."""
        logits, s = self.prefill_unchecked(prompt, s)  # [1, T, V], [1, S]
        if config.max_new_tokens == 0:  # nothing to sample: the state holds the prompt
            if target is not None:
                target.reshape(1, self.state_size)[:] = s
            return
        gen, position = Generation(config), prompt.shape[1]
        g = gen(logits[0, -1], position)
        try:
            yield g.token
            while not g.last:
                logits, s = self.step_unchecked(np.array([g.token], dtype=np.int64), s)
                position += 1
                g = gen(logits[0], position)
                yield g.token
        finally:
            if target is not None:  # the last yielded token too: the state holds all of them
                _, s = self.step_unchecked(np.array([g.token], dtype=np.int64), s)
                target.reshape(1, self.state_size)[:] = s
