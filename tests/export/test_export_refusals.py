"""What `ssmstream export` refuses before it builds a graph, in one line and writing nothing: a
model whose modes grow (forward Euler or gbt with α < ½ at too large a Δ, docs/theory.md §2),
a --chunk whose prefill tables exceed the machine's memory, an empty --out, an --out that
already exists (said with the flag that replaces a model)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from export_helpers import EXPORT
from ssmstream.export import ExportError, ExportFailed, export_network, exporter
from ssmstream.export.cli import main
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint


def _net(**cfg) -> SSMNetwork:
    torch.manual_seed(0)
    base = dict(d_input=1, d_output=1, d_model=4, n_layers=2, d_state=8)
    return SSMNetwork(SSMConfig(**{**base, **cfg})).eval()


def _growing(net: SSMNetwork, alpha: float, dt_scale: float) -> tuple[int, int, float]:
    """(modes with |Ā| > 1, modes, largest |Ā|) by gbt(α)'s formula in Python complex numbers:
    Ā = (1 + (1 − α)ΔA) / (1 − αΔA), A = −exp(log_A_real) + i·A_imag, Δ = exp(log_dt)·s."""
    mags = []
    for ssm in net.ssms:
        for h, log_dt in enumerate(ssm.log_dt.tolist()):
            dt = math.exp(log_dt) * dt_scale
            for re_, im in zip(ssm.log_A_real[h].tolist(), ssm.A_imag[h].tolist()):
                z = dt * complex(-math.exp(re_), im)
                mags.append(abs((1 + (1 - alpha) * z) / (1 - alpha * z)))
    return sum(m > 1 for m in mags), len(mags), max(mags)


@pytest.mark.parametrize(
    "cfg, alpha, dt_scale",
    [
        (dict(discretization="euler", dt_min=0.05, dt_max=0.2), 0.0, 1.0),
        (dict(discretization="gbt", alpha=0.25, dt_min=0.05, dt_max=0.2), 0.25, 1.0),
        # stable at its own Δ (Euler needs Δ < 2·½/|A|² ≈ 0.011 for the fastest mode, 3π):
        # unstable once --dt-scale makes Δ 100× larger
        (dict(discretization="euler", dt_min=1e-3, dt_max=2e-3), 0.0, 100.0),
    ],
    ids=["euler", "gbt-0.25", "euler-dt-scale"],
)
def test_a_model_whose_modes_grow_is_refused_in_one_line(tmp_path, cfg, alpha, dt_scale):
    net = _net(**cfg)
    n, total, worst = _growing(net, alpha, dt_scale)
    assert 0 < n < total and _growing(net, alpha, 1.0)[0] == (n if dt_scale == 1 else 0)
    out = tmp_path / "model"
    with pytest.raises(ExportFailed) as e:
        export_network(net, out, dt_scale=dt_scale, **EXPORT)
    said = str(e.value)
    assert "\n" not in said
    assert said.startswith(f"the model is unstable: {n} of {total} modes grow (|Ā| up to ")
    shown = float(re.search(r"up to ([0-9.e+-]+) > 1", said)[1])
    assert shown == pytest.approx(worst, rel=1e-3)
    assert ("--dt-scale 100" in said) == (dt_scale != 1)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the temporary directory


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(_net(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_an_empty_out_is_refused_not_taken_for_the_working_directory(
    ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the checkpoint is under the working directory
    assert main([str(ckpt), "--out", "", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == "ssmstream export: error: --out must name the model directory to create, got ''\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_existing_out_says_the_flag_that_replaces_a_model(ckpt, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert main([str(ckpt), "--out", str(tmp_path / "taken"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ssmstream export: error: --out {tmp_path / 'taken'} already exists (a file); choose "
        "another, or replace a model with --force\n"
    )
    assert (tmp_path / "taken").read_text() == "mine"


class _Reached(Exception):
    """Raised where the export would make its temporary directory: the checks passed."""


@pytest.mark.parametrize(
    "heads, need", [(None, 64), (4, 128), (1, None)], ids=["siso", "multihead", "mimo"]
)
def test_a_chunk_whose_prefill_tables_exceed_the_machine_is_refused(
    tmp_path, monkeypatch, heads, need
):
    """The kernel-path layers' Toeplitz tables, n_layers × H × (Q·M)² float32 bytes (SISO:
    2 × 8 × Q² × 4 = 64 Q²; 4 heads of width 2: 2 × 4 × 4Q² × 4 = 128 Q²), against a machine
    of 50 Q² bytes. A MIMO layer (M² > N/2) takes the mode path, which has no such table."""
    Q = 2**14  # siso 16 GiB, multi-head 32 GiB, the machine 12.5 GiB
    net = _net(d_model=8, heads=heads, dt_min=1e-3, dt_max=1e-2)
    monkeypatch.setattr(exporter, "machine_bytes", lambda: 50 * Q * Q)

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr(exporter, "_prepare_out", reached)
    if need is None:
        with pytest.raises(_Reached):
            export_network(net, tmp_path / "m", chunk=Q, max_chunks=4)
        return
    with pytest.raises(ExportError) as e:
        export_network(net, tmp_path / "m", chunk=Q, max_chunks=4)
    assert str(e.value) == (
        f"--chunk {Q}: the prefill graph's Toeplitz tables take {need // 4}.0 GiB (heads × "
        "(chunk · head width)² float32 per layer), more than this machine's 12.5 GiB: use a "
        "smaller --chunk"
    )
    with pytest.raises(_Reached):  # the step graph alone has no table
        export_network(net, tmp_path / "m", chunk=Q, max_chunks=4, prefill=False)
