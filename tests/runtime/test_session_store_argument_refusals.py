"""SessionStore refuses, when it is made, a snapshot key or a slab of the wrong type, naming the
argument: raw key bytes were taken and failed at the first snapshot ("'bytes' object has no
attribute 'sign'"), a numpy array as the slab with "has no attribute 'capacity'"."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime import SessionStore, StateSlab
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.snapshots import SnapshotKey

S = 4
SECRET = b"a-secret-of-thirty-two-bytes-0123"


@pytest.mark.parametrize("key", [SECRET, SECRET.decode(), bytearray(SECRET)])
def test_a_snapshot_key_that_is_no_snapshotkey_is_refused_naming_it(key):
    with pytest.raises(InvalidInput) as e:
        SessionStore(S, snapshot_key=key)
    assert e.value.field == "snapshot_key" and "SnapshotKey(secret)" in str(e.value)


def test_a_slab_that_is_no_stateslab_is_refused_naming_it():
    with pytest.raises(InvalidInput) as e:
        SessionStore(S, capacity=2, slab=np.zeros((2, S), np.float32))
    assert e.value.field == "slab"


def test_stores_keyed_with_one_secret_take_each_others_snapshots():
    a = SessionStore(S, capacity=2, snapshot_key=SnapshotKey(SECRET), slab=StateSlab(2, S))
    b = SessionStore(S, capacity=2, snapshot_key=SnapshotKey(SECRET))
    s = a.create("me")
    a.commit(s, np.arange(S, dtype=np.float32), 3)
    moved = b.restore(a.snapshot(s.id, "me"), "me")
    assert moved.position == 3 and b.read(moved).tolist() == [0.0, 1.0, 2.0, 3.0]
