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


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 2.0}])
def test_a_top_k_past_the_vocabulary_is_named_first_as_the_client_names_it(bad):
    """With top_k > vocab_size and another bad sampling field, the server's check and the
    client's check_generate (which mirrors it before a call) name the same field: top_k."""
    from ssmstream.protos import inference_pb2 as pb
    from ssmstream.runtime.client import check_generate

    for also in ({}, {"seed": -1}):  # a seed the proto cannot carry: the server's check only
        with pytest.raises(InvalidInput) as e:
            GenerateConfig.check(V, 2, top_k=V + 1, **bad, **also)
        assert e.value.field == "top_k"
    req = pb.GenerateRequest(prompt=[1], max_new_tokens=2, top_k=V + 1, **bad)
    info = pb.ModelInfo(input_kind="tokens", vocab_size=V, d_output=V)
    info.limits.max_tokens_per_request, info.limits.max_new_tokens = 8, 8
    with pytest.raises(ValueError, match=r"^top_k: "):
        check_generate(req, info)


def test_stop_none_is_no_stop_token_as_the_clients_take_it(toy_tok):
    assert GenerateConfig.check(V, 2, stop=None).stop == frozenset()
    kw = dict(max_new_tokens=6, temperature=1.3, seed=4)
    assert list(toy_tok.generate([2, 7], stop=None, **kw)) == list(toy_tok.generate([2, 7], **kw))


def test_stop_tokens_end_at_the_vocabulary_and_are_read_no_further_than_one_past_it():
    """A stop token must be an id of the vocabulary: V - 1 is one, V is not. An iterable of
    stop tokens is read no further than vocab_size + 1 items (an endless one is refused, not
    looped over)."""
    assert GenerateConfig.check(V, 2, stop=[V - 1]).stop == {V - 1}
    with pytest.raises(InvalidInput, match=rf"^stop: token {V} is outside \[0, vocab_size={V}\)"):
        GenerateConfig.check(V, 2, stop=[V])
    read = []

    def endless():
        while True:
            read.append(0)
            assert len(read) <= 10 * V, "read on past vocab_size + 1"  # (not forever)
            yield 0

    with pytest.raises(InvalidInput, match=rf"^stop: has more than vocab_size={V} tokens$"):
        GenerateConfig.check(V, 2, stop=endless())
    assert len(read) == V + 1


def test_a_token_masked_by_minus_inf_is_never_drawn_and_is_no_corrupt_state():
    """-inf logits mask tokens (probability 0); only all -inf, NaN or +inf are a state the
    model cannot go on from (CorruptState)."""
    from ssmstream.runtime.errors import CorruptState
    from ssmstream.runtime.generation import Generation

    gen = Generation(GenerateConfig.check(3, 50, temperature=1.0, seed=0))
    drawn = {gen(np.array([-np.inf, 0.0, 0.5]), 7).token for _ in range(50)}
    assert drawn == {1, 2}
    for bad in ([-np.inf] * 3, [0.0, np.nan, 0.0], [0.0, np.inf, 0.0]):
        with pytest.raises(CorruptState, match="at position 7 are NaN or inf"):
            Generation(GenerateConfig.check(3, 5))(np.array(bad), 7)
