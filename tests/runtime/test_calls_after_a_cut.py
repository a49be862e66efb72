"""A call on a session whose Stream or Generate was just cut (a client's `break` out of a
generation, then at once a rewind, a step or another generate) waits for that call to let
go of the session, up to DETACH_WAIT, instead of being refused: the client is often ahead
of the server's cancel by milliseconds (without the wait, about one generate in four after a
`break` was refused as "attached to an open Generate"). A session a call holds on to is
still refused, after the wait, and the refused call changes nothing."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from async_helpers import run, started_service
from grpc_helpers import serve, target
from ssmstream.runtime import service as service_module
from ssmstream.runtime.client import AsyncClient, Client
from ssmstream.runtime.errors import SessionBusy
from ssmstream.runtime.service import ServiceLimits

LIMITS = ServiceLimits(max_tokens_per_request=8, max_new_tokens=100, max_ttl=60.0, rewind_window=64)


def test_calls_wait_for_an_attachment_that_lets_go(toy_tok, monkeypatch):
    """A step, a rewind and another attachment's first step, made while a Stream holds the
    session, run once it detaches (50 ms later), in the order they came: as it lets go, not
    at the end of the wait (a long one here, so that a loaded machine's slow steps do not
    look like it)."""
    monkeypatch.setattr(service_module, "DETACH_WAIT", 5.0)

    async def main():
        svc = await started_service(toy_tok, LIMITS)
        await svc.create("p", "s")
        a = svc.attach("p")
        await a.step("s", [1, 2, 3])
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, a.detach)
        t0 = time.monotonic()
        step = asyncio.create_task(svc.step("p", "s", [4]))
        await asyncio.sleep(0)  # queued in this order
        rewind = asyncio.create_task(svc.rewind("p", "s", 2))
        await asyncio.sleep(0)
        b = svc.attach("p")
        (_, got), s = await asyncio.gather(step, rewind)
        waited = time.monotonic() - t0
        assert got == 4 and s.position == 2
        assert 0.04 < waited < 2.5
        assert (await b.step("s", [5]))[1] == 3
        b.detach()
        await svc.batcher.close()

    run(main())


def test_a_session_held_past_the_wait_is_refused_changing_nothing(toy_tok, monkeypatch):
    monkeypatch.setattr(service_module, "DETACH_WAIT", 0.15)

    async def main():
        svc = await started_service(toy_tok, LIMITS)
        s, _ = await svc.create("p", "s")
        a = svc.attach("p", "Generate")
        await a.step("s", [1, 2])
        before = svc.store.read(s).copy()
        for call in (
            lambda: svc.step("p", "s", [3]),
            lambda: svc.rewind("p", "s", 1),
            lambda: svc.attach("p").step("s", [3]),
        ):
            t0 = time.monotonic()
            with pytest.raises(SessionBusy, match="attached to an open Generate"):
                await call()
            assert 0.14 < time.monotonic() - t0 < 1.0
        assert s.position == 2 and np.array_equal(svc.store.read(s), before)
        assert (await a.step("", [3]))[1] == 3  # the holder goes on
        a.detach()
        await svc.batcher.close()

    run(main())


def test_of_two_attachments_waiting_one_takes_the_session(toy_tok, monkeypatch):
    """When the holder lets go, the first waiting attachment takes the session; the other
    waits on for the rest of DETACH_WAIT and is refused."""
    monkeypatch.setattr(service_module, "DETACH_WAIT", 0.2)

    async def main():
        svc = await started_service(toy_tok, LIMITS)
        await svc.create("p", "s")
        a, b, c = svc.attach("p"), svc.attach("p"), svc.attach("p")
        await a.step("s", [1])
        asyncio.get_running_loop().call_later(0.05, a.detach)
        got = await asyncio.gather(b.step("s", [2]), c.step("s", [2]), return_exceptions=True)
        assert got[0][1] == 2 and isinstance(got[1], SessionBusy), got
        assert svc.store.get("s", "p").position == 2
        b.detach()
        c.detach()
        assert svc.attached == 0
        await svc.batcher.close()

    run(main())


@pytest.fixture(scope="module")
def real(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


def test_after_a_break_the_next_call_on_the_session_is_served(real):
    """On the real server: a rewind, a step and a generate, each right after a `break` out of
    a generation, are served; the rewind to the handle's position leaves the session at the
    position the last received token was sampled at, from wherever the cut left it (as a
    finished generation leaves it)."""

    async def main():
        async with AsyncClient(target(real), timeout=5) as c:
            s = await c.create_session(prompt=[1, 2])
            for seed in range(8):
                async for g in s.generate([3], max_new_tokens=200, seed=seed):
                    if g.index == 3:
                        break
                assert await s.rewind(s.position) == g.position == s.position
                async for _ in s.generate([4], max_new_tokens=200, seed=seed):
                    break
                await s.step(tokens=[5])

    run(main(), timeout=30)
    with Client(target(real), timeout=5) as c:
        s = c.create_session()
        for _ in range(8):
            for _ in s.generate([1], max_new_tokens=200):
                break
            for _ in s.stream([[1], [2]]):
                break
            s.step(tokens=[3])


def test_the_wait_ends_before_the_calls_deadline(toy_tok):
    """With less time left than DETACH_WAIT (call_time_left, which the servicer sets), the
    refusal comes REFUSAL_TIME before the deadline: a clean FAILED_PRECONDITION, not a
    DEADLINE_EXCEEDED that may or may not have applied."""

    async def main():
        svc = await started_service(toy_tok, LIMITS)
        await svc.create("p", "s")
        a = svc.attach("p")
        await a.step("s", [1])
        service_module.call_time_left.set(lambda: 0.15)
        t0 = time.monotonic()
        with pytest.raises(SessionBusy):
            await svc.step("p", "s", [2])
        assert time.monotonic() - t0 < 0.15  # 0.1 s: 0.15 left less REFUSAL_TIME
        a.detach()
        await svc.batcher.close()

    run(main())


def test_a_step_with_a_short_deadline_on_a_held_session_is_refused_not_expired(real):
    with Client(target(real), timeout=30) as c:
        s = c.create_session()
        with s.open_stream() as st:  # holds the session while it is open
            st.send(tokens=[1])
            t0 = time.monotonic()
            with Client(target(real), timeout=0.3) as short, pytest.raises(grpc.RpcError) as e:
                short.session(s.id).step(tokens=[2])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
            assert time.monotonic() - t0 < 0.3
        assert s.step(tokens=[3]).position == 2  # the refused step changed nothing
