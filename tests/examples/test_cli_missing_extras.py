"""A subcommand whose extra is not installed (`pip install ssmstream` without `[serve]`,
`[export]`, `[train]`) says which extra to install, in one line, instead of a
ModuleNotFoundError traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import test_packaging as tp  # noqa: E402


@pytest.mark.parametrize(
    "command, extra",
    [("serve", "serve"), ("export", "export"), ("verify", "export"), ("train", "train")],
)
def test_subcommand_without_its_extra_names_the_extra(command, extra):
    args = [json.dumps(tp.importable([])), json.dumps([]), json.dumps([command, "--help"])]
    r = subprocess.run(
        [sys.executable, "-c", tp.ONLY, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ},
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and f"ssmstream[{extra}]" in r.stderr, r.stderr
