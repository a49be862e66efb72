"""Edges of the export package's command lines: `ssmstream verify --steps` and
ExportConfig(verify_steps) accept their largest value, and the export's signal handler says
"nothing written" only when it removed an export under way, and sets handlers only from the
main thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from ssmstream.export import cli, exporter, verify_cli
from ssmstream.export import verify as verify_mod
from ssmstream.export.exporter import MAX_VERIFY_STEPS, ExportConfig, ExportError


def test_verify_cli_takes_the_largest_steps_and_refuses_one_more(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(model_dir, ckpt=None, steps=4096):
        seen.append(steps)
        return {"passed": True}

    monkeypatch.setattr(verify_mod, "verify_model", fake)
    assert verify_cli.main([str(tmp_path), "--steps", str(MAX_VERIFY_STEPS), "--json"]) == 0
    assert seen == [MAX_VERIFY_STEPS]
    capsys.readouterr()
    assert verify_cli.main([str(tmp_path), "--steps", str(MAX_VERIFY_STEPS + 1)]) == 2
    assert seen == [MAX_VERIFY_STEPS]
    assert capsys.readouterr().err == (
        f"ssmstream verify: error: --steps must be at most {MAX_VERIFY_STEPS}, "
        f"got {MAX_VERIFY_STEPS + 1}\n"
    )


def test_export_config_takes_the_largest_verify_steps_and_refuses_one_more():
    assert ExportConfig(verify_steps=MAX_VERIFY_STEPS).verify_steps == MAX_VERIFY_STEPS
    one_more = MAX_VERIFY_STEPS + 1
    with pytest.raises(ExportError, match=f"at most {MAX_VERIFY_STEPS}, got {one_more}"):
        ExportConfig(verify_steps=one_more)


@pytest.mark.parametrize("under_way, said", [(False, ""), (True, "; nothing written")])
def test_the_stop_message_claims_nothing_written_only_for_an_export_under_way(
    tmp_path, monkeypatch, capfd, under_way, said
):
    """SIGTERM with no export under way (before it began, or after it finished) ends the
    process with 128 + 15 saying only "stopped by SIGTERM"; with one under way its temporary
    directory is removed and the message says so."""
    tmp = tmp_path / ".m.0123abcd.tmp"
    if under_way:
        tmp.mkdir()
        monkeypatch.setitem(exporter._underway.dirs, tmp, [])
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)  # the handler's exit, recorded
    with cli._signals_end_the_export():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, in the main thread
    assert exits == [128 + signal.SIGTERM]
    assert capfd.readouterr().err == f"ssmstream export: stopped by SIGTERM{said}\n"
    assert not tmp.exists()


def test_an_export_run_from_another_thread_leaves_the_signal_handlers_alone():
    """Only the main thread may set signal handlers: export_model called from a worker
    thread (a server, a notebook's executor) runs without them instead of failing."""
    before, seen, errors = signal.getsignal(signal.SIGTERM), [], []

    def export():
        try:
            with cli._signals_end_the_export():
                seen.append(signal.getsignal(signal.SIGTERM))
        except Exception as e:  # ValueError: signal only works in main thread
            errors.append(e)

    worker = threading.Thread(target=export)
    worker.start()
    worker.join()
    assert errors == [] and seen == [before]
    assert signal.getsignal(signal.SIGTERM) is before
