"""CUDA provider options (checked everywhere) and the CUDA paths (marked `cuda`, skipped here).

Without a GPU the options are checked by intercepting what the Engine hands to
onnxruntime's InferenceSession; with one, the CUDA engine's plain steps and its slot steps
on a device slab are compared with the CPU engine on the same model (fp32: TF32 off).
"""

from __future__ import annotations

import numpy as np
import pytest
import ssmstream.runtime.engine as engine_module
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.providers import CudaOptions


def test_cuda_options_defaults_and_strings():
    o = CudaOptions.parse({"device_id": 1, "enable_cuda_graph": True})
    slots, prefill = o.provider_options("slots"), o.provider_options("prefill")
    assert slots == {
        "device_id": "1",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",  # fp32 means fp32 (onnxruntime's own default is TF32 on)
        "enable_cuda_graph": "1",
    }
    assert prefill["enable_cuda_graph"] == "0"  # variable T: never captured
    assert o.provider_options("step")["enable_cuda_graph"] == "0"  # numpy states: not fixed
    limited = CudaOptions(gpu_mem_limit=2**30).provider_options()
    assert limited["gpu_mem_limit"] == str(2**30)
    assert CudaOptions.parse(None) == CudaOptions() and CudaOptions.parse(o) is o


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"device": 0}, "cuda_options"),
        ({"device_id": -1}, "cuda_options.device_id"),
        ({"device_id": "0"}, "cuda_options.device_id"),
        ({"arena_extend_strategy": "grow"}, "cuda_options.arena_extend_strategy"),
        ({"cudnn_conv_algo_search": "fast"}, "cuda_options.cudnn_conv_algo_search"),
        ({"enable_cuda_graph": "yes"}, "cuda_options.enable_cuda_graph"),
        ({"gpu_mem_limit": 1.5}, "cuda_options.gpu_mem_limit"),
    ],
)
def test_bad_cuda_options_name_the_field(toy_token_model, bad, field):
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        Engine(toy_token_model["model_dir"], device="cpu", cuda_options=bad)
    with pytest.raises(InvalidInput, match="cuda_options"):
        Engine(toy_token_model["model_dir"], cuda_options=[("device_id", 0)])


class OnCuda:
    """A CPU session that says it runs on CUDA."""

    def __init__(self, sess):
        self.sess = sess

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name):
        return getattr(self.sess, name)


def test_engine_hands_cuda_options_to_onnxruntime(toy_token_model, monkeypatch):
    seen: dict[str, list] = {}
    real = engine_module.ort.InferenceSession

    def record(path, opts, providers):
        seen["slots" if isinstance(path, bytes) else path.rsplit("/", 1)[-1]] = providers
        return OnCuda(real(path, opts, providers=["CPUExecutionProvider"]))

    monkeypatch.setattr(engine_module, "cuda_usable", lambda: (True, ""))
    monkeypatch.setattr(engine_module.ort, "InferenceSession", record)
    opts = {"device_id": 3, "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": True}
    eng = Engine(toy_token_model["model_dir"], device="auto", cuda_options=opts)
    (name, step_opts), cpu = seen["step.onnx"]
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert step_opts["device_id"] == "3" and step_opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert step_opts["enable_cuda_graph"] == "0"  # only the slot graph is captured
    (name, slot_opts), _ = seen["slots"]  # the slot graph runs where the step graph does
    assert name == "CUDAExecutionProvider" and slot_opts["enable_cuda_graph"] == "1"
    assert {k: v for k, v in slot_opts.items() if k != "enable_cuda_graph"} == {
        k: v for k, v in step_opts.items() if k != "enable_cuda_graph"
    }
    (name, prefill_opts), _ = seen["prefill.onnx"]
    assert name == "CUDAExecutionProvider" and prefill_opts["device_id"] == "3"
    assert eng.device == "cuda" and eng.device_id == 3  # where the (faked) session says
    # device="cpu" never asks for CUDA, whatever the options
    seen.clear()
    Engine(toy_token_model["model_dir"], device="cpu", cuda_options=opts)
    assert seen["step.onnx"] == ["CPUExecutionProvider"]


