"""The numeric fields of SSMConfig, TrainConfig and SignalConfig: a value that is not a number of
the field's kind is a ValueError naming the field (a config.json edited by hand: "dt_min":
"0.001" raised a bare TypeError about '<' between int and str), and numpy scalars (a sweep's
np.int64 or np.float32) are taken as plain numbers, so config.json and the training log can be
written (the json module refuses numpy's: a run failed at its first save, after training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, save_checkpoint
from ssmstream.model.checkpoint import CheckpointError
from ssmstream.model.data import SignalConfig
from ssmstream.model.train import TrainConfig, fit, main


@pytest.mark.parametrize("name", ["alpha", "dt_min", "dt_max", "dropout"])
@pytest.mark.parametrize("value", ["0.01", None, True, [0.01]], ids=["str", "none", "bool", "list"])
def test_model_config_refuses_a_float_field_that_is_not_a_number(name, value):
    with pytest.raises(
        ValueError, match=f"^{name} must be a number, got {value!r}$".replace("[", r"\[")
    ):
        SSMConfig(vocab_size=16, **{name: value})


def test_a_config_json_with_a_quoted_number_names_the_field(tmp_path, capsys):
    ckpt = save_checkpoint(
        SSMNetwork(SSMConfig(d_input=1, d_model=4, n_layers=1, d_state=2)), tmp_path / "c"
    )
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["dt_min"] = "0.001"
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"invalid model config: dt_min must be a number"):
        load_checkpoint(ckpt)
    argv = ["--task", "signal", "--out", str(ckpt), "--resume", "--no-progress", "--steps", "2"]
    assert main([*argv, "--warmup-steps", "1"]) == 2
    said = capsys.readouterr().err
    assert said.endswith("invalid model config: dt_min must be a number, got '0.001'\n")
    assert said.count("\n") == 1 and "Traceback" not in said


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TrainConfig, {"steps": "100"}, "steps must be an integer, got '100'"),
        (TrainConfig, {"steps": 100.5}, "steps must be an integer, got 100.5"),
        (TrainConfig, {"lr": "1e-3"}, "lr must be a number, got '1e-3'"),
        (TrainConfig, {"seed": None}, "seed must be an integer, got None"),
        (SignalConfig, {"rate": "16"}, "rate must be a number, got '16'"),
        (SignalConfig, {"n_components": 2.0}, "n_components must be an integer, got 2.0"),
    ],
)
def test_training_configs_refuse_values_that_are_not_numbers(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        cls(**kwargs)


def test_optional_fields_still_take_none():
    assert TrainConfig(threads=None, stop_after=None, save_every=None).threads is None
    assert SignalConfig(horizon=None).horizon is None
    assert SSMConfig(vocab_size=16, heads=None).heads is None


def test_numpy_numbers_train_and_save_as_plain_json(tmp_path):
    model = SSMConfig(
        d_input=np.int64(1), d_model=np.int64(4), n_layers=np.int32(1), d_state=np.int64(2),
        alpha=np.float32(0.25), dt_max=np.float32(0.05),
    )  # fmt: skip
    signal = SignalConfig(rate=np.float32(4.0), duration=np.float64(4.0), n_components=np.int8(2))
    train = TrainConfig(
        task="signal", out=str(tmp_path / "run"), steps=np.int64(2), warmup_steps=np.int64(1),
        batch_size=np.int64(2), eval_batches=1, lr=np.float32(1e-3), progress=False,
        signal=signal,
    )  # fmt: skip
    assert type(model.d_model) is int and type(model.alpha) is float
    assert type(train.steps) is int and type(train.lr) is float and type(signal.rate) is float
    result = fit(model, train)
    meta = json.loads((result.checkpoint / "config.json").read_text())
    assert meta["step"] == 2
    assert meta["model"]["d_model"] == 4 and meta["model"]["alpha"] == 0.25
    assert meta["train"]["steps"] == 2 and meta["train"]["signal"]["rate"] == 4.0
    assert load_checkpoint(result.checkpoint).cfg == model


@pytest.mark.parametrize("name", ["resume", "progress"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_train_config_refuses_a_flag_that_is_not_true_or_false(name, value):
    """From Python a string "no" counted as true (the command line gives bools)."""
    with pytest.raises(ValueError, match=f"^{name} must be true or false, got {value!r}$"):
        TrainConfig(**{name: value})
