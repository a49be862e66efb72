"""manifest.json: everything a runtime needs to run an exported model, without torch.

Written by `ssmstream.export`, read by `ssmstream.runtime`; this module is the one
definition of the format both sides use.

    {
      "format": "ssmstream-model", "format_version": 1,
      "name": str,                      # model name (the export dir name by default)
      "model": {...},                   # the SSMConfig as a dict
      "input_kind": "tokens" | "values",
      "vocab_size": int | null, "d_input": int | null, "d_output": int,
      "state_size": S, "state_dtype": "float32",
      "state_layout": [{"layer": i, "offset": o, "shape": [2, H, N/2], "size": n}],  # re, im
      "dtype": "fp32" | "fp16" | "int8", "opset": int, "dt_scale": float,
      "precision": str,                 # what the dtype means (state is always float32)
      "graphs": {
        "step":    {"file": "step.onnx",    "sha256": hex, "nodes": int, "bytes": int,
                    "inputs": {name: {"dtype", "shape"}}, "outputs": {...}},
        "prefill": {"file": "prefill.onnx", "sha256": hex, "nodes": int, "bytes": int,
                    "inputs": ..., "outputs": ...,
                    "chunk": C,             # T must be a multiple of C ...
                    "max_len": T_max}       # ... and at most T_max per call (C · max chunks);
                                            # inputs.length (int64 [], with a default: all
                                            # real; T - C < length ≤ T) when the last chunk
                                            # may end in padding
      },                                    # prefill absent with --no-prefill
      "exporter": {"ssmstream": v, "torch": v, "onnx": v, "onnxscript": v, "onnxruntime": v},
      "parity": {...},                  # the verification report (see ssmstream.export.verify)
      "source": {"checkpoint": path, "weights_sha256": hex},   # {} for an in-memory export
      "created": ISO-8601 time
    }

Each graph also carries this manifest (without the graphs' own sha256 / bytes / nodes,
which a file cannot contain about itself) in its metadata_props["ssmstream.manifest"].
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

from .errors import InvalidInput, ModelError

FORMAT = "ssmstream-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = "ssmstream.manifest"  # the manifest's copy inside each graph's metadata_props
REQUIRED = ("name", "input_kind", "d_output", "state_size", "state_layout", "dtype", "graphs")
DTYPES = ("fp32", "fp16", "int8")  # the variants an export writes (export/exporter.py)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _graph_sha(path: Path, name: str) -> str:
    """sha256_file of a model's graph file; ModelError naming it where it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as e:
        raise ModelError(f"{path} ({name} graph) cannot be read: {e.strerror or e}") from None


def name_problem(name) -> str | None:
    """Why a model name cannot be used (it goes into logs, metrics, GetModelInfo's UTF-8
    string and `ssmstream info`'s table), or None: a non-empty UTF-8 string without control
    characters or line breaks (a forged log line); any script, joiners and spaces are fine."""
    if not isinstance(name, str) or not name:
        return f"must be a non-empty string, got {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a file name's bytes that are not UTF-8
        return f"is not valid UTF-8: {name!r}"
    if any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in name):
        return f"holds a control character or line break: {name!r}"  # a forged log line
    return None


