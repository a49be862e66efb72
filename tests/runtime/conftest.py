"""Fixtures for tests/runtime: exported tiny models (real export) and hand-built toy graphs.

tiny_token_model / tiny_signal_model (session scope): a random, untrained SSMNetwork,
saved with save_checkpoint and exported with ssmstream.export.export_model. Each is a dict
    {"model_dir": Path, "ckpt_dir": Path, "net": SSMNetwork (eval), "config": SSMConfig}
The export (~20 s each) is cached in pytest's cache directory under a key made of the
model/export sources, the config and the library versions, so it reruns only after one
of them changed.

toy_token_model / toy_signal_model: step.onnx + prefill.onnx + manifest.json built by hand
with onnx.helper for the linear recurrence
    x' = a ⊙ x + E[token]  (or u @ E),   y = tanh(x') @ W
(prefill = a Scan of the same cell), plus `reference(inputs [B, T(, d)], x [B, S])`, a numpy
implementation of it. They build in milliseconds and need no torch, so the engine / batcher
mechanics are tested on them independently of the exporter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY_TOKEN = dict(vocab_size=23, d_model=8, n_layers=2, d_state=4)
TINY_SIGNAL = dict(d_input=3, d_output=2, d_model=8, n_layers=2, d_state=4, heads=2)
TINY_EXPORT = dict(chunk=8, verify=False)  # prefill T: multiples of 8


# --- real exports ----------------------------------------------------------------------


def _cache_key(name: str, cfg: dict) -> str:
    import onnx
    import onnxruntime
    import torch

    h = hashlib.sha256()
    for folder in ("model", "export"):
        for f in sorted((ROOT / folder).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    h.update((ROOT / "runtime" / "manifest.py").read_bytes())
    meta = [name, cfg, TINY_EXPORT, torch.__version__, onnx.__version__, onnxruntime.__version__]
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _export_tiny(request, tmp_path_factory, name: str, cfg: dict, seed: int) -> dict:
    pytest.importorskip("torch")
    from ssmstream.export import export_model
    from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, save_checkpoint
    from ssmstream.runtime.errors import ModelError
    from ssmstream.runtime.manifest import load_manifest

    cache = getattr(request.config, "cache", None)
    key = _cache_key(name, cfg)
    if cache is not None:
        root = Path(cache.mkdir("ssmstream_tiny_models")) / f"{name}-{key}"
    else:
        root = tmp_path_factory.mktemp(name) / key
    ckpt_dir, model_dir = root / "ckpt", root / "model"
    try:
        load_manifest(model_dir)
        net = load_checkpoint(ckpt_dir)
    except (ModelError, ValueError):
        import torch

        for stale in root.parent.glob(f"{name}-*"):  # exports of older sources
            shutil.rmtree(stale, ignore_errors=True)
        torch.manual_seed(seed)
        net = SSMNetwork(SSMConfig(**cfg)).eval()
        save_checkpoint(net, ckpt_dir)
        export_model(ckpt_dir, model_dir, **TINY_EXPORT)
        net = load_checkpoint(ckpt_dir)
    return {"model_dir": model_dir, "ckpt_dir": ckpt_dir, "net": net, "config": net.cfg}


SNAPSHOT_KEY = b"0123456789abcdef-test-snapshot-key"  # the key the test servers share


@pytest.fixture(scope="session")
def snapshot_key_file(tmp_path_factory) -> str:
    """A --snapshot-key file holding SNAPSHOT_KEY (servers that share it accept each
    other's snapshots)."""
    path = tmp_path_factory.mktemp("key") / "snapshot.key"
    path.write_bytes(SNAPSHOT_KEY + b"\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_token_model(request, tmp_path_factory) -> dict:
    return _export_tiny(request, tmp_path_factory, "tokens", TINY_TOKEN, seed=0)


@pytest.fixture(scope="session")
def tiny_signal_model(request, tmp_path_factory) -> dict:
    return _export_tiny(request, tmp_path_factory, "signal", TINY_SIGNAL, seed=1)


# --- hand-built toy graphs -------------------------------------------------------------


def build_toy(
    out: Path, kind: str = "tokens", V=11, d_in=3, S=8, d_out=5, chunk=4, seed=0, chunk_states=True
) -> dict:
    """Write a toy model directory; returns {"model_dir", "params", "reference", ...}.
    chunk_states=False writes a prefill graph without that output (as older exports)."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    a = rng.uniform(0.5, 0.99, S).astype(np.float32)  # [S]
    W = rng.standard_normal((S, d_out)).astype(np.float32)  # [S, d_out]
    E = rng.standard_normal((V if kind == "tokens" else d_in, S)).astype(np.float32)
    inits = [nh.from_array(a, "a"), nh.from_array(W, "W"), nh.from_array(E, "E")]
    in_type = TP.INT64 if kind == "tokens" else TP.FLOAT

    def cell(inp: str, x: str, x_out: str, y: str) -> list:
        enc = "Gather" if kind == "tokens" else "MatMul"
        args = ["E", inp] if kind == "tokens" else [inp, "E"]
        return [
            oh.make_node(enc, args, [f"u_{y}"], **({"axis": 0} if kind == "tokens" else {})),
            oh.make_node("Mul", [x, "a"], [f"ax_{y}"]),
            oh.make_node("Add", [f"ax_{y}", f"u_{y}"], [x_out]),
            oh.make_node("Tanh", [x_out], [f"h_{y}"]),
            oh.make_node("MatMul", [f"h_{y}", "W"], [y]),
        ]

    def io(lead: list) -> tuple[list, list]:
        shape = lead if kind == "tokens" else [*lead, d_in]
        ins = [
            oh.make_tensor_value_info("input", in_type, shape),
            oh.make_tensor_value_info("state", TP.FLOAT, ["B", S]),
        ]
        outs = [
            oh.make_tensor_value_info("output", TP.FLOAT, [*lead, d_out]),
            oh.make_tensor_value_info("state_out", TP.FLOAT, ["B", S]),
        ]
        return ins, outs

    def save(graph, name: str) -> None:
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
        onnx.checker.check_model(model)
        onnx.save(model, out / name)

    save(
        oh.make_graph(cell("input", "state", "state_out", "output"), "step", *io(["B"]), inits),
        "step.onnx",
    )
    body = oh.make_graph(
        [*cell("u_t", "x", "x_new", "y_t"), oh.make_node("Identity", ["x_new"], ["x_t"])],
        "cell",
        [
            oh.make_tensor_value_info("x", TP.FLOAT, None),
            oh.make_tensor_value_info("u_t", in_type, None),
        ],
        [
            oh.make_tensor_value_info("x_new", TP.FLOAT, None),
            oh.make_tensor_value_info("y_t", TP.FLOAT, None),
            oh.make_tensor_value_info("x_t", TP.FLOAT, None),
        ],
    )
    scan = oh.make_node(
        "Scan", ["state", "input"], ["state_out", "output", "xs"], body=body,
        num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1, 1],
    )  # fmt: skip
    # chunk_states [B, T / chunk, S]: the state after each chunk (every chunk-th of xs)
    ends = [
        oh.make_node("Constant", [], [n], value=nh.from_array(np.array([v], np.int64), n))
        for n, v in (("c_start", chunk - 1), ("c_end", 2**62), ("c_axis", 1), ("c_step", chunk))
    ]
    pick = oh.make_node("Slice", ["xs", "c_start", "c_end", "c_axis", "c_step"], ["chunk_states"])
    ins, outs = io(["B", "T"])
    nodes = [scan]
    if chunk_states:
        outs.append(oh.make_tensor_value_info("chunk_states", TP.FLOAT, ["B", "n", S]))
        nodes += [*ends, pick]
    save(oh.make_graph(nodes, "prefill", ins, outs, inits), "prefill.onnx")

    def sha(name: str) -> str:
        return hashlib.sha256((out / name).read_bytes()).hexdigest()

    manifest = {
        "format": "ssmstream-model",
        "format_version": 1,
        "name": f"toy-{kind}",
        "model": {},
        "input_kind": kind,
        "vocab_size": V if kind == "tokens" else None,
        "d_input": None if kind == "tokens" else d_in,
        "d_output": d_out,
        "state_size": S,
        "state_dtype": "float32",
        "state_layout": [{"layer": 0, "offset": 0, "shape": [2, 1, S // 2], "size": S}],
        "dtype": "fp32",
        "opset": 17,
        "dt_scale": 1.0,
        "graphs": {
            "step": {"file": "step.onnx", "sha256": sha("step.onnx")},
            "prefill": {
                "file": "prefill.onnx",
                "sha256": sha("prefill.onnx"),
                "chunk": chunk,
                "max_len": 3 * chunk,
            },
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))

    def reference(inputs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 recurrence: inputs [B, T] | [B, T, d_in], x [B, S] -> ([B, T, d_out], [B, S])."""
        x = np.asarray(x, dtype=np.float64).copy()
        ys = []
        for t in range(inputs.shape[1]):
            u = E[inputs[:, t]] if kind == "tokens" else inputs[:, t].astype(np.float64) @ E
            x = a * x + u  # [B, S]
            ys.append(np.tanh(x) @ W)  # [B, d_out]
        return np.stack(ys, axis=1), x

    return {
        "model_dir": out,
        "kind": kind,
        "S": S,
        "V": V,
        "d_in": d_in,
        "d_out": d_out,
        "chunk": chunk,
        "reference": reference,
    }


@pytest.fixture(scope="session")
def make_toy():
    """build_toy itself, for a test that needs a toy model of a shape of its own."""
    return build_toy


@pytest.fixture(scope="session")
def toy_token_model(tmp_path_factory) -> dict:
    return build_toy(tmp_path_factory.mktemp("toy_tokens"), "tokens")


@pytest.fixture(scope="session")
def toy_token_model_without_chunk_states(tmp_path_factory) -> dict:
    """The token toy as older exports are: its prefill graph has no chunk_states output."""
    return build_toy(tmp_path_factory.mktemp("toy_old"), "tokens", chunk_states=False)


@pytest.fixture(scope="session")
def toy_signal_model(tmp_path_factory) -> dict:
    return build_toy(tmp_path_factory.mktemp("toy_signal"), "values")


# Engines on the models above: one per test module (CPU, one onnxruntime thread), so that a
# module that changes an engine (a stand-in session, a slab) does not reach another module.


def _cpu_engine(model: dict):
    from ssmstream.runtime.engine import Engine

    return Engine(model["model_dir"], device="cpu", threads=1)


@pytest.fixture(scope="module")
def tok_engine(tiny_token_model):
    return _cpu_engine(tiny_token_model)


@pytest.fixture(scope="module")
def sig_engine(tiny_signal_model):
    return _cpu_engine(tiny_signal_model)


@pytest.fixture(scope="module")
def toy_tok(toy_token_model):
    return _cpu_engine(toy_token_model)


@pytest.fixture(scope="module")
def toy_sig(toy_signal_model):
    return _cpu_engine(toy_signal_model)
