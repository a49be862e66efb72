"""model/train.py: a short run lowers the loss, checkpoints + resume, optimizer groups,
schedule, the CLI and its errors.

Independent references: the val loss is recomputed here over the whole val split (not
the trainer's eval windows) and compared with an untrained network and with the
uniform predictor ln 256; the schedule is compared with its closed form; a resumed run
is compared with an uninterrupted one weight by weight.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint
from ssmstream.model import train as train_mod
from ssmstream.model.data import SignalConfig, TextData, default_corpus_dir, load_text
from ssmstream.model.train import (
    Batches,
    DistInfo,
    TrainConfig,
    TrainingDiverged,
    build_parser,
    check_model_for_task,
    default_model_config,
    derived_seed,
    evaluate,
    fit,
    lr_factor,
    main,
    make_optimizer,
    resolve_device,
)
from torch import nn

TINY = dict(d_model=32, n_layers=2, d_state=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real text files: the stdlib's json package and some small modules."""
    root = tmp_path_factory.mktemp("corpus") / "text"
    stdlib = default_corpus_dir()
    shutil.copytree(stdlib / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("textwrap.py", "shlex.py", "string.py", "bisect.py", "colorsys.py"):
        shutil.copy(stdlib / name, root / name)
    return root


def _train_cfg(corpus, out, **kw) -> TrainConfig:
    base = dict(
        data=[str(corpus)],
        out=str(out),
        seq_len=64,
        batch_size=8,
        steps=40,
        warmup_steps=4,
        lr=3e-3,
        log_every=5,
        eval_every=20,
        eval_batches=4,
        progress=False,
        threads=1,  # 2 shared cores: one thread avoids OpenMP oversubscription
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    cfg = _train_cfg(corpus, out)
    result = fit(default_model_config("text", **TINY), cfg)
    return result, cfg


@torch.no_grad()
def _val_loss(net: SSMNetwork, val: torch.Tensor, L: int = 64) -> float:
    """Mean next-byte cross-entropy over all non-overlapping windows of the val bytes."""
    n = (val.numel() - 1) // L
    x = val[: n * L].long().reshape(n, L)
    y = val[1 : n * L + 1].long().reshape(n, L)
    logits = net.eval()(x)
    return nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item()


def test_short_run_lowers_the_loss(trained, corpus):
    result, cfg = trained
    val = load_text(cfg.data, val_fraction=cfg.val_fraction).val
    torch.manual_seed(cfg.seed)
    untrained = SSMNetwork(SSMConfig(vocab_size=256, **TINY))
    before, after = _val_loss(untrained, val), _val_loss(load_checkpoint(result.checkpoint), val)
    # measured: ≈5.6 nats untrained → ≈3.2 after 40 steps (uniform predictor: ln 256 = 5.55)
    assert before > math.log(256) - 0.3
    assert after < before - 1.0 and after < math.log(256) - 1.0
    log = [json.loads(line) for line in (result.checkpoint / "train_log.jsonl").open()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] - 1.0
    # the trainer's own eval (random val windows) estimates the same quantity
    assert abs(result.last_eval["loss"] - after) < 0.4
    assert result.last_eval["bpb"] == pytest.approx(result.last_eval["loss"] / math.log(2))


def test_checkpoint_and_log_contents(trained):
    result, cfg = trained
    ckpt = result.checkpoint
    assert {p.name for p in ckpt.iterdir()} >= {
        "config.json", "model.safetensors", "train_log.jsonl", "train_state.pt"
    }  # fmt: skip
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["step"] == 40 and meta["task"] == "text" and meta["train"]["seq_len"] == 64
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == 40 and state["scheduler"]["last_epoch"] == 40
    log = [json.loads(line) for line in (ckpt / "train_log.jsonl").open()]
    train_lines = [e for e in log if "loss" in e]
    eval_lines = [e for e in log if "eval" in e]
    assert [e["step"] for e in train_lines] == list(range(5, 41, 5))
    assert [e["step"] for e in eval_lines] == [20, 40]
    for e in train_lines:
        assert e["tokens_per_s"] > 0 and e["grad_norm"] > 0
        # lr after k scheduler steps: peak · s(k), s = warm-up then cosine to min_lr_ratio
        k, w, T, m = e["step"], cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio
        s = (k + 1) / w if k < w else m + (1 - m) * (1 + math.cos(math.pi * (k - w) / (T - w))) / 2
        assert e["lr"] == pytest.approx(cfg.lr * s) and e["ssm_lr"] == pytest.approx(cfg.ssm_lr * s)
    # the saved weights are the returned network's
    loaded = load_checkpoint(ckpt).state_dict()
    for k, v in result.net.state_dict().items():
        assert torch.equal(loaded[k], v.cpu())


def test_lr_factor_closed_form():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)  # first step: 1/w
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)  # start of the cosine
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)  # half way: (1 + m) / 2
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)  # flat after the end
    assert lr_factor(0, 0, 100, 0.0) == pytest.approx(1.0)  # no warm-up


def test_optimizer_groups():
    torch.manual_seed(0)
    net = SSMNetwork(SSMConfig(vocab_size=256, d_model=16, n_layers=3, d_state=8, heads=4))
    cfg = TrainConfig(lr=1e-2, ssm_lr=1e-3, weight_decay=0.1, warmup_steps=0, steps=10)
    opt, _ = make_optimizer(net, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    ssm_params = [p for layer in net.ssms for p in layer.ssm_parameters()]
    assert len(ssm_params) == 3 * 4  # log A_real, A_imag, log Δ, B per layer
    assert ids(groups["ssm"]["params"]) == ids(ssm_params)
    assert groups["ssm"]["weight_decay"] == 0 and groups["ssm"]["lr"] == pytest.approx(1e-3)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(ids(every)) and ids(every) == ids(net.parameters())
    # C and D are not SSM-group parameters: they decay / train at the main lr
    assert id(net.ssms[0].C) in ids(groups["decay"]["params"])
    assert id(net.ssms[0].D) in ids(groups["no_decay"]["params"])


def test_resume_continues_and_matches_an_uninterrupted_run(corpus, tmp_path):
    model = default_model_config("text", d_model=16, n_layers=1, d_state=8, dropout=0.1)
    kw = dict(seq_len=32, batch_size=4, steps=16, log_every=4, eval_every=8, eval_batches=2)
    whole = fit(model, _train_cfg(corpus, tmp_path / "whole", **kw))
    first = fit(model, _train_cfg(corpus, tmp_path / "split", stop_after=8, **kw))
    assert first.step == 8
    log_path = tmp_path / "split" / "train_log.jsonl"
    with log_path.open("a") as f:  # a line logged after the last checkpoint (as if it crashed)
        f.write(json.dumps({"step": 12, "loss": 99.0}) + "\n")
    resumed = fit(None, _train_cfg(corpus, tmp_path / "split", resume=True, **kw))
    assert resumed.step == 16
    meta = json.loads((tmp_path / "split" / "config.json").read_text())
    assert meta["step"] == 16
    for k, v in whole.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in p.open()
    ]
    assert strip(log_path) == strip(tmp_path / "whole" / "train_log.jsonl")  # 99.0 dropped
    # resuming a finished run trains nothing and keeps the weights
    again = fit(None, _train_cfg(corpus, tmp_path / "split", resume=True, **kw))
    assert again.step == 16
    for k, v in whole.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[k], v), k


