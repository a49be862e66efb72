"""The benchmarks refuse bad counts and missing models at the command line: a usage error
(status 2) that names the flag, before any export or server starts; bench_gpu refuses a
device it cannot use, and writes its results under the repository wherever it runs."""

from __future__ import annotations

import pytest
from scripts import ROOT, load_script

BAD = [
    ("benchmarks/bench_sessions.py", ["--rounds", "0"], "--rounds"),
    ("benchmarks/bench_sessions.py", ["--prompt-len", "-1"], "--prompt-len"),
    ("benchmarks/bench_sessions.py", ["--model", "{missing}"], "--model"),
    ("benchmarks/bench_server.py", ["--repeats", "0"], "--repeats"),
    ("benchmarks/bench_server.py", ["--clients", "0"], "--clients"),
    ("benchmarks/bench_server.py", ["--clients", "1,-4"], "--clients"),
    ("benchmarks/bench_server.py", ["--tokens-per-client", "-5"], "--tokens-per-client"),
    ("benchmarks/bench_server.py", ["--budget", "0"], "--budget"),
    ("benchmarks/bench_server.py", ["--client-procs", "-1"], "--client-procs"),
    ("benchmarks/bench_server.py", ["--model", "{missing}"], "--model"),
    ("benchmarks/profile_server.py", ["--clients", "0"], "--clients"),
    ("benchmarks/bench_scaleout.py", ["--clients", "0"], "--clients"),
    ("benchmarks/bench_scaleout.py", ["--replicas", "2", "0"], "--replicas"),
    ("benchmarks/soak.py", ["--model", "{missing}"], "--model"),
    ("benchmarks/bench_runtime.py", ["--model", "{missing}"], "--model"),
    ("benchmarks/bench_runtime.py", ["--ckpt", "{missing}"], "--ckpt"),
    ("benchmarks/bench_gpu.py", ["--model-dir", "{missing}"], "--model-dir"),
    ("benchmarks/bench_gpu.py", ["--ckpt", "{missing}"], "--ckpt"),
]


@pytest.mark.parametrize(("script", "argv", "flag"), BAD)
def test_a_bad_count_or_missing_model_is_a_usage_error(script, argv, flag, tmp_path, capsys):
    bench = load_script(script)
    argv = [x.format(missing=tmp_path / "missing") for x in argv]
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


def test_bench_gpu_stops_at_once_where_cuda_is_not_usable(tmp_path, monkeypatch, capsys):
    import ssmstream.runtime.providers as providers

    bg = load_script("benchmarks/bench_gpu.py")
    monkeypatch.setattr(providers, "cuda_usable", lambda: (False, "no GPU here"))
    argv = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out" / "bench_gpu")]
    assert bg.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "bench_gpu: CUDA is not usable: no GPU here (--device cpu: a smoke run)\n"
    assert list(tmp_path.iterdir()) == []  # nothing exported, nothing written


def test_bench_gpu_paths_are_under_the_repository_wherever_it_runs(tmp_path, monkeypatch):
    bg = load_script("benchmarks/bench_gpu.py")
    monkeypatch.chdir(tmp_path)
    cfg = bg.parse_args([])
    assert cfg.out == str(ROOT / "benchmarks" / "results" / "bench_gpu")
    assert cfg.work == str(ROOT / ".gpu_bench")
