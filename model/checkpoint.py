"""Checkpoint directories: config.json + model.safetensors + train_log.jsonl.

    ckpt/
      config.json         {"format": "ssmstream-checkpoint", "version": 1, "model": SSMConfig, ...}
      model.safetensors   the network's state_dict (float32)
      train_log.jsonl     one JSON object per logged training event (may be empty)

`load_checkpoint` returns the network in eval mode and raises `CheckpointError`
(a ValueError) naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .network import SSMConfig, SSMNetwork

FORMAT = "ssmstream-checkpoint"
VERSION = 1
FILES = ("config.json", "model.safetensors", "train_log.jsonl")  # what save_checkpoint writes


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, corrupt or does not match its config."""


def save_checkpoint(
    net: SSMNetwork,
    path: str | os.PathLike,
    extra: dict | None = None,
    also: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write `net` (config + weights) to directory `path`; keeps an existing train_log.jsonl.

    `extra` (e.g. the training step and the optimizer state file name) goes into config.json,
    beside the reserved keys `format`, `version` and `model` (ValueError if it names one).
    `also`: {file name: a function writing that file to the path it is given} (the optimizer
    state), saved with the weights.
    Every file is written whole to a temporary name first (made anew: a link at that name is
    replaced, never written through); then all are renamed, config.json last, and the
    renames finish even when interrupted (Ctrl-C) between two of them: an interrupted save
    leaves the previous checkpoint or this one, never a mix.
    """
    meta = {"format": FORMAT, "version": VERSION, "model": net.cfg.to_dict()}
    if reserved := sorted(meta.keys() & (extra or {}).keys()):
        raise ValueError(f"extra: {', '.join(reserved)} are checkpoint fields, not extras")
    meta.update(extra or {})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()
    }
    names = [*(also or {}), "model.safetensors", "config.json"]
    try:
        for name, write in (also or {}).items():
            open_new(path / f"{name}.tmp").close()  # what the writer opens is this save's file
            write(path / f"{name}.tmp")
        # written like the other files (safetensors' save_file makes them 0600 whatever the umask)
        with open_new(path / "model.safetensors.tmp") as f:
            f.write(save(tensors))
        with open_new(path / "config.json.tmp", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
    except BaseException as e:  # a full disk, Ctrl-C: no partial files left (to keep it full)
        for name in names:
            (path / f"{name}.tmp").unlink(missing_ok=True)
        if isinstance(e, RuntimeError):  # torch.save says a failed write (ENOSPC) this way
            raise OSError(f"cannot write the checkpoint to {path}: {e}") from e
        raise
    _commit(path, names)
    try:  # made when missing, never through a link at its name (which touch would follow)
        os.close(os.open(path / "train_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        pass
    return path


def open_new(path: Path, mode: str = "wb"):
    """`path` opened for writing as a new file (mode 0666 less the umask). Whatever was at
    that name is removed first, never opened: a symbolic or hard link that another user of
    the directory put there does not have the file it points to written over."""
    path.unlink(missing_ok=True)
    # EXCL: nor through a link; BINARY: Windows opens an os.open file in text mode without it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return open(fd, mode)


def _commit(path: Path, names: list[str]) -> None:
    """Rename each `name.tmp` in `path` to `name`, in order. A KeyboardInterrupt or SystemExit
    (Ctrl-C, a SIGTERM handler) that lands between two renames is raised after the last one."""
    stop: BaseException | None = None
    for name in names:
        while True:
            try:
                if (path / f"{name}.tmp").exists():
                    os.replace(path / f"{name}.tmp", path / name)
                break
            except (KeyboardInterrupt, SystemExit) as e:
                stop = e
    if stop is not None:
        raise stop


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, validated."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise CheckpointError(f"checkpoint directory {str(path)!r} {what}")
    except OSError as e:  # a name too long, a link loop
        raise CheckpointError(f"checkpoint directory {str(path)!r}: {e.strerror or e}") from e
    if not cfg_file.is_file():
        exported = (path / "manifest.json").is_file()  # `ssmstream export`'s output, not its input
        hint = " (it holds an exported model; give the checkpoint it came from)" if exported else ""
        raise CheckpointError(f"{cfg_file} is missing: not an ssmstream checkpoint directory{hint}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit int, deep nesting
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{cfg_file} is not an ssmstream checkpoint config")
    v = meta.get("version")
    if type(v) is not int or v != VERSION:  # true, 1.0: not a version
        newer = type(v) is int and v > VERSION
        raise CheckpointError(
            f"{cfg_file}: checkpoint version {v!r} unsupported (want {VERSION})"
            + ("; it was written by a newer ssmstream: upgrade this one" if newer else "")
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> SSMNetwork:
    """Load a checkpoint directory -> SSMNetwork in eval mode, on the device `map_location`."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"map_location: {map_location!r} is not a torch device: {e}") from e
    try:
        torch.empty(0, device=device)  # a device this torch build or machine lacks
    except (RuntimeError, AssertionError) as e:  # torch built without CUDA: AssertionError
        raise ValueError(f"map_location: {map_location!r} is not available here: {e}") from e
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        cfg = SSMConfig.from_dict(meta["model"])
        net = SSMNetwork(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid model config: {e}") from e
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt: {e}") from e
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{weights}: tensor {k!r} has shape {tuple(v.shape)}, "
                f"config.json wants {tuple(expected[k].shape)}"
            )
        if not v.is_floating_point():  # load_state_dict would cast it without a word
            raise CheckpointError(f"{weights}: tensor {k!r} is {v.dtype}, not floating point")
        if not torch.isfinite(v).all():  # training refuses to save these (TrainingDiverged)
            raise CheckpointError(f"{weights}: tensor {k!r} holds NaN or infinite values")
    net.load_state_dict(state)
    return net.to(device).eval()
