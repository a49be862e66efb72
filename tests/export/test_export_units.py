"""The export package's own logic, without a real export: ExportConfig bounds, the output
directory, manifest fields, the conversion cache, the int8 and onnxslim paths, verify's
report (against a fake Engine) and the CLI's flag mapping.

The expensive parts (torch.onnx conversion, quantization, the Engine) are replaced by stubs
where a test is about the code around them; tests/export/test_export.py runs the real thing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from ssmstream.export import ExportError, exporter, verify_cli
from ssmstream.export import cli as export_cli
from ssmstream.export import verify as verify_mod
from ssmstream.export.exporter import ExportConfig
from ssmstream.model import CheckpointError, SSMConfig, SSMNetwork, save_checkpoint
from ssmstream.runtime.manifest import sha256_file


def tiny_net(seed=0, **kw) -> SSMNetwork:
    torch.manual_seed(seed)
    return SSMNetwork(
        SSMConfig(**{"vocab_size": 5, "d_model": 4, "n_layers": 1, "d_state": 2, **kw})
    )


def identity_model(pad: int = 0, n_nodes: int = 1) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    nodes = [
        helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n_nodes)
    ]
    nodes[0].input[0] = "x"
    y = helper.make_tensor_value_info(f"t{n_nodes}", TensorProto.FLOAT, [1])
    g = helper.make_graph(nodes, "g", [x], [y])
    g.doc_string = "p" * pad
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_chunks=257), r"max_chunks must be in \[3, 256\], got 257"),
        (dict(verify_steps=0), "verify_steps must be positive, got 0"),
        (dict(opset=17), "opset must be >= 18, got 17"),
        (dict(dt_scale="2"), "dt_scale must be a finite number, got '2'"),
        (dict(dt_scale=True), "dt_scale must be a finite number, got True"),
        (dict(chunk=8.0), "chunk must be an integer, got 8.0"),
        (dict(chunk="8"), "chunk must be an integer, got '8'"),
        (dict(max_chunks=4.0), "max_chunks must be an integer, got 4.0"),
        (dict(max_chunks=True), "max_chunks must be an integer, got True"),
        (dict(verify_steps=2.5), "verify_steps must be an integer, got 2.5"),
        (dict(opset=20.0), "opset must be an integer, got 20.0"),
        (dict(overwrite="no"), "overwrite must be true or false, got 'no'"),
        (dict(verify="false"), "verify must be true or false, got 'false'"),
        (dict(prefill=0), "prefill must be true or false, got 0"),
    ],
)
def test_export_config_bounds(kwargs, message):
    with pytest.raises(ExportError, match=message):
        ExportConfig(**kwargs)


def test_export_config_accepts_its_inclusive_bounds():
    assert ExportConfig(max_chunks=256, verify_steps=1, opset=18, chunk=2).max_len == 512


def test_out_that_is_a_file_is_named_a_file_even_with_overwrite(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"afile already exists \(a file\)"):
            exporter.export_network(tiny_net(), f, overwrite=overwrite, verify=False)
    (tmp_path / "adir").mkdir()
    with pytest.raises(ExportError, match=r"adir already exists \(a directory\)"):
        exporter.export_network(tiny_net(), tmp_path / "adir", verify=False)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "adir",
        "afile",
    ]


def test_export_network_refuses_a_non_network_and_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match="net must be an SSMNetwork, got str"):
        exporter.export_network("not a net", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_model_records_the_absolute_checkpoint_path(tmp_path, monkeypatch):
    save_checkpoint(tiny_net(), tmp_path / "ckpt")
    seen = {}
    monkeypatch.setattr(exporter, "export_network", lambda *a, **k: seen.update(k) or a[1])
    monkeypatch.chdir(tmp_path)
    exporter.export_model("ckpt", "out")
    assert seen["source"] == {
        "checkpoint": str(tmp_path / "ckpt"),
        "weights_sha256": sha256_file(tmp_path / "ckpt" / "model.safetensors"),
    }


def _stub_graphs(net, cfg, out):
    onnx.save(identity_model(), out / "step.onnx")
    return {"step": {"file": "step.onnx"}}


def test_in_memory_unverified_export_manifest_fields(tmp_path, monkeypatch):
    """export_network: source {} (no checkpoint) and parity 'passed': None with the reason."""
    from ssmstream.runtime import info

    monkeypatch.setattr(exporter, "build_graphs", _stub_graphs)
    out = exporter.export_network(tiny_net(), tmp_path / "m", prefill=False, verify=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == {}
    assert m["parity"] == {"passed": None, "skipped": "export ran with verify=False"}
    assert m["opset"] == 20 and m["dt_scale"] == 1.0
    inner = json.loads(
        {p.key: p.value for p in onnx.load(out / "step.onnx").metadata_props}["ssmstream.manifest"]
    )
    assert inner["source"] == {} and inner["parity"]["passed"] is None
    assert info.format_manifest(m, out)  # the table reads source.checkpoint


def test_manifest_records_the_configured_opset():
    m = exporter.base_manifest(tiny_net(), ExportConfig(opset=18), "n", {})
    assert m["opset"] == 18


def test_io_spec_of_prefill_and_values_models():
    tok = exporter._io_spec(tiny_net(), prefill=True)
    assert tok["inputs"]["length"] == {
        "dtype": "int64",
        "shape": [],
        "default": exporter.LENGTH_DEFAULT,
    }
    sig = tiny_net(vocab_size=None, d_input=3, d_output=2)
    spec = exporter._io_spec(sig, prefill=True)
    assert spec["inputs"]["input"] == {"dtype": "float32", "shape": ["B", "T", 3]}
    assert exporter._io_spec(sig, prefill=False)["inputs"]["input"]["shape"] == ["B", 3]
    assert spec["outputs"]["output"]["shape"] == ["B", "T", 2]


@pytest.fixture
def counted_conversions(graphs_without_torch):
    return []  # what each conversion's build() saw


def _convert(net, cfg, calls, graph="step"):
    def build():
        calls.append(cfg.dt_scale)
        return None, (), {}

    exporter.convert(net, graph, cfg, build)


def test_conversion_cache_key_includes_dt_scale(counted_conversions):
    calls, net = counted_conversions, tiny_net()
    _convert(net, ExportConfig(optimize=False), calls)
    _convert(net, ExportConfig(optimize=False), calls)  # same content: reused
    _convert(net, ExportConfig(optimize=False, dt_scale=0.5), calls)  # other Δ: converted
    assert calls == [1.0, 0.5]


def test_numpy_integers_and_floats_are_taken_as_options(counted_conversions):
    """Options from a numpy sweep (np.int64 chunk sizes, a np.float32 Δ scale) convert and
    land in the manifest as JSON numbers."""
    cfg = ExportConfig(
        optimize=False, chunk=np.int64(8), max_chunks=np.int32(4), dt_scale=np.float32(0.5)
    )
    _convert(tiny_net(), cfg, counted_conversions, graph="prefill")
    entry = {"chunk": cfg.chunk, "max_len": cfg.max_len, "dt_scale": cfg.dt_scale}
    assert json.loads(json.dumps(entry)) == {"chunk": 8, "max_len": 32, "dt_scale": 0.5}


def test_conversion_cache_key_includes_the_weights(counted_conversions):
    calls = counted_conversions
    _convert(tiny_net(seed=0), ExportConfig(optimize=False), calls)
    _convert(tiny_net(seed=1), ExportConfig(optimize=False), calls)  # same config, new weights
    assert len(calls) == 2


def test_int8_build_leaves_only_the_graph_and_wraps_quantizer_errors(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(exporter, "convert", lambda net, g, cfg, build: identity_model())
    monkeypatch.setattr(exporter, "quantize_int8", lambda src, dst, ex: shutil.copy(src, dst))
    cfg = ExportConfig(dtype="int8", prefill=False)
    (tmp_path / "a").mkdir()
    assert exporter.build_graphs(tiny_net(), cfg, tmp_path / "a") == {"step": {"file": "step.onnx"}}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step.onnx"]

    def broken(src, dst, ex):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(exporter, "quantize_int8", broken)
    (tmp_path / "b").mkdir()
    with pytest.raises(
        ExportError, match="int8 quantization of the step graph failed: quantizer exploded"
    ):
        exporter.build_graphs(tiny_net(), cfg, tmp_path / "b")


def test_non_trunk_gemm_is_excluded_with_its_split_matmul_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    w = onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32), "ssm.W")
    t = onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32), "trunk.W")
    nodes = [helper.make_node("Gemm", ["x", "ssm.W"], ["h"], name="g"),
             helper.make_node("Gemm", ["h", "trunk.W"], ["y"], name="tg")]  # fmt: skip
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, t]))
    assert exporter.non_trunk_matmuls(model) == ["g", "g_MatMul"]


def test_slim_keeps_equal_nodes_and_refuses_over_5_percent_more_bytes(monkeypatch):
    import onnxslim

    original = identity_model(pad=1000, n_nodes=3)
    same_nodes_smaller = identity_model(pad=0, n_nodes=3)
    monkeypatch.setattr(onnxslim, "slim", lambda m: same_nodes_smaller)
    assert exporter.slim(original) is same_nodes_smaller
    size = original.ByteSize()
    grown = identity_model(pad=1000 + size // 5, n_nodes=2)  # fewer nodes, ~20% more bytes
    assert 1.1 * size < grown.ByteSize() < 1.4 * size
    monkeypatch.setattr(onnxslim, "slim", lambda m: grown)
    assert exporter.slim(original) is original


class FakeSlab:
    def __init__(self, n, S):
        self.rows = np.zeros((n, S), np.float32)

    def write(self, row, x):
        self.rows[row] = x

    def read_rows(self, rows):
        return self.rows[np.asarray(list(rows), dtype=np.int64)].copy()


class FakeEngine:
    """A 2-number linear recurrence over tokens 0..4 with the Engine's verify-facing API."""

    S, Q = 2, 4

    def __init__(self, *a, **k):
        self.prefill_chunk = self.Q
        self.a = np.array([0.9, 0.5], np.float32)

    def step(self, x, state):
        s = (state * self.a + np.stack([x, -x], 1).astype(np.float32)).astype(np.float32)
        return s.copy(), s

    def _run(self, x, state, ends=None):
        outs = []
        for t in range(x.shape[1]):
            o, state = self.step(x[:, t], state)
            outs.append(o)
            if ends is not None and (t + 1) % self.Q == 0:
                ends[t + 1] = state
        return np.stack(outs, 1), state

    def prefill_unchecked(self, x, state, ends):
        return self._run(x, state, ends)

    def prefill(self, x, state):
        return self._run(x, state)

    def new_slab(self, n):
        return FakeSlab(n, self.S)

    def step_slots(self, x, slots, slab):
        out, s = self.step(x, slab.read_rows(slots))
        for r, row in zip(slots, s):
            slab.write(int(r), row)
        return out


