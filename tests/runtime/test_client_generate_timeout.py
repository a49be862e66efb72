"""`generate(..., timeout=s)` bounds the whole generation (the clients' own `timeout` bounds
each unary call only): past it the iterator raises DEADLINE_EXCEEDED, the server has
stopped the generation as for a cancel, and the session goes on. A generation longer than
the client's unary timeout, given none of its own, runs to its end."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import AsyncClient, Client

N = 100_000  # tokens no generation here reaches in its timeout


@pytest.fixture(scope="module")
def real(toy_token_model):
    with serve(toy_token_model["model_dir"], max_new_tokens=N) as s:
        yield s


def test_a_generation_past_its_timeout_ends_with_deadline_exceeded(real):
    with Client(target(real), timeout=30) as c:
        s = c.create_session()
        got, t0 = [], time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            for g in s.generate([1], max_new_tokens=N, timeout=0.3):
                got.append(g)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.25 < time.monotonic() - t0 < 10 and 0 < len(got) < N
        assert s.rewind(s.position) == got[-1].position  # the session goes on
        with pytest.raises(grpc.RpcError) as e:
            list(s.regenerate(1, [2], max_new_tokens=N, timeout=0.3))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_clients_unary_timeout_does_not_cut_a_generation(real):
    with Client(target(real), timeout=0.05) as c:
        t0 = time.monotonic()
        got = [g.token for g in c.generate([1], max_new_tokens=4096)]
        assert len(got) == 4096 and time.monotonic() - t0 > 0.05  # longer than the timeout


def test_an_async_generation_past_its_timeout_ends_with_deadline_exceeded(real):
    async def main():
        async with AsyncClient(target(real), timeout=30) as c:
            s = await c.create_session()
            got = []
            with pytest.raises(grpc.RpcError) as e:
                async for g in s.generate([1], max_new_tokens=N, timeout=0.3):
                    got.append(g)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < len(got) < N
            assert await s.rewind(s.position) == got[-1].position
            with pytest.raises(grpc.RpcError) as e:
                async for _ in s.regenerate(1, [2], max_new_tokens=N, timeout=0.3):
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_bad_generation_timeout_is_refused_naming_it(real, timeout):
    with Client(target(real)) as c:
        s = c.create_session()
        with pytest.raises(ValueError, match="^timeout: must be > 0 seconds"):
            next(s.generate([1], timeout=timeout))
        with pytest.raises(ValueError, match="^timeout: must be > 0 seconds"):
            s.regenerate(0, [1], timeout=timeout)  # checked before any call
        assert s.snapshot() and s.position == 0  # nothing ran
