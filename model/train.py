"""`ssmstream train`: train an SSMNetwork in convolutional mode.

    ssmstream train --out ckpt/                              # byte LM on the Python stdlib
    ssmstream train --task signal --rate 16 --out sig/       # regression on sinusoids
    torchrun --nproc-per-node 2 -m ssmstream.model.train ... # DistributedDataParallel

Optimizer: AdamW with two parameter groups,

    ssm    = each layer's ssm_parameters() (A, Δ, B):  lr = ssm_lr, weight decay 0
    other  = everything else: lr = lr, weight decay on matrices only (dim ≥ 2)

and one schedule for both: linear warm-up over `warmup_steps`, then cosine from 1 to
`min_lr_ratio` at `steps`,

    s(k) = (k + 1) / w                                 k < w   (step k = 0, 1, …)
    s(k) = m + (1 − m) · ½ (1 + cos(π (k − w) / (T − w)))   otherwise

Gradients are clipped to a global norm `grad_clip`. The loss is cross-entropy (text,
nats; bits per byte = loss / ln 2) or mean squared error (signal).

Determinism: the batch and the dropout masks of step k on rank r are drawn from seeds
derived from (seed, r, k), so `--resume` from a checkpoint at step k continues exactly
as an uninterrupted run would (same batches, restored AdamW + schedule state).

Distributed: when WORLD_SIZE > 1 (torchrun sets it, with RANK / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT) the network runs under DistributedDataParallel, gloo on
CPU and nccl on CUDA; `batch_size` is per process. Only rank 0 writes logs and
checkpoints and shows the progress bar.

Checkpoint directory (`--out`): config.json + model.safetensors (model/checkpoint.py),
train_log.jsonl (one JSON object per log or eval event) and train_state.pt (optimizer,
schedule, step), written at every `save_every` steps and at the end. A DDP run also
records every rank's final weight hash (`weights_sha256`) under "ddp" in config.json.

Dimension letters: B batch (per process), L sequence length, V vocabulary (256).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    open_new,
    read_checkpoint_meta,
    save_checkpoint,
)
from .data import (
    SIGNAL_TARGETS,
    VOCAB_SIZE,
    SignalConfig,
    TextData,
    load_text,
    signal_batch,
    text_batch,
)
from .flags import flag_of, said_of_flags
from .layers import INITS
from .network import SSMConfig, SSMNetwork, check_fields
from .ssm import METHODS

log = logging.getLogger(__name__)

TASKS = ("text", "signal")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_STATE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
MAX_THREADS = 1024  # more than any machine's cores; torch crashes at 10⁵ (runtime: providers)


def _help(text: str) -> dict:
    return {"help": text}


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite (the checkpoint keeps the last finite
    save: the weights are checked before each evaluation and save)."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} (try a lower --lr or --ssm-lr, or a smaller Δ: --dt-max; euler is only "
            "conditionally stable)"
        )


def _check_finite(net: nn.Module, step: int) -> None:
    bad = [name for name, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDiverged(f"training diverged: non-finite weights at step {step} ({names})")


@dataclass
class TrainConfig:
    """Everything about a training run except the network (that is SSMConfig)."""

    task: str = field(default="text", metadata=_help("text (byte LM, vocab 256) or signal"))
    out: str = field(default="ckpt", metadata=_help("checkpoint directory to write"))
    data: list[str] | None = field(
        default=None,
        metadata=_help("text files/directories (default: the Python stdlib's .py sources)"),
    )
    glob: str | None = field(
        default=None,
        metadata=_help("file-name pattern, at any depth in --data directories (default: all)"),
    )
    val_fraction: float = field(
        default=0.05,
        metadata=_help(
            "share of files held out for eval (of the bytes, the corpus's tail, when too few "
            "files leave a split empty)"
        ),
    )
    seq_len: int = field(default=256, metadata=_help("L, bytes per training window (text)"))
    batch_size: int = field(default=16, metadata=_help("B, sequences per step and process"))
    steps: int = field(default=1000, metadata=_help("length of the schedule in optimizer steps"))
    stop_after: int | None = field(
        default=None,
        metadata=_help("stop (with a checkpoint) after this step; continue with --resume"),
    )
    lr: float = field(default=2e-3, metadata=_help("peak learning rate of non-SSM parameters"))
    ssm_lr: float = field(default=1e-3, metadata=_help("peak learning rate of A, Δ, B"))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW decay of weight matrices"))
    warmup_steps: int = field(default=50, metadata=_help("linear warm-up steps"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("final lr as a fraction of peak"))
    grad_clip: float = field(default=1.0, metadata=_help("global gradient-norm clip (0: off)"))
    log_every: int = field(default=10, metadata=_help("steps between train_log lines"))
    eval_every: int = field(default=250, metadata=_help("steps between evaluations"))
    eval_batches: int = field(default=8, metadata=_help("batches per evaluation"))
    save_every: int | None = field(
        default=None, metadata=_help("steps between checkpoints (default: --eval-every)")
    )
    resume: bool = field(
        default=False,
        metadata=_help(
            "continue the run saved in --out: training flags not given take the run's saved "
            "values (but --stop-after); its model config is used (model flags that differ are "
            "ignored, with a warning)"
        ),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda"))
    seed: int = field(default=0, metadata=_help("seed of init, batches and dropout"))
    threads: int | None = field(
        default=None, metadata=_help("torch CPU threads (default: torch's)")
    )
    progress: bool = field(default=True, metadata=_help("show a tqdm progress bar"))
    signal: SignalConfig = field(default_factory=SignalConfig)

    def __post_init__(self):
        if isinstance(self.signal, dict):
            self.signal = SignalConfig(**self.signal)
        check_fields(
            self,
            ints=("seq_len", "batch_size", "steps", "stop_after", "warmup_steps", "log_every",
                  "eval_every", "eval_batches", "save_every", "seed", "threads"),
            floats=("val_fraction", "lr", "ssm_lr", "weight_decay", "min_lr_ratio", "grad_clip"),
            bools=("resume", "progress"),
        )  # fmt: skip
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {DEVICES}")
        positive = ("seq_len", "batch_size", "steps", "log_every", "eval_every", "eval_batches")
        for name in positive + ("save_every", "stop_after", "threads"):
            value = getattr(self, name)
            if (name in positive or value is not None) and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("lr", "ssm_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:  # also refuses NaN
                raise ValueError(
                    f"{name} must be non-negative and finite, got {getattr(self, name)}"
                )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ValueError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be smaller than steps={self.steps}"
            )
        if self.glob is not None and "/" in self.glob:  # it would match no file, at any depth
            raise ValueError(
                f"glob: {self.glob!r} holds a '/': the pattern is matched against file names, "
                "at any depth below the --data directories (e.g. '*.txt')"
            )
        if self.data is not None and not self.data:
            raise ValueError("data must name at least one file or directory")
        if self.data is not None and not all(str(d).strip() for d in self.data):
            raise ValueError(f"data: an empty path would read the working directory: {self.data}")
        if not str(self.out).strip():
            raise ValueError("out must name a directory, got an empty string")

    @property
    def length(self) -> int:
        """L of a training sequence for this task."""
        return self.seq_len if self.task == "text" else self.signal.length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `fit` returns: the trained network (unwrapped, eval mode) and where it is saved."""

    net: SSMNetwork
    checkpoint: Path
    step: int
    last_eval: dict | None


