"""Fixtures for tests/export: tiny checkpoints and their exports, shared by the session.

Exports are the slow part (torch.onnx dynamo, ~5–20 s per graph), so each distinct one is
made once: a token model (SISO, zoh, 2 layers) and a continuous multi-head model (bilinear,
wide heads → the prefill's mode path, exported with --dt-scale), each fp32 with prefill;
the int8 variant reuses the token model's fp32 conversion (same process, same content);
fp16 exports the step graph only.
"""

from __future__ import annotations

import pytest
import torch
from export_helpers import DT_SCALE, EXPORT, SIGNAL, TOKEN
from ssmstream.export import export_model
from ssmstream.model import SSMConfig, SSMNetwork, load_checkpoint, save_checkpoint


def make_ckpt(path, cfg: dict, seed: int):
    torch.manual_seed(seed)
    net = SSMNetwork(SSMConfig(**cfg)).eval()
    save_checkpoint(net, path)
    return path


@pytest.fixture(scope="session")
def token_ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "token", TOKEN, seed=0)


@pytest.fixture(scope="session")
def signal_ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "signal", SIGNAL, seed=1)


@pytest.fixture(scope="session")
def token_net(token_ckpt):
    return load_checkpoint(token_ckpt)


@pytest.fixture(scope="session")
def signal_net(signal_ckpt):
    return load_checkpoint(signal_ckpt)


@pytest.fixture(scope="session")
def token_model(token_ckpt, tmp_path_factory):
    return export_model(token_ckpt, tmp_path_factory.mktemp("models") / "token", **EXPORT)


@pytest.fixture(scope="session")
def signal_model(signal_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "signal"
    return export_model(signal_ckpt, out, dt_scale=DT_SCALE, **EXPORT)


@pytest.fixture(scope="session")
def int8_model(token_ckpt, token_model, tmp_path_factory):
    # after token_model: the fp32 graphs come from this process's conversion cache
    out = tmp_path_factory.mktemp("models") / "int8"
    return export_model(token_ckpt, out, dtype="int8", **EXPORT)


@pytest.fixture(scope="session")
def fp16_model(token_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "fp16"
    return export_model(token_ckpt, out, dtype="fp16", prefill=False, **EXPORT)
