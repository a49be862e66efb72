"""A checkpoint directory that another user can write: a symbolic or hard link put at a name
that a save or a training run writes (the temporary files, train_log.jsonl) is replaced or
refused, never written through. The file it points to keeps its bytes and its mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, save_checkpoint
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import LOG_FILE, TrainConfig, default_model_config, fit

MODEL = dict(d_model=8, n_layers=1, d_state=4)
VICTIM = b"not the trainer's to write\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def plant(link, target, kind: str) -> None:
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)


def untouched(victim) -> bool:
    return victim.read_bytes() == VICTIM and stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "train_state.pt"])
def test_a_save_replaces_a_link_at_a_temporary_name(tmp_path, victim, kind, name):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    plant(ckpt / f"{name}.tmp", victim, kind)
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=16, **MODEL))
    state = {"step": torch.arange(3)}
    save_checkpoint(net, ckpt, also={"train_state.pt": lambda p: torch.save(state, p)})
    assert untouched(victim)
    for saved in ("model.safetensors", "config.json", "train_state.pt"):
        path = ckpt / saved
        assert not path.is_symlink() and path.stat().st_ino != victim.stat().st_ino, saved
    assert not list(ckpt.glob("*.tmp"))
    assert torch.equal(torch.load(ckpt / "train_state.pt")["step"], state["step"])
    loaded = load_checkpoint(ckpt)
    for (k, a), (_, b) in zip(
        sorted(loaded.state_dict().items()), sorted(net.state_dict().items())
    ):
        assert torch.equal(a, b), k


def test_a_save_does_not_create_the_target_of_a_dangling_link_at_the_log(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / LOG_FILE).symlink_to(tmp_path / "made-elsewhere")
    save_checkpoint(SSMNetwork(SSMConfig(vocab_size=16, **MODEL)), ckpt)
    assert not os.path.lexists(tmp_path / "made-elsewhere")
    load_checkpoint(ckpt)


def trained_steps(log) -> list[int]:
    """The step of each training line of a log (eval lines left out)."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e["step"] for e in entries if "loss" in e]


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        task="signal", out=str(out), signal=SignalConfig(rate=4.0, duration=8.0), batch_size=2,
        steps=4, warmup_steps=1, log_every=1, eval_every=100, save_every=2, eval_batches=1,
        progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_resumed_run_writes_its_log_anew_not_through_a_link(tmp_path, victim, kind):
    out = tmp_path / "o"
    fit(default_model_config("signal", **MODEL), _cfg(out, stop_after=2))
    assert trained_steps(out / LOG_FILE) == [1, 2]
    (out / LOG_FILE).unlink()
    plant(out / LOG_FILE, victim, kind)
    fit(None, _cfg(out, resume=True))
    assert untouched(victim)
    log = out / LOG_FILE
    assert not log.is_symlink() and log.stat().st_ino != victim.stat().st_ino
    # a hard link is the file's content: its lines that are no log lines are dropped
    assert trained_steps(log) == [3, 4]


def test_a_new_run_removes_a_dangling_link_at_the_log(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOG_FILE).symlink_to(tmp_path / "made-elsewhere")
    fit(default_model_config("signal", **MODEL), _cfg(out, steps=2))
    assert not os.path.lexists(tmp_path / "made-elsewhere")
    assert trained_steps(out / LOG_FILE) == [1, 2]


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW (Windows)")
def test_a_log_line_is_never_appended_through_a_symbolic_link(tmp_path, victim):
    """A link put at the log's name while a run goes on (after its start made the log anew)
    is refused at the next line, not appended through."""
    from ssmstream.model.train import _append

    log = tmp_path / LOG_FILE
    _append(log, {"step": 1})
    log.unlink()
    log.symlink_to(victim)
    with pytest.raises(OSError):
        _append(log, {"step": 2})
    assert untouched(victim)