def default_model_config(task: str, **overrides) -> SSMConfig:
    """The network for a task: vocab 256 for text, d_input = d_output = 1 for signal."""
    if task == "text":
        return SSMConfig(vocab_size=VOCAB_SIZE, **overrides)
    if task == "signal":
        return SSMConfig(d_input=1, d_output=1, **overrides)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def check_model_for_task(cfg: SSMConfig, task: str) -> None:
    """A clear error when the network cannot be trained on the task."""
    if task == "text" and (cfg.vocab_size != VOCAB_SIZE or cfg.d_output != VOCAB_SIZE):
        raise ValueError(
            f"task 'text' needs a token model with vocab_size = d_output = {VOCAB_SIZE}, "
            f"got vocab_size={cfg.vocab_size}, d_output={cfg.d_output}"
        )
    if task == "signal" and (cfg.d_input != 1 or cfg.d_output != 1):
        raise ValueError(
            f"task 'signal' needs d_input = d_output = 1, got d_input={cfg.d_input}, "
            f"d_output={cfg.d_output}"
        )


# --- pieces -----------------------------------------------------------------------------


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple, stable across processes and machines."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warm-up + cosine multiplier s(k) of the module docstring (k = optimizer steps done)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(net: SSMNetwork, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: SSM (A, Δ, B; own lr, no decay), decayed matrices, the rest undecayed."""
    ssm_ids = {id(p) for layer in net.ssms for p in layer.ssm_parameters()}
    ssm, decay, no_decay = [], [], []
    for p in net.parameters():
        if id(p) in ssm_ids:
            ssm.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"name": "ssm", "params": ssm, "lr": cfg.ssm_lr, "weight_decay": 0.0},
        {"name": "decay", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
    ]


