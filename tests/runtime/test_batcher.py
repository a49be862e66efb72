"""Batcher: concurrent clients get exactly their own sequential outputs, per-session order,
batching actually happens, a lone stream does not wait, failures change nothing."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
from async_helpers import run, stepped_with_history
from async_helpers import started_batcher as started
from faults import inject
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import (
    INTERNAL_ERROR,
    CorruptState,
    EngineFailure,
    InvalidInput,
    LimitExceeded,
    OutOfRange,
    SessionNotFound,
    Unavailable,
)
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab
from ssmstream.runtime.snapshots import MAX_POSITION

pytestmark = pytest.mark.timeout(120)


def alone(engine: Engine, requests: list[np.ndarray]) -> list[np.ndarray]:
    """The same requests run sequentially through Engine.prefill on one state."""
    s, outs = engine.new_state(), []
    for x in requests:
        y, s = engine.prefill(x[None], s)
        outs.append(y[0])
    return outs


def random_requests(engine, rng, n: int) -> list[np.ndarray]:
    reqs = []
    for _ in range(n):
        T = int(rng.choice([1, 1, 1, 2, 5, 9]))
        if engine.input_kind == "tokens":
            reqs.append(rng.integers(0, engine.vocab_size, size=T))  # [T]
        else:
            reqs.append(rng.standard_normal((T, engine.d_input)).astype(np.float32))  # [T, d_in]
    return reqs


@pytest.mark.parametrize("which", ["toy_tok", "toy_sig"])
def test_concurrent_clients_each_get_their_own_sequential_outputs(which, request):
    engine = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    plans = [random_requests(engine, rng, 12) for _ in range(10)]

    async def client(batcher, store, plan, seed):
        jitter = random.Random(seed)
        s = store.create(f"p{seed % 3}")
        outs, positions = [], []
        for x in plan:
            await asyncio.sleep(jitter.random() * 0.003)
            y, pos = await batcher.step(s, x)
            outs.append(y)
            positions.append(pos)
        return outs, positions

    async def main():
        batcher, store = await started(engine, max_batch=4, max_batch_delay=0.002)
        got = await asyncio.gather(*(client(batcher, store, p, i) for i, p in enumerate(plans)))
        await batcher.close()
        return got, batcher.stats

    got, stats = run(main())
    for plan, (outs, positions) in zip(plans, got):
        for y, want in zip(outs, alone(engine, plan)):
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        assert positions == list(np.cumsum([len(x) for x in plan]))
    assert stats.batches < stats.steps + stats.prefills  # some steps shared an ORT call
    assert max(stats.batch_sizes) <= 4


def test_real_export_through_the_batcher(tiny_signal_model):
    engine = Engine(tiny_signal_model["model_dir"], device="cpu", threads=1)
    rng = np.random.default_rng(1)
    plans = [random_requests(engine, rng, 6) for _ in range(4)]

    async def main():
        batcher, store = await started(engine, max_batch=8, max_batch_delay=0.001)
        sessions = [store.create() for _ in plans]

        async def client(s, plan):
            return [(await batcher.step(s, x))[0] for x in plan]

        out = await asyncio.gather(*(client(s, p) for s, p in zip(sessions, plans)))
        await batcher.close()
        return out

    for outs, plan in zip(run(main()), plans):
        for y, want in zip(outs, alone(engine, plan)):
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tiny_token_model):
    return Engine(tiny_token_model["model_dir"], device="cpu", threads=1)


def test_chunked_slot_batches_with_gaps_equal_each_stream_alone(tiny, monkeypatch):
    """12 streams in ORT calls of at most 5 rows; closing 3 sessions leaves gaps in the
    slots, so calls step scattered rows of the slab. Every stream's outputs equal its own
    sequential run."""
    rng = np.random.default_rng(4)
    sizes, real = [], tiny.run_slots

    def run_slots(slab, B, out):
        sizes.append(B)
        assert len(set(out.slots[:B, 0])) == B  # distinct slots, as the slot graph needs
        return real(slab, B, out)

    monkeypatch.setattr(tiny, "run_slots", run_slots)
    plans = [rng.integers(0, tiny.vocab_size, size=(10, 1)) for _ in range(12)]  # [12][10, 1]

    async def main():
        store = SessionStore(tiny.state_size, capacity=16)
        batcher = Batcher(tiny, store, max_batch=16, max_batch_delay=0.005)
        batcher._buffers = tiny.step_buffers(16, chunk_bytes=5 * 4 * tiny.state_size)
        await batcher.start()
        sessions = [store.create() for _ in range(15)]
        for k in (3, 7, 8):  # gaps: slots 3, 7, 8 freed
            store.close(sessions[k].id)
        sessions = [s for k, s in enumerate(sessions) if k not in (3, 7, 8)]

        async def client(s, plan):
            return [(await batcher.step(s, x))[0] for x in plan]

        out = await asyncio.gather(*(client(s, p) for s, p in zip(sessions, plans)))
        await batcher.close()
        return out

    outs = run(main())
    for got, plan in zip(outs, plans):
        for y, want in zip(got, alone(tiny, list(plan))):
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert max(sizes) == 5 and sum(sizes) == 12 * 10  # chunk_rows; every step ran once


def test_snapshots_racing_slot_steps_are_consistent(tiny):
    """8 streams stepping in the slab while another thread snapshots them as fast as it can:
    every snapshot's state is the state after exactly `position` of that stream's inputs."""

    rng = np.random.default_rng(9)
    plans = [rng.integers(0, tiny.vocab_size, size=40) for _ in range(8)]  # [8][40]
    want = []  # per stream: the states after 0..40 inputs, stepped alone
    for plan in plans:
        s = tiny.new_state()
        states = [s[0].copy()]
        for tok in plan:
            _, s = tiny.step(np.array([tok]), s)
            states.append(s[0].copy())
        want.append(states)
    snaps, stop = [], threading.Event()

    async def main():
        batcher, store = await started(tiny, max_batch=8, max_batch_delay=0.0005)
        sessions = [store.create() for _ in plans]

        def snapshotter():
            k = 0
            while not stop.is_set():
                k = (k + 1) % len(sessions)
                snaps.append((k, store.snapshot(sessions[k].id)))

        thread = threading.Thread(target=snapshotter)
        thread.start()

        async def client(s, plan):
            for tok in plan:
                await batcher.step(s, np.array([tok]))

        try:
            await asyncio.gather(*(client(s, p) for s, p in zip(sessions, plans)))
        finally:
            stop.set()
            thread.join(10)
        await batcher.close()
        return store

    store = run(main())
    assert len(snaps) > 100
    for k, data in snaps:
        restored = store.restore(data)
        np.testing.assert_allclose(
            store.read(restored), want[k][restored.position], rtol=1e-5, atol=1e-6
        )
        store.close(restored.id)


def test_onnxruntime_failure_in_a_slot_step_changes_nothing(tiny):
    """The ORT call itself raises (after the rows were lent): those requests fail, their
    states and positions are unchanged, the rows are returned, and serving goes on."""

    async def main():
        batcher, store = await started(tiny, max_batch=4, max_batch_delay=0.0)
        s = store.create()
        await batcher.step(s, np.array([1]))
        before = store.read(s)
        with inject(tiny, fail=1):
            with pytest.raises(EngineFailure, match="injected"):
                await batcher.step(s, np.array([2]))
            np.testing.assert_array_equal(store.read(s), before)  # does not wait: returned
            assert s.position == 1 and not s._lent
            y, pos = await batcher.step(s, np.array([2]))
        await batcher.close()
        return y, pos

    y, pos = run(main())
    assert pos == 2
    want = alone(tiny, [np.array([1]), np.array([2])])[1]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_each_ort_call_of_a_batch_is_handed_back_as_soon_as_it_is_done(toy_tok):
    """6 sessions in ORT calls of 2 rows: the clients of the first two calls get their
    results while the batch's last call still runs (held on a gate); all are correct."""

    gate = threading.Event()

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.02)
        batcher._buffers = toy_tok.step_buffers(8, chunk_bytes=2 * 4 * toy_tok.state_size)
        sessions = [store.create() for _ in range(6)]
        real, seen = batcher._step_part, []

        def step_part(part):
            if part[0].session is sessions[4]:  # the last call of the batch waits
                gate.wait(60)
            return real(part)

        batcher._step_part = step_part

        async def client(k, s):
            y, pos = await batcher.step(s, np.array([k]))
            seen.append(k)
            return y

        tasks = [asyncio.ensure_future(client(k, s)) for k, s in enumerate(sessions)]
        deadline = time.monotonic() + 30  # the last call is held on the gate until then
        while len(seen) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        early, running = sorted(seen), batcher._job is not None
        gate.set()
        outs = await asyncio.gather(*tasks)
        await batcher.close()
        return early, running, outs, batcher.stats

    early, running, outs, stats = run(main())
    assert early == [0, 1, 2, 3] and running  # handed back before the job ended
    assert stats.batches == 3 and stats.steps == 6  # one job of three ORT calls
    for k, y in enumerate(outs):
        np.testing.assert_allclose(y, alone(toy_tok, [np.array([k])])[0], rtol=1e-6, atol=1e-7)


