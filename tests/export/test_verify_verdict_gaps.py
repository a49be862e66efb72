"""Verify's verdict in two cases the other tests leave open.

- slots_vs_step: the slot graph must give the plain step's outputs *and states* bit for bit.
  Every test of a wrong slot graph also had wrong outputs (or other rows touched), so a check
  that ignored the state error would still have passed them. Here the slot graph gets every
  output right and only its last state write wrong (nothing reads it afterwards, so no output
  shows it): the report must fail on max_abs_state alone.
- verify_graphs(net=...) is public API; its torch reference must be the eval-mode network even
  when the caller's network is training (dropout on), as export_network's own call is: a
  reference with dropout failed a correct export.
"""

from __future__ import annotations

import numpy as np
import torch
from ssmstream.export import export_network, verify_graphs
from ssmstream.export import verify as verify_mod
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.runtime.manifest import load_manifest


class Slab:
    def __init__(self, n: int, S: int):
        self.rows = np.zeros((n, S), np.float32)

    def write(self, row, x):
        self.rows[row] = x

    def read_rows(self, rows):
        return self.rows[np.asarray(list(rows), dtype=np.int64)].copy()


class LinearEngine:
    """state' = a·state + (x, -x), output = state' (the verify-facing Engine API)."""

    S = 2

    def __init__(self):
        self.a = np.array([0.9, 0.5], np.float32)

    def step(self, x, state):
        s = (state * self.a + np.stack([x, -x], 1).astype(np.float32)).astype(np.float32)
        return s.copy(), s

    def new_slab(self, n):
        return Slab(n, self.S)

    def step_slots(self, x, slots, slab):
        out, s = self.step(x, slab.read_rows(slots))
        for r, row in zip(slots, s):
            slab.write(int(r), row)
        return out


MANIFEST = {"dtype": "fp32", "state_size": 2, "input_kind": "tokens", "vocab_size": 5}


def test_a_slot_graph_with_right_outputs_but_a_wrong_state_fails():
    steps = 4

    class LastWriteWrong(LinearEngine):
        calls = 0

        def step_slots(self, x, slots, slab):
            out = super().step_slots(x, slots, slab)
            LastWriteWrong.calls += 1
            if LastWriteWrong.calls == steps:  # the last step: its state is never read again
                for r in slots:
                    slab.rows[int(r)] += 1e-3
            return out

    good = verify_mod.slots_vs_step(LinearEngine(), MANIFEST, np.ones((2, 2), np.float32),
                                    np.random.default_rng(0), steps=steps)  # fmt: skip
    assert good["passed"] and good["max_abs_state"] == 0.0
    rep = verify_mod.slots_vs_step(LastWriteWrong(), MANIFEST, np.ones((2, 2), np.float32),
                                   np.random.default_rng(0), steps=steps)  # fmt: skip
    assert rep["max_abs_output"] == 0.0 and rep["other_rows_untouched"]
    assert rep["max_abs_state"] > 0
    assert rep["passed"] is False


def test_verify_graphs_of_a_training_network_uses_its_eval_mode(tmp_path):
    torch.manual_seed(3)
    net = SSMNetwork(SSMConfig(vocab_size=7, d_model=8, n_layers=2, d_state=4, dropout=0.5))
    out = export_network(net, tmp_path / "m", prefill=False, verify=False)  # net.eval() inside
    net.train()  # a training loop checks its export
    report = verify_graphs(out, load_manifest(out), net, steps=64)
    assert report["step_vs_torch"]["max_rel"] < 1e-4, report["step_vs_torch"]
    assert report["passed"] is True
    assert net.training  # the caller's network is left as it was