def make_optimizer(
    net: SSMNetwork, cfg: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    groups = [g for g in param_groups(net, cfg) if g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    return opt, sched


def loss_fn(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in nats (text: out [B, L, V], y int64 [B, L]) or MSE (signal)."""
    if task == "text":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.mse_loss(out, y)


class Batches:
    """Training and evaluation batches of a task; batch k of rank r depends on (seed, r, k)."""

    def __init__(self, cfg: TrainConfig, text: TextData | None):
        self.cfg, self.text = cfg, text

    def get(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        if cfg.task == "text":
            return text_batch(self.text.split(split), cfg.batch_size, cfg.seq_len, generator)
        return signal_batch(cfg.signal, cfg.batch_size, generator)

    def train(self, rank: int, step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "train", rank, step))
        return self.get("train", g)

    def eval(self) -> list[tuple[Tensor, Tensor]]:
        """The same `eval_batches` batches at every evaluation, so evals are comparable."""
        g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "eval"))
        return [self.get("val", g) for _ in range(self.cfg.eval_batches)]


@torch.no_grad()
def evaluate(net: SSMNetwork, task: str, batches: list[tuple[Tensor, Tensor]], device) -> dict:
    """Mean loss over the batches (+ bits per byte for text); leaves `net` in its mode."""
    was_training = net.training
    net.eval()
    total = 0.0
    for x, y in batches:
        total += loss_fn(task, net(x.to(device)), y.to(device)).item()
    net.train(was_training)
    loss = total / len(batches)
    return {"loss": loss, "bpb": loss / math.log(2)} if task == "text" else {"loss": loss}


# --- distributed ------------------------------------------------------------------------


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world_size 1 without torchrun)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        env = os.environ
        return cls(
            int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# --- checkpoints ------------------------------------------------------------------------


def _save(
    out: Path,
    net: SSMNetwork,
    opt,
    sched,
    step: int,
    cfg: TrainConfig,
    last_eval: dict | None,
    world_size: int,
    ddp: dict | None = None,
) -> None:
    """The checkpoint whose config.json names its step, with the optimizer state (one commit:
    an interrupted save leaves the previous checkpoint whole)."""
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    extra = {
        "step": step,
        "task": cfg.task,
        "train": _as_saved(cfg.to_dict()),
        "train_state": TRAIN_STATE,
        "eval": last_eval,
        "world_size": world_size,  # processes (torchrun): the global batch is batch_size × it
    }
    if ddp is not None:
        extra["ddp"] = ddp
    save_checkpoint(net, out, extra=extra, also={TRAIN_STATE: lambda p: torch.save(state, p)})


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from. The log is written anew:
    a link at its name is replaced, not written through (a symbolic one is not read either)."""
    if path.is_symlink():
        log.warning("%s is a symbolic link, not followed: the log starts anew", path)
        lines = []
    elif not path.is_file():
        return
    else:
        lines = path.read_bytes().splitlines()
    keep = []
    for raw in lines:
        try:
            line = raw.decode()  # a byte that is not UTF-8 makes the line unreadable
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # ValueError: not UTF-8, not JSON
            shown = raw.decode(errors="replace")[:80]
            log.warning("%s: dropping unreadable log line %r", path, shown)
    with open_new(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


# what a resumed run may change: where and how it reports, and where it runs (device and
# threads compute the same numbers up to the order of float sums: bit-identity to one long
# run needs the same ones, and a change is logged)
RUN_ON = ("device", "threads")
RESUME_MAY_CHANGE = frozenset(
    {"out", "stop_after", "log_every", "eval_every", "eval_batches", "save_every", "resume",
     "progress", *RUN_ON}
)  # fmt: skip


def _as_saved(train: dict) -> dict:
    """A run's training config as its checkpoint records it and a resume compares it: --data
    paths absolute, so that a resume from another working directory reads the same files (a
    checkpoint that recorded them relative is read from the working directory, as before)."""
    data = train.get("data")
    if isinstance(data, list) and all(isinstance(p, (str, os.PathLike)) for p in data):
        train = {**train, "data": [os.path.abspath(p) for p in data]}
    return train


def _moved(saved_data) -> bool:
    """Whether a run's saved --data paths (a list) all no longer exist: its corpus moved (or
    was deleted), and a resume may name where it is now."""
    return (
        bool(saved_data)
        and isinstance(saved_data, list)
        and not any(os.path.exists(p) for p in saved_data)
    )


def _run_in_brief(cfg: TrainConfig) -> str:
    """The flags that say what a run learns from and for how long, as given or defaulted."""
    said = [f"--task {cfg.task}"]
    if cfg.task == "text":
        data = " ".join(map(str, cfg.data)) if cfg.data else "(the standard library's sources)"
        said += [f"--data {data}", f"--seq-len {cfg.seq_len}"]
    return ", ".join([*said, f"--steps {cfg.steps}"])


def _resume(
    out: Path, model_cfg: SSMConfig | None, cfg: TrainConfig, device, world_size: int
) -> tuple[SSMNetwork, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, int]:
    """The checkpoint's network, optimizer and schedule as saved, and its step."""
    meta = read_checkpoint_meta(out)
    saved = meta.get("train")
    if not isinstance(saved, dict):  # save_checkpoint's own, or a hand-made config.json
        log.warning(
            "resuming %s: its config.json records no training flags, so none are checked or "
            "carried over: the run continues with the flags given and the defaults of the "
            "others (%s): pass the run's own",
            out, _run_in_brief(cfg),
        )  # fmt: skip
    if isinstance(saved, dict):  # the run continues exactly only with the same schedule/data
        now, saved = _as_saved(cfg.to_dict()), _as_saved(saved)
        differ = sorted(
            k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]
        )
        if "data" in differ and _moved(saved["data"]):
            differ.remove("data")  # the saved paths are gone: the corpus moved to the given ones
            log.warning(
                "resuming %s: its --data %s no longer exists; reading %s as the same corpus",
                out,
                " ".join(saved["data"]),
                " ".join(now["data"] or ()),
            )
        if differ:
            got = ", ".join(f"{k}={now[k]!r} (saved: {saved[k]!r})" for k in differ)
            raise ValueError(
                f"cannot resume {out}: {got}; a resumed run keeps its schedule and data: leave "
                "these out (the command line takes the saved values) or pass the saved ones "
                "(use --stop-after to stop a run early and --resume to continue it)"
            )
        if moved := [k for k in RUN_ON if k in saved and saved[k] != now[k]]:
            log.warning(
                "resuming %s with other %s (%s): the run continues, but float sums may round "
                "differently, so it is no longer bit-identical to one long run",
                out,
                " and ".join(moved),
                ", ".join(f"{k}={now[k]!r}, saved {saved[k]!r}" for k in moved),
            )
    # runs saved before the key existed recorded it only in a multi-process run's last save
    saved_world = meta.get("world_size") or (meta.get("ddp") or {}).get("world_size")
    if saved_world is not None and saved_world != world_size:
        log.warning(
            "resuming %s with %d process(es), saved with %s: the run continues with a global "
            "batch of %d × batch_size, so not as one long run would",
            out, world_size, saved_world, world_size,
        )  # fmt: skip
    net = load_checkpoint(out).to(device).train()
    if model_cfg is not None and model_cfg.to_dict() != net.cfg.to_dict():
        log.warning("resuming %s: its model config is used, not the one given", out)
    name = meta.get("train_state", TRAIN_STATE)
    if not (isinstance(name, str) and name and Path(name).name == name):
        raise ValueError(
            f"cannot resume: {out / 'config.json'}: train_state {name!r} is not a file name"
        )
    state_file = out / name
    if not state_file.is_file():
        raise ValueError(f"cannot resume: {state_file} is missing")
    try:
        state = torch.load(state_file, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a torch file, objects weights_only refuses
        state, why = None, f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0]}"
    else:
        why = "not a training state"
    if not (isinstance(state, dict) and {"step", "optimizer", "scheduler"} <= state.keys()):
        raise ValueError(
            f"cannot resume: {state_file} is not readable ({why}); resume from a complete "
            "checkpoint, or start a new --out"
        )
    if state["step"] != meta.get("step"):
        raise ValueError(
            f"cannot resume: {state_file} is at step {state['step']} but config.json "
            f"at step {meta.get('step')}"
        )
    opt, sched = make_optimizer(net, cfg)
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _check_optimizer_state(opt)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(
            f"cannot resume: {state_file} does not fit the checkpoint's model "
            f"({e.__class__.__name__}: {e}); resume from a complete checkpoint, or start a "
            "new --out"
        ) from e
    return net, opt, sched, state["step"]


def _check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Each parameter's saved moments have its shape (load_state_dict does not check; another
    model's state would fail at the first step, deep inside the optimizer)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ValueError(
                        f"optimizer state {key!r} of shape {tuple(v.shape)} for a parameter of "
                        f"shape {tuple(p.shape)}"
                    )


# --- the loop ---------------------------------------------------------------------------


def fit(model_cfg: SSMConfig | None, train_cfg: TrainConfig) -> TrainResult:
    """Train (or resume) and checkpoint; see the module docstring. Returns the result.

    `train_cfg.threads` applies for the duration of the call (torch's count is restored).
    """
    threads_before = torch.get_num_threads()
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    try:
        return _fit(model_cfg, train_cfg)
    finally:
        torch.set_num_threads(threads_before)


def _fit(model_cfg: SSMConfig | None, cfg: TrainConfig) -> TrainResult:
    dist = DistInfo.from_env()
    device = resolve_device(cfg.device, dist)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; give a directory for the checkpoint")
    if cfg.resume and not (out / "config.json").is_file():
        raise ValueError(f"cannot resume: {out} holds no checkpoint (config.json missing)")
    if cfg.resume:
        read_checkpoint_meta(out)  # CheckpointError (another version, bad JSON) before the data
    if not cfg.resume and (out / "config.json").is_file():
        raise ValueError(
            f"{out} already holds a checkpoint: continue it with --resume, or give another --out"
        )
    _check_creatable(out)  # before the slow parts, and without making anything yet
    if not cfg.resume:
        model_cfg = model_cfg if model_cfg is not None else default_model_config(cfg.task)
        check_model_for_task(model_cfg, cfg.task)
        check_fits(model_cfg, device)
    text = None
    if cfg.task == "signal" and cfg.data is not None:
        log.warning("task 'signal' generates its data: data=%s is ignored", cfg.data)
    if cfg.task == "text":
        text = load_text(cfg.data, cfg.glob, cfg.val_fraction, min_bytes=cfg.seq_len + 1)
    batches = Batches(cfg, text)

    own_group = dist.world_size > 1 and not torch_dist.is_initialized()
    if own_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # DDP imports torch.distributed.nn, whose functions take `group=group.WORLD` as a
        # default argument: imported after the group exists, they hold it for good, so
        # destroy_process_group cannot end gloo's threads, and one of them may drop a tensor
        # while the interpreter exits (std::terminate, SIGABRT). Imported first, they hold None.
        import torch.distributed.nn as _defaults  # noqa: F401 (`as`: no local name `torch`)

        torch_dist.init_process_group(backend, rank=dist.rank, world_size=dist.world_size)
        log.info("rank %d/%d: %s process group", dist.rank, dist.world_size, backend)
    try:
        result = _loop(model_cfg, cfg, dist, device, out, batches)
        if own_group:
            torch_dist.barrier()  # rank 0 has written its checkpoint
        return result
    finally:
        if own_group:
            torch_dist.destroy_process_group()


def _loop(model_cfg, cfg: TrainConfig, dist: DistInfo, device, out: Path, batches: Batches):
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    if cfg.resume:
        net, opt, sched, step = _resume(out, model_cfg, cfg, device, dist.world_size)
        check_model_for_task(net.cfg, cfg.task)
        if end < step:  # a run does not go back: refused, and nothing in `out` changes
            # steps can differ only from a checkpoint that did not record its training config
            said, fix = (
                (f"stop_after={cfg.stop_after}", "pass a later --stop-after or leave it out")
                if end == cfg.stop_after
                else (f"steps={cfg.steps}", "pass the run's --steps")
            )
            raise ValueError(
                f"cannot resume {out}: {said} is before its checkpoint's step {step} (a resumed "
                f"run goes on from there); {fix}"
            )
        if end == step:  # at its --stop-after, or complete: nothing changes in `out` either
            if dist.is_main:
                log.info("%s is at step %d of %d already: nothing to do", out, step, cfg.steps)
            return TrainResult(net.eval(), out, step, None)
    else:
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        net, step = SSMNetwork(model_cfg).to(device).train(), 0
        opt, sched = make_optimizer(net, cfg)
        if dist.is_main:
            _warn_of_growing_modes(net)
    model = net
    if dist.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)

    start = step
    save_every = cfg.save_every or cfg.eval_every
    log_path = out / LOG_FILE
    eval_batches = batches.eval() if dist.is_main else []
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            _truncate_log(log_path, step)
        elif os.path.lexists(log_path):  # a run stopped before its first checkpoint left it
            log.info("%s: replacing the log of an earlier run that saved no checkpoint", out)
            log_path.unlink()
        n_params = sum(p.numel() for p in net.parameters())
        log.info("%s: %d parameters, steps %d → %d on %s", out, n_params, step, end, device)
    tokens_per_step = cfg.batch_size * cfg.length * dist.world_size
    last_eval = None
    bar = tqdm(
        total=end, initial=step, disable=not (dist.is_main and cfg.progress), dynamic_ncols=True
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_window, t_window = 0, 0.0
    # log lines go above the progress bar instead of through it; the bar is closed however
    # the loop ends (Ctrl-C: the line that says so goes below it, not into it)
    with bar, logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
        while step < end:
            t0 = time.perf_counter()
            torch.manual_seed(derived_seed(cfg.seed, "dropout", dist.rank, step))
            x, y = batches.train(dist.rank, step)
            loss = loss_fn(cfg.task, model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            )
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.detach()
            n_window += 1
            if step % cfg.log_every == 0 or step == end:
                if dist.world_size > 1:
                    torch_dist.all_reduce(loss_sum)
                    loss_sum /= dist.world_size
                mean_loss = loss_sum.item() / n_window  # (syncs the device)
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"training diverged: loss {mean_loss} at step {step}")
                t_window += time.perf_counter() - t0
                tok_s = tokens_per_step * n_window / t_window
                entry = {
                    "step": step,
                    "loss": mean_loss,
                    "lr": opt.param_groups[-1]["lr"],
                    "ssm_lr": opt.param_groups[0]["lr"],
                    "tokens_per_s": tok_s,
                }
                if grad_norm is not None:
                    entry["grad_norm"] = float(grad_norm)
                if dist.is_main:
                    _append(log_path, entry)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                n_window, t_window = 0, 0.0
            else:
                t_window += time.perf_counter() - t0
            bar.update(1)
            if step % cfg.eval_every == 0 or step % save_every == 0 or step == end:
                _check_finite(net, step)  # every rank (DDP: the same weights), before a save
            if dist.is_main and (step % cfg.eval_every == 0 or step == end):
                last_eval = evaluate(net, cfg.task, eval_batches, device)
                _append(log_path, {"step": step, "eval": last_eval})
                log.info("step %d: eval %s", step, _fmt(last_eval))
            if dist.is_main and step % save_every == 0 and step < end:
                _save(out, net, opt, sched, step, cfg, last_eval, dist.world_size)
    bar.close()
    if step > start:
        extra = _ddp_report(net, dist) if dist.world_size > 1 else None
        if dist.is_main:
            _save(out, net, opt, sched, step, cfg, last_eval, dist.world_size, extra)
    return TrainResult(net.eval(), out, step, last_eval)


