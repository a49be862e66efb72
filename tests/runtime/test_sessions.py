"""SessionStore: lifecycle and reasons, TTL with a fake clock, limits, commit atomicity,
snapshot / restore / fork / save / load continuation, corrupt, forged and foreign data
refused (the signature is recomputed here with hmac, independently of runtime/snapshots)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import math
import os
import stat
import struct
import time

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import (
    CorruptState,
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from ssmstream.runtime.sessions import STORE_FILE, SessionStore, check_session_id
from ssmstream.runtime.snapshots import (
    _STORE_HEAD,
    MAX_POSITION,
    MIN_KEY_BYTES,
    STORE_MAGIC,
    VERSION,
    SnapshotKey,
    decode_session_file,
    decode_snapshot,
    write_session_file,
)

SECRET = b"sessions-test-key-0123456789"
KEY = SnapshotKey(SECRET)
SNAP_HEAD = struct.Struct("<8sIQQH")  # magic, version, S, position, sha length


def forge(
    state: np.ndarray, position: int, sha: str, secret: bytes | None = SECRET, version: int = 2
) -> bytes:
    """Snapshot bytes built by hand: signed with `secret` (None: v1's plain sha256)."""
    s = sha.encode()
    body = SNAP_HEAD.pack(b"SSMSNAP\0", version, state.shape[0], position, len(s)) + s
    body += np.asarray(state, dtype="<f4").tobytes()
    if secret is None:
        return body + hashlib.sha256(body).digest()
    body += hmac.new(secret, b"ssmstream snapshot key id", hashlib.sha256).digest()[:8]
    return body + hmac.new(secret, body, hashlib.sha256).digest()


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def engine(toy_token_model):
    return Engine(toy_token_model["model_dir"], device="cpu", threads=1)


def make_store(engine, **kw) -> SessionStore:
    kw.setdefault("model_sha", engine.info["step_sha256"])
    kw.setdefault("snapshot_key", KEY)
    return SessionStore(engine.state_size, **kw)


def feed(engine, store, s, tokens) -> np.ndarray:
    """Step `tokens` through session s one at a time; returns the outputs [T, d_out]."""
    ys = []
    for tok in tokens:
        y, new = engine.step(np.array([tok]), store.read(s)[None])
        store.commit(s, new[0], 1)
        ys.append(y[0])
    return np.stack(ys)


# --- lifecycle ------------------------------------------------------------------------


def test_create_get_close_and_reasons():
    store = SessionStore(4, capacity=3)
    a = store.create("alice")
    assert store.get(a.id, "alice") is a and a.position == 0 and len(store) == 1
    np.testing.assert_array_equal(store.read(a), np.zeros(4, dtype=np.float32))
    with pytest.raises(SessionNotFound) as e:
        store.get(a.id, "bob")  # another principal's session is invisible
    assert e.value.reason == "unknown"
    with pytest.raises(SessionNotFound) as e:
        store.get("no-such-session", "alice")
    assert e.value.reason == "unknown"
    store.close(a.id, "alice")
    assert not a.live and len(store) == 0
    with pytest.raises(SessionNotFound) as e:
        store.get(a.id, "alice")
    assert e.value.reason == "closed"
    with pytest.raises(SessionNotFound) as e:
        store.get(a.id, "bob")
    assert e.value.reason == "unknown"
    with pytest.raises(SessionNotFound):
        store.close(a.id, "alice")


def test_session_fields_are_read_only():
    s = SessionStore(4).create()
    with pytest.raises(AttributeError):
        s.position = 5
    with pytest.raises(AttributeError):
        s.id = "x"


def test_client_ids():
    store = SessionStore(4)
    assert store.create(session_id="my-session.1").id == "my-session.1"
    with pytest.raises(InvalidInput, match="already in use"):
        store.create(session_id="my-session.1")
    for bad in ["", "has space", "x" * 129, "-leading", "ümlaut", 7]:
        with pytest.raises(InvalidInput) as e:
            store.create(session_id=bad)
        assert e.value.field == "session_id"
    ids = {store.create().id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 36 for i in ids)  # uuid4


def test_ttl_eviction_with_fake_clock():
    clock = FakeClock()
    store = SessionStore(4, capacity=8, ttl=10.0, clock=clock)
    a, b = store.create(), store.create()
    c = store.create(ttl=100.0)
    clock.t += 5
    store.get(a.id)  # touches a
    clock.t += 6  # b idle 11 s > 10, a idle 6 s
    assert store.evict_idle() == [b.id]
    with pytest.raises(SessionNotFound) as e:
        store.get(b.id)
    assert e.value.reason == "evicted"
    clock.t += 20  # a idle 26 s: expires lazily on access, reported as evicted
    with pytest.raises(SessionNotFound) as e:
        store.get(a.id)
    assert e.value.reason == "evicted"
    assert store.get(c.id) is c  # its own ttl of 100 s
    store.pin(c)  # a step in flight: never evicted
    clock.t += 1000
    assert store.evict_idle() == []
    store.unpin(c)
    clock.t += 101
    assert store.evict_idle() == [c.id]
    assert store.stats()["evicted"] == 3
    never = store.create(ttl=math.inf)
    clock.t += 1e9
    assert store.evict_idle() == [] and store.get(never.id) is never
    for bad in [0, -1, float("nan"), "10"]:
        with pytest.raises(InvalidInput, match="ttl"):
            store.create(ttl=bad)


def test_an_id_held_by_an_expired_session_is_free_before_the_next_sweep():
    clock = FakeClock()
    store = SessionStore(4, capacity=8, ttl=10.0, clock=clock)
    old = store.create("p", "chat")
    clock.t += 5
    with pytest.raises(InvalidInput, match="already in use"):
        store.create("p", "chat")  # still live
    clock.t += 6  # idle 11 s > 10: expired, not yet swept
    new = store.create("p", "chat")
    assert new is not old and store.get("chat", "p") is new
    assert old.gone().reason == "evicted" and store.stats()["evicted"] == 1
    store.pin(new)  # a step in flight keeps its id however long it runs
    clock.t += 100
    with pytest.raises(InvalidInput, match="already in use"):
        store.create("p", "chat")


def test_a_session_evicted_when_a_request_comes_for_it_is_logged(caplog):
    """Evicted on access (get, pin, a create reusing its id) before the sweep came: one log
    line each, naming the session and how long it sat idle; the counter agrees."""
    clock = FakeClock()
    store = SessionStore(4, capacity=8, ttl=10.0, clock=clock)
    a, b, c = store.create("p", "a"), store.create("p", "b"), store.create("p", "c")
    clock.t += 12.5
    with caplog.at_level(logging.INFO, logger="ssmstream.runtime.sessions"):
        with pytest.raises(SessionNotFound):
            store.get("a", "p")
        with pytest.raises(SessionNotFound):
            store.pin(b)
        store.create("p", "c")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"evicted idle session {s.id!r} (unused for 12.5 s, ttl 10 s)" for s in (a, b, c)
    ]
    assert store.stats()["evicted"] == 3


def test_a_full_store_warns_the_operator_once_a_minute(caplog):
    """Refusals of a full store are logged as one WARNING per FULL_LOG_INTERVAL (60 s), not
    one per refused call; the refusals themselves are RESOURCE_EXHAUSTED every time."""
    clock = FakeClock()
    store = SessionStore(4, capacity=1, ttl=math.inf, clock=clock)
    store.create()
    with caplog.at_level(logging.WARNING, logger="ssmstream.runtime.sessions"):
        for dt in (0, 1, 58, 1.5, 30):  # refused at 0, 1, 59, 60.5 and 90.5 s
            clock.t += dt
            with pytest.raises(LimitExceeded, match="capacity=1"):
                store.create()
    warned = [r for r in caplog.records if "session store full (capacity=1)" in r.getMessage()]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)


