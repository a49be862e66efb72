"""examples/edge_embed.py continues a stream exactly as a fresh generation would.

The example steps its prompt token by token, then continues the stream from its state with
`Engine.generate`. The tokens it returns are compared with an independent fresh
`Engine.generate(prompt)` (another Engine, same sampling arguments): feeding any prompt
token twice, or dropping one, changes the continuation.

The shipped byte-level checkpoint is exported with a 16-token prefill chunk, so the fresh
generation runs prompts longer than 16 bytes through the prefill graph while the example
steps them one at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import ROOT, load_script

CKPT = ROOT / "examples" / "checkpoints" / "byte-lm"


@pytest.fixture(scope="module")
def edge():
    return load_script("examples/edge_embed.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from ssmstream.export import export_model  # in this process: torch is imported already

    out = tmp_path_factory.mktemp("edge") / "byte-lm"
    return export_model(CKPT, out, chunk=16, max_chunks=4, verify_steps=256, progress=False)


@pytest.mark.parametrize(
    ("text", "temperature", "seed"),
    [
        ("The state space model ", 0.8, 0),
        ("def fibonacci(n):\n    if n < 2:\n        return n\n", 0.8, 7),  # 3 prefill chunks
        ("import os\n", 0.0, 0),  # greedy
        ("x", 1.0, 3),  # a one-byte prompt
    ],
)
def test_continuation_equals_a_fresh_generate(edge, model_dir, text, temperature, seed):
    from ssmstream.runtime import Engine

    n = 48
    got = edge.run_tokens(Engine(model_dir, device="cpu", threads=1), text, n, temperature, seed)
    fresh = Engine(model_dir, device="cpu", threads=1)
    want = list(fresh.generate(list(text.encode()), max_new_tokens=n, temperature=temperature,
                               seed=seed))  # fmt: skip
    assert len(want) == n
    assert got == want


def test_main_runs(edge, model_dir, caplog):
    caplog.set_level("INFO", logger="edge_embed")
    assert edge.main([str(model_dir), "hello", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert "continuation: " in caplog.text
    assert edge.main([str(model_dir / "nope")]) == 2
    with pytest.raises(SystemExit) as e:  # an empty prompt: argparse's error, not a traceback
        edge.main([str(model_dir), ""])
    assert e.value.code == 2
