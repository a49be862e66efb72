"""benchmarks/profile_server.py finds the py-spy that the dev extras put next to the Python
running it, also when that venv's bin is not on PATH (`.venv/bin/python benchmarks/...`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_py_spy_is_found_next_to_the_python_without_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_server

    monkeypatch.setenv("PATH", os.defpath)  # no venv bin on it
    found = profile_server.pyspy_path()
    assert found == str(Path(sys.executable).parent / "py-spy")
