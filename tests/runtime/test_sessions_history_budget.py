"""The checkpoint bytes of a session's rewind History go back to the shared budget whenever
the store lets go of that History: a newer copy installed over the session (its steps went on
on another replica), another incarnation installed under its id, a close, an eviction. A
History whose bytes stayed counted would shrink every other session's rewind window for
good (the budget is shared)."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.sessions import SessionStore

S = 4


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _with_history(store: SessionStore, sid: str, budget: CheckpointBudget) -> History:
    s = store.create("p", sid)
    h = History(8, 4, 0, store.read(s), budget)
    store.give_history(s, h)
    return h


def test_a_copy_installed_over_the_same_incarnation_gives_the_history_bytes_back():
    store, budget = SessionStore(S, capacity=2), CheckpointBudget()
    h = _with_history(store, "conv", budget)
    s = store.local("conv")
    assert budget.used == 4 * S  # the checkpoint it began with
    state = np.arange(S, dtype=np.float32)
    assert store.install("conv", "p", 60.0, 7, state, s.incarnation) is s
    assert s.history is None and h.released
    assert budget.used == 0
    assert s.position == 7
    np.testing.assert_array_equal(store.read(s), state)


def test_another_incarnation_installed_under_the_id_gives_the_history_bytes_back():
    store, budget = SessionStore(S, capacity=2), CheckpointBudget()
    h = _with_history(store, "conv", budget)
    old = store.local("conv")
    new = store.install("conv", "p", 60.0, 3, np.ones(S, np.float32), "elsewhere")
    assert new is not old and not old.live and new.history is None
    assert h.released and budget.used == 0


@pytest.mark.parametrize("end", ["close", "evict"])
def test_a_session_that_ends_gives_the_history_bytes_back(end):
    clock = Clock()
    store, budget = SessionStore(S, capacity=2, ttl=10.0, clock=clock), CheckpointBudget()
    h = _with_history(store, "conv", budget)
    if end == "close":
        store.close("conv", "p")
    else:
        clock.t = 11.0
        assert store.evict_idle() == ["conv"]
    assert h.released and budget.used == 0
