"""Constant memory: a session streamed 200 000 tokens holds no more RSS than after 1 000."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)"
)


def rss_bytes() -> int:
    """Resident set size of this process now (not the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import resource

    return pages * resource.getpagesize()


def stream(engine: Engine, store: SessionStore, s, n: int, rng_tokens: np.ndarray) -> None:
    """n single-token steps of one session: read state, Engine.step, commit."""
    V = len(rng_tokens)
    for i in range(n):
        tok = rng_tokens[i % V : i % V + 1]  # [1]
        _, new = engine.step(tok, store.read(s)[None])
        store.commit(s, new[0], 1)


@pytest.mark.timeout(240)
def test_rss_flat_over_200k_streamed_tokens(toy_token_model):
    engine = Engine(toy_token_model["model_dir"], device="cpu", threads=1)
    store = SessionStore(engine.state_size, capacity=4)
    s = store.create()
    tokens = np.random.default_rng(0).integers(0, engine.vocab_size, size=997)
    stream(engine, store, s, 1000, tokens)
    rss_1k = rss_bytes()
    t0 = time.perf_counter()
    stream(engine, store, s, 199_000, tokens)
    elapsed = time.perf_counter() - t0
    rss_200k = rss_bytes()
    assert s.position == 200_000
    assert abs(rss_200k - rss_1k) < 2 * 2**20, (rss_1k, rss_200k)
    sys.stderr.write(
        f"199k steps in {elapsed:.1f} s; RSS {rss_1k / 2**20:.1f} -> {rss_200k / 2**20:.1f} MiB\n"
    )
    assert np.isfinite(store.read(s)).all()
