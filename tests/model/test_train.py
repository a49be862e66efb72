"""model/train.py: a short run lowers the loss, checkpoints + resume, optimizer groups,
schedule, the CLI and its errors.

Independent references: the val loss is recomputed here over the whole val split (not
the trainer's eval windows) and compared with an untrained network and with the
uniform predictor ln 256; the schedule is compared with its closed form; a resumed run
is compared with an uninterrupted one weight by weight.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint
from ssmstream.model.data import default_corpus_dir, load_text
from ssmstream.model.train import (
    TrainConfig,
    default_model_config,
    fit,
    lr_factor,
    main,
    make_optimizer,
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
        (["--warmup-steps", "10", "--steps", "5"], "warmup_steps=10 must be smaller"),
        (["--lr", "-1"], "lr must be positive"),
        (["--val-fraction", "1.5"], "val_fraction must be in"),
        (["--d-state", "3"], "d_state"),
        (["--heads", "5"], "heads"),
        (["--discretization", "rk4"], "invalid choice: 'rk4'"),
        (["--task", "signal", "--rate", "2", "--freq-max", "1.5"], "Nyquist"),
        (["--task", "signal", "--target", "square"], "invalid choice: 'square'"),
        (["--data"], "expected at least one argument"),
        # not finite: these had passed the checks, then crashed or diverged with a traceback
        (["--lr", "inf"], "lr must be positive and finite"),
        (["--ssm-lr", "inf"], "ssm_lr must be positive and finite"),
        (["--grad-clip", "nan"], "grad_clip must be non-negative and finite"),
        (["--weight-decay", "nan"], "weight_decay must be non-negative and finite"),
        (["--dt-max", "inf"], "dt_max"),
        (["--task", "signal", "--rate", "inf"], "rate must be positive and finite"),
        (["--task", "signal", "--duration", "inf"], "duration must be positive and finite"),
        (["--task", "signal", "--rate", "1e308", "--duration", "10"], "duration · rate"),
        (["--task", "signal", "--target", "next", "--horizon", "inf"], "horizon must be"),
    ],
)
def test_cli_rejects_bad_flags(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert e.value.code == 2
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
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--out", str(result.checkpoint)], "already holds a checkpoint"),
        (["--resume", "--out", str(tmp_path / "nothing")], "cannot resume"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
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
        with pytest.raises(SystemExit):
            main([*argv, "--no-progress", "--seq-len", "16"])
        assert message in capsys.readouterr().err, argv
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


def test_cli_stop_and_resume(corpus, tmp_path):
    out = tmp_path / "c"
    argv = ["--data", str(corpus), "--out", str(out), "--steps", "6", "--warmup-steps", "1"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--d-model", "8", "--n-layers", "1"]
    argv += ["--d-state", "4", "--log-every", "1", "--threads", "1", "--no-progress"]
    assert main([*argv, "--stop-after", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 3
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.0\n')  # a torn last line
    # model flags are ignored on --resume: the checkpoint's config is used
    assert main([*argv, "--resume", "--d-model", "64"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 6
    assert load_checkpoint(out).cfg.d_model == 8
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]  # train lines + the eval at each stop
