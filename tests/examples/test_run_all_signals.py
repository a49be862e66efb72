"""benchmarks/run_all.py stopping a benchmark: Ctrl-C ends run_all with one line (no traceback)
and status 130; on --timeout (or Ctrl-C) the benchmark gets SIGTERM, which, with the
benchmarks' `exit_on_sigterm`, runs its `finally` blocks: its temporary directories go."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from scripts import ROOT, load_script

CHILD = textwrap.dedent("""
    import sys, tempfile, time
    sys.path.insert(0, sys.argv[1])
    from run_all import exit_on_sigterm

    exit_on_sigterm()
    with tempfile.TemporaryDirectory(dir=sys.argv[2]) as tmp:
        open(sys.argv[2] + "/ready", "w").write(tmp)
        time.sleep(60)
""")


def test_a_timed_out_benchmark_removes_its_temporary_directories(tmp_path):
    ra = load_script("benchmarks/run_all.py")
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), str(tmp_path)]
    t0 = time.monotonic()
    assert ra.run_one(cmd, timeout=5) == "timeout"
    assert time.monotonic() - t0 < 15  # stopped by SIGTERM, not the SIGKILL after the grace
    assert (tmp_path / "ready").is_file()  # the child had made its directory
    assert [p.name for p in tmp_path.iterdir()] == ["ready"]  # and removed it


def test_ctrl_c_ends_run_all_with_one_line_and_130(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/run_all.py"), "--only", "model", "--quick",
           "--results", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    while not any("== model:" in line for line in lines):  # the benchmark has started
        lines.append(proc.stderr.readline())
        assert lines[-1], "".join(lines)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130, err
    assert err.endswith("run_all.py: interrupted\n") and "Traceback" not in err