def test_resume_refuses_inconsistent_state(trained, tmp_path):
    result, cfg = trained
    ckpt = tmp_path / "copy"
    shutil.copytree(result.checkpoint, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["step"] = 39
    (ckpt / "config.json").write_text(json.dumps(meta))
    resume = TrainConfig(**{**cfg.to_dict(), "out": str(ckpt), "resume": True})
    with pytest.raises(ValueError, match="step 40 but config.json at step 39"):
        fit(None, resume)
    meta["step"] = 40
    (ckpt / "config.json").write_text(json.dumps(meta))
    good = (ckpt / "train_state.pt").read_bytes()
    for bad, why in ((good[:100], "RuntimeError"), (b"garbage\n", "UnpicklingError"),
                     (None, "not a training state")):  # fmt: skip
        if bad is None:
            torch.save({"step": 40}, ckpt / "train_state.pt")
        else:
            (ckpt / "train_state.pt").write_bytes(bad)
        with pytest.raises(ValueError, match=f"train_state.pt is not readable \\({why}"):
            fit(None, resume)
    (ckpt / "train_state.pt").unlink()
    with pytest.raises(ValueError, match="train_state.pt is missing"):
        fit(None, resume)


def test_resume_refuses_a_different_schedule_or_data_and_names_the_fields(trained, tmp_path):
    """A resumed run continues exactly only with the saved run's schedule, data and seed (a
    new --steps had restarted the cosine schedule from a higher lr; a missing --seed had
    silently changed the batches): anything else is refused, naming each field; where and how
    it reports may change."""
    result, cfg = trained
    ckpt = tmp_path / "copy"
    shutil.copytree(result.checkpoint, ckpt)
    base = {**cfg.to_dict(), "out": str(ckpt), "resume": True}
    with pytest.raises(ValueError, match=r"seed=6 \(saved: 0\), steps=80 \(saved: 40\)"):
        fit(None, TrainConfig(**{**base, "steps": 80, "seed": cfg.seed + 6}))
    signal = {**cfg.to_dict()["signal"], "rate": 3.0}
    with pytest.raises(ValueError, match="signal="):
        fit(None, TrainConfig(**{**base, "signal": signal}))
    again = fit(None, TrainConfig(**{**base, "log_every": 3, "eval_batches": 1, "progress": False}))
    assert again.step == 40  # a finished run: nothing more to train, and nothing refused


def test_cli_signal_task(tmp_path, capsys):
    out = tmp_path / "sig"
    out.mkdir()  # a run stopped before its first checkpoint left its log: a new run replaces it
    (out / "train_log.jsonl").write_text(json.dumps({"step": 90, "loss": 5.0}) + "\n")
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "6"]
    argv += ["--warmup-steps", "1", "--d-model", "8", "--n-layers", "1", "--d-state", "4"]
    argv += ["--batch-size", "2", "--no-progress", "--out", str(out), "--target", "delay"]
    argv += ["--threads", "1"]
    assert main(argv) == 0
    net = load_checkpoint(out)
    assert net.cfg.d_input == 1 and net.cfg.d_output == 1 and net.cfg.d_model == 8
    meta = json.loads((out / "config.json").read_text())
    assert meta["train"]["signal"]["target"] == "delay" and meta["train"]["signal"]["rate"] == 4
    assert set(meta["eval"]) == {"loss"}
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert steps and 90 not in steps and steps == sorted(steps)


def test_cli_a_run_that_diverges_says_so_without_a_traceback(tmp_path, caplog):
    """Valid flags, an unstable model (forward Euler with a large Δ): exit 1 and one error
    line that says what to try (it was a traceback)."""
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "12"]
    argv += ["--warmup-steps", "1", "--d-model", "8", "--n-layers", "1", "--d-state", "4"]
    argv += ["--batch-size", "2", "--no-progress", "--out", str(tmp_path / "o"), "--threads", "1"]
    argv += ["--discretization", "euler", "--dt-min", "5", "--dt-max", "10", "--log-every", "2"]
    assert main(argv) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "training diverged: loss nan" in line and "--dt-max" in line


CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 128000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), MemoryError()])
def test_cli_a_run_that_runs_out_of_memory_says_so_without_a_traceback(
    tmp_path, monkeypatch, caplog, error
):
    """`--task signal --duration 1e9` (or a huge --batch-size, --d-model) made torch's
    allocator fail: a RuntimeError traceback. Exit 1 and one line naming the flags that size
    the run; a RuntimeError of another kind is not taken for it."""

    def allocate(*a, **k):
        raise error

    monkeypatch.setattr(train_mod, "signal_batch", allocate)
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "2"]
    argv += ["--warmup-steps", "1", "--d-model", "8", "--n-layers", "1", "--d-state", "4"]
    argv += ["--no-progress", "--out", str(tmp_path / "o"), "--threads", "1"]
    assert main(argv) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("ssmstream train: out of memory (")
    assert line.endswith(
        "use a smaller --batch-size, sequence (--seq-len; --duration × --rate and "
        "--n-components for --task signal) or model (--d-model, --n-layers, --d-state)"
    )
    assert ("128000000000 bytes" in line) == isinstance(error, RuntimeError)
    assert not (tmp_path / "o").exists()
    error = RuntimeError("something else")
    with pytest.raises(RuntimeError, match="^something else$"):
        main(argv)


