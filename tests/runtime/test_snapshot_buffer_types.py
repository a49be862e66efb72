"""A snapshot may come as any bytes-like object (bytes, bytearray, memoryview: what a
caller reading it from a buffer or a file has): each restores the same session, and a
corrupt one is refused the same way whatever its type. The state it decodes to is the
caller's own writeable array (Engine.generate updates a state in place)."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey, decode_snapshot

S = 8  # the token toy's state size (conftest.build_toy)
KEY = SnapshotKey(b"bytes-like-snapshot-key-0123456789")
AS = {"bytearray": bytearray, "memoryview": memoryview, "bytes": bytes}


def _snapshot() -> tuple[SessionStore, bytes, np.ndarray]:
    store = SessionStore(S, capacity=4, model_sha="m" * 64, snapshot_key=KEY)
    s = store.create("p", "a")
    state = np.linspace(-1.0, 1.0, S, dtype=np.float32)
    store.commit(s, state, 5)
    return store, store.snapshot("a", "p"), state


@pytest.mark.parametrize("kind", list(AS))
def test_every_bytes_like_snapshot_restores_the_same_session(kind):
    store, data, state = _snapshot()
    position, got = decode_snapshot(KEY, AS[kind](data), "m" * 64, S)
    assert position == 5
    np.testing.assert_array_equal(got, state)
    s = store.restore(AS[kind](data), "p", f"copy-{kind}")
    assert s.position == 5
    np.testing.assert_array_equal(store.read(s), state)


def test_a_decoded_state_continues_in_generate_like_the_session_it_came_from(toy_tok):
    """unpack's state is writeable: Engine.generate takes it and updates it in place to the
    same state the restored session reaches through the engine."""
    store = SessionStore(S, capacity=4, model_sha="m" * 64, snapshot_key=KEY)
    s = store.create("p", "a")
    _, x = toy_tok.prefill(np.array([[3, 1, 4, 1, 5]]), toy_tok.new_state())
    store.commit(s, x[0], 5)
    position, state = store.unpack(memoryview(store.snapshot("a", "p")))
    tokens = list(toy_tok.generate([2], state=state, max_new_tokens=3, temperature=0.0))
    _, want = toy_tok.prefill(np.array([[2, *tokens]]), x)
    assert position == 5
    np.testing.assert_allclose(state, want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(store.read(s), x[0])  # the session itself is untouched


@pytest.mark.parametrize("kind", list(AS))
def test_a_tampered_bytes_like_snapshot_is_refused_as_tampered(kind):
    store, data, _ = _snapshot()
    bad = bytearray(data)
    bad[-50] ^= 1  # a bit of the state
    with pytest.raises(InvalidInput, match="tampered"):
        store.restore(AS[kind](bytes(bad)), "p", "b")
    assert [s.id for s in store.sessions()] == ["a"]
