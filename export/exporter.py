"""Checkpoint → MODEL_DIR with step.onnx, prefill.onnx and manifest.json (DESIGN.md, export/).

    export_model(ckpt_dir, out_dir, dtype="fp32", dt_scale=1.0, prefill=True, verify=True)
    export_network(net, out_dir, ...)          # same, from an in-memory SSMNetwork

Pipeline: build the export-only torch modules (`modules.py`: discretization folded in as
float64-computed constants, complex as re/im pairs) → `torch.onnx.export(dynamo=True)`
with a dynamic batch B (and T = Q·chunks for prefill) → onnxslim → variant (fp16 is built
into the modules; int8 = onnxruntime dynamic quantization of the weight MatMuls) →
verification (`verify.py`) → manifest (also embedded in each graph's metadata_props under
"ssmstream.manifest", minus the graphs' own sha256/bytes, which a file cannot contain).

Everything is written to a temporary directory next to `out_dir` and renamed into place at
the end, so no error (bad checkpoint, unwritable --out, failed parity, …) leaves a
half-written model directory behind.

Graph I/O (B batch, T length, S packed state, V outputs):
    step.onnx     input int64 [B] | float32 [B, d_input], state float32 [B, S]
                  -> output float32 [B, V], state_out float32 [B, S]
    prefill.onnx  input int64 [B, T] | float32 [B, T, d_input], state float32 [B, S],
                  length int64 [] (optional: how many of the T inputs are real, the rest is
                  padding at the end of the last chunk; default: all; T - chunk < length ≤ T:
                  the graph does not check it, and a value outside gives a wrong state_out
                  (the runtime only feeds valid ones))
                  -> output float32 [B, T, V], state_out float32 [B, S] (after input
                  `length`), chunk_states float32 [B, T / chunk, S]
                  (T a multiple of graphs.prefill.chunk, at most graphs.prefill.max_len)
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import hashlib
import heapq
import importlib.metadata
import io
import json
import logging
import math
import numbers
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from ssmstream.model import SSMNetwork, load_checkpoint
from ssmstream.model.checkpoint import CheckpointError
from ssmstream.model.network import check_fields
from ssmstream.model.train import machine_bytes
from ssmstream.runtime.manifest import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_KEY,
    name_problem,
    sha256_file,
)

from .modules import PrefillGraph, StepGraph, Trunk

log = logging.getLogger(__name__)

OPSET = 20
MODEL_FILES = (MANIFEST, "step.onnx", "prefill.onnx")  # what an export writes (build_graphs)
VARIANTS = {
    "fp32": "weights, activations, SSM recurrence and state float32",
    "fp16": "weights and activations float16 (GPU variant); SSM recurrence and state float32",
    "int8": "weight MatMuls dynamically quantized to int8 (edge CPU variant); "
    "SSM recurrence and state float32",
}


class ExportError(ValueError):
    """An export that cannot be done (bad arguments, checkpoint, output dir or parity)."""


class ExportFailed(ExportError):
    """An export that ran and failed: graphs that fail their parity check, an int8
    quantization that failed (`ssmstream export` exits 1; 2 for the other ExportErrors)."""


# a chunk's positions are float32 in the prefill graph: exact up to 2**24
MAX_CHUNK = 2**24
# the parity check runs one step call per position and holds all its outputs [B, L, V] and
# their torch reference at once: 256 × the default length is already a long check
MAX_VERIFY_STEPS = 2**20


@dataclass
class ExportConfig:
    """Options of one export (the CLI flags map onto these).

    dtype: "fp32" | "fp16" | "int8".
    dt_scale: every Δ is multiplied by this (inputs sampled at 1/dt_scale × the training rate).
    prefill: also write prefill.onnx.
    verify: run the parity check and refuse to write a model that fails it.
    chunk: Q, prefill chunk length (power of two); a call's T is a multiple of it (the last
        chunk may end in padding: the graph's `length` input says how many inputs are real).
    max_chunks: chunks per prefill call (its carry is unrolled that often): T ≤ Q·max_chunks.
    optimize: simplify the graphs with onnxslim (kept only when it does not grow them).
    verify_steps: length of the random sequence the step graph is checked over (default
        4096: long enough for the slow modes' error to build up).
    name: model name in the manifest (default: the output directory's name).
    overwrite: replace an existing output directory.
    progress: show tqdm progress bars (the CLI does).
    """

    dtype: str = "fp32"
    dt_scale: float = 1.0
    prefill: bool = True
    verify: bool = True
    chunk: int = 64
    max_chunks: int = 16
    opset: int = OPSET
    optimize: bool = True
    verify_steps: int = 4096
    name: str | None = None
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        try:  # overwrite="no" would replace the model; chunk=4.0 failed deep in torch
            check_fields(
                self,
                ints=("chunk", "max_chunks", "verify_steps", "opset"),
                bools=("prefill", "verify", "optimize", "overwrite", "progress"),
            )
        except ValueError as e:
            raise ExportError(str(e)) from None
        if isinstance(self.dt_scale, bool) or not (
            isinstance(self.dt_scale, numbers.Real) and math.isfinite(self.dt_scale)
        ):
            raise ExportError(f"dt_scale must be a finite number, got {self.dt_scale!r}")
        if self.dt_scale <= 0:
            raise ExportError(f"dt_scale must be positive, got {self.dt_scale}")
        self.dt_scale = float(self.dt_scale)
        if self.chunk < 2 or self.chunk & (self.chunk - 1):
            raise ExportError(f"chunk must be a power of two >= 2, got {self.chunk}")
        if self.chunk > MAX_CHUNK:
            raise ExportError(f"chunk must be at most {MAX_CHUNK}, got {self.chunk}")
        if not 3 <= self.max_chunks <= 256:  # tracing needs an example below the maximum
            raise ExportError(f"max_chunks must be in [3, 256], got {self.max_chunks}")
        if self.verify_steps < 1:
            raise ExportError(f"verify_steps must be positive, got {self.verify_steps}")
        if self.verify_steps > MAX_VERIFY_STEPS:
            raise ExportError(
                f"verify_steps must be at most {MAX_VERIFY_STEPS}, got {self.verify_steps}"
            )
        if self.opset < 18:
            raise ExportError(f"opset must be >= 18, got {self.opset}")

    @property
    def max_len(self) -> int:
        return self.chunk * self.max_chunks


# --- torch -> onnx -------------------------------------------------------------------


def _example_inputs(net: SSMNetwork, batch: int, T: int | None) -> tuple[torch.Tensor, ...]:
    """Example (input, state) for tracing; batch ≥ 2 keeps the batch axis dynamic."""
    cfg = net.cfg
    lead = (batch,) if T is None else (batch, T)
    if cfg.input_kind == "tokens":
        inp = torch.zeros(lead, dtype=torch.int64)
    else:
        inp = torch.zeros((*lead, cfg.d_input), dtype=torch.float32)
    return inp, torch.zeros(batch, cfg.state_size, dtype=torch.float32)


def _rename_dims(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Give the symbolic dims readable names (e.g. '64*chunks' -> 'T')."""
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in names:
                d.dim_param = names[d.dim_param]


# `length` of a prefill call that does not feed it: more than any T, so every input is real
LENGTH_DEFAULT = 1 << 62


def _default_length(model: onnx.ModelProto) -> None:
    """Give the prefill graph's `length` input a default (an initializer of the same name:
    onnxruntime uses it when the input is not fed), so that callers which feed only input
    and state keep the graph's old meaning."""
    init = onnx.numpy_helper.from_array(np.array(LENGTH_DEFAULT, dtype=np.int64), "length")
    model.graph.initializer.append(init)


def torch_to_onnx(
    module: torch.nn.Module, args: tuple, dynamic_shapes: dict, opset: int, outputs: list[str]
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo): (input, state[, length]) -> outputs, dynamic B (and T)."""
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(dynamic_shapes),
                output_names=outputs,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        finally:
            torch_log.setLevel(level)
    return program.model_proto


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim the graph; keep the result only when it has no more nodes and no more bytes."""
    import onnxslim

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            slimmed = onnxslim.slim(model)
    except Exception as e:  # its own types: e.g. a folded graph past protobuf's 2 GB (--chunk)
        said = (str(e).splitlines() or [""])[0]
        log.warning("onnxslim failed (%s: %s); kept the original graph", type(e).__name__, said)
        return model
    before = (len(model.graph.node), model.ByteSize())
    after = (len(slimmed.graph.node), slimmed.ByteSize())
    keep = after[0] <= before[0] and after[1] <= before[1] * 1.05
    why = "kept the slimmed graph" if keep else (
        "kept the original graph: the slimmed one has more nodes" if after[0] > before[0]
        else "kept the original graph: the slimmed one is over 5% larger (constants folded in)"
    )  # fmt: skip
    log.info(
        "onnxslim: nodes %d -> %d, bytes %d -> %d; %s",
        before[0],
        after[0],
        before[1],
        after[1],
        why,
    )
    return slimmed if keep else model


def trunk_weights(net: SSMNetwork) -> set[bytes]:
    """Fingerprints of the trunk's Linear weights as float32, each as is and transposed
    (`non_trunk_matmuls`)."""
    trunk = Trunk(net, torch.float32)
    weights = [m.weight.detach() for m in trunk.modules() if isinstance(m, torch.nn.Linear)]
    return {_fingerprint(w.numpy()) for W in weights for w in (W, W.T)}


def _fingerprint(a: np.ndarray) -> bytes:
    return hashlib.sha256(repr(a.shape).encode() + np.ascontiguousarray(a).tobytes()).digest()


def non_trunk_matmuls(model: onnx.ModelProto, trunk: set[bytes] = frozenset()) -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant operand that is not a trunk weight
    (named "trunk.*", or equal to one of the `trunk_weights` fingerprints: the exporter
    may fold a transposed weight into a constant of another name, as the prefill graph's
    values encoder): the SSM's own products with constants (in the prefill graph also the
    tables constant folding made of them)."""
    inits = {i.name: i for i in model.graph.initializer}

    def is_trunk(name: str) -> bool:
        if name.startswith("trunk."):
            return True
        a = onnx.numpy_helper.to_array(inits[name])
        return a.dtype == np.float32 and a.ndim == 2 and _fingerprint(a) in trunk

    names = []
    for n in model.graph.node:
        const = [i for i in n.input if i in inits]
        if n.op_type in ("MatMul", "Gemm") and const and not is_trunk(const[0]):
            names.append(n.name)
            if n.op_type == "Gemm":  # the quantizer first splits a Gemm into NAME_MatMul + Add
                names.append(f"{n.name}_MatMul")
    return names


def quantize_int8(src: Path, dst: Path, exclude: list[str] | None = None) -> None:
    """onnxruntime dynamic quantization of the MatMuls/Gemms whose weight is a constant,
    except the nodes named in `exclude`.

    Activations are quantized per call (uint8), weights once (uint8: U8U8 avoids the
    saturation of U8S8 on CPUs without VNNI). Both graphs exclude the SSM's MatMuls with
    constant operands (u ⊗ 1, the multi-head dB, C and direct terms, the prefill's folded
    Toeplitz and chunk-end tables), so the recurrence and the state stay float32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.Filter()  # its advice to pre-process goes to the root logger
    quiet.filter = lambda record: "pre-processing before quantization" not in record.getMessage()
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=exclude,
                weight_type=QuantType.QUInt8,
                extra_options={"MatMulConstBOnly": True},
            )
    finally:
        logging.getLogger().removeFilter(quiet)


