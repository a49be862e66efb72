"""examples/quickstart.py (`make demo`): a prompt starting with "-" reaches `ssmstream
generate` as the prompt (after `--`), and its own bad flags are usage errors before the
server starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from scripts import load_script  # noqa: E402

build_toy = load_script("tests/runtime/conftest.py").build_toy


@pytest.fixture
def qs(tmp_path, monkeypatch):
    mod = load_script("examples/quickstart.py")
    build_toy(tmp_path / "model", "tokens", V=256, d_out=256)  # a byte-level model
    monkeypatch.setattr(mod, "export", lambda *a, **k: False)  # use the toy as "the export"
    return mod


def test_prompt_starting_with_dash_is_streamed(qs, tmp_path):
    rc = qs.main(["--workdir", str(tmp_path), "--prompt=-v", "--max-new-tokens", "4"])
    assert rc == 0


@pytest.mark.parametrize("argv", [["--max-new-tokens", "-1"], ["--prompt="]])
def test_bad_flag_is_a_usage_error(qs, tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        qs.main(["--workdir", str(tmp_path), *argv])
    assert e.value.code == 2
