"""examples/rescale_dt.py: the numbers `run` returns, with the Engine replaced by an identity
(y = u) so that each can be recomputed here from the signals alone; when an existing export is
reused; a corrupt manifest; --json. Fast: no export, no onnxruntime."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scripts import ROOT, load_script

SIGNAL = ROOT / "examples" / "checkpoints" / "signal"


@pytest.fixture(scope="module")
def rescale_mod():
    pytest.importorskip("torch")
    return load_script("examples/rescale_dt.py")


class IdentityEngine:
    """y = u, stateless: the outputs are the input samples themselves."""

    d_output = 1
    manifest = {"parity": {"passed": True}}

    def __init__(self, model_dir, device="cpu", threads=None):
        pass

    def new_state(self, B=1):
        return np.zeros((B, 1), np.float32)

    def step(self, u, s):
        return np.asarray(u, np.float32)[:, :1], s


@pytest.fixture
def exports(rescale_mod, monkeypatch) -> list[dict]:
    """export_model replaced by one that writes a manifest `reusable` accepts; returns the
    calls made."""
    calls = []
    weights = hashlib.sha256((SIGNAL / "model.safetensors").read_bytes()).hexdigest()

    def fake_export(ckpt, out, dt_scale=1.0, prefill=True, **kw):
        calls.append({"out": Path(out), "dt_scale": dt_scale})
        Path(out).mkdir(parents=True, exist_ok=True)
        m = {"dt_scale": dt_scale, "source": {"weights_sha256": weights},
             "graphs": {"step": {}, **({"prefill": {}} if prefill else {})},
             "parity": {"passed": True}}  # fmt: skip
        (Path(out) / "manifest.json").write_text(json.dumps(m))
        return Path(out)

    monkeypatch.setattr(rescale_mod, "Engine", IdentityEngine)
    monkeypatch.setattr(rescale_mod, "export_model", fake_export)
    return calls


def _signals(rescale_mod, rate_factor: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from ssmstream.model.data import signal_batch

    sig = rescale_mod.training_signal(SIGNAL)
    sig = dataclasses.replace(sig, rate=sig.rate * rate_factor)
    u, y = signal_batch(sig, n, torch.Generator().manual_seed(seed))
    return u.numpy().astype(np.float64), y.numpy().astype(np.float64)


def test_errors_are_relative_to_the_target_power(rescale_mod, exports, tmp_path):
    """target_power is the mean square of the target at rate r (not of the input), and the
    MSEs are those of the outputs (here the inputs) against the targets."""
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.0, signals=3, seed=7,
                                                    work=str(tmp_path)))  # fmt: skip
    u_r, y_r = _signals(rescale_mod, 1.0, 3, 7)
    u_cr, y_cr = _signals(rescale_mod, 2.0, 3, 7)
    assert res["target_power"] == pytest.approx(np.mean(y_r**2), rel=1e-9)
    assert res["target_power"] != pytest.approx(np.mean(u_r**2), rel=1e-3)
    assert res["mse_r"] == pytest.approx(np.mean((u_r - y_r) ** 2), rel=1e-9)
    assert res["mse_cr_rescaled"] == pytest.approx(np.mean((u_cr - y_cr) ** 2), rel=1e-9)


def test_the_gap_compares_the_samples_the_two_rates_share(rescale_mod, exports, tmp_path):
    """Sample c·k at rate c·r is taken at the time of sample k at rate r: an output that
    only depends on the current input (y = u) has no gap at all, and the factor-2 signal's
    every other sample is exactly the rate-r signal."""
    u_r, _ = _signals(rescale_mod, 1.0, 2, 12345)
    u_cr, _ = _signals(rescale_mod, 2.0, 2, 12345)
    assert np.array_equal(u_cr[:, ::2], u_r)  # the premise: shared sample times
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.0, signals=2, work=str(tmp_path)))
    assert res["gap_rescaled"] == 0.0 and res["gap_unscaled"] == 0.0


def test_an_export_is_reused_only_when_asked(rescale_mod, exports, tmp_path):
    """Without reuse both models are exported again even when `work` holds matching
    exports; with reuse, matching exports are not redone."""
    cfg = dict(factor=2.0, signals=1, work=str(tmp_path))
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg))
    assert [c["dt_scale"] for c in exports] == [1.0, 0.5]
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg))  # reuse=False (the default)
    assert [c["dt_scale"] for c in exports] == [1.0, 0.5, 1.0, 0.5]
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg, reuse=True))
    assert len(exports) == 4


def test_a_corrupt_manifest_is_not_reusable(rescale_mod, tmp_path):
    """A manifest.json that is not JSON (an interrupted export) means: export again."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text('{"dt_scale": 0.5, "source": {')
    assert rescale_mod.reusable(model, ckpt, 0.5, False) is False


def test_json_flag_prints_the_returned_numbers(rescale_mod, monkeypatch, capsys):
    """--json prints exactly the dict main returns, as JSON; without it, the report."""
    res = {
        "rate": 8, "factor": 2.0, "dt_scale": 0.5, "signals": 3, "samples_r": 256,
        "samples_cr": 512, "target_power": 2.0, "mse_r": 0.01, "mse_cr_rescaled": 0.02,
        "mse_cr_unscaled": 0.5, "rescaled_over_r": 2.0, "unscaled_over_rescaled": 25.0,
    }  # fmt: skip
    monkeypatch.setattr(rescale_mod, "run", lambda cfg: dict(res))
    assert rescale_mod.main(["--json"]) == res
    assert json.loads(capsys.readouterr().out) == res
    rescale_mod.main([])
    out = capsys.readouterr().out
    assert out.startswith("3 held-out signals, target power 2.0000; ")
