"""PrefixCache with a budget of 0 is off: inserts keep nothing and lookups are neither hits
nor misses (the metrics of a server without a prefix cache stay at zero)."""

from __future__ import annotations

import numpy as np
from ssmstream.runtime.prefix_cache import PrefixCache

S, D, Q = 4, 2, 3


def test_a_cache_with_no_budget_keeps_and_counts_nothing():
    c = PrefixCache(0, chunk=Q, model_sha="m")
    prompt = np.arange(7, dtype=np.int64)
    states = {n: (np.ones(S, np.float32), np.ones(D, np.float32)) for n in (3, 6, 7)}
    assert not c.enabled
    assert c.insert("p", prompt, states) == 0
    assert c.lookup("p", prompt).tokens == 0
    assert c.lookup("p", prompt, chain=True, gap=Q).tokens == 0
    c.count(5)
    assert c.stats() == {
        "hits": 0, "misses": 0, "cached_tokens": 0, "evictions": 0, "bytes": 0, "entries": 0
    }  # fmt: skip
