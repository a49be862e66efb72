"""Token ids the clients refuse before sending: the ValueError names the item that is not an
integer (numpy makes [1, None] an object array and [1, 2.5] a float one, whose first item is
a fine token), says what to give for text (a byte-level model reads bytes), and says to make
a one-shot iterator a list (numpy keeps it whole, as one object). Nothing listens on port 1:
every refusal comes before a request is sent."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.client import AsyncClient, Client, step_request

NOWHERE = "127.0.0.1:1"

NAMED = [
    ([1, None], "got None (object)"),
    ([1, 2.5, 3], "got 2.5 (float64)"),
    ([[1, 2], [3, 4.5]], "got 4.5 (float64)"),
    ([7.0, 8], "got 7.0 (float64)"),  # whole numbers as floats: the first is named
    ([1, "a"], "got 'a' (<U21)"),
    ([[1, 2], [3, "a"]], "got 'a' (<U21)"),  # numpy made the ints '1', '2', '3' too
    ([1, 2, True, None], "got True (object)"),
    ("hi", "got the text 'hi'; a byte-level model takes its bytes (b'...', or text.encode())"),
    (iter([1, 2]), "must be a list, bytes or an array of integers, got a list_iterator"),
]


@pytest.mark.parametrize(("tokens", "said"), NAMED, ids=lambda v: repr(v)[:20])
def test_the_refused_token_is_the_item_that_is_not_an_integer(tokens, said):
    with Client(NOWHERE) as c:
        with pytest.raises(ValueError, match="^tokens: must be ") as e:
            c.session("s").step(tokens=tokens)
    assert said in str(e.value)


def test_both_clients_name_the_prompt_item_of_a_generate():
    async def async_refusal() -> str:
        async with AsyncClient(NOWHERE) as c:
            with pytest.raises(ValueError) as e:
                await anext(c.session("s").generate([65, np.float32(0.5)]))
        return str(e.value)

    with Client(NOWHERE) as c:
        with pytest.raises(ValueError) as e:
            next(c.session("s").generate([65, np.float32(0.5)]))
    said = "prompt: must be integers, got 0.5 (float64)"
    assert str(e.value) == asyncio.run(async_refusal()) == said


def test_integers_in_every_accepted_form_still_pass():
    """bytes are byte ids; numpy integers of any width, ranges and nested lists pass as the
    same ids, flattened."""
    given = (b"hi", [104, 105], np.array([[104], [105]], dtype=np.uint8), range(104, 106))
    assert [list(step_request("s", tokens=t).tokens) for t in given] == [[104, 105]] * 4
