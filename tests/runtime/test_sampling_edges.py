"""Sampling and the generation loop at their edges: the dtype of the distribution, greedy
with a generator, the highest uniform draw, the seed's generator, ties at the top-p cut, and
the log-probability of a token that is not the argmax, the order and field names of
refusals, and tied maxima under a tiny temperature."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.generation import GenerateConfig, Generation
from ssmstream.runtime.sampling import Sampler, SamplingConfig, probabilities, sample


class _FixedDraw:
    """A stand-in generator whose uniform draw is always `u`."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_probabilities_of_narrow_logits_are_float64_as_of_their_float64_values(dtype):
    z = np.array([0.5, -1.25, 2.0, 0.75, -3.0], dtype=dtype)
    p = probabilities(z, 0.7, top_p=0.9)
    want = probabilities(z.astype(np.float64), 0.7, top_p=0.9)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=0)


def test_greedy_draws_nothing_from_a_given_generator():
    """temperature 0 uses no randomness: the caller's generator is left where it was."""
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    assert sample(np.array([0.1, 3.0, -1.0]), temperature=0, rng=rng) == 1
    assert rng.bit_generator.state == before


def test_the_highest_draw_picks_the_last_token_that_has_probability():
    """A uniform draw just below 1 selects the last token of positive probability, never a
    masked one after it, also when the running sum of the probabilities ends below 1."""
    logits = np.array([1.5, 0.0, 0.0, -np.inf])
    u = np.nextafter(1.0, 0.0)
    assert np.cumsum(probabilities(logits))[-1] < u  # the case: the sum rounds below 1
    assert sample(logits, 1.0, rng=_FixedDraw(u)) == 2


def test_a_seed_draws_with_numpys_generator_of_that_seed():
    """SamplingConfig(seed=s) samples by inverse CDF from numpy.random.default_rng(s)'s
    uniform draws, one per token: reproducible outside this library."""
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1234))
    got = [sampler(logits) for _ in range(64)]
    uniform = np.random.default_rng(1234)
    p = [0.1, 0.2, 0.3, 0.4]
    want = []
    for _ in range(64):
        u = uniform.random()
        want.append(next(t for t, mass in enumerate(itertools.accumulate(p)) if u < mass))
    assert got == want


def test_a_sampler_without_a_config_is_unseeded():
    logits = np.zeros(8)
    a, b = Sampler(), Sampler()
    assert [a(logits) for _ in range(64)] != [b(logits) for _ in range(64)]  # 8**-64 to fail


def test_top_p_keeps_the_lowest_ids_among_tokens_tied_at_the_cut():
    """Tokens of equal probability rank by id (as the reference construction in
    test_sampling.py): the nucleus is the same on every platform and numpy version."""
    w = np.array([3, 2, 2, 1, 1, 1, 1, 1, 1, 3, 2, 3, 2, 2, 3, 3, 2, 2, 2, 3], dtype=float)
    # the six 3s hold 18/40 = 0.45 of the mass: one 2 more reaches 0.49, the lowest id 1
    p = probabilities(np.log(w), 1.0, top_p=0.49)
    assert set(np.flatnonzero(p).tolist()) == {0, 9, 11, 14, 15, 19, 1}
    np.testing.assert_allclose(p[p > 0], w[p > 0] / 20.0, rtol=1e-12)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (2.0, 0), (0.5, 3)])
def test_logprob_is_the_sampled_tokens_under_the_unfiltered_distribution(temperature, top_k):
    """Generated.logprob is log_softmax(logits)[token], whatever the temperature or filters
    and whichever token was drawn (not only the argmax)."""
    logits = np.array([0.0, 1.0, 2.0, 1.5, -0.5], dtype=np.float32)
    z = logits.astype(np.float64)
    want = z - np.log(np.exp(z).sum())
    gen = Generation(GenerateConfig.check(5, 40, temperature, top_k, seed=3))
    seen = set()
    for _ in range(40):
        g = gen(logits, position=2)
        assert g.logprob == pytest.approx(want[g.token], rel=1e-12, abs=1e-12)
        seen.add(g.token)
    assert len(seen) > 1  # tokens other than the argmax were drawn and checked


def test_the_parameters_errors_come_before_the_logits():
    with pytest.raises(InvalidInput) as e:
        probabilities(np.array([1, 2]), temperature=-1.0)  # integer logits too
    assert e.value.field == "temperature"


@pytest.mark.parametrize("temperature", [1e-308, 5e-324])
def test_a_tiny_temperature_splits_tied_maxima_evenly(temperature):
    """Only temperature 0 is greedy: any positive one samples, and tokens tied at the
    maximum stay equally likely however small it is."""
    p = probabilities(np.array([1.0, 0.0, 1.0, -2.0]), temperature)
    np.testing.assert_array_equal(p, [0.5, 0.0, 0.5, 0.0])


def test_stop_errors_name_the_callers_field():
    for stop in (5, (t for t in range(9))):
        with pytest.raises(InvalidInput) as e:
            GenerateConfig.check(8, 4, stop=stop, stop_field="stop_tokens")
        assert e.value.field == "stop_tokens"
