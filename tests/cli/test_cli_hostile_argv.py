"""Every `ssmstream` command refuses a hostile flag value the same way: status 2 (a usage
error) or 1 (a runtime error), one line on stderr (after argparse's usage) naming the flag
or the value, no traceback, and nothing written: no output file or directory left behind.

The commands run in-process (`ssmstream.runtime.cli.main`), in an empty working directory,
with every other argument valid: a tiny checkpoint and a toy exported model. Each case fails
before any real work (a training step, a graph conversion, a bound port): `serve` fails the
test if it gets as far as creating its gRPC server. Values a flag accepts (a `--name` of
"nan", a `--dt-scale` of 2**70) are out of scope here: they start the command's real work.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HUGE = str(2**70)


def _toy_builder():
    """build_toy of tests/runtime/conftest.py (not a package: imported by its path)."""
    name = "script_tests_runtime_conftest"  # as tests/examples/scripts.py names it
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests/runtime/conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].build_toy


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with `model` (a toy exported model), `ckpt` (a tiny checkpoint), `afile`
    (a file where a directory is expected) and `adir` (a directory where a file is)."""
    import torch
    from ssmstream.model import SSMConfig, SSMNetwork, save_checkpoint

    w = tmp_path_factory.mktemp("hostile")
    _toy_builder()(w / "model", "tokens")
    torch.manual_seed(0)
    save_checkpoint(
        SSMNetwork(SSMConfig(vocab_size=11, d_model=8, n_layers=1, d_state=8)), w / "ckpt"
    )
    (w / "afile").write_text("not a directory\n")
    (w / "adir").mkdir()
    return w


