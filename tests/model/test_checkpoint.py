"""Tests of ssmstream.model.checkpoint: round trip, and every broken checkpoint → CheckpointError.

A saved and reloaded network computes the same outputs as the original (forward and step).
A missing directory, a missing / non-JSON / foreign / wrong-version config.json, an invalid
model config, a missing or corrupt model.safetensors, and weights that do not match the
config each give a CheckpointError (a ValueError) whose message names the file and the fault.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from ssmstream.model import (
    CheckpointError,
    SSMConfig,
    SSMNetwork,
    load_checkpoint,
    save_checkpoint,
)
from ssmstream.model.checkpoint import read_checkpoint_meta


def small_net(**kw) -> SSMNetwork:
    torch.manual_seed(0)
    cfg = SSMConfig(**{"vocab_size": 16, "d_model": 8, "n_layers": 2, "d_state": 4, **kw})
    return SSMNetwork(cfg)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    save_checkpoint(small_net(heads=2), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(path: Path, **model_changes) -> None:
    meta = json.loads((path / "config.json").read_text())
    meta["model"].update(model_changes)
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "cfg",
    [
        {"heads": 2, "discretization": "bilinear", "init": "s4d-inv"},
        {"vocab_size": None, "d_input": 3, "d_output": 2, "heads": 1, "glu": False},
    ],
    ids=["tokens-multihead", "values-mimo"],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, cfg):
    net = small_net(**cfg).eval()
    save_checkpoint(net, tmp_path / "c", extra={"step": 7})
    loaded = load_checkpoint(tmp_path / "c")
    assert not loaded.training  # returned in eval mode
    assert loaded.cfg == net.cfg
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.json",
        "model.safetensors",
        "train_log.jsonl",
    ]
    assert read_checkpoint_meta(tmp_path / "c")["step"] == 7
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    g = torch.Generator().manual_seed(1)
    if net.cfg.input_kind == "tokens":
        inp = torch.randint(0, 16, (2, 50), generator=g)
    else:
        inp = torch.randn(2, 50, 3, generator=g, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(net(inp), loaded(inp))
        ya, _ = net.step(inp[:, 0], net.initial_state(2))
        yb, _ = loaded.step(inp[:, 0], loaded.initial_state(2))
    assert torch.equal(ya, yb)


def test_save_keeps_an_existing_train_log(ckpt):
    (ckpt / "train_log.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    save_checkpoint(small_net(heads=2), ckpt)
    assert (ckpt / "train_log.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert not list(ckpt.glob("*.tmp"))  # written to temporary names, then renamed


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere.* does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"config\.json is not valid JSON"),
        (b"\xff\xfe\x00", r"config\.json is not valid JSON"),
        ('{"format": ' + "1" * 5000 + "}", r"config\.json is not valid JSON"),  # int digits
        ("[" * 100_000 + "]" * 100_000, r"config\.json is not valid JSON"),  # nesting
        ('["a list"]', r"config\.json is not an ssmstream checkpoint config"),
        ('{"format": "pytorch", "model": {}}', "not an ssmstream checkpoint config"),
        ('{"format": "ssmstream-checkpoint", "version": 1}', "not an ssmstream checkpoint"),
        (
            '{"format": "ssmstream-checkpoint", "version": true, "model": {}}',
            r"checkpoint version True unsupported \(want 1\)$",
        ),
        (
            '{"format": "ssmstream-checkpoint", "version": 1.0, "model": {}}',
            r"checkpoint version 1.0 unsupported \(want 1\)$",
        ),
        (
            '{"format": "ssmstream-checkpoint", "version": 99, "model": {}}',
            "checkpoint version 99 unsupported \\(want 1\\); it was written by a newer ssmstream",
        ),
    ],
)
def test_corrupt_config(ckpt, text, message):
    f = ckpt / "config.json"
    f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"heads": 3}, r"invalid model config: heads=3 must be positive and divide d_model=8"),
        ({"d_state": 5}, "invalid model config: d_state must be even"),
        ({"discretization": "rk4"}, "invalid model config: unknown discretization 'rk4'"),
        ({"colour": "red"}, r"invalid model config: unknown config fields \['colour'\]"),
        ({"d_model": "wide"}, "invalid model config"),
        ({"heads": 2.0}, r"invalid model config: heads must be an integer, got 2\.0"),
        ({"n_layers": True}, "invalid model config: n_layers must be an integer, got True"),
        ({"glu": "no"}, "invalid model config: glu must be true or false, got 'no'"),
    ],
)
def test_invalid_model_config(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("field", ["discretization", "alpha", "glu"])
def test_a_config_missing_a_field_is_refused_not_defaulted(ckpt, field):
    # a default would load another model (zoh for bilinear, alpha 0.5): the save writes them all
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["model"][field]
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"missing config fields \['{field}'\]"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_weights_that_are_not_floating_point_are_refused(ckpt, dtype):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    name = sorted(state)[0]
    state[name] = state[name].to(dtype)  # load_state_dict would cast it back without a word
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' is {dtype}, not float")):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_weights_that_are_not_finite_are_refused(ckpt, bad):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    name = sorted(state)[-1]
    state[name].view(-1)[0] = bad
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds NaN or infinite values"):
        load_checkpoint(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bad-header"])
def test_corrupt_weights(ckpt, damage):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    data = {
        "garbage": b"this is not a safetensors file",
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "bad-header": raw[:8] + b"{oops" + raw[13:],
    }[damage]
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_checkpoint(ckpt)


def test_weights_with_the_wrong_shapes(ckpt):
    """config says d_state=8 but the weights were saved with d_state=4."""
    edit_config(ckpt, d_state=8)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'blocks\.0\.ssm\.\w+' has shape \(2, 2.*\), config\.json wants \(2, 4",
    ):
        load_checkpoint(ckpt)


def test_weights_of_another_architecture(ckpt):
    """config says 3 layers, the file holds 2: the missing tensors are named."""
    edit_config(ckpt, n_layers=3)
    with pytest.raises(
        CheckpointError, match=r"does not match config\.json: missing \['blocks\.2\."
    ):
        load_checkpoint(ckpt)
    edit_config(ckpt, n_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.1\."):
        load_checkpoint(ckpt)


def _tiny(**kw) -> SSMNetwork:
    torch.manual_seed(0)
    return SSMNetwork(
        SSMConfig(**{"vocab_size": 16, "d_model": 8, "n_layers": 2, "d_state": 4, **kw})
    )


def _ckpt(tmp_path):
    return save_checkpoint(_tiny(heads=2), tmp_path / "ckpt")


def test_config_without_a_version_is_refused(tmp_path):
    ckpt = _ckpt(tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["version"]
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint version None unsupported"):
        load_checkpoint(ckpt)


def test_a_float64_network_is_saved_as_float32(tmp_path):
    net = _tiny().double()
    path = save_checkpoint(net, tmp_path / "c64")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}
    assert load_checkpoint(path).encoder.weight.dtype == torch.float32


def test_mismatch_message_lists_up_to_five_missing_tensors(tmp_path):
    ckpt = _ckpt(tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["n_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    missing = sorted(
        k for k in _tiny(heads=2, n_layers=3).state_dict() if k.startswith("blocks.2.")
    )
    assert f"missing {missing[:5]}, unexpected []" in str(e.value)


def test_weights_path_that_is_unreadable_is_a_checkpoint_error(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path)
    import ssmstream.model.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(ck, "load_file", boom)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: disk on fire"):
        load_checkpoint(ckpt)


def test_a_file_given_as_checkpoint_directory(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoint directory '.*afile' is a file, not"):
        load_checkpoint(f)
    with pytest.raises(CheckpointError, match=r"checkpoint directory '.*gone' does not exist"):
        load_checkpoint(tmp_path / "gone")


def test_save_checkpoint_creates_missing_parents(tmp_path):
    path = save_checkpoint(_tiny(), tmp_path / "runs" / "exp1" / "ckpt")
    assert load_checkpoint(path).cfg == _tiny().cfg


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_checkpoint_file_follows_the_umask(tmp_path, umask):
    """The weights are written like config.json and the log (safetensors' save_file had
    made model.safetensors 0600 whatever the umask: unreadable to a serving account)."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(_tiny(), tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert modes == dict.fromkeys(
        ["config.json", "model.safetensors", "train_log.jsonl"], 0o666 & ~umask
    )


