"""The training log of a resumed run is not read through a symbolic link at its name, and an
--out below a directory the user cannot write is refused before any work."""

from __future__ import annotations

import os

import pytest
from ssmstream.model import train as train_mod
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, default_model_config, fit

OTHER = b'{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n'


def test_truncating_a_log_that_is_a_symbolic_link_keeps_none_of_the_targets_lines(tmp_path):
    """The target holds lines that look like this run's log (steps 1 and 2 ≤ the resumed
    step): none of them may be copied into the log."""
    other = tmp_path / "other.jsonl"
    other.write_bytes(OTHER)
    log = tmp_path / "train_log.jsonl"
    log.symlink_to(other)
    train_mod._truncate_log(log, 2)
    assert not log.is_symlink() and log.read_bytes() == b""
    assert other.read_bytes() == OTHER


def test_out_below_a_directory_the_user_cannot_write_is_refused(tmp_path, monkeypatch):
    """As root every directory is writable, so the permission is what os.access answers."""
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == parent else real(p, mode))
    cfg = TrainConfig(task="signal", out=str(parent / "o"), signal=SignalConfig(rate=4.0,
                      duration=2.0), batch_size=1, steps=1, warmup_steps=0, progress=False,
                      threads=1)  # fmt: skip
    model = default_model_config("signal", d_model=4, n_layers=1, d_state=4)
    with pytest.raises(ValueError, match=r"^out: cannot create .*ro/o: .*ro is not a writable"):
        fit(model, cfg)
    assert not (parent / "o").exists()