def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs and what its subgraphs read from outside them."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            own = {v.name for v in (*g.input, *g.initializer)}
            own |= {o for n in g.node for o in n.output}
            for n in g.node:
                names |= _reads(n) - own
    return names


def toposort(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after the producers of everything it (or one of
    its subgraphs) reads, keeping the given order where it may (onnx's checker requires it)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[v] for v in _reads(n) if v in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, deps in enumerate(needs):
        for j in deps:
            users[j].append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, w in enumerate(waiting) if not w]
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(order)


# torch -> onnx conversions of this process, keyed by content (network weights + options):
# exporting several variants or copies of one network converts each graph once.
_CONVERTED: collections.OrderedDict[str, bytes] = collections.OrderedDict()
_CONVERTED_MAX = 8


def _content_key(net: SSMNetwork, graph: str, options: tuple) -> str:
    h = hashlib.sha256(json.dumps([graph, options, net.cfg.to_dict()], sort_keys=True).encode())
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def convert(net: SSMNetwork, graph: str, cfg: ExportConfig, build) -> onnx.ModelProto:
    """The (slimmed) ONNX model of one graph, converted once per content key.

    build() -> (module, example args, dynamic_shapes) is only called on a miss.
    """
    compute = "fp16" if cfg.dtype == "fp16" else "fp32"  # int8 quantizes the fp32 graph
    options = (compute, cfg.dt_scale, cfg.chunk, cfg.max_chunks, cfg.opset, cfg.optimize)
    key = _content_key(net, graph, options)
    if key in _CONVERTED:
        _CONVERTED.move_to_end(key)
        log.info("%s graph: reusing this process's conversion", graph)
        return onnx.load_from_string(_CONVERTED[key])
    module, args, dyn = build()
    t0 = time.perf_counter()
    outputs = ["output", "state_out"] + (["chunk_states"] if graph == "prefill" else [])
    model = torch_to_onnx(module, args, dyn, cfg.opset, outputs)
    log.info("exported the %s graph in %.1f s", graph, time.perf_counter() - t0)
    if cfg.optimize:
        model = slim(model)
    _rename_dims(model, {f"{cfg.chunk}*chunks": "T"})
    if graph == "prefill":
        _default_length(model)
    _CONVERTED[key] = model.SerializeToString()
    while len(_CONVERTED) > _CONVERTED_MAX:
        _CONVERTED.popitem(last=False)
    return model


def build_graphs(net: SSMNetwork, cfg: ExportConfig, out: Path) -> dict[str, dict]:
    """Write out/step.onnx (and out/prefill.onnx); return their graphs entries (no sha yet)."""
    B = torch.export.Dim("B", min=1, max=1 << 20)

    def step():
        module = StepGraph(net, cfg.dt_scale, cfg.dtype)
        return module, _example_inputs(net, 2, None), {"input": {0: B}, "state": {0: B}}

    def prefill():
        module = PrefillGraph(net, cfg.dt_scale, cfg.dtype, cfg.chunk, cfg.max_chunks)
        T = cfg.chunk * torch.export.Dim("chunks", min=1, max=cfg.max_chunks)
        args = (*_example_inputs(net, 2, 2 * cfg.chunk), torch.tensor(2 * cfg.chunk - 3))
        return module, args, {"input": {0: B, 1: T}, "state": {0: B}, "length": {}}

    builders = {"step": step, "prefill": prefill} if cfg.prefill else {"step": step}
    trunk = trunk_weights(net) if cfg.dtype == "int8" else set()
    graphs = {}
    for name, build in builders.items():
        model = convert(net, name, cfg, build)
        path = out / f"{name}.onnx"
        if cfg.dtype == "int8":
            fp32 = out / f".{name}.fp32.onnx"
            bare = onnx.ModelProto()
            bare.CopyFrom(model)
            del bare.graph.value_info[:]  # the quantizer re-infers shapes: stale ones clash
            onnx.save(bare, fp32)
            try:  # the SSM's own products (also the prefill's folded tables) stay float32
                quantize_int8(fp32, path, non_trunk_matmuls(model, trunk))
            except Exception as e:  # onnxruntime.quantization raises its own types
                raise ExportFailed(f"int8 quantization of the {name} graph failed: {e}") from e
            fp32.unlink()
            quantized = onnx.load(path)
            toposort(quantized.graph)  # quantize_dynamic misplaces the If of a prefill graph
            onnx.save(quantized, path)
        else:
            onnx.save(model, path)
        graphs[name] = {"file": path.name}
        if name == "prefill":
            graphs[name].update(chunk=cfg.chunk, max_len=cfg.max_len)
    return graphs


# --- manifest --------------------------------------------------------------------------


def _io_spec(net: SSMNetwork, prefill: bool) -> dict:
    cfg = net.cfg
    lead = ["B", "T"] if prefill else ["B"]
    if cfg.input_kind == "tokens":
        inp = {"dtype": "int64", "shape": lead}
    else:
        inp = {"dtype": "float32", "shape": [*lead, cfg.d_input]}
    state = {"dtype": "float32", "shape": ["B", cfg.state_size]}
    inputs = {"input": inp, "state": state}
    if prefill:  # optional (a default: every input is real); see the module docstring
        inputs["length"] = {"dtype": "int64", "shape": [], "default": LENGTH_DEFAULT}
    outputs = {
        "output": {"dtype": "float32", "shape": [*lead, cfg.d_output]},
        "state_out": state,
    }
    if prefill:  # the state after each chunk: T / chunk of them
        outputs["chunk_states"] = {"dtype": "float32", "shape": ["B", "T/chunk", cfg.state_size]}
    return {"inputs": inputs, "outputs": outputs}


def versions() -> dict[str, str]:
    import onnxscript

    try:
        own = importlib.metadata.version("ssmstream")
    except importlib.metadata.PackageNotFoundError:  # a source tree without metadata
        own = "unknown"
    return {
        "ssmstream": own,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": ort.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
    }


def base_manifest(net: SSMNetwork, cfg: ExportConfig, name: str, graphs: dict) -> dict:
    """Everything but sha256/bytes/nodes of the graphs, the parity report and the time."""
    mc = net.cfg
    for g, entry in graphs.items():
        entry.update(_io_spec(net, g == "prefill"))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": mc.to_dict(),
        "input_kind": mc.input_kind,
        "vocab_size": mc.vocab_size,
        "d_input": mc.d_input,
        "d_output": mc.d_output,
        "state_size": mc.state_size,
        "state_dtype": "float32",
        "state_layout": net.state_layout(),
        "dtype": cfg.dtype,
        "precision": VARIANTS[cfg.dtype],
        "opset": cfg.opset,
        "dt_scale": float(cfg.dt_scale),
        "graphs": graphs,
        "exporter": versions(),
    }


