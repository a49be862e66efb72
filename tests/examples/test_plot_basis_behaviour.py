"""examples/plot_basis.py: the layer range includes layer 0, --length reaches both figures,
and a missing matplotlib is a usage error (exit 2), not a traceback. Fast: plot_layer is
replaced by a recorder (no matplotlib drawing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import ROOT, load_script

SIGNAL = ROOT / "examples" / "checkpoints" / "signal"


@pytest.fixture(scope="module")
def plot_mod():
    pytest.importorskip("torch")
    return load_script("examples/plot_basis.py")


@pytest.fixture
def drawn(plot_mod, monkeypatch) -> list[dict]:
    """What plot_layer was asked to draw, one dict per figure (nothing is written)."""
    calls = []

    def fake_plot_layer(layer, path, head=0, length=None, title=""):
        calls.append({"layer": layer, "path": Path(path), "head": head, "length": length})
        return Path(path)

    monkeypatch.setattr(plot_mod, "plot_layer", fake_plot_layer)
    return calls


def test_layer_zero_is_a_valid_layer(plot_mod, drawn, tmp_path):
    """Layer 0 (the CLI's default) is drawn: the valid range is [0, number of layers)."""
    from ssmstream.model import load_checkpoint

    paths = plot_mod.main([str(SIGNAL), "--out", str(tmp_path / "b.png")])
    assert [p.name for p in paths] == ["b.png", "b_init.png"]
    trained = load_checkpoint(SIGNAL).ssms[0]
    got = drawn[0]["layer"].state_dict()
    assert got.keys() == trained.state_dict().keys()
    for k, v in trained.state_dict().items():
        assert (got[k] == v).all(), k


def test_an_explicit_length_applies_to_both_figures(plot_mod, drawn, tmp_path):
    """--length L sets the time axis of the trained figure and of the init figure alike."""
    plot_mod.main([str(SIGNAL), "--out", str(tmp_path / "b.png"), "--layer", "1",
                   "--length", "37"])  # fmt: skip
    assert [d["length"] for d in drawn] == [37, 37]
    assert [d["path"].name for d in drawn] == ["b.png", "b_init.png"]


def test_missing_matplotlib_is_a_usage_error(plot_mod, monkeypatch, tmp_path, capsys):
    """plot_layer's ImportError (no matplotlib) ends the CLI with exit status 2 and its
    message, the way a bad argument does."""

    def no_matplotlib(*a, **k):
        raise ImportError("plotting needs matplotlib: pip install matplotlib")

    monkeypatch.setattr(plot_mod, "plot_layer", no_matplotlib)
    with pytest.raises(SystemExit) as e:
        plot_mod.main([str(SIGNAL), "--out", str(tmp_path / "b.png")])
    assert e.value.code == 2
    assert "plotting needs matplotlib: pip install matplotlib" in capsys.readouterr().err