def test_map_location_is_the_returned_networks_device(ckpt):
    """map_location places the network itself (its parameters and buffers), not only the
    loaded tensors, which had been copied into a network built on the CPU."""
    net = load_checkpoint(ckpt, map_location="meta")
    tensors = [*net.parameters(), *net.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert not net.training
    with pytest.raises(ValueError, match=r"map_location: 'gpu0' is not a torch device"):
        load_checkpoint(ckpt, map_location="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_map_location_of_a_device_this_machine_lacks_is_a_value_error(ckpt):
    with pytest.raises(ValueError, match=r"map_location: 'cuda' is not available here"):
        load_checkpoint(ckpt, map_location="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda_computes_what_the_cpu_network_does(ckpt):
    u = torch.randint(0, 16, (2, 12))
    ref = load_checkpoint(ckpt)(u)
    net = load_checkpoint(ckpt, map_location=torch.device("cuda"))
    assert all(p.is_cuda for p in net.parameters())
    torch.testing.assert_close(net(u.cuda()).cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", [3.5, None, ["cpu"]])
def test_map_location_of_a_wrong_type_is_a_value_error(tmp_path, where):
    """Torch.device raises TypeError for a non-str/int/device: that is the same
    ValueError naming map_location as a bad device string."""
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))
    ck = save_checkpoint(net, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"map_location: .* is not a torch device"):
        load_checkpoint(ck, map_location=where)


@pytest.mark.parametrize("key", ["format", "version", "model"])
def test_extra_may_not_replace_a_checkpoint_field(tmp_path, key):
    """A checkpoint whose `version` or `model` came from `extra` could not be loaded; the
    save is refused before anything is written."""
    net = SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))
    with pytest.raises(ValueError, match=rf"^extra: {key} are checkpoint fields, not extras$"):
        save_checkpoint(net, tmp_path / "c", extra={"step": 1, key: 2})
    assert not (tmp_path / "c").exists()
    save_checkpoint(net, tmp_path / "c", extra={"step": 1})
    assert load_checkpoint(tmp_path / "c").cfg == net.cfg


def test_a_checkpoint_dir_whose_name_is_too_long_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="File name too long"):
        load_checkpoint(tmp_path / ("c" * 300))
