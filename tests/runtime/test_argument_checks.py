"""The shared argument checks of runtime/errors.py: what they accept, and the words of a refusal."""

from fractions import Fraction

import numpy as np
import pytest
from ssmstream.runtime.errors import InvalidInput, integer, real_number


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.uint8(7), 2**70])
def test_integer_accepts_any_integral_number_and_returns_a_python_int(value):
    got = integer(value, "n")
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize(
    "value, kwargs, words",
    [
        (True, {}, "n: must be an integer >= 0, got True"),
        (np.bool_(True), {}, "n: must be an integer >= 0, got np.True_"),
        (1.0, {}, "n: must be an integer >= 0, got 1.0"),
        (Fraction(1), {}, "n: must be an integer >= 0, got Fraction(1, 1)"),
        ("3", {}, "n: must be an integer >= 0, got '3'"),
        (None, {}, "n: must be an integer >= 0, got None"),
        (-1, {}, "n: must be an integer >= 0, got -1"),
        (0, {"low": 1}, "n: must be a positive integer, got 0"),
        (5, {"low": 2, "high": 4}, "n: must be an integer in [2, 4], got 5"),
        (np.int64(-1), {"none": True}, "n: must be an integer >= 0 or None, got np.int64(-1)"),
        (-1, {"note": " (0 = off)"}, "n: must be an integer >= 0 (0 = off), got -1"),
    ],
)
def test_integer_refuses_naming_the_field_and_the_bounds(value, kwargs, words):
    with pytest.raises(InvalidInput) as e:
        integer(value, "n", **kwargs)
    assert e.value.field == "n" and str(e.value) == words


def test_integer_passes_none_only_when_asked():
    assert integer(None, "n", none=True) is None
    assert integer(3, "n", 1, 3, none=True) == 3


@pytest.mark.parametrize(
    "value, want", [(2, 2.0), (np.float32(0.5), 0.5), (Fraction(1, 4), 0.25), (-(10**400), -np.inf)]
)
def test_real_number_is_a_float_and_an_int_beyond_float_range_is_infinite(value, want):
    got = real_number(value, "x")
    assert got == want and type(got) is float


@pytest.mark.parametrize("value", [True, "1", None, 1j])
def test_real_number_refuses_what_is_not_a_real_number(value):
    with pytest.raises(InvalidInput, match=r"^x: must be seconds, got "):
        real_number(value, "x", "seconds")
