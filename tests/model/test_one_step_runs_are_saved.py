"""A run, or a resumed run, that trains a single step still ends with its checkpoint at that
step (the final save is made whenever the run trained at all)."""

from __future__ import annotations

import json

from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, default_model_config, fit


def _cfg(out, **kw) -> TrainConfig:
    base = dict(task="signal", out=str(out), signal=SignalConfig(rate=4.0, duration=2.0),
                batch_size=1, steps=2, warmup_steps=0, eval_every=10, eval_batches=1,
                progress=False, threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_a_one_step_run_and_its_one_step_resume_each_save_their_step(tmp_path):
    out = tmp_path / "o"
    model = default_model_config("signal", d_model=4, n_layers=1, d_state=4)
    first = fit(model, _cfg(out, stop_after=1))
    assert first.step == 1
    assert json.loads((out / "config.json").read_text())["step"] == 1
    second = fit(None, _cfg(out, resume=True))
    assert second.step == 2
    assert json.loads((out / "config.json").read_text())["step"] == 2