def test_concurrent_requests_of_one_session_queue_in_order(toy_tok):
    seq = [np.array([t]) for t in (3, 1, 4, 1, 5, 9, 2, 6)]

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.001)
        s = store.create()
        results = await asyncio.gather(*(batcher.step(s, x) for x in seq))
        await batcher.close()
        return results

    results = run(main())
    assert [pos for _, pos in results] == list(range(1, 9))
    for (y, _), want in zip(results, alone(toy_tok, seq)):
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_a_lone_stream_does_not_sit_out_the_batch_delay(toy_tok):
    async def main():
        batcher, store = await started(toy_tok, max_batch=64, max_batch_delay=5.0)
        s = store.create()
        t0 = time.perf_counter()
        for t in range(8):
            await batcher.step(s, np.array([t]))
        elapsed = time.perf_counter() - t0
        await batcher.close()
        return elapsed

    assert run(main()) < 4.0  # 8 steps, each would wait 5 s if it sat out the delay


def test_a_stream_left_alone_by_closed_and_evicted_sessions_does_not_sit_out_the_delay(toy_tok):
    """Sessions that stepped within the activity window and then ended (closed, evicted)
    send no more: the remaining stream's steps are not held back waiting for them."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=64, max_batch_delay=5.0)
        s, others = store.create(), [store.create(ttl=0.01) for _ in range(3)]
        await asyncio.gather(*(batcher.step(x, np.array([1])) for x in [s, *others]))
        store.close(others[0].id)
        store.close(others[1].id)
        await asyncio.sleep(0.02)
        assert store.evict_idle() == [others[2].id]
        t0 = time.perf_counter()
        for t in range(4):
            await batcher.step(s, np.array([t]))
        elapsed = time.perf_counter() - t0
        await batcher.close()
        return elapsed, batcher.stats.inline

    elapsed, inline = run(main())
    assert elapsed < 4.0 and inline >= 3  # each step would wait 5 s; the lone ones run inline


def test_steps_arriving_together_share_one_call_and_listeners_see_it(toy_tok):
    sizes = []

    async def main():
        batcher, store = await started(toy_tok, max_batch=16, max_batch_delay=0.05)
        batcher.add_listener(lambda n, sec: sizes.append(n))
        sessions = [store.create() for _ in range(16)]
        await asyncio.gather(*(batcher.step(s, np.array([1])) for s in sessions))
        await batcher.close()

    run(main())
    assert sizes == [16]


def test_listeners_and_stats_see_each_ort_call_and_only_those(toy_tok, monkeypatch):
    """Counted per onnxruntime call, as the engine saw them: a batch of 5 in calls of 2
    rows is 3 calls (2, 2, 1); a rewind to a checkpoint makes no call and is a rewind, not
    a prefill; a batch whose sessions all closed before it ran makes none."""
    seen, real = [], toy_tok.run_slots

    def run_slots(slab, B, out):
        seen.append(B)
        return real(slab, B, out)

    monkeypatch.setattr(toy_tok, "run_slots", run_slots)
    heard = []

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.05)
        batcher._buffers = toy_tok.step_buffers(8, chunk_bytes=2 * 4 * toy_tok.state_size)
        batcher.add_listener(lambda n, sec: heard.append(n))
        sessions = [store.create() for _ in range(5)]
        await asyncio.gather(*(batcher.step(s, np.array([1])) for s in sessions))
        assert heard == seen == [2, 2, 1]
        assert batcher.stats.batches == 3 and batcher.stats.batch_sizes == {2: 2, 1: 1}
        s = sessions[0]
        s.history = History(8, 4, s.position, store.read(s))
        await batcher.rewind(s, 1)  # the checkpoint it began with: no replay
        assert heard == [2, 2, 1] and batcher.stats.rewinds == 1
        assert batcher.stats.prefills == 0
        doomed = [store.create() for _ in range(3)]
        futs = [asyncio.ensure_future(batcher.step(d, np.array([1]))) for d in doomed]
        await asyncio.sleep(0)
        for d in doomed:
            store.close(d.id)
        await asyncio.gather(*futs, return_exceptions=True)
        assert heard == seen == [2, 2, 1] and batcher.stats.batches == 3
        await batcher.close()

    run(main())


def test_engine_failure_fails_the_batch_without_changing_state(toy_tok, monkeypatch):
    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        s = store.create()
        await batcher.step(s, np.array([1]))
        before = store.read(s)
        real = toy_tok.run_slots

        def broken(*a, **k):
            raise EngineFailure("simulated onnxruntime failure")

        monkeypatch.setattr(toy_tok, "run_slots", broken)
        with pytest.raises(EngineFailure, match="simulated"):
            await batcher.step(s, np.array([2]))
        np.testing.assert_array_equal(store.read(s), before)
        assert s.position == 1 and batcher.stats.failed == 1
        assert batcher.stats.batches == 2  # the failed onnxruntime call counts as a call
        monkeypatch.setattr(toy_tok, "run_slots", real)
        _, pos = await batcher.step(s, np.array([2]))  # the batcher keeps serving
        await batcher.close()
        return pos

    assert run(main()) == 2


def test_session_closed_while_queued_is_not_applied(toy_tok):
    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        a, b = store.create(), store.create()
        first = asyncio.ensure_future(batcher.step(a, np.arange(9) % 11))  # a prefill
        queued = asyncio.ensure_future(batcher.step(a, np.array([1])))
        await asyncio.sleep(0)
        store.close(a.id)
        c = store.create()  # may take a's slot
        results = await asyncio.gather(first, queued, return_exceptions=True)
        assert all(isinstance(r, SessionNotFound) or isinstance(r, tuple) for r in results)
        assert isinstance(results[1], SessionNotFound)
        np.testing.assert_array_equal(store.read(c), toy_tok.new_state()[0])  # untouched
        assert c.position == 0
        _, pos = await batcher.step(b, np.array([1]))
        await batcher.close()
        return pos

    assert run(main()) == 1


def test_cancelled_queued_request_is_dropped(toy_tok):
    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        s = store.create()
        first = asyncio.ensure_future(batcher.step(s, np.arange(9) % 11))
        second = asyncio.ensure_future(batcher.step(s, np.array([1])))
        await asyncio.sleep(0)
        second.cancel()
        _, pos = await first
        await asyncio.sleep(0.01)
        assert s.position == pos == 9  # the cancelled step never ran
        _, pos = await batcher.step(s, np.array([1]))
        await batcher.close()
        return pos

    assert run(main()) == 10


def test_queue_limit_close_and_arguments(toy_tok):
    async def main():
        batcher, store = await started(  # the worker's queue (inline steps finish at once)
            toy_tok, max_batch=1, max_batch_delay=0.0, max_queue_per_session=2, inline=False
        )
        s = store.create()
        futs = [asyncio.ensure_future(batcher.step(s, np.array([1]))) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(LimitExceeded, match="max_queue_per_session"):
            await batcher.step(s, np.array([1]))
        futs[2].cancel()  # a cancelled request waiting in the queue makes room
        await asyncio.sleep(0)
        futs[2] = asyncio.ensure_future(batcher.step(s, np.array([1])))
        await asyncio.sleep(0)
        cancelled = batcher.stats.cancelled
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.step(s, np.array([1]))
        await closing  # drains what was queued
        assert [f.result()[1] for f in futs] == [1, 2, 3]
        assert cancelled == 1 and not store.local(s.id)._pins

    run(main())
    store = SessionStore(toy_tok.state_size)
    for kw, field in [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch_delay": -1}, "max_batch_delay"),
        ({"max_batch_delay": True}, "max_batch_delay"),  # not one second
        ({"max_queue_per_session": None}, "max_queue_per_session"),
        ({"max_queue_per_session": 2.5}, "max_queue_per_session"),
        ({"activity_window": 0}, "activity_window"),
        ({"activity_window": "1s"}, "activity_window"),
    ]:
        with pytest.raises(InvalidInput) as e:
            Batcher(toy_tok, store, **kw)
        assert e.value.field == field
    with pytest.raises(InvalidInput, match="state size"):
        Batcher(toy_tok, SessionStore(toy_tok.state_size + 1))


@pytest.mark.parametrize("T", [1, 3], ids=["step", "prefill"])
def test_a_session_moved_while_queued_is_unavailable_and_one_closed_says_so(toy_tok, T):
    """A request queued for a session another replica took over meanwhile (the replication
    policy drops it as "moved") fails UNAVAILABLE, so the client retries where the session
    lives; one closed or evicted meanwhile says which."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        got = {}
        for reason in ("moved", "closed", "evicted"):
            s = store.create()
            fut = asyncio.ensure_future(batcher.step(s, np.arange(T) % 11))
            await asyncio.sleep(0)  # queued, not yet run
            store.drop(s, reason)
            got[reason] = (await asyncio.gather(fut, return_exceptions=True))[0]
            with pytest.raises(type(got[reason])):  # and so is the next request
                await batcher.step(s, np.array([1]))
        await batcher.close()
        return got

    got = run(main())
    assert isinstance(got["moved"], Unavailable) and "another replica" in str(got["moved"])
    for reason in ("closed", "evicted"):
        assert isinstance(got[reason], SessionNotFound) and got[reason].reason == reason


