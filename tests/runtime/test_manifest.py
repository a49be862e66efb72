"""load_manifest: malformed manifests are ModelErrors naming what is wrong.

A minimal manifest is written by hand (load_manifest checks fields and graph files only)."""

from __future__ import annotations

import hashlib
import json
import re

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


def test_the_hand_written_manifest_loads(tmp_path):
    assert load_manifest(_model(tmp_path))["graphs"]["prefill"]["max_len"] == 16


def test_a_manifest_json_that_is_missing_or_a_directory_is_said_as_such(tmp_path):
    d = tmp_path / "m"
    with pytest.raises(ModelError, match=rf"^{re.escape(str(d))} does not exist$"):
        load_manifest(d)  # a mistyped directory: said as the export says it
    d.mkdir()
    with pytest.raises(ModelError, match=r"manifest\.json is missing: not an exported ssmstream"):
        load_manifest(d)
    (d / "manifest.json").mkdir()
    with pytest.raises(ModelError, match=r"manifest\.json is not a regular file: not an export"):
        load_manifest(d)


def test_a_graph_file_that_is_missing_or_a_directory_is_said_as_such(tmp_path):
    d = _model(tmp_path)
    (d / "step.onnx").unlink()
    with pytest.raises(ModelError, match=r"step\.onnx \(step graph\) is missing$"):
        load_manifest(d)
    (d / "step.onnx").mkdir()
    with pytest.raises(ModelError, match=r"step\.onnx \(step graph\) is not a regular file$"):
        load_manifest(d)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": ' + "1" * 5000 + "}"],
    ids=["deep", "long-int"],
)
def test_json_that_python_refuses_in_other_ways_is_not_valid_json(tmp_path, text):
    """Deep nesting (RecursionError) and an int of more than 4,300 digits (a plain
    ValueError) had escaped load_manifest instead of ModelError naming the file."""
    d = _model(tmp_path)
    (d / "manifest.json").write_text(text)
    with pytest.raises(ModelError, match=r"manifest\.json is not valid JSON"):
        load_manifest(d)


