"""`ssmstream info MODEL_DIR`: an exported model's manifest as a readable table (torch-free).

The graph files' sha256 are checked and shown as ok / MODIFIED; `--json` prints the raw
manifest instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ModelError
from .manifest import format_manifest, load_manifest


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