def test_a_prefill_whose_commit_finds_the_session_moved_is_unavailable(toy_tok):
    """The replication policy refuses a prefill's write-through (another replica owns the
    session now): UNAVAILABLE, as for a single step, not an engine failure."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        s, real = store.create(), store.commit

        def commit(s, state, consumed):  # what RedisReplication does when the lease is lost
            store.drop(s, "moved")
            return real(s, state, consumed)

        store.commit = commit
        with pytest.raises(Unavailable, match="another replica"):
            await batcher.step(s, np.arange(3))
        await batcher.close()

    run(main())


def test_two_closes_at_once_both_return(toy_tok):
    async def main():
        batcher, store = await started(toy_tok)
        step = asyncio.ensure_future(batcher.step(store.create(), np.arange(5)))
        await asyncio.sleep(0)  # running: both closes wait for it
        await asyncio.gather(batcher.close(), batcher.close())
        assert batcher._worker is None and step.done() and step.result()[1] == 5

    run(main())


def test_a_batcher_whose_loop_ended_closes_from_another_loop(toy_tok):
    """Started inside one asyncio.run and closed in a later one (the first loop is gone):
    the close stops the worker. While its own loop still runs, another loop's close is
    refused (it would wait for ever)."""
    batcher, store = run(started(toy_tok))
    worker = batcher._worker
    run(batcher.close())
    worker.join(10)
    assert not batcher.running and not worker.is_alive()


def test_close_stops_the_worker_thread_and_a_restart_serves_again(toy_tok):
    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.001)
        s = store.create()
        _, first = await batcher.step(s, np.array([1]))
        worker = batcher._worker  # this batcher's own thread (other tests' may come and go)
        assert worker is not None and worker.is_alive() and worker.name == "ssmstream-engine"
        await batcher.close()
        deadline = time.monotonic() + 10
        while worker.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not worker.is_alive(), "the worker thread outlived close()"
        with pytest.raises(Unavailable):
            await batcher.step(s, np.array([2]))
        await batcher.start()
        y, second = await batcher.step(s, np.array([2]))
        await batcher.close()
        return first, second, y

    first, second, y = run(main())
    assert (first, second) == (1, 2)
    np.testing.assert_allclose(y, alone(toy_tok, [np.array([1]), np.array([2])])[1], atol=1e-6)


@pytest.mark.parametrize("which", ["toy_tok", "toy_sig"])
def test_a_lone_streams_inline_steps_equal_the_worker_threads(which, request):
    """One session's requests (steps and prefills, some sent back to back so they queue)
    through a batcher that runs lone steps on the event loop and through one that never
    does: the same outputs and positions, in order, equal to the requests run alone."""
    engine = request.getfixturevalue(which)
    plan = random_requests(engine, np.random.default_rng(3), 24)

    async def main(inline):
        batcher, store = await started(engine, max_batch=8, max_batch_delay=0.002, inline=inline)
        s = store.create()
        results = []
        for i in range(0, len(plan), 4):  # 4 requests in flight at once, then one at a time
            results += await asyncio.gather(*(batcher.step(s, x) for x in plan[i : i + 2]))
            for x in plan[i + 2 : i + 4]:
                results.append(await batcher.step(s, x))
        await batcher.close()
        return results, batcher.stats

    inline, stats_in = run(main(True))
    worker, stats_w = run(main(False))
    steps = sum(x.shape[0] == 1 for x in plan)
    assert stats_in.inline == steps and stats_w.inline == 0  # each path was the one taken
    want_pos = list(np.cumsum([x.shape[0] for x in plan]))
    assert [p for _, p in inline] == [p for _, p in worker] == want_pos
    for (y_in, _), (y_w, _), want in zip(inline, worker, alone(engine, plan)):
        np.testing.assert_array_equal(y_in, y_w)
        np.testing.assert_allclose(y_in, want, rtol=1e-5, atol=1e-6)


def test_two_active_sessions_are_batched_not_run_inline(toy_tok):
    """Two sessions stepping together share each ORT call; neither runs on the loop."""
    sizes = []

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.05)
        batcher.add_listener(lambda n, sec: sizes.append(n))
        a, b = store.create(), store.create()
        outs = []
        for t in range(6):
            outs.append(
                await asyncio.gather(
                    batcher.step(a, np.array([t])), batcher.step(b, np.array([5 - t]))
                )
            )
        await batcher.close()
        return outs, batcher.stats

    outs, stats = run(main())
    assert sizes == [2] * 6 and stats.inline == 0
    want_a = alone(toy_tok, [np.array([t]) for t in range(6)])
    want_b = alone(toy_tok, [np.array([5 - t]) for t in range(6)])
    for ((ya, pa), (yb, pb)), wa, wb, pos in zip(outs, want_a, want_b, range(1, 7)):
        assert pa == pb == pos
        np.testing.assert_allclose(ya, wa, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(yb, wb, rtol=1e-5, atol=1e-6)


def test_an_inline_step_that_fails_changes_nothing(toy_tok, monkeypatch):
    """onnxruntime failing in a step run on the event loop: EngineFailure, the state and
    position as before, and the next step serves again."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0)
        s = store.create()
        await batcher.step(s, np.array([1]))
        before = store.read(s)

        def broken(*a, **k):
            raise RuntimeError("simulated onnxruntime failure")

        with monkeypatch.context() as m:
            m.setattr(toy_tok._slot_session, "run_with_iobinding", broken, raising=False)
            with pytest.raises(EngineFailure, match="simulated"):
                await batcher.step(s, np.array([2]))
        after = store.read(s), s.position
        y, pos = await batcher.step(s, np.array([2]))
        await batcher.close()
        return before, after, y, pos, batcher.stats

    before, (state, position), y, pos, stats = run(main())
    np.testing.assert_array_equal(state, before)
    assert position == 1 and pos == 2 and stats.failed == 1 and stats.inline == 3
    want = alone(toy_tok, [np.array([1]), np.array([2])])[1]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_max_queue_per_session_zero_means_no_request_waits(toy_tok):
    """0 is a valid queue limit (">= 0"): a session's second
    request while one runs is refused at once instead of queued."""

    async def main():
        batcher, store = await started(
            toy_tok, capacity=4, max_batch_delay=0.0, max_queue_per_session=0, inline=False
        )
        try:
            s = store.create()
            first = asyncio.ensure_future(batcher.step(s, np.array([1])))
            await asyncio.sleep(0)
            with pytest.raises(LimitExceeded) as e:
                await batcher.step(s, np.array([2]))
            assert "max_queue_per_session=0" in str(e.value)
            assert (await first)[1] == 1 and s.position == 1
        finally:
            await batcher.close()

    run(main())