def _warn_of_growing_modes(net: SSMNetwork) -> None:
    """A warning when modes grow at initialization (|Ā| > 1: forward Euler, or gbt with
    α < ½, at too large a Δ·|A|; docs/theory.md §2): short training windows may not show it,
    but such a model diverges over a long stream and `ssmstream export` refuses it."""
    n, modes, largest = net.growing_modes()
    if n:
        cfg = net.cfg
        limit = _stable_dt_limit(net)
        or_ = " or "
        if limit <= cfg.dt_min:  # e.g. the fastest S4D-Lin modes at the default --d-state
            or_ = (
                f" and --dt-min (now {cfg.dt_min:g}): every mode is stable only for "
                f"Δ < {limit:.3g}; or "
            )
        log.warning(
            "%d of %d modes grow at initialization (|Ā| up to %.3g > 1): --discretization %s%s "
            "is stable only for small Δ·|A|; the model may diverge, and one that keeps such "
            "modes cannot be exported: use a smaller --dt-max (now %g)%s%s",
            n, modes, largest,
            cfg.discretization, f" --alpha {cfg.alpha}" if cfg.discretization == "gbt" else "",
            cfg.dt_max, or_, SSMNetwork.A_STABLE,
        )  # fmt: skip


def _stable_dt_limit(net: SSMNetwork) -> float:
    """The largest Δ at which every mode of `net` is stable under gbt(α < ½) (forward Euler
    is α = 0): |Ā| < 1 ⇔ Δ < −2 Re A / ((1 − 2α)|A|²), docs/theory.md §2; inf otherwise."""
    cfg = net.cfg
    alpha = {"euler": 0.0, "gbt": cfg.alpha}.get(cfg.discretization, 1.0)
    if alpha >= 0.5:
        return math.inf
    limit = math.inf
    with torch.no_grad():
        for layer in net.ssms:
            re = torch.exp(layer.log_A_real.double())  # −Re A
            bound = 2 * re / ((1 - 2 * alpha) * (re**2 + layer.A_imag.double() ** 2))
            limit = min(limit, float(bound.min()))
    return limit


