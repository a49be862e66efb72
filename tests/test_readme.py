"""The README cannot rot: every `ssmstream …` command line in its shell blocks parses with the
real CLI, the block marked `<!-- readme-test: run -->` (the tour's export) runs as written, and
every ```python block runs as written, each as a script in its own empty directory.

The Python blocks use what the tour makes: its export in /tmp/ssm-model and its server on
127.0.0.1:50051. Here the export goes to a temp directory and the server (`ssmstream serve` of
that export) to a free port; those two strings are the only change made to a block before it
runs. The run block's commands go through the `ssmstream` entry point (`main(argv)`, what the
console script calls) in this process, which has torch and onnxruntime imported already."""

import importlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from readme_tour import (
    PARSERS,
    README,
    ROOT,
    TOUR_MODEL,
    TOUR_SERVER,
    shell_blocks,
    ssmstream_argv,
)

COMMANDS = [
    argv for _, lines in shell_blocks(README) for ln in lines if (argv := ssmstream_argv(ln))
]


def test_readme_has_the_two_commands_and_commands_to_check():
    assert "make demo" in README and "make test" in README
    assert len(COMMANDS) >= 15


def test_readme_shows_every_command_ssmstream_has():
    from ssmstream.runtime.cli import COMMANDS as SUBCOMMANDS

    assert set(PARSERS) == set(SUBCOMMANDS)
    assert {argv[0] for argv in COMMANDS} == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(argv):
    parser = importlib.import_module(PARSERS[argv[0]]).build_parser()
    parser.parse_args(argv[1:])  # SystemExit (a failed test) on an unknown flag or bad value


def python_blocks(text: str) -> list[str]:
    """The source of each ```python block."""
    return re.findall(r"```python\n(.*?)```", text, re.S)


BLOCKS = python_blocks(README)


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "ssmstream.runtime.cli", *argv]


def test_readme_run_block_runs(readme_tour):
    _, done = readme_tour
    for line, r in done:
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def tour_server(shipped_export, tmp_path_factory):
    """`ssmstream serve` of the tour's export on a free port; yields its address."""
    work = tmp_path_factory.mktemp("serve")
    port_file = work / "port.json"
    with open(work / "server.log", "w") as log:
        proc = subprocess.Popen(
            _cli("serve", str(shipped_export), "--port", "0", "--port-file", str(port_file)),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert proc.poll() is None, (work / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not report its port"
            time.sleep(0.05)
        yield f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_readme_python_blocks_use_the_tour():
    assert len(BLOCKS) >= 3
    assert any(TOUR_MODEL in b for b in BLOCKS) and any(TOUR_SERVER in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[-1][:50] for b in BLOCKS])
def test_readme_python_block_runs(block, request, tmp_path):
    code = block
    if TOUR_MODEL in code:
        code = code.replace(TOUR_MODEL, str(request.getfixturevalue("shipped_export")))
    if TOUR_SERVER in code:
        code = code.replace(TOUR_SERVER, request.getfixturevalue("tour_server"))
    script = tmp_path / "block.py"
    script.write_text(code)
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=work
    )
    assert r.returncode == 0, f"{block}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def test_the_scale_out_rows_show_the_committed_results():
    """The README's table takes its headline figures from benchmarks/results: the scale-out
    rows show bench_scaleout.json's numbers (an earlier run's had stayed)."""
    readme = (ROOT / "README.md").read_text()
    res = json.loads((ROOT / "benchmarks/results/bench_scaleout.json").read_text())
    row = next(line for line in readme.splitlines() if "replicas behind nginx" in line)
    shown = [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?= |$)", row.split("|")[2])]
    proxied = [round(x["tokens_per_s"]) for x in res["throughput"] if "nginx" in x["setup"]]
    direct = next(round(x["tokens_per_s"]) for x in res["throughput"] if "direct" in x["setup"])
    assert shown[:3] == proxied and direct in shown, (shown, proxied, direct)
