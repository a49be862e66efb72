"""examples/quickstart.py (`make demo`): a prompt starting with "-" reaches `ssmstream
generate` as the prompt (after `--`), and its own bad flags are usage errors before the
server starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from scripts import load_script  # noqa: E402

build_toy = load_script("tests/runtime/conftest.py").build_toy


@pytest.fixture
def qs(tmp_path, monkeypatch):
    mod = load_script("examples/quickstart.py")
    build_toy(tmp_path / "model", "tokens", V=256, d_out=256)  # a byte-level model
    monkeypatch.setattr(mod, "export", lambda *a, **k: False)  # use the toy as "the export"
    return mod


def test_prompt_starting_with_dash_is_streamed(qs, tmp_path):
    rc = qs.main(["--workdir", str(tmp_path), "--prompt=-v", "--max-new-tokens", "4"])
    assert rc == 0


@pytest.mark.parametrize("argv", [["--max-new-tokens", "-1"], ["--prompt="]])
def test_bad_flag_is_a_usage_error(qs, tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        qs.main(["--workdir", str(tmp_path), *argv])
    assert e.value.code == 2


def test_bad_flags_passed_on_are_usage_errors_not_tracebacks(qs, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv, says in [
        (["--verify-steps", "-1"], "--verify-steps: must be at least 1"),
        (["--workdir", str(a_file)], "--workdir: cannot make"),
    ]:
        with pytest.raises(SystemExit) as e:
            qs.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_command_that_fails_ends_the_demo_with_its_status(qs, tmp_path, monkeypatch):
    """The command printed why (its one line): no CalledProcessError traceback after it."""
    import subprocess

    def failing(*a, **k):
        raise subprocess.CalledProcessError(2, ["ssmstream", "generate"])

    monkeypatch.setattr(qs, "demo", lambda p, a: failing())
    assert qs.main(["--workdir", str(tmp_path)]) == 2


def test_sigterm_ends_the_demo_through_its_cleanup(qs, tmp_path, monkeypatch):
    """`timeout`, a cancelled CI job or `kill` send SIGTERM: the demo's `finally` (which
    stops its server) runs, and the status is 128 + 15."""
    import os
    import signal
    import time

    cleaned = []

    def demo(p, a):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)

    monkeypatch.setattr(qs, "demo", demo)
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            qs.main(["--workdir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 143 and cleaned == [True]


def test_a_sigterm_while_the_server_starts_stops_the_server(qs, tmp_path, monkeypatch):
    # quickstart's SIGTERM handler raises SystemExit; it had landed in the wait for the port
    # file, outside the try that stops the server: the server kept running, orphaned
    started, real_popen, real_sleep = [], qs.subprocess.Popen, qs.time.sleep

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    def sleep(seconds):  # the first wait is where SIGTERM lands; later ones are stop's
        if len(started) == 1 and not hasattr(sleep, "done"):
            sleep.done = True
            raise SystemExit(128 + 15)
        real_sleep(seconds)

    monkeypatch.setattr(qs.subprocess, "Popen", popen)
    monkeypatch.setattr(qs.time, "sleep", sleep)
    try:
        with pytest.raises(SystemExit) as e:
            qs.start_server(tmp_path / "model", tmp_path, "cpu")
        assert e.value.code == 143 and len(started) == 1
        assert started[0].poll() is not None  # stopped and reaped, not left running
    finally:
        for proc in started:  # a failing run leaves no server behind either
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_sigterm_during_a_command_lets_the_command_clean_up(qs, tmp_path):
    # subprocess.run SIGKILLed the command when quickstart's SIGTERM handler raised
    # SystemExit: a `make demo` stopped during the export left the export's temporary dir
    import signal
    import subprocess
    import threading
    import time

    child = (
        "import pathlib, signal, sys, time\n"
        f"done = pathlib.Path({str(tmp_path / 'cleaned')!r})\n"
        "signal.signal(signal.SIGTERM, lambda *_: (done.write_text('yes'), sys.exit(143)))\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def terminate_quickstart():
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGTERM)  # where `kill` lands in quickstart

    main = threading.main_thread().ident
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as quickstart's main
    try:
        threading.Thread(target=terminate_quickstart, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as e:
            qs.run([sys.executable, "-c", child])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 143 and time.monotonic() - t0 < 30
    assert (tmp_path / "cleaned").read_text() == "yes"
    with pytest.raises(subprocess.CalledProcessError) as failed:
        qs.run([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.value.returncode == 3


def test_a_relative_workdir_starting_with_a_dash_is_not_read_as_a_flag(qs, tmp_path, monkeypatch):
    # "-m/model" went to `ssmstream serve` as an argument: "expected one argument"
    monkeypatch.chdir(tmp_path)
    build_toy(tmp_path / "-m" / "model", "tokens", V=256, d_out=256)
    assert qs.main(["--workdir=-m", "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "-m" / "server.log").is_file()
