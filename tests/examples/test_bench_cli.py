"""The benchmarks' command lines (run_all's helpers out_dir, out_file, signals_held and
run_script): an --out they could not write is a usage error before any work starts, not a
traceback after it; a SIGTERM or Ctrl-C during a torch export waits for the export to return
(raised inside it, torch turns it into a long traceback of its own) and then stops the
benchmark with one line, 143 or 130, its temporary directories removed."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import pytest
from scripts import load_script

WITH_OUT_DIR = [
    "bench_export",
    "bench_model",
    "bench_runtime",
    "bench_scaleout",
    "bench_server",
    "bench_sessions",
    "profile_server",
    "soak",
]


# --- an --out that cannot be written ------------------------------------------------------


@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("")
    return path


@pytest.mark.parametrize("below", [False, True], ids=["a file", "below a file"])
@pytest.mark.parametrize("script", WITH_OUT_DIR)
def test_an_out_that_is_no_directory_is_a_usage_error(script, below, afile, capsys):
    bench = load_script(f"benchmarks/{script}.py")
    out = afile / "results" if below else afile
    with pytest.raises(SystemExit) as e:
        bench.main(["--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"argument --out: cannot write results into {str(out)!r}: {afile} is not a directory" in err
    )
    assert "Traceback" not in err


def test_bench_gpu_refuses_an_out_below_a_file(afile, capsys):
    bg = load_script("benchmarks/bench_gpu.py")
    with pytest.raises(SystemExit) as e:
        bg.main(["--device", "cpu", "--out", str(afile / "bench_gpu")])
    assert e.value.code == 2
    assert f"argument --out: cannot write {str(afile / 'bench_gpu')!r}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--only", "model", "--results", "{afile}"], "--results"),
        (["--report-only", "--results", "{dir}", "--report", "{dir}"], "--report"),
    ],
)
def test_run_all_refuses_results_or_a_report_it_cannot_write(flags, flag, afile, capsys):
    ra = load_script("benchmarks/run_all.py")
    argv = [f.format(afile=afile, dir=afile.parent) for f in flags]
    with pytest.raises(SystemExit) as e:
        ra.main(argv)
    assert e.value.code == 2
    assert f"argument {flag}: cannot write " in capsys.readouterr().err


def test_out_dir_accepts_a_directory_it_can_make_and_makes_none(tmp_path):
    ra = load_script("benchmarks/run_all.py")
    assert ra.out_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert ra.out_dir(str(tmp_path)) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_out_dir_refuses_a_directory_it_cannot_write(tmp_path):
    ra = load_script("benchmarks/run_all.py")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
            ra.out_dir(str(tmp_path / "results"))
    finally:
        tmp_path.chmod(0o700)


def test_out_dir_below_a_directory_it_cannot_search_is_refused_not_a_traceback(
    tmp_path, monkeypatch
):
    # Path.exists() raises PermissionError there (Python 3.11): it escaped argparse
    ra = load_script("benchmarks/run_all.py")
    real, real_is_dir = Path.exists, Path.is_dir

    def exists(self, **kw):
        if tmp_path / "locked" in (self, *self.parents):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, **kw)

    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(Path, "is_dir", lambda self: exists(self) and real_is_dir(self))
    for check, name in ((ra.out_dir, "results"), (ra.out_file, "sub/report.md")):
        with pytest.raises(argparse.ArgumentTypeError, match="Permission denied"):
            check(str(tmp_path / "locked" / name))


# --- a signal during a benchmark's export ------------------------------------------------


@pytest.fixture
def torch_like_export(monkeypatch):
    """ssmstream.export.export_model replaced by one that receives SIGTERM or SIGINT while it
    runs and, as torch.onnx.export does, turns any exception raised inside it into its own;
    returns the signal it sends (set `.sig`) and the exports that returned."""
    import ssmstream.export

    ra = load_script("benchmarks/run_all.py")
    fake = argparse.Namespace(sig=signal.SIGTERM, returned=[])

    def export_model(ckpt, out, **kwargs):
        try:
            os.kill(os.getpid(), fake.sig)
            time.sleep(0.5)  # the handler runs here, between two bytecodes
        except BaseException as e:
            raise RuntimeError("the export failed") from e  # as TorchExportError
        fake.returned.append(out)
        return Path(out)

    monkeypatch.setattr(ssmstream.export, "export_model", export_model)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ra.exit_on_sigterm()  # as the benchmarks' __main__ does (run_script)
    yield fake
    for s, handler in handlers.items():
        signal.signal(s, handler)


def _exports(tmp_path: Path) -> dict:
    """Each benchmark's way into an export, with a tiny model."""
    sizes = dict(d_model=8, n_layers=1, d_state=4)
    bs, be, br, bg = (load_script(f"benchmarks/{n}.py") for n in
                      ("bench_server", "bench_export", "bench_runtime", "bench_gpu"))  # fmt: skip
    out = ["--out", str(tmp_path / "out")]
    return {
        "bench_server": lambda: bs.build_model(bs.BenchConfig(vocab_size=16, **sizes), tmp_path),
        "bench_export": lambda: be.build_model(
            argparse.Namespace(vocab=16, chunk=4, **sizes), tmp_path
        ),
        "bench_export shipped": lambda: be.shipped_model(tmp_path / "ckpt", tmp_path, 1, 1),
        "bench_runtime": lambda: br.prepare_model(
            br.BenchConfig(work_dir=str(tmp_path), vocab_size=16, **sizes)
        ),
        "bench_gpu": lambda: bg.prepare_models(
            bg.BenchConfig(device="cpu", work=str(tmp_path), vocab=16, **sizes)
        ),
        "bench_sessions": lambda: load_script("benchmarks/bench_sessions.py").main(out),
        "profile_server": lambda: load_script("benchmarks/profile_server.py").main(out),
        "soak": lambda: load_script("benchmarks/soak.py").main(out),
        "bench_scaleout": lambda: load_script("benchmarks/bench_scaleout.py").shipped_model(
            tmp_path / "scaleout"
        ),  # it had run `ssmstream export` in a subprocess, SIGKILLed at a SIGTERM
    }


EXPORTS = ["bench_server", "bench_export", "bench_export shipped", "bench_runtime", "bench_gpu",
           "bench_sessions", "profile_server", "soak", "bench_scaleout"]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("bench", EXPORTS)
def test_a_signal_during_an_export_stops_the_benchmark_after_it(bench, sig, torch_like_export,
                                                                tmp_path):  # fmt: skip
    torch_like_export.sig = sig
    expected = SystemExit if sig == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(expected) as e:
        _exports(tmp_path)[bench]()
    if sig == signal.SIGTERM:
        assert e.value.code == 128 + signal.SIGTERM
    assert len(torch_like_export.returned) == 1  # it went on to the end, then the stop
