"""`ssmstream plot --out` whose directory part runs through a file (`--out notes.txt/k.png`)
says what is in the way, not mkdir's bare "File exists", and writes nothing."""

from __future__ import annotations

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.model.plots import main


@pytest.mark.parametrize("under", ["notes.txt", "notes.txt/more"])
def test_an_out_under_a_file_names_the_file(tmp_path, capsys, under):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(d_input=1, d_output=1, d_model=4, n_layers=1, d_state=4))
    save_checkpoint(net, tmp_path / "ckpt")
    (tmp_path / "notes.txt").write_text("kept\n")
    out = tmp_path / under / "k.png"
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ckpt"), "--out", str(out), "--length", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"ssmstream plot: error: --out {out}: cannot write it: "
        f"{tmp_path / 'notes.txt'} is not a directory"
    )
    assert (tmp_path / "notes.txt").read_text() == "kept\n"