def weights_sha256(net: nn.Module) -> str:
    """sha256 over the state_dict: for each name in sorted order, the name (utf-8) then the
    tensor's float32 little-endian bytes."""
    h = hashlib.sha256()
    state = net.state_dict()
    for name in sorted(state):
        h.update(name.encode("utf-8"))
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _ddp_report(net: SSMNetwork, dist: DistInfo) -> dict:
    """Every rank's weight hash (collective); rank 0 stores them and warns if they differ."""
    hashes: list = [None] * dist.world_size
    torch_dist.all_gather_object(hashes, weights_sha256(net))
    if len(set(hashes)) != 1:
        log.warning("DDP ranks ended with different weights: %s", hashes)
    backend = str(torch_dist.get_backend())
    return {"world_size": dist.world_size, "backend": backend, "weights_sha256": hashes}


def _check_creatable(out: Path) -> None:
    """ValueError naming --out when its directory could not be made (nothing is made here:
    a refused command changes nothing)."""
    base = out.absolute()
    while not base.exists():
        if base.is_symlink():  # mkdir would fail on it with EEXIST
            raise ValueError(
                f"out: cannot create {out}: {base} is a symlink to {os.readlink(base)}, "
                "which does not resolve to a directory"
            )
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"out: cannot create {out}: {base} is not a writable directory")


