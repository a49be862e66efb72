"""GenerateConfig.check at the edges of its documented ranges: max_new_tokens is an integer
(numpy integers included, bools not), top_k may be anything in [0, vocab_size]."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.generation import GenerateConfig

V = 5


@pytest.mark.parametrize("n", [np.int64(3), np.int32(3), np.uint8(3)])
def test_a_numpy_integer_max_new_tokens_is_taken_as_that_int(n, toy_tok):
    """A numpy integer count (what a caller slicing arrays hands over) is an integer like 3:
    the config holds the plain int 3 and Engine.generate yields the same tokens as with 3."""
    config = GenerateConfig.check(V, n, max_limit=8, min_new_tokens=1)
    assert config.max_new_tokens == 3 and type(config.max_new_tokens) is int
    got = list(toy_tok.generate([3, 1], max_new_tokens=n, temperature=0))
    assert got == list(toy_tok.generate([3, 1], max_new_tokens=3, temperature=0))
    assert len(got) == 3


@pytest.mark.parametrize("n", [True, False, np.bool_(True)])
def test_a_bool_max_new_tokens_is_refused_naming_the_field(n, toy_tok):
    """True is not the count 1 (nor False 0): refused as max_new_tokens, by the check and by
    Engine.generate."""
    with pytest.raises(InvalidInput) as e:
        GenerateConfig.check(V, n)
    assert e.value.field == "max_new_tokens"
    with pytest.raises(InvalidInput) as e:
        toy_tok.generate([1], max_new_tokens=n)
    assert e.value.field == "max_new_tokens"


def test_top_k_equal_to_the_vocabulary_is_accepted_and_keeps_every_token(toy_tok):
    """top_k = vocab_size is in range (it keeps every token, as 0 does): seeded draws with it
    equal the unfiltered ones; one more is refused naming top_k."""
    V_tok = toy_tok.vocab_size
    assert GenerateConfig.check(V_tok, 4, top_k=V_tok).sampling.top_k == V_tok
    kw = dict(max_new_tokens=12, temperature=1.7, seed=11)
    assert list(toy_tok.generate([2, 7], top_k=V_tok, **kw)) == list(
        toy_tok.generate([2, 7], top_k=0, **kw)
    )
    with pytest.raises(InvalidInput) as e:
        GenerateConfig.check(V_tok, 4, top_k=V_tok + 1)
    assert e.value.field == "top_k"
