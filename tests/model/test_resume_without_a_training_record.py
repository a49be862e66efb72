"""A checkpoint whose config.json records no training flags (written by `save_checkpoint`,
or by hand) resumes with the flags given and the defaults of the others: the run says so,
naming what it learns from and for how long, since nothing it trained with is known to
compare them with."""

from __future__ import annotations

import json
import logging

from ssmstream.model.train import main

# a signal run: 4 samples per step, one layer of width 8
RUN = [
    "--task", "signal", "--rate", "4", "--duration", "2", "--steps", "4", "--warmup-steps", "1",
    "--batch-size", "1", "--log-every", "2", "--eval-every", "2", "--eval-batches", "1",
    "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--no-progress", "--threads", "1",
]  # fmt: skip
WARNING = "records no training flags"


def _stopped_run(tmp_path, keep_record: bool):
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--stop-after", "2"]) == 0
    if not keep_record:
        meta = json.loads((out / "config.json").read_text())
        del meta["train"]
        (out / "config.json").write_text(json.dumps(meta))
    return out


def test_a_resume_without_a_training_record_says_the_flags_it_runs_with(tmp_path, caplog):
    out = _stopped_run(tmp_path, keep_record=False)
    caplog.set_level(logging.WARNING, logger="ssmstream.model.train")
    argv = ["--out", str(out), "--resume", "--task", "signal", "--steps", "3", "--threads", "1",
            "--warmup-steps", "1", "--rate", "4", "--duration", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert said == [
        f"resuming {out}: its config.json records no training flags, so none are checked or "
        "carried over: the run continues with the flags given and the defaults of the others "
        "(--task signal, --steps 3): pass the run's own"
    ]
    assert json.loads((out / "config.json").read_text())["step"] == 3


def test_a_text_run_names_the_data_and_window_it_takes(tmp_path, caplog):
    out = _stopped_run(tmp_path, keep_record=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(256)) * 4)
    caplog.set_level(logging.WARNING, logger="ssmstream.model.train")
    argv = ["--out", str(out), "--resume", "--data", str(corpus), "--seq-len", "8", "--steps",
            "2", "--warmup-steps", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2  # a signal model cannot learn text: refused after the warning
    said = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        f"(--task text, --data {corpus}, --seq-len 8, --steps 2): pass the run's own"
    ), said


def test_a_resume_with_its_training_record_does_not_warn(tmp_path, caplog):
    out = _stopped_run(tmp_path, keep_record=True)
    caplog.set_level(logging.WARNING, logger="ssmstream.model.train")
    assert main(["--out", str(out), "--resume"]) == 0
    assert not [r for r in caplog.records if WARNING in r.getMessage()]
    assert json.loads((out / "config.json").read_text())["step"] == 4
