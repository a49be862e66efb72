"""Signed snapshot bytes at their edges: every byte of the HMAC is checked (not a prefix of
it), and the HMAC covers everything before it: one computed with the right key over only
part of the bytes is refused as tampered. A session file whose header declares far more bytes
than the file has is refused without reading (or allocating) what it declares, and a signed
one whose header lacks a field is refused as a bad header."""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import tracemalloc

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.snapshots import (
    SnapshotKey,
    decode_session_file,
    decode_snapshot,
    encode_snapshot,
    read_session_file,
    write_session_file,
)

S, SHA = 6, "c" * 64
SECRET = b"snapshot-edges-key-0123456789abcdef"
KEY = SnapshotKey(SECRET)


def _snapshot() -> bytes:
    return encode_snapshot(KEY, SHA, np.arange(S, dtype=np.float32) - 2.5, 41)


def test_a_snapshot_is_its_body_key_id_and_the_hmac_of_both():
    """The trailer, computed here from the documented format, is what the server writes."""
    data = _snapshot()
    key_id = hmac.new(SECRET, b"ssmstream snapshot key id", hashlib.sha256).digest()[:8]
    assert data[-40:-32] == key_id
    assert data[-32:] == hmac.new(SECRET, data[:-32], hashlib.sha256).digest()
    position, state = decode_snapshot(KEY, data, SHA, S)
    assert position == 41
    np.testing.assert_array_equal(state, np.arange(S, dtype=np.float32) - 2.5)


@pytest.mark.parametrize("byte", range(-32, 0))
def test_a_flipped_bit_anywhere_in_the_hmac_is_refused_as_tampered(byte):
    bad = bytearray(_snapshot())
    bad[byte] ^= 0x80
    with pytest.raises(InvalidInput, match="tampered"):
        decode_snapshot(KEY, bytes(bad), SHA, S)


@pytest.mark.parametrize("start, stop", [(1, -32), (8, -32), (0, -40), (0, -33)])
def test_an_hmac_with_the_right_key_over_part_of_the_bytes_is_refused(start, stop):
    data = _snapshot()
    partial = hmac.new(SECRET, data[start:stop], hashlib.sha256).digest()
    with pytest.raises(InvalidInput, match="tampered"):
        decode_snapshot(KEY, data[:-32] + partial, SHA, S)


def test_a_session_file_declaring_a_huge_header_is_refused_without_reading_it(tmp_path):
    """A 4 GiB - 1 header length in a 40-byte file: Python holds well under a MiB meanwhile."""
    path = tmp_path / "sessions.bin"
    path.write_bytes(struct.pack("<8sII", b"SSMSTOR\0", 2, 2**32 - 1) + b"{}" + b"\0" * 22)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="truncated"):
            read_session_file(KEY, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("drop", ["state_size", "sessions"])
def test_a_signed_session_file_whose_header_lacks_a_field_is_a_bad_header(tmp_path, drop):
    header = {"model_sha": SHA, "state_size": S, "sessions": []}
    del header[drop]
    f = io.BytesIO()
    write_session_file(f, KEY, header, [])
    path = tmp_path / "sessions.bin"
    path.write_bytes(f.getvalue())
    for load in (lambda: decode_session_file(KEY, f.getvalue(), path),
                 lambda: read_session_file(KEY, path)):  # fmt: skip
        with pytest.raises(InvalidInput, match=f"bad header: '{drop}'"):
            load()
