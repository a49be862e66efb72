"""Engine: parity with torch (conv forward and step recurrence), prefill == steps, batching,
StepBuffers, validation errors and model-dir errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import EngineFailure, InvalidInput, ModelError
from ssmstream.runtime.manifest import load_manifest
from ssmstream.runtime.providers import cuda_usable
from ssmstream.runtime.sampling import Sampler, SamplingConfig


def random_inputs(eng: Engine, rng, B: int, T: int) -> np.ndarray:
    if eng.input_kind == "tokens":
        return rng.integers(0, eng.vocab_size, size=(B, T))  # [B, T]
    return rng.standard_normal((B, T, eng.d_input)).astype(np.float32)  # [B, T, d_in]


def step_loop(eng: Engine, x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys = []
    for t in range(x.shape[1]):
        y, s = eng.step(x[:, t], s)
        ys.append(y)
    return np.stack(ys, axis=1), s  # [B, T, d_out], [B, S]


# --- parity with torch ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["tokens", "signal"])
def test_step_matches_torch_conv_forward_and_recurrence(which, request):
    torch = pytest.importorskip("torch")
    model = request.getfixturevalue(f"tiny_{'token' if which == 'tokens' else 'signal'}_model")
    eng = Engine(model["model_dir"], device="cpu", threads=1)
    net = model["net"]
    rng = np.random.default_rng(5)
    x = random_inputs(eng, rng, B=3, T=50)
    ys, s = step_loop(eng, x, eng.new_state(3))
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()  # conv mode, [B, T, d_out]
        states = net.initial_state(3)
        for t in range(x.shape[1]):
            _, states = net.step(torch.from_numpy(x[:, t]), states)
        ref_state = net.pack_state(states).numpy()  # [B, S]
    scale = np.abs(ref).max()
    assert ys.shape == ref.shape == (3, 50, eng.d_output)
    assert np.abs(ys - ref).max() <= 1e-4 * scale
    assert np.abs(s - ref_state).max() <= 1e-4 * max(1.0, np.abs(ref_state).max())


@pytest.mark.parametrize("which", ["tokens", "signal"])
@pytest.mark.parametrize("T", [1, 7, 8, 19, 53])  # chunk 8: 53 = 48 via prefill + 5 steps
def test_prefill_equals_sequential_steps(which, T, request):
    eng = request.getfixturevalue("tok_engine" if which == "tokens" else "sig_engine")
    rng = np.random.default_rng(T)
    s0 = rng.standard_normal((2, eng.state_size)).astype(np.float32) * 0.1
    x = random_inputs(eng, rng, B=2, T=T)
    ys, s = step_loop(eng, x, s0)
    yp, sp = eng.prefill(x, s0)
    assert yp.shape == (2, T, eng.d_output)
    scale = max(1.0, np.abs(ys).max())
    assert np.abs(yp - ys).max() <= 1e-4 * scale
    assert np.abs(sp - s).max() <= 1e-4 * max(1.0, np.abs(s).max())


def test_batched_step_equals_each_alone(tok_engine):
    eng, rng = tok_engine, np.random.default_rng(1)
    B = 5
    states = rng.standard_normal((B, eng.state_size)).astype(np.float32) * 0.2
    tokens = rng.integers(0, eng.vocab_size, size=B)
    yb, sb = eng.step(tokens, states)
    for i in range(B):
        y1, s1 = eng.step(tokens[i : i + 1], states[i : i + 1])
        np.testing.assert_allclose(yb[i], y1[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sb[i], s1[0], rtol=1e-5, atol=1e-6)


# --- toy graphs: engine vs an independent numpy recurrence ------------------------------


@pytest.mark.parametrize("kind", ["tokens", "values"])
def test_toy_step_and_prefill_match_numpy_reference(kind, request):
    toy = request.getfixturevalue("toy_token_model" if kind == "tokens" else "toy_signal_model")
    eng = Engine(toy["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(2)
    x = random_inputs(eng, rng, B=3, T=29)
    s0 = rng.standard_normal((3, toy["S"])).astype(np.float32)
    ref_y, ref_s = toy["reference"](x, s0)
    ys, s = step_loop(eng, x, s0)
    yp, sp = eng.prefill(x, s0)
    for y, st in ((ys, s), (yp, sp)):
        np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(st, ref_s, rtol=1e-4, atol=1e-4)


class _SpySession:
    """Records the input shapes a graph is run with."""

    def __init__(self, sess):
        self.sess, self.shapes = sess, []

    def run(self, names, feeds):
        self.shapes.append(feeds["input"].shape)
        return self.sess.run(names, feeds)


def test_prefill_splits_into_full_chunks_then_steps(toy_token_model):
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1)  # chunk 4, max_len 12
    spy = _SpySession(eng._prefill_session)
    eng._prefill_session = spy
    x = np.arange(29).reshape(1, 29) % toy_token_model["V"]
    y, s = eng.prefill(x, eng.new_state())
    assert spy.shapes == [(1, 12), (1, 12), (1, 4)]  # 28 via prefill, the 29th via step
    ref_y, ref_s = toy_token_model["reference"](x, eng.new_state())
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    spy.shapes.clear()
    eng.prefill(x[:, :3], eng.new_state())  # shorter than a chunk: steps only
    eng.prefill(x[:, :1], eng.new_state())  # T = 1 is a step
    assert spy.shapes == []


# --- StepBuffers ----------------------------------------------------------------------


def test_step_buffers_equal_fresh_outputs_and_are_reused(tok_engine):
    eng, rng = tok_engine, np.random.default_rng(3)
    a, b = eng.step_buffers(4), eng.step_buffers(4)
    s_ref = s = eng.new_state(3)
    for t in range(6):
        tokens = rng.integers(0, eng.vocab_size, size=3)
        y_ref, s_ref = eng.step(tokens, s_ref)
        buf = a if t % 2 == 0 else b
        y, s = eng.step(tokens, s, out=buf)
        assert np.shares_memory(y, buf.outputs) and np.shares_memory(s, buf.new_states)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(s, s_ref)
    with pytest.raises(InvalidInput, match="states"):
        eng.step(np.zeros(3, dtype=np.int64), a.new_states[:3], out=a)  # aliasing its output
    with pytest.raises(InvalidInput, match="out"):
        eng.step(np.zeros(5, dtype=np.int64), eng.new_state(5), out=a)  # batch > max_batch


@pytest.mark.parametrize("which", ["tok_engine", "sig_engine"])
def test_chunked_step_buffers_equal_one_call_per_row(which, request):
    """A batch run as ORT calls of chunk_rows streams (here 3 rows: 3 + 3 + 1 for B = 7)
    equals each stream stepped alone, outputs and states, and writes rows in place."""
    eng, rng = request.getfixturevalue(which), np.random.default_rng(5)
    B = 7
    buf = eng.step_buffers(8, chunk_bytes=3 * 4 * eng.state_size)
    assert buf.chunk_rows == 3
    assert eng.step_buffers(8, chunk_bytes=1).chunk_rows == 1  # at least one stream per call
    x = random_inputs(eng, rng, B, 1)[:, 0]  # [B] | [B, d_in]
    s = (rng.standard_normal((B, eng.state_size)) * 0.1).astype(np.float32)  # [B, S]
    y, s_new = eng.step(x, s, out=buf)
    assert np.shares_memory(y, buf.outputs) and np.shares_memory(s_new, buf.new_states)
    for j in range(B):
        y_j, s_j = eng.step(x[j : j + 1], s[j : j + 1])  # its own ORT call, no buffers
        np.testing.assert_allclose(y[j : j + 1], y_j, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_new[j : j + 1], s_j, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInput, match="chunk_bytes"):
        eng.step_buffers(8, chunk_bytes=0)


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, match",
    [
        (np.array([23]), "outside"),  # vocab_size = 23
        (np.array([-1]), "outside"),
        (np.array([1.0]), "integer token ids"),
        (np.array([[1]]), "shape"),
        (np.array([], dtype=np.int64), "shape"),
        ([], r"must have shape \[B\] \(non-empty\), got \(0,\)$"),  # numpy: float64
        (np.array(["a"]), "integer token ids"),
    ],
)
def test_bad_tokens_name_the_field_and_change_nothing(tok_engine, inputs, match):
    s = np.full((1, tok_engine.state_size), 0.5, dtype=np.float32)
    before = s.copy()
    with pytest.raises(InvalidInput, match=match) as e:
        tok_engine.step(inputs, s)
    assert e.value.field == "inputs"
    np.testing.assert_array_equal(s, before)


@pytest.mark.parametrize(
    "inputs, match",
    [
        (np.array([[np.nan, 0, 0]], dtype=np.float32), "NaN"),
        (np.array([[np.inf, 0, 0]]), "NaN or inf"),
        (np.array([[1e300, 0, 0]]), "overflow"),  # finite float64, inf as float32
        (np.zeros((1, 4), dtype=np.float32), "d_input=3"),
        (np.zeros(3, dtype=np.float32), "shape"),
        (np.array([[True, False, True]]), "real numbers"),
    ],
)
def test_bad_values_name_the_field(sig_engine, inputs, match):
    with pytest.raises(InvalidInput, match=match) as e:
        sig_engine.step(inputs, sig_engine.new_state())
    assert e.value.field == "inputs"


def test_bad_states_and_arguments(tok_engine):
    eng = tok_engine
    with pytest.raises(InvalidInput, match=r"states.*\[2, S=64\]"):
        eng.step(np.array([1, 2]), eng.new_state(1))
    with pytest.raises(InvalidInput, match="states"):
        eng.step(np.array([1]), np.zeros((1, 64), dtype=np.int32))
    with pytest.raises(InvalidInput, match="batch"):
        eng.new_state(0)
    for kwargs, field in (({"max_batch": 0}, "max_batch"), ({"chunk_bytes": 0}, "chunk_bytes")):
        with pytest.raises(InvalidInput, match="must be a positive integer, got 0") as e:
            eng.step_buffers(**kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidInput, match="inputs"):
        eng.prefill(np.array([1, 2, 3]), eng.new_state())  # needs [B, T]
    # a float64 state is accepted and converted (its values kept), giving the float32 result
    s64 = np.random.default_rng(0).standard_normal((1, eng.state_size)) * 0.1
    y64, n64 = eng.step(np.array([3]), s64)
    y32, n32 = eng.step(np.array([3]), s64.astype(np.float32))
    np.testing.assert_array_equal(y64, y32)
    np.testing.assert_array_equal(n64, n32)
    y_zero, _ = eng.step(np.array([3]), eng.new_state())
    assert not np.allclose(y64, y_zero)  # the state's values mattered
    y0, _ = eng.step(3, eng.new_state())  # a scalar token is a batch of one
    np.testing.assert_array_equal(y0, y_zero)
    # ragged nested lists (prompts of different lengths, a short state row) name the field
    S = eng.state_size
    for call, field in (
        (lambda: eng.prefill([[1, 2], [3]], eng.new_state(2)), "inputs"),
        (lambda: eng.step([[1], [2, 3]], eng.new_state(2)), "inputs"),
        (lambda: eng.step([1, 2], [[0.0] * S, [0.0] * (S - 1)]), "states"),
    ):
        with pytest.raises(InvalidInput, match="rectangular") as e:
            call()
        assert e.value.field == field
    # StepBuffers hold IOBindings of the engine that made them: another engine's are refused
    other = Engine(eng.model_dir, device="cpu").step_buffers(2)
    with pytest.raises(InvalidInput, match="this engine") as e:
        eng.step(np.array([1, 2]), eng.new_state(2), out=other)
    assert e.value.field == "out"
    with pytest.raises(InvalidInput, match="this engine") as e:
        eng.step_slots(np.array([1]), [0], eng.new_slab(2), out=other)
    assert e.value.field == "out"


def test_engine_failure_is_wrapped(toy_tok, monkeypatch):
    class Broken:
        def run(self, *a, **k):
            raise RuntimeError("boom")

    monkeypatch.setattr(toy_tok, "_step_session", Broken())
    with pytest.raises(EngineFailure, match="boom"):
        toy_tok.step(np.array([1]), toy_tok.new_state())


def test_model_dir_errors(toy_token_model, tmp_path):
    with pytest.raises(ModelError, match="nothing does not exist"):
        Engine(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="manifest.json is missing"):
        Engine(tmp_path / "empty")
    manifest = toy_token_model["model_dir"] / "manifest.json"
    for path in (manifest, str(manifest)):  # the file, not its directory
        with pytest.raises(ModelError) as e:
            Engine(path)
        assert str(e.value) == (
            f"{manifest} is a file: give the exported model's directory (the one that holds "
            "manifest.json)"
        )
    with pytest.raises(InvalidInput, match=r"^model_dir: must be a path, got NoneType$"):
        Engine(None)
    ckpt = tmp_path / "ckpt"  # what `ssmstream train` writes, given before its export
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ModelError) as e:
        Engine(ckpt)
    assert str(e.value) == (
        f"{ckpt / 'manifest.json'} is missing: not an exported ssmstream model directory "
        f"({ckpt} is a checkpoint: export it first)"
    )
    bad = tmp_path / "tampered"
    shutil.copytree(toy_token_model["model_dir"], bad)
    with open(bad / "step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        Engine(bad)
    renamed = tmp_path / "renamed"
    shutil.copytree(toy_token_model["model_dir"], renamed)
    m = json.loads((renamed / "manifest.json").read_text())
    m["state_size"] = 9  # the graph says 8
    (renamed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="state"):
        Engine(renamed)
    with pytest.raises(InvalidInput, match="device"):
        Engine(toy_token_model["model_dir"], device="tpu")
    with pytest.raises(InvalidInput, match="threads"):
        Engine(toy_token_model["model_dir"], threads=0)


@pytest.mark.skipif(cuda_usable()[0], reason="CUDA is usable here")
def test_cuda_requested_without_cuda_is_a_clear_error(toy_token_model, caplog):
    with pytest.raises(InvalidInput, match="cuda"):
        Engine(toy_token_model["model_dir"], device="cuda")
    with caplog.at_level("INFO", logger="ssmstream.runtime.engine"):
        eng = Engine(toy_token_model["model_dir"], device="auto")
    assert eng.provider == "CPUExecutionProvider"
    said = [r.getMessage() for r in caplog.records if "CUDA not usable" in r.getMessage()]
    assert len(said) == 1, said  # once, not once per graph


def test_auto_falls_back_to_cpu_when_the_cuda_session_fails(toy_token_model, monkeypatch):
    import ssmstream.runtime.engine as engine_module

    real = engine_module.ort.InferenceSession

    def no_gpu(path, opts, providers):
        if any("CUDA" in (p if isinstance(p, str) else p[0]) for p in providers):
            raise RuntimeError("CUDA failure: no device")
        return real(path, opts, providers=providers)

    monkeypatch.setattr(engine_module, "cuda_usable", lambda: (True, ""))
    monkeypatch.setattr(engine_module.ort, "InferenceSession", no_gpu)
    eng = Engine(toy_token_model["model_dir"], device="auto")
    assert eng.provider == "CPUExecutionProvider" and eng.info["provider"] == eng.provider
    with pytest.raises(ModelError, match="no device"):
        Engine(toy_token_model["model_dir"], device="cuda")


def test_graphs_ask_for_cpu_alone_once_onnxruntime_fell_back_by_itself(
    toy_token_model, monkeypatch
):
    """onnxruntime may accept the CUDA provider and still run the step graph on CPU (it
    logs and falls back); the slot and prefill graphs then do not ask for CUDA again."""
    import ssmstream.runtime.engine as engine_module

    real, asked = engine_module.ort.InferenceSession, []

    def falls_back(path, opts, providers):
        asked.append([p if isinstance(p, str) else p[0] for p in providers])
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(engine_module, "cuda_usable", lambda: (True, ""))
    monkeypatch.setattr(engine_module.ort, "InferenceSession", falls_back)
    eng = Engine(toy_token_model["model_dir"], device="auto")
    assert eng.provider == "CPUExecutionProvider" and eng.prefill_chunk
    assert asked[0][0] == "CUDAExecutionProvider" and len(asked) == 3  # step, prefill, slots
    assert asked[1:] == [["CPUExecutionProvider"]] * 2


def test_info(tok_engine, tiny_token_model):
    info = tok_engine.info
    cfg = tiny_token_model["config"]
    assert info["input_kind"] == "tokens" and info["vocab_size"] == cfg.vocab_size
    assert info["state_size"] == cfg.state_size and info["state_bytes"] == 4 * cfg.state_size
    assert info["d_output"] == cfg.d_output and info["prefill_chunk"] == 8
    assert info["provider"] == "CPUExecutionProvider"
    m = json.loads((tiny_token_model["model_dir"] / "manifest.json").read_text())
    assert info["step_sha256"] == m["graphs"]["step"]["sha256"]


# --- generate -------------------------------------------------------------------------


def test_greedy_generate_follows_argmax_of_manual_steps(tok_engine):
    eng = tok_engine
    prompt = [1, 2, 3, 4]
    got = list(eng.generate(prompt, max_new_tokens=8, temperature=0))
    y, s = eng.prefill(np.array([prompt]), eng.new_state())
    want, logits = [], y[0, -1]
    for _ in range(8):
        tok = int(np.argmax(logits))
        want.append(tok)
        y, s = eng.step(np.array([tok]), s)
        logits = y[0]
    assert got == want


def test_generate_seeded_stop_and_state_in_place(tok_engine):
    eng = tok_engine
    a = list(eng.generate([5, 6], max_new_tokens=12, seed=7, temperature=1.5))
    b = list(eng.generate([5, 6], max_new_tokens=12, seed=7, temperature=1.5))
    assert a == b and len(a) == 12 and all(0 <= t < eng.vocab_size for t in a)
    stop = a[3]
    c = list(eng.generate([5, 6], max_new_tokens=12, seed=7, temperature=1.5, stop=[stop]))
    assert c == a[: a.index(stop) + 1]

    # the seed and temperature reach the sampler: the same draw by hand (Sampler over the
    # engine's logits, step by step), and another seed draws another sequence
    def by_hand(seed):
        sampler = Sampler(SamplingConfig(1.5, 0, 1.0, seed))
        y, s = eng.prefill(np.array([[5, 6]]), eng.new_state())
        logits, toks = y[0, -1], []
        for _ in range(12):
            toks.append(sampler(logits))
            y, s = eng.step(np.array([toks[-1]]), s)
            logits = y[0]
        return toks

    assert a == by_hand(7) and by_hand(8) != a
    stops = (t for t in [stop])  # any iterable of ids, as documented
    assert list(eng.generate([5, 6], max_new_tokens=12, seed=7, temperature=1.5, stop=stops)) == c
    # state in place: prompt + every yielded token consumed
    state = np.zeros(eng.state_size, dtype=np.float32)
    toks = list(eng.generate([5, 6], state=state, max_new_tokens=5, seed=3))
    _, s = eng.prefill(np.array([[5, 6, *toks]]), eng.new_state())
    np.testing.assert_allclose(state, s[0], rtol=1e-5, atol=1e-6)
    # closing early also leaves the state consistent
    state2 = np.zeros((1, eng.state_size), dtype=np.float32)
    it = eng.generate([5, 6], state=state2, max_new_tokens=50, seed=3)
    first = [next(it), next(it)]
    it.close()
    _, s2 = eng.prefill(np.array([[5, 6, *first]]), eng.new_state())
    np.testing.assert_allclose(state2, s2, rtol=1e-5, atol=1e-6)


def test_generate_starts_from_the_state_it_was_given_and_checked(toy_tok):
    """The state is checked when generate is called and the prompt consumed at the first
    next(): what the caller writes into the array in between is not read (a NaN there
    would reach the sampler unchecked), and the array is still updated at the end."""
    eng = toy_tok
    given = (np.random.default_rng(4).standard_normal(eng.state_size) * 0.3).astype(np.float32)
    want_state = given.copy()
    want = list(eng.generate([1, 2], state=want_state, max_new_tokens=3, seed=4))
    state = given.copy()
    tokens = eng.generate([1, 2], state=state, max_new_tokens=3, seed=4)
    state[:] = np.nan
    assert list(tokens) == want
    np.testing.assert_array_equal(state, want_state)
    assert not np.array_equal(want_state, given)


def test_generate_nothing_still_consumes_the_prompt_into_the_state(tok_engine):
    eng = tok_engine
    state = np.zeros(eng.state_size, dtype=np.float32)
    assert list(eng.generate([5, 6, 7], state=state, max_new_tokens=0)) == []
    _, s = eng.prefill(np.array([[5, 6, 7]]), eng.new_state())
    np.testing.assert_allclose(state, s[0], rtol=1e-5, atol=1e-6)


def test_an_edited_or_malformed_manifest_is_refused_naming_the_field(tiny_token_model, tmp_path):
    """A manifest whose prefill chunk or max_len differs from what the graph was exported
    with (the graph carries its own copy) would make the runtime pad and cut prompts wrong,
    one whose vocab_size or d_output does would check tokens against another vocabulary or
    size outputs wrong: refused when the model opens (by the step graph's copy too); a graph
    entry without file/sha256 or a bad chunk is a ModelError, not a KeyError or
    ZeroDivisionError."""

    def edited(change):
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_token_model["model_dir"], d)
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    chunk = json.loads((tiny_token_model["model_dir"] / "manifest.json").read_text())["graphs"][
        "prefill"
    ]["chunk"]
    for change, words in (
        (lambda m: m["graphs"]["prefill"].update(chunk=2 * chunk), "graphs.prefill.chunk"),
        (lambda m: m["graphs"]["prefill"].update(max_len=8 * chunk), "graphs.prefill.max_len"),
        (lambda m: m["graphs"]["prefill"].update(chunk=0), "graphs.prefill.chunk"),
        (lambda m: m["graphs"]["step"].pop("sha256"), "graphs.step"),
        (lambda m: m["graphs"].update(step=["step.onnx"]), "graphs.step"),
        (lambda m: m.update(vocab_size=30), "vocab_size is 30, the prefill graph"),
        (lambda m: m.update(d_output=30), "d_output is 30, the prefill graph"),
        (
            lambda m: (m.update(vocab_size=30), m["graphs"].pop("prefill")),
            "vocab_size is 30, the step",
        ),
    ):
        with pytest.raises(ModelError, match=words.replace(".", r"\.")):
            Engine(edited(change), device="cpu")


def test_generate_bad_arguments(tok_engine, sig_engine, make_toy, tmp_path):
    for empty in ([], (), np.array([], dtype=np.int64)):  # not "must be integers" nor [1, 0]
        with pytest.raises(InvalidInput) as e:
            tok_engine.generate(empty, max_new_tokens=3)
        assert str(e.value) == "prompt: needs at least one token"
    with pytest.raises(InvalidInput, match=r"tokens must have shape \[B, T\] \(non-empty\)"):
        tok_engine.prefill([[]], tok_engine.new_state())
    with pytest.raises(InvalidInput, match="prompt"):
        tok_engine.generate([99], max_new_tokens=3)
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        tok_engine.generate([1], max_new_tokens=-1)
    with pytest.raises(InvalidInput, match="top_p"):
        tok_engine.generate([1], top_p=-0.1)
    with pytest.raises(InvalidInput, match="state"):
        tok_engine.generate([1], state=np.zeros(3, dtype=np.float32))
    for stop in ([99], ["a"], [1.5], 5):  # (None: no stop token)
        with pytest.raises(InvalidInput, match="stop"):
            tok_engine.generate([1], stop=stop)
    for prompt in (None, [[1], [2, 3]], np.array([[1, 2]]), 1.5):
        with pytest.raises(InvalidInput) as e:
            tok_engine.generate(prompt)
        assert e.value.field == "prompt"
    # more outputs than tokens: it would sample ids the model cannot take (fewer: a subset)
    wide = Engine(make_toy(tmp_path / "wide", "tokens", V=11, d_out=40)["model_dir"], device="cpu")
    with pytest.raises(ModelError, match="d_output=40 is more than its vocab_size=11"):
        wide.generate([1], max_new_tokens=3)
    # a single id is a one-token prompt, as a scalar token is a batch of one for step
    one = list(tok_engine.generate(np.int64(5), max_new_tokens=3, temperature=0))
    assert one == list(tok_engine.generate([5], max_new_tokens=3, temperature=0))
    with pytest.raises(InvalidInput, match="token model"):
        sig_engine.generate([1])


def test_step_graph_runs_on_the_calling_thread_and_no_pool_spins(toy_token_model):
    """The step graph has no intra-op pool, the prefill graph has the threads asked for,
    no pool spins while idle; a step graph with a pool of 2 gives the same numbers."""
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=2)
    pooled = Engine(toy_token_model["model_dir"], device="cpu", threads=2, step_threads=2)
    spin = "session.intra_op.allow_spinning"
    step, prefill = (
        eng.step_session.get_session_options(),
        eng._prefill_session.get_session_options(),
    )
    assert step.intra_op_num_threads == 1 and prefill.intra_op_num_threads == 2
    assert pooled.step_session.get_session_options().intra_op_num_threads == 2
    assert step.get_session_config_entry(spin) == prefill.get_session_config_entry(spin) == "0"
    rng = np.random.default_rng(5)
    s1 = s2 = eng.new_state(3)
    for _ in range(20):
        x = rng.integers(0, eng.vocab_size, size=3)  # [3]
        y1, s1 = eng.step(x, s1)
        y2, s2 = pooled.step(x, s2)
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInput) as e:
        Engine(toy_token_model["model_dir"], step_threads=0)
    assert e.value.field == "step_threads"


def _copy_with_manifest(src, dst, change):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("name", ["threads", "step_threads"])
def test_a_bool_thread_count_is_refused_naming_the_field(toy_token_model, name):
    """A bool is not a thread count, nor are 0 or more than 1,024 (onnxruntime would take
    minutes to start 10⁵); a numpy integer is one (as for step_buffers)."""
    for bad in (True, 0, 1025, 100_000):
        with pytest.raises(InvalidInput) as e:
            Engine(toy_token_model["model_dir"], device="cpu", **{name: bad})
        assert e.value.field == name
        assert f"must be an integer in [1, 1024] or None, got {bad!r}" in str(e.value)
    eng = Engine(toy_token_model["model_dir"], device="cpu", **{name: np.int64(2)})
    y, _ = eng.step(np.array([1]), eng.new_state())
    want, _ = Engine(toy_token_model["model_dir"], device="cpu").step(
        np.array([1]), eng.new_state()
    )
    np.testing.assert_array_equal(y, want)


def test_max_len_not_a_multiple_of_the_chunk_is_rounded_down(toy_token_model, tmp_path):
    """A hand-written manifest (no embedded copy) with max_len 14, chunk 4: the engine calls
    the prefill graph with at most 12 inputs (whole chunks; this graph takes no `length`)."""
    d = _copy_with_manifest(
        toy_token_model["model_dir"],
        tmp_path / "m",
        lambda m: m["graphs"]["prefill"].update(max_len=14),
    )
    eng = Engine(d, device="cpu", threads=1)
    assert eng.prefill_chunk == 4 and eng.prefill_max_len == 12
    assert eng.info["prefill_max_len"] == 12
    spy = _SpySession(eng._prefill_session)
    eng._prefill_session = spy
    x = np.arange(29).reshape(1, 29) % toy_token_model["V"]
    y, s = eng.prefill(x, eng.new_state())
    assert spy.shapes == [(1, 12), (1, 12), (1, 4)]
    ref_y, ref_s = toy_token_model["reference"](x, eng.new_state())
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-4)


def test_padded_chunk_thresholds_of_an_any_length_prefill(tok_engine):
    """chunk C = 8, max_len 128, the graph takes `length`: a prompt's r = T % C trailing inputs
    go through the prefill graph (in a padded chunk) when r >= C/2 for a call that holds only
    that chunk, r >= C/4 after whole chunks; else they are stepped. Outputs equal steps."""
    eng = tok_engine
    assert eng.prefill_any_length and eng.prefill_chunk == 8 and eng.prefill_max_len == 128
    assert eng.info["prefill_any_length"] is True
    real = eng._prefill_session
    spy = _SpySession(real)
    eng._prefill_session = spy
    try:
        rng = np.random.default_rng(0)
        for T, want in (
            (3, []),  # alone, r = 3 < 4: stepped
            (4, [(1, 8)]),  # alone, r = 4 = C/2: one padded chunk
            (9, [(1, 8)]),  # after a whole chunk, r = 1 < 2: 8 via prefill, 1 step
            (10, [(1, 16)]),  # after a whole chunk, r = 2 = C/4: padded
        ):
            spy.shapes.clear()
            x = rng.integers(0, eng.vocab_size, size=(1, T))
            y, s = eng.prefill(x, eng.new_state())
            assert spy.shapes == want, T
            ys, st = [], eng.new_state()
            for t in range(T):
                yt, st = eng.step(x[:, t], st)
                ys.append(yt)
            np.testing.assert_allclose(y, np.stack(ys, 1), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(s, st, rtol=1e-4, atol=1e-5)
    finally:
        eng._prefill_session = real


def test_a_batch_of_exactly_max_batch_fits_the_step_buffers(toy_tok):
    eng = toy_tok
    buf = eng.step_buffers(4)
    x = np.array([1, 2, 3, 4])
    s = (np.random.default_rng(0).standard_normal((4, eng.state_size)) * 0.1).astype(np.float32)
    want_y, want_s = eng.step(x, s)
    y, s_new = eng.step(x, s, out=buf)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(s_new, want_s)
    with pytest.raises(InvalidInput, match="holds 4 streams, the batch has 5") as e:
        eng.step(np.arange(5), eng.new_state(5), out=buf)
    assert e.value.field == "out"


def test_fewer_slots_than_inputs_is_refused_and_changes_nothing(toy_tok):
    slab = toy_tok.new_slab(4)
    before = (np.random.default_rng(1).standard_normal((4, toy_tok.state_size))).astype(np.float32)
    slab.array[:] = before
    with pytest.raises(InvalidInput, match="has 1 slots for 2 inputs") as e:
        toy_tok.step_slots(np.array([1, 2]), [0], slab)
    assert e.value.field == "slots"
    np.testing.assert_array_equal(slab.array, before)


def _bad_states(S):
    ro = np.zeros(S, dtype=np.float32)
    ro.flags.writeable = False
    return {
        "read-only": ro,
        "strided": np.zeros(2 * S, dtype=np.float32)[::2],
        "float64": np.zeros(S, dtype=np.float64),
    }


@pytest.mark.parametrize("which", ["read-only", "strided", "float64"])
def test_generate_refuses_a_state_it_cannot_update_in_place(toy_tok, which):
    """Checked when generate is called, before any token: not a late ValueError from the
    write-back, an EngineFailure from onnxruntime, or a silent success."""
    state = _bad_states(toy_tok.state_size)[which]
    with pytest.raises(InvalidInput) as e:
        toy_tok.generate([1, 2], state=state, max_new_tokens=3, temperature=0)
    assert e.value.field == "state"
    assert "writeable C-contiguous float32" in str(e.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.uint64])
def test_unsigned_token_equal_to_vocab_size_is_refused(toy_tok, dtype):
    V = toy_tok.vocab_size
    with pytest.raises(InvalidInput) as e:
        toy_tok.step(np.array([V], dtype=dtype), toy_tok.new_state())
    assert e.value.field == "inputs"
    assert f"token {V} is outside [0, vocab_size={V})" in str(e.value)
    y, _ = toy_tok.step(np.array([V - 1], dtype=dtype), toy_tok.new_state())  # the last id is fine
    want, _ = toy_tok.step(np.array([V - 1]), toy_tok.new_state())
    np.testing.assert_array_equal(y, want)


def test_a_manifest_input_kind_that_contradicts_the_graph_is_refused(toy_token_model, tmp_path):
    d = _copy_with_manifest(
        toy_token_model["model_dir"],
        tmp_path / "m",
        lambda m: m.update(input_kind="values", vocab_size=None, d_input=3),
    )
    with pytest.raises(ModelError, match=r"graph input has rank 1, expected 2"):
        Engine(d, device="cpu")


def test_a_graph_input_of_an_unsupported_type_is_a_model_error(toy_token_model, tmp_path):
    onnx = pytest.importorskip("onnx")
    d = _copy_with_manifest(
        toy_token_model["model_dir"], tmp_path / "m", lambda m: m["graphs"].pop("prefill")
    )
    model = onnx.load(d / "step.onnx")
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32  # Gather takes it
    onnx.save(model, d / "step.onnx")
    with pytest.raises(ModelError, match=r"graph input has unsupported type tensor\(int32\)"):
        Engine(d, device="cpu", check_sha=False)


def test_step_buffers_reused_with_another_slab_step_that_slab(toy_tok):
    """StepBuffers cache the slot binding per batch size for one slab; stepping another slab
    with the same buffers must rebind, not step the first slab's rows."""
    eng = toy_tok
    rng = np.random.default_rng(4)
    buf = eng.step_buffers(4)
    slabs, states = [], []
    for _ in range(2):
        slab = eng.new_slab(3)
        st = (rng.standard_normal((3, eng.state_size)) * 0.3).astype(np.float32)
        slab.array[:] = st
        slabs.append(slab)
        states.append(st)
    x = np.array([1, 2])
    for slab, st in zip(slabs, states):
        want_y, want_s = eng.step(x, st[[2, 0]])
        y = eng.step_slots(x, [2, 0], slab, out=buf)
        np.testing.assert_array_equal(y, want_y)
        st[[2, 0]] = want_s
    for slab, st in zip(slabs, states):
        np.testing.assert_array_equal(slab.array, st)


def test_prefill_chunk_states_never_report_the_padding(tok_engine):
    """prefill_unchecked(states={}) reports the state after every whole chunk and after T; a
    padded last chunk's end (past T, the state after the padding) is not a state of the
    prompt: with chunk 8, T = 21 runs in one call padded to 24 and reports {8, 16, 21}."""
    eng = tok_engine
    assert eng.prefill_any_length and eng.prefill_chunk_states and eng.prefill_chunk == 8
    rng = np.random.default_rng(12)
    x = rng.integers(0, eng.vocab_size, size=(1, 21))
    s0 = (rng.standard_normal((1, eng.state_size)) * 0.1).astype(np.float32)
    states = {}
    _, s = eng.prefill_unchecked(x, s0, states)
    assert sorted(states) == [8, 16, 21]
    st = s0
    for t in range(21):
        _, st = eng.step(x[:, t], st)
        if t + 1 in states:
            np.testing.assert_allclose(states[t + 1], st, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(states[21], s)


def _recording_sessions(monkeypatch, usable):
    """cuda_usable() -> usable; every InferenceSession records the providers asked for and
    runs on CPU (as onnxruntime does when it falls back by itself)."""
    import ssmstream.runtime.engine as engine_module

    real, asked = engine_module.ort.InferenceSession, []

    def session(path, opts, providers):
        asked.append([p if isinstance(p, str) else p[0] for p in providers])
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(engine_module, "cuda_usable", lambda: usable)
    monkeypatch.setattr(engine_module.ort, "InferenceSession", session)
    return asked


def test_cuda_requested_but_run_on_cpu_is_refused(toy_token_model, monkeypatch):
    """device='cuda' is a promise: onnxruntime accepting the CUDA provider and then running the
    graph on CPU is an error naming the device, not a silent CPU engine."""
    _recording_sessions(monkeypatch, (True, ""))
    with pytest.raises(InvalidInput) as e:
        Engine(toy_token_model["model_dir"], device="cuda")
    assert e.value.field == "device"
    assert "'cuda' requested but onnxruntime runs CPUExecutionProvider" in str(e.value)


def test_auto_without_usable_cuda_asks_for_cpu_only(toy_token_model, monkeypatch):
    asked = _recording_sessions(monkeypatch, (False, "no driver"))
    eng = Engine(toy_token_model["model_dir"], device="auto")
    assert eng.device == "cpu" and eng.provider == "CPUExecutionProvider"
    assert asked == [["CPUExecutionProvider"]] * 3  # step, prefill, slots


def _edited(toy, tmp_path, change, name="m"):
    d = tmp_path / name
    shutil.copytree(toy["model_dir"], d)
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("kind", ["text", None, 3])
def test_an_unknown_input_kind_is_refused_naming_the_field(toy_token_model, tmp_path, kind):
    d = _edited(toy_token_model, tmp_path, lambda m: m.update(input_kind=kind))
    with pytest.raises(ModelError, match=rf"input_kind must be 'tokens' or 'values', got {kind!r}"):
        load_manifest(d)
    with pytest.raises(ModelError, match="input_kind"):
        Engine(d, device="cpu")


def test_graphs_without_a_step_graph_are_refused(toy_token_model, tmp_path):
    d = _edited(toy_token_model, tmp_path, lambda m: m["graphs"].pop("step"))
    with pytest.raises(ModelError, match="graphs must be an object with a 'step' graph"):
        load_manifest(d)
    with pytest.raises(ModelError, match="'step' graph"):  # not a KeyError
        Engine(d, device="cpu")


@pytest.mark.parametrize(
    "change", [lambda m: m.pop("format_version"), lambda m: m.update(format_version=0)]
)
def test_a_missing_or_older_format_version_is_refused(toy_token_model, tmp_path, change):
    d = _edited(toy_token_model, tmp_path, change)
    with pytest.raises(ModelError, match=r"format_version (None|0) is not supported"):
        load_manifest(d)


def _edit_manifest(model_dir, change):
    m = json.loads((model_dir / "manifest.json").read_text())
    change(m)
    (model_dir / "manifest.json").write_text(json.dumps(m))


def test_a_prefill_graph_without_chunk_or_max_len_takes_chunks_of_one_up_to_4096(
    make_toy, tmp_path
):
    """A manifest whose prefill entry gives neither chunk nor
    max_len means chunk 1 and max_len 4096 (the documented defaults), and prefill still
    equals the reference recurrence."""
    toy = make_toy(tmp_path / "m", "tokens")

    def drop(m):
        del m["graphs"]["prefill"]["chunk"], m["graphs"]["prefill"]["max_len"]

    _edit_manifest(toy["model_dir"], drop)
    eng = Engine(toy["model_dir"], device="cpu", threads=1)
    assert (eng.prefill_chunk, eng.prefill_max_len) == (1, 4096)
    assert (eng.info["prefill_chunk"], eng.info["prefill_max_len"]) == (1, 4096)
    x = np.arange(7, dtype=np.int64)[None] % toy["V"]
    y, s = eng.prefill(x, eng.new_state())
    ry, rs = toy["reference"](x, np.zeros((1, toy["S"])))
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)


def _rewrite_graph(model_dir, name, change):
    """Edit graph `name` with onnx and update its sha256 in the manifest."""
    import hashlib

    import onnx

    f = model_dir / name
    model = onnx.load(f)
    change(model)
    onnx.save(model, f)
    key = name.removesuffix(".onnx")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    _edit_manifest(model_dir, lambda m: m["graphs"][key].update(sha256=sha))


def test_a_step_graph_with_an_extra_input_is_a_model_error_naming_its_inputs(make_toy, tmp_path):
    """A graph whose inputs are not exactly [input, state] is
    refused when the model opens, saying what it has and what is expected."""
    from onnx import TensorProto
    from onnx import helper as oh
    from ssmstream.runtime.errors import ModelError

    toy = make_toy(tmp_path / "m", "tokens")
    _rewrite_graph(
        toy["model_dir"], "step.onnx",
        lambda m: m.graph.input.append(oh.make_tensor_value_info("extra", TensorProto.FLOAT, [1])),
    )  # fmt: skip
    with pytest.raises(ModelError) as e:
        Engine(toy["model_dir"], device="cpu", threads=1)
    assert "step graph has inputs ['extra', 'input', 'state']" in str(e.value)
    assert "expected ['input', 'state'] -> ['output', 'state_out']" in str(e.value)


def test_integer_values_are_accepted_and_equal_their_float_values(toy_sig):
    """Values may be integers (dtype kind i/u), converted to
    float32."""
    xi = np.array([[1, 0, 2], [3, 1, 0]], dtype=np.int64)
    for x in (xi, xi.astype(np.uint8)):
        y, s = toy_sig.step(x, toy_sig.new_state(2))
        yf, sf = toy_sig.step(xi.astype(np.float32), toy_sig.new_state(2))
        np.testing.assert_array_equal(y, yf)
        np.testing.assert_array_equal(s, sf)


def test_a_short_remainder_after_max_len_inputs_is_stepped_not_padded(tok_engine):
    """With C = 8, max_len 128, a prompt of 130 = 128 + 2 has
    a last prefill call that would hold only the padded chunk ("alone": r >= C/2 needed),
    so its 2 trailing inputs are stepped; the outputs still equal steps."""
    eng = tok_engine
    assert (eng.prefill_chunk, eng.prefill_max_len, eng.prefill_any_length) == (8, 128, True)
    real, spy = eng._prefill_session, _SpySession(eng._prefill_session)
    eng._prefill_session = spy
    try:
        x = np.random.default_rng(0).integers(0, eng.vocab_size, size=(1, 130))
        y, s = eng.prefill(x, eng.new_state())
        assert spy.shapes == [(1, 128)]
        spy.shapes.clear()
        # 128 + 4: r = C/2 is worth a padded call of its own
        x = np.random.default_rng(1).integers(0, eng.vocab_size, size=(1, 132))
        eng.prefill(x, eng.new_state())
        assert spy.shapes == [(1, 128), (1, 8)]
    finally:
        eng._prefill_session = real
    st, ys = eng.new_state(), []
    x = np.random.default_rng(0).integers(0, eng.vocab_size, size=(1, 130))
    for t in range(130):
        yt, st = eng.step(x[:, t], st)
        ys.append(yt)
    np.testing.assert_allclose(y, np.stack(ys, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, st, rtol=1e-4, atol=1e-5)


def test_generate_refuses_a_state_of_the_right_size_but_wrong_shape(toy_tok):
    """The state must be [S] or [1, S]; [S, 1] (same size) is
    refused naming `state` and left unchanged."""
    st = np.zeros((toy_tok.state_size, 1), dtype=np.float32)
    with pytest.raises(InvalidInput) as e:
        toy_tok.generate([1, 2], state=st, max_new_tokens=2)
    assert e.value.field == "state" and "got (8, 1)" in str(e.value)
    assert not st.any()


def test_step_buffers_chunk_rows_never_exceed_max_batch(toy_tok):
    """Chunk_rows (streams per onnxruntime call) is at most
    max_batch."""
    assert toy_tok.step_buffers(3).chunk_rows == 3
    assert toy_tok.step_buffers(3, chunk_bytes=4 * toy_tok.state_size * 2).chunk_rows == 2
