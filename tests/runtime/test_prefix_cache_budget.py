"""PrefixCache and History behaviour at their edges:

- under pressure the scope holding the most bytes gives up entries, also when the insert
  that went over the budget is another, smaller scope's (the existing test only inserts
  into the largest scope);
- a lookup that finds nothing is counted as a miss;
- a checkpoint budget used exactly up to its limit is not "over": the session's oldest
  checkpoint stays, so the whole window is reachable;
- scopes whose inserts kept nothing leave no bookkeeping behind;
- the largest scope is found through a heap: it picks the scope a scan of every scope picks,
  at every eviction of a random run, and an insert does not slow down with the number of
  scopes (a scan made it ~4.8 ms at 10,000 principals);
- a recorded checkpoint is a copy of the caller's state.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.prefix_cache import PrefixCache, _Entry

S, D, Q = 8, 3, 4


def _entry_bytes(tokens: int) -> int:
    return _Entry(b"\0" * 8 * tokens, np.zeros(S, np.float32), np.zeros(D, np.float32)).nbytes


def _states(n: int, fill: float) -> dict:
    return {n: (np.full(S, fill, np.float32), np.full(D, fill, np.float32))}


def test_a_smaller_scopes_insert_evicts_from_the_largest_scope():
    """Budget of 4 one-piece entries: "big" holds 3, "small" adds 2 -> one entry goes, and
    it is big's least recently used one; both of small's prompts stay cached (evicting
    from the inserting scope would drop small's first prompt)."""
    c = PrefixCache(4 * _entry_bytes(3), chunk=Q, model_sha="m")
    big = [np.array([1, 2, k], np.int64) for k in range(3)]
    small = [np.array([5, 6, k], np.int64) for k in range(2)]
    for i, p in enumerate(big):
        assert c.insert("big", p, _states(3, i)) == 1
    for i, p in enumerate(small):
        assert c.insert("small", p, _states(3, 10 + i)) == 1
    assert c.stats()["evictions"] == 1 and c.stats()["entries"] == 4
    assert [c.lookup("small", p).tokens for p in small] == [3, 3]
    assert [c.lookup("big", p).tokens for p in big] == [0, 3, 3]


class ScanningCache(PrefixCache):
    """The largest scope found by scanning every scope (ties: the least name)."""

    def _sized(self, scope):
        pass

    def _largest_scope(self):
        return min(self._scope_bytes, key=lambda s: (-self._scope_bytes[s], s))


def test_the_heap_evicts_from_the_scope_a_scan_finds_largest():
    rng = np.random.default_rng(0)
    budget = 12 * _entry_bytes(4)
    caches = [PrefixCache(budget, chunk=Q, model_sha="m"), ScanningCache(budget, Q, "m")]
    evictions = 0
    for i in range(600):
        scope = f"p{rng.integers(0, 7) ** 2 % 11}"  # uneven: some scopes far more often
        prompt = rng.integers(0, 3, size=int(rng.integers(1, 13)))
        ends = range(Q, len(prompt) + Q, Q)  # each piece's end (the last one: the prompt's)
        states = {min(e, len(prompt)): (np.full(S, i, np.float32), np.zeros(D, np.float32))
                  for e in ends}  # fmt: skip
        added = [c.insert(scope, prompt, states) for c in caches]
        assert added[0] == added[1]
        heap, scan = caches
        assert heap.bytes == scan.bytes <= budget
        assert heap._scope_bytes == scan._scope_bytes
        assert {s: list(e) for s, e in heap._entries.items()} == {
            s: list(e) for s, e in scan._entries.items()
        }
        evictions = heap.counts["evictions"]
    assert evictions > 200  # the run was under pressure


def test_an_insert_does_not_slow_down_with_the_number_of_scopes():
    st = (np.zeros(S, np.float32), np.zeros(D, np.float32))

    def insert_cost(scopes: int) -> float:
        c = PrefixCache(2 * scopes * _entry_bytes(Q), chunk=Q, model_sha="m")
        for p in range(scopes):
            c.insert(f"p{p}", np.arange(2 * Q) + p, {Q: st, 2 * Q: st})
        best = float("inf")
        for r in range(5):
            t0 = time.perf_counter()
            for i in range(50):
                prompt = np.arange(2 * Q) + 10**6 + 100 * r + i
                c.insert(f"p{i % scopes}", prompt, {Q: st, 2 * Q: st})  # evicts two
            best = min(best, time.perf_counter() - t0)
        assert c.counts["evictions"] >= 400
        return best

    assert insert_cost(5000) < 6 * insert_cost(5)


def test_a_lookup_that_finds_nothing_counts_a_miss():
    c = PrefixCache(1 << 20, chunk=Q, model_sha="m")
    p = np.arange(6, dtype=np.int64)
    assert c.lookup("a", p).tokens == 0
    assert c.stats()["misses"] == 1 and c.stats()["hits"] == 0
    c.insert("a", p, _states(6, 1.0))
    assert c.lookup("a", p).tokens == 6
    assert c.lookup("a", np.r_[9, p]).tokens == 0
    st = c.stats()
    assert (st["hits"], st["misses"], st["cached_tokens"]) == (1, 2, 6)


def test_a_budget_used_exactly_to_its_limit_keeps_the_oldest_checkpoint():
    """Three checkpoints of S float32 each fit a budget of exactly their bytes: none is
    dropped, position 0 (window 8 back from 8) stays reachable (a budget used exactly
    is not over it: the checkpoint at 0 stays)."""
    per = 4 * S
    budget = CheckpointBudget(limit=3 * per)
    h = History(8, Q, 0, np.zeros(S, np.float32), budget)
    tokens = np.arange(8, dtype=np.int64)
    h.record(tokens[:4], 4, {4: np.full(S, 4, np.float32)})
    h.record(tokens[4:], 8, {8: np.full(S, 8, np.float32)})
    assert budget.used == 3 * per and not budget.over()
    assert h.oldest == 0
    state, inputs = h.plan(0)
    assert (state == 0).all() and len(inputs) == 0
    state, inputs = h.plan(2)
    assert (state == 0).all() and list(inputs) == [0, 1]


def test_an_entry_larger_than_the_whole_budget_is_not_kept_and_breaks_nothing():
    """A budget below one entry: the insert into a new scope keeps nothing (it had raised
    KeyError on the scope's byte count), and scopes that fit are unaffected."""
    c = PrefixCache(_entry_bytes(3), chunk=Q, model_sha="m")
    assert c.insert("a", np.arange(7, dtype=np.int64), _states(7, 1.0)) == 0  # too big
    assert c.insert("b", np.arange(3, dtype=np.int64), _states(3, 2.0)) == 1  # fits exactly
    assert c.insert("a", np.arange(7, dtype=np.int64), _states(7, 1.0)) == 0
    assert c.lookup("a", np.arange(7, dtype=np.int64)).tokens == 0
    assert c.lookup("b", np.arange(3, dtype=np.int64)).tokens == 3
    assert c.stats()["bytes"] == c.bytes == _entry_bytes(3) and c.stats()["entries"] == 1


def test_one_long_prefill_does_not_leave_its_inputs_buffer_behind():
    """After a long prefill (chunk-end states every Q) only ~W + Q inputs are kept: the
    ring buffer shrinks too, not just the count History.nbytes reports (which the limits
    and metrics use): one 4,096-input request must not leave a 4 MB buffer per session."""
    W, Q, S, I = 64, 8, 16, 256
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        h = History(W, Q, 0, np.zeros(S, np.float32))
        x = np.ones((4096, I), np.float32)
        h.record(x, 4096, {e: np.zeros(S, np.float32) for e in range(Q, 4097, Q)})
        del x
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= 1.5 * History.max_bytes(W, Q, S, 4 * I), held


def test_a_checkpoint_exactly_a_chunk_past_the_one_two_before_replaces_the_one_between():
    # a checkpoint no longer needed after a rewind had stayed, counted against
    # --rewind-memory-mb: the window of every other session shrank sooner
    S = 3
    x = lambda v: np.full(S, v, np.float32)  # noqa: E731
    h = History(window=32, chunk=4, position=0, state=x(0))
    h.record(np.arange(5), 5, {0: x(0), 2: x(2), 5: x(5)})  # keeps 0, 2
    h.rewound(4)
    h.record(np.arange(4), 8, {4: x(4), 8: x(8)})  # 4 is 4 past 0: 2 goes
    assert h.nbytes == 3 * 4 * S + 8 * 8  # checkpoints 0, 4, 8 and inputs u[0:8]
    assert h.budget.used == 3 * 4 * S


def test_scopes_whose_inserts_kept_nothing_leave_no_bookkeeping_behind():
    """Many principals each inserting only prompts too big to keep: no scope is left
    holding an empty entry table (one per principal would grow without bound), and a
    scope that fits still hits."""
    c = PrefixCache(_entry_bytes(3), chunk=Q, model_sha="m")
    for k in range(50):
        assert c.insert(f"principal:{k}", np.arange(7, dtype=np.int64), _states(7, k)) == 0
    assert c._entries == {} and c._scope_bytes == {}
    assert c.insert("b", np.arange(3, dtype=np.int64), _states(3, 2.0)) == 1
    assert list(c._entries) == ["b"] and c.lookup("b", np.arange(3, dtype=np.int64)).tokens == 3


def test_a_checkpoint_is_a_copy_of_the_state_it_was_given():
    """A recorded state (not the prefix cache's shared ones) is copied: the caller may
    reuse its array afterwards, and a rewind still starts from the state as it was."""
    start = np.zeros(S, np.float32)
    h = History(16, Q, 0, start)
    after4 = np.full(S, 4, np.float32)
    h.record(np.arange(4, dtype=np.int64), 4, {4: after4})
    start[:] = after4[:] = -1.0  # the caller's buffers, reused
    x0, _ = h.plan(2)
    x4, rows = h.plan(4)
    np.testing.assert_array_equal(x0, np.zeros(S, np.float32))
    np.testing.assert_array_equal(x4, np.full(S, 4, np.float32))
    assert rows.size == 0