MANIFEST = {"dtype": "fp32", "state_size": 2, "input_kind": "tokens", "vocab_size": 5,
            "graphs": {"step": {}, "prefill": {}}, "dt_scale": 1.0}  # fmt: skip


def _verify(monkeypatch, engine_cls, steps=32, net=None):
    monkeypatch.setattr(verify_mod, "Engine", engine_cls)
    return verify_mod.verify_graphs("unused", MANIFEST, net, steps=steps)


def test_verify_runs_the_whole_requested_length(monkeypatch):
    """The long check runs all `steps` inputs (the slow modes' error builds up over them), in
    the steps and in the prefill, and compares the prefill's state at every chunk end."""
    seen = []

    class Recording(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            seen.append(x.shape)
            return super().prefill_unchecked(x, state, ends)

    r = _verify(monkeypatch, Recording, steps=200)
    assert seen == [(2, 200)]
    assert r["prefill_vs_step"]["lengths"][0] == 200
    assert r["prefill_vs_step"]["chunk_states_checked"] == 200 // FakeEngine.Q


@pytest.mark.parametrize("where", ["output", "state"])
def test_a_slot_step_one_float32_ulp_off_fails(monkeypatch, where):
    """The slot step must equal the plain step bit for bit: one ulp off in its output or in
    the state it writes fails the check (and so the export)."""

    class OneUlpOff(FakeEngine):
        def step_slots(self, x, slots, slab):
            out = super().step_slots(x, slots, slab)
            if where == "state":
                for r in slots:
                    slab.rows[int(r)] = np.nextafter(slab.rows[int(r)], np.float32(np.inf))
                return out
            return np.nextafter(out, np.float32(np.inf))

    r = _verify(monkeypatch, OneUlpOff)
    rep = r["slots_vs_step"]
    assert 0 < rep[f"max_abs_{where}"] < 1e-3
    assert rep["passed"] is False and r["passed"] is False


def test_fake_engine_passes_and_every_chunk_state_is_checked(monkeypatch):
    r = _verify(monkeypatch, FakeEngine)
    assert r["passed"] and r["step_vs_torch"] == {"skipped": "no torch checkpoint given"}
    assert r["prefill_vs_step"]["chunk_states_checked"] == 32 // FakeEngine.Q
    assert r["prefill_vs_step"]["lengths"] == [32, 5, 2 * 4 + 1 + 1, 2 + 3]


def test_wrong_slot_graph_fails_the_whole_report(monkeypatch):
    class BadSlots(FakeEngine):
        def step_slots(self, x, slots, slab):
            return super().step_slots(x, slots, slab) + 1.0

    r = _verify(monkeypatch, BadSlots)
    assert not r["slots_vs_step"]["passed"] and r["passed"] is False


@pytest.mark.parametrize("change", [1.0, 1e-5])
def test_slot_graph_that_writes_other_rows_fails(monkeypatch, change):
    """Other rows must be untouched bit for bit: a change of 1e-5 fails too."""

    class Scribbler(FakeEngine):
        def step_slots(self, x, slots, slab):
            out = super().step_slots(x, slots, slab)
            other = next(i for i in range(len(slab.rows)) if i not in set(map(int, slots)))
            slab.rows[other] += change
            return out

    rep = verify_mod.slots_vs_step(Scribbler(), MANIFEST, np.zeros((2, 2), np.float32),
                                   np.random.default_rng(0), steps=2)  # fmt: skip
    assert rep["max_abs_output"] == rep["max_abs_state"] == 0.0
    assert rep["other_rows_untouched"] is False and rep["passed"] is False


def test_wrong_chunk_states_fail_prefill_vs_step(monkeypatch):
    class BadEnds(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            out, s = self._run(x, state, ends)
            for t in ends:
                ends[t] = ends[t] + 1.0
            return out, s

    r = _verify(monkeypatch, BadEnds)
    assert not r["prefill_vs_step"]["passed"] and not r["passed"]


def test_prefill_that_ignores_the_incoming_state_fails(monkeypatch):
    class Stateless(FakeEngine):
        def prefill(self, x, state):
            return self._run(x, np.zeros_like(state))

    r = _verify(monkeypatch, Stateless)
    assert not r["prefill_vs_step"]["passed"] and not r["passed"]


def test_non_finite_outputs_are_an_infinite_error(monkeypatch):
    class NaNPrefill(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            out, s = self._run(x, state, ends)
            return out * np.nan, s

    r = _verify(monkeypatch, NaNPrefill)
    q = r["prefill_vs_step"]
    assert q["max_rel_output"] == math.inf and q["max_abs_output"] == math.inf and not q["passed"]


def test_a_prefill_error_of_exactly_the_tolerance_passes(monkeypatch):
    class OffPrefill(FakeEngine):  # outputs 0.1% off the steps (its states are right)
        def prefill(self, x, state):
            out, s = super().prefill(x, state)
            return out * np.float32(1.001), s

    r = _verify(monkeypatch, OffPrefill, steps=16)["prefill_vs_step"]
    worst = max(r["max_rel_output"], r["max_rel_state"])
    assert 5e-4 < worst < 2e-3 and r["passed"] is False  # over fp32's 1e-4
    monkeypatch.setitem(verify_mod.TOLERANCES, "fp32",
                        {"step_vs_torch": 1e-4, "prefill_vs_step": worst})  # fmt: skip
    again = _verify(monkeypatch, OffPrefill, steps=16)
    assert again["prefill_vs_step"]["max_rel_output"] == worst
    assert again["prefill_vs_step"]["passed"] is True and again["passed"] is True


def test_the_report_counts_only_the_chunk_states_the_prefill_gave(monkeypatch):
    class FirstChunkEndOnly(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            got: dict = {}
            out = super().prefill_unchecked(x, state, got)
            ends[self.Q] = got[self.Q]
            return out

    r = _verify(monkeypatch, FirstChunkEndOnly, steps=16)["prefill_vs_step"]
    assert r["chunk_states_checked"] == 1  # not the 16 / 4 the steps recorded


def test_a_slot_step_that_clears_the_other_rows_fails():
    """A scatter over the whole slab zeroes the rows it was not given."""

    class ClearsOtherRows(FakeEngine):
        def step_slots(self, x, slots, slab):
            out = super().step_slots(x, slots, slab)
            for row in set(range(len(slab.rows))) - set(map(int, slots)):
                slab.rows[row] = 0
            return out

    rng = np.random.default_rng(0)
    states = rng.standard_normal((2, 2)).astype(np.float32)
    rep = verify_mod.slots_vs_step(ClearsOtherRows(), MANIFEST, states, rng, steps=2)
    assert rep["max_abs_output"] == rep["max_abs_state"] == 0.0
    assert rep["other_rows_untouched"] is False and rep["passed"] is False


def test_the_tolerances_per_dtype():
    # export/verify.py says where they come from (~3-10x over what random models measure)
    assert verify_mod.TOLERANCES == {
        "fp32": {"step_vs_torch": 1e-4, "prefill_vs_step": 1e-4},
        "fp16": {"step_vs_torch": 5e-3, "prefill_vs_step": 5e-3},
        "int8": {"step_vs_torch": 5e-2, "prefill_vs_step": 1.5e-1},
    }


@pytest.mark.parametrize(
    "dtype, fails, passes", [("fp32", 2e-4, 5e-5), ("fp16", 1e-2, 2e-3), ("int8", 0.3, 0.1)]
)
def test_each_dtype_checks_the_prefill_with_its_own_tolerance(monkeypatch, dtype, fails, passes):
    # the fp16 tolerances were held by no test: a 10x looser one passed every test
    def off_by(rel):
        class Off(FakeEngine):
            def prefill(self, x, state):
                out, s = self._run(x, state)
                return out * (1 + rel), s

        return Off

    monkeypatch.setitem(MANIFEST, "dtype", dtype)
    for rel, passed in ((fails, False), (passes, True)):
        r = _verify(monkeypatch, off_by(rel))
        assert r["prefill_vs_step"]["passed"] is passed, (rel, r["prefill_vs_step"])


def test_a_prefill_that_mixes_batch_rows_fails(monkeypatch):
    # verification runs more than one row: a graph right at B = 1 and wrong at B > 1 (a bad
    # reshape) fails; at batch 1 it had passed
    class Mixing(FakeEngine):
        def prefill(self, x, state):
            out, s = self._run(x, state)
            out[1:] = out[:1]
            return out, s

    r = _verify(monkeypatch, Mixing)
    assert not r["prefill_vs_step"]["passed"] and not r["passed"]


def test_verify_model_reports_the_explicit_checkpoint(tmp_path, monkeypatch):
    net = tiny_net()
    mine = save_checkpoint(net, tmp_path / "mine")
    recorded = save_checkpoint(tiny_net(seed=3), tmp_path / "recorded")
    manifest = {"model": net.cfg.to_dict(), "source": {"checkpoint": str(recorded)}}
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: manifest)
    seen = {}

    def fake_verify(model_dir, m, n, steps):
        seen["net"] = n
        return {"passed": True}

    monkeypatch.setattr(verify_mod, "verify_graphs", fake_verify)
    report = verify_mod.verify_model(tmp_path / "model", ckpt=mine)
    assert report["checkpoint"] == str(mine)
    assert torch.equal(seen["net"].encoder.weight, net.encoder.weight)


def test_export_cli_maps_every_flag(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_export(ckpt, out, **kw):
        seen.update(ckpt=ckpt, out=out, **kw)
        return out

    monkeypatch.setattr(exporter, "export_model", fake_export)
    argv = ["ck", "--out", "o", "--dtype", "int8", "--dt-scale", "0.25", "--no-prefill",
            "--name", "nm", "--chunk", "16", "--max-chunks", "5", "--verify-steps", "77",
            "--no-verify", "--no-optimize", "--force", "-q"]  # fmt: skip
    assert export_cli.main(argv) == 0
    assert seen == dict(ckpt="ck", out="o", dtype="int8", dt_scale=0.25, prefill=False,
                        verify=False, chunk=16, max_chunks=5, verify_steps=77, optimize=False,
                        name="nm", overwrite=True, progress=False)  # fmt: skip
    assert logging.getLogger("ssmstream").level == logging.WARNING
    assert capsys.readouterr().out == ""


def test_export_cli_without_quiet_shows_progress_logs_info_and_prints_the_manifest(
    monkeypatch, capsys
):
    import ssmstream.runtime.manifest as manifest_mod

    seen = {}
    monkeypatch.setattr(exporter, "export_model", lambda c, o, **kw: seen.update(kw) or o)
    monkeypatch.setattr(manifest_mod, "load_manifest", lambda d: {"name": "x"})
    monkeypatch.setattr(manifest_mod, "format_manifest", lambda m, d: f"TABLE {m['name']} {d}")
    assert export_cli.main(["ck", "--out", "o"]) == 0
    assert seen["progress"] is True and seen["prefill"] is True and seen["overwrite"] is False
    assert (seen["dt_scale"], seen["chunk"], seen["max_chunks"], seen["verify_steps"]) == (
        1.0,
        64,
        16,
        4096,
    )
    assert logging.getLogger("ssmstream").level == logging.INFO
    assert capsys.readouterr().out == "TABLE x o\n"


def test_non_finite_torch_reference_is_reported(monkeypatch):
    monkeypatch.setattr(verify_mod, "Engine", FakeEngine)
    monkeypatch.setattr(verify_mod, "torch_reference", lambda net, x, s: np.full((2, 8, 2), np.nan))
    monkeypatch.setattr(
        verify_mod, "step_drift", lambda net, s, beyond: {"max_rel": 0, "memory": 1}
    )
    r = verify_mod.verify_graphs("unused", MANIFEST, object(), steps=8)
    s = r["step_vs_torch"]
    assert s["output_scale"] == math.inf and s["max_rel"] == math.inf and not s["passed"]
    assert "the torch reference is not finite" in s["error"] and r["passed"] is False


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(net, cfg, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "build_graphs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_network(tiny_net(), tmp_path / "m", verify=False)
    assert list(tmp_path.iterdir()) == []
    # nor the parent directories it made for --out (those that existed stay)
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        exporter.export_network(tiny_net(), tmp_path / "kept" / "a" / "b" / "m", verify=False)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    # an --out under a file: refused, nothing made
    (tmp_path / "kept" / "f").write_text("x")
    for out in ("f/m", "f/n/m"):
        with pytest.raises(ExportError, match="cannot write into"):
            exporter.export_network(tiny_net(), tmp_path / "kept" / out, verify=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["f"]


def test_manifest_precision_names_the_variant():
    for dtype in ("fp32", "fp16", "int8"):
        m = exporter.base_manifest(tiny_net(), ExportConfig(dtype=dtype), "n", {})
        assert m["dtype"] == dtype and m["precision"] == exporter.VARIANTS[dtype]


def test_conversion_cache_keeps_the_8_most_recently_used(counted_conversions):
    calls = counted_conversions
    nets = [tiny_net(seed=i) for i in range(10)]
    cfg = ExportConfig(optimize=False)
    for net in nets[:8]:
        _convert(net, cfg, calls)
    _convert(nets[0], cfg, calls)  # a hit: nets[0] becomes the most recent
    _convert(nets[8], cfg, calls)  # evicts the least recently used: nets[1]
    assert len(calls) == 9
    _convert(nets[8], cfg, calls)  # the newest entry is kept
    _convert(nets[0], cfg, calls)  # and so is the one just used
    assert len(calls) == 9
    _convert(nets[1], cfg, calls)  # the evicted one is converted again
    assert len(calls) == 10


def test_verify_model_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    from ssmstream.runtime.errors import ModelError

    ckpt = save_checkpoint(tiny_net(), tmp_path / "ck")
    other = tiny_net(d_model=8).cfg.to_dict()
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: {"model": other, "source": {}})
    monkeypatch.setattr(verify_mod, "verify_graphs", lambda *a, **k: {"passed": True})
    with pytest.raises(
        ModelError, match=r"checkpoint '.*ck' does not match .*model: its model config differs"
    ):
        verify_mod.verify_model(tmp_path / "model", ckpt=ckpt)


def test_step_vs_torch_failure_fails_the_report(monkeypatch):
    monkeypatch.setattr(verify_mod, "Engine", FakeEngine)
    monkeypatch.setattr(verify_mod, "torch_reference", lambda net, x, s: np.ones((2, 8, 2)) * 100.0)
    monkeypatch.setattr(
        verify_mod, "step_drift", lambda net, s, beyond: {"max_rel": 0, "memory": 1}
    )
    r = verify_mod.verify_graphs("unused", MANIFEST, object(), steps=8)
    assert r["step_vs_torch"]["passed"] is False and r["passed"] is False
    assert r["prefill_vs_step"]["passed"] and r["slots_vs_step"]["passed"]


def test_prefill_module_refuses_chunk_zero():
    from ssmstream.export.modules import PrefillGraph

    with pytest.raises(ValueError, match="chunk must be a power of two, got 0"):
        PrefillGraph(tiny_net(), chunk=0, max_chunks=3)


def test_export_creates_missing_parent_directories(tmp_path, monkeypatch):
    """--out a/b/model with a/b missing is created (parents=True)."""
    monkeypatch.setattr(exporter, "build_graphs", _stub_graphs)
    out = exporter.export_network(
        tiny_net(), tmp_path / "a" / "b" / "m", prefill=False, verify=False
    )
    assert out == tmp_path / "a" / "b" / "m" and (out / "manifest.json").is_file()


def test_an_export_never_opens_the_process_umask(tmp_path, monkeypatch):
    """The model dir gets the umask's mode, which the export must not learn by setting the
    umask to 0 for a moment: files and directories that other threads of the process make
    in that moment would be writable by everyone. The umask stays as it was."""
    real, set_to = os.umask, []

    def umask(mask):
        set_to.append(mask)
        return real(mask)

    old = real(0o027)
    try:
        monkeypatch.setattr(os, "umask", umask)
        out = tmp_path / "m"
        exporter._commit(exporter._prepare_out(out, overwrite=False), out)  # made, then renamed
        monkeypatch.setattr(os, "umask", real)
        now = real(0o027)
    finally:
        real(old)
    assert 0 not in set_to and now == 0o027
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077], ids=oct)
def test_an_export_is_made_in_a_directory_only_its_user_can_write(tmp_path, mask):
    """While the files are written no one else can put anything in the temporary directory
    (a link there, at a name the export writes, would be written through), whatever the
    umask; the model directory then gets the umask's mode, as any directory made here."""
    old = os.umask(mask)
    try:
        tmp = exporter._prepare_out(tmp_path / "m", overwrite=False)
        made = stat.S_IMODE(tmp.stat().st_mode)
        exporter._commit(tmp, tmp_path / "m")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert oct(made) == oct(0o700)
    assert oct(stat.S_IMODE((tmp_path / "m").stat().st_mode)) == oct(0o777 & ~mask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == []


def test_slim_log_says_larger_not_more_nodes_for_an_equal_node_count(monkeypatch, caplog):
    """Same number of nodes but >5% more bytes: the log gives the bytes as the reason."""
    import onnxslim

    original = identity_model(pad=100, n_nodes=3)
    bigger = identity_model(pad=5000, n_nodes=3)
    monkeypatch.setattr(onnxslim, "slim", lambda m: bigger)
    with caplog.at_level(logging.INFO, logger="ssmstream.export.exporter"):
        assert exporter.slim(original) is original
    assert "nodes 3 -> 3" in caplog.text
    assert "the slimmed one is over 5% larger" in caplog.text
    assert "has more nodes" not in caplog.text


def test_quantize_int8_removes_its_root_logger_filter(tmp_path, monkeypatch):
    """The filter quieting the quantizer's advice is taken off the root logger again."""
    import onnxruntime.quantization as q

    seen = {}

    def fake_quantize_dynamic(src, dst, **kw):
        seen["filters"] = list(logging.getLogger().filters)
        seen["exclude"] = kw["nodes_to_exclude"]

    monkeypatch.setattr(q, "quantize_dynamic", fake_quantize_dynamic)
    before = list(logging.getLogger().filters)
    exporter.quantize_int8(tmp_path / "a.onnx", tmp_path / "b.onnx", ["n1"])
    assert len(seen["filters"]) == len(before) + 1 and seen["exclude"] == ["n1"]
    assert logging.getLogger().filters == before


def test_toposort_refuses_a_cycle():
    """A cyclic graph is an error, not a graph with its cycle's nodes silently dropped."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="n0"),
        helper.make_node("Identity", ["a"], ["b"], name="n1"),
        helper.make_node("Identity", ["a"], ["c"], name="n2"),
    ]
    g = helper.make_graph(nodes, "g", [x], [y])
    with pytest.raises(ValueError, match="the graph has a cycle"):
        exporter.toposort(g)
    assert [n.name for n in g.node] == ["n0", "n1", "n2"]  # left as it was


def test_toposort_places_an_if_after_what_its_branches_read():
    """An If whose branch reads an outer value `v` comes after v's producer."""
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])

    def branch(name):
        o = helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, [1])
        return helper.make_graph(
            [helper.make_node("Identity", ["v"], [f"{name}_o"], name=f"{name}_id")], name, [], [o]
        )

    nodes = [
        helper.make_node(
            "If",
            ["cond"],
            ["out"],
            name="if",
            then_branch=branch("then"),
            else_branch=branch("else"),
        ),  # fmt: skip
        helper.make_node("Identity", ["x"], ["v"], name="make_v"),
    ]
    g = helper.make_graph(nodes, "g", [cond, x], [out])
    exporter.toposort(g)
    assert [n.name for n in g.node] == ["make_v", "if"]


@pytest.mark.parametrize(
    "other",
    [dict(max_chunks=5), dict(optimize=False), dict(dtype="fp16")],
    ids=["max_chunks", "optimize", "fp16"],
)
def test_conversion_cache_key_includes_each_option(counted_conversions, other):
    """A prefill unrolled for other max_chunks, an unslimmed graph or an fp16
    graph is a conversion of its own, not the cached fp32 one."""
    calls, net = counted_conversions, tiny_net()
    _convert(net, ExportConfig(), calls, "prefill")
    _convert(net, ExportConfig(), calls, "prefill")  # same: reused
    _convert(net, ExportConfig(**other), calls, "prefill")
    assert len(calls) == 2


def test_int8_reuses_the_fp32_conversion(counted_conversions):
    """int8 quantizes the fp32 graph: the same conversion."""
    calls, net = counted_conversions, tiny_net()
    _convert(net, ExportConfig(), calls)
    _convert(net, ExportConfig(dtype="int8"), calls)
    assert len(calls) == 1


def test_io_spec_chunk_states_shape():
    """Chunk_states is [B, T/chunk, S]; the step graph has none."""
    net = tiny_net()
    spec = exporter._io_spec(net, prefill=True)
    assert spec["outputs"]["chunk_states"] == {
        "dtype": "float32",
        "shape": ["B", "T/chunk", net.cfg.state_size],
    }
    assert "chunk_states" not in exporter._io_spec(net, prefill=False)["outputs"]


def test_export_writes_into_a_temporary_sibling_of_out(tmp_path, monkeypatch):
    """The temporary directory is made next to --out (same filesystem: the final
    os.replace is a rename), named .NAME.*.tmp, and is gone afterwards."""
    seen = {}

    def graphs(net, cfg, out):
        seen["tmp"] = out
        return _stub_graphs(net, cfg, out)

    monkeypatch.setattr(exporter, "build_graphs", graphs)
    out = exporter.export_network(tiny_net(), tmp_path / "m", prefill=False, verify=False)
    assert seen["tmp"].parent == tmp_path and seen["tmp"].name.startswith(".m.")
    assert seen["tmp"].name.endswith(".tmp") and not seen["tmp"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and out == tmp_path / "m"


def test_manifest_created_is_an_aware_utc_timestamp(tmp_path, monkeypatch):
    """Manifest["created"] is ISO 8601 in UTC with its offset."""
    import datetime

    monkeypatch.setattr(exporter, "build_graphs", _stub_graphs)
    out = exporter.export_network(tiny_net(), tmp_path / "m", prefill=False, verify=False)
    created = datetime.datetime.fromisoformat(
        json.loads((out / "manifest.json").read_text())["created"]
    )
    assert created.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - created).total_seconds()) < 60


