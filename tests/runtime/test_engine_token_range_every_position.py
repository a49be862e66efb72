"""Every token of a request is checked against the vocabulary, wherever it sits: the first,
the last or in between, in a batch of steps, a slot step, a prefill and a generate prompt.
An id outside [0, vocab_size) is InvalidInput naming it, and nothing runs (onnxruntime's
Gather would raise on the CPU, and on a GPU read another row)."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput

V = 11  # the token toy's vocabulary (conftest.build_toy)


def _bad_positions(n: int, bad: int) -> list[np.ndarray]:
    """int64 [n] rows of good ids with `bad` at each position in turn."""
    rows = []
    for i in range(n):
        x = np.arange(n, dtype=np.int64) % V
        x[i] = bad
        rows.append(x)
    return rows


@pytest.mark.parametrize("bad", [V, V + 1000, -1])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_a_bad_token_anywhere_in_a_batch_step_is_refused(toy_tok, n, bad):
    s = np.full((n, toy_tok.state_size), 0.25, dtype=np.float32)
    before = s.copy()
    for x in _bad_positions(n, bad):
        with pytest.raises(InvalidInput, match=f"token {bad} is outside") as e:
            toy_tok.step(x, s)
        assert e.value.field == "inputs"
    np.testing.assert_array_equal(s, before)


@pytest.mark.parametrize("bad", [V, -1])
def test_a_bad_token_anywhere_in_a_prefill_or_prompt_is_refused(toy_tok, bad):
    s = toy_tok.new_state()
    for x in _bad_positions(5, bad):
        with pytest.raises(InvalidInput, match=f"token {bad} is outside"):
            toy_tok.prefill(x[None], s)  # [1, T]
        with pytest.raises(InvalidInput, match=f"token {bad} is outside"):
            toy_tok.generate(x, max_new_tokens=1)
    np.testing.assert_array_equal(s, toy_tok.new_state())


def test_a_bad_token_anywhere_in_a_slot_step_changes_no_row(toy_tok):
    slab = toy_tok.new_slab(4)
    slab.write(1, np.full(toy_tok.state_size, 0.5, dtype=np.float32))
    before = [slab.read(k) for k in range(4)]
    for x in _bad_positions(2, V):
        with pytest.raises(InvalidInput, match=f"token {V} is outside"):
            toy_tok.step_slots(x, [1, 2], slab)
    for k in range(4):
        np.testing.assert_array_equal(slab.read(k), before[k])


def test_good_tokens_at_the_edges_of_the_vocabulary_run_as_one_row_each(toy_tok):
    """The check is not stricter than the vocabulary: ids 0 and V - 1 in one int64 batch give
    the outputs each gives on its own."""
    x = np.array([V - 1, 0, V - 1], dtype=np.int64)
    s = toy_tok.new_state(3)
    y, _ = toy_tok.step(x, s)
    for j in range(3):
        y_j, _ = toy_tok.step(x[j : j + 1], s[j : j + 1])
        np.testing.assert_array_equal(y[j], y_j[0])
