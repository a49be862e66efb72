"""model/train.py: behaviours the main train tests leave open — seeds of distinct (rank, step)
pairs, the finiteness of the non-negative knobs, the signal task's input width, distinct eval
batches, which process is the main one, what a resume may and may not change, and that the
optimizer sees gradients clipped to `grad_clip`.

Expected values are derived here from the documented behaviour (module docstring, field
help texts), not read back from the code under test.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from ssmstream.model import SSMConfig
from ssmstream.model import train as train_mod
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import (
    Batches,
    DistInfo,
    TrainConfig,
    check_model_for_task,
    default_model_config,
    derived_seed,
    fit,
)

MODEL = dict(d_model=8, n_layers=1, d_state=4)
SIGNAL = SignalConfig(rate=4.0, duration=8.0)  # L = 32


def _signal_cfg(out, **kw) -> TrainConfig:
    base = dict(
        task="signal", out=str(out), signal=SIGNAL, batch_size=2, steps=6, warmup_steps=1,
        log_every=2, eval_every=3, eval_batches=1, progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _signal_model(**kw):
    return default_model_config("signal", **{**MODEL, **kw})


def _log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").open()]


def test_seeds_of_pairs_whose_digits_concatenate_alike_differ():
    """(rank 1, step 23) and (rank 12, step 3) are different batches: the seed parts are kept
    apart, so their digits running together cannot make two steps draw the same batch."""
    assert derived_seed(0, "train", 1, 23) != derived_seed(0, "train", 12, 3)
    assert derived_seed(1, "eval") != derived_seed(1, "ev", "al")
    b = Batches(_signal_cfg("unused"), None)
    assert not torch.equal(b.train(1, 23)[0], b.train(12, 3)[0])


@pytest.mark.parametrize("name", ["weight_decay", "grad_clip"])
def test_infinite_decay_or_clip_is_refused(name):
    """weight_decay and grad_clip must be finite (inf decay would wipe the weights; an
    infinite clip is no clip, which 0 already says)."""
    with pytest.raises(ValueError, match=f"^{name} must be non-negative and finite, got inf$"):
        TrainConfig(**{name: math.inf})


def test_signal_task_refuses_a_model_with_more_than_one_input_channel(tmp_path):
    """The signal task feeds one channel: d_input must be 1 even when d_output is."""
    cfg = SSMConfig(d_input=2, d_output=1, d_model=8)
    with pytest.raises(ValueError, match=r"got d_input=2, d_output=1"):
        check_model_for_task(cfg, "signal")
    with pytest.raises(ValueError, match=r"d_input=2"):
        fit(cfg, _signal_cfg(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_eval_batches_are_distinct_from_each_other_and_the_same_each_time():
    """An evaluation averages `eval_batches` different batches (not one batch repeated), and
    every evaluation uses the same ones."""
    b = Batches(_signal_cfg("unused", eval_batches=3), None)
    first, again = b.eval(), b.eval()
    assert len(first) == 3
    for i in range(3):
        assert torch.equal(first[i][0], again[i][0]) and torch.equal(first[i][1], again[i][1])
        for j in range(i):
            assert not torch.equal(first[i][0], first[j][0]), (i, j)


def test_only_global_rank_0_is_the_main_process(monkeypatch):
    """Multi-node: the first process of a second node has LOCAL_RANK 0 but RANK 2; it must not
    write logs or checkpoints (only global rank 0 does)."""
    assert not DistInfo(world_size=4, rank=2, local_rank=0).is_main
    assert DistInfo(world_size=4, rank=0, local_rank=0).is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not DistInfo.from_env().is_main


def test_resume_may_change_eval_every(tmp_path):
    """eval_every only says when to report: a resumed run may change it. Stopped at 3 with
    eval_every 3 (eval at 3), resumed to 6 with eval_every 2: evals at 4 and 6."""
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3, eval_every=3))
    resumed = fit(None, _signal_cfg(out, resume=True, eval_every=2))
    assert resumed.step == 6
    assert [e["step"] for e in _log_lines(out) if "eval" in e] == [3, 4, 6]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A signal run stopped at step 3 of 6 (lr 2e-3, ssm_lr 1e-3: the defaults)."""
    out = tmp_path_factory.mktemp("stopped") / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3))
    return out


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", 3e-3),
        ("ssm_lr", 5e-4),
        ("weight_decay", 0.2),
        ("warmup_steps", 2),
        ("min_lr_ratio", 0.5),
        ("grad_clip", 0.5),
        ("batch_size", 3),
    ],
)
def test_resume_refuses_a_changed_optimizer_or_batch_setting(stopped_run, name, value):
    """Learning rates, decay, warm-up, the schedule's floor, the clip and the batch size change
    what the run computes: a resume that changes one is refused naming it, and the
    checkpoint stays at its step."""
    saved = _signal_cfg(stopped_run).to_dict()[name]
    want = f"{name}={value!r} (saved: {saved!r})"
    with pytest.raises(ValueError, match=re.escape(want)):
        fit(None, _signal_cfg(stopped_run, resume=True, **{name: value}))
    assert json.loads((stopped_run / "config.json").read_text())["step"] == 3


def test_the_optimizer_sees_gradients_clipped_to_grad_clip(tmp_path, monkeypatch):
    """With grad_clip 0.01 and larger raw gradients, the gradient norm at each optimizer step
    is min(raw norm, 0.01), measured independently at the optimizer (raw norm: the logged
    grad_norm, before clipping)."""
    at_step = []
    real = train_mod.make_optimizer

    def spy(net, cfg):
        opt, sched = real(net, cfg)

        def hook(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
            at_step.append(torch.linalg.vector_norm(norms).item())

        opt.register_step_pre_hook(hook)
        return opt, sched

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    clip = 0.01
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=4, log_every=1, grad_clip=clip))
    raw = [e["grad_norm"] for e in _log_lines(tmp_path / "o") if "loss" in e]
    assert len(raw) == len(at_step) == 4
    assert all(r > clip for r in raw)  # every step needed clipping
    assert at_step == pytest.approx([min(r, clip) for r in raw], rel=1e-4)
