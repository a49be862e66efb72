"""The README's shell and Python blocks as data, and its run block (`<!-- readme-test: run -->`:
the tour's export, info and verify of the shipped checkpoint) run as written, the model
directory aside. tests/conftest.py runs the block once per test run (`readme_tour`):
tests/test_readme.py checks each command's result, and the demo's and the edge example's
tests start from its export instead of exporting the same checkpoint again."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TOUR_MODEL = "/tmp/ssm-model"  # where the tour exports to
TOUR_SERVER = "127.0.0.1:50051"  # where the tour serves it
PARSERS = {  # subcommand -> module with build_parser()
    "train": "ssmstream.model.train",
    "export": "ssmstream.export.cli",
    "verify": "ssmstream.export.verify_cli",
    "info": "ssmstream.runtime.info",
    "serve": "ssmstream.runtime.config",
    "generate": "ssmstream.runtime.generate",
    "plot": "ssmstream.model.plots",
    "bench": "ssmstream.runtime.bench",
    "health": "ssmstream.runtime.probe",
}


def shell_blocks(text: str) -> list[tuple[bool, list[str]]]:
    """(marked to run, logical command lines) of each ```sh block."""
    blocks = []
    for m in re.finditer(r"(<!-- readme-test: run -->\n)?```sh\n(.*?)```", text, re.S):
        joined = m.group(2).replace("\\\n", " ")
        lines = [
            re.sub(r"\s+#.*$", "", ln).strip().rstrip("&").strip() for ln in joined.splitlines()
        ]
        blocks.append((m.group(1) is not None, [ln for ln in lines if ln]))
    return blocks


def ssmstream_argv(line: str) -> list[str] | None:
    """The ssmstream argv of a command line (`ssmstream X …` or `torchrun … -m MODULE …`)."""
    words = shlex.split(line)
    if words[0] == "ssmstream":
        return words[1:]
    if words[0] == "torchrun" and "-m" in words:
        module = words[words.index("-m") + 1]
        name = {v: k for k, v in PARSERS.items()}[module]
        return [name, *words[words.index("-m") + 2 :]]
    return None


def run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """`ssmstream ARGV` from the repository root, run by the command's entry point in this
    process: its status and what it printed. The logging it sets up is taken back after."""
    from ssmstream.runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    root, ours = logging.getLogger(), logging.getLogger("ssmstream")
    handlers, level = list(root.handlers), ours.level
    try:
        with (
            contextlib.chdir(ROOT),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        root.handlers[:] = handlers
        ours.setLevel(level)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_tour(model: Path) -> list[tuple[str, subprocess.CompletedProcess]]:
    """The run block with `model` for its model directory: [(line, result)], up to the first
    command that fails."""
    (run_lines,) = [lines for run, lines in shell_blocks(README) if run]
    done = []
    for line in run_lines:
        r = run_in_process(ssmstream_argv(line.replace(TOUR_MODEL, str(model))))
        done.append((line, r))
        if r.returncode != 0:
            break
    return done