def test_a_model_cuda_graphs_cannot_capture_runs_without_them(toy_token_model, monkeypatch, caplog):
    """onnxruntime refuses a CUDA-graph session (say, a node it placed on the CPU): the
    engine says so once and steps without graphs instead of failing to open."""
    real = engine_module.ort.InferenceSession
    opened = []

    def fake(path, opts, providers):
        graphs = [p[1].get("enable_cuda_graph") for p in providers if not isinstance(p, str)]
        opened.append(graphs)
        if "1" in graphs:
            raise RuntimeError("This session cannot use the CUDA Graph feature (test)")
        return OnCuda(real(path, opts, providers=["CPUExecutionProvider"]))

    monkeypatch.setattr(engine_module, "cuda_usable", lambda: (True, ""))
    monkeypatch.setattr(engine_module.ort, "InferenceSession", fake)
    with caplog.at_level("WARNING", logger="ssmstream.runtime.engine"):
        eng = Engine(toy_token_model["model_dir"], cuda_options={"enable_cuda_graph": True})
    assert eng.device == "cuda" and not eng.cuda_graphs
    assert opened[-2:] == [["1"], ["0"]]  # the slot graph: refused with graphs, then without
    assert "CUDA graphs unavailable for this model" in caplog.text


def test_cuda_requested_without_cuda_says_why(toy_token_model, monkeypatch):
    monkeypatch.setattr(engine_module, "cuda_usable", lambda: (False, "no CUDA driver (test)"))
    with pytest.raises(InvalidInput, match=r"device.*no CUDA driver \(test\).*choose cpu or auto"):
        Engine(toy_token_model["model_dir"], device="cuda")
    assert Engine(toy_token_model["model_dir"]).provider == "CPUExecutionProvider"


# --- on a GPU ------------------------------------------------------------------------------


def _run(eng, tokens, x0, slab=None):
    """Outputs of T steps [B, T, d_out] and final states [B, S]: plain steps, or slot steps
    on rows 1, 3, 5, ... of `slab`."""
    B = tokens.shape[0]
    if slab is not None:
        slots = np.arange(B) * 2 + 1
        for row, state in zip(slots, x0):
            slab.write(int(row), state)
        ys = [eng.step_slots(tokens[:, t], slots, slab) for t in range(tokens.shape[1])]
        return np.stack(ys, axis=1), slab.read_rows(slots)
    s, ys = x0, []
    for t in range(tokens.shape[1]):
        y, s = eng.step(tokens[:, t], s)
        ys.append(y)
    return np.stack(ys, axis=1), s


@pytest.mark.cuda
def test_cuda_plain_and_slot_steps_match_cpu_in_fp32(tiny_token_model):
    d = tiny_token_model["model_dir"]
    cpu = Engine(d, device="cpu")
    gpu = Engine(d, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider" and gpu.device == "cuda"
    rng = np.random.default_rng(0)
    B, T = 8, 16
    tokens = rng.integers(0, cpu.vocab_size, size=(B, T))
    x0 = rng.standard_normal((B, cpu.state_size)).astype(np.float32) * 0.1
    y_ref, s_ref = _run(cpu, tokens, x0)
    for slab in (None, gpu.new_slab(2 * B + 3)):
        y, s = _run(gpu, tokens, x0, slab)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    slab = gpu.new_slab(4)
    before = slab.stats.step_bytes_in, slab.stats.step_bytes_out
    gpu.step_slots(tokens[:4, 0], [0, 1, 2, 3], slab)
    moved = slab.stats.step_bytes_in - before[0], slab.stats.step_bytes_out - before[1]
    assert moved == (4 * 8 + 4 * 8, 4 * gpu.d_output * 4)  # tokens + slots in, outputs out


@pytest.mark.cuda
def test_cuda_graph_buckets_match_cpu_and_leave_other_rows_alone(tiny_token_model):
    """Slot steps replayed from CUDA graphs (buckets 1, 2, 4, 8; padding on the scratch row)
    equal the CPU engine's steps; rows outside the batch keep their states."""
    d = tiny_token_model["model_dir"]
    cpu = Engine(d, device="cpu")
    gpu = Engine(d, device="cuda", cuda_options={"enable_cuda_graph": True})
    assert gpu.cuda_graphs
    rng = np.random.default_rng(2)
    slab = gpu.new_slab(16)
    assert slab.scratch == 16
    want = (rng.standard_normal((16, cpu.state_size)) * 0.1).astype(np.float32)  # [16, S]
    for row, state in enumerate(want):
        slab.write(row, state)
    buf = gpu.step_buffers(8)
    for B in (1, 3, 8, 5, 2, 7, 1):
        slots = rng.choice(16, size=B, replace=False)
        x = rng.integers(0, cpu.vocab_size, size=B)
        y_ref, s_ref = cpu.step(x, want[slots])
        y = gpu.step_slots(x, slots, slab, out=buf)
        want[slots] = s_ref
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(slab.read_rows(range(16)), want, rtol=1e-5, atol=1e-5)