def test_int8_quantizes_only_matmuls_with_a_constant_weight(tmp_path):
    """A MatMul of two computed tensors (like the prefill's in-graph Toeplitz/G/F
    tables, which are no initializers) stays a float32 MatMul; the trunk's weight MatMul is
    quantized (MatMulConstBOnly)."""
    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 16])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "trunk.W")
    nodes = [
        helper.make_node("MatMul", ["a", "trunk.W"], ["h"], name="trunk_mm"),
        helper.make_node("Relu", ["b"], ["t"], name="table"),  # a computed operand
        helper.make_node("MatMul", ["h", "t"], ["y"], name="act_mm"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [a, b], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 20)])  # fmt: skip
    onnx.save(model, tmp_path / "f.onnx")
    exporter.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", [])
    q = onnx.load(tmp_path / "q.onnx")
    by_name = {n.name: n.op_type for n in q.graph.node}
    assert by_name.get("act_mm") == "MatMul"  # left float32
    assert "trunk_mm" not in by_name and "MatMulInteger" in by_name.values()


def test_random_tokens_cover_the_whole_vocabulary():
    """The check feeds every token id, the last one (vocab_size - 1) included."""
    x = verify_mod.random_inputs({"input_kind": "tokens", "vocab_size": 3}, 4, 200,
                                 np.random.default_rng(0))  # fmt: skip
    assert x.dtype == np.int64 and x.shape == (4, 200) and set(np.unique(x)) == {0, 1, 2}


