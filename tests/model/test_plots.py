"""model/plots.py: the basis functions against a dense matrix exponential, the PNG, the CLI,
and the errors (bad indices, matplotlib missing).
"""

from __future__ import annotations

import sys

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, plots, save_checkpoint
from ssmstream.model.layers import SSM
from ssmstream.model.plots import basis_functions, default_length, main, plot_checkpoint, plot_layer

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


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--layer", "2"], "--layer must be in [0, 2), got 2"),
        (["--head", "8"], "--head must be in [0, 8), got 8"),
        (["--n-modes", "0"], "--n-modes must be positive, got 0"),
        (["--n-kernels", "0"], "--n-kernels must be positive, got 0"),
        (["--length", "1"], "--length must be in [2, 65536], got 1"),
        (["--out", ""], "--out: must name the PNG file to write, got ''"),
    ],
)
def test_plot_cli_errors_name_the_flag(tmp_path, capsys, flags, said):
    """The command's usage errors say the flag (`--n-modes`), not plot_checkpoint's
    argument (`n_modes`)."""
    torch.manual_seed(0)
    save_checkpoint(SSMNetwork(SSMConfig(vocab_size=4, d_model=8, n_layers=2, d_state=4)),
                    tmp_path / "ckpt")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "k.png"), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"ssmstream plot: error: {said}"


def test_bad_arguments(tmp_path, capsys):
    layer = SSM(4, d_state=4)
    with pytest.raises(ValueError, match="head must be in"):
        plot_layer(layer, tmp_path / "a.png", head=4)
    with pytest.raises(ValueError, match="input must be in"):
        basis_functions(layer, torch.zeros(2), input=1)
    with pytest.raises(ValueError, match="n_modes"):
        plot_layer(layer, tmp_path / "a.png", n_modes=0)
    with pytest.raises(ValueError, match=r"^length must be in \[2, 65536\], got 1$"):
        plot_layer(layer, tmp_path / "a.png", length=1)
    with pytest.raises(ValueError, match=r"^length must be in \[2, 65536\], got 1000000000$"):
        plot_layer(layer, tmp_path / "a.png", length=10**9)  # had tried to allocate it
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing-ckpt")])
    assert "missing-ckpt" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(ValueError, match="^path: .* is a directory"):
        plot_layer(layer, tmp_path)


def test_an_out_that_names_a_directory_is_refused_naming_the_flag(tmp_path, capsys):
    # `--out new/` had written a file named `new` (the slash dropped by Path)
    torch.manual_seed(0)
    save_checkpoint(SSMNetwork(SSMConfig(vocab_size=256, d_model=8, d_state=8)), tmp_path / "c")
    (tmp_path / "d").mkdir()
    for out in (tmp_path / "d", f"{tmp_path / 'new'}/"):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "c"), "--out", str(out)])
        assert e.value.code == 2
        said = capsys.readouterr().err.splitlines()[-1]
        assert (
            said
            == f"ssmstream plot: error: --out: {out} is a directory; give the PNG file to write"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"] and not any(
        (tmp_path / "d").iterdir()
    )
    with pytest.raises(SystemExit) as e:  # an empty --out (an unset $VAR)
        main([str(tmp_path / "c"), "--out", ""])
    said = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2
    assert said == "ssmstream plot: error: --out: must name the PNG file to write, got ''"


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


def _layer(a_real, dt, d_model=None, d_state=None) -> SSM:
    """An SSM whose A real parts ([H, N/2]) and Δ ([H]) are set exactly."""
    a_real = torch.as_tensor(a_real, dtype=torch.float32)
    H, N2 = a_real.shape
    torch.manual_seed(0)
    layer = SSM(H if d_model is None else d_model, d_state=2 * N2, heads=H)
    with torch.no_grad():
        layer.log_A_real.copy_(torch.log(a_real))
        layer.log_dt.copy_(torch.log(torch.as_tensor(dt, dtype=torch.float32)))
    return layer


def test_default_length_is_ceil_of_4_over_the_slowest_decay_of_the_head():
    # head 0: slowest mode 0.3 (not 2.0) at Δ 0.01 → 4 / 0.003 = 1333.3 → 1334 samples
    # head 1: slowest mode 0.5 at Δ 2⁻⁶ (exact in float32) → 4 / 2⁻⁷ = 512
    layer = _layer([[2.0, 0.3], [0.5, 4.0]], [0.01, 2**-6])
    assert default_length(layer, 0) == 1334
    assert default_length(layer, 1) == 512
    # clipped to [32, 4096]
    assert default_length(_layer([[1e-4, 1.0]], [0.01]), 0) == 4096
    assert default_length(_layer([[50.0, 60.0]], [0.1]), 0) == 32