def test_cli_names_an_unreadable_corpus_file(tmp_path, monkeypatch, capsys):
    """A file of --data that cannot be read (permissions): a usage error naming it, exit 2,
    no traceback and no checkpoint."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello there, general kenobi. " * 40)
    (corpus / "b.txt").write_text("you are a bold one. " * 40)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["--data", str(corpus), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    said = capsys.readouterr().err  # one line: what --data names is wrong, not the flags' use
    assert (
        said
        == f"ssmstream train: error: --data: cannot read {corpus / 'b.txt'}: Permission denied\n"
    )
    assert not (tmp_path / "o").exists()


def test_ssmstream_train_help(capsys):
    from ssmstream.runtime.cli import main as ssmstream

    with pytest.raises(SystemExit) as e:
        ssmstream(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--ssm-lr" in text and "--resume" in text and "torchrun" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "video"], "invalid choice: 'video'"),
        (["--steps", "0"], "steps must be positive"),
        (["--steps", "ten"], "invalid int value"),
        (
            ["--warmup-steps", "10", "--steps", "5"],
            "--warmup-steps 10 must be smaller than --steps 5",
        ),
        (["--lr", "-1"], "lr must be positive"),
        (["--val-fraction", "1.5"], "--val-fraction must be in"),
        (["--d-state", "3"], "--d-state must be"),
        (["--heads", "5"], "heads"),
        (["--discretization", "rk4"], "invalid choice: 'rk4'"),
        (["--task", "signal", "--rate", "2", "--freq-max", "1.5"], "Nyquist"),
        (["--task", "signal", "--target", "square"], "invalid choice: 'square'"),
        (["--data"], "expected at least one argument"),
        # not finite: these had passed the checks, then crashed or diverged with a traceback
        (["--lr", "inf"], "lr must be positive and finite"),
        (["--ssm-lr", "inf"], "--ssm-lr must be positive and finite"),
        (["--grad-clip", "nan"], "--grad-clip must be non-negative and finite"),
        (["--weight-decay", "nan"], "--weight-decay must be non-negative and finite"),
        (["--dt-max", "inf"], "--dt-max"),
        (["--task", "signal", "--rate", "inf"], "rate must be positive and finite"),
        (["--task", "signal", "--duration", "inf"], "duration must be positive and finite"),
        (["--task", "signal", "--rate", "1e308", "--duration", "10"], "duration · rate"),
        (["--task", "signal", "--target", "next", "--horizon", "inf"], "horizon must be"),
        (["--seed", str(2**64)], "seed must be in [-2**63, 2**64 - 1], got 18446744073709551616"),
        (["--seed", str(-(2**63) - 1)], "seed must be in [-2**63, 2**64 - 1]"),
    ],
)
def test_cli_rejects_bad_flags(argv, message, tmp_path, capsys):
    try:  # most with the usage (SystemExit); --val-fraction when the data is read
        code = main([*argv, "--out", str(tmp_path / "x"), "--no-progress"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


def test_cli_rejects_bad_data_and_dirs(trained, tmp_path, capsys):
    result, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "a-file")], "is a file; give a directory"),
        (["--out", str(tmp_path / "a-file" / "ckpt")], "out: cannot create"),
        (["--data", str(tmp_path / "empty")], "empty corpus"),
        (["--data", str(tmp_path / "missing")], f"--data: {str(tmp_path / 'missing')!r} does not"),
        (["--out", str(result.checkpoint)], "already holds a checkpoint"),
        (["--resume", "--out", str(tmp_path / "nothing")], "cannot resume"),
        (["--out", ""], "out must name a directory"),
        (["--threads", "100000"], "threads must be at most 1024"),  # torch: a segfault
        (["--data", ""], "data: an empty path would read the working directory"),
        (["--data", str(tmp_path / "empty"), " "], "data: an empty path"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device: 'cuda' requested but CUDA is not available"))
    (tmp_path / "null-model").mkdir()  # config.json whose model is not an object
    meta = json.loads((result.checkpoint / "config.json").read_text())
    (tmp_path / "null-model" / "config.json").write_text(
        json.dumps({**meta, "model": None, "train": None})
    )
    cases.append(
        (["--resume", "--d-model", "8", "--out", str(tmp_path / "null-model")], "invalid model")
    )
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "ckpt")  # had been EEXIST, after
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # the data loaded, naming no flag
    for name, target in (("dangling", tmp_path / "gone" / "ckpt"), ("loop", tmp_path / "loop")):
        cases.append(
            (
                ["--out", str(tmp_path / name)],
                f"out: cannot create {tmp_path / name}: {tmp_path / name} is a symlink to "
                f"{target}, which does not resolve to a directory",
            )
        )
    (tmp_path / "stopped").mkdir()  # an earlier run's log: a refused command keeps it
    (tmp_path / "stopped" / "train_log.jsonl").write_text('{"step": 3}\n')
    cases.append(
        (
            ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "stopped")],
            "does not exist",
        )
    )
    for argv, message in cases:
        argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "o")]
        try:  # a flag's value: usage and the error; what the flags name: the error alone
            code = main([*argv, "--no-progress", "--seq-len", "16"])
        except SystemExit as e:
            code = e.code
        assert code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()  # a refused command makes nothing
    assert (tmp_path / "stopped" / "train_log.jsonl").read_text() == '{"step": 3}\n'


def test_api_rejects_mismatched_model_and_task(tmp_path):
    with pytest.raises(ValueError, match="task 'video'"):
        TrainConfig(task="video")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="d_input"):
        fit(SSMConfig(vocab_size=256, d_model=8), TrainConfig(task="signal", out=str(tmp_path)))
    with pytest.raises(ValueError, match="vocab_size"):
        fit(SSMConfig(d_input=1, d_model=8), TrainConfig(task="text", out=str(tmp_path)))
    with pytest.raises(ValueError, match="vocab_size"):
        fit(SSMConfig(vocab_size=100, d_model=8), TrainConfig(out=str(tmp_path)))


def test_cli_stop_and_resume(corpus, tmp_path, caplog):
    out = tmp_path / "c"
    argv = ["--data", str(corpus), "--out", str(out), "--steps", "6", "--warmup-steps", "1"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--d-model", "8", "--n-layers", "1"]
    argv += ["--d-state", "4", "--log-every", "1", "--threads", "1", "--no-progress"]
    assert main([*argv, "--stop-after", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 3
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.0\n')  # a torn last line
    # model flags are ignored on --resume: the checkpoint's config is used; the ones that
    # differ from it are named in a warning (the same ones as before are not)
    with caplog.at_level(logging.WARNING, logger="ssmstream.model.train"):
        assert main([*argv, "--resume", "--d-model", "64", "--n-layers", "1"]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert "ignoring --d-model 64 (saved: 8): a resumed run keeps" in warned
    assert json.loads((out / "config.json").read_text())["step"] == 6
    assert load_checkpoint(out).cfg.d_model == 8
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]  # train lines + the eval at each stop


@pytest.mark.parametrize("name", ["save_every", "stop_after", "threads"])
@pytest.mark.parametrize("value", [0, -1])
def test_optional_counts_must_be_positive(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be positive, got {value}$"):
        TrainConfig(**{name: value})
    TrainConfig(**{name: None})  # None: the default


@pytest.mark.parametrize("name", ["lr", "ssm_lr"])
def test_zero_learning_rate_is_refused(name):
    with pytest.raises(ValueError, match=f"^{name} must be positive and finite, got 0.0$"):
        TrainConfig(**{name: 0.0})


def test_min_lr_ratio_bounds():
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="^min_lr_ratio must be in \\[0, 1\\]"):
            TrainConfig(min_lr_ratio=bad)
    TrainConfig(min_lr_ratio=1.0)
    TrainConfig(min_lr_ratio=0.0)


def test_warmup_must_be_shorter_than_the_schedule():
    with pytest.raises(ValueError, match="^warmup_steps=10 must be smaller than steps=10$"):
        TrainConfig(warmup_steps=10, steps=10)
    TrainConfig(warmup_steps=9, steps=10)


def test_zero_warmup_weight_decay_and_clip_are_allowed():
    cfg = TrainConfig(warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip) == (0, 0.0, 0.0)


def test_empty_data_list_is_refused():
    with pytest.raises(ValueError, match="^data must name at least one file or directory$"):
        TrainConfig(data=[])


def test_signal_dict_becomes_a_signal_config():
    cfg = TrainConfig(task="signal", signal={"rate": 4.0, "duration": 8.0})
    assert isinstance(cfg.signal, SignalConfig) and cfg.signal.length == 32


def test_length_is_the_tasks_sequence_length():
    assert TrainConfig(task="text", seq_len=48).length == 48
    sig = TrainConfig(task="signal", seq_len=48, signal=SignalConfig(rate=4.0, duration=8.0))
    assert sig.length == 32


def test_check_model_for_task_checks_d_output_too():
    with pytest.raises(ValueError, match="got vocab_size=256, d_output=10"):
        check_model_for_task(SSMConfig(vocab_size=256, d_output=10, d_model=8), "text")
    with pytest.raises(ValueError, match="got d_input=1, d_output=2"):
        check_model_for_task(SSMConfig(d_input=1, d_output=2, d_model=8), "signal")
    check_model_for_task(SSMConfig(vocab_size=256, d_model=8), "text")
    check_model_for_task(SSMConfig(d_input=1, d_model=8), "signal")


def test_dist_info_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = DistInfo.from_env()
    assert (d.world_size, d.rank, d.local_rank) == (8, 5, 1) and not d.is_main
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert DistInfo.from_env() == DistInfo(1, 0, 0)


def test_resolve_device_uses_local_rank_and_auto_picks_cuda(monkeypatch):
    """Multi-node: global rank 5, local rank 1 on a 2-GPU node → cuda:1 (not cuda:5 % 2)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    node = DistInfo(world_size=8, rank=4, local_rank=1)
    assert resolve_device("cuda", node) == torch.device("cuda", 1)
    assert resolve_device("auto", node) == torch.device("cuda", 1)
    assert resolve_device("cpu", node) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", node) == torch.device("cpu")