def _append(path: Path, entry: dict) -> None:
    """One line added to the log, never through a symbolic link at its name (OSError)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT  # + not through a link, binary on Windows
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags, 0o666), "a") as f:
        f.write(json.dumps(entry) + "\n")


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in d.items())


def train(model_cfg: SSMConfig | None, train_cfg: TrainConfig) -> Path:
    """Train and return the checkpoint directory (`model_cfg` None → the task's default)."""
    return fit(model_cfg, train_cfg).checkpoint


# --- CLI: flags generated from the dataclass fields -------------------------------------

MODEL_HELP = {
    "d_model": "D, channels of every layer",
    "n_layers": "number of residual SSM blocks",
    "d_state": "N, real state numbers per head (N/2 complex modes; even)",
    "heads": "H SSMs per layer (default d_model: SISO; 1: MIMO)",
    "init": "initialization of A",
    "discretization": "discretization of the continuous SSM",
    "alpha": "GBT alpha (only with --discretization gbt)",
    "dt_min": "lower end of the log-uniform Δ init",
    "dt_max": "upper end of the log-uniform Δ init",
    "dropout": "dropout after the SSM and after the output projection",
    "glu": "GLU output projection (--no-glu: Linear)",
}
SIGNAL_HELP = {
    "rate": "samples per unit time",
    "duration": "signal length in time units (L = duration · rate)",
    "n_components": "sinusoids per signal",
    "freq_min": "lowest sinusoid frequency (cycles per unit time)",
    "freq_max": "highest sinusoid frequency (below rate / 2)",
    "target": "what to predict from the signal",
    "tau": "low-pass time constant / delay (time units)",
    "horizon": "look-ahead of --target next (time units; default one sample)",
}
CHOICES = {
    "task": TASKS,
    "device": DEVICES,
    "init": INITS,
    "discretization": METHODS,
    "target": SIGNAL_TARGETS,
}
_SKIP = {"vocab_size", "d_input", "d_output", "signal"}


def _add_fields(group, cls, helps: dict, defaults) -> None:
    """One flag per dataclass field: --field-name, typed from the annotation."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        flag = flag_of(f.name)
        default = getattr(defaults, f.name)
        text = helps.get(f.name) or f.metadata.get("help", "")
        kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kind = kind[0]
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="+", default=default, metavar="PATH", help=text)
        else:
            group.add_argument(
                flag,
                type=kind,
                default=default,
                choices=CHOICES.get(f.name),
                help=text,
            )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: …)' only where the default says something (not None / False / "")
    and the help text does not already state it ("(default …", "default: …", "; default …").
    (runtime/cli.py has the same for the runtime's commands: model imports no runtime.)"""

    def _get_help_string(self, action):
        states = any(w in (action.help or "") for w in ("(default", "default:", "; default"))
        if action.default is None or action.default is False or action.default == "" or states:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream train",
        usage="%(prog)s [options]",  # short: every flag would take 23 lines above an error
        description="Train an S4D-style SSM network in convolutional mode and write a "
        "checkpoint directory (config.json, model.safetensors, train_log.jsonl, "
        "train_state.pt). Under `torchrun --nproc-per-node N` it runs "
        "DistributedDataParallel (gloo on CPU, nccl on CUDA).",
        formatter_class=HelpFormatter,
    )
    _add_fields(p.add_argument_group("training"), TrainConfig, {}, TrainConfig())
    _add_fields(p.add_argument_group("model"), SSMConfig, MODEL_HELP, SSMConfig(vocab_size=256))
    sig = p.add_argument_group("signal task (--task signal)")
    _add_fields(sig, SignalConfig, SIGNAL_HELP, SignalConfig())
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[SSMConfig | None, TrainConfig]:
    """Map parsed flags onto (SSMConfig, TrainConfig); ValueError names a bad field. With
    --resume the model is the checkpoint's (None): its flags are not checked against the
    defaults of those not given."""
    pick = lambda cls: {  # noqa: E731
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in _SKIP
    }
    signal = SignalConfig(**pick(SignalConfig))
    train_cfg = TrainConfig(**pick(TrainConfig), signal=signal)
    if train_cfg.resume:
        return None, train_cfg
    return default_model_config(train_cfg.task, **pick(SSMConfig)), train_cfg


