"""SessionStore edges: unbalanced unpins, rewinds only backwards, install over the same
incarnation, what a dropped copy answers, TTLs through restore / save / load, a session file
that exactly fills the store and one that overfills it (nothing loaded), free slots while a
closed session's row is still lent, NaN TTLs, a slab of the wrong capacity, and a save over the
temp file of a crashed save or a link planted at its name."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput, LimitExceeded, SessionNotFound
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_extra_unpin_does_not_keep_a_session_alive_forever():
    """unpin without a matching pin (e.g. a cancelled request unpinning twice) leaves the
    session unpinned, not "negatively pinned": it still expires after its TTL."""
    clock = FakeClock()
    store = SessionStore(4, capacity=2, ttl=10.0, clock=clock)
    s = store.create("p", "a")
    store.pin(s)
    store.unpin(s)
    store.unpin(s)
    assert not s.pinned
    clock.t += 11.0
    assert store.evict_idle() == ["a"]
    with pytest.raises(SessionNotFound) as e:
        store.get("a", "p")
    assert e.value.reason == "evicted"


def test_rewind_refuses_a_position_past_the_current_one():
    """A rewind goes back: a position beyond the session's is refused and nothing changes."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    x = np.arange(4, dtype=np.float32)
    store.commit(s, x, 3)
    with pytest.raises(InvalidInput) as e:
        store.rewind(s, np.zeros(4, np.float32), 4)
    assert e.value.field == "position"
    assert s.position == 3
    np.testing.assert_array_equal(store.read(s), x)
    store.rewind(s, np.ones(4, np.float32), 3)  # the current position itself is allowed
    assert s.position == 3
    np.testing.assert_array_equal(store.read(s), np.ones(4, np.float32))


def test_install_over_the_same_incarnation_updates_state_and_position_in_place():
    """install() of the incarnation already here (its steps went on elsewhere) keeps the
    local Session object and sets both its state and its position to the given ones."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "conv")
    store.commit(s, np.ones(4, np.float32), 2)
    state = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    got = store.install("conv", "p", 60.0, 7, state, incarnation=s.incarnation)
    assert got is s and s.live
    assert s.position == 7
    np.testing.assert_array_equal(store.read(s), state)
    assert store.stats()["restored"] == 0  # updated, not created again


def test_a_copy_dropped_as_moved_is_unknown_here_but_closed_is_remembered():
    """drop(s, "moved"): the id is simply not here any more (get: "unknown", so the caller
    fetches it from the replica that has it); drop(s, "closed") is remembered as closed."""
    store = SessionStore(4, capacity=2)
    moved, closed = store.create("p", "m"), store.create("p", "c")
    store.drop(moved, "moved")
    store.drop(closed, "closed")
    assert len(store) == 0
    with pytest.raises(SessionNotFound) as e:
        store.get("m", "p")
    assert e.value.reason == "unknown"
    with pytest.raises(SessionNotFound) as e:
        store.get("c", "p")
    assert e.value.reason == "closed"


def test_restore_with_a_ttl_gives_the_new_session_that_ttl():
    """restore(ttl=...) sets the restored session's idle TTL (not the store default): it is
    evicted after 5 s while the store's default would keep it 600 s."""
    clock = FakeClock()
    store = SessionStore(4, capacity=3, ttl=600.0, clock=clock)
    a = store.create("p", "a")
    store.commit(a, np.ones(4, np.float32), 2)
    b = store.restore(store.snapshot("a", "p"), "p", "b", ttl=5.0)
    assert b.ttl == 5.0 and b.position == 2
    c = store.restore(store.snapshot("a", "p"), "p", "c")
    assert c.ttl == 600.0
    clock.t += 6.0
    assert store.evict_idle() == ["b"]


def test_save_load_keeps_each_sessions_ttl_capped_at_the_loading_stores(tmp_path):
    """Each session's own TTL is saved; a store loading the file keeps it when it is at most
    its own ttl and lowers it to its own ttl otherwise."""
    store = SessionStore(4, capacity=3, ttl=600.0)
    store.create("p", "short", ttl=5.0)
    store.create("p", "mid", ttl=300.0)
    store.create("p", "default")
    store.save(tmp_path)
    same = SessionStore(4, capacity=3, ttl=600.0, snapshot_key=store.snapshot_key)
    assert same.load(tmp_path) == 3
    assert {s.id: s.ttl for s in same.sessions()} == {"short": 5.0, "mid": 300.0, "default": 600.0}
    lower = SessionStore(4, capacity=3, ttl=100.0, snapshot_key=store.snapshot_key)
    assert lower.load(tmp_path) == 3
    assert {s.id: s.ttl for s in lower.sessions()} == {"short": 5.0, "mid": 100.0, "default": 100.0}


def test_a_session_file_that_exactly_fills_the_store_loads(tmp_path):
    """n saved sessions load into a store with exactly n free slots (and one more does not)."""
    store = SessionStore(4, capacity=2)
    for sid in ("a", "b"):
        s = store.create("p", sid)
        store.commit(s, np.full(4, len(sid), np.float32), 1)
    store.save(tmp_path)
    full = SessionStore(4, capacity=2, snapshot_key=store.snapshot_key)
    assert full.load(tmp_path) == 2
    assert full.stats()["free"] == 0
    assert sorted(s.id for s in full.sessions()) == ["a", "b"]


