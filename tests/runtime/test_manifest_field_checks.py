"""load_manifest names each required field that a manifest lacks, one at a time (a field
read later without the check would be a KeyError, not a ModelError naming it)."""

from __future__ import annotations

import json

import pytest
from ssmstream.runtime.errors import ModelError
from ssmstream.runtime.manifest import load_manifest
from test_manifest import _model


@pytest.mark.parametrize(
    "field", ["name", "input_kind", "d_output", "state_size", "state_layout", "dtype", "graphs"]
)
def test_a_manifest_without_one_required_field_names_it(tmp_path, field):
    d = _model(tmp_path, lambda m: m.pop(field))
    assert field not in json.loads((d / "manifest.json").read_text())
    with pytest.raises(ModelError, match=rf"manifest\.json: missing fields \['{field}'\]$"):
        load_manifest(d)


@pytest.mark.parametrize("layer", [None, "0", 1.5, True, "missing"])
def test_a_state_layout_entry_without_an_integer_layer_is_refused(tmp_path, layer):
    """`ssmstream info` shows each entry's layer: one without an integer layer would show as
    a traceback (a missing key) or a wrong table, so load_manifest refuses it."""

    def change(m):
        if layer == "missing":
            del m["state_layout"][0]["layer"]
        else:
            m["state_layout"][0]["layer"] = layer

    with pytest.raises(ModelError, match=r"manifest\.json: state_layout must be a list"):
        load_manifest(_model(tmp_path, change))


@pytest.mark.parametrize(
    "size, shown", [(1023, "1023 B"), (1024, "1.0 KB"), (1536, "1.5 KB"), (1 << 20, "1.0 MB")]
)
def test_info_shows_a_graphs_size_in_the_largest_unit_it_reaches(tmp_path, size, shown):
    """1024 bytes are 1.0 KB (not "1024 B"): each unit starts at 1024 of the one below."""
    from ssmstream.runtime.manifest import format_manifest

    d = _model(tmp_path)
    m = load_manifest(d)
    m["graphs"]["step"]["bytes"] = size
    (row,) = [r for r in format_manifest(m, d).splitlines() if r.startswith("graph step")]
    assert f"step.onnx: None nodes, {shown}, sha256 " in row


@pytest.mark.parametrize("output, state", [(1e-6, 3e-5), (3e-5, 1e-6)])
def test_info_shows_the_worse_of_the_prefills_output_and_state_errors(tmp_path, output, state):
    """The "prefill vs step" row is the worse of the two errors the check compared, whichever
    of them it is."""
    from ssmstream.runtime.manifest import format_manifest

    d = _model(tmp_path)
    m = load_manifest(d)
    m["parity"] = {
        "passed": True,
        "tolerance": {"prefill_vs_step": 1e-4},
        "prefill_vs_step": {"max_rel_output": output, "max_rel_state": state},
    }
    (row,) = [r for r in format_manifest(m, d).splitlines() if "prefill vs step" in r]
    assert row.split("prefill vs step")[1].strip() == "max rel 3.00e-05 (tol 0.0001)"


@pytest.mark.parametrize(
    "parity, verdict",
    [
        ({"passed": None, "skipped": "export ran with verify=False"}, "not run"),
        ({"passed": True}, "passed"),
        ({"passed": False}, "FAILED"),
        ({}, "not run"),
    ],
)
def test_info_says_whether_the_parity_check_ran_and_passed(tmp_path, parity, verdict):
    """An export with verify=False records passed: null: shown as "not run", never as
    passed."""
    from ssmstream.runtime.manifest import format_manifest

    d = _model(tmp_path, lambda m: m.update(parity=parity))
    table = format_manifest(load_manifest(d), d).splitlines()
    (row,) = [r for r in table if r.startswith("parity")]
    assert row.split()[1:] == verdict.split()
