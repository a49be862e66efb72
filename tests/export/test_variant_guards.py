"""What a model directory's variant (manifest `dtype`) lets through: an fp16 export refuses
values its float16 inputs cannot hold (they turned the session's state into NaN), and a
manifest whose dtype was edited (verify's tolerance comes from it) is refused at open."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from ssmstream.export import export_network
from ssmstream.model import SSMConfig, SSMNetwork
from ssmstream.runtime import Engine
from ssmstream.runtime.errors import InvalidInput, ModelError

CFG = dict(d_input=2, d_output=2, d_model=8, n_layers=2, d_state=4)


@pytest.fixture(scope="module")
def values_dirs(tmp_path_factory):
    torch.manual_seed(3)
    net = SSMNetwork(SSMConfig(**CFG)).eval()
    root = tmp_path_factory.mktemp("variants")
    for dtype in ("fp32", "fp16"):
        export_network(net, root / dtype, dtype=dtype, chunk=4, max_chunks=3, prefill=False)
    return root


def test_an_fp16_values_model_refuses_values_beyond_float16(values_dirs):
    fp32, fp16 = (Engine(values_dirs / d, device="cpu") for d in ("fp32", "fp16"))
    s = fp16.new_state(1)
    big = np.array([[1e5, 1.0]], dtype=np.float32)  # finite in float32, inf in float16
    y32, s32 = fp32.step(big, fp32.new_state(1))
    assert np.isfinite(y32).all() and np.isfinite(s32).all()  # the fp32 export takes it
    with pytest.raises(InvalidInput) as e:
        fp16.step(big, s)
    assert str(e.value) == "inputs: values beyond ±65504 overflow this fp16 export's inputs"
    assert not s.any()  # unchanged
    edge = np.array([[65504.0, -65504.0]], dtype=np.float32)
    assert fp16.check_inputs(edge, "values").tolist() == edge.tolist()  # the largest taken


def test_a_manifest_whose_dtype_was_edited_is_refused(values_dirs, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(values_dirs / "fp32", model)
    m = json.loads((model / "manifest.json").read_text())
    m["dtype"] = "int8"  # verify would check it 500x more loosely
    (model / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match=r"manifest\.json: dtype is 'int8', the step graph was "):
        Engine(model, device="cpu")


LAYER_KINDS = {  # tokens models: SISO (heads = d_model), multi-head (heads 2 of width 4), MIMO
    "siso": dict(vocab_size=11, d_model=8, n_layers=2, d_state=4),
    "multi-head": dict(vocab_size=11, d_model=8, n_layers=2, d_state=4, heads=2),
    "mimo": dict(vocab_size=11, d_model=8, n_layers=2, d_state=4, heads=1),
}


@pytest.fixture(scope="module", params=list(LAYER_KINDS))
def kind_engine(request, tmp_path_factory):
    torch.manual_seed(1)
    net = SSMNetwork(SSMConfig(**LAYER_KINDS[request.param])).eval()
    out = tmp_path_factory.mktemp("kinds") / request.param
    export_network(net, out, chunk=8, verify=False, prefill=False)
    return request.param, Engine(out, device="cpu")


def _batch_vs_alone(eng, B: int = 7):
    """(outputs, states) of B sessions stepped in one slot call, and of each stepped alone."""
    rng = np.random.default_rng(5)
    slab = eng.new_slab(B)
    states = (rng.standard_normal((B, eng.state_size)) * 0.3).astype(np.float32)
    for row in range(B):
        slab.write(row, states[row])
    x = rng.integers(0, eng.vocab_size, size=B, dtype=np.int64)
    y = eng.step_slots(x, np.arange(B), slab)
    alone = [eng.step(x[j : j + 1], states[j : j + 1]) for j in range(B)]
    got = (y, np.stack([slab.read(j) for j in range(B)]))
    return got, (np.concatenate([a[0] for a in alone]), np.concatenate([a[1] for a in alone]))


def test_batch_mates_do_not_change_a_session(kind_engine):
    """Every layer kind: a session stepped in a batch of 7 is bit-identical to itself stepped
    alone (docs/guarantees.md). Multi-head and MIMO layers: the per-head products are Mul +
    ReduceSum; as onnxruntime batched MatMuls they rounded a row by the row count."""
    kind, eng = kind_engine
    (y, s), (y1, s1) = _batch_vs_alone(eng)
    assert np.abs(s).max() > 0.1 and np.abs(y).max() > 0.1  # real values, not zeros
    assert np.array_equal(y, y1), f"{kind}: outputs differ by {np.abs(y - y1).max()}"
    assert np.array_equal(s, s1), f"{kind}: states differ by {np.abs(s - s1).max()}"