@pytest.mark.parametrize(
    "argv, warned",
    [
        (["--rate", "4", "--target", "delay", "--alpha", "0.3"],
         ["--rate: only for --task signal; ignored", "--target: only for --task signal; ignored",
          "--alpha: only for --discretization gbt; ignored"]),
        (["--task", "signal", "--rate", "4", "--discretization", "gbt", "--alpha", "0.3"], []),
        (["--task", "signal", "--alpha", "0.5"],
         ["--alpha: only for --discretization gbt; ignored"]),
        # the text task's flags with --task signal, and a target's with another target
        (["--task", "signal", "--seq-len", "99", "--glob", "*.txt", "--val-fraction", "0.2"],
         ["--seq-len: only for --task text; ignored", "--glob: only for --task text; ignored",
          "--val-fraction: only for --task text; ignored"]),
        (["--task", "signal", "--horizon", "0.5"],
         ["--horizon: only for --target next; ignored"]),
        (["--task", "signal", "--target", "next", "--tau", "3"],
         ["--tau: only for --target lowpass or delay; ignored"]),
        (["--task", "signal", "--target", "next", "--horizon", "0.5"], []),
        (["--task", "signal", "--target", "delay", "--tau", "3"], []),
    ],
)  # fmt: skip
def test_flags_the_run_does_not_use_are_warned_of(argv, warned, caplog):
    # --alpha without gbt and the signal task's flags with --task text were silently ignored,
    # while --data with --task signal was warned of
    from ssmstream.model.train import _warn_of_flags_that_do_nothing, configs_from_args

    model_cfg, cfg = configs_from_args(build_parser().parse_args(argv))
    with caplog.at_level("WARNING", logger="ssmstream.model.train"):
        _warn_of_flags_that_do_nothing(model_cfg, cfg, argv)
    assert caplog.messages == warned


def test_resume_refuses_a_checkpoint_of_another_version_before_reading_the_data(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(
        json.dumps({"format": "ssmstream-checkpoint", "version": 99, "model": {}})
    )
    argv = ["--resume", "--out", str(tmp_path / "ck"), "--data", str(tmp_path / "no-corpus")]
    assert main([*argv, "--no-progress"]) == 2  # the corpus had been read first
    said = capsys.readouterr().err
    assert "checkpoint version 99 unsupported" in said and "no-corpus" not in said, said


def test_errors_about_fields_name_their_flags():
    from ssmstream.model.train import _with_flags

    for message, said in [
        ("warmup_steps=50 must be smaller than steps=2",
         "--warmup-steps 50 must be smaller than --steps 2"),
        ("heads=3 must be positive and divide d_model=8",
         "--heads 3 must be positive and divide --d-model 8"),
        ("batch_size must be positive, got 0", "--batch-size must be positive, got 0"),
        ("data: cannot read x", "--data: cannot read x"),
        ("cannot resume: x holds no checkpoint", "cannot resume: x holds no checkpoint"),
        ("duration · rate must be finite, got inf", "duration · rate must be finite, got inf"),
        ("--out x: y", "--out x: y"),
        ("data: '/runs/lr=3e-4/a.txt' does not exist",  # a path is not a field
         "--data: '/runs/lr=3e-4/a.txt' does not exist"),
    ]:  # fmt: skip
        assert _with_flags(message) == said
    # what the flags name (paths) are said of at run time, with values=False: fields only
    # at the start
    said = _with_flags("out: lr=3e-4 is a file; give a directory", values=False)
    assert said == "--out: lr=3e-4 is a file; give a directory"
    said = _with_flags("cannot resume: lr=3e-4 holds no checkpoint", values=False)
    assert said == "cannot resume: lr=3e-4 holds no checkpoint"


def test_help_shows_no_default_none():
    text = " ".join(build_parser().format_help().split())  # unwrapped
    assert "(default: None)" not in text and "default: None" not in text
    assert "default: False" not in text  # store_true flags
    assert "(default: 1000)" in text  # --steps
    assert "--seed SEED seed of init, batches and dropout (default: 0)" in text  # 0 == False


MODEL = dict(d_model=8, n_layers=1, d_state=4)
SIGNAL = SignalConfig(rate=4.0, duration=8.0)  # L = 32


def _signal_cfg(out, **kw) -> TrainConfig:
    base = dict(
        task="signal", out=str(out), signal=SIGNAL, batch_size=2, steps=6, warmup_steps=1,
        log_every=2, eval_every=3, eval_batches=1, progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _signal_model(**kw):
    return default_model_config("signal", **{**MODEL, **kw})


def _log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").open()]


def test_stop_after_beyond_the_schedule_ends_at_steps(tmp_path):
    result = fit(_signal_model(), _signal_cfg(tmp_path / "o", stop_after=10))
    assert result.step == 6
    assert json.loads((tmp_path / "o" / "config.json").read_text())["step"] == 6


@pytest.mark.parametrize(
    "save_every, eval_every, saved", [(2, 100, [2, 4, 6, 7]), (None, 3, [3, 6, 7])]
)
def test_checkpoints_every_save_every_and_at_the_end(
    tmp_path, monkeypatch, save_every, eval_every, saved
):
    steps, real = [], train_mod._save

    def save(out, net, opt, sched, step, *a):
        steps.append(step)
        return real(out, net, opt, sched, step, *a)

    monkeypatch.setattr(train_mod, "_save", save)
    fit(
        _signal_model(),
        _signal_cfg(tmp_path / "o", steps=7, save_every=save_every, eval_every=eval_every),
    )
    assert steps == saved


def test_train_log_has_a_line_at_the_last_step(tmp_path):
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=7, log_every=2, eval_every=100))
    log = _log_lines(tmp_path / "o")
    assert [e["step"] for e in log if "loss" in e] == [2, 4, 6, 7]
    assert [e["step"] for e in log if "eval" in e] == [7]


