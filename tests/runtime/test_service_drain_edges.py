"""SessionService while draining: what an attached Stream's next step is told, and how
long `settled` waits for the Streams and Generates still open."""

from __future__ import annotations

import asyncio

import pytest
from async_helpers import run, started_service
from ssmstream.runtime.errors import Unavailable
from ssmstream.runtime.service import DRAINING, ServiceLimits, SessionService

LIMITS = ServiceLimits(max_tokens_per_request=8, max_new_tokens=100, max_ttl=60.0)


async def started(engine) -> SessionService:
    return await started_service(engine, LIMITS)


def test_an_attached_streams_next_step_while_draining_is_told_where_its_session_lives_on(toy_tok):
    # the stream's later requests need not repeat the session id: they are still about its
    # session, so they get the session's drain message, not the one for a new session
    async def main():
        svc = await started(toy_tok)
        svc.draining_says = DRAINING["state_dir"]
        a = svc.attach("p")
        _, position = await a.step("", [1])
        a.delivered()
        svc.drain()
        with pytest.raises(Unavailable) as e:
            await a.step("", [2])
        a.detach()
        await svc.batcher.close()
        return str(e.value), position, a.session.position

    said, position, after = run(main())
    assert said == DRAINING["state_dir"]
    assert position == after == 1


def test_settled_waits_for_the_open_streams_to_let_go(toy_tok):
    async def main():
        svc = await started(toy_tok)
        a = svc.attach("p")
        await a.step("", [1])
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, a.detach)
        t0 = loop.time()
        await svc.settled(timeout=5.0)
        waited, still_open = loop.time() - t0, svc.open_streams
        await svc.batcher.close()
        return waited, still_open

    waited, still_open = run(main())
    assert still_open == 0
    assert 0.05 < waited < 4.0


def test_settled_gives_up_after_its_timeout(toy_tok):
    async def main():
        svc = await started(toy_tok)
        a = svc.attach("p")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await svc.settled(timeout=0.2)
        waited, still_open = loop.time() - t0, svc.open_streams
        a.detach()
        await svc.batcher.close()
        return waited, still_open

    waited, still_open = run(main())
    assert still_open == 1
    assert 0.15 < waited < 2.0