def embed_manifest(path: Path, manifest: dict) -> None:
    """Store the manifest (without the graphs' own sha256/bytes/nodes, the time of the export,
    nor where the checkpoint was read from) in metadata_props. The step graph's sha256 is the
    model's identity (snapshots and saved sessions are bound to it): two exports of the same
    weights with the same options and libraries must give the same bytes, not bytes that
    differ by a timestamp or a directory."""
    model = onnx.load(path)
    inner = json.loads(json.dumps(manifest))
    inner.pop("created", None)  # in manifest.json only
    inner.get("source", {}).pop("checkpoint", None)  # its weights_sha256 stays
    for g in inner["graphs"].values():
        for k in ("sha256", "bytes", "nodes"):
            g.pop(k, None)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(inner, sort_keys=True)
    onnx.save(model, path)


def finish_manifest(manifest: dict, out: Path) -> dict:
    """Embed the manifest into the graphs, then add their sha256, bytes and node counts."""
    for g in manifest["graphs"].values():
        embed_manifest(out / g["file"], manifest)
    for g in manifest["graphs"].values():
        f = out / g["file"]
        g["sha256"] = sha256_file(f)
        g["bytes"] = f.stat().st_size
        g["nodes"] = len(onnx.load(f).graph.node)
    return manifest


