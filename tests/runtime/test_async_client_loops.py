"""An AsyncClient and the event loops that use it: one made outside any loop (at import
time, then used in `asyncio.run(main())`) works, as does one used by successive
`asyncio.run` calls (its channel opens in the loop of its first call, and again in a later
loop: grpc.aio binds a channel to the loop it was made in, and every call failed "attached to
a different loop"); a loop running in another thread while the client's is still running is
refused, naming the rule. Results are checked against the sync client's."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import AsyncClient, Client


@pytest.fixture(scope="module")
def srv(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


def _sync_outputs(srv, feeds: list[list[int]]) -> list[np.ndarray]:
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        return [s.step(tokens=f).outputs for f in feeds]


def test_an_async_client_made_outside_the_event_loop_works_in_asyncio_run(srv):
    """Each kind of call, on a session of its own (a Stream or Generate holds its session
    until the server has seen it end)."""
    c = AsyncClient(target(srv), timeout=10)  # as at module level: no loop runs yet

    async def main():
        info = await c.info()
        stepped = await (await c.create_session()).step(tokens=[1, 2])
        streamed = [r async for r in (await c.create_session()).stream([[1, 2]])]
        async with (await c.create_session()).open_stream() as st:
            sent = await st.send(tokens=[1, 2])
        generated = [g async for g in c.generate([1, 2], max_new_tokens=1, temperature=0.0)]
        await c.close()
        return info, stepped, streamed, sent, generated

    info, stepped, streamed, sent, generated = asyncio.run(asyncio.wait_for(main(), 30))
    (want,) = _sync_outputs(srv, [[1, 2]])
    assert info.d_output == want.shape[-1] and stepped.position == 2
    for r in (stepped, *streamed, sent):
        np.testing.assert_array_equal(r.outputs, want)
    assert [g.token for g in generated] == [int(np.argmax(want[-1]))]


def test_an_async_client_works_in_successive_asyncio_runs(srv):
    c = AsyncClient(target(srv), timeout=10)
    s = asyncio.run(asyncio.wait_for(c.create_session(), 30))
    got = [asyncio.run(asyncio.wait_for(s.step(tokens=[t]), 30)).outputs for t in (1, 2, 3)]
    assert asyncio.run(asyncio.wait_for(s.close(), 30)) == 3
    asyncio.run(c.close())
    for g, w in zip(got, _sync_outputs(srv, [[1], [2], [3]])):
        np.testing.assert_array_equal(g, w)


def test_a_loop_of_another_thread_is_refused_while_the_clients_loop_runs(srv):
    c = AsyncClient(target(srv), timeout=10)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    try:
        there = asyncio.run_coroutine_threadsafe(c.info(), loop).result(30)
        with pytest.raises(RuntimeError, match="event loop running in another thread"):
            asyncio.run(c.info())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
    here = asyncio.run(asyncio.wait_for(c.info(), 30))  # that loop ended: this one takes over
    asyncio.run(c.close())
    assert here == there