@pytest.mark.parametrize("to", [1, 4])  # inside the window; where the queued step would end
def test_a_rewind_queued_behind_a_step_of_a_session_then_closed_is_not_found(toy_tok, to):
    """The session closed while its rewind waited: its history was
    released, and the rewind answers NOT_FOUND "closed" (as a queued step does), not the
    history's OutOfRange nor "ahead of the session"."""

    async def main():
        batcher, store = await started(toy_tok, capacity=4, max_batch_delay=0.0, inline=False)
        try:
            s = store.create("", "a")
            s.history = History(8, 4, 0, store.read(s))
            assert (await batcher.step(s, np.array([1, 2, 3])))[1] == 3
            step = asyncio.ensure_future(batcher.step(s, np.array([4])))
            rewind = asyncio.ensure_future(batcher.rewind(s, to))
            await asyncio.sleep(0)  # both queued: the step first, the rewind behind it
            store.close("a")
            await asyncio.gather(step, return_exceptions=True)
            with pytest.raises(SessionNotFound) as e:
                await rewind
            assert e.value.reason == "closed" and e.value.session_id == "a"
        finally:
            await batcher.close()

    run(main())


@pytest.mark.parametrize("what", ["step", "rewind"])
def test_a_closed_sessions_request_is_not_found_even_when_its_queue_is_full(toy_tok, what):
    """A closed session's step or rewind is NOT_FOUND "closed" up front, not LIMIT_EXCEEDED
    because requests queued before the close still fill its queue."""

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
                if what == "step":
                    await batcher.step(s, np.array([2]))
                else:
                    await batcher.rewind(s, 0)
            assert e.value.reason == "closed"
            await asyncio.gather(*queued, return_exceptions=True)
        finally:
            await batcher.close()

    run(main())