@pytest.mark.parametrize("where", ["store", "create", "restore"])
def test_a_nan_ttl_is_refused(where):
    """NaN is not a number of seconds (it would never compare as expired)."""
    with pytest.raises(InvalidInput) as e:
        if where == "store":
            SessionStore(4, capacity=2, ttl=math.nan)
        else:
            store = SessionStore(4, capacity=2)
            if where == "create":
                store.create("p", "a", ttl=float("nan"))
            else:
                store.restore(store.pack_state(np.zeros(4, np.float32), 0), "p", "a", ttl=math.nan)
    assert e.value.field == "ttl"


def test_a_slab_of_another_capacity_is_refused():
    """The store's slab holds exactly `capacity` rows of S: a slab with the right S but
    more or fewer rows is refused naming the slab."""
    for rows in (1, 3):
        with pytest.raises(InvalidInput) as e:
            SessionStore(4, capacity=2, slab=StateSlab(rows, 4))
        assert e.value.field == "slab"
    assert SessionStore(4, capacity=2, slab=StateSlab(2, 4)).capacity == 2


def test_save_over_a_leftover_temp_file_still_writes_an_owner_only_file(tmp_path):
    """A temp file left by a crashed save (same pid, readable by others) is reused: the
    saved sessions file is still owner-only (0o600) and loads."""
    import os
    import stat

    from ssmstream.runtime.sessions import STORE_FILE

    store = SessionStore(4, capacity=2)
    store.create("p", "a")
    leftover = tmp_path / f".{STORE_FILE}.{os.getpid()}.tmp"
    leftover.write_bytes(b"half a file")
    os.chmod(leftover, 0o644)
    path = store.save(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not leftover.exists()
    again = SessionStore(4, capacity=2, snapshot_key=store.snapshot_key)
    assert again.load(tmp_path) == 1


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_save_never_writes_through_a_link_at_its_temp_name(tmp_path, link):
    """A link that another user of a shared --state-dir put at the temp file's name is
    replaced, not written through: the file it points to keeps its bytes and mode, and the
    sessions file saved is a file of its own that loads."""
    import os
    import stat

    from ssmstream.runtime.sessions import STORE_FILE

    victim = tmp_path / "victim"
    victim.write_bytes(b"not the server's to write")
    os.chmod(victim, 0o644)
    state = tmp_path / "state"
    state.mkdir()
    planted = state / f".{STORE_FILE}.{os.getpid()}.tmp"
    if link == "symlink":
        planted.symlink_to(victim)
    else:
        os.link(victim, planted)
    store = SessionStore(4, capacity=2)
    store.create("p", "a")
    path = store.save(state)
    assert victim.read_bytes() == b"not the server's to write"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not path.is_symlink() and path.stat().st_ino != victim.stat().st_ino
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SessionStore(4, capacity=2, snapshot_key=store.snapshot_key)
    assert again.load(state) == 1


def test_load_with_too_few_free_slots_adds_no_session(tmp_path):
    """3 saved sessions, 2 free slots: LimitExceeded before any session is added (not two
    of them loaded, then a failure on the third)."""
    src = SessionStore(4, capacity=3)
    for sid in ("a", "b", "c"):
        s = src.create("p", sid)
        src.commit(s, np.full(4, len(sid), np.float32), 1)
    src.save(tmp_path)

    target = SessionStore(4, capacity=3, snapshot_key=src.snapshot_key)
    target.create("q", "mine")  # 2 free slots left
    before = target.stats()
    with pytest.raises(LimitExceeded):
        target.load(tmp_path)
    assert [s.id for s in target.sessions()] == ["mine"]
    after = target.stats()
    assert after["free"] == before["free"] == 2
    assert after["restored"] == before["restored"] == 0
    assert after["principals"] == 1


def test_stats_free_counts_a_closed_sessions_lent_row_as_taken():
    """While a closed session's row is still lent to a step, its slot is not free: stats
    says so, in agreement with create() (not capacity minus live sessions)."""
    store = SessionStore(4, capacity=2)
    a, _ = store.create(), store.create()
    store.lend([a])
    store.close(a.id)
    assert store.stats()["free"] == 0
    with pytest.raises(LimitExceeded):
        store.create()
    store.give_back([a], 1)
    assert store.stats()["free"] == 1
    store.create()
    assert store.stats()["free"] == 0


def test_a_session_closed_while_a_save_waits_is_not_saved_with_a_reused_slots_state(tmp_path):
    # the save copies its sessions part by part, the lock released in between: a session
    # closed meanwhile must not come back at the next start with the state of the session
    # (here another principal's) that took its slot
    S = 4
    st = SessionStore(S, capacity=4)
    a, b = st.create("p", "a"), st.create("p", "b")
    st.commit(b, np.full(S, 7, np.float32), 3)
    st.lend([a])  # a step of `a` is in flight: the save waits for its row
    waiting, real_wait = threading.Event(), st._returned.wait

    def wait(*args, **kw):  # the save has taken its list of sessions and waits for a's row
        waiting.set()
        return real_wait(*args, **kw)

    st._returned.wait = wait
    t = threading.Thread(target=st.save, args=(tmp_path,))
    t.start()
    # a fixed sleep could end before the thread took its list (a loaded machine): it would
    # then save c as well, never having seen b
    assert waiting.wait(30), "the save never waited for the lent row"
    st.close("b", "p")  # closed meanwhile, and its slot taken by another principal's session
    c = st.create("q", "c")
    st.commit(c, np.full(S, 9, np.float32), 1)
    st.give_back([a], 0)
    t.join()
    st2 = SessionStore(S, capacity=4, snapshot_key=st.snapshot_key)
    assert st2.load(tmp_path) == 1
    assert [s.id for s in st2.sessions()] == ["a"]
