"""`ssmstream verify MODEL_DIR [--ckpt CKPT]`: re-run an exported model's parity check.

Checks the graphs' sha256 against the manifest, then runs export/verify.py: ORT step over a
long random sequence vs the torch convolution-mode forward (from --ckpt, or the checkpoint
recorded in the manifest when it still exists), and prefill vs step. Exit status 0 when
every check is within the manifest dtype's tolerance, 1 when one fails, 2 when the model or
checkpoint cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ssmstream.model.checkpoint import CheckpointError
from ssmstream.runtime.errors import ModelError

from .exporter import MAX_VERIFY_STEPS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream verify",
        description="Re-run the parity check of an exported ssmstream model; exit status != 0 "
        "when it fails its tolerance.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument(
        "--ckpt",
        default=None,
        metavar="CKPT",
        help="checkpoint to compare against (default: the one recorded in the manifest)",
    )
    p.add_argument(
        "--steps", type=int, default=4096, metavar="L", help="sequence length (default: 4096)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def format_report(report: dict) -> str:
    """The parity report as a few readable lines."""
    tol = report["tolerance"]
    lines = [f"parity ({report['dtype']}): {'PASSED' if report['passed'] else 'FAILED'}"]
    s = report["step_vs_torch"]
    if "skipped" in s:
        lines.append(f"  step vs torch     skipped: {s['skipped']}")
    else:
        lines.append(
            f"  step vs torch     max rel {s['max_rel']:.2e} (tol {tol['step_vs_torch']:g}), "
            f"max abs {s['max_abs']:.2e}, {s['length']} steps × batch {s['batch']}"
            + ("" if s["passed"] else "  <-- FAILED")
        )
    p = report.get("prefill_vs_step")
    if p is not None:
        worst = max(p["max_rel_output"], p["max_rel_state"])
        lines.append(
            f"  prefill vs step   max rel {worst:.2e} (tol {tol['prefill_vs_step']:g}), "
            f"lengths {p['lengths']}" + ("" if p["passed"] else "  <-- FAILED")
        )
    q = report.get("slots_vs_step")
    if q is not None:
        lines.append(
            f"  slot step         max abs {max(q['max_abs_output'], q['max_abs_state']):.2e} vs "
            f"the plain step (bit for bit), {q['steps']} steps × batch {q['batch']}"
            + ("" if q["passed"] else "  <-- FAILED")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    if args.steps < 1:
        print("ssmstream verify: error: --steps must be positive", file=sys.stderr)
        return 2
    if args.steps > MAX_VERIFY_STEPS:
        print(f"ssmstream verify: error: --steps must be at most {MAX_VERIFY_STEPS}, got "
              f"{args.steps}", file=sys.stderr)  # fmt: skip
        return 2
    from .verify import verify_model

    try:
        report = verify_model(args.model_dir, args.ckpt, steps=args.steps)
    except (ModelError, CheckpointError) as e:
        said = f"--ckpt: {e}" if isinstance(e, CheckpointError) and args.ckpt is not None else e
        print(f"ssmstream verify: error: {said}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
