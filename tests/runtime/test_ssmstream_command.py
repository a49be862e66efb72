"""`ssmstream` itself: usage asked for goes to stdout (exit 0); a missing or unknown command
is a usage error on stderr (exit 2), as argparse's are; each command reaches its own module."""

from __future__ import annotations

import json

import pytest
from ssmstream.runtime import cli


def test_usage_and_usage_errors(capsys):
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: ssmstream <command>") and "serve" in out and not err
    for argv in ([], ["no-such-command"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert not out and "usage: ssmstream <command>" in err


@pytest.mark.parametrize("name", ["info", "serve", "generate", "bench"])  # torch-free: fast
def test_each_command_routes_to_its_own_parser(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ssmstream {name} ")


def test_ssmstream_info_through_the_dispatcher(toy_token_model, tmp_path, capsys):
    model_dir = str(toy_token_model["model_dir"])
    assert cli.main(["info", model_dir, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == json.loads((toy_token_model["model_dir"] / "manifest.json").read_text())
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("ssmstream info: error: ")
