"""DistributedDataParallel: `torchrun --nproc-per-node 2` runs the unchanged train CLI on two
CPU processes (gloo); after a few steps both ranks hold identical weights, different from
the initial ones, and only rank 0 writes the checkpoint and the log.

Each rank's final weight hash comes from the trainer (config.json "ddp"); the test hashes
the saved safetensors file itself, with its own code, and checks rank 1 against it too.
The ranks draw different batches, so without gradient averaging they would diverge.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from ssmstream.model import SSMNetwork, load_checkpoint
from ssmstream.model.data import SignalConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(state: dict) -> str:
    """The documented convention: sorted names, each name then its float32 bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode("utf-8"))
        h.update(state[name].to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.timeout(240)
def test_torchrun_two_gloo_ranks_end_with_identical_weights(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(f"document {i}\n" + "the quick brown fox " * (10 + i))
    out = tmp_path / "ckpt"
    # --standalone: torchrun binds a free port itself (no race for a port picked here)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "ssmstream.model.train", "--data", str(corpus), "--out", str(out)]
    cmd += ["--seq-len", "32", "--batch-size", "2", "--steps", "6", "--warmup-steps", "1"]
    cmd += ["--d-model", "8", "--n-layers", "2", "--d-state", "4", "--device", "cpu"]
    cmd += ["--log-every", "2", "--eval-every", "3", "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: gloo process group" in proc.stderr

    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 6
    ddp = meta["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    saved = _sha256(load_file(out / "model.safetensors"))
    assert ddp["weights_sha256"] == [saved, saved]  # rank 0 and rank 1 agree with the file
    net = load_checkpoint(out)
    torch.manual_seed(0)  # the trainer's init (seed 0)
    assert _sha256(SSMNetwork(net.cfg).state_dict()) != saved
    # only rank 0 logged: one line per logged step (loss averaged over ranks), two evals
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [e["step"] for e in log if "loss" in e] == [2, 4, 6]
    assert [e["step"] for e in log if "eval" in e] == [3, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "train_log.jsonl", "train_state.pt"
    ]  # fmt: skip


MODEL = dict(d_model=8, n_layers=1, d_state=4, dropout=0.0)


def _signal_cfg(out):
    from ssmstream.model.train import TrainConfig

    return TrainConfig(
        task="signal", out=str(out), signal=SignalConfig(rate=4.0, duration=8.0), batch_size=2,
        steps=2, warmup_steps=1, log_every=1, eval_every=100, eval_batches=1, progress=False,
        threads=1, device="cpu",
    )  # fmt: skip


def _threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    from ssmstream.model import train as train_mod

    if rank == 0:  # a slow disk: rank 1 must still find the checkpoint when fit returns
        real = train_mod._save

        def slow_save(*a, **k):
            time.sleep(0.5)
            return real(*a, **k)

        train_mod._save = slow_save
    clock = itertools.count()  # every step lasts 1 s: tokens_per_s = B · L · world_size
    train_mod.time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    result = train_mod.fit(train_mod.default_model_config("signal", **MODEL), _signal_cfg(out))
    assert result.step == 2
    meta = json.loads((result.checkpoint / "config.json").read_text())
    assert meta["step"] == 2, f"rank {rank} returned before rank 0's final checkpoint"
    # the process group is gone with its threads: none is left to run while the interpreter
    # exits (a gloo thread dropping a tensor then aborts the process)
    assert not [t for t in _threads() if "gloo" in t], _threads()


@pytest.mark.timeout(240)  # ~10 s here; 35 s on one loaded core
def test_ddp_logs_the_mean_loss_of_the_ranks_and_returns_after_the_checkpoint(tmp_path):
    from ssmstream.model.train import Batches, SSMNetwork, default_model_config, loss_fn

    out = tmp_path / "ckpt"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    first = json.loads((out / "train_log.jsonl").open().readline())
    assert first["step"] == 1
    # step 1: both ranks hold the seed-0 init; each draws its own batch (seed, rank, step 0)
    torch.manual_seed(0)
    net = SSMNetwork(default_model_config("signal", **MODEL))
    batches = Batches(_signal_cfg(out), None)
    with torch.no_grad():
        per_rank = [
            loss_fn("signal", net(x), y).item() for x, y in (batches.train(r, 0) for r in (0, 1))
        ]
    assert per_rank[0] != pytest.approx(per_rank[1])
    assert first["loss"] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
    assert first["tokens_per_s"] == 2 * 32 * 2  # both ranks' tokens
