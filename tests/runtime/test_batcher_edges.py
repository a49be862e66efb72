"""Batcher edges: per-session bookkeeping does not pile up, and each decision of the
scheduler (what waits, what runs, what is counted) shows in what the clients get."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from async_helpers import run, stepped_with_history
from async_helpers import started_batcher as started

pytestmark = pytest.mark.timeout(120)


def test_sessions_that_queued_requests_leave_no_queue_behind(toy_tok):
    # each session's queue of waiting requests is dropped once it empties: a server whose
    # clients each sent a few requests at once kept one empty queue per session it had served
    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        for _ in range(20):
            s = store.create()
            await asyncio.gather(*(batcher.step(s, np.array([t])) for t in (1, 2, 3)))
            store.close(s.id)
        waiting = dict(batcher._waiting)
        await batcher.close()
        return waiting

    assert run(main()) == {}


async def _warm(batcher, store, n: int):
    """n sessions, each with one step done together (all of them active now)."""
    sessions = [store.create() for _ in range(n)]
    await asyncio.gather(*(batcher.step(s, np.array([1])) for s in sessions))
    return sessions


def test_a_closed_sessions_queued_step_does_not_stand_in_for_an_active_session(toy_tok):
    # B's step is queued when B closes: the batch still waits for A, which is active and
    # has not sent its step yet (B's queued step must not count both as B's and as A's)
    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.5)
        a, b, c = await _warm(batcher, store, 3)
        sizes = []
        batcher.add_listener(lambda n, sec: sizes.append(n))
        tb = asyncio.ensure_future(batcher.step(b, np.array([2])))
        tc = asyncio.ensure_future(batcher.step(c, np.array([2])))
        await asyncio.sleep(0)  # both queued, the scheduler not run yet
        store.close(b.id)
        await asyncio.sleep(0.05)
        _, pos = await batcher.step(a, np.array([2]))
        await asyncio.gather(tb, tc, return_exceptions=True)
        await batcher.close()
        return sizes, pos

    sizes, pos = run(main())
    assert pos == 2
    assert sizes == [2]  # C and A in one call (B, closed, stepped nothing)


def test_a_session_closed_while_its_step_was_queued_is_not_waited_for_afterwards(toy_tok):
    # B closes while its step is queued: once that step is done, B sends no more, so the
    # stream left alone (A) does not sit out the batch delay for it
    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.5)
        a, b, c = await _warm(batcher, store, 3)
        ta = asyncio.ensure_future(batcher.step(a, np.array([2])))
        tb = asyncio.ensure_future(batcher.step(b, np.array([2])))
        await asyncio.sleep(0)  # both queued, the scheduler not run yet
        store.close(b.id)
        store.close(c.id)
        await asyncio.gather(ta, tb, return_exceptions=True)
        t0 = asyncio.get_running_loop().time()
        _, pos = await batcher.step(a, np.array([3]))
        waited = asyncio.get_running_loop().time() - t0
        await batcher.close()
        return waited, pos

    waited, pos = run(main())
    assert pos == 3
    assert waited < 0.25  # not the 0.5 s batch delay


def test_a_rewind_to_the_position_a_session_is_at_replays_nothing(toy_tok):
    # already there: its state stays as it is, bit for bit, and no onnxruntime call runs
    async def main():
        batcher, store, s = await stepped_with_history(toy_tok)
        before, calls = store.read(s).copy(), batcher.stats.batches
        position = await batcher.rewind(s, 3)
        after, calls_after = store.read(s).copy(), batcher.stats.batches
        await batcher.close()
        return position, before, after, calls, calls_after

    position, before, after, calls, calls_after = run(main())
    assert position == 3
    np.testing.assert_array_equal(after, before)
    assert calls_after == calls


def test_a_step_refused_at_the_largest_position_runs_no_empty_call(toy_tok):
    # two steps queued together at MAX - 1: the first applies, the second is refused when
    # it runs; the batch left with no session to step makes no onnxruntime call
    from ssmstream.runtime.errors import OutOfRange
    from ssmstream.runtime.snapshots import MAX_POSITION

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, inline=False)
        zero = np.zeros(toy_tok.state_size, np.float32)
        s = store.restore(store.pack_state(zero, MAX_POSITION - 1))
        sizes = []
        batcher.add_listener(lambda n, sec: sizes.append(n))
        got = await asyncio.gather(
            batcher.step(s, np.array([1])), batcher.step(s, np.array([2])), return_exceptions=True
        )
        stats = batcher.stats
        await batcher.close()
        return got, sizes, stats

    got, sizes, stats = run(main())
    assert got[0][1] == MAX_POSITION and isinstance(got[1], OutOfRange)
    assert sizes == [1] and stats.batches == 1 and stats.batch_sizes == {1: 1}


def test_steps_and_prefills_keep_alternating_while_both_wait(toy_tok):
    # after a prefill the steps' turn comes back: a second waiting prefill goes after them
    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0, inline=False)
        a, b, c = store.create(), store.create(), store.create()
        order = []
        futs = {
            "a-prefill": asyncio.ensure_future(batcher.step(a, np.arange(5) % 11)),
            "c-prefill": asyncio.ensure_future(batcher.step(c, np.arange(4) % 11)),
            "b-step-1": asyncio.ensure_future(batcher.step(b, np.array([1]))),
            "b-step-2": asyncio.ensure_future(batcher.step(b, np.array([2]))),
        }
        await asyncio.sleep(0)  # all queued (b's second behind its first)
        for name, f in futs.items():
            f.add_done_callback(lambda _, name=name: order.append(name))
        await asyncio.gather(*futs.values())
        await batcher.close()
        return order

    assert run(main()) == ["b-step-1", "a-prefill", "b-step-2", "c-prefill"]
