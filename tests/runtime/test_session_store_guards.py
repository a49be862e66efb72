"""SessionStore guards users rely on: a save leaves out the sessions idle past their TTL (a
restart does not bring them back); a rewind waits for a step writing the session's row;
listing one principal's sessions shows no other principal's; a close by another principal
closes nothing; a load counts the sessions a principal already has; a rewind history given
to a session that already ended returns its bytes at once; a copy from another replica is
not installed over a session with a step in flight."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ssmstream.runtime.errors import LimitExceeded, SessionBusy, SessionNotFound
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey

KEY = SnapshotKey(b"session-store-guards-key-0123456789")


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_save_leaves_out_sessions_idle_past_their_ttl(tmp_path):
    clock = FakeClock()
    store = SessionStore(4, capacity=4, ttl=10.0, clock=clock, snapshot_key=KEY)
    stale, fresh = store.create(session_id="stale"), store.create(session_id="fresh")
    clock.t += 8.0
    store.get("fresh")  # used again: its idle timer restarts
    clock.t += 8.0  # stale: idle 16 s > 10 s; fresh: 8 s
    store.save(tmp_path)
    assert not stale.live and fresh.live
    with pytest.raises(SessionNotFound) as e:
        store.get("stale")
    assert e.value.reason == "evicted"
    loaded = SessionStore(4, capacity=4, ttl=10.0, snapshot_key=KEY)
    assert loaded.load(tmp_path) == 1
    assert [s.id for s in loaded.sessions()] == ["fresh"]
    np.testing.assert_array_equal(loaded.read(loaded.get("fresh")), np.zeros(4, np.float32))


def test_a_rewind_waits_for_the_step_writing_its_row_and_wins_after_it():
    """A rewind that arrives while a step has the session's row lent waits until the row
    is given back; then its state and position replace the step's, not the other way round."""
    store = SessionStore(4, capacity=2)
    s = store.create()
    store.commit(s, np.full(4, 1.0, np.float32), 5)
    rewound = np.full(4, 2.0, np.float32)
    store.lend([s])
    rewind = threading.Thread(target=store.rewind, args=(s, rewound, 3))
    rewind.start()
    rewind.join(0.1)
    assert rewind.is_alive() and s.position == 5  # waiting for the row
    store.slab.array[s.slot] = 9.0  # the step writes the row in place
    assert store.give_back([s], 1) == [6]
    rewind.join(5)
    assert not rewind.is_alive()
    assert s.position == 3
    np.testing.assert_array_equal(store.read(s), rewound)


def test_listing_a_principals_sessions_shows_only_its_own():
    store = SessionStore(4, capacity=4)
    a1, b1, a2 = store.create("a"), store.create("b"), store.create("a")
    assert [s.id for s in store.sessions("a")] == [a1.id, a2.id]
    assert [s.id for s in store.sessions("b")] == [b1.id]
    assert store.sessions("c") == []
    assert len(store.sessions()) == 3


def test_a_close_by_another_principal_closes_nothing():
    store = SessionStore(4, capacity=2)
    s = store.create("alice")
    with pytest.raises(SessionNotFound) as e:
        store.close(s.id, "mallory")
    assert e.value.reason == "unknown"
    assert s.live and store.get(s.id, "alice") is s


def test_a_load_counts_the_sessions_a_principal_already_has(tmp_path):
    """A file whose sessions fit the principal's limit only on an empty store is refused
    whole when the principal already has sessions here: nothing is loaded."""
    saved = SessionStore(4, capacity=4, snapshot_key=KEY)
    saved.create("a", session_id="one"), saved.create("a", session_id="two")
    saved.save(tmp_path)
    store = SessionStore(4, capacity=4, max_per_principal=2, snapshot_key=KEY)
    mine = store.create("a", session_id="mine")
    with pytest.raises(LimitExceeded):
        store.load(tmp_path)
    assert store.sessions() == [mine]


def test_a_history_given_to_an_ended_session_returns_its_bytes_at_once():
    store = SessionStore(4, capacity=2)
    s = store.create()
    store.close(s.id)
    budget = CheckpointBudget()
    history = History(8, 4, 0, np.zeros(4, np.float32), budget)
    assert budget.used > 0
    store.give_history(s, history)
    assert budget.used == 0 and s.history is None


def test_a_copy_from_elsewhere_is_not_installed_over_a_session_with_a_step_in_flight():
    store = SessionStore(4, capacity=2)
    s = store.create("p", "conv")
    store.commit(s, np.ones(4, np.float32), 2)
    store.pin(s)  # a step of it is queued or running here
    with pytest.raises(SessionBusy):
        store.install("conv", "p", 60.0, 7, np.zeros(4, np.float32), incarnation=s.incarnation)
    assert s.position == 2
    np.testing.assert_array_equal(store.read(s), np.ones(4, np.float32))
    store.unpin(s)
    assert store.install("conv", "p", 60.0, 7, np.zeros(4, np.float32), s.incarnation) is s
    assert s.position == 7
