"""A file-level split whose smaller side holds exactly `min_bytes` bytes is kept: only a side
below min_bytes makes load_text split the concatenated bytes instead. The val files are
found here from the documented rule, sha256(key) / 2^64 < val_fraction."""

from __future__ import annotations

import hashlib

from ssmstream.model.data import load_text


def _is_val(key: str, fraction: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) < fraction * 2**64


def test_a_val_split_of_exactly_min_bytes_stays_a_split_of_files(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(20):
        (root / f"f{i:02d}.txt").write_bytes(b"x" * (10 + i))
    val = [f"c/f{i:02d}.txt" for i in range(20) if _is_val(f"c/f{i:02d}.txt", 0.3)]
    n_val = sum(10 + int(key[-6:-4]) for key in val)
    assert 0 < len(val) < 10  # both sides hold files; train is the larger one
    d = load_text([root], val_fraction=0.3, min_bytes=n_val)
    assert d.val_files == val and d.val.numel() == n_val
