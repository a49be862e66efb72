"""The `ssmstream export`, `ssmstream verify` and `ssmstream info` command lines."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat

import pytest
import torch
from export_helpers import EXPORT, TOKEN
from ssmstream.export import cli as export_cli
from ssmstream.export import verify_cli
from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.runtime import info
from ssmstream.runtime.cli import main as ssmstream_main
from ssmstream.runtime.manifest import load_manifest

CLI_EXPORT = ["--chunk", str(EXPORT["chunk"]), "--max-chunks", str(EXPORT["max_chunks"])]


def test_export_cli_writes_a_verified_model(token_ckpt, token_model, tmp_path, capsys):
    out = tmp_path / "cli_model"
    umask = os.umask(0o027)
    try:
        rc = export_cli.main(
            [str(token_ckpt), "--out", str(out), "--name", "cli", "-q", *CLI_EXPORT]
        )
    finally:
        os.umask(umask)
    assert rc == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the umask's, not mkdtemp's 0700
    m = load_manifest(out)
    assert m["name"] == "cli" and m["parity"]["passed"] and "prefill" in m["graphs"]
    # same network and options -> the same graphs as the fixture's export
    assert m["graphs"]["step"]["nodes"] == load_manifest(token_model)["graphs"]["step"]["nodes"]


def test_export_cli_errors(token_ckpt, tmp_path, capsys):
    # status 2 for a checkpoint that cannot be read, as info/verify/serve/plot (it was 1)
    assert export_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:  # argparse: --out is required
        export_cli.main([str(token_ckpt)])
    assert e.value.code == 2


def test_export_help_is_routed_by_the_main_command(capsys):
    with pytest.raises(SystemExit) as e:
        ssmstream_main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--dtype", "--dt-scale", "--no-prefill", "--name", "--chunk"):
        assert flag in out


def test_verify_cli_passes_and_reports(token_model, token_ckpt, capsys):
    assert verify_cli.main([str(token_model), "--ckpt", str(token_ckpt), "--steps", "512"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "step vs torch" in out and "prefill vs step" in out
    assert verify_cli.main([str(token_model), "--steps", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["step_vs_torch"]["max_rel"] < 1e-4


def test_verify_cli_fails_for_other_weights(token_model, tmp_path, capsys):
    torch.manual_seed(123)  # same config, different weights: the parity must fail
    other = save_checkpoint(SSMNetwork(SSMConfig(**TOKEN)).eval(), tmp_path / "other")
    assert verify_cli.main([str(token_model), "--ckpt", str(other), "--steps", "256"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_says_when_the_recorded_checkpoint_was_retrained(token_model, tmp_path, capsys):
    """The manifest's checkpoint directory holds other weights now (same config): that is
    exit 2 naming the checkpoint, not graphs FAILED."""
    shutil.copytree(token_model, tmp_path / "m")
    torch.manual_seed(5)
    retrained = save_checkpoint(SSMNetwork(SSMConfig(**TOKEN)).eval(), tmp_path / "ckpt")
    path = tmp_path / "m" / "manifest.json"
    m = json.loads(path.read_text())
    m["source"]["checkpoint"] = str(retrained)  # the export's weights_sha256 stays
    path.write_text(json.dumps(m))
    assert verify_cli.main([str(tmp_path / "m"), "--steps", "256"]) == 2
    assert "has other weights now" in capsys.readouterr().err


def test_verify_cli_errors(token_model, signal_ckpt, tmp_path, capsys):
    shutil.copytree(token_model, tmp_path / "m")
    (tmp_path / "m" / "prefill.onnx").write_bytes(b"garbage")
    assert verify_cli.main([str(tmp_path / "m")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert verify_cli.main([str(token_model), "--ckpt", str(signal_ckpt)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_info_prints_a_table(token_model, capsys):
    assert info.main([str(token_model)]) == 0
    out = capsys.readouterr().out
    m = load_manifest(token_model)
    assert f"S = {m['state_size']} float32" in out
    assert "graph step" in out and "graph prefill" in out and "parity" in out and "passed" in out
    assert out.count(" ok") >= 2  # both sha256 checked
    assert info.main([str(token_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == m["name"]


def test_info_errors_and_modified_graph(token_model, tmp_path, capsys):
    assert info.main([str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert info.main([str(tmp_path / "empty")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    shutil.copytree(token_model, tmp_path / "m")
    (tmp_path / "m" / "step.onnx").write_bytes(b"x")
    assert info.main([str(tmp_path / "m")]) == 0
    assert "MODIFIED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.update(graphs="step"), "graphs"),
        (lambda m: m.update(state_layout=[{}]), "state_layout"),
        (lambda m: m.update(state_size="8"), "state_size"),
        (lambda m: m.update(d_output=True), "d_output"),
        (lambda m: m.update(vocab_size=0), "vocab_size"),
        (lambda m: m["graphs"]["prefill"].pop("max_len"), "graphs.prefill"),
        (lambda m: m.update(parity=[]), "parity"),
    ],
)
def test_info_and_engine_refuse_a_malformed_manifest_naming_the_field(
    token_model, tmp_path, capsys, change, field
):
    """An edited manifest.json is an error naming the field (exit 2), not a traceback; the
    Engine refuses it the same way (one check, in load_manifest)."""
    from ssmstream.runtime.engine import Engine
    from ssmstream.runtime.errors import ModelError

    shutil.copytree(token_model, tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    assert info.main([str(tmp_path / "m")]) == 2
    assert f"manifest.json: {field}" in capsys.readouterr().err
    with pytest.raises(ModelError, match=f"manifest.json: {field}"):
        Engine(tmp_path / "m", device="cpu")


def test_info_shows_an_unknown_parity_verdict(token_model, tmp_path, capsys):
    shutil.copytree(token_model, tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    m = json.loads(path.read_text())
    m["parity"]["passed"] = "yes"
    path.write_text(json.dumps(m))
    assert info.main([str(tmp_path / "m")]) == 0
    assert re.search(r"^parity +unknown$", capsys.readouterr().out, re.M)


def test_onnxslim_log_says_which_graph_was_kept(monkeypatch, caplog):
    """A slimmed graph with fewer nodes but 10% more bytes is not kept, and the log says so."""
    import onnx
    import onnxslim
    from onnx import TensorProto, helper
    from ssmstream.export.exporter import slim

    def graph(n_nodes: int, pad: int) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n_nodes)]
        nodes[0].input[0] = "x"
        y = helper.make_tensor_value_info(f"t{n_nodes}", TensorProto.FLOAT, [1])
        g = helper.make_graph(nodes, "g", [x], [y])
        g.doc_string = "p" * pad
        return helper.make_model(g)

    original, bigger = graph(4, 0), graph(2, 4000)
    monkeypatch.setattr(onnxslim, "slim", lambda m: bigger)
    with caplog.at_level(logging.INFO, logger="ssmstream.export.exporter"):
        assert slim(original) is original
    assert "nodes 4 -> 2" in caplog.text and "kept the original graph" in caplog.text
    smaller = graph(2, 0)
    monkeypatch.setattr(onnxslim, "slim", lambda m: smaller)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ssmstream.export.exporter"):
        assert slim(original) is smaller
    assert "kept the slimmed graph" in caplog.text


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--dtype", "bf8"], "argument --dtype: invalid choice: 'bf8'"),
        (["--chunk", "0"], "argument --chunk: chunk must be a power of two >= 2, got 0"),
        (["--max-chunks", "2"], "argument --max-chunks: max_chunks must be in [3, 256], got 2"),
        (["--dt-scale", "-1"], "argument --dt-scale: dt_scale must be positive, got -1.0"),
        (["--dt-scale", "nan"], "argument --dt-scale: dt_scale must be a finite number"),
        (["--verify-steps", "0"], "argument --verify-steps: verify_steps must be positive"),
        (["--name="], "argument --name: the model name must be a non-empty string"),
        (["--name", "a\tb"], "argument --name: the model name holds a control character"),
    ],
)
def test_a_bad_flag_value_is_a_usage_error_naming_it(tmp_path, capsys, flags, says):
    # status 2 with the usage, as argparse's own refusals; before the checkpoint is read
    with pytest.raises(SystemExit) as e:
        export_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ssmstream export") and says in err
    assert "does not exist" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "error, status", [("ExportError", 2), ("ExportFailed", 1)]
)  # fmt: skip
def test_an_export_that_ran_and_failed_exits_1_one_that_could_not_run_2(
    tmp_path, capsys, monkeypatch, error, status
):
    import ssmstream.export.exporter as exporter

    def fail(*a, **k):
        raise getattr(exporter, error)("why")

    monkeypatch.setattr(exporter, "export_model", fail)
    assert export_cli.main([str(tmp_path / "ck"), "--out", str(tmp_path / "o"), "-q"]) == status
    assert capsys.readouterr().err == "ssmstream export: error: why\n"


def test_a_checkpoint_file_it_cannot_read_is_status_2_naming_it(
    token_ckpt, tmp_path, capsys, monkeypatch
):
    # a PermissionError reading the weights had been status 1, as a failed export
    import ssmstream.export.exporter as exporter

    weights = token_ckpt / "model.safetensors"

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(exporter, "sha256_file", unreadable)
    assert export_cli.main([str(token_ckpt), "--out", str(tmp_path / "o"), "-q"]) == 2
    said = capsys.readouterr().err
    assert (
        said
        == f"ssmstream export: error: cannot read checkpoint file {weights}: Permission denied\n"
    )
    assert not (tmp_path / "o").exists()


def test_a_full_disk_during_the_export_is_one_line(tmp_path, capsys, monkeypatch):
    # onnx.save's OSError (ENOSPC, EFBIG) had ended the command in a traceback
    import ssmstream.export.exporter as exporter

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "export_model", full)
    rc = export_cli.main([str(tmp_path / "ck"), "--out", str(tmp_path / "o"), "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err == f"ssmstream export: error: {tmp_path / 'o'}: No space left on device\n"
