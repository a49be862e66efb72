"""What an export records about the graphs it wrote, each value recomputed from the files
(one-node graphs stand in for the converted ones: these tests hold the code around them)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from ssmstream.export import exporter
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.runtime.manifest import sha256_file


def tiny_net() -> SSMNetwork:
    torch.manual_seed(0)
    return SSMNetwork(SSMConfig(vocab_size=5, d_model=4, n_layers=1, d_state=2))


def test_each_graphs_sha256_bytes_and_nodes_are_those_of_its_file(graphs_without_torch, tmp_path):
    out = exporter.export_network(
        tiny_net(), tmp_path / "m", verify=False, chunk=8, max_chunks=5, dt_scale=0.5
    )
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["graphs"]) == ["prefill", "step"]
    for name, g in m["graphs"].items():
        f = out / f"{name}.onnx"
        assert g["file"] == f.name
        assert g["sha256"] == sha256_file(f)
        assert g["bytes"] == len(f.read_bytes())
        assert g["nodes"] == len(onnx.load(f).graph.node)
    assert (m["graphs"]["prefill"]["chunk"], m["graphs"]["prefill"]["max_len"]) == (8, 40)
    assert m["dt_scale"] == 0.5


def test_the_manifest_inside_each_graph_is_manifest_json_less_what_varies(
    graphs_without_torch, tmp_path
):
    """Each graph carries manifest.json without the time, the checkpoint's directory and the
    graphs' own sha256 / bytes / nodes; everything else (the weights' sha256 too) is there."""
    source = {"checkpoint": str(tmp_path / "ckpt"), "weights_sha256": "ab12"}
    out = exporter.export_network(tiny_net(), tmp_path / "m", verify=False, source=source)
    m = json.loads((out / "manifest.json").read_text())
    want = json.loads(json.dumps(m))
    del want["created"], want["source"]["checkpoint"]
    for g in want["graphs"].values():
        del g["sha256"], g["bytes"], g["nodes"]
    for name in ("step", "prefill"):
        props = {p.key: p.value for p in onnx.load(out / f"{name}.onnx").metadata_props}
        assert json.loads(props["ssmstream.manifest"]) == want


@pytest.mark.parametrize("verify", [False, True])
def test_the_networks_training_modes_are_left_as_they_were(
    graphs_without_torch, tmp_path, monkeypatch, verify
):
    """The export runs the network in eval mode and gives each module its own mode back
    afterwards (a network in training, one layer frozen in eval), also when it fails."""
    net = tiny_net().train()
    frozen = net.ssms[0]
    frozen.eval()
    before = {name: m.training for name, m in net.named_modules()}
    assert True in before.values() and False in before.values()
    seen = []

    def verify_graphs(model_dir, manifest, net, **kw):
        seen.append(any(m.training for m in net.modules()))
        return {"passed": False}

    monkeypatch.setattr("ssmstream.export.verify.verify_graphs", verify_graphs)
    if verify:
        with pytest.raises(exporter.ExportFailed):
            exporter.export_network(net, tmp_path / "m", verify=True)
        assert seen == [False]
    else:
        exporter.export_network(net, tmp_path / "m", verify=False)
    assert {name: m.training for name, m in net.named_modules()} == before


def test_info_json_prints_manifest_json_as_the_export_wrote_it(
    graphs_without_torch, tmp_path, capsys
):
    """`ssmstream info --json` prints the raw manifest.json: for an exported model, the
    file's text itself (indented, in its own key order)."""
    from ssmstream.runtime import info

    out = exporter.export_network(tiny_net(), tmp_path / "m", verify=False)
    assert info.main([str(out), "--json"]) == 0
    assert capsys.readouterr().out == (out / "manifest.json").read_text()


def test_an_out_name_too_long_in_parents_still_to_make_says_so_and_leaves_nothing(
    graphs_without_torch, tmp_path
):
    """--out new/dirs/NAME whose temporary sibling's name is too long: the export made
    new/dirs for it, then failed. The error says the name is too long (not that new/dirs
    cannot be written), and no directory it made is left."""
    out = tmp_path / "new" / "dirs" / ("m" * 250)
    with pytest.raises(exporter.ExportError, match=r"the name is too long: .* \(264 characters"):
        exporter.export_network(tiny_net(), out, verify=False)
    assert list(tmp_path.iterdir()) == []
