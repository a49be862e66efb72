"""`ssmstream plot CKPT --out` never writes over a file of the checkpoint it draws (a slip
such as `--out ckpt/config.json` had replaced the checkpoint's config with a PNG); a new
file in the checkpoint directory is fine."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.model.plots import main


def _files(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(d_input=1, d_output=1, d_model=4, n_layers=1, d_state=4))
    save_checkpoint(net, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "train_log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "ckpt" / "train_state.pt").write_bytes(b"state")
    return tmp_path / "ckpt"


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "train_log.jsonl", "train_state.pt", "link"]
)
def test_an_out_that_is_a_file_of_the_checkpoint_is_refused(ckpt, tmp_path, capsys, name):
    out = ckpt / name
    if name == "link":  # a link to one of them, outside the directory
        out = tmp_path / "link.png"
        out.symlink_to(ckpt / "config.json")
    before = _files(ckpt)
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), "--out", str(out), "--length", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"ssmstream plot: error: --out: {out} is a file of the checkpoint; give another PNG file"
    )
    assert _files(ckpt) == before


def test_a_new_png_in_the_checkpoint_directory_is_written(ckpt):
    before = _files(ckpt)
    assert main([str(ckpt), "--out", str(ckpt / "basis.png"), "--length", "8"]) == 0
    after = _files(ckpt)
    assert (ckpt / "basis.png").read_bytes()[:4] == b"\x89PNG"
    assert {k: v for k, v in after.items() if k != "basis.png"} == before