def test_tokens_per_s_is_tokens_over_the_windows_time(tmp_path, monkeypatch):
    """With a clock that advances 1 s per reading, every step lasts 1 s: tokens_per_s is
    B · L (world size 1) in every window, whatever its length."""
    clock = itertools.count()
    monkeypatch.setattr(
        train_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    )
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=7, log_every=3, eval_every=100))
    lines = [e for e in _log_lines(tmp_path / "o") if "loss" in e]
    assert [e["step"] for e in lines] == [3, 6, 7]
    assert [e["tokens_per_s"] for e in lines] == [2 * 32] * 3


def test_logged_loss_is_the_mean_over_the_window(tmp_path, monkeypatch):
    losses = []
    real = train_mod.loss_fn

    def spy(task, out, y):
        loss = real(task, out, y)
        if torch.is_grad_enabled():  # training steps, not evals
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(train_mod, "loss_fn", spy)
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=7, log_every=3, eval_every=100))
    lines = [e for e in _log_lines(tmp_path / "o") if "loss" in e]
    want = [sum(losses[0:3]) / 3, sum(losses[3:6]) / 3, losses[6]]
    assert [e["loss"] for e in lines] == pytest.approx(want, rel=1e-6)


def test_grad_clip_zero_turns_clipping_off(tmp_path):
    torch.manual_seed(0)
    result = fit(_signal_model(), _signal_cfg(tmp_path / "o", grad_clip=0.0))
    lines = [e for e in _log_lines(tmp_path / "o") if "loss" in e]
    assert lines and all("grad_norm" not in e for e in lines)
    torch.manual_seed(0)  # the trainer's init (seed 0)
    init = train_mod.SSMNetwork(_signal_model())
    # the SSM group has no weight decay: it moves only through gradients (clip 0 would zero them)
    assert not torch.equal(result.net.ssms[0].log_dt, init.ssms[0].log_dt)


def test_grad_norm_is_the_gradient_norm_before_clipping(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(real(*a, **k)) or norms[-1]
    )
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=4, log_every=2, eval_every=100))
    lines = [e for e in _log_lines(tmp_path / "o") if "loss" in e]
    assert [e["grad_norm"] for e in lines] == pytest.approx([float(norms[1]), float(norms[3])])


def test_an_infinite_loss_is_divergence(tmp_path, monkeypatch):
    real = train_mod.loss_fn
    # an infinite value with finite gradients: the weights stay finite, the loss is inf
    monkeypatch.setattr(train_mod, "loss_fn", lambda task, out, y: real(task, out, y) + math.inf)
    with pytest.raises(TrainingDiverged, match="training diverged: loss inf at step 2"):
        fit(_signal_model(), _signal_cfg(tmp_path / "o"))


@pytest.mark.parametrize("bad, eval_every", [(3, 3), (4, 5)])
def test_weights_that_turn_nan_between_log_lines_are_never_saved(
    tmp_path, monkeypatch, bad, eval_every
):
    """The update of step `bad` makes a weight NaN (the loss logged every 10 steps would say
    so only at step 10): the evaluation (step 3) or the save (step 4, no evaluation due) of
    that step refuses the weights, naming the one, and the checkpoint stays the finite one of
    step 2, with no NaN evaluation logged."""
    real = train_mod.make_optimizer

    def make_optimizer(net, cfg):
        opt, sched = real(net, cfg)
        n = []

        def poison(*_):  # after each optimizer step
            n.append(1)
            if len(n) == bad:
                with torch.no_grad():
                    net.encoder.bias[0] = math.nan

        opt.register_step_post_hook(poison)
        return opt, sched

    monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)
    out = tmp_path / "o"
    cfg = _signal_cfg(out, steps=8, log_every=10, eval_every=eval_every, save_every=2)
    with pytest.raises(
        TrainingDiverged, match=rf"non-finite weights at step {bad} \(encoder\.bias\)"
    ):
        fit(_signal_model(), cfg)
    assert json.loads((out / "config.json").read_text())["step"] == 2
    net = load_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    assert _log_lines(out) == []  # no evaluation ran (the first was due at step 3 or 5)


def test_signal_evaluation_batches_are_not_training_batches(tmp_path):
    # the signal task has no split: only the seed keeps evaluation off the training data
    b = train_mod.Batches(_signal_cfg(tmp_path / "o"), None)
    evals = [x for x, _ in b.eval()]
    trains = [b.train(r, k)[0] for r in range(2) for k in range(8)]
    assert evals and not any(torch.equal(e, t) for e in evals for t in trains)
    assert all(torch.equal(e, f) for e, (f, _) in zip(evals, b.eval()))  # the same each time


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out))
    meta = (out / "config.json").read_text()
    state = (out / "train_state.pt").read_bytes()
    assert json.loads(meta)["eval"] is not None
    again = fit(None, _signal_cfg(out, resume=True))
    assert again.step == 6
    assert (out / "config.json").read_text() == meta  # its eval kept (was overwritten by None)
    assert (out / "train_state.pt").read_bytes() == state


