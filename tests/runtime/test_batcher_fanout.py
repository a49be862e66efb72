"""Batcher: an onnxruntime failure reaches every request of the failed call, a failed step run
on the event loop lets go of its session, a close finishes the queued requests of every
session, and a prefill whose session closes while it runs says NOT_FOUND."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import EngineFailure, SessionNotFound
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(engine, **kw) -> tuple[Batcher, SessionStore]:
    store = SessionStore(engine.state_size, capacity=8, clock=kw.pop("clock", time.monotonic))
    batcher = Batcher(engine, store, **kw)
    await batcher.start()
    return batcher, store


def test_a_failed_step_call_fails_every_session_in_it_alike(toy_tok, monkeypatch):
    """Two sessions stepped in one onnxruntime call that fails: both get the engine's error
    (not NOT_FOUND), both keep their state and position, and both step again afterwards."""
    sizes = []

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.05, inline=False)
        batcher.add_listener(lambda n, sec: sizes.append(n))
        a, b = store.create(), store.create()
        await asyncio.gather(batcher.step(a, np.array([1])), batcher.step(b, np.array([2])))
        before = [store.read(a), store.read(b)]

        def broken(*args, **kwargs):
            raise EngineFailure("simulated onnxruntime failure")

        with monkeypatch.context() as m:
            m.setattr(toy_tok, "run_slots", broken)
            got = await asyncio.gather(
                batcher.step(a, np.array([3])),
                batcher.step(b, np.array([4])),
                return_exceptions=True,
            )
        after = [store.read(a), store.read(b)], [a.position, b.position]
        again = await asyncio.gather(batcher.step(a, np.array([3])), batcher.step(b, np.array([4])))
        await batcher.close()
        return got, before, after, [pos for _, pos in again]

    got, before, (states, positions), again = run(main())
    assert sizes == [2, 2, 2]  # each pair ran as one call, the failed one too
    for e in got:
        assert isinstance(e, EngineFailure) and "simulated" in str(e), e
    for state, want in zip(states, before):
        np.testing.assert_array_equal(state, want)
    assert positions == [1, 1] and again == [2, 2]


def test_a_failed_step_run_on_the_event_loop_leaves_its_session_unpinned(toy_tok, monkeypatch):
    """A lone stream's step fails on the event loop: the session is not left pinned, so an
    idle sweep past its TTL still evicts it."""
    now = [0.0]

    async def main():
        batcher, store = await started(
            toy_tok, max_batch_delay=0.0, activity_window=30.0, clock=lambda: now[0]
        )
        s = store.create()
        await batcher.step(s, np.array([1]))

        def broken(*args, **kwargs):
            raise EngineFailure("simulated onnxruntime failure")

        with monkeypatch.context() as m:
            m.setattr(toy_tok, "run_slots", broken)
            with pytest.raises(EngineFailure, match="simulated"):
                await batcher.step(s, np.array([2]))
        inline, pinned = batcher.stats.inline, s.pinned
        now[0] += store.ttl + 1.0
        evicted = store.evict_idle()
        await batcher.close()
        return inline, pinned, evicted, s.id

    inline, pinned, evicted, sid = run(main())
    assert inline == 2  # the path under test: both steps ran on the event loop
    assert not pinned and evicted == [sid]


def test_close_finishes_the_queued_requests_of_every_session(toy_tok):
    """One session per call (max_batch=1): a close that starts while three sessions' steps
    are queued returns only after all three ran, each applied once."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=1, max_batch_delay=0.0, inline=False)
        sessions = [store.create() for _ in range(3)]
        steps = [asyncio.ensure_future(batcher.step(s, np.array([1]))) for s in sessions]
        await asyncio.sleep(0)  # queued
        await batcher.close()
        got = [t.result()[1] if t.done() else None for t in steps]
        for t in steps:
            t.cancel()  # one left queued would never run now
        return got, [s.position for s in sessions]

    got, positions = run(main())
    assert got == [1, 1, 1] == positions


def test_a_prefill_whose_session_closes_while_it_runs_is_not_found(toy_tok, monkeypatch):
    """The session is closed while its prefill's onnxruntime call runs: the request fails
    NOT_FOUND "closed" (not an internal engine failure), and the batcher keeps serving."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s, other = store.create(), store.create()
        real = toy_tok.prefill_unchecked

        def closing(*args, **kwargs):
            store.close(s.id)
            return real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(toy_tok, "prefill_unchecked", closing)
            with pytest.raises(SessionNotFound) as e:
                await batcher.step(s, np.arange(3))
        _, pos = await batcher.step(other, np.arange(3))
        failed = batcher.stats.failed
        await batcher.close()
        return e.value.reason, pos, failed

    assert run(main()) == ("closed", 3, 1)


def test_a_scheduler_failure_fails_the_queued_requests_instead_of_hanging(toy_tok):
    """A bug while forming a batch: every queued request fails with an engine failure
    (none waits for ever), nothing applies, and the next requests are served."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, inline=False)
        a, b = store.create(), store.create()

        def broken():
            raise RuntimeError("simulated scheduler bug")

        batcher._take_steps = broken
        got = await asyncio.wait_for(
            asyncio.gather(
                batcher.step(a, np.array([1])),
                batcher.step(b, np.array([2])),
                return_exceptions=True,
            ),
            5,
        )
        left = a.position, b.position, a.pinned, b.pinned, batcher.pending()
        del batcher._take_steps
        _, pos = await batcher.step(a, np.array([1]))
        await batcher.close()
        return got, left, pos

    got, left, pos = run(main())
    for e in got:
        assert isinstance(e, EngineFailure) and "scheduler failed" in str(e), e
    assert left == (0, 0, False, False, 0) and pos == 1
