"""An export that is stopped or whose checkpoint changes under it: SIGTERM removes the
temporary directory as Ctrl-C does, and the manifest's weights_sha256 is that of the weights
the graphs were made from, also when a training run saves into the checkpoint meanwhile."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from export_helpers import EXPORT, TOKEN
from ssmstream.export import exporter
from ssmstream.export.exporter import ExportError
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint


def test_sigterm_during_export_leaves_no_temporary_directory(token_ckpt, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "export", str(token_ckpt),
           "--out", str(work / "model"), "-q"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob(".model.*.tmp")):  # the export has started writing
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"export ended before its temporary directory appeared: {p.returncode}")
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert sorted(x.name for x in work.iterdir()) == []


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _saving_trainer(monkeypatch, ckpt, saves: int):
    """load_checkpoint, after which a trainer saves new weights into `ckpt` (the first
    `saves` loads). Returns the list of the weights' sha256 each load saw."""
    real, seen = exporter.load_checkpoint, []

    def load(path):
        net = real(path)
        seen.append(_sha(ckpt / "model.safetensors"))
        if len(seen) <= saves:
            torch.manual_seed(100 + len(seen))
            save_checkpoint(SSMNetwork(SSMConfig(**TOKEN)), path)
        return net

    monkeypatch.setattr(exporter, "load_checkpoint", load)
    return seen


def test_weights_saved_during_the_load_are_loaded_again(token_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    seen = _saving_trainer(monkeypatch, ckpt, saves=1)
    out = exporter.export_model(ckpt, tmp_path / "model", verify=False, **EXPORT)
    recorded = json.loads((out / "manifest.json").read_text())["source"]["weights_sha256"]
    assert len(seen) == 2 and seen[0] != seen[1]
    assert recorded == seen[1] == _sha(ckpt / "model.safetensors")


def test_weights_that_keep_changing_are_refused(token_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    seen = _saving_trainer(monkeypatch, ckpt, saves=3)
    with pytest.raises(ExportError, match=r"changed while it was read, three times"):
        exporter.export_model(ckpt, tmp_path / "model", verify=False, **EXPORT)
    assert len(seen) == 3 and not (tmp_path / "model").exists()
