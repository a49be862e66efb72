"""A resumed text run reads the same bytes as the run it continues: other files, another glob
or val_fraction (another split), another seq_len (other windows) is refused naming the field,
and the checkpoint stays at its step. A checkpoint that did not record its training config
is still refused for a task its model cannot do."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from ssmstream.model.train import TrainConfig, default_model_config, fit


@pytest.fixture(scope="module")
def stopped_text_run(tmp_path_factory):
    """A text run over two small directories of files, stopped at step 1 of 2."""
    root = tmp_path_factory.mktemp("text")
    for d in ("a", "b"):
        for i in range(8):
            (root / d).mkdir(exist_ok=True)
            (root / d / f"f{i}.txt").write_text(f"{d} file {i}: " + "some text to learn. " * 8)
            (root / d / f"f{i}.md").write_text(f"{d} notes {i}: " + "other text. " * 8)
    out = root / "o"
    fit(
        default_model_config("text", d_model=4, n_layers=1, d_state=4),
        _cfg(root, out, stop_after=1),
    )
    return root, out


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(task="text", data=[str(root / "a")], glob="*.txt", val_fraction=0.25, out=str(out),
                seq_len=16, batch_size=2, steps=2, warmup_steps=0, eval_batches=1, progress=False,
                threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "name, value",
    [("data", "b"), ("glob", "*.md"), ("val_fraction", 0.5), ("seq_len", 8)],
)
def test_resume_refuses_other_text_data_naming_the_field(stopped_text_run, name, value):
    root, out = stopped_text_run
    if name == "data":
        value = [str(root / value)]
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} (saved: ")):
        fit(None, _cfg(root, out, resume=True, **{name: value}))
    assert json.loads((out / "config.json").read_text())["step"] == 1


def test_resume_of_a_checkpoint_without_its_train_config_checks_the_task(
    stopped_text_run, tmp_path
):
    """Without a saved training config nothing compares the task; the token model is still
    refused for the signal task by name, not by a shape error inside its forward."""
    root, stopped = stopped_text_run
    out = tmp_path / "o"
    shutil.copytree(stopped, out)
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "train": None}))
    signal = TrainConfig(task="signal", out=str(out), resume=True, batch_size=2, steps=2,
                         warmup_steps=0, eval_batches=1, progress=False, threads=1)  # fmt: skip
    with pytest.raises(ValueError, match="task 'signal' needs d_input = d_output = 1"):
        fit(None, signal)
    assert json.loads((out / "config.json").read_text())["step"] == 1
