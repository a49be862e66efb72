"""Engine edges: StepBuffers keep one IOBinding per row range and per slot-step size (steps
allocate nothing more in steady state), a manifest whose max_len is under its chunk still
prefills in whole chunks, the prompts generate takes or refuses, and the positions it reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import CorruptState, InvalidInput


def test_step_buffers_bind_each_row_range_once(toy_tok):
    """Repeated steps through one StepBuffers reuse its bindings: the OrtValues it holds do
    not grow with the number of steps (outputs stay equal to fresh steps)."""
    eng, rng = toy_tok, np.random.default_rng(2)
    buf = eng.step_buffers(4, chunk_bytes=2 * 4 * eng.state_size)  # chunks of 2 rows
    s_ref = s = eng.new_state(3)
    for _ in range(20):
        x = rng.integers(0, eng.vocab_size, size=3)
        y_ref, s_ref = eng.step(x, s_ref)
        y, s = eng.step(x, s, out=buf)
        np.testing.assert_array_equal(y, y_ref)
        s = s.copy()  # a view of buf.new_states: the next step must not read its output
    assert buf.binding(0, 2) is buf.binding(0, 2)
    assert sorted(buf._bindings) == [(0, 2), (2, 1)]
    assert len(buf._values) <= 2 * 2  # output and state_out of each binding, no more


def test_slot_steps_reuse_one_binding_per_batch_size(toy_tok):
    eng = toy_tok
    slab, buf = eng.new_slab(4), eng.step_buffers(4)
    for _ in range(5):
        eng.step_slots(np.array([1, 2]), [0, 3], slab, out=buf)
    io = buf.slot_binding(slab, 2)
    eng.step_slots(np.array([1, 2]), [0, 3], slab, out=buf)
    assert buf.slot_binding(slab, 2) is io
    assert list(buf._slot_bindings) == [2]


def test_a_max_len_under_the_chunk_prefills_one_chunk_per_call(toy_token_model, tmp_path):
    """max_len 3 with chunk 4 (a hand-written manifest): each prefill call takes one whole
    chunk (the graph cannot take less), the rest is stepped; outputs equal the reference."""
    d = tmp_path / "m"
    shutil.copytree(toy_token_model["model_dir"], d)
    m = json.loads((d / "manifest.json").read_text())
    assert m["graphs"]["prefill"]["chunk"] == 4
    m["graphs"]["prefill"]["max_len"] = 3
    (d / "manifest.json").write_text(json.dumps(m))
    eng = Engine(d, device="cpu", threads=1)
    assert eng.prefill_max_len == 4
    x = np.arange(10).reshape(1, 10) % toy_token_model["V"]
    y, s = eng.prefill(x, eng.new_state())
    ref_y, ref_s = toy_token_model["reference"](x, eng.new_state())
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-4)


def test_generate_takes_any_iterable_of_token_ids_as_prompt(toy_tok):
    """A generator (or an iterator) of ids is a prompt as its list is."""
    want = list(toy_tok.generate([1, 2, 3], max_new_tokens=4, temperature=0))
    got = list(toy_tok.generate((t for t in [1, 2, 3]), max_new_tokens=4, temperature=0))
    assert got == want
    assert list(toy_tok.generate(iter([1, 2, 3]), max_new_tokens=4, temperature=0)) == want


@pytest.mark.parametrize(
    "prompt, words",
    [
        (np.array([[1, 2]]), "must be one sequence of token ids, got (1, 2)"),
        ([[1, 2]], "must be one sequence of token ids, got (1, 2)"),
        (True, "must be token ids, got bool"),
    ],
)
def test_a_prompt_that_is_not_one_sequence_of_ids_says_what_it_is(toy_tok, prompt, words):
    with pytest.raises(InvalidInput) as e:
        toy_tok.generate(prompt)
    assert e.value.field == "prompt" and words in str(e.value)


def test_a_scalar_where_a_sequence_is_needed_is_named_with_its_own_shape(toy_tok):
    """A scalar token is one step's input, not a [B, T] prefill: the error shows the shape
    that was given, ()."""
    with pytest.raises(InvalidInput) as e:
        toy_tok.prefill(np.int64(3), toy_tok.new_state())
    assert e.value.field == "inputs" and str(e.value).endswith("got ()")


def test_a_corrupt_output_is_reported_at_the_position_it_was_sampled_from(
    toy_token_model, monkeypatch
):
    """generate counts positions as the server does (inputs consumed when a token is
    sampled): a prompt of 3 samples its first token at position 3; NaN logits from the
    second token step (5 inputs consumed) are reported at position 5."""
    eng = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    step, calls = eng.step_unchecked, []

    def nan_on_the_second_call(x, s, out=None):
        y, s_new = step(x, s, out)
        calls.append(1)
        return (np.full_like(y, np.nan) if len(calls) == 2 else y), s_new

    tokens = eng.generate([1, 2, 3], max_new_tokens=10, temperature=0)
    next(tokens)  # the prompt is consumed: the first token, sampled at position 3
    monkeypatch.setattr(eng, "step_unchecked", nan_on_the_second_call)
    next(tokens)  # position 4
    with pytest.raises(CorruptState, match="outputs at position 5 are NaN"):
        next(tokens)


@pytest.mark.parametrize("text", ['{"graphs": []}', '{"graphs": {"step": 3}}', "[1]", "{"])
def test_a_malformed_embedded_manifest_is_ignored_as_a_missing_one(toy_token_model, tmp_path, text):
    """The copy of the manifest a graph embeds is checked only when it can be read: one
    that is not JSON, or whose "graphs" is no mapping, is as absent (the graph opens)."""
    import onnx
    from ssmstream.runtime.manifest import METADATA_KEY

    d = tmp_path / "m"
    shutil.copytree(toy_token_model["model_dir"], d)
    m = json.loads((d / "manifest.json").read_text())
    step = onnx.load(d / m["graphs"]["step"]["file"])
    onnx.helper.set_model_props(step, {METADATA_KEY: text})
    onnx.save(step, d / m["graphs"]["step"]["file"])
    eng = Engine(d, device="cpu", threads=1, check_sha=False)
    x = np.array([[1, 2, 3]])
    y, _ = eng.prefill(x, eng.new_state())
    np.testing.assert_allclose(
        y, toy_token_model["reference"](x, eng.new_state())[0], rtol=1e-4, atol=1e-4
    )