def test_the_default_activity_window_is_20_batch_delays_but_at_least_10_ms(toy_tok):
    """activity_window=None means max(20 x max_batch_delay, 10 ms)."""
    store = SessionStore(toy_tok.state_size, capacity=2)
    assert Batcher(toy_tok, store, max_batch_delay=0.002).activity_window == pytest.approx(0.04)
    assert Batcher(toy_tok, store).activity_window == pytest.approx(0.02)
    assert Batcher(toy_tok, store, max_batch_delay=0.0).activity_window == pytest.approx(0.01)
    assert Batcher(toy_tok, store, activity_window=0.5).activity_window == 0.5


def test_pending_counts_running_and_waiting_requests(toy_tok):
    """Requests queued behind a session's running one count too."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=1, max_batch_delay=0.0, inline=False)
        s = store.create()
        futs = [asyncio.ensure_future(batcher.step(s, np.array([t]))) for t in (1, 2, 3)]
        await asyncio.sleep(0)
        n = batcher.pending()
        await asyncio.gather(*futs)
        after = batcher.pending()
        await batcher.close()
        return n, after

    assert run(main()) == (3, 0)


def test_a_rewind_while_the_batcher_closes_is_unavailable(toy_tok):
    """Once close() began, a rewind is refused UNAVAILABLE at once
    (like a step), not queued."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, inline=False)
        s = store.create()
        running = asyncio.ensure_future(batcher.step(s, np.arange(9) % 11))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.rewind(s, 0)
        await closing
        return (await running)[1], s.position

    assert run(main()) == (9, 9)


def test_a_request_past_the_largest_position_is_refused_before_it_queues(toy_tok):
    """A request that would pass position 2**63 - 1 is OutOfRange at
    once, even while the session's queue is full (not LimitExceeded), and counts as no
    failed step."""

    async def main():
        batcher, store = await started(
            toy_tok, max_batch_delay=0.0, max_queue_per_session=0, inline=False
        )
        zero = np.zeros(toy_tok.state_size, np.float32)
        s = store.restore(store.pack_state(zero, MAX_POSITION - 1))
        running = asyncio.ensure_future(batcher.step(s, np.array([1])))  # to MAX
        await asyncio.sleep(0)
        with pytest.raises(OutOfRange) as e:
            await batcher.step(s, np.array([2, 3]))
        assert e.value.field == "inputs"
        assert (await running)[1] == MAX_POSITION
        with pytest.raises(OutOfRange):
            await batcher.step(s, np.array([4]))
        failed = batcher.stats.failed
        await batcher.close()
        return failed, batcher.stats.steps, s.position

    assert run(main()) == (0, 1, MAX_POSITION)