def test_negative_indices_are_refused():
    layer = SSM(4, d_state=4)
    with pytest.raises(ValueError, match=r"^head must be in \[0, 4\), got -1$"):
        basis_functions(layer, torch.zeros(2), head=-1)
    with pytest.raises(ValueError, match=r"^input must be in \[0, 1\), got -1$"):
        basis_functions(layer, torch.zeros(2), input=-1)


def test_n_kernels_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="^n_kernels must be positive, got 0$"):
        plot_layer(SSM(4, d_state=4), tmp_path / "a.png", n_kernels=0, length=8)
    assert not (tmp_path / "a.png").exists()


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
        self.axes, self.suptitle_text = [_Axes(), _Axes()], None
        _Figure.made.append(self)

    def subplots(self, rows, cols):
        return self.axes

    def suptitle(self, text):
        self.suptitle_text = text

    def savefig(self, path, **kw):
        open(path, "wb").write(b"fake")


@pytest.fixture
def recording(monkeypatch):
    _Figure.made = []
    monkeypatch.setattr(plots, "_figure_class", lambda: (_Figure, lambda fig: None))
    return _Figure.made


def test_plotted_basis_functions_and_kernels_are_the_layers(tmp_path, recording):
    """The left panel is Re K_n(t) of the chosen head at t = samples · Δ_head; the right panel
    is K[h, 0, 0, :] of the first n_kernels heads."""
    torch.manual_seed(0)
    layer = _layer([[0.5, 1.0, 2.0], [0.2, 0.7, 3.0], [1.5, 0.1, 0.9]], [0.05, 0.3, 0.01])
    plot_layer(layer, tmp_path / "p.png", head=1, n_modes=2, n_kernels=3)
    (fig,) = recording
    basis, kern = fig.axes
    L = default_length(layer, 1)  # head 1: 4 / (0.2 · 0.3) → 67 (head 0 would give 160)
    assert L == 67
    samples = torch.linspace(0, L - 1, 8 * L, dtype=torch.float64)
    want = basis_functions(layer, samples * 0.3, head=1).real
    assert len(basis.lines) == 2
    for n, (x, y, _) in enumerate(basis.lines):
        torch.testing.assert_close(x, samples)
        torch.testing.assert_close(y, want[n], rtol=1e-5, atol=1e-6)
    K = layer.kernel(L).detach()
    assert len(kern.lines) == 3
    for h, (x, y, kw) in enumerate(kern.lines):
        assert torch.equal(x, torch.arange(L)) and kw["label"] == f"head {h}"
        torch.testing.assert_close(y, K[h, 0, 0])


def test_kernel_panel_is_output_0_of_input_0_of_each_head(tmp_path, recording):
    torch.manual_seed(1)
    layer = SSM(4, d_state=4, heads=2)  # M = 2: K[h] is [2, 2, L]
    plot_layer(layer, tmp_path / "p.png", length=10, n_kernels=5)
    kern = recording[0].axes[1]
    K = layer.kernel(10).detach()
    assert len(kern.lines) == 2  # only 2 heads exist
    for h, (_, y, _) in enumerate(kern.lines):
        torch.testing.assert_close(y, K[h, 0, 0])


def test_checkpoint_plot_title_names_the_layer(tmp_path, recording):
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=256, d_model=8, n_layers=2, d_state=8))
    save_checkpoint(net, tmp_path / "ckpt")
    plot_checkpoint(tmp_path / "ckpt", tmp_path / "k.png", layer=1, length=8)
    assert recording[0].suptitle_text == "ckpt: layer 1 of 2"


def test_cli_out_that_cannot_be_written_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=256, d_model=4, n_layers=1, d_state=4))
    save_checkpoint(net, tmp_path / "ckpt")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as e:
        plots.main(
            [str(tmp_path / "ckpt"), "--out", str(tmp_path / "a-file" / "k.png"), "--length", "8"]
        )
    assert e.value.code == 2
    assert "a-file" in capsys.readouterr().err


def test_default_length_of_a_non_decaying_mode_is_the_upper_clip():
    layer = SSM(2, d_state=4)
    with torch.no_grad():
        layer.log_A_real[0, 0] = -120.0  # exp → 0.0 in float32
    assert default_length(layer, 0) == 4096


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


def test_a_wide_mimo_layer_is_plotted_without_its_m_squared_kernel(tmp_path, monkeypatch):
    """The kernel panel needs input 0 → output 0 only: the [H, M, M, L] kernel (M² · L
    numbers: GBs for a 512-wide MIMO layer at L = 4096) is never built."""

    torch.manual_seed(0)
    layer = SSM(64, 16, heads=1)  # M = 64
    real = SSM.kernel

    def kernel(self, L, entry=None):
        assert entry is not None, "the whole M²·L kernel was built"
        return real(self, L, entry)

    monkeypatch.setattr(SSM, "kernel", kernel)
    assert plot_layer(layer, tmp_path / "mimo.png", length=256).is_file()
