"""Sampling: the filtered distribution vs a brute-force construction, empirical frequencies,
seeding, greedy, and bad parameters named in the error."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.generation import (
    FINISH_MAX,
    FINISH_STOP,
    GenerateConfig,
    Generation,
)
from ssmstream.runtime.sampling import Sampler, SamplingConfig, probabilities, sample


def brute_force(logits, temperature, top_k, top_p) -> np.ndarray:
    """Build the distribution from its definition, looping over ranked tokens in Python."""
    z = [float(v) / temperature for v in logits]
    m = max(z)
    w = [np.exp(v - m) for v in z]
    ranked = sorted(range(len(z)), key=lambda i: (-w[i], i))
    keep = set(ranked[:top_k]) if top_k else set(ranked)
    total = sum(w[i] for i in keep)
    p = [w[i] / total if i in keep else 0.0 for i in range(len(z))]
    if top_p < 1.0:
        mass, nucleus = 0.0, set()
        for i in ranked:
            if i not in keep:
                continue
            nucleus.add(i)
            mass += p[i]
            if mass >= top_p:
                break
        total = sum(p[i] for i in nucleus)
        p = [p[i] / total if i in nucleus else 0.0 for i in range(len(z))]
    return np.array(p)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    list(itertools.product([0.5, 1.0, 2.0], [0, 1, 3, 9, 10, 11], [1.0, 0.9, 0.3])),  # V = 10
)
def test_probabilities_match_brute_force(temperature, top_k, top_p):
    logits = np.random.default_rng(0).standard_normal(10) * 2
    p = probabilities(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(p, brute_force(logits, temperature, top_k, top_p), atol=1e-12)
    assert p.sum() == pytest.approx(1.0)


def test_greedy_is_argmax_and_uses_no_randomness():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert all(sample(logits, temperature=0, rng=np.random.default_rng(s)) == 1 for s in range(5))
    np.testing.assert_array_equal(probabilities(logits, 0), [0, 1, 0, 0])
    assert sample(np.array([1.0, -np.inf, 1.0]), temperature=0) == 0  # first index on ties


@pytest.mark.parametrize("temperature", [1e-30, 1e-308, 5e-324])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    """z / T overflowed to inf before the max was subtracted (inf - inf = NaN)."""
    logits = np.array([3.0, 1.0, 2.0, -1.0, -np.inf])
    p = probabilities(logits, temperature)
    np.testing.assert_array_equal(p, [1, 0, 0, 0, 0])
    assert sample(logits, temperature, rng=np.random.default_rng(0)) == 0


def test_empirical_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    n = 20000
    counts = np.bincount([sample(logits, rng=rng) for _ in range(n)], minlength=4)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma)
    counts_k = np.bincount([sample(logits, top_k=2, rng=rng) for _ in range(4000)], minlength=4)
    assert counts_k[2] == counts_k[3] == 0 and abs(counts_k[0] / 4000 - 0.625) < 0.05


def test_seeded_samplers_repeat_and_minus_inf_is_never_drawn():
    logits = np.array([0.0, -np.inf, 0.5, 0.2, -np.inf])
    cfg = SamplingConfig(temperature=1.3, top_p=0.95, seed=42)
    a, b = Sampler(cfg), Sampler(cfg)
    draws = [a(logits) for _ in range(200)]
    assert draws == [b(logits) for _ in range(200)]
    assert set(draws) <= {0, 2, 3} and len(set(draws)) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidInput) as e:
        SamplingConfig(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize(
    "logits",
    [
        np.array([]),
        np.zeros((2, 2)),
        np.array([1, 2]),
        np.array([np.nan, 1.0]),
        np.full(3, -np.inf),
    ],
)
def test_bad_logits(logits):
    with pytest.raises(InvalidInput) as e:
        sample(logits)
    assert e.value.field == "logits"


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"temperature": float("inf")}, "temperature", "must be finite and >= 0, got inf"),
        ({"temperature": True}, "temperature", "must be a real number, got True"),
        ({"top_k": True}, "top_k", "must be an integer >= 0 (0 = off), got True"),
        ({"top_p": True}, "top_p", "must be a real number, got True"),
        ({"seed": True}, "seed", "must be an integer >= 0 or None, got True"),
    ],
)
def test_infinite_or_bool_parameters_are_refused(kwargs, field, words):
    with pytest.raises(InvalidInput) as e:
        SamplingConfig(**kwargs)
    assert e.value.field == field and words in str(e.value)


def test_empty_logits_say_so():
    with pytest.raises(
        InvalidInput, match=r"must be a non-empty 1-D array \[V\], got shape \(0,\)"
    ):
        sample(np.array([], dtype=np.float32))


@pytest.mark.parametrize("logits", [[np.inf, 0.0], [1.0, np.inf, np.inf]])
def test_positive_infinite_logits_are_refused(logits):
    with pytest.raises(InvalidInput, match=r"contain NaN or \+inf") as e:
        probabilities(np.array(logits))
    assert e.value.field == "logits"


def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p_exactly():
    """p = [0.5, 0.25, 0.25] exactly (powers of two): top_p = 0.5 is reached by the first
    token alone, top_p = 0.75 by two."""
    logits = np.log(np.array([0.5, 0.25, 0.25]))
    np.testing.assert_array_equal(probabilities(logits, top_p=0.5), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(probabilities(logits, top_p=0.75), [2 / 3, 1 / 3, 0.0])
    rng = np.random.default_rng(0)
    assert {sample(logits, top_p=0.5, rng=rng) for _ in range(50)} == {0}


@pytest.mark.parametrize("off", [0, 0.0, -0.0])
def test_top_p_zero_is_off_as_on_the_wire(off):
    """0 is the wire's default and means off there (as top_k = 0): in process too, the
    distribution and the seeded draws are those of top_p = 1 (0 was refused)."""
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    p = probabilities(logits, top_p=off)
    np.testing.assert_allclose(p, [0.5, 0.25, 0.125, 0.125], rtol=1e-12)
    np.testing.assert_array_equal(p, probabilities(logits, top_p=1.0))
    rng_off, rng_full = np.random.default_rng(4), np.random.default_rng(4)
    draws = [sample(logits, top_p=off, rng=rng_off) for _ in range(20)]
    assert draws == [sample(logits, top_p=1.0, rng=rng_full) for _ in range(20)]
    assert set(draws) == {0, 1, 2, 3}  # every token is drawn: no nucleus
    off_sampler = Sampler(SamplingConfig(top_p=off, seed=3))
    full_sampler = Sampler(SamplingConfig(top_p=1.0, seed=3))
    assert [off_sampler(logits) for _ in range(20)] == [full_sampler(logits) for _ in range(20)]
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(InvalidInput) as e:
            SamplingConfig(top_p=bad)
        assert str(e.value) == f"top_p: must be in [0, 1] (0 or 1 = off), got {bad}"


V = 5


def test_max_new_tokens_may_equal_the_limit():
    assert GenerateConfig.check(V, 8, max_limit=8, min_new_tokens=1).max_new_tokens == 8
    with pytest.raises(InvalidInput, match=r"must be an integer in \[1, 8\], got 9") as e:
        GenerateConfig.check(V, 9, max_limit=8, min_new_tokens=1)
    assert e.value.field == "max_new_tokens"


def test_stop_may_list_every_token_once_but_no_more():
    """At most vocab_size stop tokens: exactly V is fine, V + 1 (even with a repeat) is refused
    rather than silently cut to the first V."""
    assert GenerateConfig.check(V, 3, stop=range(V)).stop == frozenset(range(V))
    with pytest.raises(InvalidInput, match="has more than vocab_size=5 tokens") as e:
        GenerateConfig.check(V, 3, stop=[0, 1, 2, 3, 4, 0], stop_field="stop_tokens")
    assert e.value.field == "stop_tokens"


@pytest.mark.parametrize(
    "stop, words",
    [
        ([True], "must be token ids (ints), got True"),
    ],
)
def test_bool_stop_tokens_are_refused(stop, words):
    with pytest.raises(InvalidInput) as e:
        GenerateConfig.check(V, 3, stop=stop, stop_field="stop_tokens")
    assert e.value.field == "stop_tokens" and words in str(e.value)


def test_a_stop_token_sampled_last_finishes_as_a_stop():
    """The stop token wins over the max_new_tokens count when both end the generation."""
    logits = np.array([0.0, 5.0, 1.0, -1.0, 2.0])  # greedy: token 1
    gen = Generation(GenerateConfig.check(V, 1, temperature=0, stop=[1]))
    g = gen(logits, 7)
    assert (g.token, g.index, g.position, g.finish) == (1, 0, 7, FINISH_STOP)
    gen = Generation(GenerateConfig.check(V, 2, temperature=0))
    a, b = gen(logits, 3), gen(logits, 4)
    assert (a.index, a.finish, b.index, b.finish) == (0, None, 1, FINISH_MAX)


@pytest.mark.parametrize("seed", [-1, -2, np.int64(-1)])
def test_every_negative_seed_is_refused_naming_the_seed(seed):
    with pytest.raises(InvalidInput) as e:
        SamplingConfig(seed=seed)
    assert e.value.field == "seed"
    assert f"must be an integer >= 0 or None, got {seed!r}" in str(e.value)
    assert SamplingConfig(seed=0).seed == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": np.complex128(1 + 1j)}, "temperature"),
        ({"temperature": np.complex64(1)}, "temperature"),
        ({"top_p": np.complex128(0.5 + 3j)}, "top_p"),
    ],
)
def test_complex_sampling_parameters_are_refused_naming_the_field(kwargs, field):
    """check_params accepts any np.number, which includes numpy complex scalars: a complex
    temperature passes (the imaginary part is dropped by a ComplexWarning in the range
    check) and probabilities() then returns complex "probabilities"."""
    with pytest.raises(InvalidInput) as e:
        SamplingConfig(**kwargs)
    assert e.value.field == field


def test_probabilities_are_real_float64_for_any_accepted_temperature():
    z = np.array([1.0, 2.0, 3.0])
    try:
        p = probabilities(z, np.complex128(1 + 1j))
    except InvalidInput:
        return  # refused: fine
    assert p.dtype == np.float64 and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, reference",
    [
        ({"temperature": Fraction(1, 2)}, {"temperature": 0.5}),
        (
            {"temperature": np.float16(0.5), "top_p": Fraction(3, 4)},
            {"temperature": 0.5, "top_p": 0.75},
        ),
        ({"top_k": np.uint8(50)}, {"top_k": 50}),  # V - top_k overflowed uint8 (V = 256)
        ({"top_k": np.int8(3), "top_p": np.float32(0.5)}, {"top_k": 3, "top_p": 0.5}),
    ],
)
def test_any_real_or_integer_type_samples_as_its_python_value(kwargs, reference):
    """Accepted types are used as the numbers they are: a Fraction temperature had made
    object arrays (TypeError in np.exp) and a uint8 top_k overflowed in V - top_k."""
    z = np.random.default_rng(1).standard_normal(256)
    p = probabilities(z, **kwargs)
    np.testing.assert_allclose(p, probabilities(z, **reference), rtol=1e-6, atol=1e-15)
    config = SamplingConfig(**kwargs, seed=7)
    assert {type(config.temperature), type(config.top_k), type(config.top_p)} <= {float, int}
    draws = [Sampler(config)(z) for _ in range(3)]
    assert draws == [Sampler(SamplingConfig(**reference, seed=7))(z)] * 3


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"temperature": 10**400}, "temperature", "must be finite and >= 0, got inf"),
        ({"top_p": 10**400}, "top_p", "must be in [0, 1] (0 or 1 = off), got inf"),
        ({"top_p": -(10**400)}, "top_p", "must be in [0, 1] (0 or 1 = off), got -inf"),
    ],
)
def test_ints_beyond_float_range_are_refused_naming_the_field(kwargs, field, words):
    """They had escaped as OverflowError from math.isfinite."""
    with pytest.raises(InvalidInput) as e:
        SamplingConfig(**kwargs)
    assert e.value.field == field and words in str(e.value)


class _FixedDraw:
    """A stand-in generator whose uniform draw is always `u` (numpy's `random()` gives
    values in [0, 1), 0.0 included)."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize(
    "logits, kwargs",
    [
        (np.array([-np.inf, 0.0, 0.3]), {}),  # a masked token first
        (np.array([0.1, 2.0, 1.5, 0.0]), {"top_k": 2}),  # filtered out by top-k
        (np.array([0.1, 2.0, 1.5, 0.0]), {"top_p": 0.5}),  # filtered out by top-p
    ],
)
def test_the_lowest_draw_picks_the_first_token_that_has_probability(logits, kwargs):
    """A uniform draw of exactly 0 selects the first token of positive probability, never
    a token of probability 0 before it (masked by -inf or filtered out)."""
    p = probabilities(logits, 1.0, **kwargs)
    want = int(np.flatnonzero(p > 0)[0])
    assert p[0] == 0.0
    assert sample(logits, 1.0, rng=_FixedDraw(0.0), **kwargs) == want


def test_top_p_one_is_off_and_keeps_tokens_of_tiny_probability():
    """top_p = 1 filters nothing: a token whose probability is below float64 resolution
    next to 1 (the running sum already reads 1.0 before it) keeps its probability."""
    logits = np.array([0.0, -40.0, -45.0])
    p = probabilities(logits, 1.0, top_p=1.0)
    want = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=0)
    assert (p > 0).all()


def test_logprobs_of_large_logits_are_finite_and_exact():
    """The log-probability a generated token reports is log_softmax of the logits, also for
    logits whose exponentials overflow float64 (only their differences matter)."""
    logits = np.array([1000.0, 999.0, -1000.0], np.float32)
    cfg = GenerateConfig.check(3, 1, temperature=0.0)
    g = Generation(cfg)(logits, position=4)
    want = -np.log1p(np.exp(-1.0) + np.exp(-2000.0))  # token 0 against the others
    assert g.token == 0 and g.finish == FINISH_MAX
    assert g.logprob == pytest.approx(want, rel=1e-12)
