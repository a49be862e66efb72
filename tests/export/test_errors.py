"""Bad input to the exporter and to the model loader: a clear error, nothing half-written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from export_helpers import EXPORT
from ssmstream.export import ExportError, ExportFailed, export_model
from ssmstream.export import verify as verify_mod
from ssmstream.runtime.errors import ModelError
from ssmstream.runtime.manifest import load_manifest


def leftovers(parent) -> list[str]:
    """Anything the exporter may have left next to its output (temporary dirs)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def model_copy(token_model, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(token_model, dst)
    return dst


def test_tampered_graph_is_refused(model_copy):
    f = model_copy / "step.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"step\.onnx.*does not match the sha256"):
        load_manifest(model_copy)
    with pytest.raises(ModelError, match="sha256"):
        verify_mod.verify_model(model_copy)


def test_foreign_format_version_is_refused(model_copy):
    path = model_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(
        ModelError,
        match="format_version 99 is not supported .*exported by a "
        "newer ssmstream: upgrade this one$",
    ):  # not "re-export": no torch on edge
        load_manifest(model_copy)
    for v in (True, 1.0):  # equal to 1 in Python, not a version
        m["format_version"] = v
        path.write_text(json.dumps(m))
        with pytest.raises(ModelError, match=f"format_version {v!r} is not supported .*re-export"):
            load_manifest(model_copy)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ExportError, match=r"cannot export checkpoint .*nope.*does not exist"):
        export_model(tmp_path / "nope", tmp_path / "out", **EXPORT)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_checkpoint(token_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ExportError, match="model.safetensors is corrupt"):
        export_model(ckpt, tmp_path / "out", **EXPORT)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unwritable_out(token_ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"--out .*a_file/model: cannot write into") as e:
        export_model(token_ckpt, blocker / "model", **EXPORT)
    assert str(e.value).endswith(f"{blocker} is not a directory")  # not "File exists"
    with pytest.raises(ExportError, match=rf"{blocker} is not a directory$"):
        export_model(token_ckpt, blocker / "deeper" / "model", **EXPORT)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name, out, says",
    [
        ("bad\udcffname", "m", "--name: the model name is not valid UTF-8"),
        ("two\nlines", "m", "--name: the model name holds a control character or line break"),
        ("", "m", "--name: the model name must be a non-empty string"),
        (None, "v\udcffdir", "--out's name (give --name): 'v\\udcffdir': the model name is not"),
    ],
)
def test_a_model_name_that_cannot_be_shown_is_refused_before_any_work(
    token_ckpt, tmp_path, name, out, says
):
    with pytest.raises(ExportError) as e:
        export_model(token_ckpt, tmp_path / out, name=name, **EXPORT)
    assert says in str(e.value)
    assert leftovers(tmp_path) == []