def test_random_values_are_standard_normal():
    """Continuous inputs are N(0, 1) float32 (negative values included), [B, L, d_input]."""
    x = verify_mod.random_inputs({"input_kind": "values", "d_input": 3}, 4, 500,
                                 np.random.default_rng(0))  # fmt: skip
    assert x.dtype == np.float32 and x.shape == (4, 500, 3)
    assert x.min() < -2.0 and abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1


def test_rel_of_an_all_zero_reference_is_finite():
    """A zero reference (e.g. a zero state) gives err / 1e-12, not a ZeroDivisionError."""
    z = np.zeros((2, 3))
    assert verify_mod._rel(z.astype(np.float32), z) == (0.0, 0.0)
    err, rel = verify_mod._rel(np.full((2, 3), 1e-13, np.float32), z)
    assert err == pytest.approx(1e-13) and rel == pytest.approx(0.1)


def test_prefill_report_lists_the_lengths_run_from_a_nonzero_state(monkeypatch):
    """The long run starts from zero; only the three short ones from a non-zero state."""
    q = _verify(monkeypatch, FakeEngine)["prefill_vs_step"]
    assert q["lengths"] == [32, 5, 10, 5] and q["nonzero_initial_state"] == [5, 10, 5]


def test_prefill_report_fields_keep_outputs_and_states_apart(monkeypatch):
    """A prefill whose outputs are off by 0.5 but whose states are right reports the
    error under *_output only; max_rel_state and max_abs_state stay 0."""

    class OffOutputs(FakeEngine):
        def prefill_unchecked(self, x, state, ends):
            out, s = self._run(x, state, ends)
            return out + 0.5, s

        def prefill(self, x, state):
            out, s = self._run(x, state)
            return out + 0.5, s

    q = _verify(monkeypatch, OffOutputs)["prefill_vs_step"]
    assert q["max_abs_output"] == pytest.approx(0.5) and q["max_rel_output"] > 0.01
    assert q["max_abs_state"] == 0.0 and q["max_rel_state"] == 0.0
    assert not q["passed"]


