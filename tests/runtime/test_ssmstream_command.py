"""`ssmstream` itself: usage asked for goes to stdout (exit 0); a missing or unknown command
is a usage error on stderr (exit 2), as argparse's are; each command reaches its own module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ssmstream.runtime import cli


def test_usage_and_usage_errors(capsys):
    for asked in ("--help", "-h"):
        assert cli.main([asked]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("usage: ssmstream <command>") and "serve" in out and not err
    for argv in ([], ["no-such-command"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert not out and "usage: ssmstream <command>" in err


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_installed_packages(flag, capsys):
    import importlib.metadata
    import platform

    import onnxruntime

    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    want = importlib.metadata.version("ssmstream")
    assert out == (
        f"ssmstream {want} (onnxruntime {onnxruntime.__version__}, "
        f"Python {platform.python_version()})\n"
    )
    assert not err and "ssmstream --version" in cli.usage()


@pytest.mark.parametrize("name", ["info", "serve", "generate", "bench"])  # torch-free: fast
def test_each_command_routes_to_its_own_parser(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ssmstream {name} ")


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_no_help_shows_an_empty_default(name, capsys):
    """A flag whose default is None, False or "" says in its help what that means;
    "(default: None)", "(default: False)" and "(default: )" tell the reader nothing."""
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for empty in ("(default: None)", "(default: False)", "(default: )"):
        assert empty not in text


def test_ssmstream_info_through_the_dispatcher(toy_token_model, tmp_path, capsys):
    model_dir = str(toy_token_model["model_dir"])
    assert cli.main(["info", model_dir, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == json.loads((toy_token_model["model_dir"] / "manifest.json").read_text())
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("ssmstream info: error: ")


def test_ctrl_c_in_any_command_is_one_line_and_130(monkeypatch, capsys):
    """A KeyboardInterrupt anywhere in a command (torch's kernels in train, a verify, a
    bench, an import) ends it with one line, not a traceback."""
    from ssmstream.runtime import info

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "main", interrupted)
    assert cli.main(["info", "model"]) == 130
    assert capsys.readouterr() == ("", "ssmstream info: interrupted\n")


@pytest.mark.parametrize("argv", [["--help"], ["info", "MODEL"], ["info", "MODEL", "--json"]])
def test_a_closed_stdout_pipe_ends_quietly_with_141(toy_token_model, argv):
    """`ssmstream info … | head -c 10`: the reader went away; no BrokenPipeError traceback."""
    model_dir = str(toy_token_model["model_dir"])
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    try:
        cmd = [sys.executable, "-m", "ssmstream.runtime.cli",
               *(model_dir if a == "MODEL" else a for a in argv)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
        p = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, timeout=60, env=env)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr.decode()) == (141, "")


@pytest.mark.parametrize(
    "name, said",
    [
        ("export", "ssmstream export: needs the 'onnx' package: pip install 'ssmstream[export]'"),
        ("info", "ssmstream info: needs the 'onnx' package, which is not installed"),
    ],
)
def test_a_missing_package_names_the_extra_that_installs_it(monkeypatch, capsys, name, said):
    """A command whose module cannot be imported says which package is missing and, where
    an optional extra brings it, the pip command; exit 2."""
    import importlib

    def missing(path):
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    monkeypatch.setattr(importlib, "import_module", missing)
    assert cli.main([name, "x"]) == 2
    assert capsys.readouterr() == ("", said + "\n")