def test_a_full_batch_does_not_wait_for_other_active_sessions(toy_tok):
    """A batch of max_batch steps runs at once, even though
    another session is active and the delay is long."""

    async def main():
        batcher, store = await started(
            toy_tok, max_batch=2, max_batch_delay=8.0, activity_window=30.0, inline=False
        )
        a, b, c = store.create(), store.create(), store.create()
        await batcher.step(c, np.array([1]))  # c is active (and alone: no wait)
        t0 = time.perf_counter()
        await asyncio.gather(batcher.step(a, np.array([1])), batcher.step(b, np.array([2])))
        dt = time.perf_counter() - t0
        await batcher.close()
        return dt, dict(batcher.stats.batch_sizes)

    dt, sizes = run(main())
    assert dt < 4.0 and sizes == {1: 1, 2: 1}  # far below the delay, on a loaded machine too


def test_a_queued_prefill_counts_as_present_so_steps_do_not_wait_for_it(toy_tok):
    """When every active session has a request ready (one a
    prefill), the step batch runs at once instead of waiting out the delay."""

    async def main():
        batcher, store = await started(
            toy_tok, max_batch=4, max_batch_delay=8.0, activity_window=30.0, inline=False
        )
        a, b = store.create(), store.create()
        t0 = time.perf_counter()
        got = await asyncio.gather(
            batcher.step(a, np.arange(5) % 11), batcher.step(b, np.array([2]))
        )
        dt = time.perf_counter() - t0
        await batcher.close()
        return dt, [g[1] for g in got]

    dt, positions = run(main())
    assert positions == [5, 1] and dt < 4.0  # far below the delay, on a loaded machine too


def test_after_a_step_batch_a_waiting_prefill_goes_before_the_next_steps(toy_tok):
    """Steps and prefills alternate: a prefill waiting while a step
    batch runs goes next, before steps that became ready meanwhile."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0, inline=False)
        a, b = store.create(), store.create()
        order = []
        futs = {
            "a-prefill": asyncio.ensure_future(batcher.step(a, np.arange(5) % 11)),
            "b-step-1": asyncio.ensure_future(batcher.step(b, np.array([1]))),
            "b-step-2": asyncio.ensure_future(batcher.step(b, np.array([2]))),
        }
        await asyncio.sleep(0)  # all three queued (b's second behind its first)
        for name, f in futs.items():
            f.add_done_callback(lambda _, name=name: order.append(name))
        await asyncio.gather(*futs.values())
        await batcher.close()
        return order

    assert run(main()) == ["b-step-1", "a-prefill", "b-step-2"]


def test_a_cancelled_queued_prefill_is_dropped(toy_tok):
    """A prefill cancelled while it waited behind the session's
    running request never runs: state and position unchanged."""

    async def main():
        batcher, store = await started(toy_tok, max_batch=4, max_batch_delay=0.0, inline=False)
        s = store.create()
        first = asyncio.ensure_future(batcher.step(s, np.arange(9) % 11))
        second = asyncio.ensure_future(batcher.step(s, np.array([1, 2, 3])))
        await asyncio.sleep(0)
        second.cancel()
        _, pos = await first
        state = store.read(s).copy()
        await asyncio.sleep(0.05)
        cancelled = batcher.stats.cancelled
        after = s.position, store.read(s).copy()
        await batcher.close()
        return pos, after, state, cancelled, batcher.stats.prefills

    pos, (position, state_after), state, cancelled, prefills = run(main())
    assert pos == position == 9 and cancelled == 1 and prefills == 1
    np.testing.assert_array_equal(state_after, state)


def test_busy_seconds_add_up_the_time_jobs_ran(toy_tok, monkeypatch):
    """stats.busy_seconds is the time the engine jobs took."""
    real = toy_tok.run_slots

    def slow(*a):
        time.sleep(0.05)
        return real(*a)

    monkeypatch.setattr(toy_tok, "run_slots", slow)

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s = store.create()
        for t in (1, 2, 3):
            await batcher.step(s, np.array([t]))
        await batcher.close()
        return batcher.stats.busy_seconds

    assert 0.14 <= run(main()) < 2.0


def test_a_listener_that_raises_does_not_break_serving(toy_tok):
    """A metrics hook that raises is logged; requests still get
    their results and later requests run."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, inline=False)
        calls = []

        def bad(B, sec):
            calls.append(B)
            raise RuntimeError("hook bug")

        batcher.add_listener(bad)
        s = store.create()
        positions = [(await batcher.step(s, np.array([t])))[1] for t in (1, 2)]
        await batcher.close()
        return positions, calls

    assert run(main()) == ([1, 2], [1, 1])


def test_an_unexpected_error_in_a_prefill_job_is_an_internal_engine_failure(toy_tok, monkeypatch):
    """A job that raises something other than EngineFailure (a
    bug) fails its request with EngineFailure(INTERNAL_ERROR): the exception's text (paths,
    internals) stays in the log; the session is unchanged and serves on."""
    from ssmstream.runtime.errors import INTERNAL_ERROR, EngineFailure

    real = toy_tok.prefill_unchecked

    def broken(*a, **k):
        raise RuntimeError("secret /internal/path")

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0)
        s = store.create()
        monkeypatch.setattr(toy_tok, "prefill_unchecked", broken)
        with pytest.raises(EngineFailure) as e:
            await batcher.step(s, np.arange(5) % 11)
        monkeypatch.setattr(toy_tok, "prefill_unchecked", real)
        _, pos = await batcher.step(s, np.array([1, 2]))
        await batcher.close()
        return str(e.value), pos, batcher.stats.failed

    text, pos, failed = run(main())
    assert text == str(EngineFailure(INTERNAL_ERROR)) and "secret" not in text
    assert pos == 2 and failed == 1