def test_a_manifest_that_is_not_utf8_is_not_valid_json(tmp_path):
    d = _model(tmp_path)
    (d / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(ModelError, match=r"manifest\.json is not valid JSON"):
        load_manifest(d)


@pytest.mark.parametrize("doc", ["[1, 2]", '"ssmstream-model"', "3"])
def test_a_manifest_that_is_not_an_object_is_not_a_manifest(tmp_path, doc):
    d = _model(tmp_path)
    (d / "manifest.json").write_text(doc)
    with pytest.raises(ModelError, match=r"manifest\.json is not an ssmstream model manifest"):
        load_manifest(d)


@pytest.mark.parametrize("offset", [None, "0", 1.5, True])
def test_a_state_layout_entry_without_an_integer_offset_is_refused(tmp_path, offset):
    def change(m):
        m["state_layout"][0]["offset"] = offset

    with pytest.raises(ModelError, match=r"manifest\.json: state_layout must be a list"):
        load_manifest(_model(tmp_path, change))


@pytest.mark.parametrize("shape", [None, "2x2x2", [2, 0, 2], [2, 2.0, 2]])
def test_a_state_layout_entry_without_a_shape_of_positive_integers_is_refused(tmp_path, shape):
    def change(m):
        if shape is None:
            del m["state_layout"][0]["shape"]
        else:
            m["state_layout"][0]["shape"] = shape

    with pytest.raises(ModelError, match=r"manifest\.json: state_layout must be a list"):
        load_manifest(_model(tmp_path, change))


@pytest.mark.parametrize("dtype", ["fp64", "", None, 32])
def test_a_dtype_no_export_writes_is_refused_naming_it(tmp_path, dtype):
    with pytest.raises(ModelError, match=rf"dtype must be one of .*, got {re.escape(repr(dtype))}"):
        load_manifest(_model(tmp_path, lambda m: m.update(dtype=dtype)))


@pytest.mark.parametrize("file", ["../m/step.onnx", "/etc/passwd", "sub/step.onnx", "..", ""])
def test_a_graph_file_outside_the_model_directory_is_refused(tmp_path, file):
    """A manifest names its graphs by file name: a path could make a server read (and feed
    onnxruntime) any file the process can."""

    def change(m):
        m["graphs"]["step"]["file"] = file

    with pytest.raises(ModelError, match=r"graphs\.step\.file must name a file in the model dir"):
        load_manifest(_model(tmp_path, change), check_sha=False)


@pytest.mark.parametrize("max_len", [0, -4, "16", 2.0])
def test_a_prefill_max_len_that_is_not_a_positive_integer_is_refused_naming_it(tmp_path, max_len):
    def change(m):
        m["graphs"]["prefill"]["max_len"] = max_len

    with pytest.raises(ModelError) as e:
        load_manifest(_model(tmp_path, change))
    assert f"graphs.prefill.max_len must be a positive integer, got {max_len!r}" in str(e.value)


def test_a_manifest_missing_required_fields_names_them(tmp_path):
    def change(m):
        del m["name"], m["dtype"]

    with pytest.raises(ModelError, match=r"manifest\.json: missing fields \['name', 'dtype'\]"):
        load_manifest(_model(tmp_path, change))


@pytest.mark.parametrize(
    "name, why",
    [
        ("bad\udcffname", "is not valid UTF-8"),  # a non-UTF-8 dir name: INTERNAL on GetModelInfo
        ("two\nlines", "holds a control character or line break"),  # forged log lines
        ("two\u2028lines", "holds a control character or line break"),
        ("", "must be a non-empty string"),
        (7, "must be a non-empty string"),
    ],
)
def test_a_manifest_whose_name_cannot_be_shown_is_refused(tmp_path, name, why):
    def change(m):
        m["name"] = name

    with pytest.raises(ModelError, match=rf"manifest\.json: name {why}"):
        load_manifest(_model(tmp_path, change))


def test_info_shows_the_tolerances_with_their_digits(tmp_path):
    """int8's tolerances (0.05, 0.15) as they are: `.0e` showed 0.15 as "1e-01"."""
    from ssmstream.runtime.manifest import format_manifest

    def change(m):
        m["parity"] = {
            "passed": True,
            "tolerance": {"step_vs_torch": 0.05, "prefill_vs_step": 0.15},
            "step_vs_torch": {"max_rel": 0.01, "length": 64},
            "prefill_vs_step": {"max_rel_output": 0.12, "max_rel_state": 0.02},
        }

    d = _model(tmp_path, change)
    text = format_manifest(load_manifest(d), d)
    assert "max rel 1.00e-02 (tol 0.05) over 64 steps" in text
    assert "max rel 1.20e-01 (tol 0.15)" in text


@pytest.mark.parametrize(
    "model, said",
    [
        ({"n_layers": 1, "discretization": "gbt", "alpha": 0.3}, "1 layer, d_model 8, "),
        ({"n_layers": 1, "discretization": "gbt", "alpha": 0.3}, ", gbt α=0.3, s4d-lin"),
        ({"n_layers": 2, "discretization": "zoh", "alpha": 0.3}, "2 layers, d_model 8, "),
        ({"n_layers": 2, "discretization": "zoh", "alpha": 0.3}, ", zoh, s4d-lin"),
    ],
)
def test_info_says_layer_counts_and_gbt_s_alpha(tmp_path, model, said):
    """`ssmstream info` says "1 layer" (not "1 layers") and a gbt network's α, which sets its
    discretization (the others have no α: one given is unused and not shown)."""
    from ssmstream.runtime.manifest import format_manifest

    base = {"d_model": 8, "d_state": 4, "heads": None, "init": "s4d-lin"}
    d = _model(tmp_path, lambda m: m.update(model={**base, **model}))
    (row,) = [ln for ln in format_manifest(load_manifest(d), d).splitlines() if "d_model" in ln]
    assert said in row, row


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", None),
        ("source", None),
        ("exporter", None),
        ("parity", {"passed": True, "step_vs_torch": {"max_rel": 1e-5}}),  # no "length"
        ("parity", {"passed": False, "prefill_vs_step": {"max_rel_output": "x"}}),
        ("graphs", "bytes"),  # graphs.step.bytes: "big"
        ("parity", {"passed": []}),  # unhashable
        ("parity", {"passed": 1}),
    ],
)
def test_info_shows_hand_edited_fields_without_a_traceback(tmp_path, field, value):
    """`ssmstream info` of a manifest the loader accepts (these fields are free-form) prints
    its table; a field of another type shows as empty, not an AttributeError / KeyError."""
    from ssmstream.runtime.manifest import format_manifest

    def change(m):
        if field == "graphs":
            m["graphs"]["step"][value] = "big"
        else:
            m[field] = value

    d = _model(tmp_path, change)
    text = format_manifest(load_manifest(d), d)
    assert text.splitlines()[0].split() == ["name", "m"]
    assert "graph step" in text and "graph prefill" in text
    if field == "parity":
        passed = value["passed"]
        verdict = ("passed" if passed else "FAILED") if isinstance(passed, bool) else "unknown"
        assert any(line.split() == ["parity", verdict] for line in text.splitlines())


def test_a_model_dir_whose_name_is_too_long_is_a_model_error(tmp_path):
    # Path.is_file raises ENAMETOOLONG: `info`, `verify`, `bench` had ended in a traceback
    with pytest.raises(ModelError, match=r"manifest\.json cannot be read: File name too long"):
        load_manifest(tmp_path / ("m" * 300))


@pytest.mark.parametrize(
    "name",
    ["my model", "模型", "café", "family👨\u200d👩\u200d👧", "نیم\u200cفاصله", "model\u00a0v2",
     "model\u3000v2", "soft\u00adhyphen"],
)  # fmt: skip
def test_names_of_any_script_and_emoji_load(tmp_path, name):
    # joiners, no-break and ideographic spaces are not control characters: models exported
    # with such names before names were checked load as they did
    def change(m):
        m["name"] = name

    assert load_manifest(_model(tmp_path, change))["name"] == name


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
    with caplog.at_level("WARNING", logger="ssmstream.runtime.secret_files"):
        SnapshotKey.from_file(path)
    assert f"is readable or writable by other users (mode {mode:o})" in caplog.text
