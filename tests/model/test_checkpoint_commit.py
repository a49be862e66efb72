"""A checkpoint save is one commit: every file (the weights, config.json, the optimizer
state) is written whole under a temporary name, then all are renamed, config.json last. A run
interrupted inside a periodic save resumes from the previous checkpoint and ends where one
uninterrupted run ends; an interrupt between two renames still completes the commit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from ssmstream.model import checkpoint as ckpt_mod
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, default_model_config, fit

MODEL = dict(d_model=8, n_layers=1, d_state=4)
SIGNAL = SignalConfig(rate=4.0, duration=8.0)  # L = 32


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        task="signal", out=str(out), signal=SIGNAL, batch_size=2, steps=6, warmup_steps=1,
        log_every=2, eval_every=100, save_every=2, eval_batches=1, progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_resume_after_an_interrupt_inside_a_periodic_save(tmp_path, monkeypatch):
    out = tmp_path / "o"
    real, calls = ckpt_mod.save, []

    def save(*a, **kw):  # the 2nd checkpoint (step 4) is interrupted mid-write
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ckpt_mod, "save", save)
    with pytest.raises(KeyboardInterrupt):
        fit(default_model_config("signal", **MODEL), _cfg(out))
    monkeypatch.setattr(ckpt_mod, "save", real)
    assert json.loads((out / "config.json").read_text())["step"] == 2  # the last whole save

    result = fit(None, _cfg(out, resume=True))  # ValueError today: train_state at step 4
    assert result.step == 6

    ref = fit(default_model_config("signal", **MODEL), _cfg(tmp_path / "ref"))
    for (k, a), (_, b) in zip(
        sorted(result.net.state_dict().items()), sorted(ref.net.state_dict().items())
    ):
        assert torch.equal(a, b), k  # resumed from step 2 == one uninterrupted run


def test_an_interrupt_between_the_renames_still_commits_the_whole_checkpoint(tmp_path, monkeypatch):
    from ssmstream.model import checkpoint as ck
    from ssmstream.model.network import SSMNetwork

    torch.manual_seed(0)
    net = SSMNetwork(default_model_config("signal", **MODEL))
    ck.save_checkpoint(
        net, tmp_path, extra={"step": 1}, also={"x.bin": lambda p: p.write_text("1")}
    )
    real, n = os.replace, []

    def replace(a, b):  # a Ctrl-C right after the first rename of the next save
        real(a, b)
        n.append(b)
        if len(n) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(
            net, tmp_path, extra={"step": 2}, also={"x.bin": lambda p: p.write_text("2")}
        )
    assert [p.name for p in n] == ["x.bin", "model.safetensors", "config.json"]
    assert (tmp_path / "x.bin").read_text() == "2"
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_save_that_runs_out_of_disk_leaves_no_partial_files(tmp_path, monkeypatch):
    """A full disk: the temporary files written so far would keep it full; they are removed
    and the previous checkpoint stays whole."""
    from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, save_checkpoint

    net = SSMNetwork(SSMConfig(**MODEL, d_input=1))
    save_checkpoint(net, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = ckpt_mod.open_new

    def open_new(path, *a, **kw):
        if path.name == "config.json.tmp":
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "open_new", open_new)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(net, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_checkpoint(tmp_path)


def test_a_torch_save_that_fails_mid_write_leaves_no_partial_files(tmp_path):
    """torch.save reports a full disk as a RuntimeError (its zip writer): the partial file is
    removed all the same, and the error is an OSError naming the checkpoint."""
    from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

    net = SSMNetwork(SSMConfig(**MODEL, d_input=1))
    save_checkpoint(net, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_written(path):
        path.write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25280")

    with pytest.raises(OSError, match=f"cannot write the checkpoint to {tmp_path}: .*enforce"):
        save_checkpoint(net, tmp_path, also={"train_state.pt": half_written})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
