"""A network of one channel (d_model = 1) is refused naming d_model: each block's LayerNorm over a
single channel outputs its bias whatever the input, so the network trained without a word to a
constant."""

from __future__ import annotations

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.model.train import main


def test_a_one_channel_network_is_refused_naming_d_model(tmp_path, capsys):
    """Two channels already see the input."""
    with pytest.raises(ValueError, match="^d_model must be at least 2, got 1: the LayerNorm"):
        SSMConfig(d_input=1, d_model=1)
    with pytest.raises(SystemExit) as exit:  # a flag's value: a usage error
        main(
            [
                "--task",
                "signal",
                "--d-model",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--steps",
                "2",
                "--warmup-steps",
                "1",
                "--n-layers",
                "1",
                "--d-state",
                "2",
                "--no-progress",
            ]
        )
    assert exit.value.code == 2 and not (tmp_path / "o").exists()
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith("ssmstream train: error: --d-model must be at least 2, got 1")
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(d_input=1, d_model=2, n_layers=1, d_state=2)).eval()
    u = torch.randn(1, 16, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (net(u) - net(3 * u)).abs().max() > 1e-3
