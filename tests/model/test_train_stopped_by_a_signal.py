"""`ssmstream train` stopped by Ctrl-C (SIGINT) or SIGTERM (a timeout, `docker stop`, a
preemption) ends with one line that says the step of the checkpoint it left and the command
that continues it, and 128 + the signal; the checkpoint is the last one saved, and the resumed
run ends where one uninterrupted run ends. A SIGTERM while a checkpoint is renamed into
place, like Ctrl-C, lets the renames finish."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.model import train as train_mod
from ssmstream.model.train import main

# a signal run: 4 samples per step, one layer of width 8, a checkpoint every 2 steps
RUN = [
    "--task", "signal", "--rate", "4", "--duration", "2", "--steps", "4", "--warmup-steps", "1",
    "--batch-size", "1", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
    "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--no-progress", "--threads", "1",
]  # fmt: skip


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send `signum` to this process when the run logs the loss of `step`."""
    append = train_mod._append

    def append_then_signal(path, entry):
        append(path, entry)
        if entry.get("step") == step and "loss" in entry:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_mod, "_append", append_then_signal)


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that reaches this handler was not taken by the run (instead of ending pytest)."""

    def reached(signum, frame):
        raise AssertionError("SIGTERM was not handled by ssmstream train")

    before = signal.signal(signal.SIGTERM, reached)
    yield reached
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_its_checkpoint_and_resumes_to_the_same_weights(
    tmp_path, monkeypatch, capsys, sigterm_guard, signum
):
    whole = tmp_path / "whole"
    assert main([*RUN, "--out", str(whole)]) == 0
    out = tmp_path / "stopped run"  # a space: the command printed quotes it
    _signal_at(monkeypatch, 3, signum)
    assert main([*RUN, "--out", str(out)]) == 128 + signum
    name = signal.Signals(signum).name
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"ssmstream train: stopped by {name}; {out} holds the checkpoint of step 2: "
        f"continue with `ssmstream train --out '{out}' --resume`"
    ]
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the handler before is back
    monkeypatch.undo()
    assert main(["--out", str(out), "--resume"]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_before_its_first_checkpoint_says_there_is_nothing_to_resume(
    tmp_path, monkeypatch, capsys, sigterm_guard
):
    out = tmp_path / "run"
    _signal_at(monkeypatch, 1, signal.SIGTERM)
    assert main([*RUN, "--out", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"ssmstream train: stopped by SIGTERM before the first checkpoint: {out} holds no "
        "run to resume"
    ]
    assert not (out / "config.json").exists()
    monkeypatch.undo()
    assert main(["--out", str(out), "--resume"]) == 2  # and --resume says so too
    assert "holds no checkpoint" in capsys.readouterr().err


def test_a_stopped_message_reads_the_checkpoint_left(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    said = train_mod.stopped_message(out, signal.SIGINT)
    assert said.endswith("holds no run to resume")
    (out / "config.json").write_text(
        json.dumps({"format": "ssmstream-checkpoint", "version": 1, "model": {}, "step": 7})
    )
    assert "holds the checkpoint of step 7:" in train_mod.stopped_message(out, signal.SIGINT)


def test_a_sigterm_between_the_renames_of_a_save_leaves_the_whole_checkpoint(
    tmp_path, monkeypatch, sigterm_guard
):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(d_input=1, d_output=1, d_model=4, n_layers=1, d_state=4))
    out = tmp_path / "ck"
    save_checkpoint(net, out, extra={"step": 1})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    replace, renamed = os.replace, []

    def replace_then_signal(src, dst):  # SIGTERM after the first file is in place
        replace(src, dst)
        renamed.append(Path(dst).name)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(train_mod.TrainingStopped):
        with train_mod._sigterm_stops_training():
            save_checkpoint(net, out, extra={"step": 2})
    monkeypatch.undo()
    assert renamed == ["model.safetensors", "config.json"]  # both, the signal in between
    assert json.loads((out / "config.json").read_text())["step"] == 2
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert not list(out.glob("*.tmp"))
