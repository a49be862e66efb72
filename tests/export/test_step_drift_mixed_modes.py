"""`step_drift` on a layer whose modes decay at different rates: the memory it reports is
the slowest mode's, and the drift it reports comes from the modes slower than the check."""

from __future__ import annotations

import math

import torch
from ssmstream.export.modules import step_drift
from ssmstream.model import SSMConfig, SSMNetwork

DT = 1e-3


def mixed_net(slow: float, fast: float) -> SSMNetwork:
    """A one-layer zoh token net at Δ = DT whose first half of the modes has Re A = -slow,
    the other half Re A = -fast: |dA| = exp(-Δ·|Re A|) is known in closed form."""
    torch.manual_seed(0)
    cfg = SSMConfig(vocab_size=13, d_model=4, n_layers=1, d_state=8, dt_min=DT, dt_max=DT)
    net = SSMNetwork(cfg).eval()
    with torch.no_grad():
        re = net.ssms[0].log_A_real  # [H, N/2]
        half = re.shape[1] // 2
        re[:, :half] = math.log(slow)
        re[:, half:] = math.log(fast)
    return net


def test_the_memory_is_the_slowest_modes_not_the_fastest():
    net = mixed_net(slow=0.1, fast=100.0)
    slowest = 1 / (1 - math.exp(-DT * 0.1))  # ~1e4 steps
    fastest = 1 / (1 - math.exp(-DT * 100.0))  # ~10.5 steps
    est = step_drift(net, 1.0)
    assert math.isclose(est["memory"], slowest, rel_tol=1e-6), (est, slowest, fastest)


def test_only_modes_slower_than_the_check_count_towards_the_drift():
    """A check of 1,000 steps measures the fast modes (memory ~10 steps) itself; the slow
    ones (memory ~1e4 steps) are the estimate. Past 1e4 steps, no mode is left to estimate."""
    net = mixed_net(slow=0.1, fast=100.0)
    everything = step_drift(net, 1.0)["max_rel"]
    beyond_fast = step_drift(net, 1.0, beyond=1000)["max_rel"]
    beyond_all = step_drift(net, 1.0, beyond=1e6)["max_rel"]
    assert beyond_fast > 1e-5  # ~3e-8 / 1e-4: the slow modes' share
    assert beyond_fast == everything  # the slow modes are the worst ones anyway
    assert beyond_all == 0.0
