"""examples/plot_basis.py: an --out it cannot write is a usage error naming it, as in
`ssmstream plot`, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))
from scripts import load_script  # noqa: E402


def test_unwritable_out_is_a_usage_error(tmp_path):
    pb = load_script("examples/plot_basis.py")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:  # today: FileExistsError/NotADirectoryError
        pb.main(["--out", str(blocker / "x.png"), "--no-init", "--length", "32"])
    assert e.value.code == 2


def test_an_out_that_is_a_directory_names_out(tmp_path, capsys):
    """As `ssmstream plot --out DIR`: the message names --out, not the plot's `path`."""
    pb = load_script("examples/plot_basis.py")
    with pytest.raises(SystemExit) as e:
        pb.main(["--out", str(tmp_path), "--no-init", "--length", "32"])
    assert e.value.code == 2
    assert f"error: --out: {tmp_path} is a directory" in capsys.readouterr().err
