"""examples/plot_basis.py says its errors as its flags, as `ssmstream plot` does (--layer,
--head, --length, --seed, --out), and a refused command writes no PNG: a --seed
torch.manual_seed cannot take is refused before the trained figure is drawn, and an --out
ending in '/' is refused, not written as a file named like the directory."""

from __future__ import annotations

import pytest
from scripts import ROOT, load_script

SIGNAL = ROOT / "examples" / "checkpoints" / "signal"  # 2 layers of 4 heads


@pytest.fixture(scope="module")
def plot_mod():
    pytest.importorskip("matplotlib")
    return load_script("examples/plot_basis.py")


def _refused(plot_mod, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        plot_mod.main([str(SIGNAL), "--length", "8", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--layer", "2"], "--layer must be in [0, 2), got 2"),
        (["--head", "-1"], "--head must be in [0, "),
        (["--length", "1"], "--length must be in [2, 65536], got 1"),
        (["--seed", str(2**64)], f"--seed must be in [-2**63, 2**64 - 1], got {2**64}"),
    ],
)
def test_errors_name_the_flag_and_write_nothing(plot_mod, tmp_path, capsys, argv, said):
    line = _refused(plot_mod, ["--out", str(tmp_path / "b.png"), *argv], capsys)
    assert line.split(": error: ", 1)[1].startswith(said), line
    assert list(tmp_path.iterdir()) == []


def test_an_out_ending_in_a_slash_is_refused_not_written_as_a_file(plot_mod, tmp_path, capsys):
    out = f"{tmp_path / 'figures'}/"
    line = _refused(plot_mod, ["--out", out, "--no-init"], capsys)
    assert line.endswith(f": error: --out: {out} is a directory; give the PNG file to write")
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_written_names_out(plot_mod, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "b.png"  # under a file: no directory can be made there
    line = _refused(plot_mod, ["--out", str(out), "--no-init"], capsys)
    assert f": error: --out {tmp_path / 'file'}" in line, line
    assert ": cannot write it: " in line