def test_slot_check_fails_a_slot_graph_that_ignores_the_slots(monkeypatch):
    """The slots are scattered over the slab, so a slot graph that works on rows 0..B-1
    whatever the slots is caught."""

    class FirstRows(FakeEngine):
        def step_slots(self, x, slots, slab):
            return super().step_slots(x, np.arange(len(slots)), slab)

    monkeypatch.setattr(verify_mod, "Engine", FirstRows)
    verdicts = [verify_mod.verify_graphs("unused", MANIFEST, None, steps=32, seed=seed)["passed"]
                for seed in range(1, 4)]  # fmt: skip
    assert verdicts == [False, False, False]


def test_step_vs_torch_passes_at_exactly_the_tolerance(monkeypatch):
    """Rel <= tolerance passes (the bound is inclusive)."""
    monkeypatch.setattr(verify_mod, "Engine", FakeEngine)
    ref = {}

    def torch_ref(net, x, s):
        out, _ = FakeEngine()._run(x, np.zeros((x.shape[0], 2), np.float32))
        ref["v"] = out.astype(np.float64) * 1.001
        return ref["v"]

    monkeypatch.setattr(verify_mod, "torch_reference", torch_ref)
    monkeypatch.setattr(
        verify_mod, "step_drift", lambda net, s, beyond: {"max_rel": 0, "memory": 1}
    )
    r = verify_mod.verify_graphs("unused", MANIFEST, object(), steps=8)
    rel = r["step_vs_torch"]["max_rel"]
    assert 0 < rel and not r["step_vs_torch"]["passed"]  # 1e-3 > fp32's 1e-4
    monkeypatch.setitem(verify_mod.TOLERANCES, "fp32",
                        {"step_vs_torch": rel, "prefill_vs_step": 1e-4})  # fmt: skip
    r = verify_mod.verify_graphs("unused", MANIFEST, object(), steps=8)
    assert r["step_vs_torch"]["max_rel"] == rel and r["step_vs_torch"]["passed"] is True
    assert r["passed"] is True


