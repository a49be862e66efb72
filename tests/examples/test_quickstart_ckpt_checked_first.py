"""examples/quickstart.py (`make demo`) with a --ckpt that is no byte-level LM (the shipped
signal model): refused before the export replaces the workdir's model and before the
sessions the previous demo saved there are removed."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from scripts import load_script  # noqa: E402


def test_a_checkpoint_that_is_no_byte_lm_is_refused_before_anything_is_replaced(
    tmp_path, monkeypatch, capsys
):
    qs = load_script("examples/quickstart.py")
    work = tmp_path / "work"
    (work / "state").mkdir(parents=True)
    (work / "state" / "sessions.bin").write_bytes(b"the previous demo's sessions")
    exported = []
    monkeypatch.setattr(qs, "export", lambda *a, **k: exported.append(a) or True)
    old = signal.getsignal(signal.SIGTERM)  # main() sets its own
    try:
        with pytest.raises(SystemExit) as e:
            qs.main(["--workdir", str(work), "--ckpt", str(ROOT / "examples/checkpoints/signal")])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 2 and "byte-level token model" in capsys.readouterr().err
    assert exported == []
    assert (work / "state" / "sessions.bin").read_bytes() == b"the previous demo's sessions"
