"""examples/edge_embed.py on hand-built toy models (no export): the values path carries its
state from sample to sample, the top-3 guesses are the highest logits, and the CLI hands its
--device, --temperature and --seed to the right places. Outputs are recomputed with the toys'
float64 reference recurrence or an independent fresh Engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def edge():
    return load_script("examples/edge_embed.py")


def _logged(caplog, prefix: str) -> list[tuple]:
    return [r.args for r in caplog.records if r.msg.startswith(prefix)]


def test_values_model_outputs_follow_the_recurrence(edge, values_toy, caplog):
    """run_values feeds u[t, j] = sin(2π t / 50 + j) through one evolving state; every
    logged output (every steps // 8 samples) equals the reference recurrence's."""
    from ssmstream.runtime import Engine

    caplog.set_level("INFO", logger="edge_embed")
    edge.run_values(Engine(values_toy["model_dir"], device="cpu", threads=1), 16)
    rows = _logged(caplog, "t=")
    assert [k for k, _, _ in rows] == list(range(0, 16, 2))
    t = np.arange(16)[:, None]
    u = np.sin(2 * math.pi * t / 50.0 + np.arange(3))  # [16, 3]
    want, _ = values_toy["reference"](u[None], np.zeros((1, values_toy["S"])))  # [1, 16, 5]
    for k, u_k, y_k in rows:
        np.testing.assert_allclose(u_k, u[k], atol=1e-3, rtol=0)
        np.testing.assert_allclose(y_k, want[0, k], atol=1.5e-3, rtol=0)


def test_guesses_are_the_three_highest_logits(edge, byte_toy, caplog):
    """The logged next-token guesses are the ids of the three largest logits after the
    prompt, largest first."""
    from ssmstream.runtime import Engine

    caplog.set_level("INFO", logger="edge_embed")
    text = "edge"
    edge.run_tokens(Engine(byte_toy["model_dir"], device="cpu", threads=1), text, 2, 0.0, 0)
    (guesses,) = _logged(caplog, "next-token guesses")
    prompt = np.array([list(text.encode())])
    ys, _ = byte_toy["reference"](prompt, np.zeros((1, byte_toy["S"])))  # [1, T, 256]
    want = [int(t) for t in np.argsort(-ys[0, -1])[:3]]
    assert guesses[0] == want


def test_cli_sampling_arguments_reach_the_generation(edge, byte_toy, caplog):
    """main's continuation is the one a fresh Engine.generate gives with the same
    --temperature and --seed."""
    from ssmstream.runtime import Engine

    caplog.set_level("INFO", logger="edge_embed")
    text = "hello edge"
    argv = [str(byte_toy["model_dir"]), text, "--max-new-tokens", "8", "--temperature", "0.9",
            "--seed", "3", "--device", "cpu", "--threads", "1"]  # fmt: skip
    assert edge.main(argv) == 0
    (got,) = _logged(caplog, "continuation: ")
    fresh = Engine(byte_toy["model_dir"], device="cpu", threads=1)
    want = list(fresh.generate(list(text.encode()), max_new_tokens=8, temperature=0.9, seed=3))
    assert got[0] == bytes(want).decode("utf-8", errors="replace")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cli_device_reaches_the_engine(edge, byte_toy, monkeypatch, device):
    """--device is passed on to the Engine (as are --threads)."""
    real = edge.Engine
    seen = []

    def recording_engine(model_dir, **kw):
        seen.append(kw)
        return real(model_dir, **{**kw, "device": "cpu"})

    monkeypatch.setattr(edge, "Engine", recording_engine)
    argv = [str(byte_toy["model_dir"]), "hi", "--max-new-tokens", "1", "--device", device,
            "--threads", "1"]  # fmt: skip
    assert edge.main(argv) == 0
    assert seen == [{"device": device, "threads": 1}]


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 0, got -5"),
        (["--temperature", "-1"], "--temperature: must be finite and >= 0, got -1.0"),
        (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    ],
)
def test_bad_sampling_flags_are_usage_errors_before_the_model_runs(
    edge, byte_toy, monkeypatch, capsys, flags, said
):
    # they had been found after the prompt was stepped and its guesses printed
    monkeypatch.setattr(edge, "Engine", lambda *a, **k: pytest.fail("opened the model"))
    with pytest.raises(SystemExit) as e:
        edge.main([str(byte_toy["model_dir"]), *flags])
    assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: {said}\n")


def test_a_prompt_that_is_not_utf8_is_fed_as_its_bytes(edge, byte_toy, caplog):
    # "caf\xe9" from a Latin-1 terminal: it had raised UnicodeEncodeError
    from ssmstream.runtime import Engine

    caplog.set_level("INFO", logger="edge_embed")
    eng = Engine(byte_toy["model_dir"], device="cpu", threads=1)
    edge.run_tokens(eng, "caf\udce9", 2, 0.0, 0)
    (guesses,) = _logged(caplog, "next-token guesses")
    prompt = np.array([[99, 97, 102, 0xE9]]) % eng.vocab_size  # the bytes given
    ys, _ = byte_toy["reference"](prompt, np.zeros((1, byte_toy["S"])))  # [1, T, V]
    assert guesses[0] == [int(t) for t in np.argsort(-ys[0, -1])[:3]]
