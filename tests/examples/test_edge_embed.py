"""examples/edge_embed.py continues a stream exactly as a fresh generation would.

The example steps its prompt token by token, then continues the stream from its state with
`Engine.generate`. The tokens it returns are compared with an independent fresh
`Engine.generate(prompt)` (another Engine, same sampling arguments): feeding any prompt
token twice, or dropping one, changes the continuation.

The model is the shipped byte-level checkpoint as the README's tour exports it (64-token
prefill chunks): the fresh generation runs the longer prompts through the prefill graph (a
padded chunk alone; whole chunks and a padded one in one call) and steps the short ones, while
the example steps every prompt one token at a time.
"""

from __future__ import annotations

import pytest
from scripts import load_script

FIB = "def fibonacci(n):\n    if n < 2:\n        return n\n"  # 49 bytes
FIB_CALLED = (  # 151 bytes
    FIB + "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "print([fibonacci(i) for i in range(12)])  # 12 terms\n"
)


@pytest.fixture(scope="module")
def edge():
    return load_script("examples/edge_embed.py")


@pytest.mark.parametrize(
    ("text", "temperature", "seed"),
    [
        ("The state space model ", 0.8, 0),
        (FIB, 0.8, 7),  # one padded prefill chunk
        (FIB_CALLED, 0.8, 5),  # 2 whole prefill chunks and a padded one, in one call
        ("import os\n", 0.0, 0),  # greedy
        ("x", 1.0, 3),  # a one-byte prompt
    ],
)
def test_continuation_equals_a_fresh_generate(edge, shipped_export, text, temperature, seed):
    from ssmstream.runtime import Engine

    n = 48
    got = edge.run_tokens(
        Engine(shipped_export, device="cpu", threads=1), text, n, temperature, seed
    )
    fresh = Engine(shipped_export, device="cpu", threads=1)
    if len(text) > 32:  # the fresh generation prefills all of it, the padded chunk too
        assert fresh._prefill_span(len(text)) == len(text)
    want = list(fresh.generate(list(text.encode()), max_new_tokens=n, temperature=temperature,
                               seed=seed))  # fmt: skip
    assert len(want) == n
    assert got == want


def test_main_runs(edge, shipped_export, caplog):
    caplog.set_level("INFO", logger="edge_embed")
    assert (
        edge.main([str(shipped_export), "hello", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    )
    assert "continuation: " in caplog.text
    assert edge.main([str(shipped_export / "nope")]) == 2
    with pytest.raises(SystemExit) as e:  # an empty prompt: argparse's error, not a traceback
        edge.main([str(shipped_export), ""])
    assert e.value.code == 2
