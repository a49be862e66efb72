"""model/plots.py: the basis functions against a dense matrix exponential, the PNG, the CLI,
and the errors (bad indices, matplotlib missing).
"""

from __future__ import annotations

import sys

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.model.layers import SSM
from ssmstream.model.plots import basis_functions, main, plot_checkpoint, plot_layer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("heads, init", [(None, "s4d-lin"), (2, "s4d-inv"), (1, "s4d-real")])
def test_basis_functions_equal_dense_matrix_exponential(heads, init):
    """K_n(t) = e_nᵀ e^{tA} B with A as a dense diag matrix and torch.linalg.matrix_exp."""
    torch.manual_seed(0)
    layer = SSM(4, d_state=8, heads=heads, init=init).double()
    t = torch.tensor([0.0, 0.3, 1.7, 5.0], dtype=torch.float64)
    h, m = layer.heads - 1, layer.M - 1
    A = torch.complex(-torch.exp(layer.log_A_real[h]), layer.A_imag[h]).detach()  # [N/2]
    B = torch.view_as_complex(layer.B.detach())[h, :, m]  # [N/2]
    got = basis_functions(layer, t, head=h, input=m)  # [N/2, T]
    assert got.shape == (4, 4)
    for j, tj in enumerate(t):
        expAt = torch.linalg.matrix_exp(tj * torch.diag(A))  # [N/2, N/2]
        want = expAt @ B  # row n = e_nᵀ e^{tA} B
        torch.testing.assert_close(got[:, j], want, rtol=1e-12, atol=1e-12)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR w, h


def test_plot_layer_writes_a_png(tmp_path):
    torch.manual_seed(0)
    layer = SSM(8, d_state=16)
    path = plot_layer(layer, tmp_path / "sub" / "basis.png", head=3, length=64)
    width, height = _png_size(path)
    assert (width, height) == (1100, 462)  # figsize (10, 4.2) at 110 dpi
    assert path.stat().st_size > 10_000  # lines were drawn, not an empty canvas


def test_plot_checkpoint_cli(tmp_path):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=256, d_model=8, n_layers=2, d_state=8))
    save_checkpoint(net, tmp_path / "ckpt")
    out = tmp_path / "k.png"
    assert main([str(tmp_path / "ckpt"), "--out", str(out), "--layer", "1", "--head", "2"]) == 0
    _png_size(out)
    with pytest.raises(ValueError, match="layer must be in"):
        plot_checkpoint(tmp_path / "ckpt", tmp_path / "x.png", layer=2)


def test_bad_arguments(tmp_path, capsys):
    layer = SSM(4, d_state=4)
    with pytest.raises(ValueError, match="head must be in"):
        plot_layer(layer, tmp_path / "a.png", head=4)
    with pytest.raises(ValueError, match="input must be in"):
        basis_functions(layer, torch.zeros(2), input=1)
    with pytest.raises(ValueError, match="n_modes"):
        plot_layer(layer, tmp_path / "a.png", n_modes=0)
    with pytest.raises(ValueError, match="length"):
        plot_layer(layer, tmp_path / "a.png", length=1)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing-ckpt")])
    assert "missing-ckpt" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(ValueError, match="^out: .* is a directory"):
        plot_layer(layer, tmp_path)


def test_plot_writes_the_file_it_names_whatever_its_suffix(tmp_path):
    """matplotlib had added .png to a name without one, while the log and the return value
    named the file given (which did not exist)."""
    layer = SSM(4, d_state=4)
    for name in ("basis", "basis.img"):
        path = plot_layer(layer, tmp_path / name, length=16)
        assert path == tmp_path / name and _png_size(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis", "basis.img"]


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ImportError, match=r"pip install 'ssmstream\[plots\]'"):
        plot_layer(SSM(4, d_state=4), tmp_path / "a.png")
