"""A batch delay that ran out with nothing left to run (its step was cancelled while it
waited) does not keep later steps from getting a delay of their own: the next step still
runs within max_batch_delay, not when some other request happens to wake the scheduler."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.timeout(60)

D = 0.05  # max_batch_delay


async def _two_active(engine) -> tuple[Batcher, SessionStore, object, object]:
    """A batcher with sessions a and b both active (each stepped once), so a step of one
    waits up to D for the other."""
    store = SessionStore(engine.state_size, capacity=4)
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=D, activity_window=30.0)
    await batcher.start()
    a, b = store.create(), store.create()
    await asyncio.gather(batcher.step(a, np.array([1])), batcher.step(b, np.array([2])))
    return batcher, store, a, b


def test_a_step_after_a_cancelled_one_whose_delay_ran_out_still_runs(toy_tok):
    async def main():
        batcher, store, a, b = await _two_active(toy_tok)
        waiting = asyncio.ensure_future(batcher.step(a, np.array([3])))
        await asyncio.sleep(0)  # queued; it waits for b up to D
        waiting.cancel()
        await asyncio.sleep(2 * D)  # its deadline passed: nothing was left to run
        assert a.position == 1 and batcher.pending() == 0
        # the next step of a waits for b again, and runs at its own deadline
        try:
            y, pos = await asyncio.wait_for(batcher.step(a, np.array([4])), 20 * D)
        except asyncio.TimeoutError:
            return None  # not closed: close() would wait for that step for ever
        await batcher.close()
        return y, pos, batcher.stats.cancelled

    got = run(main())
    assert got is not None, f"the step did not run within {20 * D} s"
    y, pos, cancelled = got
    assert pos == 2 and cancelled == 1
    x = toy_tok.new_state()
    _, x = toy_tok.step(np.array([1]), x)
    want, _ = toy_tok.step(np.array([4]), x)  # the cancelled input never applied
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))