def _fake_verify(seen):
    def fake(model_dir, m, n, steps=4096):
        seen.update(net=n, steps=steps)
        if n is None:  # as verify_graphs says it
            return {"passed": True, "step_vs_torch": {"skipped": "no torch checkpoint given"}}
        return {"passed": True}

    return fake


def test_verify_model_with_a_recorded_checkpoint_that_lost_its_weights(tmp_path, monkeypatch):
    """The recorded checkpoint directory exists but its model.safetensors is gone: a
    CheckpointError naming the missing file (the CLI's exit 2), not a FileNotFoundError."""
    ck = save_checkpoint(tiny_net(), tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    manifest = {"model": tiny_net().cfg.to_dict(),
                "source": {"checkpoint": str(ck), "weights_sha256": "0" * 64}}  # fmt: skip
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: manifest)
    monkeypatch.setattr(verify_mod, "verify_graphs", _fake_verify({}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        verify_mod.verify_model(tmp_path / "model")


def test_verify_model_skips_torch_when_the_recorded_checkpoint_is_gone(tmp_path, monkeypatch):
    """A recorded checkpoint that no longer exists is not an error: no torch reference. The
    report says so and what to pass (it said "no torch checkpoint given", which none was)."""
    manifest = {
        "model": tiny_net().cfg.to_dict(),
        "source": {"checkpoint": str(tmp_path / "deleted"), "weights_sha256": "0" * 64},
    }
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: manifest)
    seen = {}
    monkeypatch.setattr(verify_mod, "verify_graphs", _fake_verify(seen))
    report = verify_mod.verify_model(tmp_path / "model", steps=64)
    assert seen == {"net": None, "steps": 64} and report["checkpoint"] is None
    assert report["step_vs_torch"] == {
        "skipped": f"the checkpoint recorded in the manifest, {tmp_path / 'deleted'}, is not "
        "there any more; pass --ckpt"
    }
    manifest["source"] = {}  # none recorded (an export_network of a network in memory)
    assert verify_mod.verify_model(tmp_path / "model")["step_vs_torch"] == {
        "skipped": "no checkpoint given or recorded in the manifest; pass --ckpt"
    }


@pytest.mark.parametrize("source", [[1], "ck", {"checkpoint": 7}, None])
def test_verify_model_of_a_hand_edited_source_or_model_checks_without_torch(
    tmp_path, monkeypatch, source
):
    """`source` and `model` are free-form in a manifest the loader accepts: one of another
    type (or none) is no recorded checkpoint, not an AttributeError / TypeError / KeyError; a
    checkpoint given against a manifest without `model` is refused as not matching."""
    manifest = {"source": source}
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: manifest)
    seen = {}
    monkeypatch.setattr(verify_mod, "verify_graphs", _fake_verify(seen))
    assert verify_mod.verify_model(tmp_path / "model")["checkpoint"] is None
    assert seen["net"] is None
    from ssmstream.runtime.errors import ModelError

    ckpt = save_checkpoint(tiny_net(), tmp_path / "ck")
    with pytest.raises(ModelError, match="its model config differs"):
        verify_mod.verify_model(tmp_path / "model", ckpt=ckpt)


