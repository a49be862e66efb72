"""History.max_bytes against what a history really allocates: the inputs' ring buffer with
its spare rows (not only the rows it keeps), and a checkpoint budget smaller than one state
(a session keeps its newest checkpoint all the same)."""

from __future__ import annotations

import numpy as np
from ssmstream.runtime.history import CheckpointBudget, History

V = 50


def _allocated(h: History) -> int:
    rows = h._inputs._a
    return sum(x.nbytes for _, x in h._checkpoints) + (0 if rows is None else rows.nbytes)


def _feed(h: History, lengths: list[int], S: int) -> list[int]:
    """Steps (1), prefills with their chunk-end states (> 1) and rewinds (< 0); the bytes
    allocated after each."""
    position, allocated = h.position, []
    for T in lengths:
        end = position + T
        if T < 0:
            end = max(end, h.oldest)
            h.plan(end)
            h.rewound(end)
        elif T == 1:
            h.step(np.array([end % V]), end, np.full, S, end, np.float32)
        else:
            ends = [*range(position + h.chunk, end, h.chunk), end]
            states = {p: np.full(S, p, np.float32) for p in [position, *ends]}
            h.record(np.arange(position, end) % V, end, states)
        position = end
        allocated.append(_allocated(h))
    return allocated


def test_the_inputs_buffer_with_its_spare_rows_stays_within_max_bytes():
    """W = 6, Q = 4: a prefill that fills the buffer and a trim that cuts no more than Q rows
    leave it holding 17 rows of int64 tokens, more than W + 2 Q = 14 (a state of one number,
    so the checkpoints' share of the bound cannot cover the difference)."""
    S, W, Q = 1, 6, 4
    h = History(window=W, chunk=Q, position=0, state=np.zeros(S, np.float32))
    allocated = _feed(h, [1, 7, 1, 5, 5, 1, 3, 3, 3, 5, -1], S)
    bound = History.max_bytes(W, Q, S, 8)
    assert max(allocated) <= bound, (allocated, bound)
    checkpoints = (2 * (W // Q) + 3) * 4 * S
    assert max(allocated) > checkpoints + (W + 2 * Q) * 8  # the case this test is about


def test_a_budget_smaller_than_one_state_still_counts_the_newest_checkpoint():
    """A shared budget of 4 bytes: each session keeps one 256-byte checkpoint, which
    max_bytes must count."""
    S, W, Q = 64, 4, 2
    h = History(W, Q, position=0, state=np.zeros(S, np.float32), budget=CheckpointBudget(4))
    allocated = _feed(h, [1, 3, 1, 1, 5, -2, 1], S)
    assert len(h._checkpoints) == 1
    assert max(allocated) <= History.max_bytes(W, Q, S, 8, limit=4)


def test_a_state_is_kept_only_when_the_next_one_would_be_more_than_a_chunk_past():
    """Q = 4, checkpoint at 0, two steps to 2, then a prefill with states at 2 and 4: the one
    at 4 is exactly Q past 0, so 2 is not kept and 4 is."""
    h = History(window=8, chunk=4, position=0, state=np.zeros(2, np.float32))
    _feed(h, [1, 1], 2)
    h.record(np.array([2, 3]), 4, {p: np.full(2, p, np.float32) for p in (2, 4)})
    assert [c for c, _ in h._checkpoints] == [0, 4]


def test_a_planned_state_is_the_callers_copy():
    """A caller that updates the planned state in place (as generate does) leaves the
    checkpoint as it was."""
    h = History(window=8, chunk=4, position=0, state=np.full(3, 7.0, np.float32))
    _feed(h, [1, 1], 3)
    x, rows = h.plan(1)
    x += 100.0
    again, _ = h.plan(1)
    np.testing.assert_array_equal(again, np.full(3, 7.0, np.float32))
    np.testing.assert_array_equal(rows, [1])


def test_a_rewind_onto_a_checkpoint_keeps_it():
    """Q = 4, checkpoints at 0 and 4, a rewind from 6 to 4: a plan to 4 is that checkpoint
    with nothing to replay, and a step on to 5 replays one input from it."""
    S = 2
    h = History(window=8, chunk=4, position=0, state=np.zeros(S, np.float32))
    _feed(h, [1, 1, 1, 1, 1, 1], S)
    assert [c for c, _ in h._checkpoints] == [0, 4]
    h.plan(4)
    h.rewound(4)
    x, rows = h.plan(4)
    np.testing.assert_array_equal(x, np.full(S, 4, np.float32))
    assert len(rows) == 0
    _feed(h, [1], S)
    x, rows = h.plan(5)
    np.testing.assert_array_equal(x, np.full(S, 4, np.float32))
    np.testing.assert_array_equal(rows, [5 % V])


def test_the_inputs_kept_start_at_the_oldest_checkpoint_when_it_moves_up_by_one():
    """Q = W = 4: a step to 1, then a prefill to 5 with states at 1 and 5 checkpoints 0, 1
    and 5; the window's floor 1 drops 0, and the input before 1 goes with it."""
    S = 2
    h = History(window=4, chunk=4, position=0, state=np.zeros(S, np.float32))
    _feed(h, [1], S)
    h.record(np.arange(1, 5), 5, {p: np.full(S, p, np.float32) for p in (1, 5)})
    assert [c for c, _ in h._checkpoints] == [1, 5]
    assert len(h._inputs) == 4 and h.nbytes == 2 * 4 * S + 4 * 8
    x, rows = h.plan(3)
    np.testing.assert_array_equal(x, np.full(S, 1, np.float32))
    np.testing.assert_array_equal(rows, [1, 2])


def test_rows_read_across_the_end_of_the_ring_buffer_are_the_inputs_in_order():
    """W = 6, Q = 3: a step, two prefills and a step make the inputs' ring buffer wrap (its
    newest rows written at its start); every plan gives the inputs from its checkpoint to
    the position, as fed, also after rewinds."""
    S, W, Q = 2, 6, 3
    h = History(window=W, chunk=Q, position=0, state=np.zeros(S, np.float32))
    fed: dict[int, int] = {}  # position p -> the input that led to it (fed at p - 1)
    position, wrapped = 0, []
    extend = h._inputs.extend

    def spy(rows):  # note an append that runs past the buffer's end into its start
        buf = h._inputs
        if buf._a is not None:
            wrapped.append(len(buf) + len(rows) <= len(buf._a) < buf._head + len(buf) + len(rows))
        extend(rows)

    h._inputs.extend = spy
    for T in [1, 2, 7, 5, 1, -2, 1, 1, -1, 2]:
        if T < 0:
            position = max(position + T, h.oldest)
            h.plan(position)
            h.rewound(position)
            continue
        tokens = np.arange(position, position + T) * 7 % V + T  # differ after a rewind
        for i, t in enumerate(tokens):
            fed[position + i + 1] = int(t)
        _feed_tokens(h, tokens, S)
        position += T
        for r in range(h.oldest, position + 1):
            c, rows = _checkpoint_of(h, r)
            np.testing.assert_array_equal(rows, [fed[p] for p in range(c + 1, r + 1)])
    assert any(wrapped)  # the case this test is about


def _feed_tokens(h: History, tokens: np.ndarray, S: int) -> None:
    start, end = h.position, h.position + len(tokens)
    if len(tokens) == 1:
        h.step(tokens, end, np.full, S, end, np.float32)
    else:
        ends = [*range(start + h.chunk, end, h.chunk), end]
        h.record(tokens, end, {p: np.full(S, p, np.float32) for p in [start, *ends]})


def _checkpoint_of(h: History, r: int) -> tuple[int, np.ndarray]:
    """(the checkpoint a plan to r starts from (its state holds its position), the inputs)."""
    x, rows = h.plan(r)
    return int(x[0]), rows
