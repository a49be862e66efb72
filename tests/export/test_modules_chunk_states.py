"""Export modules: building them leaves the caller's network as it was, and the prefill
graph's chunk_states output, checked in torch against the recurrent step graph."""

from __future__ import annotations

import pytest
import torch
from ssmstream.export.modules import PrefillGraph, StepGraph
from ssmstream.model import SSMConfig, SSMNetwork


def make_net(seed: int = 0, **kw) -> SSMNetwork:
    torch.manual_seed(seed)
    base = dict(vocab_size=13, d_model=8, n_layers=2, d_state=8)
    return SSMNetwork(SSMConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("heads", [None, 2], ids=["siso", "multihead"])
def test_building_the_graphs_leaves_the_network_untouched(heads):
    """The float64 discretization works on a copy: after building the step graph and both
    prefill paths (with Δ scaled) every tensor of the caller's network has its old dtype
    and value, and its forward gives what it gave before."""
    net = make_net(seed=2, heads=heads)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = net(x)
    StepGraph(net, dt_scale=0.5)
    for mode_path in (False, True):
        PrefillGraph(net, dt_scale=0.5, chunk=8, max_chunks=3, mode_path=mode_path)
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert torch.equal(net(x), y0)


@pytest.mark.parametrize("mode_path", [False, True], ids=["kernel", "modes"])
def test_chunk_states_are_the_step_states_at_chunk_ends(mode_path):
    """chunk_states[:, j] is the packed state after (j + 1)·chunk inputs, as the step graph
    reaches it from the same non-zero state; there are T / chunk of them."""
    net = make_net(seed=5, heads=2)
    step = StepGraph(net)
    g = torch.Generator().manual_seed(6)
    state = torch.zeros(2, net.cfg.state_size)
    with torch.no_grad():
        for t in torch.randint(0, 13, (2, 11), generator=g).T:  # a warm, non-zero state
            _, state = step(t, state)
        x = torch.randint(0, 13, (2, 24), generator=g)
        _, _, chunk_states = PrefillGraph(net, chunk=8, max_chunks=4, mode_path=mode_path)(x, state)
        ends, s = [], state
        for t in range(24):
            _, s = step(x[:, t], s)
            if (t + 1) % 8 == 0:
                ends.append(s)
    assert chunk_states.shape == (2, 3, net.cfg.state_size)
    ref = torch.stack(ends, 1)
    assert ((chunk_states - ref).abs().max() / ref.abs().max()).item() < 1e-4