def test_resume_may_change_device_threads_and_save_every(tmp_path, caplog):
    """Allowed, but another thread count (or device) may round float sums differently: the
    run says it is no longer bit-identical to one long run; another save_every says nothing."""
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3, device="auto"))
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        resumed = fit(None, _signal_cfg(out, resume=True, device="cpu", threads=2, save_every=2))
    assert resumed.step == 6
    said = [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()]
    assert len(said) == 1 and "other device and threads (device='cpu', saved 'auto', " in said[0]
    assert "threads=2, saved 1)" in said[0]
    caplog.clear()
    out2 = tmp_path / "o2"
    fit(_signal_model(), _signal_cfg(out2, stop_after=3))
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        fit(None, _signal_cfg(out2, resume=True, save_every=2))
    assert not [r for r in caplog.records if "bit-identical" in r.getMessage()]


def test_resume_warns_when_a_different_model_config_is_given(tmp_path, caplog):
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3))
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        fit(_signal_model(d_model=16), _signal_cfg(out, resume=True, stop_after=4))
    assert any("its model config is used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        fit(_signal_model(), _signal_cfg(out, resume=True, stop_after=5))
    assert not any("its model config is used" in r.getMessage() for r in caplog.records)


def test_cli_resume_ignores_model_flags_without_a_warning(tmp_path, caplog):
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "4"]
    argv += ["--warmup-steps", "1", "--batch-size", "2", "--no-progress", "--threads", "1"]
    argv += ["--out", str(tmp_path / "o")]
    model = ["--d-model", "8", "--n-layers", "1", "--d-state", "4"]
    assert main([*argv, *model, "--stop-after", "2"]) == 0
    caplog.clear()
    assert main([*argv, "--resume"]) == 0  # no model flags: the defaults, ignored
    assert not any("its model config is used" in r.getMessage() for r in caplog.records)


def test_fit_restores_torchs_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(_signal_model(), _signal_cfg(tmp_path / "o", threads=1, steps=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_evaluate_runs_in_eval_mode_and_keeps_the_mode():
    torch.manual_seed(0)
    net = train_mod.SSMNetwork(_signal_model(dropout=0.5))
    cfg = _signal_cfg("unused", eval_batches=2)
    batches = Batches(cfg, None).eval()
    with torch.no_grad():
        net.eval()
        want = sum(torch.nn.functional.mse_loss(net(x), y).item() for x, y in batches) / 2
    net.train()
    assert evaluate(net, "signal", batches, "cpu") == {"loss": pytest.approx(want, rel=1e-6)}
    assert net.training
    net.eval()
    assert evaluate(net, "signal", batches, "cpu")["loss"] == pytest.approx(want, rel=1e-6)
    assert not net.training


def test_train_batches_depend_on_rank_and_step():
    b = Batches(_signal_cfg("unused"), None)
    x00, x01, x10 = b.train(0, 0)[0], b.train(0, 1)[0], b.train(1, 0)[0]
    assert torch.equal(x00, b.train(0, 0)[0])
    assert not torch.equal(x00, x01) and not torch.equal(x00, x10)


def test_eval_batches_come_from_the_val_split():
    text = TextData(torch.full((500,), ord("t"), dtype=torch.uint8),
                    torch.full((500,), ord("v"), dtype=torch.uint8), ["a"], ["b"])  # fmt: skip
    cfg = TrainConfig(seq_len=16, batch_size=2, eval_batches=3)
    evals = Batches(cfg, text).eval()
    assert len(evals) == 3 and all(bool((x == ord("v")).all()) for x, _ in evals)
    x, _ = Batches(cfg, text).train(0, 0)
    assert bool((x == ord("t")).all())


def test_dropout_masks_are_seeded_per_rank_and_step(tmp_path, monkeypatch):
    seeds = []
    real = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (seeds.append(s), real(s))[1])
    fit(_signal_model(dropout=0.1), _signal_cfg(tmp_path / "o", steps=3, seed=7))
    assert seeds == [7] + [derived_seed(7, "dropout", 0, k) for k in range(3)]


def test_text_corpus_needs_seq_len_plus_one_bytes_per_split(tmp_path):
    (tmp_path / "c.txt").write_bytes(bytes(range(33)))  # split by bytes: 16 train, 17 val
    cfg = TrainConfig(data=[str(tmp_path / "c.txt")], out=str(tmp_path / "o"), seq_len=16,
                      batch_size=2, steps=2, warmup_steps=0, progress=False, threads=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"train split has 16 of its 33 bytes, need at least 17"):
        fit(default_model_config("text", **MODEL), cfg)


def test_resume_without_a_log_file_starts_a_new_log(tmp_path):
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=4))
    (out / "train_log.jsonl").unlink()
    assert fit(None, _signal_cfg(out, resume=True)).step == 6
    assert [e["step"] for e in _log_lines(out)] == [6, 6]  # the train line and the eval at the end