def load_manifest(model_dir: str | os.PathLike, check_sha: bool = True) -> dict:
    """Read and validate MODEL_DIR/manifest.json; with check_sha, verify every graph file."""
    if not isinstance(model_dir, (str, os.PathLike)):  # None: pathlib's TypeError said less
        raise InvalidInput("model_dir", f"must be a path, got {type(model_dir).__name__}")
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    try:
        if not model_dir.exists():  # a mistyped directory: said as export and plot say it
            raise ModelError(f"{model_dir} does not exist")
        if model_dir.is_file():  # its manifest.json or a graph given: not "….json/manifest.json"
            raise ModelError(
                f"{model_dir} is a file: give the exported model's directory (the one that "
                f"holds {MANIFEST})"
            )
        if not path.is_file():
            what = "is missing" if not path.exists() else "is not a regular file"
            trained = (model_dir / "config.json").is_file()  # `ssmstream train`'s output
            hint = f" ({model_dir} is a checkpoint: export it first)" if trained else ""
            raise ModelError(f"{path} {what}: not an exported ssmstream model directory{hint}")
    except OSError as e:  # a name too long
        raise ModelError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale
    except OSError as e:  # a root-owned 0600 file, a directory's permissions
        raise ModelError(f"{path} cannot be read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit int, deep nesting
        raise ModelError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ModelError(f"{path} is not an ssmstream model manifest")
    v = m.get("format_version")
    if type(v) is not int or v != FORMAT_VERSION:  # true, 1.0: not a version
        newer = type(v) is int and v > FORMAT_VERSION
        raise ModelError(
            f"{path}: format_version {v!r} is not supported (this runtime reads version "
            f"{FORMAT_VERSION}); "
            + ("it was exported by a newer ssmstream: upgrade this one" if newer
               else "re-export the model")
        )  # fmt: skip
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ModelError(f"{path}: missing fields {missing}")
    if why := name_problem(m["name"]):
        raise ModelError(f"{path}: name {why}")
    if m["input_kind"] not in ("tokens", "values"):
        raise ModelError(
            f"{path}: input_kind must be 'tokens' or 'values', got {m['input_kind']!r}"
        )
    size = "vocab_size" if m["input_kind"] == "tokens" else "d_input"
    for key in ("state_size", "d_output", size):
        if not _positive_int(m.get(key)):
            raise ModelError(f"{path}: {key} must be a positive integer, got {m.get(key)!r}")
    if m["dtype"] not in DTYPES:
        raise ModelError(f"{path}: dtype must be one of {DTYPES}, got {m['dtype']!r}")
    layout = m["state_layout"]
    if not isinstance(layout, list) or not all(
        isinstance(e, dict)
        and all(_int(e.get(k)) for k in ("layer", "offset"))
        and isinstance(e.get("shape"), list)
        and all(_positive_int(d) for d in e["shape"])
        for e in layout
    ):
        raise ModelError(f"{path}: state_layout must be a list of {{layer, offset, shape}}")
    if not isinstance(m["graphs"], dict) or "step" not in m["graphs"]:
        raise ModelError(f"{path}: graphs must be an object with a 'step' graph")
    if not isinstance(m.get("parity", {}), dict):
        raise ModelError(f"{path}: parity must be an object")
    for name, g in m["graphs"].items():
        if not (
            isinstance(g, dict)
            and isinstance(g.get("file"), str)
            and (isinstance(g.get("sha256"), str) or not check_sha)
        ):
            raise ModelError(f"{path}: graphs.{name} needs a 'file' and its 'sha256' (strings)")
        if Path(g["file"]).name != g["file"] or g["file"] in ("", ".", ".."):
            raise ModelError(
                f"{path}: graphs.{name}.file must name a file in the model directory, "
                f"got {g['file']!r}"
            )
        for key in ("chunk", "max_len"):
            v = g.get(key)
            if v is not None and not _positive_int(v):
                raise ModelError(
                    f"{path}: graphs.{name}.{key} must be a positive integer, got {v!r}"
                )
        if ("chunk" in g) != ("max_len" in g):
            raise ModelError(f"{path}: graphs.{name} needs both 'chunk' and 'max_len', or neither")
        f = model_dir / g["file"]
        if not f.is_file():  # a directory, /dev/zero: not a graph file either
            what = "is missing" if not f.exists() else "is not a regular file"
            raise ModelError(f"{f} ({name} graph) {what}")
        if check_sha and _graph_sha(f, name) != g["sha256"]:
            raise ModelError(
                f"{f} ({name} graph) does not match the sha256 in {MANIFEST}: "
                "the file was modified or truncated; re-export the model"
            )
    return m


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v) -> float:
    return float(v) if _number(v) else 0.0


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _int(v) and v > 0


# --- a readable table (`ssmstream info`, `ssmstream export`) -------------------------


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _obj(value) -> dict:
    """A manifest field that should be an object; anything else (a hand edit) shows as empty."""
    return value if isinstance(value, dict) else {}