def test_a_prefill_offers_the_state_it_began_at_as_a_checkpoint(toy_tok):
    """History checkpoints stay at most Q apart: a prefill
    that starts 3 inputs after the last checkpoint and ends 7 after it keeps the state it
    began at, so a rewind into it replays fewer than Q inputs (Q = 4)."""

    async def main():
        batcher, store, s = await stepped_with_history(toy_tok)
        at3 = store.read(s).copy()
        await batcher.step(s, np.array([4, 5, 6, 7]))
        state, inputs = s.history.plan(6)
        await batcher.rewind(s, 6)
        after = store.read(s).copy(), s.position
        await batcher.close()
        return at3, state, inputs, after

    at3, state, inputs, (rewound, position) = run(main())
    assert len(inputs) == 3 and position == 6
    np.testing.assert_array_equal(state, at3)
    _, want = toy_tok.prefill(np.array([[1, 2, 3, 4, 5, 6]]), toy_tok.new_state())
    np.testing.assert_allclose(rewound, want[0], rtol=1e-5, atol=1e-6)


def test_a_session_with_requests_still_queued_stays_pinned_and_is_not_evicted(toy_tok):
    """Every request queued behind a session's running one pins
    the session: after the first finishes, the session is still pinned, and an idle sweep
    past its TTL does not evict it while its queued steps wait; they all apply."""
    now = [0.0]

    async def main():
        store = SessionStore(toy_tok.state_size, capacity=4, ttl=10.0, clock=lambda: now[0])
        batcher = Batcher(toy_tok, store, max_batch=1, max_batch_delay=0.0, inline=False)
        await batcher.start()
        s = store.create()
        futs = [asyncio.ensure_future(batcher.step(s, np.array([t]))) for t in (1, 2, 3)]
        await asyncio.sleep(0)
        await futs[0]
        pinned = s.pinned
        now[0] += 100.0  # far past the TTL
        evicted = store.evict_idle()
        positions = [(await f)[1] for f in futs[1:]]
        await batcher.close()
        return pinned, evicted, positions, s.live

    assert run(main()) == (True, [], [2, 3], True)


def test_a_lone_streams_steps_keep_it_active_and_run_without_yielding(toy_tok):
    """Each inline step renews the session's activity, so a
    lone stream stepping more often than activity_window stays on the inline fast path
    for good: its steps return without yielding to the event loop (no future, no
    scheduler pass), also long after its first request. The loop's clock is the test's (a
    loaded machine's stalls would otherwise space the steps wider than the window)."""

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, activity_window=0.1)
        loop = asyncio.get_running_loop()
        now = [loop.time()]
        loop.time = lambda: now[0]  # the Batcher reads the loop's clock
        s = store.create()
        await batcher.step(s, np.array([1]))  # the first one goes through the scheduler
        yielded = []
        for t in range(8):  # 8 x 40 ms: well past the window after the first request
            now[0] += 0.04
            await asyncio.sleep(0)
            ran = []
            asyncio.get_running_loop().call_soon(ran.append, 1)
            await batcher.step(s, np.array([t % 11]))
            yielded.append(bool(ran))
        await batcher.close()
        return yielded, s.position, batcher.stats.inline

    yielded, position, inline = run(main())
    assert yielded == [False] * 8 and position == 9 and inline == 9


