"""An export that is stopped or whose checkpoint changes under it: SIGTERM or Ctrl-C at any
moment ends it with 128 + the signal and removes its temporary directory (a signal while the
finished model is renamed into place lets the renames finish), and the manifest's
weights_sha256 is that of the weights the graphs were made from, also when a training run
saves into the checkpoint meanwhile."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from export_helpers import EXPORT, TOKEN
from ssmstream.export import cli, exporter
from ssmstream.export.exporter import ExportError
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint


# The token export takes ~13 s here (~11 s after its temporary directory appears): the
# signal lands as its writing starts, in the torch export of the graphs (imports, C++
# callbacks: where a raising handler aborted the process or had its exception swallowed) and
# later. SIGINT is set to its default in the child: a test run as a background job of a
# non-interactive shell inherits it ignored, and the export leaves an ignored SIGINT alone.
@pytest.mark.parametrize("sig, delay", [(signal.SIGTERM, 0.0), (signal.SIGINT, 1.0),
                                        (signal.SIGTERM, 2.5)])  # fmt: skip
def test_a_signal_during_export_leaves_no_temporary_directory(token_ckpt, tmp_path, sig, delay):
    work = tmp_path / "w"
    work.mkdir()
    cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "export", str(token_ckpt),
           "--out", str(work / "model"), "-q"]  # fmt: skip
    sigint_default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=sigint_default)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob(".model.*.tmp")):  # the export has started writing
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"export ended before its temporary directory appeared: {p.returncode}")
            time.sleep(0.02)
        time.sleep(delay)
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + sig, err
    assert err.endswith(f"ssmstream export: stopped by {sig.name}; nothing written\n"), err
    assert sorted(x.name for x in work.iterdir()) == []


def test_abandon_removes_the_directories_of_exports_under_way(tmp_path, monkeypatch):
    seen = []

    def stopped(net, cfg, out):  # a handler that ends the process runs mid-export
        seen.append((out.is_dir(), exporter.abandon_exports(), out.exists()))
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "build_graphs", stopped)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_network(SSMNetwork(SSMConfig(**TOKEN)), tmp_path / "m", verify=False)
    assert seen == [(True, 1, False)] and list(tmp_path.iterdir()) == []
    assert exporter._underway.dirs == {}


def test_a_signal_while_the_model_is_renamed_into_place_lets_the_renames_finish(
    tmp_path, monkeypatch
):
    """abandon_exports refuses during the renames, so the handler defers the exit; the
    context exits with 128 + the signal after them, the new model in place, the old one gone."""
    out, tmp = tmp_path / "model", tmp_path / ".model.x.tmp"
    out.mkdir()
    (out / "old").touch()
    tmp.mkdir()
    (tmp / "new").touch()
    real, calls, before = exporter.os.replace, [], signal.getsignal(signal.SIGTERM)

    def replace(src, dst):
        calls.append(exporter.abandon_exports())
        if len(calls) == 1:  # between the old model moved aside and the new one moved in
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, in this thread: it must defer
        real(src, dst)

    monkeypatch.setattr(exporter.os, "replace", replace)
    with pytest.raises(SystemExit) as e, cli._signals_end_the_export():
        exporter._commit(tmp, out)
    assert e.value.code == 128 + signal.SIGTERM and calls == [None, None]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]
    assert sorted(x.name for x in out.iterdir()) == ["new"]
    assert signal.getsignal(signal.SIGTERM) is before and exporter.abandon_exports() == 0


def test_a_signal_after_the_rename_does_not_claim_nothing_was_written(
    tmp_path, monkeypatch, graphs_without_torch
):
    """A signal right after the new model was renamed into place (before export_network
    returned): the model is complete, so the handler says only "stopped by", not
    "nothing written" — the temporary directory is off the list as it is renamed."""
    real, said = exporter._commit, []

    def commit(tmp, out):
        real(tmp, out)
        said.append(exporter.abandon_exports())  # what the handler would learn now

    monkeypatch.setattr(exporter, "_commit", commit)
    net = SSMNetwork(SSMConfig(**TOKEN))
    out = exporter.export_network(net, tmp_path / "m", verify=False, **EXPORT)
    assert said == [0] and (out / "manifest.json").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _saving_trainer(monkeypatch, ckpt, saves: int):
    """load_checkpoint, after which a trainer saves new weights into `ckpt` (the first
    `saves` loads). Returns the list of the weights' sha256 each load saw."""
    real, seen = exporter.load_checkpoint, []

    def load(path):
        net = real(path)
        seen.append(_sha(ckpt / "model.safetensors"))
        if len(seen) <= saves:
            torch.manual_seed(100 + len(seen))
            save_checkpoint(SSMNetwork(SSMConfig(**TOKEN)), path)
        return net

    monkeypatch.setattr(exporter, "load_checkpoint", load)
    return seen


def test_weights_saved_during_the_load_are_loaded_again(
    token_ckpt, tmp_path, monkeypatch, graphs_without_torch
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    seen = _saving_trainer(monkeypatch, ckpt, saves=1)
    out = exporter.export_model(ckpt, tmp_path / "model", verify=False, **EXPORT)
    recorded = json.loads((out / "manifest.json").read_text())["source"]["weights_sha256"]
    assert len(seen) == 2 and seen[0] != seen[1]
    assert recorded == seen[1] == _sha(ckpt / "model.safetensors")


def test_weights_that_keep_changing_are_refused(token_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    seen = _saving_trainer(monkeypatch, ckpt, saves=3)
    with pytest.raises(ExportError, match=r"changed while it was read, three times"):
        exporter.export_model(ckpt, tmp_path / "model", verify=False, **EXPORT)
    assert len(seen) == 3 and not (tmp_path / "model").exists()


def test_a_signal_ignored_when_the_export_starts_stays_ignored(monkeypatch):
    """`ssmstream export … &` in a script starts with SIGINT ignored: Ctrl-C at the terminal
    is not for it, so the export does not take SIGINT over (SIGTERM it does)."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with cli._signals_end_the_export():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_leftovers_of_a_killed_export_are_named_and_left_alone(
    tmp_path, caplog, graphs_without_torch
):
    """SIGKILL leaves the temporary directory behind (no handler runs): the next export into
    the same --out names it in a warning and leaves it (another export may be writing it); a
    sibling model's leftovers are not named."""
    for name in (".m.deadbeef.tmp", ".m.x1_y2z3w.old", ".m.v2.0badf00d.tmp", ".m.cafe.tmp"):
        (tmp_path / name).mkdir()
    net = SSMNetwork(SSMConfig(**TOKEN))
    with caplog.at_level("WARNING", logger="ssmstream"):
        exporter.export_network(net, tmp_path / "m", verify=False, **EXPORT)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(".m.deadbeef.tmp, .m.x1_y2z3w.old beside m: left by an export")
    assert {x.name for x in tmp_path.iterdir()} == {
        "m",
        ".m.deadbeef.tmp",
        ".m.x1_y2z3w.old",
        ".m.v2.0badf00d.tmp",
        ".m.cafe.tmp",
    }
    caplog.clear()
    exporter.export_network(net, tmp_path / "fresh", verify=False, **EXPORT)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
