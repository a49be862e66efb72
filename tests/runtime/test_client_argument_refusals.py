"""Arguments of the clients' constructors and `session()` handles that no call sends: both
clients refuse a wrong one when it is given, with a ValueError naming the argument, instead
of keeping it (a position that is no integer) or leaving it to grpc (options that are no
(name, value) pairs: a bare unpacking error, the asyncio client's only at its first call).
Nothing listens on port 1: no test here makes a call."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.client import AsyncClient, Client

NOWHERE = "127.0.0.1:1"
DEFAULT_OPTION = ("grpc.max_receive_message_length", 64 * 1024 * 1024)


@pytest.mark.parametrize("position", ["3", -5, None, 2.0, True], ids=repr)
def test_a_handle_refuses_a_position_that_is_not_a_count(position):
    async def async_handle():
        async with AsyncClient(NOWHERE) as c:
            with pytest.raises(ValueError, match="^position: "):
                c.session("abc", position)

    with Client(NOWHERE) as c:
        with pytest.raises(ValueError, match="^position: "):
            c.session("abc", position)
    asyncio.run(async_handle())


def test_a_handle_takes_a_numpy_position_as_an_int():
    with Client(NOWHERE) as c:
        h = c.session("abc", np.int64(7))
    a = AsyncClient(NOWHERE).session("abc", np.uint32(7))
    assert (h.position, a.position) == (7, 7)
    assert type(h.position) is int and type(a.position) is int


@pytest.mark.parametrize(
    "options",
    [{"grpc.enable_retries": 0}, 5, ["ab"], [("grpc.enable_retries",)], [(1, 0)]],
    ids=repr,
)
@pytest.mark.parametrize("cls", [Client, AsyncClient], ids=lambda c: c.__name__)
def test_options_that_are_not_name_value_pairs_are_refused_when_given(cls, options):
    with pytest.raises(ValueError, match="^options: must be \\(name, value\\) pairs"):
        cls(NOWHERE, options=options)


@pytest.mark.parametrize("cls", [Client, AsyncClient], ids=lambda c: c.__name__)
def test_options_pairs_go_first_and_none_is_none(cls):
    """A list of pairs (tuples or lists) is passed on before the client's default, which
    grpc then ignores for a name given twice; None adds nothing."""
    given = cls(NOWHERE, options=[["grpc.enable_retries", 0], ("grpc.max_send_message_length", 9)])
    none = cls(NOWHERE, options=None)
    assert given.options[:2] == [("grpc.enable_retries", 0), ("grpc.max_send_message_length", 9)]
    assert given.options[2:] == none.options  # the defaults: the receive limit, keepalive
    assert none.options[0] == DEFAULT_OPTION
    assert dict(none.options)["grpc.keepalive_time_ms"] == 300_000
    for c in (given, none):
        c.close() if cls is Client else asyncio.run(c.close())