# --- the export ------------------------------------------------------------------------


class _Underway:
    """This process's exports under way: their temporary directories and whether one is being
    renamed into place. A signal handler that ends the process at once (cli.py) asks
    `abandon_exports` to remove them; raising from the handler instead is not safe here: the
    exception can land in torch's C++ (an abort that leaves the directory), in an import or in
    a __del__ (where it is swallowed and the export goes on)."""

    def __init__(self) -> None:
        self.dirs: dict[Path, list[Path]] = {}  # temporary dir -> the parents made for it
        self.renaming = False

    def remove(self, tmp: Path) -> None:
        """Remove `tmp` and the parent directories made for it (those still empty)."""
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(self.dirs.get(tmp, ()))


def _remove_empty(dirs) -> None:
    """rmdir each of `dirs` (the deepest first) that is still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


_underway = _Underway()


def abandon_exports() -> int | None:
    """Remove the temporary directories of this process's exports under way, for a signal
    handler about to end the process; returns how many. None, and nothing removed, while a
    finished export is being renamed into place: the handler lets that finish (two renames)
    and exits after it."""
    if _underway.renaming:
        return None
    dirs = list(_underway.dirs)
    for d in dirs:
        _underway.remove(d)
    return len(dirs)


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    """Check the output directory and make a temporary sibling to write into. Overwriting
    replaces only an exported model (a directory with a manifest.json)."""
    if out_dir.exists() and not (out_dir.is_dir() and overwrite):
        what = "a file" if not out_dir.is_dir() else "a directory"
        raise ExportError(
            f"--out {out_dir} already exists ({what}); choose another, or replace a model "
            "with --force"
        )
    if out_dir.exists() and not (out_dir / MANIFEST).is_file():
        raise ExportError(
            f"--out {out_dir} is a directory but not an exported model (no {MANIFEST}): "
            "overwriting replaces only a model; choose another --out"
        )
    if out_dir.exists():  # a checkpoint trained into a model's directory, the user's notes …
        ours = {*MODEL_FILES, *_graph_files(out_dir)}
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if foreign:
            raise ExportError(
                f"--out {out_dir} holds more than an exported model ({', '.join(foreign[:5])}"
                f"{', …' if len(foreign) > 5 else ''}): overwriting would delete them; move "
                "them or choose another --out"
            )
    parent = out_dir.parent
    _warn_leftovers(out_dir)
    made = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again on failure
    while True:
        tmp = parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
        _underway.dirs[tmp] = made  # before it exists: no signal can land between the two
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(mode=0o700)  # no one else writes (or links) into it while it is made
            return tmp
        except OSError as e:
            del _underway.dirs[tmp]
            if not (isinstance(e, FileExistsError) and parent.is_dir()):  # else: another's name
                too_long = e.errno == errno.ENAMETOOLONG and parent.is_dir()  # the tmp's name
                _remove_empty(made)
                if too_long:
                    raise ExportError(
                        f"--out {out_dir}: the name is too long: the export first writes into "
                        f"a temporary sibling '.NAME.<8 hex>.tmp' ({len(tmp.name)} characters, "
                        "more than the filesystem allows); use a shorter name"
                    ) from e
                why = e.strerror or e
                if isinstance(e, (FileExistsError, NotADirectoryError)):  # a file on the path
                    file = next(p for p in (parent, *parent.parents) if p.exists())
                    why = f"{file} is not a directory"
                raise ExportError(f"--out {out_dir}: cannot write into {parent}: {why}") from e


def _warn_leftovers(out_dir: Path) -> None:
    """Log the temporary siblings of out_dir (`.NAME.<8 characters>.tmp` or `.old`) that an
    export killed outright (SIGKILL, the out-of-memory killer, a power cut) could not remove.
    They are left in place: another export into the same directory may be writing one now."""
    ours = re.compile(re.escape(f".{out_dir.name}.") + r"[0-9a-z_]{8}\.(tmp|old)")
    with contextlib.suppress(OSError):
        found = sorted(
            p.name
            for p in out_dir.parent.iterdir()
            if ours.fullmatch(p.name) and p.is_dir() and p not in _underway.dirs
        )
        if found:
            log.warning(
                "%s beside %s: left by an export that was killed, or written by another export "
                "now; remove once no export into %s runs",
                ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else ""),
                out_dir.name,
                out_dir,
            )


def _resolved(out_dir) -> Path:
    """--out made absolute, its links followed; a link loop is an ExportError (Path.resolve
    raises RuntimeError for it on Python 3.11); an empty one (it would be the working
    directory) is an ExportError too."""
    if isinstance(out_dir, str) and not out_dir.strip():
        raise ExportError(f"--out must name the model directory to create, got {out_dir!r}")
    try:
        return Path(out_dir).resolve()
    except (RuntimeError, OSError) as e:
        raise ExportError(f"--out {out_dir}: {e}") from e


def _graph_files(model_dir: Path) -> list[str]:
    """The graph files an existing model's manifest names (none when it does not parse)."""
    try:
        graphs = json.loads((model_dir / MANIFEST).read_text()).get("graphs")
        return [g["file"] for g in graphs.values() if isinstance(g.get("file"), str)]
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return []