def test_verify_model_passes_steps_on(tmp_path, monkeypatch):
    """Verify_model(steps=L) runs the check over L steps (the CLI's --steps)."""
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: {"model": {}, "source": {}})
    seen = {}
    monkeypatch.setattr(verify_mod, "verify_graphs", _fake_verify(seen))
    verify_mod.verify_model(tmp_path / "model", steps=123)
    assert seen["steps"] == 123


def test_verify_cli_refuses_zero_steps(tmp_path, monkeypatch, capsys):
    """--steps 0 is refused by the CLI itself (exit 2) before the model is read."""
    monkeypatch.setattr(verify_mod, "verify_model", lambda *a, **k: pytest.fail("ran"))
    assert verify_cli.main([str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "ssmstream verify: error: --steps must be positive\n"


def test_verify_cli_missing_ckpt_is_exit_2(tmp_path, monkeypatch, capsys):
    """--ckpt that does not exist: a CheckpointError -> exit 2 with one line."""
    monkeypatch.setattr(verify_mod, "load_manifest", lambda d: {"model": {}, "source": {}})
    monkeypatch.setattr(verify_mod, "verify_graphs", lambda *a, **k: pytest.fail("ran"))
    assert verify_cli.main([str(tmp_path), "--ckpt", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ssmstream verify: error: --ckpt: checkpoint directory")
        and "does not exist" in err
    )


REPORT = {
    "passed": False, "dtype": "fp32",
    "tolerance": {"step_vs_torch": 1e-4, "prefill_vs_step": 1e-4},
    "step_vs_torch": {"length": 64, "batch": 2, "max_abs": 0.5, "max_rel": 0.25, "passed": False},
    "prefill_vs_step": {"lengths": [64, 5], "max_rel_output": 1e-6, "max_rel_state": 3e-2,
                        "passed": False},
    "slots_vs_step": {"steps": 16, "batch": 2, "max_abs_output": 0.0, "max_abs_state": 0.0,
                      "passed": True},
}  # fmt: skip


def test_format_report_marks_each_failed_check_and_shows_the_worst_error():
    """The prefill line's max rel is the worse of outputs and states, and each
    failed line carries the FAILED marker."""
    lines = verify_cli.format_report(REPORT).splitlines()
    assert lines[0] == "parity (fp32): FAILED"
    assert lines[1].startswith("  step vs torch     max rel 2.50e-01 (tol 0.0001)")
    assert lines[1].endswith("  <-- FAILED")
    assert (
        lines[2] == "  prefill vs step   max rel 3.00e-02 (tol 0.0001), lengths [64, 5]  <-- FAILED"
    )
    assert "FAILED" not in lines[3]


def test_the_tolerances_shown_are_the_ones_checked():
    """int8's prefill tolerance 0.15 read "1e-01" (one significant digit): a 0.12 error
    looked past its tolerance and passed. verify shows it as it is (info: test_manifest)."""
    from ssmstream.export.verify import TOLERANCES

    report = {**REPORT, "dtype": "int8", "tolerance": TOLERANCES["int8"]}
    lines = verify_cli.format_report(report).splitlines()
    assert "(tol 0.05)" in lines[1] and "(tol 0.15)" in lines[2]


def test_export_cli_defaults_verify_and_optimize(monkeypatch, capsys):
    """Without --no-verify / --no-optimize the export verifies and slims; name None."""
    seen = {}
    monkeypatch.setattr(exporter, "export_model", lambda c, o, **kw: seen.update(kw) or o)
    assert export_cli.main(["ck", "--out", "o", "-q"]) == 0
    assert seen["verify"] is True and seen["optimize"] is True and seen["name"] is None
    assert seen["dtype"] == "fp32"
    assert export_cli.main(["ck", "--out", "o", "-q", "--no-verify"]) == 0
    assert seen["verify"] is False and seen["optimize"] is True


def test_a_slot_graph_with_right_outputs_but_a_wrong_state_fails():
    """Outputs all right, only the last state write wrong (nothing reads it afterwards, so
    no output shows it): the report fails on max_abs_state alone."""
    steps = 4

    class LastWriteWrong(FakeEngine):
        calls = 0

        def step_slots(self, x, slots, slab):
            out = super().step_slots(x, slots, slab)
            LastWriteWrong.calls += 1
            if LastWriteWrong.calls == steps:  # the last step: its state is never read again
                for r in slots:
                    slab.rows[int(r)] += 1e-3
            return out

    x0 = np.ones((2, 2), np.float32)
    good = verify_mod.slots_vs_step(FakeEngine(), MANIFEST, x0, np.random.default_rng(0), steps)
    assert good["passed"] and good["max_abs_state"] == 0.0
    rep = verify_mod.slots_vs_step(LastWriteWrong(), MANIFEST, x0, np.random.default_rng(0), steps)
    assert rep["max_abs_output"] == 0.0 and rep["other_rows_untouched"]
    assert rep["max_abs_state"] > 0
    assert rep["passed"] is False


def test_verify_graphs_of_a_training_network_uses_its_eval_mode(tmp_path):
    """verify_graphs(net=...) is public: its torch reference is the eval-mode network also when
    the caller's network is training (dropout on); a reference with dropout failed a correct
    export."""
    from ssmstream.export import export_network, verify_graphs
    from ssmstream.runtime.manifest import load_manifest

    torch.manual_seed(3)
    net = SSMNetwork(SSMConfig(vocab_size=7, d_model=8, n_layers=2, d_state=4, dropout=0.5))
    out = export_network(net, tmp_path / "m", prefill=False, verify=False)  # net.eval() inside
    net.train()  # a training loop checks its export
    report = verify_graphs(out, load_manifest(out), net, steps=64)
    assert report["step_vs_torch"]["max_rel"] < 1e-4, report["step_vs_torch"]
    assert report["passed"] is True
    assert net.training  # the caller's network is left as it was


def test_two_exports_of_the_same_weights_are_the_same_model(tmp_path, monkeypatch):
    """The step graph's sha256 is the model's identity: snapshots and a --state-dir's
    sessions are refused by a server of "another model". Re-exporting the same weights with
    the same options (a rebuilt Docker image, a second `make demo` workdir) must not make
    another model: the graphs carry neither the export's time nor the checkpoint's directory
    (a second clone, a moved checkout; manifest.json still records both)."""
    monkeypatch.setattr(exporter, "build_graphs", _stub_graphs)
    outs = [
        exporter.export_network(
            tiny_net(),
            tmp_path / f"m{i}",
            prefill=False,
            verify=False,
            name="m",
            source={"checkpoint": f"/ckpt{i}", "weights_sha256": "ab12"},
        )  # fmt: skip
        for i in range(2)
    ]
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    assert manifests[0]["created"] != manifests[1]["created"]
    assert [m["source"]["checkpoint"] for m in manifests] == ["/ckpt0", "/ckpt1"]
    shas = {m["graphs"]["step"]["sha256"] for m in manifests}
    assert len(shas) == 1 and shas == {sha256_file(out / "step.onnx") for out in outs}
