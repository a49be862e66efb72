"""Batcher behaviour at its edges:

- a negative max_queue_per_session is refused (it would refuse every queued request);
- max_batch bounds the sessions of one step job, so with max_batch=1 (batching off) a
  prefill waiting behind a step goes before the next session's step;
- a rewind whose session is closed while the worker replays it (the history released under
  it) answers NOT_FOUND "closed", not the history's OUT_OF_RANGE.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import InvalidInput, SessionNotFound
from ssmstream.runtime.history import History
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.timeout(120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(engine, **kw) -> tuple[Batcher, SessionStore]:
    store = SessionStore(engine.state_size, capacity=kw.pop("capacity", 64))
    batcher = Batcher(engine, store, **kw)
    await batcher.start()
    return batcher, store


@pytest.mark.parametrize("bad", [-1, -5])
def test_a_negative_max_queue_per_session_is_refused(toy_tok, bad):
    store = SessionStore(toy_tok.state_size)
    with pytest.raises(InvalidInput) as e:
        Batcher(toy_tok, store, max_queue_per_session=bad)
    assert e.value.field == "max_queue_per_session"


def test_max_batch_one_runs_one_session_per_step_job_so_a_waiting_prefill_goes_next(toy_tok):
    """max_batch=1: steps of a and b and a prefill of c, queued together, run a, c, b
    (one step job holds at most max_batch sessions; after it the waiting prefill goes
    first; a batch of a and b in one job before c would exceed it)."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=1, max_batch_delay=0.0, inline=False)
        try:
            a, b, c = store.create(), store.create(), store.create()
            order = []
            futs = {
                "a-step": asyncio.ensure_future(batcher.step(a, np.array([1]))),
                "b-step": asyncio.ensure_future(batcher.step(b, np.array([2]))),
                "c-prefill": asyncio.ensure_future(batcher.step(c, np.arange(5) % 11)),
            }
            for name, f in futs.items():
                f.add_done_callback(lambda _, name=name: order.append(name))
            await asyncio.gather(*futs.values())
            return order, dict(batcher.stats.batch_sizes)
        finally:
            await batcher.close()

    order, sizes = run(main())
    assert order == ["a-step", "c-prefill", "b-step"]
    assert sizes == {1: 2}


def test_a_rewind_whose_session_closes_while_it_replays_is_not_found(toy_tok):
    """The close lands on the event loop while the worker is inside the rewind (after its
    liveness check): the released history's OutOfRange must come back as NOT_FOUND
    "closed" (not the OutOfRange itself, OUT_OF_RANGE to the client)."""

    async def main():
        batcher, store = await started(toy_tok, capacity=4, max_batch_delay=0.0, inline=False)
        try:
            s = store.create("", "a")
            h = History(8, 4, 0, store.read(s))
            s.history = h
            assert (await batcher.step(s, np.array([1, 2, 3])))[1] == 3
            plan = h.plan

            def plan_racing_a_close(position):
                store.close("a")  # the session ends here, mid-rewind (its history released)
                return plan(position)

            h.plan = plan_racing_a_close
            with pytest.raises(SessionNotFound) as e:
                await batcher.rewind(s, 1)
            assert e.value.reason == "closed" and e.value.session_id == "a"
        finally:
            await batcher.close()

    run(main())
