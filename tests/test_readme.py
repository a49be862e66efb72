"""The README cannot rot: every `ssmstream …` command line in its shell blocks parses with the
real CLI, and the block marked `<!-- readme-test: run -->` runs as written."""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PARSERS = {  # subcommand -> module with build_parser()
    "train": "ssmstream.model.train",
    "export": "ssmstream.export.cli",
    "verify": "ssmstream.export.verify_cli",
    "info": "ssmstream.runtime.info",
    "serve": "ssmstream.runtime.config",
    "generate": "ssmstream.runtime.client",
    "plot": "ssmstream.model.plots",
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


COMMANDS = [
    argv for _, lines in shell_blocks(README) for ln in lines if (argv := ssmstream_argv(ln))
]


def test_readme_has_the_two_commands_and_commands_to_check():
    assert "make demo" in README and "make test" in README
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(argv):
    parser = importlib.import_module(PARSERS[argv[0]]).build_parser()
    parser.parse_args(argv[1:])  # SystemExit (a failed test) on an unknown flag or bad value


def test_readme_run_block_runs(tmp_path):
    (run_lines,) = [lines for run, lines in shell_blocks(README) if run]
    for line in run_lines:
        argv = ssmstream_argv(line.replace("/tmp/ssm-model", str(tmp_path / "model")))
        r = subprocess.run(
            [sys.executable, "-m", "ssmstream.runtime.cli", *argv],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
