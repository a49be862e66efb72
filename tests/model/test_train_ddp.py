"""DistributedDataParallel: `torchrun --nproc-per-node 2` runs the unchanged train CLI on two
CPU processes (gloo); after a few steps both ranks hold identical weights, different from
the initial ones, and only rank 0 writes the checkpoint and the log.

Each rank's final weight hash comes from the trainer (config.json "ddp"); the test hashes
the saved safetensors file itself, with its own code, and checks rank 1 against it too.
The ranks draw different batches, so without gradient averaging they would diverge.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from ssmstream.model import SSMNetwork, load_checkpoint


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
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
