"""model/plots.py: the kernel panel of a layer with more heads than modes, and the CLI
passing --head / --n-kernels through and reporting a missing matplotlib as a usage error.

Figures are recorded by a fake Figure class (matplotlib is not needed); the expected curves
are recomputed here from the layer (basis_functions at t = samples · Δ_head, and
layer.kernel)."""

from __future__ import annotations

import sys

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, plots, save_checkpoint
from ssmstream.model.layers import SSM
from ssmstream.model.plots import basis_functions, main, plot_layer


class _Axes:
    def __init__(self):
        self.lines, self.props = [], {}

    def plot(self, x, y, **kw):
        self.lines.append((torch.as_tensor(x).clone(), torch.as_tensor(y).clone(), kw))

    def set(self, **kw):
        self.props.update(kw)

    def legend(self, **kw):
        pass


class _Figure:
    made: list = []

    def __init__(self, **kw):
        self.axes = [_Axes(), _Axes()]
        _Figure.made.append(self)

    def subplots(self, rows, cols):
        return self.axes

    def suptitle(self, text):
        pass

    def savefig(self, path, **kw):
        open(path, "wb").write(b"fake")


@pytest.fixture
def recording(monkeypatch):
    _Figure.made = []
    monkeypatch.setattr(plots, "_figure_class", lambda: (_Figure, lambda fig: None))
    return _Figure.made


def test_kernel_panel_shows_n_kernels_heads_even_with_fewer_modes(tmp_path, recording):
    """4 heads of N/2 = 2 modes each: n_kernels=4 draws all 4 heads' kernels (the number of
    heads bounds the kernel panel, the number of modes only the basis panel)."""
    torch.manual_seed(0)
    layer = SSM(4, d_state=4, heads=4)
    plot_layer(layer, tmp_path / "p.png", length=12, n_modes=5, n_kernels=4)
    basis, kern = recording[0].axes
    assert len(basis.lines) == 2
    K = layer.kernel(12).detach()
    assert [kw["label"] for _, _, kw in kern.lines] == ["head 0", "head 1", "head 2", "head 3"]
    for h, (_, y, _) in enumerate(kern.lines):
        torch.testing.assert_close(y, K[h, 0, 0])


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=256, d_model=8, n_layers=2, d_state=8))
    save_checkpoint(net, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_cli_draws_the_head_and_number_of_kernels_asked_for(tmp_path, ckpt, recording):
    """--layer 1 --head 2 --n-modes 2 --n-kernels 3: the basis panel is head 2 of layer 1
    (Re K_n at t = samples · Δ of head 2) and the kernel panel has 3 heads."""
    argv = [str(ckpt), "--out", str(tmp_path / "k.png"), "--layer", "1", "--head", "2"]
    assert main([*argv, "--length", "10", "--n-modes", "2", "--n-kernels", "3"]) == 0
    basis, kern = recording[0].axes
    layer = load_checkpoint(ckpt).ssms[1]
    samples = torch.linspace(0, 9, 80, dtype=torch.float64)
    dt = torch.exp(layer.log_dt[2].double()).item()
    want = basis_functions(layer, samples * dt, head=2).real
    assert len(basis.lines) == 2
    for n, (x, y, _) in enumerate(basis.lines):
        torch.testing.assert_close(x, samples)
        torch.testing.assert_close(y, want[n], rtol=1e-5, atol=1e-6)
    assert len(kern.lines) == 3
    K = layer.kernel(10).detach()
    for h, (_, y, _) in enumerate(kern.lines):
        torch.testing.assert_close(y, K[h, 0, 0])


def test_cli_without_matplotlib_is_a_usage_error(tmp_path, ckpt, monkeypatch, capsys):
    """The CLI reports a missing matplotlib as a usage error (exit 2, the install hint), not
    with a traceback, and writes nothing."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), "--out", str(tmp_path / "k.png"), "--length", "8"])
    assert e.value.code == 2
    assert "pip install 'ssmstream[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "k.png").exists()