def test_an_out_that_is_a_link_loop_is_an_export_error(token_ckpt, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for out in (tmp_path / "a", tmp_path / "a" / "sub"):
        with pytest.raises(ExportError, match=rf"^--out {out}: "):
            export_model(token_ckpt, out, **EXPORT)


def test_existing_out_needs_overwrite(token_ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_model(token_ckpt, tmp_path / "out", **EXPORT)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_a_model_and_never_the_checkpoint(
    token_ckpt, tmp_path, monkeypatch
):
    """overwrite (--force) replaces an exported model, nothing else: not a directory of the
    user's, not the checkpoint being exported (it was replaced by the model), and not a
    sibling the user happens to call .NAME.old; `--out .` works."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an exported model"):
        export_model(token_ckpt, tmp_path / "mine", overwrite=True, verify=False, **EXPORT)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(token_ckpt, ckpt)
    for out in (ckpt, tmp_path):  # the checkpoint itself, a directory holding it
        with pytest.raises(ExportError, match="holds the checkpoint"):
            export_model(ckpt, out, overwrite=True, verify=False, **EXPORT)
    assert (ckpt / "model.safetensors").is_file()
    model = export_model(ckpt, tmp_path / "model", verify=False, **EXPORT)
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "notes.txt").write_text("mine too")
    export_model(ckpt, model, overwrite=True, verify=False, **EXPORT)
    assert (tmp_path / ".model.old" / "notes.txt").read_text() == "mine too"
    monkeypatch.chdir(model)
    assert export_model(ckpt, ".", overwrite=True, verify=False, **EXPORT) == model
    assert load_manifest(model)["name"] == "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", "ckpt", "mine", "model"]


def test_overwrite_refuses_a_model_directory_that_also_holds_other_files(token_ckpt, tmp_path):
    """A model directory that a checkpoint was trained into (train refuses only a directory
    with a config.json), or that holds the user's notes: --force would delete them with the
    model. Refused naming them, every file kept; the model alone is replaced."""
    model = export_model(token_ckpt, tmp_path / "model", prefill=False, verify=False, **EXPORT)
    shutil.copy(token_ckpt / "model.safetensors", model / "model.safetensors")
    (model / "train_log.jsonl").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    named = r"holds more than an exported model \(model\.safetensors, train_log\.jsonl\)"
    with pytest.raises(ExportError, match=named) as e:
        export_model(token_ckpt, model, overwrite=True, verify=False, **EXPORT)
    assert "choose another --out" in str(e.value)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    for extra in ("model.safetensors", "train_log.jsonl"):
        (model / extra).unlink()
    export_model(token_ckpt, model, overwrite=True, verify=False, **EXPORT)  # prefill.onnx too
    assert sorted(p.name for p in model.iterdir()) == ["manifest.json", "prefill.onnx", "step.onnx"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="int4"), "unknown dtype 'int4'"),
        (dict(dt_scale=0.0), "dt_scale must be positive"),
        (dict(dt_scale=-2.0), "dt_scale must be positive"),
        (dict(dt_scale=math.nan), "dt_scale must be a finite number"),
        (dict(chunk=12), "chunk must be a power of two"),
        (dict(chunk=1), "chunk must be a power of two >= 2"),
        (dict(max_chunks=2), "max_chunks must be in"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, kwargs, message):
    # the checkpoint does not even exist: options are checked first
    with pytest.raises(ExportError, match=message):
        export_model(tmp_path / "no_ckpt", tmp_path / "out", **{**EXPORT, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_failing_parity_is_not_written(token_ckpt, token_model, tmp_path, monkeypatch):
    # an impossible tolerance: the (cached) conversion is fine, the verdict is "fail"
    impossible = {"step_vs_torch": 0.0, "prefill_vs_step": 0.0}
    monkeypatch.setitem(verify_mod.TOLERANCES, "fp32", impossible)
    with pytest.raises(ExportFailed, match="fail their parity check, model not written"):
        export_model(token_ckpt, tmp_path / "out", verify_steps=64, **EXPORT)  # CLI: status 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_verify_fails_a_graph_wrong_only_after_whole_chunks_and_a_padded_one(tmp_path, monkeypatch):
    """The parity check runs each way the runtime ends a prompt at any chunk, here 64:
    whole chunks then steps, a padded chunk alone, and whole chunks with a padded one in one
    call (a 150-input prompt). A graph whose state after such a call is wrong (its tail starts
    from S_0 instead of S_{n-1}) is not written (lengths 65, 199 and 35 had passed it)."""
    import torch
    from ssmstream.export import export_network, exporter
    from ssmstream.export.modules import PrefillSSM
    from ssmstream.model import SSMConfig, SSMNetwork

    forward = PrefillSSM.forward

    def wrong_tail(self, u, X0):
        y, S, tail = forward(self, u, X0)
        return y, S, (tail[0], S[:, 0], tail[2])  # kernel path: (inputs, S_{n-1}, G)

    monkeypatch.setattr(PrefillSSM, "forward", wrong_tail)
    monkeypatch.setattr(exporter, "_CONVERTED", type(exporter._CONVERTED)())  # no cached graph
    torch.manual_seed(7)
    net = SSMNetwork(SSMConfig(vocab_size=23, d_model=8, n_layers=2, d_state=4)).eval()
    assert not net.ssms[0].uses_mode_path
    with pytest.raises(ExportError, match="fail their parity check") as e:
        export_network(net, tmp_path / "out", chunk=64, max_chunks=3, verify_steps=192)
    report = json.loads(str(e.value).split("\n", 1)[1])["prefill_vs_step"]
    assert report["lengths"] == [192, 65, 2 * 64 + 16 + 1, 35] and not report["passed"]
    assert not (tmp_path / "out").exists()


def test_an_out_name_too_long_for_the_temporary_sibling_says_so(token_ckpt, tmp_path):
    """A directory name of 250 characters can exist, but the export first writes into
    `.NAME.<8 hex>.tmp` (14 more): refused saying the name is too long, not blaming the
    parent directory; nothing left behind."""
    out = tmp_path / ("m" * 250)
    with pytest.raises(ExportError, match=r"the name is too long: .* \(264 characters"):
        export_model(token_ckpt, out, verify=False, **EXPORT)
    assert list(tmp_path.iterdir()) == []
