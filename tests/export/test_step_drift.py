"""The step graph's float32 dA and long streams: `step_drift`'s estimate against a numpy
float32 recurrence (the graph's coefficients) and the exact float64 one, and the export's
report and warning for a model with slow modes.

A mode's dA = exp(Δ·A) near 1 (small Δ·|Re A|) is held as float32 (Re, Im), off by up to
~3e-8 per component; over the mode's memory 1/δ (δ = 1 − |dA|) the state's relative error
grows to about that error / δ. The parity check runs 4,096 steps, so memories beyond that are
not exercised by it: the report gives the estimate instead.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from ssmstream.export import export_network
from ssmstream.export.modules import discrete64, rot, step_drift
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.runtime.manifest import format_manifest, load_manifest


def slow_net(re_a: float, dt: float = 1e-3) -> SSMNetwork:
    """A one-layer token net whose every mode has Re A = -re_a at Δ = dt."""
    torch.manual_seed(0)
    net = SSMNetwork(
        SSMConfig(vocab_size=13, d_model=8, n_layers=1, d_state=8, dt_min=dt, dt_max=dt)
    ).eval()
    with torch.no_grad():
        net.ssms[0].log_A_real.fill_(math.log(re_a))
    return net


def test_the_estimate_matches_a_float32_recurrence_over_the_memory():
    """x' = dA x + dB u with a constant input, 3 memories long: the float32 coefficients the
    graph holds (computed in float64 arithmetic, so only their rounding differs) against
    the exact dA. The worst mode's relative state error is what step_drift predicts, within
    its first-order bound."""
    net = slow_net(re_a=0.1)  # δ ≈ 1e-4: a memory of 1e4 steps
    ssm = net.ssms[0]
    dA, dB, _ = discrete64(ssm, 1.0)  # [H, N/2], [H, N/2, 1]
    R = rot(dA).double()
    dA32 = torch.complex(R[0, 0], R[1, 0]).numpy()  # the graph's dA, exactly
    dA64, b = dA.numpy(), dB[..., 0].numpy()
    est = step_drift(net, 1.0)
    x32 = np.zeros_like(dA64)
    x64 = np.zeros_like(dA64)
    for _ in range(int(3 * est["memory"])):
        x32 = dA32 * x32 + b
        x64 = dA64 * x64 + b
    measured = float((np.abs(x32 - x64) / np.abs(x64)).max())
    assert 1e-5 < est["max_rel"] < 1e-3 and 9e3 < est["memory"] < 1.1e4
    assert 0.3 * est["max_rel"] < measured <= 1.05 * est["max_rel"], (measured, est)


@pytest.mark.parametrize("re_a, warned", [(0.01, True), (0.5, False)])
def test_the_export_reports_the_drift_and_warns_past_the_checked_length(
    tmp_path, caplog, re_a, warned
):
    """Re A = -0.01 at Δ = 1e-3 (a memory of 1e5 steps): the report holds ~1e-3 and the
    export warns (parity still passes on its 4,096 steps); the default init's modes (memory
    ~2e3 steps, within the 4,096 checked) are left to the check: 0 and no warning."""
    net = slow_net(re_a)
    with caplog.at_level(logging.WARNING, logger="ssmstream.export.verify"):
        export_network(net, tmp_path / "m", prefill=False)
    parity = json.loads((tmp_path / "m" / "manifest.json").read_text())["parity"]
    drift, est = parity["step_drift"], step_drift(net, 1.0, beyond=4096)
    assert parity["passed"] is True
    assert drift == {"max_rel": est["max_rel"], "memory_steps": est["memory"]}
    assert (drift["max_rel"] > 1e-4) == warned and (drift["memory_steps"] > 4096) == warned
    assert (drift["max_rel"] == 0.0) != warned  # modes within the check's length: measured
    assert ("float32 dA may drift" in caplog.text) == warned, caplog.text
    shown = format_manifest(load_manifest(tmp_path / "m"), tmp_path / "m")  # ssmstream info
    assert f"step drift up to ~{drift['max_rel']:.1e} (estimate" in shown


def test_a_mode_too_slow_for_float64_still_counts_as_slow():
    """Δ·|Re A| ≈ 1e-19 (a tiny --dt-scale): |dA| rounds to 1 in float64, so δ = 1 − |dA| is
    0. Such modes were skipped: a report of memory 0 and no drift, where a slightly faster
    mode reported ~1. Their memory counts as 2^53 steps (what float64 resolves), and the
    drift over it as the float32 error over that memory."""
    net = slow_net(re_a=0.1)
    dA = discrete64(net.ssms[0], 1e-15)[0]
    assert bool((dA.abs() == 1).all())  # the premise: float64 cannot tell these from 1
    est = step_drift(net, 1e-15, beyond=4096)
    R = rot(dA).double()
    e = float((torch.complex(R[0, 0], R[1, 0]) - dA).abs().max())
    assert est["memory"] == 2.0**53 and est["max_rel"] == pytest.approx(e * 2.0**53)
    assert 0.9e13 < step_drift(net, 1e-9, beyond=4096)["memory"] < 1.1e13  # resolved: 1 / δ
