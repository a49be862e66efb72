"""The README says which sessions a batched step waits for: those with a request in the last
K × `--max-batch-delay`, at least F ms. The Batcher the server makes (no activity_window of
its own) counts sessions active for that long."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ssmstream.runtime import Batcher, SessionStore

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def stated_window() -> tuple[float, float]:
    """(K, F seconds) as the README's Batching item states them."""
    text = " ".join(README.split())
    ((factor, floor_ms),) = re.findall(
        r"with a request in the last (\d+) × `--max-batch-delay`, at least (\d+) ms", text
    )
    return float(factor), float(floor_ms) / 1000


@pytest.mark.parametrize("delay", [0.0, 0.0002, 0.002, 0.05])
def test_a_step_waits_for_the_sessions_the_readme_calls_active(toy_tok, delay):
    factor, floor = stated_window()
    store = SessionStore(toy_tok.state_size, capacity=2)
    batcher = Batcher(toy_tok, store, max_batch=8, max_batch_delay=delay)
    assert batcher.activity_window == pytest.approx(max(factor * delay, floor))