def _tree(path: Path) -> dict[str, tuple]:
    """Every file and directory under `path`, with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def run(work, tmp_path, monkeypatch, capsys, caplog):
    """run(argv) -> (status, the error's line): `ssmstream argv...` in-process, in an empty
    working directory; fails the test on a traceback (an exception out of main), on a
    status other than 1 or 2, on more than one line of error, or on anything written."""
    from ssmstream.runtime import cli

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def no_grpc_server(*args, **kwargs):
        raise AssertionError("serve got as far as creating its gRPC server")

    import grpc.aio

    monkeypatch.setattr(grpc.aio, "server", no_grpc_server)

    def run_(argv: list[str]) -> tuple[int, str]:
        before = _tree(work)
        capsys.readouterr()
        sys.stderr.reconfigure(errors="backslashreplace")  # as Python's own stderr is
        caplog.clear()
        try:
            status = cli.main([str(a).replace("{work}", str(work)) for a in argv])
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert status in (1, 2), (status, out, err, logged)
        assert "Traceback" not in err, err
        assert not any(r.exc_info for r in caplog.records), "an exception logged with its trace"
        # argparse's usage lines, then one line of error; or one error logged
        said = [ln for ln in err.splitlines() if ln.strip()]
        if said and said[0].startswith("usage:"):  # from the line "ssmstream CMD: error: …" on
            said = said[next(i for i, ln in enumerate(said) if ln.startswith("ssmstream")) :]
        lines = said + [ln for m in logged for ln in m.splitlines()]
        assert len(lines) == 1, (err, logged)
        assert not os.listdir(cwd), os.listdir(cwd)
        assert _tree(work) == before
        return status, lines[0]

    return run_


# --- every flag, each value it refuses ------------------------------------------------------

EMPTY, NEG, ZERO, WORD = "", "-1", "0", "abc"
NAN, INF, NINF, PAST_FLOAT = "nan", "inf", "-inf", "1e309"  # 1e309: inf as a float
MISSING, ADIR, AFILE = "{work}/missing/x", "{work}/adir", "{work}/afile"
SURROGATE = "\udcff"  # a byte of a non-UTF-8 argv, as Python decodes it
EVERY = [EMPTY, NEG, ZERO, NAN, INF, NINF, PAST_FLOAT, HUGE, WORD, MISSING, ADIR, AFILE, SURROGATE]
NON_NUMBERS = [EMPTY, NINF, WORD, MISSING, ADIR, AFILE, SURROGATE]  # "-inf": a flag, no value
NON_INTEGERS = [*NON_NUMBERS, NAN, INF, PAST_FLOAT]

# the arguments around the flag under test: valid, small (nothing here trains, exports or
# serves for long once a flag passes, but every case below is refused before that)
BASE = {
    "train": ["--task", "signal", "--out", "{work}/run", "--steps", "1", "--warmup-steps", "0",
              "--d-model", "8", "--n-layers", "1", "--d-state", "8", "--batch-size", "2",
              "--eval-batches", "1", "--no-progress"],
    "export": ["{work}/ckpt", "--out", "{work}/out"],
    "verify": ["{work}/model"],
    "info": ["{work}/model"],
    "serve": ["{work}/model", "--port", "0"],
    "generate": ["hello", "--server", "127.0.0.1:1", "--timeout", "0.5"],
    "bench": ["{work}/model", "--steps", "1", "--prefill", "0"],
    "plot": ["{work}/ckpt", "--out", "{work}/basis.png"],
}  # fmt: skip

# flag -> the values it refuses (before any real work), per command
REFUSED = {
    "train": {
        "--alpha": NON_INTEGERS + [NEG, HUGE],
        "--batch-size": NON_INTEGERS + [NEG, ZERO, HUGE],
        "--d-model": EVERY,
        "--d-state": EVERY,
        "--data": [EMPTY, NINF],
        "--device": EVERY,
        "--discretization": EVERY,
        "--dropout": NON_INTEGERS + [NEG, HUGE],
        "--dt-max": NON_INTEGERS + [NEG, ZERO],
        "--dt-min": EVERY,
        "--duration": EVERY,
        "--eval-batches": NON_INTEGERS + [NEG, ZERO],
        "--eval-every": NON_INTEGERS + [NEG, ZERO],
        "--freq-max": EVERY,
        "--freq-min": EVERY,
        "--glob": [NINF],
        "--grad-clip": NON_INTEGERS + [NEG],
        "--heads": EVERY,
        "--horizon": NON_INTEGERS + [NEG, ZERO],
        "--init": EVERY,
        "--log-every": NON_INTEGERS + [NEG, ZERO],
        "--lr": NON_INTEGERS + [NEG, ZERO],
        "--min-lr-ratio": NON_INTEGERS + [NEG, HUGE],
        "--n-components": EVERY,
        "--n-layers": NON_INTEGERS + [NEG, ZERO, HUGE],
        "--out": [EMPTY, NINF, AFILE],
        "--rate": EVERY,
        "--save-every": NON_INTEGERS + [NEG, ZERO],
        "--seed": NON_INTEGERS + [HUGE],
        "--seq-len": NON_INTEGERS + [NEG, ZERO],
        "--ssm-lr": NON_INTEGERS + [NEG, ZERO],
        "--steps": NON_INTEGERS + [NEG, ZERO],
        "--stop-after": NON_INTEGERS + [NEG, ZERO],
        "--target": EVERY,
        "--task": EVERY,
        "--tau": NON_INTEGERS + [NEG, ZERO],
        "--threads": EVERY,
        "--val-fraction": NON_NUMBERS,
        "--warmup-steps": NON_INTEGERS + [NEG, HUGE],
        "--weight-decay": NON_INTEGERS + [NEG],
    },
    "bench": {
        "--batch": EVERY,
        "--device": EVERY,
        "--prefill": NON_INTEGERS + [NEG, HUGE],
        "--step-threads": EVERY,
        "--steps": EVERY,
        "--threads": EVERY,
    },
    "verify": {
        "--ckpt": EVERY,
        "--steps": EVERY,
    },
    "plot": {
        "--head": NON_INTEGERS + [NEG, HUGE],
        "--layer": NON_INTEGERS + [NEG, HUGE],
        "--length": EVERY,
        "--n-kernels": NON_INTEGERS + [NEG, ZERO],
        "--n-modes": NON_INTEGERS + [NEG, ZERO],
        "--out": [EMPTY, NINF, ADIR],
    },
    "generate": {
        "--max-new-tokens": NON_INTEGERS + [NEG, HUGE],
        "--rewind-to": EVERY,
        "--seed": NON_INTEGERS + [NEG, HUGE],
        "--server": [EMPTY, NINF, SURROGATE],
        "--session": [NINF],
        "--stop": [NAN, INF, NINF, PAST_FLOAT, HUGE, WORD, MISSING, ADIR, AFILE, SURROGATE],
        "--temperature": NON_NUMBERS,
        "--timeout": NON_NUMBERS + [NEG, ZERO, NAN],
        "--tls-ca": EVERY,
        "--tls-cert": EVERY,
        "--tls-key": EVERY,
        "--token-env": [NINF],
        "--top-k": NON_INTEGERS + [NEG, HUGE],
        "--top-p": NON_NUMBERS,
    },
    "export": {
        "--chunk": EVERY,
        "--dt-scale": NON_INTEGERS + [NEG, ZERO],
        "--dtype": EVERY,
        "--max-chunks": EVERY,
        "--name": [EMPTY, NINF, SURROGATE],
        "--out": [EMPTY, NINF, ADIR, AFILE, SURROGATE],
        "--verify-steps": EVERY,
    },
    "serve": {
        "--auth-tokens": EVERY,
        "--device": EVERY,
        "--grace": NON_INTEGERS + [NEG, HUGE],
        "--host": [EMPTY, NINF, SURROGATE, ZERO],  # a word may resolve where DNS answers
        "--lease-ttl": EVERY,
        "--log-level": EVERY,
        "--max-batch": EVERY,
        "--max-batch-delay": NON_INTEGERS + [NEG, HUGE],
        "--max-concurrent-rpcs": NON_INTEGERS + [NEG, HUGE],
        "--max-message-bytes": EVERY,
        "--max-new-tokens": EVERY,
        "--max-sessions": EVERY,
        "--max-sessions-per-principal": NON_INTEGERS + [NEG, HUGE],
        "--max-tokens-per-request": EVERY,
        "--metrics-port": NON_INTEGERS + [NEG, HUGE],
        "--persist-every": NON_INTEGERS + [NEG, ZERO],
        "--port": NON_INTEGERS + [NEG, HUGE],
        "--port-file": [EMPTY, NINF, MISSING, ADIR],
        "--prefix-cache-mb": NON_INTEGERS + [NEG, HUGE],
        "--prefix-cache-scope": EVERY,
        "--replica-id": [EMPTY, NINF],
        "--rewind-memory-mb": NON_INTEGERS + [NEG, HUGE],
        "--rewind-window": NON_INTEGERS + [NEG, HUGE],
        "--save-interval": NON_INTEGERS + [NEG, HUGE],
        "--session-ttl": EVERY,
        "--snapshot-key": [
            EMPTY,
            NEG,
            ZERO,
            NAN,
            INF,
            NINF,
            PAST_FLOAT,
            HUGE,
            WORD,
            MISSING,
            ADIR,
            SURROGATE,
        ],
        "--state-dir": [EMPTY, NINF, AFILE],
        "--state-store": EVERY,
        "--step-threads": EVERY,
        "--threads": EVERY,
        "--tls-cert": EVERY,
        "--tls-client-ca": EVERY,
        "--tls-key": EVERY,
    },
}


def _argv(command: str, flag: str, value: str) -> list[str]:
    """BASE with `flag value` (replacing the flag where BASE gives it)."""
    argv = list(BASE[command])
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return [command, *argv]


def _shows(line: str, value: str) -> bool:
    """Whether `line` shows `value`: as it is, quoted, or escaped as stderr escapes it."""
    escaped = value.encode("utf-8", "backslashreplace").decode()
    return any(v in line for v in (value, repr(value), escaped))


def _names(line: str, flag: str, value: str) -> bool:
    """Whether an error line names the flag (as --flag or as its field, flag_name) or, for a
    path or word, the value it refuses."""
    field = flag[2:].replace("-", "_")
    return flag in line or field in line or (len(value) > 2 and _shows(line, value))


@pytest.mark.parametrize(
    "command, flag",
    [(c, f) for c, flags in REFUSED.items() for f in flags],
    ids=[f"{c}{f}" for c, flags in REFUSED.items() for f in flags],
)
def test_each_refused_value_is_one_line_naming_the_flag(run, work, command, flag):
    for value in REFUSED[command][flag]:
        status, said = run(_argv(command, flag, value))
        shown = value.replace("{work}", str(work))
        assert _names(said, flag, shown), (flag, value, said)


# --- values found to end in a traceback or an unnamed error --------------------------------


def test_bench_steps_too_many_for_memory_is_refused_naming_it(run):
    status, said = run(["bench", "{work}/model", "--steps", HUGE, "--prefill", "0"])
    assert status == 2
    assert said.startswith(f"ssmstream bench: not enough memory: --steps {HUGE} needs about ")


def test_export_chunk_past_float32_positions_is_refused_naming_it(run):
    status, said = run(["export", "{work}/ckpt", "--out", "{work}/out", "--chunk", HUGE])
    assert status == 2
    assert (
        said
        == f"ssmstream export: error: argument --chunk: chunk must be at most {2**24}, got {HUGE}"
    )


def test_export_chunk_bound_is_the_largest_exact_float32_position():
    from ssmstream.export import ExportConfig, ExportError

    assert ExportConfig(chunk=2**24).chunk == 2**24
    with pytest.raises(ExportError, match=r"^chunk must be at most 16777216, got 33554432$"):
        ExportConfig(chunk=2**25)


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["export", "{work}/ckpt", "--out", "{work}/out", "--verify-steps", HUGE],
            f"ssmstream export: error: argument --verify-steps: verify_steps must be at most "
            f"{2**20}, got {HUGE}",
        ),
        (
            ["verify", "{work}/model", "--steps", HUGE],
            f"ssmstream verify: error: --steps must be at most {2**20}, got {HUGE}",
        ),
    ],
    ids=["export", "verify"],
)
def test_a_parity_check_too_long_to_hold_is_refused_before_any_work(run, argv, said):
    assert run(argv) == (2, said)


def test_verify_steps_bound_is_the_export_one():
    from ssmstream.export import ExportConfig, ExportError

    assert ExportConfig(verify_steps=2**20).verify_steps == 2**20
    with pytest.raises(ExportError, match=r"^verify_steps must be at most 1048576, got 1048577$"):
        ExportConfig(verify_steps=2**20 + 1)


@pytest.mark.parametrize("host", ["\udcff", "a" * 64 + ".example"], ids=["surrogate", "label-64"])
def test_serve_host_the_idna_codec_refuses_is_named(run, host):
    status, said = run(["serve", "{work}/model", "--port", "0", "--host", host])
    assert status == 2
    assert said.startswith(f"ssmstream serve: --host: cannot listen on {host!r}: not a host name (")


@pytest.mark.parametrize("host, full", [("0", "0.0.0.0"), ("127.1", "127.0.0.1")])
def test_serve_host_written_short_is_refused_before_the_model_loads(run, host, full):
    """The system reads "0" as 0.0.0.0, gRPC's resolver as a name it cannot find: the bind
    failed once the model had loaded, with an error that did not name --host."""
    assert run(["serve", "{work}/model", "--port", "0", "--host", host]) == (
        2,
        f"ssmstream serve: error: --host: {host!r} is an IPv4 address written short, which "
        f"gRPC reads otherwise or not at all; write it in full (the system reads it as {full})",
    )


def test_serve_snapshot_key_too_short_to_sign_is_refused_before_the_model_loads(
    run, tmp_path, monkeypatch
):
    """A key of one byte would make every signature forgeable: refused, naming the flag and
    the minimum, before the engine opens the model."""
    from ssmstream.runtime import engine

    def no_engine(*args, **kwargs):
        raise AssertionError("serve opened the model before reading --snapshot-key")

    monkeypatch.setattr(engine, "Engine", no_engine)
    key = tmp_path / "short.key"
    key.write_bytes(b"k\n")
    key.chmod(0o600)
    assert run(["serve", "{work}/model", "--port", "0", "--snapshot-key", str(key)]) == (
        2,
        f"ssmstream serve: --snapshot-key: {key} holds 1 bytes; use at least 16",
    )


@pytest.mark.parametrize("command", list(BASE))
def test_an_unknown_flag_is_a_usage_error_naming_it(run, command):
    assert run(_argv(command, "--no-such-flag", "1")) == (
        2,
        f"ssmstream {command}: error: unrecognized arguments: --no-such-flag 1",
    )


@pytest.mark.parametrize(
    "command, flag, good, bad",
    [
        ("train", "--steps", "1", "0"),
        ("export", "--chunk", "8", HUGE),
        ("verify", "--steps", "8", "0"),
        ("serve", "--max-batch", "4", "0"),
        ("generate", "--timeout", "1", "nan"),
        ("bench", "--steps", "1", HUGE),
        ("plot", "--layer", "0", "-1"),
    ],
)
def test_a_flag_given_twice_is_refused_for_either_bad_value(run, command, flag, good, bad):
    """argparse keeps the last value of a repeated flag: a bad one last is checked as if
    alone; a bad one first, of the wrong type, is refused by argparse's own conversion."""
    status, said = run([*_argv(command, flag, good), flag, bad])
    assert status == 2 and _names(said, flag, bad), said
    status, said = run([*_argv(command, flag, "abc"), flag, good])
    assert (status, said) == (
        2,
        f"ssmstream {command}: error: argument {flag}: invalid int value: 'abc'"
        if flag != "--timeout"
        else f"ssmstream {command}: error: argument {flag}: invalid float value: 'abc'",
    )


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "hello", "--server", "127.0.0.1:1", "--tls", "--tls-ca"], "--tls-ca"),
        (["serve", "{work}/model", "--port", "0", "--auth-tokens"], "--auth-tokens"),
        (["serve", "{work}/model", "--port", "0", "--snapshot-key"], "--snapshot-key"),
    ],
    ids=["generate--tls-ca", "serve--auth-tokens", "serve--snapshot-key"],
)
def test_an_unreadable_file_is_named(run, tmp_path, argv, flag):
    locked = tmp_path / "locked"
    locked.write_text("0123456789abcdef0123456789abcdef\n")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway
        pytest.skip("this user reads a file of mode 000")
    status, said = run([*argv, str(locked)])
    assert _names(said, flag, str(locked)), said


@pytest.mark.parametrize("command", ["export", "verify", "info", "serve", "bench", "plot"])
@pytest.mark.parametrize("path", [EMPTY, MISSING, ADIR, AFILE, SURROGATE])
def test_a_model_or_checkpoint_that_is_not_one_is_named(run, work, command, path):
    """The positional MODEL_DIR / CKPT: missing, empty, a file, an empty directory."""
    status, said = run([command, path, *BASE[command][1:]])
    shown = path.replace("{work}", str(work))
    assert status == 2 and (_shows(said, shown) or "config.json" in said), said


@pytest.mark.parametrize("command", ["serve", "train"])
def test_a_usage_error_is_not_buried_under_every_flag(command, capsys):
    """The commands with dozens of flags print a one-line usage above the error (their
    --help has every flag): argparse's full usage took 23-30 lines."""
    from ssmstream.runtime import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, *(["m"] if command == "serve" else []), "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"usage: ssmstream {command} "), err
