"""SessionStore edges: what a session gives back when its rewind History is replaced, which
session `drop` forgets, and what `pack_state` takes."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput, SessionNotFound
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.sessions import SessionStore


def test_a_history_given_over_another_returns_the_old_ones_bytes():
    store = SessionStore(4, capacity=2)
    s = store.create()
    budget = CheckpointBudget()
    first = History(8, 4, 0, np.zeros(4, np.float32), budget)
    store.give_history(s, first)
    one = budget.used
    assert one > 0
    second = History(8, 4, 0, np.zeros(4, np.float32), budget)
    store.give_history(s, second)
    assert s.history is second and budget.used == one  # the first one's bytes came back
    store.close(s.id)
    assert budget.used == 0


def test_dropping_an_ended_incarnation_leaves_the_session_that_took_its_id():
    store = SessionStore(4, capacity=4)
    old = store.create("p", "conv")
    store.close("conv", "p")
    new = store.create("p", "conv")
    store.commit(new, np.ones(4, np.float32), 3)
    store.drop(old, "closed")  # a stale copy: the id belongs to another session by now
    assert store.get("conv", "p") is new and new.live and new.position == 3
    np.testing.assert_array_equal(store.read(new), np.ones(4, np.float32))
    assert store.stats()["closed"] == 1 and len(store) == 1
    store.drop(new, "closed")
    with pytest.raises(SessionNotFound) as e:
        store.get("conv", "p")
    assert e.value.reason == "closed"


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_pack_state_refuses_a_state_that_is_not_real_floats(dtype):
    store = SessionStore(4, capacity=2)
    with pytest.raises(InvalidInput) as e:
        store.pack_state(np.zeros(4, dtype), 0)
    assert str(e.value).startswith("state: "), e.value
