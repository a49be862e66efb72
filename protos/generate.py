"""Regenerate the Python stubs of protos/inference.proto (the one source of truth).

    python -m ssmstream.protos.generate            # rewrite protos/*_pb2*.py(i) in place
    python -m ssmstream.protos.generate --out DIR  # write them under DIR instead (for checks)

A virtual include path (`-Issmstream/protos=protos`) makes protoc write imports of the
form `from ssmstream.protos import inference_pb2`, which resolve through the package-dir
mapping of pyproject.toml (see DESIGN.md, protos/). Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("inference.proto",)
# what protoc writes per .proto: module suffixes
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    """File names of every generated stub, e.g. inference_pb2.py."""
    return [Path(p).stem + s for p in PROTO_FILES for s in SUFFIXES]


def generate(out_dir: str | Path) -> list[Path]:
    """Run protoc on PROTO_FILES and copy the stubs into out_dir; returns their paths."""
    from grpc_tools import protoc  # dev-only dependency, imported on use

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROTO_FILES:
            args = [
                "grpc_tools.protoc",
                f"-Issmstream/protos={PROTO_DIR}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_DIR / name),
            ]
            rc = protoc.main(args)
            if rc != 0:
                raise RuntimeError(f"protoc failed on {name} (exit status {rc})")
        written = []
        for stub in generated_names():
            src = Path(tmp) / "ssmstream" / "protos" / stub
            dst = out_dir / stub
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssmstream.protos.generate",
        description="Regenerate the committed Python stubs from protos/inference.proto.",
    )
    parser.add_argument(
        "--out",
        default=str(PROTO_DIR),
        help="directory to write the stubs to (default: the protos/ package itself)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
