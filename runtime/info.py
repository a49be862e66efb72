"""`ssmstream info MODEL_DIR`: an exported model's manifest as a readable table (torch-free).

    format_manifest(manifest, model_dir) -> str     also used by `ssmstream export`

The graph files' sha256 are checked and shown as ok / MODIFIED; `--json` prints the raw
manifest instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ModelError
from .manifest import load_manifest, sha256_file


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _rows(m: dict, model_dir: Path) -> list[tuple[str, str]]:
    cfg = m.get("model", {})
    heads = cfg.get("heads") or cfg.get("d_model")
    if m["input_kind"] == "tokens":
        inp = f"tokens, vocab {m.get('vocab_size')}"
    else:
        inp = f"values, d_input {m.get('d_input')}"
    S = m["state_size"]
    rows = [
        ("name", str(m["name"])),
        ("format", f"{m.get('format')} v{m.get('format_version')}"),
        ("input", inp),
        ("output", f"{m['d_output']} per position"),
        (
            "network",
            f"{cfg.get('n_layers')} layers, d_model {cfg.get('d_model')}, d_state "
            f"{cfg.get('d_state')}, heads {heads}, {cfg.get('discretization')}, "
            f"{cfg.get('init')}",
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
            status = "ok" if sha256_file(f) == g.get("sha256") else "MODIFIED (sha256 mismatch)"
        extra = f", chunk {g['chunk']}, max_len {g['max_len']}" if "chunk" in g else ""
        rows.append(
            (
                f"graph {name}",
                f"{g['file']}: {g.get('nodes')} nodes, {_bytes(g.get('bytes', 0))}{extra}, "
                f"sha256 {str(g.get('sha256'))[:12]}… {status}",
            )
        )
    p = m.get("parity") or {}
    verdict = {True: "passed", False: "FAILED", None: "not run"}[p.get("passed")]
    rows.append(("parity", verdict))
    tol = p.get("tolerance", {})
    s = p.get("step_vs_torch", {})
    if "max_rel" in s:
        rows.append(
            (
                "  step vs torch",
                f"max rel {s['max_rel']:.2e} (tol {tol.get('step_vs_torch', 0):.0e}) over "
                f"{s['length']} steps",
            )
        )
    q = p.get("prefill_vs_step", {})
    if "max_rel_output" in q:
        worst = max(q["max_rel_output"], q["max_rel_state"])
        rows.append(
            ("  prefill vs step", f"max rel {worst:.2e} (tol {tol.get('prefill_vs_step', 0):.0e})")
        )
    ex = m.get("exporter", {})
    rows.append(("exporter", ", ".join(f"{k} {v}" for k, v in ex.items() if k != "exporter")))
    if m.get("source", {}).get("checkpoint"):
        rows.append(("source", m["source"]["checkpoint"]))
    rows.append(("created", str(m.get("created"))))
    return rows


def format_manifest(manifest: dict, model_dir: str | Path) -> str:
    """The manifest as a two-column table."""
    rows = _rows(manifest, Path(model_dir))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream info",
        description="Print an exported model's manifest (I/O, state layout, graphs, parity).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = load_manifest(args.model_dir, check_sha=False)
    except ModelError as e:
        print(f"ssmstream info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m, indent=2) if args.json else format_manifest(m, args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
