"""Batcher contracts its docstrings state that the other batcher tests leave open: argument
ranges, one worker per start, a closed session refused up front, pins and history bytes
given back, corrupt outputs anywhere in a prefill, the batch-delay deadline of the oldest
step, activity that moves on when a session goes quiet, and the stats' counts."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import (
    INTERNAL_ERROR,
    CorruptState,
    EngineFailure,
    InvalidInput,
    SessionNotFound,
)
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(engine, **kw) -> tuple[Batcher, SessionStore]:
    store = SessionStore(engine.state_size, capacity=kw.pop("capacity", 16))
    batcher = Batcher(engine, store, **kw)
    await batcher.start()
    return batcher, store


def test_max_batch_delay_must_be_under_ten_seconds(toy_tok):
    """The delay lies in [0, 10): 10 s itself is refused naming the field, just under it is
    taken."""
    store = SessionStore(toy_tok.state_size, capacity=2)
    with pytest.raises(InvalidInput) as e:
        Batcher(toy_tok, store, max_batch_delay=10)
    assert e.value.field == "max_batch_delay"
    assert Batcher(toy_tok, store, max_batch_delay=9.5).max_batch_delay == 9.5


def test_a_store_whose_slab_is_on_another_device_index_is_refused(toy_tok):
    """The slab must be on the engine's device, index included: a slab of the same kind on
    another device id is refused naming the store."""
    S = toy_tok.state_size
    other = StateSlab(4, S, toy_tok.device, toy_tok.device_id + 1)
    with pytest.raises(InvalidInput) as e:
        Batcher(toy_tok, SessionStore(S, capacity=4, slab=other))
    assert e.value.field == "store"
    Batcher(toy_tok, SessionStore(S, capacity=4, slab=toy_tok.new_slab(4)))  # its own: fine


def test_a_second_start_starts_no_second_worker(toy_tok):
    """start() on a running batcher does nothing: exactly one worker thread came from the two
    starts (counting only threads that were not there before), and it ends after close()."""

    def engine_threads():
        return {t for t in threading.enumerate() if t.name == "ssmstream-engine" and t.is_alive()}

    before = engine_threads()

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        await batcher.start()
        new = engine_threads() - before
        _, pos = await batcher.step(store.create(), np.array([1]))
        await batcher.close()
        return new, pos

    new, pos = run(main())
    assert len(new) == 1 and pos == 1
    (worker,) = new
    worker.join(5)
    assert not worker.is_alive()


def test_a_step_for_a_closed_session_is_not_found_even_when_its_queue_is_full(toy_tok):
    """A closed session's step is NOT_FOUND "closed" up front, not LIMIT_EXCEEDED because
    requests queued before the close still fill its queue."""

    async def main():
        batcher, store = await started(
            toy_tok, capacity=4, max_batch_delay=0.0, max_queue_per_session=1, inline=False
        )
        try:
            s = store.create("", "a")
            queued = [asyncio.ensure_future(batcher.step(s, np.array([1]))) for _ in range(2)]
            await asyncio.sleep(0)  # one ready or running, one waiting: the queue is full
            store.close("a")
            with pytest.raises(SessionNotFound) as e:
                await batcher.step(s, np.array([2]))
            assert e.value.reason == "closed"
            await asyncio.gather(*queued, return_exceptions=True)
        finally:
            await batcher.close()

    run(main())


def test_a_lone_streams_steps_leave_its_session_unpinned_and_evictable(toy_tok):
    """Steps run on the event loop pin the session only while they run: afterwards it is
    not pinned, and an idle sweep past its TTL evicts it."""
    now = [0.0]

    async def main():
        store = SessionStore(toy_tok.state_size, capacity=4, ttl=10.0, clock=lambda: now[0])
        batcher = Batcher(toy_tok, store, max_batch_delay=0.0, activity_window=30.0)
        await batcher.start()
        s = store.create()
        for t in (1, 2, 3):
            await batcher.step(s, np.array([t]))
        inline, pinned = batcher.stats.inline, s.pinned
        now[0] += 100.0
        evicted = store.evict_idle()
        await batcher.close()
        return inline, pinned, evicted, s.id, s.live

    inline, pinned, evicted, sid, live = run(main())
    assert inline == 3  # the path under test: every step ran on the event loop
    assert not pinned and evicted == [sid] and not live


def test_non_finite_outputs_early_in_a_prefill_are_corrupt_state(toy_tok, monkeypatch):
    """The outputs of every input of a request are checked, not only the last: a prefill
    whose first output comes out NaN raises CorruptState."""
    real = toy_tok.prefill_unchecked

    def nan_first(*a, **k):
        outputs, state = real(*a, **k)  # [1, T, D], [1, S]
        outputs = outputs.copy()
        outputs[0, 0, 0] = np.nan
        return outputs, state

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s = store.create()
        monkeypatch.setattr(toy_tok, "prefill_unchecked", nan_first)
        try:
            with pytest.raises(CorruptState):
                await batcher.step(s, np.array([1, 2, 3]))
        finally:
            monkeypatch.setattr(toy_tok, "prefill_unchecked", real)
            await batcher.close()

    run(main())


def test_the_batch_delay_runs_from_the_oldest_step_waiting(toy_tok):
    """A step waits at most max_batch_delay for others: a later step joining its batch does
    not push the deadline back (three sessions active, one silent, so the batch never
    completes and runs at the first step's deadline)."""
    D = 0.75  # b joins at 2/3 D: D/3 to spare, and D/3 below the 5/3 D of a late deadline

    async def main():
        batcher, store = await started(
            toy_tok, max_batch=8, max_batch_delay=D, activity_window=30.0, inline=False
        )
        a, b, c = store.create(), store.create(), store.create()
        await asyncio.gather(*(batcher.step(s, np.array([1])) for s in (a, b, c)))  # all active
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asyncio.ensure_future(batcher.step(a, np.array([2])))
        await asyncio.sleep(2 * D / 3)
        second = asyncio.ensure_future(batcher.step(b, np.array([3])))
        (_, pos_a), (_, pos_b) = await asyncio.gather(first, second)
        waited = loop.time() - t0
        await batcher.close()
        return waited, pos_a, pos_b, dict(batcher.stats.batch_sizes)

    waited, pos_a, pos_b, sizes = run(main())
    assert (pos_a, pos_b) == (2, 2) and sizes == {3: 1, 2: 1}  # a and b in one call
    assert D - 0.05 <= waited < 4 * D / 3  # its own deadline; not the later step's, 5/3 D


def test_a_stream_left_alone_runs_inline_once_the_others_went_quiet(toy_tok):
    """Activity follows the latest request of each session: when b goes quiet past the
    activity window while a keeps stepping, a is the only active session again and its
    steps run on the event loop."""
    window = 0.05

    async def main():
        batcher, store = await started(
            toy_tok, max_batch=8, max_batch_delay=0.0, activity_window=window
        )
        a, b = store.create(), store.create()
        await asyncio.gather(batcher.step(a, np.array([1])), batcher.step(b, np.array([1])))
        t0, inline = time.monotonic(), []
        while time.monotonic() - t0 < 6 * window:  # a steps more often than the window
            before = batcher.stats.inline
            await batcher.step(a, np.array([2]))
            inline.append(batcher.stats.inline - before)
            await asyncio.sleep(window / 5)
        await batcher.close()
        return inline

    inline = run(main())
    assert len(inline) >= 5 and inline[-3:] == [1, 1, 1]  # b went quiet 4 windows ago


def test_prefill_inputs_count_every_input_of_each_prefill(toy_tok):
    """stats.prefill_inputs adds up the inputs of the prefills run (5 + 3), prefills counts
    them (2); a single step is neither."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s = store.create()
        await batcher.step(s, np.arange(5) % 11)
        await batcher.step(s, np.array([1]))
        await batcher.step(s, np.array([4, 5, 6]))
        await batcher.close()
        return batcher.stats

    st = run(main())
    assert (st.prefills, st.prefill_inputs, st.steps) == (2, 8, 1)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker"])
def test_an_unexpected_error_in_a_step_is_an_internal_engine_failure(toy_tok, monkeypatch, inline):
    """A step call that raises something other than EngineFailure (a bug) fails the request
    with EngineFailure(INTERNAL_ERROR), keeping the exception's text out of the answer; the
    session is unchanged and serves on."""
    real = toy_tok.run_slots

    def broken(*a, **k):
        raise RuntimeError("secret /internal/path")

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, inline=inline)
        s = store.create()
        await batcher.step(s, np.array([1]))
        before = store.read(s)
        monkeypatch.setattr(toy_tok, "run_slots", broken)
        with pytest.raises(EngineFailure) as e:
            await batcher.step(s, np.array([2]))
        monkeypatch.setattr(toy_tok, "run_slots", real)
        unchanged = np.array_equal(store.read(s), before) and s.position == 1
        _, pos = await batcher.step(s, np.array([2]))
        await batcher.close()
        return str(e.value), unchanged, pos

    text, unchanged, pos = run(main())
    assert text == str(EngineFailure(INTERNAL_ERROR)) and "secret" not in text
    assert unchanged and pos == 2


def test_a_dropped_rewind_history_gives_its_checkpoint_bytes_back(toy_tok):
    """When updating a session's rewind history fails after its step applied, the step
    still succeeds, the session loses its history, and that history's checkpoint bytes
    return to the shared budget."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s = store.create()
        budget = CheckpointBudget()
        s.history = History(8, 4, 0, store.read(s), budget)
        held = budget.used

        def broken(*a, **k):
            raise RuntimeError("history update bug")

        s.history.step = broken
        _, pos = await batcher.step(s, np.array([1]))
        await batcher.close()
        return held, pos, s.history, budget.used

    held, pos, history, used = run(main())
    assert held == 4 * toy_tok.state_size  # the one checkpoint it began with
    assert pos == 1 and history is None and used == 0


def test_mean_batch_is_steps_per_step_call(toy_tok):
    """mean_batch = steps / ORT step calls: 4 sessions stepping together (one call of 4),
    then one lone step, are 5 steps in 2 calls = 2.5; before any call it is 0."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.05)
        empty = batcher.stats.mean_batch
        sessions = [store.create() for _ in range(4)]
        await asyncio.gather(*(batcher.step(s, np.array([1])) for s in sessions))
        await batcher.step(sessions[0], np.array([2]))
        await batcher.close()
        return empty, batcher.stats

    empty, st = run(main())
    assert empty == 0.0 and st.batch_sizes == {4: 1, 1: 1}
    assert st.mean_batch == pytest.approx(2.5)