def _commit(tmp: Path, out_dir: Path) -> None:
    """Rename tmp into out_dir (replacing an existing one only after the new one is complete)."""
    probe = tmp / ".mode"  # made with the umask's mode, which the model dir gets (the umask
    probe.mkdir()  # is not read by setting it: it is the process's, other threads' too)
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    os.chmod(tmp, mode)
    _underway.renaming = True
    try:
        old = None
        if out_dir.exists():  # moved aside to a name of its own, removed once the new one is in
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _underway.dirs.pop(tmp, None)  # written: a signal from now on ends a finished export
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _underway.renaming = False


def _check_stable(net: SSMNetwork, dt_scale: float) -> None:
    """ExportFailed when a mode grows (`SSMNetwork.growing_modes`): the model's outputs grow
    without bound over a stream, and its parity check would fail on non-finite numbers."""
    n, modes, largest = net.growing_modes(dt_scale)
    if n:
        cfg = net.cfg
        method = f"gbt α={cfg.alpha}" if cfg.discretization == "gbt" else cfg.discretization
        scaled = f" × --dt-scale {dt_scale:g}" if dt_scale != 1 else ""
        raise ExportFailed(
            f"the model is unstable: {n} of {modes} modes grow (|Ā| up "
            f"to {largest:.4g} > 1) under {method} at their Δ{scaled}, "
            "so its outputs grow without bound over a stream; train it with a smaller --dt-max "
            f"or {SSMNetwork.A_STABLE}"
        )