def test_a_step_that_waited_behind_a_long_job_still_counts_its_session_active(toy_tok, monkeypatch):
    """A session with a request queued or running stays active
    even when that request is older than activity_window; so a lone step that waited
    behind another session's long prefill is still that lone stream's step and runs inline
    (no hop to the worker) once the worker is free."""
    real = toy_tok.prefill_unchecked

    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(toy_tok, "prefill_unchecked", slow)

    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, activity_window=0.1)
        a, b = store.create(), store.create()
        long = asyncio.ensure_future(batcher.step(a, np.arange(5) % 11))
        await asyncio.sleep(0.01)
        _, pos = await batcher.step(b, np.array([1]))
        await long
        await batcher.close()
        return pos, batcher.stats.inline, batcher.stats.steps

    assert run(main()) == (1, 1, 1)


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
    completes and runs at the first step's deadline).

    Checked without a margin on the machine's speed: the scheduler's timer, once b joined,
    is still a's deadline; and the batch ran before b's own deadline (b's join time as
    measured, plus D), which a scheduler using the later deadline could never do."""
    D = 1.5  # b joins at D/2: D/2 to spare before a's deadline and after it

    async def main():
        batcher, store = await started(
            toy_tok, max_batch=8, max_batch_delay=D, activity_window=30.0, inline=False
        )
        a, b, c = store.create(), store.create(), store.create()
        await asyncio.gather(*(batcher.step(s, np.array([1])) for s in (a, b, c)))  # all active
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asyncio.ensure_future(batcher.step(a, np.array([2])))
        await asyncio.sleep(0)  # a's step is queued; its deadline set
        a_deadline = batcher._steps[0].enqueued + D
        await asyncio.sleep(D / 2)
        joined = loop.time() - t0
        second = asyncio.ensure_future(batcher.step(b, np.array([3])))
        for _ in range(3):  # b's step is queued next to a's, and the scheduler ran again
            await asyncio.sleep(0)
        timer = batcher._timer
        timer_at = None if timer is None else timer.when()
        (_, pos_a), (_, pos_b) = await asyncio.gather(first, second)
        waited = loop.time() - t0
        await batcher.close()
        return waited, joined, timer_at, a_deadline, pos_a, pos_b, dict(batcher.stats.batch_sizes)

    waited, joined, timer_at, a_deadline, pos_a, pos_b, sizes = run(main())
    assert (pos_a, pos_b) == (2, 2) and sizes == {3: 1, 2: 1}  # a and b in one call
    assert timer_at == pytest.approx(a_deadline)  # the deadline stayed a's
    assert D - 0.05 <= waited < joined + D  # its own deadline; not the later step's


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
        t0, inline = time.monotonic(), []  # (since b's last request, ran inline)
        quiet = lambda: [n for t, n in inline if t > 2 * window]  # noqa: E731
        # a steps more often than the window, at least 6 windows long and 3 steps past 2
        while (time.monotonic() - t0 < 6 * window or len(quiet()) < 3) and len(inline) < 1000:
            before, t = batcher.stats.inline, time.monotonic() - t0
            await batcher.step(a, np.array([2]))
            inline.append((t, batcher.stats.inline - before))
            await asyncio.sleep(window / 5)
        await batcher.close()
        return inline, quiet()

    inline, quiet = run(main())  # quiet: the steps that came 2 windows after b's last one
    assert len(quiet) >= 3 and quiet == [1] * len(quiet), inline


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


def test_a_max_batch_beyond_the_store_allocates_rows_for_the_store_only(toy_tok):
    """A batch holds distinct sessions: --max-batch 2**32 - 1 over a store of 4 allocates
    step buffers of 4 rows (it had asked numpy for 32 GiB), and batches still form."""

    async def main():
        batcher, store = await started(toy_tok, capacity=4, max_batch=2**32 - 1)
        try:
            assert batcher._buffers.max_batch == 4
            sessions = [store.create("", f"s{i}") for i in range(4)]
            got = await asyncio.gather(
                *(batcher.step(s, np.array([i])) for i, s in enumerate(sessions))
            )
            assert [p for _, p in got] == [1, 1, 1, 1]
        finally:
            await batcher.close()

    run(main())


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


def test_a_request_handed_back_early_is_finished_once_so_its_sessions_queue_stays_in_order(toy_tok):
    """4 sessions in ORT calls of 2 rows; session 0 has 3 requests queued. Its first is
    handed back with the batch's first call; when the job ends it must not be finished a
    second time (finished again, it made session 0's third request ready beside its
    second: both in the next batch, the row lent twice, both failing as internal errors)."""
    seq = [np.array([t]) for t in (3, 1, 4)]

    async def main():
        batcher, store = await started(toy_tok, max_batch=8, max_batch_delay=0.02, inline=False)
        try:
            batcher._buffers = toy_tok.step_buffers(8, chunk_bytes=2 * 4 * toy_tok.state_size)
            sessions = [store.create() for _ in range(4)]
            mine = [asyncio.ensure_future(batcher.step(sessions[0], x)) for x in seq]
            others = [
                asyncio.ensure_future(batcher.step(s, np.array([k])))
                for k, s in enumerate(sessions[1:], 1)
            ]
            got = await asyncio.gather(*mine, *others, return_exceptions=True)
            return got, [s.position for s in sessions], batcher.stats.failed, batcher.pending()
        finally:
            await batcher.close()

    got, positions, failed, pending = run(main())
    errors = [g for g in got if isinstance(g, BaseException)]
    assert not errors, errors
    assert [pos for _, pos in got[:3]] == [1, 2, 3]
    assert positions == [3, 1, 1, 1] and failed == 0 and pending == 0
    s, expected = toy_tok.new_state(), []
    for x in seq:
        y, s = toy_tok.prefill(x[None], s)
        expected.append(y[0])
    for (y, _), want in zip(got[:3], expected):
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_sessions_seen_only_in_prefills_do_not_pile_up(toy_tok):
    # the activity record had been pruned only on the 1-input paths: a server that only ever
    # prefilled (prompts, multi-token Steps, rewinds) kept one entry per session it had served
    async def main():
        batcher, store = await started(toy_tok, max_batch_delay=0.0, activity_window=1e-9)
        for _ in range(200):
            s = store.create()
            await batcher.step(s, np.arange(3) % 11)
            store.close(s.id)
        recent = len(batcher._recent)
        await batcher.close()
        return recent

    assert run(main()) <= 1


# A step of a session idle past its TTL (not swept yet) is refused as evicted, whether it
# runs on the event loop (a lone stream, `inline`) or goes through the worker's queue: the
# session's state and position stay as they were, as `get` and a queued step say.
@pytest.mark.parametrize("inline", [True, False])
def test_a_step_after_the_ttl_is_evicted_inline_or_queued(toy_tok, inline):
    now = [0.0]

    async def main():
        store = SessionStore(toy_tok.state_size, capacity=4, ttl=10.0, clock=lambda: now[0])
        batcher = Batcher(toy_tok, store, max_batch_delay=0.0, activity_window=30.0, inline=inline)
        await batcher.start()
        try:
            s = store.create()
            await batcher.step(s, np.array([1]))
            now[0] += 100.0  # idle past its TTL; no sweep ran
            with pytest.raises(SessionNotFound) as err:
                await batcher.step(s, np.array([2]))
            return err.value, s, batcher.stats
        finally:
            await batcher.close()

    err, s, stats = asyncio.run(asyncio.wait_for(main(), 60))
    assert err.reason == "evicted" and err.session_id == s.id
    assert not s.live and s.position == 1  # the refused step did not apply
    assert stats.steps == 1 and stats.inline == (1 if inline else 0)  # the first step's path


# A batch of one step runs on the event loop (`inline`) only while no other session is
# active: with two sessions active (each sent a request within the activity window), a step
# that arrives alone still goes to the worker thread.
def test_a_lone_step_while_another_session_is_active_runs_on_the_worker(toy_tok, monkeypatch):
    threads = []

    async def main():
        store = SessionStore(toy_tok.state_size, capacity=4)
        batcher = Batcher(toy_tok, store, max_batch_delay=0.0, activity_window=30.0)
        await batcher.start()
        real = toy_tok.run_slots

        def run_slots(*args):  # which thread ran each ORT step call
            threads.append(threading.current_thread().name)
            return real(*args)

        monkeypatch.setattr(toy_tok, "run_slots", run_slots)
        try:
            a, b = store.create(), store.create()
            out = []
            for s, t in ((a, 1), (b, 2), (a, 3), (b, 4)):  # one at a time, both active
                out.append(await batcher.step(s, np.array([t])))
            return out, batcher.stats
        finally:
            await batcher.close()

    out, stats = asyncio.run(asyncio.wait_for(main(), 60))
    assert [pos for _, pos in out] == [1, 1, 2, 2]
    # only the first step, before b was active, ran on the event loop
    assert stats.inline == 1 and stats.steps == 4
    assert threads == ["MainThread", "ssmstream-engine", "ssmstream-engine", "ssmstream-engine"]
