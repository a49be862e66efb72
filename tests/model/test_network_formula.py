"""SSMNetwork against its formula (model/network.py, docs/theory.md §7), written out with torch's
functional ops from the modules' weights:

    z_0 = Encoder(u),   z_i = z_{i−1} + Out(GELU(SSM_i(LayerNorm_i(z_{i−1})))),
    y   = Head(LayerNorm(z_n)),   Out = GLU (a·σ(b) of a Linear to 2D) or Linear.

`forward` and `step` are compared with each other elsewhere; both would agree on a network that
dropped, say, the final LayerNorm. Every LayerNorm and Linear gets random weights first, so an
affine part left out would show."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssmstream.model import SSMConfig, SSMNetwork

D = 6


def _by_formula(net: SSMNetwork, inp: torch.Tensor) -> torch.Tensor:
    def norm(module, z):
        return F.layer_norm(z, (D,), module.weight, module.bias, module.eps)

    z = F.embedding(inp, net.encoder.weight) if net.cfg.input_kind == "tokens" else (
        F.linear(inp, net.encoder.weight, net.encoder.bias)
    )  # fmt: skip
    for block in net.blocks:
        g = F.gelu(block.ssm(norm(block.norm, z)))
        if net.cfg.glu:
            a, b = F.linear(g, block.out[0].weight, block.out[0].bias).chunk(2, dim=-1)
            z = z + a * torch.sigmoid(b)
        else:
            z = z + F.linear(g, block.out.weight, block.out.bias)
    return F.linear(norm(net.norm, z), net.head.weight, net.head.bias)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "linear"])
@pytest.mark.parametrize("kind", ["tokens", "values"])
def test_forward_is_the_documented_formula(kind, glu):
    torch.manual_seed(0)
    inputs = {"vocab_size": 11} if kind == "tokens" else {"d_input": 3, "d_output": 2}
    cfg = SSMConfig(**inputs, d_model=D, n_layers=2, d_state=4, heads=3, glu=glu)
    net = SSMNetwork(cfg).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    g = torch.Generator().manual_seed(1)
    inp = (
        torch.randint(0, 11, (2, 20), generator=g)
        if kind == "tokens"
        else torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    )
    with torch.no_grad():
        torch.testing.assert_close(net(inp), _by_formula(net, inp), rtol=1e-12, atol=1e-12)
