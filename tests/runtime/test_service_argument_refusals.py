"""What a SessionService is made of is checked when it is made, naming the bad argument.

ServiceLimits, the in-process form of the server's limit flags, refuses a bad field as
`ssmstream serve` refuses the flag: a scope spelled wrong would otherwise give each principal
its own prefix cache without a word, and a zero request size would refuse every step. The
engine, store and batcher must belong together: a batcher steps its own store's sessions, so
a service over another store had every step of its sessions answered NOT_FOUND (closed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ssmstream.runtime import Batcher, Engine, SessionStore
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.service import ServiceLimits, SessionService

BAD = [
    ("max_tokens_per_request", 0),
    ("max_tokens_per_request", 2.5),
    ("max_new_tokens", 0),
    ("max_new_tokens", True),
    ("max_ttl", 0.0),
    ("max_ttl", -1),
    ("max_ttl", math.nan),
    ("max_ttl", "60"),
    ("rewind_window", -1),
    ("rewind_window", 16.0),
    ("rewind_memory_bytes", -1),
    ("prefix_cache_bytes", -5),
    ("prefix_cache_bytes", 1.5),
    ("prefix_cache_scope", "globel"),
    ("prefix_cache_scope", "Global"),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_a_bad_limit_is_refused_naming_its_field(field, value):
    with pytest.raises(InvalidInput) as e:
        ServiceLimits(**{field: value})
    assert e.value.field == field


def test_good_limits_are_kept_as_plain_numbers():
    limits = ServiceLimits(
        max_tokens_per_request=np.int64(8),
        max_new_tokens=1,
        max_ttl=60,
        rewind_window=0,
        rewind_memory_bytes=np.uint32(1 << 20),
        prefix_cache_bytes=0,
        prefix_cache_scope="global",
    )
    assert limits == ServiceLimits(8, 1, 60.0, 0, 1 << 20, 0, "global")
    assert type(limits.max_tokens_per_request) is int and type(limits.max_ttl) is float
    assert type(limits.rewind_memory_bytes) is int
    assert ServiceLimits().max_ttl == math.inf  # no bound, the default


def test_a_service_steps_through_the_batcher_of_its_own_engine_and_store(toy_tok, toy_token_model):
    store = SessionStore(toy_tok.state_size)
    other_store = SessionStore(toy_tok.state_size)
    twin = Engine(toy_token_model["model_dir"], device="cpu", threads=1)  # the model again
    limits = ServiceLimits()
    for batcher in (Batcher(toy_tok, other_store), Batcher(twin, store)):
        with pytest.raises(InvalidInput) as e:
            SessionService(toy_tok, store, batcher, limits)
        assert e.value.field == "batcher"
    with pytest.raises(InvalidInput) as e:
        SessionService(toy_tok, SessionStore(toy_tok.state_size + 1), None, limits)
    assert e.value.field == "store"
    with pytest.raises(InvalidInput) as e:
        SessionService(toy_tok, store, None, {"rewind_window": 8})
    assert e.value.field == "limits"
    svc = SessionService(toy_tok, store, Batcher(toy_tok, store), limits)
    assert svc.batcher.store is svc.store
