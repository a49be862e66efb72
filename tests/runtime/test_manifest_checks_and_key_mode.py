"""manifest checks that no test exercised, and the key-file permission warning for a
group-readable key (the docstring of from_file's caller says "group or others")."""

from __future__ import annotations

import hashlib
import json

import pytest
from ssmstream.runtime.errors import ModelError
from ssmstream.runtime.manifest import load_manifest
from ssmstream.runtime.snapshots import SnapshotKey


def _model(tmp_path, change=lambda m: None):
    d = tmp_path / "m"
    d.mkdir()
    for name in ("step.onnx", "prefill.onnx"):
        (d / name).write_bytes(name.encode())
    sha = {n: hashlib.sha256(n.encode()).hexdigest() for n in ("step.onnx", "prefill.onnx")}
    m = {
        "format": "ssmstream-model",
        "format_version": 1,
        "name": "m",
        "input_kind": "tokens",
        "vocab_size": 11,
        "d_input": None,
        "d_output": 11,
        "state_size": 8,
        "state_layout": [{"layer": 0, "offset": 0, "shape": [2, 2, 2], "size": 8}],
        "dtype": "fp32",
        "graphs": {
            "step": {"file": "step.onnx", "sha256": sha["step.onnx"]},
            "prefill": {
                "file": "prefill.onnx",
                "sha256": sha["prefill.onnx"],
                "chunk": 4,
                "max_len": 16,
            },
        },
    }
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("drop", ["chunk", "max_len"])
def test_a_prefill_graph_with_only_one_of_chunk_and_max_len_is_refused(tmp_path, drop):
    d = _model(tmp_path, lambda m: m["graphs"]["prefill"].pop(drop))
    with pytest.raises(ModelError, match="graphs.prefill needs both 'chunk' and 'max_len'"):
        load_manifest(d)


@pytest.mark.parametrize("parity", [[1], "passed", 3])
def test_a_parity_that_is_not_an_object_is_refused(tmp_path, parity):
    d = _model(tmp_path, lambda m: m.update(parity=parity))
    with pytest.raises(ModelError, match="parity must be an object"):
        load_manifest(d)


@pytest.mark.parametrize("sep", ["\n", "\u2028", "\u2029", "\x85"])
def test_a_name_with_a_line_break_is_refused(tmp_path, sep):
    d = _model(tmp_path, lambda m: m.update(name=f"m{sep}forged log line"))
    with pytest.raises(ModelError, match="name holds a control character or line break"):
        load_manifest(d)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_key_file_readable_or_writable_by_group_or_others_warns(tmp_path, caplog, mode):
    path = tmp_path / "k.key"
    path.write_bytes(b"x" * 32)
    path.chmod(mode)
    with caplog.at_level("WARNING", logger="ssmstream.runtime.snapshots"):
        SnapshotKey.from_file(path)
    assert f"is readable by other users (mode {mode:o})" in caplog.text
