"""examples/rescale_dt.py says its errors as its flags (--factor, --signals, --seed,
--threads, --ckpt), and refuses a --seed or --threads the run cannot take before it exports
anything (they had failed after both exports: "Overflow when unpacking long long", "threads:
must be an integer in [1, 1024] or None")."""

from __future__ import annotations

import json

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def rescale_mod():
    return load_script("examples/rescale_dt.py")


@pytest.fixture
def no_export(rescale_mod, monkeypatch):
    """An export would be a failure here: every refusal comes before it."""

    def export_model(*a, **k):
        raise AssertionError("exported before refusing the flags")

    monkeypatch.setattr(rescale_mod, "export_model", export_model)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--factor", "0"], "--factor must be in (0, 256], got 0.0"),
        (["--signals", "0"], "--signals must be at least 1, got 0"),
        (["--seed", str(2**64)], f"--seed must be in [-2**63, 2**64 - 1], got {2**64}"),
        (["--threads", "0"], "--threads must be in [1, 1024], got 0"),
        (["--threads", "2000"], "--threads must be in [1, 1024], got 2000"),
    ],
)
def test_errors_name_the_flag_before_any_export(rescale_mod, no_export, capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        rescale_mod.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {said}")


def test_a_checkpoint_it_cannot_use_is_said_of_ckpt(rescale_mod, no_export, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rescale_mod.main(["--ckpt", str(tmp_path)])
    said = f"--ckpt: {str(tmp_path)!r} is not a checkpoint directory (no config.json)"
    assert capsys.readouterr().err.strip().endswith(f": error: {said}")
    (tmp_path / "config.json").write_text(json.dumps({"train": {"task": "text"}}))
    with pytest.raises(SystemExit):
        rescale_mod.main(["--ckpt", str(tmp_path)])
    said = f"--ckpt: {str(tmp_path)!r} was not trained on the signal task"
    assert capsys.readouterr().err.strip().endswith(f": error: {said}")
