"""verify_graphs' report against recomputations of what it reports (a fake Engine stands in
for the exported graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ssmstream.export import verify as verify_mod
from ssmstream.export.modules import step_drift
from ssmstream.model import SSMConfig, SSMNetwork
from test_export_units import MANIFEST, FakeEngine


@pytest.mark.parametrize("dt_scale", [1.0, 0.05])
def test_the_drift_estimate_is_that_of_the_exported_dt_scale(monkeypatch, dt_scale):
    """A small dt_scale slows every mode (longer memory, more drift): the report's estimate
    is the one for the manifest's dt_scale, not for the network as trained."""
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2)).eval()
    monkeypatch.setattr(verify_mod, "Engine", FakeEngine)
    monkeypatch.setattr(verify_mod, "torch_reference", lambda n, x, s: np.zeros((2, 8, 2)))
    manifest = {**MANIFEST, "dt_scale": dt_scale}
    report = verify_mod.verify_graphs("unused", manifest, net, steps=8)
    want = step_drift(net, dt_scale, beyond=8)
    assert report["step_drift"] == {"max_rel": want["max_rel"], "memory_steps": want["memory"]}
    if dt_scale != 1.0:
        assert want["memory"] > step_drift(net, 1.0, beyond=8)["memory"]


def test_the_prefills_final_state_over_the_long_sequence_is_checked(monkeypatch):
    """Over a length that is not a whole number of chunks, the prefill's state after the
    last input is compared with the steps' (the chunk ends alone miss the last inputs)."""

    class LastStateOff(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            out, s = super().prefill_unchecked(x, state, ends)
            return out, s + 1.0

    monkeypatch.setattr(verify_mod, "Engine", LastStateOff)
    report = verify_mod.verify_graphs("unused", MANIFEST, None, steps=30)
    p = report["prefill_vs_step"]
    assert p["max_abs_state"] == pytest.approx(1.0) and p["max_abs_output"] == 0.0
    assert p["passed"] is False and report["passed"] is False