def test_truncate_log_drops_lines_without_a_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"loss": 2.0}\n[3]\n7\n{"step": 2, "eval": {}}\n{"step": 9}\n')
    train_mod._truncate_log(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n'


def test_out_below_an_executable_file_is_refused_before_training(tmp_path):
    """The check names --out also when the blocking file is executable (os.access alone
    would pass it as root, and the run would fail later with an OSError)."""
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with pytest.raises(
        ValueError, match=r"^out: cannot create .*tool/ckpt: .*tool is not a writable directory$"
    ):
        fit(_signal_model(), _signal_cfg(exe / "ckpt"))


def test_seeds_of_pairs_whose_digits_concatenate_alike_differ():
    """(rank 1, step 23) and (rank 12, step 3) are different batches: the seed parts are kept
    apart, so their digits running together cannot make two steps draw the same batch."""
    assert derived_seed(0, "train", 1, 23) != derived_seed(0, "train", 12, 3)
    assert derived_seed(1, "eval") != derived_seed(1, "ev", "al")
    b = Batches(_signal_cfg("unused"), None)
    assert not torch.equal(b.train(1, 23)[0], b.train(12, 3)[0])


@pytest.mark.parametrize("name", ["weight_decay", "grad_clip"])
def test_infinite_decay_or_clip_is_refused(name):
    """weight_decay and grad_clip must be finite (inf decay would wipe the weights; an
    infinite clip is no clip, which 0 already says)."""
    with pytest.raises(ValueError, match=f"^{name} must be non-negative and finite, got inf$"):
        TrainConfig(**{name: math.inf})


def test_signal_task_refuses_a_model_with_more_than_one_input_channel(tmp_path):
    """The signal task feeds one channel: d_input must be 1 even when d_output is."""
    cfg = SSMConfig(d_input=2, d_output=1, d_model=8)
    with pytest.raises(ValueError, match=r"got d_input=2, d_output=1"):
        check_model_for_task(cfg, "signal")
    with pytest.raises(ValueError, match=r"d_input=2"):
        fit(cfg, _signal_cfg(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_eval_batches_are_distinct_from_each_other_and_the_same_each_time():
    """An evaluation averages `eval_batches` different batches (not one batch repeated), and
    every evaluation uses the same ones."""
    b = Batches(_signal_cfg("unused", eval_batches=3), None)
    first, again = b.eval(), b.eval()
    assert len(first) == 3
    for i in range(3):
        assert torch.equal(first[i][0], again[i][0]) and torch.equal(first[i][1], again[i][1])
        for j in range(i):
            assert not torch.equal(first[i][0], first[j][0]), (i, j)


def test_only_global_rank_0_is_the_main_process(monkeypatch):
    """Multi-node: the first process of a second node has LOCAL_RANK 0 but RANK 2; it must not
    write logs or checkpoints (only global rank 0 does)."""
    assert not DistInfo(world_size=4, rank=2, local_rank=0).is_main
    assert DistInfo(world_size=4, rank=0, local_rank=0).is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not DistInfo.from_env().is_main


def test_resume_may_change_eval_every(tmp_path):
    """eval_every only says when to report: a resumed run may change it. Stopped at 3 with
    eval_every 3 (eval at 3), resumed to 6 with eval_every 2: evals at 4 and 6."""
    out = tmp_path / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3, eval_every=3))
    resumed = fit(None, _signal_cfg(out, resume=True, eval_every=2))
    assert resumed.step == 6
    assert [e["step"] for e in _log_lines(out) if "eval" in e] == [3, 4, 6]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A signal run stopped at step 3 of 6 (lr 2e-3, ssm_lr 1e-3: the defaults)."""
    out = tmp_path_factory.mktemp("stopped") / "o"
    fit(_signal_model(), _signal_cfg(out, stop_after=3))
    return out


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", 3e-3),
        ("ssm_lr", 5e-4),
        ("weight_decay", 0.2),
        ("warmup_steps", 2),
        ("min_lr_ratio", 0.5),
        ("grad_clip", 0.5),
        ("batch_size", 3),
    ],
)
def test_resume_refuses_a_changed_optimizer_or_batch_setting(stopped_run, name, value):
    """Learning rates, decay, warm-up, the schedule's floor, the clip and the batch size change
    what the run computes: a resume that changes one is refused naming it, and the
    checkpoint stays at its step."""
    saved = _signal_cfg(stopped_run).to_dict()[name]
    want = f"{name}={value!r} (saved: {saved!r})"
    with pytest.raises(ValueError, match=re.escape(want)):
        fit(None, _signal_cfg(stopped_run, resume=True, **{name: value}))
    assert json.loads((stopped_run / "config.json").read_text())["step"] == 3


def test_the_optimizer_sees_gradients_clipped_to_grad_clip(tmp_path, monkeypatch):
    """With grad_clip 0.01 and larger raw gradients, the gradient norm at each optimizer step
    is min(raw norm, 0.01), measured independently at the optimizer (raw norm: the logged
    grad_norm, before clipping)."""
    at_step = []
    real = train_mod.make_optimizer

    def spy(net, cfg):
        opt, sched = real(net, cfg)

        def hook(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
            at_step.append(torch.linalg.vector_norm(norms).item())

        opt.register_step_pre_hook(hook)
        return opt, sched

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    clip = 0.01
    fit(_signal_model(), _signal_cfg(tmp_path / "o", steps=4, log_every=1, grad_clip=clip))
    raw = [e["grad_norm"] for e in _log_lines(tmp_path / "o") if "loss" in e]
    assert len(raw) == len(at_step) == 4
    assert all(r > clip for r in raw)  # every step needed clipping
    assert at_step == pytest.approx([min(r, clip) for r in raw], rel=1e-4)


def _copy(run, to):
    shutil.copytree(run, to)
    return to


def test_resume_refuses_a_training_state_that_does_not_fit_its_model(stopped_run, tmp_path):
    # another run's train_state.pt at the same step had failed deep inside AdamW at the first
    # step; a damaged one with a KeyError; config.json's train_state null with a TypeError
    other = tmp_path / "other"
    fit(_signal_model(d_model=16), _signal_cfg(other, stop_after=3))
    out = _copy(stopped_run, tmp_path / "o")
    shutil.copy(other / "train_state.pt", out / "train_state.pt")
    with pytest.raises(ValueError, match=r"train_state.pt does not fit the checkpoint's model"):
        fit(None, _signal_cfg(out, resume=True))
    for damaged in ({"optimizer": {}}, {"scheduler": {}}):
        state = torch.load(stopped_run / "train_state.pt", weights_only=True)
        torch.save({**state, **damaged}, out / "train_state.pt")
        with pytest.raises(ValueError, match=r"does not fit the checkpoint's model \(KeyError"):
            fit(None, _signal_cfg(out, resume=True))
    shutil.copy(stopped_run / "train_state.pt", out / "train_state.pt")
    meta = json.loads((out / "config.json").read_text())
    for name in (None, 5, "", "../o/train_state.pt"):
        (out / "config.json").write_text(json.dumps({**meta, "train_state": name}))
        with pytest.raises(ValueError, match=f"train_state {re.escape(repr(name))} is not a file"):
            fit(None, _signal_cfg(out, resume=True))
    assert json.loads((stopped_run / "config.json").read_text())["step"] == 3


def test_resume_drops_a_log_line_that_is_not_utf8(stopped_run, tmp_path, caplog):
    out = _copy(stopped_run, tmp_path / "o")
    with (out / "train_log.jsonl").open("ab") as f:
        f.write(b'{"step": 1, "x": "\xff"}\n')  # well-formed JSON, one byte not UTF-8
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        assert fit(None, _signal_cfg(out, resume=True)).step == 6
    assert any("dropping unreadable log line" in r.getMessage() for r in caplog.records)
    assert b"\xff" not in (out / "train_log.jsonl").read_bytes()
    assert _log_lines(out) and not [e for e in _log_lines(out) if "x" in e]


def test_every_save_records_the_process_count_and_a_resume_with_another_warns(
    stopped_run, tmp_path, caplog
):
    # torchrun's processes each take batch_size: resumed with another count, the global batch
    # changes, which the run says (as for another device)
    assert json.loads((stopped_run / "config.json").read_text())["world_size"] == 1
    out = _copy(stopped_run, tmp_path / "o")
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "world_size": 2}))
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        assert fit(None, _signal_cfg(out, resume=True)).step == 6
    said = [r.getMessage() for r in caplog.records if "process(es)" in r.getMessage()]
    assert len(said) == 1 and "with 1 process(es), saved with 2" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
        fit(None, _signal_cfg(_copy(stopped_run, tmp_path / "o2"), resume=True))
    assert not [r for r in caplog.records if "process(es)" in r.getMessage()]


def test_cli_resume_takes_the_runs_own_model_flags(tmp_path, caplog):
    # --heads 3 with the checkpoint's d_model 6 had been checked against the default d_model
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "4"]
    argv += ["--warmup-steps", "1", "--batch-size", "2", "--no-progress", "--threads", "1"]
    argv += ["--out", str(tmp_path / "o")]
    model = ["--d-model", "6", "--heads", "3", "--n-layers", "1", "--d-state", "4"]
    assert main([*argv, *model, "--stop-after", "2"]) == 0
    assert main([*argv, "--resume", "--heads", "3"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["step"] == 4


def test_cli_a_save_that_fails_says_so_in_one_line_and_leaves_no_partial_file(
    tmp_path, monkeypatch, caplog
):
    # torch.save reports a full disk as a RuntimeError: exit 1 with one line, no *.tmp left
    def full_disk(obj, path):
        Path(path).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25280")

    monkeypatch.setattr(train_mod.torch, "save", full_disk)
    argv = ["--task", "signal", "--rate", "4", "--duration", "8", "--steps", "2"]
    argv += ["--warmup-steps", "1", "--batch-size", "2", "--no-progress", "--threads", "1"]
    argv += ["--d-model", "8", "--n-layers", "1", "--d-state", "4", "--out", str(tmp_path / "o")]
    with caplog.at_level(logging.ERROR, logger=train_mod.__name__):
        assert main(argv) == 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == [
        f"ssmstream train: cannot write the checkpoint to {tmp_path / 'o'}: [enforce fail at "
        "inline_container.cc:672] . unexpected pos 25280"
    ]
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_resume_of_a_checkpoint_saved_before_world_size_was_recorded(stopped_run, tmp_path, caplog):
    # the count was then only in a multi-process run's last save (ddp.world_size); without
    # either key it is not known, and nothing is said
    out = _copy(stopped_run, tmp_path / "o")
    meta = json.loads((out / "config.json").read_text())
    del meta["world_size"]
    for ddp, warned in ((None, False), ({"world_size": 1}, False), ({"world_size": 2}, True)):
        (out / "config.json").write_text(json.dumps({**meta, **({"ddp": ddp} if ddp else {})}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=train_mod.__name__):
            train_mod._resume(out, None, _signal_cfg(out, resume=True), torch.device("cpu"), 1)
        said = [r.getMessage() for r in caplog.records if "process(es)" in r.getMessage()]
        if warned:
            assert len(said) == 1 and "with 1 process(es), saved with 2" in said[0]
        else:
            assert said == []


def _files(out: Path) -> dict:
    """Every file of a run directory: its bytes and modification time."""
    return {
        p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


SIGNAL_ARGV = [
    "--task", "signal", "--rate", "4", "--duration", "8", "--steps", "6", "--warmup-steps", "1",
    "--batch-size", "2", "--log-every", "2", "--eval-every", "3", "--eval-batches", "1",
    "--no-progress", "--threads", "1", "--resume",
]  # fmt: skip  # _signal_cfg's run


def test_resume_with_a_stop_after_before_the_checkpoint_is_refused_changing_nothing(
    stopped_run, tmp_path, capsys
):
    """The run stopped at 3: --stop-after 2 cannot be met (the log said "steps 3 → 2", the
    command succeeded and the log was rewritten without its torn last line)."""
    out = _copy(stopped_run, tmp_path / "o")
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.0\n')  # a torn line, which a resume drops
    before = _files(out)

    def refusal(stop_after):
        return (
            f"cannot resume {out}: stop_after={stop_after} is before its checkpoint's step 3 "
            "(a resumed run goes on from there); pass a later --stop-after or leave it out"
        )

    for stop_after in (1, 2):
        with pytest.raises(ValueError) as e:
            fit(None, _signal_cfg(out, resume=True, stop_after=stop_after))
        assert str(e.value) == refusal(stop_after)
        assert _files(out) == before
    assert main([*SIGNAL_ARGV, "--out", str(out), "--stop-after", "2"]) == 2
    said = refusal(2).replace("stop_after=2", "--stop-after 2")  # the CLI says the flag
    assert capsys.readouterr().err == f"ssmstream train: error: {said}\n"
    assert _files(out) == before


@pytest.mark.parametrize("complete", [False, True], ids=["at-its-stop-after", "complete"])
def test_resume_at_the_step_it_would_stop_at_does_nothing(stopped_run, tmp_path, caplog, complete):
    """At its --stop-after (3), or complete (--steps 6): one line says there is nothing to
    do, and no file of the run changes (the log was rewritten)."""
    out = _copy(stopped_run, tmp_path / "o")
    if complete:
        assert fit(None, _signal_cfg(out, resume=True)).step == 6
    step, stop_after = (6, None) if complete else (3, 3)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.0\n')
    before = _files(out)
    caplog.clear()  # the completing run's lines (logged where an earlier test set INFO)
    with caplog.at_level(logging.INFO, logger=train_mod.__name__):
        assert fit(None, _signal_cfg(out, resume=True, stop_after=stop_after)).step == step
        argv = [*SIGNAL_ARGV, "--out", str(out)]
        assert main(argv + (["--stop-after", "3"] if stop_after else [])) == 0
    said = [r.getMessage() for r in caplog.records if r.name == train_mod.__name__]
    nothing = f"{out} is at step {step} of 6 already: nothing to do"
    assert said == [nothing, nothing, f"checkpoint at step {step}: {out}"]
    assert _files(out) == before


def test_resume_of_an_older_checkpoint_with_fewer_steps_names_steps(stopped_run, tmp_path):
    """A checkpoint saved before its training config was recorded takes another --steps: one
    before the checkpoint's step is refused naming steps, not the --stop-after not given."""
    out = _copy(stopped_run, tmp_path / "o")
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "train": None}))
    before = _files(out)
    with pytest.raises(ValueError) as e:
        fit(None, _signal_cfg(out, resume=True, steps=2))
    assert str(e.value) == (
        f"cannot resume {out}: steps=2 is before its checkpoint's step 3 (a resumed run goes "
        "on from there); pass the run's --steps"
    )
    assert _files(out) == before