def model_flags_given(argv: list[str] | None, cls=SSMConfig) -> dict:
    """The flags of `cls`'s fields given on the command line (their defaults are not given),
    by field."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _SKIP]
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(names))
    args = probe.parse_args(sys.argv[1:] if argv is None else argv)
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _warn_of_flags_that_do_nothing(model_cfg: SSMConfig | None, cfg: TrainConfig, argv) -> None:
    """Flags given that this run does not use: the signal task's with --task text, --alpha
    with a discretization other than gbt."""
    unused = []
    if cfg.task != "signal":
        unused += [(k, "--task signal") for k in model_flags_given(argv, SignalConfig)]
    else:  # the text task's own flags (--data is warned of when the data is read)
        given = model_flags_given(argv, TrainConfig)
        unused += [(k, "--task text") for k in ("seq_len", "glob", "val_fraction") if k in given]
        signal = model_flags_given(argv, SignalConfig)
        if "horizon" in signal and cfg.signal.target != "next":
            unused.append(("horizon", "--target next"))
        if "tau" in signal and cfg.signal.target == "next":
            unused.append(("tau", "--target lowpass or delay"))
    if model_cfg is not None and model_cfg.discretization != "gbt":
        unused += [("alpha", "--discretization gbt")] if "alpha" in model_flags_given(argv) else []
    for name, only in unused:
        log.warning("%s: only for %s; ignored", flag_of(name), only)


# a resumed run's flags not given are the saved run's, but these: it runs to --steps unless
# told to stop again, and --out / --resume say what to resume
NOT_CARRIED_ON_RESUME = frozenset({"out", "resume", "stop_after"})


def _saved_flags_as_defaults(args: argparse.Namespace, argv) -> list[str]:
    """With --resume, the training (and signal-task) flags not given take the saved run's
    values, so that `--out DIR --resume` continues a run without its flags repeated; flags
    given are checked against the saved ones by fit. Returns the flags taken, by field."""
    try:
        saved = read_checkpoint_meta(Path(args.out)).get("train")
    except CheckpointError:
        return []  # nothing to resume, or a malformed checkpoint: fit says which
    if not isinstance(saved, dict):
        return []
    taken = []
    for cls, values in ((TrainConfig, saved), (SignalConfig, saved.get("signal"))):
        given = model_flags_given(argv, cls)
        for f in dataclasses.fields(cls):
            name = f.name
            if name in given or name in NOT_CARRIED_ON_RESUME or name in _SKIP:
                continue
            if isinstance(values, dict) and name in values and hasattr(args, name):
                if getattr(args, name) != values[name]:
                    setattr(args, name, values[name])
                    taken.append(name)
    return taken


def _warn_of_ignored_model_flags(out: Path, given: dict) -> None:
    """A resumed run keeps its checkpoint's model: warn of the model flags given that say
    otherwise (they are ignored)."""
    try:
        saved = read_checkpoint_meta(out)["model"]
    except CheckpointError:
        return  # no checkpoint to resume: fit says so
    if not isinstance(saved, dict):
        return  # a malformed config: fit says so
    differ = {k: v for k, v in given.items() if k in saved and saved[k] != v}
    if differ:
        got = ", ".join(f"{flag_of(k)} {v} (saved: {saved[k]!r})" for k, v in differ.items())
        log.warning(
            "resuming %s: ignoring %s: a resumed run keeps its checkpoint's model (train a new "
            "model into another --out to change it)",
            out,
            got,
        )


_FIELDS = [
    f.name
    for cls in (TrainConfig, SSMConfig, SignalConfig)
    for f in dataclasses.fields(cls)
    if f.name not in _SKIP
]


def _with_flags(message: str, values: bool = True, paths: tuple[str, ...] = ()) -> str:
    """A message about config fields said of their flags (`flags.said_of_flags`; `paths` are
    kept as they are)."""
    return said_of_flags(message, _FIELDS, values, paths=paths)


def _paths_given(cfg: TrainConfig) -> tuple[str, ...]:
    """The paths --out and --data gave, as the run's messages print them."""
    given = [cfg.out, *(cfg.data or ())]
    return tuple({*map(str, given), *(str(Path(p)) for p in given)})


# float32 copies of each parameter a training step holds: the weights, their gradients and
# AdamW's two moments
TRAIN_COPIES = 4


