"""Values past float32's range (|x| > 3.4e38) are refused by the client, naming `values`,
before any request: they were sent as inf, after a numpy RuntimeWarning about the cast, for
the server to refuse as "NaN or inf". NaN and inf given as such still go to the server,
which names them; the largest float32 goes through as it is."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
from ssmstream.runtime.client import AsyncClient, Client, step_request

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    "values, shown",
    [([1e39], "1e+39"), ([0.5, -1e39], "-1e+39"), (np.array([[1.0], [1e300]]), "1e+300")],
)
def test_values_past_float32_are_refused_without_a_numpy_warning(values, shown):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as e:
            step_request("s", values=values)
    assert str(e.value) == f"values: must fit in float32 (|x| <= 3.4e38), got {shown}"


def test_session_steps_refuse_them_before_any_call():
    """Nothing listens on port 1: a call would fail UNAVAILABLE, not with the ValueError."""

    async def async_step():
        async with AsyncClient("127.0.0.1:1", timeout=5) as c:
            with pytest.raises(ValueError, match="^values: must fit in float32"):
                await c.session("abc").step(values=[2e38, 4e38])

    with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(ValueError, match="^values: must fit in float32"):
            c.session("abc").step(values=[2e38, 4e38])
    asyncio.run(async_step())


def test_the_float32_range_itself_and_non_finite_values_are_sent():
    sent = step_request("s", values=[F32_MAX, -F32_MAX, np.inf, 0.25]).values
    assert list(sent[:2]) == [F32_MAX, -F32_MAX] and sent[2] == np.inf and sent[3] == 0.25
    assert np.isnan(step_request("s", values=[np.nan]).values[0])
