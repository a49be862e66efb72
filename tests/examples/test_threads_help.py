"""`--threads` goes to Engine(threads=...), which sizes the prefill graph's pool only (the step
runs on `step_threads`, one by default): every command line that takes it says so in --help,
as the Engine's docstring does."""

from __future__ import annotations

import inspect
import re

import pytest
from scripts import load_script
from ssmstream.runtime import bench, config
from ssmstream.runtime.engine import Engine


def help_of(parser, flag: str) -> str:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return " ".join(action.help.split())


def edge_embed_help(capsys) -> str:
    with pytest.raises(SystemExit):
        load_script("examples/edge_embed.py").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    return re.search(r"--threads THREADS (.*?)(?: --|$)", out).group(1)


def test_the_engines_threads_are_the_prefill_graphs():
    doc = " ".join(inspect.getdoc(Engine).split())
    assert "threads: onnxruntime intra-op threads of the prefill graph" in doc


def test_every_threads_flag_says_it_sizes_the_prefill_graph(capsys):
    helps = {
        "ssmstream serve": help_of(config.build_parser(), "--threads"),
        "ssmstream bench": help_of(bench.build_parser(), "--threads"),
        "examples/edge_embed.py": edge_embed_help(capsys),
    }
    vague = {cmd: text for cmd, text in helps.items() if "of the prefill graph" not in text}
    assert not vague, vague