def _rows(m: dict, model_dir: Path) -> list[tuple[str, str]]:
    cfg = _obj(m.get("model"))
    heads = cfg.get("heads") or cfg.get("d_model")
    if m["input_kind"] == "tokens":
        inp = f"tokens, vocab {m.get('vocab_size')}"
    else:
        inp = f"values, d_input {m.get('d_input')}"
    S = m["state_size"]
    n_layers, method = cfg.get("n_layers"), cfg.get("discretization")
    if method == "gbt" and cfg.get("alpha") is not None:
        method = f"gbt α={cfg['alpha']}"
    rows = [
        ("name", str(m["name"])),
        ("format", f"{m.get('format')} v{m.get('format_version')}"),
        ("input", inp),
        ("output", f"{m['d_output']} per position"),
        (
            "network",
            f"{n_layers} layer{'' if n_layers == 1 else 's'}, d_model {cfg.get('d_model')}, "
            f"d_state {cfg.get('d_state')}, heads {heads}, {method}, {cfg.get('init')}",
        ),
        ("state", f"S = {S} {m.get('state_dtype', 'float32')} ({_bytes(4 * S)} per session)"),
    ]
    for e in m["state_layout"]:
        rows.append((f"  layer {e['layer']}", f"offset {e['offset']}, shape {e['shape']} (re, im)"))
    rows += [
        ("dtype", f"{m['dtype']} ({m.get('precision', '')})".replace(" ()", "")),
        ("dt_scale", f"{m.get('dt_scale')}"),
        ("opset", f"{m.get('opset')}"),
    ]
    for name, g in m["graphs"].items():
        f = model_dir / g["file"]
        status = "missing"
        if f.is_file():
            try:
                same = sha256_file(f) == g.get("sha256")
                status = "ok" if same else "MODIFIED (sha256 mismatch)"
            except OSError as e:
                status = f"unreadable ({e.strerror or e})"
        extra = f", chunk {g['chunk']}, max_len {g['max_len']}" if "chunk" in g else ""
        size = _bytes(g["bytes"] if _int(g.get("bytes")) else 0)
        rows.append(
            (
                f"graph {name}",
                f"{g['file']}: {g.get('nodes')} nodes, {size}{extra}, "
                f"sha256 {str(g.get('sha256'))[:12]}… {status}",
            )
        )
    p = _obj(m.get("parity"))
    passed, verdict = p.get("passed"), "unknown"  # a hand edit may have made it anything
    if passed is None or isinstance(passed, bool):
        verdict = {True: "passed", False: "FAILED", None: "not run"}[passed]
    rows.append(("parity", verdict))
    tol = _obj(p.get("tolerance"))
    s = _obj(p.get("step_vs_torch"))
    if _number(s.get("max_rel")):
        rows.append(
            (
                "  step vs torch",
                f"max rel {s['max_rel']:.2e} (tol {_num(tol.get('step_vs_torch')):g}) over "
                f"{s.get('length')} steps",
            )
        )
    d = _obj(p.get("step_drift"))
    if _number(d.get("max_rel")) and _number(d.get("memory_steps")):
        rows.append(
            (
                "  long streams",
                f"step drift up to ~{d['max_rel']:.1e} (estimate; slowest memory "
                f"{d['memory_steps']:.3g} steps)",
            )
        )
    q = _obj(p.get("prefill_vs_step"))
    if _number(q.get("max_rel_output")) and _number(q.get("max_rel_state")):
        worst = max(q["max_rel_output"], q["max_rel_state"])
        tol_q = _num(tol.get("prefill_vs_step"))
        rows.append(("  prefill vs step", f"max rel {worst:.2e} (tol {tol_q:g})"))
    q = _obj(p.get("slots_vs_step"))
    if "passed" in q:
        rows.append(("  slot step", "bit for bit" if q["passed"] else "DIFFERS from the step"))
    ex = _obj(m.get("exporter"))
    rows.append(("exporter", ", ".join(f"{k} {v}" for k, v in ex.items() if k != "exporter")))
    if _obj(m.get("source")).get("checkpoint"):
        rows.append(("source", str(m["source"]["checkpoint"])))
    rows.append(("created", str(m.get("created"))))
    return rows


def format_manifest(manifest: dict, model_dir: str | Path) -> str:
    """The manifest as a two-column table."""
    rows = _rows(manifest, Path(model_dir))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
