"""`SessionStore.changed_since_save` says whether a save would write something new: every
change to what a sessions file holds (a session made, restored, forked, stepped, rewound,
closed, evicted or installed) sets it, and only a successful save clears it; reads, touches
and a step that wrote nothing do not. The server's periodic save skips a store that has not
changed: an idle server with --save-interval rewrote the same file, and logged it, every
interval."""

from __future__ import annotations

import time

import numpy as np
import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.sessions import STORE_FILE, SessionStore

S = 4


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def state(x: float) -> np.ndarray:
    return np.full(S, x, np.float32)


def test_each_change_is_seen_and_a_save_clears_it(tmp_path):
    clock = Clock()
    store = SessionStore(S, capacity=8, ttl=10.0, clock=clock)
    assert store.changed_since_save  # never saved
    store.save(tmp_path)
    assert not store.changed_since_save

    changes = {
        "create": lambda: store.create("p", "a"),
        "commit": lambda: store.commit(store.get("a", "p"), state(1), 2),
        "rewind": lambda: store.rewind(store.get("a", "p"), state(0.5), 1),
        "give_back": lambda: store.give_back(store.lend([store.get("a", "p")]), 1),
        "restore": lambda: store.restore(store.snapshot("a", "p"), "p", "b"),
        "fork": lambda: store.fork("a", "p", "c"),
        "close": lambda: store.close("c", "p"),
        "install": lambda: store.install(
            "b", "p", 10.0, 7, state(2), store.get("b", "p").incarnation
        ),
    }
    for name, change in changes.items():
        change()
        assert store.changed_since_save, name
        store.save(tmp_path)
        assert not store.changed_since_save, name

    a = store.get("a", "p")
    store.read(a)
    store.snapshot("a", "p")
    store.give_back(store.lend([a]), 0)  # a step that failed: nothing written
    assert not store.changed_since_save
    clock.now = 100.0  # both idle past their TTL
    assert store.evict_idle() and store.changed_since_save


def test_a_failed_save_leaves_the_store_changed(tmp_path):
    store = SessionStore(S, capacity=2)
    store.create("p", "a")
    (tmp_path / STORE_FILE).mkdir()  # where the file goes
    with pytest.raises(OSError):
        store.save(tmp_path)
    assert store.changed_since_save
    (tmp_path / STORE_FILE).rmdir()
    store.save(tmp_path)
    assert not store.changed_since_save


def test_a_change_during_a_save_is_saved_by_the_next(tmp_path, monkeypatch):
    """The count is taken as the save starts: a step while the file is written leaves the
    store changed after that save."""
    from ssmstream.runtime import sessions as sessions_module

    store = SessionStore(S, capacity=2)
    a = store.create("p", "a")
    real = sessions_module.write_session_file

    def write_and_step(*args):
        store.commit(a, state(3), 1)
        return real(*args)

    monkeypatch.setattr(sessions_module, "write_session_file", write_and_step)
    store.save(tmp_path)
    assert store.changed_since_save


def test_an_idle_server_does_not_rewrite_its_sessions_file(toy_token_model, tmp_path):
    state_dir = tmp_path / "state"
    saved = state_dir / STORE_FILE
    with serve(toy_token_model["model_dir"], state_dir=str(state_dir), save_interval=0.05) as srv:
        with Client(target(srv), timeout=30) as c:
            s = c.create_session(session_id="a")
            s.step(tokens=[1, 2])
            deadline = time.monotonic() + 30
            # a save of the step has ended (not only one of the session before it, which a
            # fixed pause read as idle on a loaded machine): no save runs from here on
            while srv.server.store.changed_since_save:
                assert time.monotonic() < deadline, "no periodic save"
                time.sleep(0.02)
            first = saved.stat().st_mtime_ns, saved.stat().st_ino
            time.sleep(0.4)  # 8 intervals, nothing changed
            assert (saved.stat().st_mtime_ns, saved.stat().st_ino) == first
            s.step(tokens=[3])
            while (saved.stat().st_mtime_ns, saved.stat().st_ino) == first:
                assert time.monotonic() < deadline, "the step was not saved"
                time.sleep(0.02)