def _check_tables_fit(net: SSMNetwork, chunk: int) -> None:
    """ExportError naming --chunk when the prefill graph's Toeplitz tables alone (each kernel-
    path layer's [H, Q·M, Q·M] float32, built at export and held by every session that opens
    the graph) exceed this machine's memory: the export would only end in the out-of-memory
    killer (a --chunk of 2**20 asks for terabytes)."""
    need = sum(s.heads * (chunk * s.M) ** 2 * 4 for s in net.ssms if not s.uses_mode_path)
    total = machine_bytes()
    if total is not None and need > total:
        raise ExportError(
            f"--chunk {chunk}: the prefill graph's Toeplitz tables take {need / 2**30:,.1f} GiB "
            f"(heads × (chunk · head width)² float32 per layer), more than this machine's "
            f"{total / 2**30:,.1f} GiB: use a smaller --chunk"
        )


def export_network(
    net: SSMNetwork,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    dt_scale: float = 1.0,
    prefill: bool = True,
    verify: bool = True,
    source: dict | None = None,
    **options,
) -> Path:
    """Export an in-memory network to `out_dir` (see ExportConfig for `options`).

    Returns the model directory. Raises ExportError (nothing written) on bad arguments,
    an unusable output directory, or a model that fails its parity check.
    """
    cfg = ExportConfig(dtype=dtype, dt_scale=dt_scale, prefill=prefill, verify=verify, **options)
    if not isinstance(net, SSMNetwork):
        raise ExportError(f"net must be an SSMNetwork, got {type(net).__name__}")
    out_dir = _resolved(out_dir)  # `.` and `..` have no name of their own
    _check_stable(net, cfg.dt_scale)
    if cfg.prefill:
        _check_tables_fit(net, cfg.chunk)
    name = out_dir.name if cfg.name is None else cfg.name
    if why := name_problem(name):
        flag = "--name" if cfg.name is not None else f"--out's name (give --name): {out_dir.name!r}"
        raise ExportError(f"{flag}: the model name {why}")
    tmp = _prepare_out(out_dir, cfg.overwrite)
    modes = [(m, m.training) for m in net.modules()]  # the caller's, each module's kept
    net.eval()
    try:
        graphs = build_graphs(net, cfg, tmp)
        manifest = base_manifest(net, cfg, name, graphs)
        manifest["source"] = source or {}
        if cfg.verify:
            from .verify import verify_graphs

            (tmp / MANIFEST).write_text(json.dumps(manifest))  # the Engine verify opens reads it
            t0 = time.perf_counter()
            report = verify_graphs(
                tmp, manifest, net, steps=cfg.verify_steps, progress=cfg.progress
            )
            manifest["parity"] = report
            log.info("verified in %.1f s", time.perf_counter() - t0)
            if not report["passed"]:
                raise ExportFailed(
                    "exported graphs fail their parity check, model not written:\n"
                    + json.dumps(report, indent=2)
                )
        else:
            manifest["parity"] = {"passed": None, "skipped": "export ran with verify=False"}
        manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        finish_manifest(manifest, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _commit(tmp, out_dir)
    except BaseException:
        _underway.remove(tmp)
        raise
    finally:
        _underway.dirs.pop(tmp, None)
        for m, training in modes:
            m.training = training
    log.info("exported %s to %s", name, out_dir)
    return out_dir


def export_model(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    dt_scale: float = 1.0,
    prefill: bool = True,
    verify: bool = True,
    **options,
) -> Path:
    """`ssmstream export CKPT --out DIR`: load a checkpoint directory and export it."""
    ExportConfig(dtype=dtype, dt_scale=dt_scale, prefill=prefill, verify=verify, **options)
    weights = Path(ckpt_dir) / "model.safetensors"
    for _ in range(3):  # the recorded sha256 is that of the weights loaded
        try:
            before = sha256_file(weights) if weights.is_file() else None
            net = load_checkpoint(ckpt_dir)
            sha = sha256_file(weights)
        except CheckpointError as e:
            raise ExportError(f"cannot export checkpoint {str(ckpt_dir)!r}: {e}") from e
        except OSError as e:  # a file it cannot read (permissions): the checkpoint, not a write
            where = e.filename or weights
            raise ExportError(f"cannot read checkpoint file {where}: {e.strerror or e}") from e
        if sha == before:
            break
    else:
        raise ExportError(
            f"{weights} changed while it was read, three times (is a training run saving into "
            f"{str(ckpt_dir)!r}?): export once it has finished"
        )
    ckpt = Path(ckpt_dir).resolve()
    if _resolved(out_dir) in (ckpt, *ckpt.parents):
        raise ExportError(f"--out {out_dir} holds the checkpoint {ckpt_dir}: choose another --out")
    source = {"checkpoint": str(Path(ckpt_dir).absolute()), "weights_sha256": sha}
    return export_network(net, out_dir, dtype, dt_scale, prefill, verify, source=source, **options)


__all__ = [
    "DTYPES",
    "ExportConfig",
    "ExportError",
    "ExportFailed",
    "export_model",
    "export_network",
]
