"""`ssmstream train` refuses a model whose parameters cannot fit in the machine's memory,
before a module is built (an --n-layers of 2**70 built layers until the machine ran out).

Independent references: the parameter count from the config is compared with the numel of
the parameters of networks actually built; the machine's memory with /proc/meminfo's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.model import train as train_mod
from ssmstream.model.train import check_fits, main

CONFIGS = [
    dict(vocab_size=11, d_model=8, n_layers=1, d_state=8),  # SISO (heads = D), GLU
    dict(vocab_size=256, d_model=12, n_layers=2, d_state=6, heads=3),
    dict(d_input=3, d_output=2, d_model=6, n_layers=3, d_state=4, heads=2, glu=False),
    dict(d_input=1, d_model=4, n_layers=2, d_state=2, heads=1),  # MIMO
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_n_parameters_is_what_the_built_network_holds(kwargs):
    cfg = SSMConfig(**kwargs)
    assert cfg.n_parameters == sum(p.numel() for p in SSMNetwork(cfg).parameters())


def test_a_model_fits_up_to_the_last_byte_of_the_machine(monkeypatch):
    """CPU: four float32 copies (weights, gradients, AdamW's two moments); CUDA: the one
    copy built in host memory first. Memory not known: not checked."""
    cfg = SSMConfig(**CONFIGS[0])
    need = 16 * cfg.n_parameters
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: need)
    check_fits(cfg, torch.device("cpu"))
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: need - 1)
    with pytest.raises(ValueError, match=r"^not enough memory: a model of 571 parameters "):
        check_fits(cfg, torch.device("cpu"))
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: need // 4)
    check_fits(cfg, torch.device("cuda"))
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: need // 4 - 1)
    with pytest.raises(ValueError, match="^not enough memory"):
        check_fits(cfg, torch.device("cuda"))
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: None)
    check_fits(SSMConfig(vocab_size=11, d_model=8, n_layers=2**70, d_state=8), torch.device("cpu"))


def test_cli_refuses_a_model_too_large_before_building_it(tmp_path, monkeypatch, capsys):
    """Each size passes its own check; together they need more than is available: status 2,
    one line naming the flags, no module built and nothing written."""

    def no_network(*args, **kwargs):
        raise AssertionError("the network was built")

    monkeypatch.setattr(train_mod, "SSMNetwork", no_network)
    monkeypatch.setattr(train_mod, "machine_bytes", lambda: 2**20)
    argv = ["--task", "signal", "--steps", "1", "--warmup-steps", "0", "--d-model", "64"]
    argv += ["--n-layers", "20", "--d-state", "8", "--no-progress", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv) == 2
    n = SSMConfig(d_input=1, d_model=64, n_layers=20, d_state=8).n_parameters
    assert capsys.readouterr().err == (
        f"ssmstream train: error: not enough memory: a model of {n:,} parameters needs about "
        f"{16 * n / 2**30:,.1f} GiB to train, more than this machine's 0.0 GiB: use a smaller "
        "--d-model, --n-layers or --d-state\n"
    )
    assert not (tmp_path / "o").exists()


def test_machine_bytes_is_the_memory_proc_meminfo_reports():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    kib = next(
        int(x.split()[1]) for x in meminfo.read_text().splitlines() if x.startswith("MemTotal:")
    )
    assert abs(train_mod.machine_bytes() - kib * 1024) < 2**16  # the same, to a page or so


@pytest.mark.parametrize(
    "flags",
    [
        {"--d-model": 10**200},  # GiB past what a float holds
        {"--n-layers": 10**400},
        {"--d-model": 10**2200, "--n-layers": 10**2200},  # a count past 4,300 digits
    ],
    ids=["d-model", "n-layers", "both"],
)
def test_cli_refuses_a_model_of_sizes_too_large_to_print(tmp_path, capsys, flags):
    """Sizes whose parameter count no float holds (or str() prints) are refused as the
    others are: status 2, the count as a power of ten, the flags named."""
    argv = ["--task", "signal", "--steps", "1", "--warmup-steps", "0", "--d-state", "2"]
    argv += ["--no-progress", "--out", str(tmp_path / "o")]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    kw = {"d_model": 128, "n_layers": 4} | {k[2:].replace("-", "_"): v for k, v in flags.items()}
    n = SSMConfig(d_input=1, d_state=2, **kw).n_parameters
    digits = len(str(n // 10**4000)) + 4000 if n > 10**4000 else len(str(n))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ssmstream train: error: not enough memory: a model of 10^{digits - 1} ")
    assert err.endswith(" GiB: use a smaller --d-model, --n-layers or --d-state\n")
    assert not (tmp_path / "o").exists()