def machine_bytes() -> int | None:
    """This machine's memory (os.sysconf), or None where it is not known."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(model_cfg: SSMConfig, device: torch.device) -> None:
    """ValueError naming the model's flags when its parameters cannot fit in this machine's
    memory, before a module is built (an --n-layers of 2**70 would build layers until the
    machine ran out; what fits the machine but not the memory free now ends in train's
    out-of-memory error). On CPU a step holds TRAIN_COPIES of them; on CUDA the model is built
    in host memory first, one copy."""
    total = machine_bytes()
    if total is None:
        return
    n = model_cfg.n_parameters
    need = n * 4 * (TRAIN_COPIES if device.type == "cpu" else 1)
    if need > total:
        raise ValueError(
            f"not enough memory: a model of {_count(n)} parameters needs about "
            f"{_count(need / 2**30 if need < 2**1000 else need >> 30)} GiB to train, more than "
            f"this machine's {total / 2**30:,.1f} GiB: use a smaller --d-model, --n-layers or "
            "--d-state"
        )


def _count(x: int | float) -> str:
    """x in a message: 1,234 (a float to one decimal), or 10^k past 10^18 (a count of
    thousands of digits cannot be printed, nor one past 10^308 turned into a float)."""
    if x < 10**18:
        return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}"
    return f"10^{math.floor(math.log10(x))}"


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: MemoryError, torch's OutOfMemoryError (CUDA),
    or the RuntimeError of torch's CPU allocator ("can't allocate memory")."""
    oom = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def size_overflow(e: BaseException) -> bool:
    """Whether `e` is a size too large to allocate at all (a --batch-size of 2**62, a
    --d-model of 2**70): an OverflowError, or torch's RuntimeError / TypeError saying a size
    overflowed ("Storage size calculation overflowed", "Overflow when unpacking long", "an int
    that cannot be represented as a SymInt")."""
    said = str(e).lower()
    return isinstance(e, OverflowError) or (
        isinstance(e, (RuntimeError, TypeError))
        and ("overflow" in said or "cannot be represented" in said)
    )


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM during a run (a timeout, `docker stop`, a scheduler's preemption): a
    KeyboardInterrupt, so that what finishes its work before a Ctrl-C ends the run (the
    renames of a checkpoint being saved) does so before SIGTERM too, and the run ends saying
    where it can resume from."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _sigterm_stops_training():
    """SIGTERM raises TrainingStopped in the main thread (Python runs the handler between
    bytecodes, as it raises KeyboardInterrupt for SIGINT, so a checkpoint being saved is
    left whole: see save_checkpoint); a SIGTERM ignored when we started stays ignored, and
    the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    ):
        yield
        return

    def stop(signum, frame):
        raise TrainingStopped(signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def stopped_message(out: Path, signum: int) -> str:
    """What a stopped run leaves: the step of the checkpoint in `out` and the command that
    continues it, or that there is none yet (training steps after the last save are lost)."""
    name = signal.Signals(signum).name
    try:
        step = read_checkpoint_meta(out).get("step")
    except CheckpointError:
        step = None
    if not isinstance(step, int) or isinstance(step, bool):
        return f"stopped by {name} before the first checkpoint: {out} holds no run to resume"
    return (
        f"stopped by {name}; {out} holds the checkpoint of step {step}: continue with "
        f"`ssmstream train --out {shlex.quote(str(out))} --resume`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    dist = DistInfo.from_env()
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    taken = _saved_flags_as_defaults(args, argv) if args.resume else []
    if taken:
        log.info(
            "resuming %s with its saved %s",
            args.out,
            ", ".join(f"{flag_of(k)} {getattr(args, k)!r}" for k in taken),
        )
    try:
        model_cfg, train_cfg = configs_from_args(args)
    except ValueError as e:  # a flag's value, or flags that do not go together
        parser.error(_with_flags(str(e)))
    _warn_of_flags_that_do_nothing(model_cfg, train_cfg, argv)
    try:
        if train_cfg.resume:
            _warn_of_ignored_model_flags(Path(train_cfg.out), model_flags_given(argv))
        with _sigterm_stops_training():
            result = fit(model_cfg, train_cfg)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (TrainingStopped)
        signum = e.signum if isinstance(e, TrainingStopped) else signal.SIGINT
        if dist.is_main:
            said = stopped_message(Path(train_cfg.out), signum)
            print(f"ssmstream train: {said}", file=sys.stderr)
        return 128 + signum
    except ValueError as e:  # what the flags name (--data, --out, a checkpoint) cannot be used
        said = _with_flags(str(e), paths=_paths_given(train_cfg))
        if "data" in taken and _moved(train_cfg.data):  # the saved corpus is gone
            said += " (the run's saved --data: if its corpus moved, give --data where it is now)"
        print(f"ssmstream train: error: {said}", file=sys.stderr)
        return 2
    except (TrainingDiverged, OSError) as e:  # valid flags, a run that did not work out
        log.error("ssmstream train: %s", e)
        return 1
    except (MemoryError, RuntimeError, OverflowError, TypeError) as e:  # torch's sizes
        if not (out_of_memory(e) or size_overflow(e)):
            raise
        said = (str(e).splitlines() or [""])[0]
        log.error(
            "ssmstream train: out of memory (%s): use a smaller --batch-size, sequence "
            "(--seq-len; --duration × --rate and --n-components for --task signal) or model "
            "(--d-model, --n-layers, --d-state)",
            said or type(e).__name__,
        )
        return 1
    if dist.is_main:
        log.info("checkpoint at step %d: %s", result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
