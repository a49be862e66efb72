"""`stream(inputs)` of both clients' sessions with inputs that are no iterable (None, a
number; an async iterable for the sync client) is a ValueError naming `inputs`, raised
before the call: grpc failed the call with UNKNOWN "Exception iterating requests!", and
the asyncio client's with a CancelledError that no one had asked for. Nothing reaches the
server: the session's position is unchanged, and a stream after it goes on from there."""

from __future__ import annotations

import asyncio

import pytest
from grpc_helpers import position_on_server, serve, target
from ssmstream.runtime.client import AsyncClient, Client


@pytest.fixture(scope="module")
def toy_server(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


async def _items():
    yield [1]


def test_sync_stream_refuses_inputs_that_are_not_iterable(toy_server):
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session(prompt=[1, 2])
        for bad in (None, 5):
            with pytest.raises(ValueError, match="^inputs: must be an iterable of inputs"):
                list(s.stream(bad))
        with pytest.raises(ValueError, match="an async iterable needs AsyncClient$"):
            list(s.stream(_items()))
        assert s.position == position_on_server(toy_server, s.id) == 2
        assert [r.position for r in s.stream([[3], [4]])] == [3, 4]
        s.close()


def test_async_stream_refuses_inputs_that_are_not_iterable(toy_server):
    async def main():
        async with AsyncClient(target(toy_server), timeout=10) as c:
            s = await c.create_session(prompt=[1, 2])
            for bad in (None, 5):
                with pytest.raises(ValueError, match="^inputs: must be an iterable or an async"):
                    [r async for r in s.stream(bad)]
            assert s.position == position_on_server(toy_server, s.id) == 2
            assert [r.position async for r in s.stream(_items())] == [3]
            await s.close()

    asyncio.run(asyncio.wait_for(main(), 30))
