"""The leftovers warning names only temporary siblings no export of this process is writing:
another thread's export into the same --out, under way now, is not a killed export's."""

from __future__ import annotations

import logging

from ssmstream.export import exporter


def test_a_temporary_directory_this_process_is_writing_is_not_named(tmp_path, monkeypatch, caplog):
    ours, stale = tmp_path / ".m.0123abcd.tmp", tmp_path / ".m.deadbeef.tmp"
    ours.mkdir()
    stale.mkdir()
    monkeypatch.setitem(exporter._underway.dirs, ours, [])  # another thread's export, under way
    with caplog.at_level(logging.WARNING, logger="ssmstream"):
        exporter._warn_leftovers(tmp_path / "m")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(".m.deadbeef.tmp beside m: left by an export")
    assert ".m.0123abcd.tmp" not in warning
