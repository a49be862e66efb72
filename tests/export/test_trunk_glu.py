"""The graphs' trunk takes a block's Linear(D, 2D) + GLU as two Linear(D, D) (no [.., 2D]
tensor to split in the graph) computing the same a·σ(b); a plain Linear Out stays as is."""

from __future__ import annotations

import torch
from ssmstream.export.modules import Trunk
from ssmstream.model import SSMConfig, SSMNetwork


def net(glu: bool) -> SSMNetwork:
    torch.manual_seed(0)
    return SSMNetwork(SSMConfig(vocab_size=5, d_model=6, n_layers=2, d_state=4, glu=glu)).eval()


def test_a_glu_out_becomes_two_linears_with_the_same_function():
    model = net(glu=True)
    trunk = Trunk(model, torch.float32)
    y = torch.randn(7, 6)
    for block, out in zip(model.blocks, trunk.outs):
        assert not any(isinstance(m, torch.nn.GLU) for m in out.modules())
        widths = [m.out_features for m in out.modules() if isinstance(m, torch.nn.Linear)]
        assert widths == [6, 6]
        with torch.no_grad():
            torch.testing.assert_close(out(y), block.out(y), rtol=1e-6, atol=1e-6)


def test_a_plain_linear_out_is_kept():
    model = net(glu=False)
    trunk = Trunk(model, torch.float32)
    y = torch.randn(7, 6)
    for block, out in zip(model.blocks, trunk.outs):
        assert isinstance(out, torch.nn.Linear)
        with torch.no_grad():
            torch.testing.assert_close(out(y), block.out(y))