def test_capacity_and_per_principal_limits():
    clock = FakeClock()
    store = SessionStore(4, capacity=3, ttl=10.0, max_per_principal=2, clock=clock)
    store.create("p")
    store.create("p")
    with pytest.raises(LimitExceeded, match="max_per_principal=2"):
        store.create("p")
    q = store.create("q")
    with pytest.raises(LimitExceeded, match="full"):
        store.create("r")
    assert len(store) == 3
    store.close(q.id, "q")
    store.create("r")
    clock.t += 11  # everything idle: a full store evicts idle sessions to make room
    s = store.create("r")
    assert len(store) == 1 and store.get(s.id, "r") is s
    clock.t += 11  # r's session is idle: it does not count against max_per_principal
    p1, p2 = store.create("r"), store.create("r")
    with pytest.raises(SessionNotFound, match="evicted"):
        store.get(s.id, "r")
    assert store.get(p1.id, "r") is p1 and store.get(p2.id, "r") is p2
    # refused creates are not counted: created = live + closed + evicted
    st = store.stats()
    assert st["created"] == len(store) + st["closed"] + st["evicted"] == 7


def test_bytes_per_session_is_S_times_4(engine):
    S = engine.state_size
    store = make_store(engine, capacity=100)
    assert store.bytes_per_session == S * 4
    assert store.slab.nbytes == 100 * S * 4 and store.slab.array.dtype == np.float32
    assert store.slab.value.data_ptr() == store.slab.array.ctypes.data  # one buffer
    assert store.stats()["bytes_per_session"] == S * 4


def test_commit_is_all_or_nothing(engine):
    store = make_store(engine, capacity=2)
    s = store.create()
    feed(engine, store, s, [1, 2])
    before, pos = store.read(s), s.position
    for bad, field in [
        (np.zeros(engine.state_size + 1, dtype=np.float32), "new_state"),
        (np.zeros(engine.state_size, dtype=np.float64), "new_state"),
    ]:
        with pytest.raises(InvalidInput) as e:
            store.commit(s, bad, 1)
        assert e.value.field == field
    with pytest.raises(InvalidInput, match="consumed"):
        store.commit(s, before, -1)
    np.testing.assert_array_equal(store.read(s), before)
    assert s.position == pos == 2
    # a commit for a closed session must not write into the slot's next owner
    store.close(s.id)
    t = store.create()
    assert t.slot == s.slot
    with pytest.raises(SessionNotFound):
        store.commit(s, np.ones(engine.state_size, dtype=np.float32), 1)
    np.testing.assert_array_equal(store.read(t), np.zeros(engine.state_size, dtype=np.float32))
    assert t.position == 0


def test_lent_rows_stepped_in_the_slab_equal_one_commit_per_session(engine):
    """Rows written in the slab between lend and give_back (what a slot step does), with a
    session closed meanwhile, leave the slab and positions as a commit per session does in
    a second store."""
    rng = np.random.default_rng(7)
    stores = make_store(engine), make_store(engine)
    sessions = [[st.create() for _ in range(6)] for st in stores]
    pick = [4, 0, 5, 2]
    rows = rng.standard_normal((4, engine.state_size)).astype(np.float32)  # [4, S]
    lent = stores[0].lend([sessions[0][j] for j in pick])
    assert lent == [sessions[0][j] for j in pick]
    for s, row in zip(lent, rows):
        stores[0].slab.write(s.slot, row)
    for st, ss in zip(stores, sessions):
        st.close(ss[5].id)
    given = stores[0].give_back(lent, 3)
    alone = []
    for j, row in zip(pick, rows):
        try:
            alone.append(stores[1].commit(sessions[1][j], row, 3))
        except SessionNotFound as e:
            alone.append(e)
    assert [r if isinstance(r, int) else r.reason for r in given] == [3, 3, "closed", 3]
    assert [r if isinstance(r, int) else r.reason for r in alone] == [3, 3, "closed", 3]
    for a, b in zip(sessions[0][:5], sessions[1][:5]):
        np.testing.assert_array_equal(stores[0].read(a), stores[1].read(b))
        assert a.position == b.position
    assert stores[0].lend([sessions[0][5]]) == []  # closed: nothing to lend


# --- snapshot / restore / fork ---------------------------------------------------------


def test_snapshot_restore_gives_identical_next_outputs(engine):
    store = make_store(engine)
    s = store.create("alice")
    feed(engine, store, s, [1, 5, 2, 7])
    data = store.snapshot(s.id, "alice")
    r = store.restore(data, "bob")
    assert r.position == 4 and r.principal == "bob" and r.id != s.id
    np.testing.assert_array_equal(store.read(r), store.read(s))
    np.testing.assert_array_equal(feed(engine, store, s, [3, 4]), feed(engine, store, r, [3, 4]))
    other = make_store(engine)  # a fresh store of the same model accepts it too
    r2 = other.restore(data, session_id="named")
    assert r2.id == "named" and r2.position == 4


def test_fork_diverges_and_parent_is_unchanged(engine):
    store = make_store(engine)
    parent = store.create("p")
    feed(engine, store, parent, [1, 2, 3])
    state_before = store.read(parent)
    child, twin = store.fork(parent.id, "p"), store.fork(parent.id, "p")
    assert child.position == parent.position == 3 and child.principal == "p"
    y_child = feed(engine, store, child, [4, 4, 4])
    np.testing.assert_array_equal(store.read(parent), state_before)
    assert parent.position == 3 and child.position == 6
    np.testing.assert_array_equal(feed(engine, store, twin, [4, 4, 4]), y_child)
    y_parent = feed(engine, store, parent, [9, 9, 9])
    assert np.abs(y_child - y_parent).max() > 1e-3  # two different streams
    with pytest.raises(SessionNotFound):
        store.fork(parent.id, "intruder")


