"""sessions.bin is judged by its first bytes before the rest is read: a file that is no
session store (say, a link to some large file) is refused after its 16-byte head, one whose
size is not what its header declares after the header. The messages are the ones a check of
the whole file gives; a file that matches its header loads as before."""

from __future__ import annotations

import tracemalloc

import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.sessions import STORE_FILE, SessionStore
from ssmstream.runtime.snapshots import SnapshotKey, decode_session_file

LARGE = 64 << 20  # bytes; sparse, so the disk holds none of them
KEY = SnapshotKey(b"s" * 32)


def load_refused(state) -> tuple[str, int]:
    """(the error of a load of `state`, the most bytes Python held meanwhile)."""
    store = SessionStore(4, capacity=2, snapshot_key=KEY)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as e:
            store.load(state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(e.value), peak


def whole_file_says(path) -> str:
    with pytest.raises(InvalidInput) as e:
        decode_session_file(KEY, path.read_bytes(), path)
    return str(e.value)


def test_a_link_to_a_large_file_is_refused_from_its_head(tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(LARGE)
    state = tmp_path / "state"
    state.mkdir()
    (state / STORE_FILE).symlink_to(big)
    said, peak = load_refused(state)
    assert said == f"state_dir: {state / STORE_FILE} is not an ssmstream session store"
    assert peak < LARGE // 16
    assert said == whole_file_says(state / STORE_FILE)


def saved(tmp_path):
    store = SessionStore(4, capacity=2, snapshot_key=KEY)
    store.create("p", "a")
    return store.save(tmp_path / "state")


def test_bytes_appended_past_the_declared_size_are_refused_before_they_are_read(tmp_path):
    path = saved(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + LARGE)
    said, peak = load_refused(path.parent)
    assert said == (
        f"state_dir: {path} is longer than its header says (bytes appended) or was tampered with"
    )
    assert peak < LARGE // 16
    assert said == whole_file_says(path)


@pytest.mark.parametrize("cut", [1, 4 * 4, 40, 60])
def test_a_file_shorter_than_its_header_says_is_refused_as_the_whole_file_check_says(tmp_path, cut):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    said, _ = load_refused(path.parent)
    assert said == whole_file_says(path)
    assert "is truncated" in said


def test_a_header_declaring_more_than_the_file_holds_is_refused_as_truncated(tmp_path):
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[12:16] = (len(data) * 2).to_bytes(4, "little")  # the header length
    path.write_bytes(bytes(data))
    said, _ = load_refused(path.parent)
    assert said == f"state_dir: {path} is truncated (shorter than its header says) or was " + (
        "tampered with"
    )
    assert said == whole_file_says(path)


def test_a_file_that_matches_its_header_loads(tmp_path):
    path = saved(tmp_path)
    again = SessionStore(4, capacity=2, snapshot_key=KEY)
    assert again.load(path.parent) == 1
    assert again.get("a", "p").id == "a"
