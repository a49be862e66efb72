"""`ssmstream train`'s errors about a run say the flags, not the config fields: a resume whose
flags differ from the run's, a --stop-after before the checkpoint, an --out that holds a
checkpoint, a corpus too small for --seq-len; the paths --out and --data gave are printed as
given, even where they look like `name=value`. A refused command leaves the checkpoint as it
was."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from ssmstream.model.train import main

# a signal run: 4 samples per step, one layer of width 8
RUN = [
    "--task", "signal", "--rate", "4", "--duration", "2", "--steps", "4", "--warmup-steps", "1",
    "--batch-size", "1", "--log-every", "2", "--eval-every", "2", "--eval-batches", "1",
    "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--no-progress", "--threads", "1",
]  # fmt: skip


def _files(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped at step 2 of 4, in a directory named like a flag's value."""
    out = tmp_path_factory.mktemp("runs") / "lr=3e-4"
    assert main([*RUN, "--out", str(out), "--stop-after", "2"]) == 0
    return out


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line: no traceback
    return err[0]


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--lr", "0.01", "--seed", "3"], "--lr 0.01 (saved: 0.002), --seed 3 (saved: 0); "),
        (["--steps", "6"], "--steps 6 (saved: 4); a resumed run keeps its schedule and data"),
        (["--stop-after", "1"], "--stop-after 1 is before its checkpoint's step 2"),
    ],
)
def test_a_refused_resume_names_the_flags_and_keeps_the_checkpoint(stopped, capsys, extra, said):
    before = _files(stopped)
    line = _error([*RUN, "--out", str(stopped), "--resume", *extra], capsys)
    assert line.startswith(f"ssmstream train: error: cannot resume {stopped}: "), line
    assert said in line
    assert "=" not in line.replace(str(stopped), "")  # no `field=value` outside the path
    assert _files(stopped) == before


def test_an_out_holding_a_checkpoint_says_resume_as_the_flag(stopped, capsys):
    before = _files(stopped)
    line = _error([*RUN, "--out", str(stopped)], capsys)
    assert line == (
        f"ssmstream train: error: {stopped} already holds a checkpoint: continue it with "
        "--resume, or give another --out"
    )
    assert _files(stopped) == before


def test_a_corpus_too_small_for_the_window_says_seq_len(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("hi\n")
    out = tmp_path / "o"
    line = _error(["--data", str(tmp_path / "tiny.txt"), "--seq-len", "16", "--out", str(out)],
                  capsys)  # fmt: skip
    assert line.endswith(
        "corpus too small: the train split has 0 of its 3 bytes, need at least 17 "
        "(--seq-len + 1) in train and in val: add text to --data or use a smaller --seq-len"
    ), line
    assert not out.exists()


def test_an_out_named_like_a_flag_value_is_printed_as_given(stopped, capsys, monkeypatch):
    monkeypatch.chdir(stopped.parent)  # --out lr=3e-4, relative: a word of the message
    line = _error([*RUN, "--out", "lr=3e-4", "--resume", "--lr", "0.01"], capsys)
    assert line.startswith("ssmstream train: error: cannot resume lr=3e-4: --lr 0.01 (saved:"), line


def test_a_glob_with_a_slash_is_refused_naming_glob(tmp_path, capsys):
    """--glob is matched against file names, so '**/*.txt' matched nothing ("empty corpus"
    for a directory full of .txt files); it is refused saying how the pattern is used."""
    (tmp_path / "text" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "sub" / "a.txt").write_text("x" * 100)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:  # a usage error, found before any file is read
        main(["--data", str(tmp_path / "text"), "--glob", "**/*.txt", "--out", str(out)])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "ssmstream train: error: --glob: '**/*.txt' holds a '/': the pattern is matched against "
        "file names, at any depth below the --data directories (e.g. '*.txt')"
    )
    assert not out.exists()


def test_a_resume_without_the_runs_flags_continues_it_as_with_them(tmp_path, caplog):
    """`--out DIR --resume` takes the saved run's training flags: its checkpoint is the one a
    resume repeating every flag writes, bit for bit."""
    caplog.set_level(logging.INFO)
    runs = {}
    for name, resume in (("repeated", [*RUN]), ("left-out", ["--no-progress"])):
        out = tmp_path / name
        assert main([*RUN, "--out", str(out), "--stop-after", "2"]) == 0
        caplog.clear()
        assert main([*resume, "--out", str(out), "--resume"]) == 0
        runs[name] = _files(out)["model.safetensors"]
        said = [r.getMessage() for r in caplog.records if "with its saved" in r.getMessage()]
        if name == "left-out":  # the flags taken, as flags, with their values
            assert len(said) == 1 and "--steps 4" in said[0] and "--rate 4" in said[0], said
            assert "--stop-after" not in said[0]
        else:
            assert said == []
    assert runs["left-out"] == runs["repeated"]


def test_a_resume_from_another_directory_reads_the_data_the_run_read(tmp_path, monkeypatch):
    """A run given a relative --data records it absolute: `--out DIR --resume` from another
    working directory reads the same corpus (it read a path relative to the new directory,
    and found nothing there), and the same relative --data from the run's own directory is
    still the same data."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run / "corpus").mkdir(parents=True)
    elsewhere.mkdir()
    (run / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    argv = ["--steps", "3", "--warmup-steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--eval-batches", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    monkeypatch.chdir(run)
    assert main([*argv, "--data", "corpus", "--out", "ckpt", "--stop-after", "1"]) == 0
    saved = json.loads((run / "ckpt" / "config.json").read_text())["train"]["data"]
    assert saved == [str(run / "corpus")]
    assert main(["--data", "corpus", "--out", "ckpt", "--stop-after", "2", "--resume"]) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["--out", str(run / "ckpt"), "--resume", "--no-progress"]) == 0
    assert json.loads((run / "ckpt" / "config.json").read_text())["step"] == 3


def test_a_run_whose_corpus_moved_resumes_with_the_new_data_given(tmp_path, caplog, capsys):
    """The saved --data paths no longer exist: a resume without --data says which path is
    missing, one with --data where the corpus is now goes on (a warning names both), and
    while the saved corpus exists another --data is still refused."""
    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
    for d in (old, other):
        d.mkdir()
        (d / "a.txt").write_text(f"{d.name}: the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "ckpt"
    argv = ["--steps", "3", "--warmup-steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--eval-batches", "1",
            "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--data", str(old), "--stop-after", "1"]) == 0
    assert main([*argv, "--data", str(other), "--resume", "--stop-after", "2"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    old.rename(new)
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 2
    said = capsys.readouterr().err
    assert str(old) in said and "give --data where it is now" in said
    caplog.set_level(logging.WARNING)
    assert main(["--out", str(out), "--resume", "--no-progress", "--data", str(new)]) == 0
    assert f"its --data {old} no longer exists; reading {new}" in caplog.text
    assert json.loads((out / "config.json").read_text())["step"] == 3