def _corruptions(data: bytes) -> list[bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return [bytes(flipped), data[:-1], data[:40], b"", b"garbage" * 20, data + b"\0"]


def test_corrupt_and_foreign_snapshots_are_refused_and_change_nothing(engine):
    store = make_store(engine, capacity=4)
    s = store.create()
    feed(engine, store, s, [1, 2])
    data = store.snapshot(s.id)
    stats = store.stats()
    for bad in _corruptions(data):
        with pytest.raises(InvalidInput) as e:
            store.restore(bad)
        assert e.value.field == "snapshot"
    with pytest.raises(InvalidInput):
        store.restore("not bytes")
    foreign = SessionStore(engine.state_size, model_sha="f" * 64, snapshot_key=KEY)
    with pytest.raises(ModelError, match="another model"):
        foreign.restore(data)
    wrong_size = SessionStore(engine.state_size + 2, model_sha=store.model_sha, snapshot_key=KEY)
    with pytest.raises(ModelError, match="state size"):
        wrong_size.restore(data)
    assert store.stats() == stats and len(store) == 1 and len(foreign) == 0
    full = make_store(engine, capacity=1)
    full.create()
    with pytest.raises(LimitExceeded):
        full.restore(data)
    assert len(full) == 1


def test_forged_unsigned_and_foreign_key_snapshots_are_refused(engine):
    """The hand-built signature is accepted; a state or position edited afterwards, a v1
    (sha256 only) snapshot and one signed with another key are each refused by name."""
    store = make_store(engine, capacity=4)
    sha, S = store.model_sha, engine.state_size
    state = np.linspace(-1, 1, S, dtype=np.float32)
    s = store.restore(forge(state, 7, sha))  # our own key, by hand: a valid snapshot
    assert s.position == 7
    np.testing.assert_array_equal(store.read(s), state)
    good = forge(state, 7, sha)
    head = SNAP_HEAD.size + len(sha)
    huge = bytearray(good)
    huge[head : head + 4] = np.float32(3e38).tobytes()  # a finite state that overflows
    moved = bytearray(good)
    moved[12:20] = struct.pack("<Q", 2**63 - 1)
    cases = {
        "tampered": bytes(huge),
        "tampered ": bytes(moved),
        "unsigned": forge(state, 7, sha, secret=None, version=1),
        "another server key": forge(state, 7, sha, secret=b"someone-elses-key-123456"),
        # the trailer (with the key id) cut off, or the state cut short: truncated, not a
        # wrong key (which would send an operator off changing --snapshot-key)
        "truncated": good[:-7],
        "truncated   ": good[:-1],  # its last byte only
        "truncated ": good[: len(good) // 2],
        "truncated  ": good[: SNAP_HEAD.size - 3],  # inside the header: not "not a snapshot"
        # bytes appended (a newline when saved to a file): not a wrong key either
        "longer than its header": good + b"\n",
    }
    before = store.stats()
    for words, data in cases.items():
        with pytest.raises(InvalidInput, match=words.strip()) as e:
            store.restore(data)
        assert e.value.field == "snapshot"
    assert store.stats() == before and len(store) == 1


def test_signed_snapshots_are_checked_for_what_a_signature_cannot_vouch_for(engine):
    store = make_store(engine)
    S = engine.state_size
    with pytest.raises(InvalidInput, match="NaN or inf"):
        store.restore(forge(np.full(S, np.inf, np.float32), 1, store.model_sha))
    top = store.restore(forge(np.zeros(S, np.float32), 2**63 - 1, store.model_sha))
    assert top.position == 2**63 - 1  # the largest position: no step may follow (batcher)


def test_session_ids_are_matched_whole():
    for bad in ["abc\n", "\nabc", "a b", "", "-a", "a" * 129, "é"]:
        with pytest.raises(InvalidInput, match="session_id"):
            check_session_id(bad)
    assert check_session_id("a" * 128) == "a" * 128
    store = SessionStore(4, capacity=4)
    with pytest.raises(InvalidInput, match="session_id"):
        store.create(session_id="abc\n")
    parent = store.create(session_id="p")
    with pytest.raises(InvalidInput, match="session_id"):
        store.fork(parent.id, new_id="q\n")
    assert len(store) == 1


def test_incarnations_differ_per_create_and_survive_save_load(engine, tmp_path):
    store = make_store(engine)
    a = store.create(session_id="same")
    store.close("same")
    b = store.create(session_id="same")
    assert a.incarnation != b.incarnation and not a.live
    with pytest.raises(SessionNotFound, match="closed"):  # a's incarnation is gone: b stays
        store.close("same", incarnation=a.incarnation)
    assert b.live and store.get("same") is b
    store.save(tmp_path)
    fresh = make_store(engine)
    fresh.load(tmp_path)
    assert fresh.get("same").incarnation == b.incarnation
    assert store.fork("same").incarnation != b.incarnation


def test_a_state_that_is_not_finite_has_no_snapshot_and_is_not_saved(engine, tmp_path):
    """A state gone NaN / inf (a step's outputs came out so: CorruptState) would make a
    restore, and a load of the whole sessions file, refuse it: no snapshot is taken of it
    (DATA_LOSS), and a save leaves it out, so the other sessions survive a restart."""
    store = make_store(engine)
    bad, inf, good = store.create(session_id="bad"), store.create(), store.create()
    feed(engine, store, good, [1, 2])
    store.commit(bad, np.full(engine.state_size, np.nan, dtype=np.float32), 1)
    state = np.zeros(engine.state_size, dtype=np.float32)
    state[-1] = np.inf
    store.commit(inf, state, 1)
    for s in (bad, inf):
        with pytest.raises(CorruptState, match=f"session '{s.id}': its state contains NaN or inf"):
            store.snapshot(s.id)
    store.save(tmp_path)
    fresh = make_store(engine)
    assert fresh.load(tmp_path) == 1 and fresh.get(good.id).position == 2
    np.testing.assert_array_equal(feed(engine, fresh, fresh.get(good.id), [3]),
                                  feed(engine, store, good, [3]))  # fmt: skip
    assert len(store) == 3  # nothing closed: only the file leaves them out


# --- save / load ----------------------------------------------------------------------


def test_save_load_gives_identical_continuation(engine, tmp_path):
    store = make_store(engine, ttl=30.0)
    a, b = store.create("alice"), store.create("bob", session_id="bobs", ttl=5.0)
    feed(engine, store, a, [1, 2, 3])
    feed(engine, store, b, [7])
    path = store.save(tmp_path)
    assert path == tmp_path / STORE_FILE and [p.name for p in tmp_path.iterdir()] == [STORE_FILE]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # every session's state: owner only
    fresh = make_store(engine, ttl=30.0)
    assert fresh.load(tmp_path) == 2
    a2, b2 = fresh.get(a.id, "alice"), fresh.get("bobs", "bob")
    assert (a2.position, b2.position, b2.ttl) == (3, 1, 5.0)
    np.testing.assert_array_equal(feed(engine, fresh, a2, [4, 5]), feed(engine, store, a, [4, 5]))
    with pytest.raises(SessionNotFound):
        fresh.get(a.id, "bob")
    assert make_store(engine).load(tmp_path / "empty") == 0
    # restarted with a lower TTL: no loaded session keeps a longer one than the store allows
    lower = make_store(engine, ttl=2.0)
    lower.load(tmp_path)
    assert lower.get(a.id, "alice").ttl == lower.get("bobs", "bob").ttl == 2.0


def test_bad_saved_stores_are_refused_and_change_nothing(engine, tmp_path):
    store = make_store(engine)
    s = store.create(session_id="one")
    feed(engine, store, s, [1])
    store.save(tmp_path)
    good = (tmp_path / STORE_FILE).read_bytes()
    target = make_store(engine, capacity=4)
    target.create(session_id="keep")
    for bad in _corruptions(good):
        (tmp_path / STORE_FILE).write_bytes(bad)
        with pytest.raises(InvalidInput):
            target.load(tmp_path)
    (tmp_path / STORE_FILE).write_bytes(good)
    with pytest.raises(ModelError):
        SessionStore(engine.state_size, model_sha="other", snapshot_key=KEY).load(tmp_path)
    with pytest.raises(InvalidInput, match="another server key"):
        make_store(engine, snapshot_key=SnapshotKey.generate()).load(tmp_path)
    for cut in (len(good) - 50, len(good) // 2, 30):
        (tmp_path / STORE_FILE).write_bytes(good[:cut])
        with pytest.raises(InvalidInput, match="sessions.bin is truncated"):
            target.load(tmp_path)
    (tmp_path / STORE_FILE).write_bytes(good + b"\n")
    with pytest.raises(InvalidInput, match="sessions.bin is longer than its header says"):
        target.load(tmp_path)
    for head in (b'{"state_size": 1e999, "sessions": []}', b"[" * 100_000):  # a foreign file
        bad = _STORE_HEAD.pack(STORE_MAGIC, VERSION, len(head)) + head + bytes(40)
        (tmp_path / STORE_FILE).write_bytes(bad)
        with pytest.raises(InvalidInput) as e:  # not OverflowError / RecursionError
            target.load(tmp_path)
        assert e.value.field == "state_dir"
    (tmp_path / STORE_FILE).write_bytes(good)
    clash = make_store(engine)
    clash.create(session_id="one")
    with pytest.raises(InvalidInput, match="already live"):
        clash.load(tmp_path)
    full = make_store(engine, capacity=1)
    full.create()
    with pytest.raises(LimitExceeded):
        full.load(tmp_path)
    assert len(target) == len(clash) == len(full) == 1
    assert target.load(tmp_path) == 1 and len(target) == 2


def test_constructor_arguments_are_checked():
    for kw, field in [
        ({"state_size": 0}, "state_size"),
        ({"state_size": 4, "capacity": 0}, "capacity"),
        ({"state_size": 4, "ttl": 0}, "ttl"),
        ({"state_size": 4, "max_per_principal": 0}, "max_per_principal"),
        ({"state_size": 4, "model_sha": "é"}, "model_sha"),
        ({"state_size": 4, "tombstones": -1}, "tombstones"),  # every close had failed midway
        ({"state_size": 4, "tombstones": 1.5}, "tombstones"),
        ({"state_size": 4, "ttl": -(10**400)}, "ttl"),  # was OverflowError
    ]:
        with pytest.raises(InvalidInput) as e:
            SessionStore(**kw)
        assert e.value.field == field
    assert SessionStore(4, ttl=10**400).ttl == math.inf  # beyond float range: never expires


def test_pack_state_refuses_what_no_restore_would_take():
    """A public pack_state with a negative position had raised struct.error, and a state of
    another size made a snapshot the same store refuses."""
    store = SessionStore(4)
    for state, position, field in [
        (np.zeros(4, np.float32), -1, "position"),
        (np.zeros(4, np.float32), 2**63, "position"),
        (np.zeros(4, np.float32), 1.0, "position"),
        (np.zeros(3, np.float32), 1, "state"),
        (np.zeros((1, 4), np.float32), 1, "state"),
    ]:
        with pytest.raises(InvalidInput) as e:
            store.pack_state(state, position)
        assert e.value.field == field
    state = np.arange(4, dtype=np.float32)
    assert store.unpack(store.pack_state(state, 2**63 - 1))[0] == 2**63 - 1
    np.testing.assert_array_equal(store.unpack(store.pack_state(state, 5))[1], state)


# --- rows lent to slot steps ----------------------------------------------------------


def test_lend_any_live_slots_and_give_back_advances():
    store = SessionStore(4, capacity=8)
    a, b, c, d = (store.create() for _ in range(4))  # slots 0..3
    assert store.lend([c, a]) == [c, a]  # any slots, any order
    store.slab.array[[2, 0]] = np.arange(8, dtype=np.float32).reshape(2, 4)  # a slot step
    assert store.give_back([c, a], 1) == [1, 1]
    np.testing.assert_array_equal(store.read(a), [4, 5, 6, 7])
    assert store.lend([]) == []
    store.close(d.id)
    assert store.lend([c, d]) == [c]  # d is closed
    assert store.give_back([c], 0) == [1]  # a failed step: nothing advances
    with pytest.raises(InvalidInput, match="consumed"):
        store.give_back([b], -1)
    assert not any(x._lent for x in (a, b, c, d))
    # a row lent twice (two steps writing it) is refused, and so is giving back what was
    # not lent: which rows are lent, what save() waits on, stays exact
    store.lend([a])
    for twice in ([a], [b, b]):
        with pytest.raises(SessionBusy, match="lent"):
            store.lend(twice)
    with pytest.raises(InvalidInput, match="lend"):
        store.give_back([a, b], 1)
    assert store.give_back([a], 1) == [2] and b.position == 0 and not a._lent


def test_a_session_closed_while_its_row_is_lent_keeps_its_slot_until_returned():
    """The slot step may still be writing: no new session may get that row."""
    store = SessionStore(4, capacity=2)
    a, _ = store.create(), store.create()
    store.lend([a])
    store.close(a.id)
    with pytest.raises(LimitExceeded):
        store.create()  # slot 0 is still being written, slot 1 is b's
    (err,) = store.give_back([a], 1)
    assert isinstance(err, SessionNotFound) and err.reason == "closed"
    c = store.create()
    assert c.slot == a.slot
    np.testing.assert_array_equal(store.read(c), np.zeros(4, dtype=np.float32))


def test_readers_wait_until_lent_rows_are_returned(tmp_path):
    """read, snapshot, fork and save of a session whose row is being written wait for the
    write to end, then see the new state at its new position, never a half-written one."""
    import threading

    store = SessionStore(4, capacity=8, snapshot_key=KEY)
    s = store.create()
    store.lend([s])
    got, threads = {}, []
    readers = {
        "read": lambda: store.read(s),
        "snapshot": lambda: store.snapshot(s.id),
        "fork": lambda: store.fork(s.id),
        "save": lambda: store.save(tmp_path),
    }
    for name, fn in readers.items():
        threads.append(threading.Thread(target=lambda n=name, f=fn: got.setdefault(n, f())))
        threads[-1].start()
    threads[0].join(0.2)
    assert not got  # all four are waiting
    store.slab.array[s.slot] = 7.0
    store.give_back([s], 1)
    for t in threads:
        t.join(5)
    np.testing.assert_array_equal(got["read"], np.full(4, 7.0, dtype=np.float32))
    child = got["fork"]
    assert child.position == 1
    np.testing.assert_array_equal(store.read(child), np.full(4, 7.0, dtype=np.float32))
    restored = store.restore(got["snapshot"])
    assert restored.position == 1
    np.testing.assert_array_equal(store.read(restored), np.full(4, 7.0, dtype=np.float32))
    other = SessionStore(4, capacity=8, snapshot_key=KEY)
    other.load(tmp_path)
    assert other.get(s.id).position == 1
    np.testing.assert_array_equal(other.read(other.get(s.id)), np.full(4, 7.0, dtype=np.float32))


def test_a_reader_of_a_session_closed_during_the_write_gets_not_found():
    import threading

    store = SessionStore(4, capacity=4)
    s = store.create()
    store.lend([s])
    err = {}

    def reader():
        try:
            store.read(s)
        except SessionNotFound as e:
            err["e"] = e

    t = threading.Thread(target=reader)
    t.start()
    t.join(0.1)
    store.close(s.id)
    store.give_back([s], 1)
    t.join(5)
    assert err["e"].reason == "closed"


def test_new_sessions_take_the_lowest_free_slot():
    """Live sessions stay packed at the start of the slab (the untouched rest of a CPU slab
    costs no memory)."""
    store = SessionStore(4, capacity=8)
    sessions = [store.create() for _ in range(6)]
    assert [s.slot for s in sessions] == list(range(6))
    for k in (4, 1, 3):
        store.close(sessions[k].id)
    assert [store.create().slot for _ in range(4)] == [1, 3, 4, 6]


def test_a_key_file_others_can_read_is_used_with_a_warning(tmp_path, caplog):
    """Whoever reads the key can sign snapshots the server accepts: a key file readable by
    group or others gets a warning naming it (the key made by in_dir is 0600: none)."""
    made = SnapshotKey.in_dir(tmp_path)
    assert stat.S_IMODE((tmp_path / "snapshot.key").stat().st_mode) == 0o600
    assert "readable or writable by other users" not in caplog.text
    shared = tmp_path / "shared.key"
    shared.write_bytes((tmp_path / "snapshot.key").read_bytes())
    shared.chmod(0o644)
    with caplog.at_level("WARNING", logger="ssmstream.runtime.secret_files"):
        key = SnapshotKey.from_file(shared)
    assert key.id == made.id
    assert f"snapshot key {shared} is readable or writable by other users (mode 644)" in caplog.text
    with pytest.raises(InvalidInput, match="snapshot_key: .* holds 3 bytes"):
        shared.write_bytes(b"abc")
        SnapshotKey.from_file(shared)


def test_a_copy_replaced_by_another_incarnation_says_closed_not_retry(engine):
    """install() with another incarnation of the id (closed elsewhere, the id created again):
    the old copy's requests are NOT_FOUND closed; UNAVAILABLE (retry) would land them on a
    different session. A copy another replica took over (drop "moved") is the retry case."""
    store = make_store(engine)
    old = store.create("p", "conv")
    S = engine.state_size
    store.install("conv", "p", 60.0, 0, np.zeros(S, np.float32), incarnation="another")
    assert store.local("conv").incarnation == "another"
    for err in (old.gone(), pytest.raises(SessionNotFound, store.read, old).value):
        assert isinstance(err, SessionNotFound) and err.reason == "closed"
    taken = store.create("p", "taken")
    store.drop(taken, "moved")
    assert isinstance(taken.gone(), Unavailable) and "another replica" in str(taken.gone())


def test_commit_and_give_back_refuse_a_bool_consumed():
    """True is not an input count; nothing changes."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    with pytest.raises(InvalidInput) as e:
        store.commit(s, np.ones(4, np.float32), True)
    assert e.value.field == "consumed"
    assert str(e.value) == "consumed: must be an integer >= 0, got True"
    assert s.position == 0 and np.array_equal(store.read(s), np.zeros(4, np.float32))
    (lent,) = store.lend([s])
    with pytest.raises(InvalidInput, match="^consumed: "):
        store.give_back([lent], False)
    assert store.give_back([lent], 0) == [0]


def test_a_model_sha_over_1024_characters_is_refused():
    """The sha is written in every snapshot header (u16 length);
    over 1024 ASCII characters is refused up front, 1024 is fine."""
    SessionStore(4, model_sha="a" * 1024)
    with pytest.raises(InvalidInput) as e:
        SessionStore(4, model_sha="a" * 1025)
    assert e.value.field == "model_sha"
    assert str(e.value).startswith("model_sha: must be an ASCII string, got 'aaaa")


def test_an_id_taken_by_another_principal_is_unknown_to_its_former_owner():
    """Once another principal's
    session holds the id, the former owner is told "unknown" (the id is not theirs, and its
    old tombstone no longer describes it), not "closed"."""
    from ssmstream.runtime.errors import SessionNotFound

    store = SessionStore(4, capacity=2)
    store.create("alice", "x")
    store.close("x", "alice")
    with pytest.raises(SessionNotFound) as e:
        store.get("x", "alice")
    assert e.value.reason == "closed"
    store.create("bob", "x")
    with pytest.raises(SessionNotFound) as e:
        store.get("x", "alice")
    assert e.value.reason == "unknown"


def test_stats_count_only_principals_with_live_sessions():
    """A principal whose last session ended is not counted."""
    store = SessionStore(4, capacity=4)
    a = store.create("alice")
    b1, b2 = store.create("bob"), store.create("bob")
    assert store.stats()["principals"] == 2
    store.close(a.id, "alice")
    store.close(b1.id, "bob")
    assert store.stats()["principals"] == 1
    store.close(b2.id, "bob")
    assert store.stats()["principals"] == 0


def test_the_tombstones_argument_is_how_many_ended_ids_are_remembered():
    """tombstones=2 remembers exactly the last two ended ids."""
    from ssmstream.runtime.errors import SessionNotFound

    store = SessionStore(4, capacity=4, tombstones=2)
    for sid in ("a", "b", "c"):
        store.create("p", sid)
        store.close(sid, "p")
    reasons = {}
    for sid in ("a", "b", "c"):
        with pytest.raises(SessionNotFound) as e:
            store.get(sid, "p")
        reasons[sid] = e.value.reason
    assert reasons == {"a": "unknown", "b": "closed", "c": "closed"}


def test_a_session_idle_exactly_its_ttl_is_still_live():
    """Sessions expire when idle *longer* than their TTL."""
    from ssmstream.runtime.errors import SessionNotFound

    clock = FakeClock()
    store = SessionStore(4, capacity=2, ttl=10.0, clock=clock)
    s = store.create("p", "a")
    clock.t += 10.0
    assert store.evict_idle() == []
    assert store.get("a", "p") is s  # refreshes its timer
    clock.t += 10.0
    store.pin(s)  # exactly the TTL idle: pin does not evict either
    store.unpin(s)
    clock.t += 10.5
    with pytest.raises(SessionNotFound) as e:
        store.get("a", "p")
    assert e.value.reason == "evicted"


def test_a_long_step_restarts_the_idle_timer_when_it_ends():
    """A step pinned longer than the TTL leaves the session a full
    TTL of idle time after it ends, not an already-expired one."""
    clock = FakeClock()
    store = SessionStore(4, capacity=2, ttl=10.0, clock=clock)
    s = store.create("p", "a")
    store.pin(s)
    clock.t += 100.0
    assert store.evict_idle() == []  # pinned: never evicted
    store.unpin(s)
    clock.t += 5.0
    assert store.evict_idle() == []
    assert store.get("a", "p") is s


def test_state_now_does_not_read_a_row_being_stepped():
    """While a row is lent its state and position do not match
    (the step writes the row before give_back advances the position): state_now says None."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    store.commit(s, np.full(4, 2.0, np.float32), 3)
    state, pos = store.state_now(s)
    assert pos == 3 and np.array_equal(state, np.full(4, 2.0, np.float32))
    (lent,) = store.lend([s])
    assert store.state_now(s) is None
    store.give_back([lent], 1)
    state, pos = store.state_now(s)
    assert pos == 4


def test_commit_and_give_back_restart_the_idle_timer():
    """A session that consumed inputs is not idle since then."""
    clock = FakeClock()
    store = SessionStore(4, capacity=2, ttl=10.0, clock=clock)
    s = store.create("p", "a")
    clock.t += 8.0
    assert store.commit(s, np.ones(4, np.float32), 2) == 2
    clock.t += 8.0
    assert store.evict_idle() == []
    (lent,) = store.lend([s])
    clock.t += 8.0
    assert store.give_back([lent], 1) == [3]
    clock.t += 8.0
    assert store.evict_idle() == [] and s.live and s.position == 3


def test_a_session_file_repeating_an_id_is_refused_whole(tmp_path):
    """A (signed) file naming one id twice adds nothing, and says so."""
    from ssmstream.runtime.sessions import STORE_FILE

    store = SessionStore(4, capacity=4, model_sha="m")
    entry = {"id": "dup", "principal": "p", "position": 1, "ttl": 60.0, "incarnation": "i1"}
    header = {
        "model_sha": "m",
        "state_size": 4,
        "sessions": [entry, {**entry, "incarnation": "i2"}],
    }
    data = encode_session_file(store.snapshot_key, header, np.zeros((2, 4), np.float32))
    (tmp_path / STORE_FILE).write_bytes(data)
    with pytest.raises(InvalidInput) as e:
        store.load(tmp_path)
    assert e.value.field == "state_dir"
    assert "session ids already live or repeated" in str(e.value)
    assert len(store) == 0 and store.stats()["free"] == 4 and store.stats()["restored"] == 0


def test_a_key_file_of_exactly_the_minimum_length_is_accepted(tmp_path):
    """MIN_KEY_BYTES (16) bytes is enough, 15 is not."""
    assert MIN_KEY_BYTES == 16
    ok, short = tmp_path / "ok.key", tmp_path / "short.key"
    ok.write_bytes(b"k" * 16 + b"\n")
    short.write_bytes(b"k" * 15 + b"\n")
    os.chmod(ok, 0o600)
    os.chmod(short, 0o600)
    assert SnapshotKey.from_file(ok).secret == b"k" * 16
    with pytest.raises(InvalidInput) as e:
        SnapshotKey.from_file(short)
    assert e.value.field == "snapshot_key"
    assert str(e.value) == f"snapshot_key: {short} holds 15 bytes; use at least 16"


def test_servers_creating_the_key_together_share_one_whole_key(tmp_path, monkeypatch):
    """A second server starting on the same directory while the first is still writing its
    new key: it never sees a half-written (empty) key file, and both use one key."""
    from ssmstream.runtime import snapshots

    token_hex, others = snapshots.secrets.token_hex, []

    def meanwhile(n):
        if not others:  # the first key being made: the other server starts now
            others.append(None)
            others[0] = SnapshotKey.in_dir(tmp_path)
        return token_hex(n)

    monkeypatch.setattr(snapshots.secrets, "token_hex", meanwhile)
    first = SnapshotKey.in_dir(tmp_path)
    assert first.id == others[0].id and first.secret == others[0].secret
    assert len(first.secret) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.key"]  # no temp file left


def test_check_session_id_reports_the_field_it_is_given():
    """The error names the caller's field (new_session_id of a
    fork, ...), not always session_id."""
    with pytest.raises(InvalidInput) as e:
        check_session_id("-bad", "new_session_id")
    assert e.value.field == "new_session_id"
    assert str(e.value) == (
        "new_session_id: must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter "
        "or digit, got '-bad'"
    )
    assert check_session_id("ok-1", "new_session_id") == "ok-1"


def test_a_principal_that_is_not_a_string_is_refused_and_nothing_changes():
    """The principal must be a str; a refused create takes no slot."""
    store = SessionStore(4, capacity=2)
    with pytest.raises(InvalidInput) as e:
        store.create(None, "a")
    assert e.value.field == "principal"
    assert str(e.value) == "principal: must be a string, got NoneType"
    with pytest.raises(InvalidInput, match="^principal: must be a string, got int$"):
        store.restore(store.pack_state(np.ones(4, np.float32), 2), 7, "b")
    assert len(store) == 0 and store.stats()["free"] == 2 and store.stats()["created"] == 0


def test_get_of_an_empty_id_is_invalid_not_unknown():
    """An empty id is a malformed request (InvalidInput), not a NOT_FOUND."""
    store = SessionStore(4, capacity=2)
    store.create("p", "a")
    with pytest.raises(InvalidInput) as e:
        store.get("", "p")
    assert e.value.field == "session_id"
    assert str(e.value) == "session_id: must be a non-empty string, got ''"
    with pytest.raises(InvalidInput, match="^session_id: must be a non-empty string"):
        store.close("", "p")


def test_rewind_refuses_a_negative_position_and_changes_nothing():
    """Position in [0, position]; -1 is refused, state and position kept."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    x = np.arange(4, dtype=np.float32)
    store.commit(s, x, 3)
    with pytest.raises(InvalidInput) as e:
        store.rewind(s, np.zeros(4, np.float32), -1)
    assert e.value.field == "position"
    assert str(e.value) == "position: must be an integer in [0, 3], got -1"
    assert s.position == 3 and np.array_equal(store.read(s), x)
    store.rewind(s, np.zeros(4, np.float32), 0)
    assert s.position == 0


@pytest.mark.parametrize(
    "state, position, field",
    [
        (np.zeros(4, np.float32), 1.5, "position"),  # had been stored: no snapshot took it
        (np.zeros(4, np.float32), True, "position"),
        (np.zeros(3, np.float32), 1, "state"),
        (np.array(["a"] * 4), 1, "state"),  # had been numpy's ValueError
        (np.zeros(4, np.float64), 1, "state"),
    ],
)
def test_rewind_refuses_a_malformed_position_or_state_and_changes_nothing(state, position, field):
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    x = np.arange(4, dtype=np.float32)
    store.commit(s, x, 3)
    with pytest.raises(InvalidInput) as e:
        store.rewind(s, state, position)
    assert e.value.field == field
    assert s.position == 3 and type(s.position) is int and np.array_equal(store.read(s), x)
    store.snapshot("a", "p")  # still whole


def test_commit_past_the_largest_position_is_refused_and_changes_nothing(tmp_path):
    # it had been committed: its snapshot was refused, and the saved file it went into
    # refused at the next load, with every other session in it
    store = SessionStore(4, capacity=2, snapshot_key=KEY)
    s = store.create("p", "a")
    x = np.arange(4, dtype=np.float32)
    store.commit(s, x, MAX_POSITION - 2)
    with pytest.raises(OutOfRange) as e:
        store.commit(s, np.ones(4, np.float32), 3)
    assert e.value.field == "consumed" and "past the largest position, 2**63 - 1" in str(e.value)
    assert s.position == MAX_POSITION - 2 and np.array_equal(store.read(s), x)
    assert store.commit(s, x, 2) == MAX_POSITION  # up to the largest itself
    store.save(tmp_path)
    assert SessionStore(4, capacity=2, snapshot_key=KEY).load(tmp_path) == 1


def test_sessions_that_never_expire_are_saved_and_loaded(tmp_path):
    """ttl = math.inf (never expire) is written into the file's JSON header as it is."""
    store = SessionStore(4, capacity=2, ttl=math.inf, snapshot_key=KEY)
    x = np.arange(4, dtype=np.float32)
    store.commit(store.create("p", "a"), x, 3)
    store.save(tmp_path)
    again = SessionStore(4, capacity=2, ttl=math.inf, snapshot_key=KEY)
    assert again.load(tmp_path) == 1
    s = again.get("a", "p")
    assert s.ttl == math.inf and s.position == 3
    np.testing.assert_array_equal(again.read(s), x)


def test_a_rewind_restarts_the_idle_timer():
    """A rewind is an access: the session's idle time starts again."""
    clock = FakeClock()
    store = SessionStore(4, capacity=2, ttl=10.0, clock=clock)
    s = store.create("p", "a")
    store.commit(s, np.ones(4, np.float32), 2)  # last_used = 1000
    clock.t = 1008.0
    store.rewind(s, np.zeros(4, np.float32), 1)
    assert s.last_used == 1008.0
    clock.t = 1015.0  # 15 s after the commit, 7 s after the rewind
    assert store.evict_idle() == []
    assert store.get("a", "p") is s and s.position == 1


def test_a_fork_keeps_the_parents_ttl():
    """The child has the parent's TTL, not the store's default."""
    clock = FakeClock()
    store = SessionStore(4, capacity=3, ttl=600.0, clock=clock)
    parent = store.create("p", "a", ttl=5.0)
    store.commit(parent, np.ones(4, np.float32), 2)
    child = store.fork("a", "p", "b")
    assert child.ttl == 5.0 and child.position == 2
    clock.t += 6.0
    assert sorted(store.evict_idle()) == ["a", "b"]
    with pytest.raises(SessionNotFound) as e:
        store.get("b", "p")
    assert e.value.reason == "evicted"


def test_restore_is_counted_in_stats():
    """Created + restored + forked = live + ended; a restore counts."""
    store = SessionStore(4, capacity=3)
    a = store.create("p", "a")
    store.commit(a, np.ones(4, np.float32), 2)
    store.restore(store.snapshot("a", "p"), "p", "b")
    store.fork("a", "p", "c")
    st = store.stats()
    assert (st["created"], st["restored"], st["forked"]) == (1, 1, 1)
    assert st["sessions"] == 3


def encode_session_file(key, header: dict, states: np.ndarray) -> bytes:
    """A whole session file's bytes (write_session_file of one part)."""
    f = io.BytesIO()
    write_session_file(f, key, header, [states])
    return f.getvalue()


def _write_file(tmp_path, store, entries, states):
    header = {"model_sha": store.model_sha, "state_size": store.state_size, "sessions": entries}
    (tmp_path / "sessions.bin").write_bytes(
        encode_session_file(store.snapshot_key, header, np.asarray(states, np.float32))
    )


@pytest.mark.parametrize(
    "row, position, says",
    [
        ([0.0, float("nan"), 0.0, 0.0], 1, "has a state that contains NaN or inf"),
        ([0.0, 1.0, 2.0, 3.0], -1, "has position -1, out of range [0, 2**63 - 1]"),
    ],
)
def test_a_signed_session_file_with_a_bad_state_or_position_is_refused_whole(
    tmp_path, row, position, says
):
    """A signature cannot vouch for a finite state and a position in range; a
    file with one bad session loads nothing."""
    store = SessionStore(4, capacity=4)
    entries = [
        {"id": "good", "principal": "p", "position": 2, "ttl": 60.0, "incarnation": "i1"},
        {"id": "bad", "principal": "p", "position": position, "ttl": 60.0, "incarnation": "i2"},
    ]
    _write_file(tmp_path, store, entries, [[1.0, 1.0, 1.0, 1.0], row])
    with pytest.raises(InvalidInput) as e:
        store.load(tmp_path)
    assert e.value.field == "state_dir"
    assert str(e.value) == f"state_dir: {tmp_path / 'sessions.bin'}: session 'bad' {says}"
    assert len(store) == 0 and store.stats()["restored"] == 0


def test_a_session_file_of_another_state_size_is_refused_whole(tmp_path):
    """A file whose state size is not this model's is a ModelError, even when
    its model_sha matches (nothing is loaded)."""
    from ssmstream.runtime.errors import ModelError

    big = SessionStore(8, capacity=2, model_sha="m")
    s = big.create("p", "a")
    big.commit(s, np.ones(8, np.float32), 1)
    big.save(tmp_path)
    small = SessionStore(4, capacity=2, model_sha="m", snapshot_key=big.snapshot_key)
    with pytest.raises(ModelError) as e:
        small.load(tmp_path)
    assert str(e.value) == (
        f"state_dir: {tmp_path / 'sessions.bin'} has state size 8, this model has 4"
    )
    other = SessionStore(8, capacity=2, model_sha="n", snapshot_key=big.snapshot_key)
    with pytest.raises(ModelError) as e:
        other.load(tmp_path)
    assert str(e.value) == (
        f"state_dir: {tmp_path / 'sessions.bin'} holds sessions of another model (sha 'm')"
    )
    assert len(small) == len(other) == 0
    assert len(small) == 0 and small.stats()["restored"] == 0


def test_load_respects_max_per_principal_exactly(tmp_path):
    """A file that would take a principal one past max_per_principal is refused
    whole; exactly up to the limit loads."""
    from ssmstream.runtime.errors import LimitExceeded

    src = SessionStore(4, capacity=4)
    for sid in ("a", "b", "c"):
        src.create("p", sid)
    src.save(tmp_path)
    dst = SessionStore(4, capacity=8, max_per_principal=2, snapshot_key=src.snapshot_key)
    with pytest.raises(LimitExceeded) as e:
        dst.load(tmp_path)
    path = tmp_path / "sessions.bin"
    assert str(e.value) == (
        f"state_dir: {path}: principals ['p'] would exceed their max_sessions_per_principal"
    )
    assert len(dst) == 0
    dst3 = SessionStore(4, capacity=8, max_per_principal=3, snapshot_key=src.snapshot_key)
    assert dst3.load(tmp_path) == 3


def test_pin_refuses_a_closed_session_and_a_non_session():
    """A step of a session closed meanwhile is NOT_FOUND "closed" at pin (no pin
    taken); a non-Session is InvalidInput."""
    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    store.close("a", "p")
    with pytest.raises(SessionNotFound) as e:
        store.pin(s)
    assert (e.value.session_id, e.value.reason) == ("a", "closed")
    assert not s.pinned
    with pytest.raises(InvalidInput) as e2:
        store.pin("a")
    assert str(e2.value) == "session: must be a Session, got str"


@pytest.mark.parametrize("n", [0, 1, 15])
def test_a_key_shorter_than_16_bytes_is_refused_however_it_is_made(n):
    with pytest.raises(InvalidInput) as e:
        SnapshotKey(b"k" * n)
    assert e.value.field == "snapshot_key"
    assert "must be at least 16 bytes" in str(e.value)
    assert SnapshotKey(b"k" * 16).secret == b"k" * 16


@pytest.mark.parametrize("secret", ["k" * 32, bytearray(b"k" * 32), None])
def test_a_key_that_is_not_bytes_is_refused_naming_the_field(secret):
    with pytest.raises(InvalidInput) as e:
        SnapshotKey(secret)
    assert e.value.field == "snapshot_key"


@pytest.mark.parametrize("version", [0, 3])
def test_a_signed_snapshot_of_another_format_version_is_refused_naming_it(version):
    data = forge(np.zeros(4, np.float32), 5, "m", version=version)
    with pytest.raises(InvalidInput) as e:
        decode_snapshot(KEY, data, "m", 4)
    assert e.value.field == "snapshot"
    newer = "; it was written by a newer ssmstream" if version > 2 else ""
    assert str(e.value).endswith(f"has format version {version}, not supported (want 2){newer}")
    assert decode_snapshot(KEY, forge(np.ones(4, np.float32), 5, "m"), "m", 4)[0] == 5


def test_a_session_file_of_0_1_0_says_to_move_it_aside(tmp_path):
    # 0.1.0 wrote an unsigned file at every stop, even with no sessions: the upgraded server
    # refused to start without saying what to do
    from ssmstream.runtime.snapshots import _STORE_HEAD, STORE_MAGIC, decode_session_file

    head = json.dumps({"sessions": []}).encode()
    data = _STORE_HEAD.pack(STORE_MAGIC, 1, len(head)) + head
    with pytest.raises(InvalidInput) as e:
        decode_session_file(KEY, data, tmp_path / "sessions.bin")
    assert str(e.value) == (
        f"state_dir: {tmp_path / 'sessions.bin'} is unsigned (format version 1, ssmstream "
        "0.1.0); this server needs 2; move it aside to start (its sessions cannot be restored)"
    )


def test_bytes_without_the_magic_are_neither_a_snapshot_nor_a_session_file(tmp_path):
    """The magic is checked before anything else the bytes say: a version or a signature
    check would otherwise answer for bytes that never were a snapshot or a session file."""
    snap = forge(np.ones(4, np.float32), 5, "m")
    for data in (b"SSMSNAPX" + snap[8:], b"\0" * len(snap)):
        with pytest.raises(InvalidInput) as e:
            decode_snapshot(KEY, data, "m", 4)
        assert str(e.value) == "snapshot: is not an ssmstream session snapshot"
    header = {"model_sha": "m", "state_size": 4, "sessions": []}
    path = tmp_path / STORE_FILE
    stored = encode_session_file(KEY, header, np.zeros((0, 4), np.float32))
    assert decode_session_file(KEY, stored, path)[0] == header
    for data in (b"SSMSTORX" + stored[8:], b"\0" * len(stored)):
        with pytest.raises(InvalidInput) as e:
            decode_session_file(KEY, data, path)
        assert str(e.value) == f"state_dir: {path} is not an ssmstream session store"


def test_a_snapshot_shorter_than_its_signature_is_truncated():
    good = forge(np.ones(4, np.float32), 5, "m")
    with pytest.raises(InvalidInput) as e:
        KEY.verify(good[:39], "snapshot", "")
    assert e.value.field == "snapshot" and str(e.value).endswith("is truncated")


def test_a_fork_never_evicts_its_parent_to_make_room_for_the_child():
    """The parent goes idle past its TTL between the fork's lookup and its room check (a
    fast clock: a fork that waited for the parent's row). The full store had evicted the
    parent to make room, given the child its slot, zeroed it and copied that row onto
    itself: a child at the parent's position with a zero state, the parent gone."""
    times = iter([0.0] * 4 + [100.0] * 100)  # create, commit, fork's two gets; then later
    store = SessionStore(4, capacity=1, ttl=10.0, clock=lambda: next(times))
    s = store.create()
    store.commit(s, np.full(4, 7.0, np.float32), 5)
    with pytest.raises(LimitExceeded):
        store.fork(s.id)
    assert s.live and not s.pinned and len(store) == 1 and store.stats()["forked"] == 0
    np.testing.assert_array_equal(store.read(s), np.full(4, 7.0, np.float32))


@pytest.mark.parametrize("removed", ["the directory", "the key"])
def test_a_save_writes_back_the_key_removed_from_its_directory(tmp_path, removed, caplog):
    # the key lived only in the server's memory: the save succeeded, the next start made a
    # new key and refused the file (every session lost, while the shutdown said "saved")
    import shutil

    d = tmp_path / "state"
    store = SessionStore(4, capacity=2, snapshot_key=SnapshotKey.in_dir(d))
    s = store.create("p", "a")
    store.commit(s, np.arange(4, dtype=np.float32), 5)
    if removed == "the directory":
        shutil.rmtree(d)
    else:
        (d / "snapshot.key").unlink()
    with caplog.at_level(logging.WARNING):
        store.save(d)
    assert any("was gone; written back" in r.getMessage() for r in caplog.records)
    assert stat.S_IMODE((d / "snapshot.key").stat().st_mode) == 0o600
    again = SessionStore(4, capacity=2, snapshot_key=SnapshotKey.in_dir(d))
    assert again.load(d) == 1 and again.get("a", "p").position == 5


def test_a_save_copies_a_part_of_the_rows_per_hold_of_the_lock(tmp_path, monkeypatch):
    # it had held the store's lock for the whole slab's copy: every step waited that long
    # (0.75 s at 1,024 sessions of 128 KiB); each part's rows are still copied with their
    # positions under one hold, so each saved session is consistent with its position
    import threading

    import ssmstream.runtime.sessions as sessions_mod

    monkeypatch.setattr(sessions_mod, "SAVE_PART_BYTES", 2 * 4 * 4)  # S = 4: two rows a part
    store = SessionStore(4, capacity=8, snapshot_key=KEY)
    ids = [f"s{i}" for i in range(5)]
    for i in ids:
        store.create("p", i)
    parts, real = [], store.slab.read_rows
    monkeypatch.setattr(
        store.slab, "read_rows", lambda slots: parts.append(len(slots)) or real(slots)
    )
    stepped, stop = store.get("s3", "p"), threading.Event()

    def steps():  # the state is its position, in every float
        while not stop.is_set():
            store.commit(stepped, np.full(4, stepped.position + 1, np.float32), 1)

    t = threading.Thread(target=steps)
    t.start()
    try:
        for _ in range(20):
            store.save(tmp_path)
            again = SessionStore(4, capacity=8, snapshot_key=KEY)
            assert again.load(tmp_path) == 5
            s = again.get("s3", "p")
            assert np.array_equal(again.read(s), np.full(4, s.position, np.float32))
    finally:
        stop.set()
        t.join()
    assert parts[:3] == [2, 2, 1] and stepped.position > 0


def test_an_operators_snapshot_key_file_is_never_written_back(tmp_path):
    # only the key a state dir keeps is: a --snapshot-key file removed was the operator's doing
    key_file = tmp_path / "secrets" / "key"
    key_file.parent.mkdir()
    key_file.write_bytes(SECRET)
    store = SessionStore(4, capacity=2, snapshot_key=SnapshotKey.from_file(key_file))
    store.create("p", "a")
    key_file.unlink()
    store.save(tmp_path / "state")
    assert not key_file.exists() and (tmp_path / "state" / STORE_FILE).exists()


def test_a_key_that_cannot_be_written_back_does_not_fail_the_save(tmp_path, monkeypatch, caplog):
    import ssmstream.runtime.snapshots as snapshots

    d = tmp_path / "state"
    store = SessionStore(4, capacity=2, snapshot_key=SnapshotKey.in_dir(d))
    store.create("p", "a")
    (d / "snapshot.key").unlink()

    def read_only(path, secret):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(snapshots, "_write_key", read_only)
    with caplog.at_level(logging.ERROR):
        store.save(d)
    assert (d / STORE_FILE).exists()
    assert any(
        "cannot be written back (Read-only file system)" in r.getMessage() for r in caplog.records
    )


def test_a_commit_waiting_for_its_lent_row_checks_the_largest_position_after(monkeypatch):
    import threading

    store = SessionStore(4, capacity=2)
    s = store.create("p", "a")
    store.commit(s, np.zeros(4, np.float32), MAX_POSITION - 1)
    (lent,) = store.lend([s])
    errors = []

    def commit():
        try:
            store.commit(s, np.ones(4, np.float32), 1)
        except OutOfRange as e:
            errors.append(e)

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.1)  # the commit waits for the row
    assert store.give_back([lent], 1) == [MAX_POSITION]
    t.join(10)
    assert len(errors) == 1 and s.position == MAX_POSITION


def test_a_session_file_written_part_by_part_is_the_one_encoded_whole():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((7, 4)).astype(np.float32)
    header = {"model_sha": "m", "state_size": 4, "sessions": [{"id": str(i)} for i in range(7)]}
    f = io.BytesIO()
    write_session_file(f, KEY, header, [states[:3], states[3:3], states[3:]])
    assert f.getvalue() == encode_session_file(KEY, header, states)
    head = json.dumps(header).encode()  # and that is the format: header, rows, key id, HMAC
    body = struct.pack("<8sII", STORE_MAGIC, VERSION, len(head)) + head + states.tobytes()
    body += KEY.id
    assert f.getvalue() == body + hmac.new(SECRET, body, hashlib.sha256).digest()
