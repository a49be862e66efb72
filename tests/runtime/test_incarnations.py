"""Sessions are incarnations, and an idle one is evicted on every path: a Stream's request
past the TTL, a stale Stream after the id was taken again, the batcher's per-session queue and
pins across incarnations, and the counters after a load. In-process (SessionService and a
Batcher on the toy model), states checked against its numpy reference."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from faults import inject
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import SessionNotFound
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore

LIMITS = ServiceLimits(max_tokens_per_request=64, max_new_tokens=100)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def toy(toy_token_model):
    return toy_token_model


@pytest.fixture(scope="module")
def engine(toy):
    return Engine(toy["model_dir"], device="cpu", threads=1)


async def until(predicate, timeout: float = 30.0) -> None:
    """Yield to the event loop until predicate() is true (e.g. a request reached the
    worker's onnxruntime call); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        await asyncio.sleep(0.005)


def want_state(toy, tokens) -> np.ndarray:
    _, x = toy["reference"](np.array([tokens], np.int64), np.zeros((1, toy["S"])))
    return x[0]


async def service(engine, now, ttl=10.0, **batcher_kw) -> SessionService:
    store = SessionStore(engine.state_size, capacity=8, ttl=ttl, clock=lambda: now[0])
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0, **batcher_kw)
    await batcher.start()
    return SessionService(engine, store, batcher, LIMITS)


# --- 1. TTL vs an attached Stream: the lazy eviction is skipped on the attached path ----------


def test_an_attached_streams_request_after_the_ttl_is_evicted_like_every_other_access(engine, toy):
    """docs/guarantees.md: "idle longer than its TTL | evicted … | NOT_FOUND (evicted)";
    sessions.py: eviction is "also done lazily on access" (get: "also when it expired just
    now"). A unary Step / Snapshot past the TTL is NOT_FOUND (evicted) at once; the attached
    Stream's next request past the TTL is too (it had stepped the expired session and revived
    it, so the outcome depended on whether the periodic sweep had run in between)."""

    async def main():
        now = [0.0]
        svc = await service(engine, now)
        a = svc.attach("p")
        await a.step("", [1])
        sid = a.session.id
        control, _ = await svc.create("p", "control")
        await svc.step("p", "control", [1])
        now[0] += 100.0  # both idle 10x past their TTL; no sweep ran yet
        with pytest.raises(SessionNotFound, match="evicted"):  # the unary path: evicted
            await svc.step("p", "control", [2])
        outcome = None
        try:
            _, position = await a.step("", [2])
            outcome = f"stepped to position {position}; still live: {svc.store.local(sid)}"
        except SessionNotFound as e:
            outcome = e.reason
        a.detach()
        await svc.batcher.close()
        return outcome

    assert run(main()) == "evicted"


# --- 2. id reused after an eviction: the stale Stream is told "closed", not "evicted" -------


def test_a_stream_whose_evicted_session_id_was_taken_again_is_told_evicted(engine, toy):
    """The Stream's session was evicted (idle past its TTL; here by the create that reuses
    its id, which evicts it "now, not at the next sweep"). The new incarnation is correctly
    not reached, but the stale Stream's next request said NOT_FOUND (closed): the session
    was never closed — stats() counts it as evicted, and without the id reuse the same
    request says (evicted)."""

    async def main():
        now = [0.0]
        svc = await service(engine, now)
        await svc.create("p", "x")
        a = svc.attach("p")
        await a.step("x", [1])
        now[0] += 100.0  # idle past its TTL
        new, _ = await svc.create("p", "x")  # the client reuses its id
        with pytest.raises(SessionNotFound) as e:
            await a.step("", [2])
        st = svc.store.stats()
        a.detach()
        await svc.batcher.close()
        return e.value.reason, st["evicted"], st["closed"], new.position

    reason, evicted, closed, new_position = run(main())
    assert (evicted, closed, new_position) == (1, 0, 0)
    assert reason == "evicted"  # it had said closed


# --- 3. the batcher's per-session queue is keyed by id, not incarnation --------------------


def test_a_new_incarnation_is_not_refused_for_the_old_ones_queue(engine, toy):
    """Sessions are incarnations: after a close, a new session with the same id is another
    session that the old calls do not block. The batcher had keyed its per-session queue by id:
    with the closed incarnation's 64 queued Steps still waiting (its first one held in
    onnxruntime), the new session's very first Step was refused RESOURCE_EXHAUSTED
    "session 'x' already has 64 requests queued" although it had none."""

    async def main():
        now = [0.0]
        svc = await service(engine, now, inline=False)
        await svc.create("p", "x")
        gate = threading.Event()
        with inject(engine, gate=gate) as fault:
            old = [asyncio.ensure_future(svc.step("p", "x", [1]))]
            await until(lambda: len(fault.calls) >= 1)  # in onnxruntime, held by the gate
            old += [asyncio.ensure_future(svc.step("p", "x", [2])) for _ in range(64)]
            await asyncio.sleep(0)  # all 64 queued behind it
            await svc.close("p", "x")
            new, _ = await svc.create("p", "x")
            first = asyncio.ensure_future(svc.step("p", "x", [3]))
            await asyncio.sleep(0)
            gate.set()
            got = await asyncio.gather(first, return_exceptions=True)
            await asyncio.gather(*old, return_exceptions=True)
        state = svc.store.read(new)
        await svc.batcher.close()
        return got[0], state

    got, state = run(main())
    assert not isinstance(got, BaseException), f"new incarnation's first Step: {got!r}"
    assert got[1] == 1
    np.testing.assert_allclose(state, want_state(toy, [3]), atol=1e-5)


def test_dropping_the_old_incarnations_cancelled_requests_keeps_the_new_ones_pinned(engine, toy):
    """batcher._enqueue makes room in a full queue by dropping cancelled requests; it had
    unpinned the *arriving* request's session, not the dropped request's. When the queue
    (then keyed by id) still held a cancelled request of a closed incarnation, the new
    incarnation lost a pin: with two of its requests waiting it had one pin, and once the
    first ran, the second waited/ran with none — the sweep evicted the session under
    it (guarantees.md: "A session with a request queued or running is pinned and never
    evicted under it")."""

    async def main():
        now = [0.0]
        svc = await service(engine, now, inline=False, max_queue_per_session=2)
        store, batcher = svc.store, svc.batcher
        await svc.create("p", "x")
        gate = threading.Event()
        # run 0: held by the gate; runs >= 2 (the new session's second step) take 0.3 s
        with inject(engine, gate=gate, delay=0.3, delay_from=2) as fault:
            a = asyncio.ensure_future(svc.step("p", "x", [1]))
            await until(lambda: len(fault.calls) >= 1)  # in onnxruntime, held
            b = asyncio.ensure_future(svc.step("p", "x", [2]))
            await asyncio.sleep(0)
            b.cancel()  # cancelled while queued: stays in the queue until dropped
            await asyncio.sleep(0)
            await svc.close("p", "x")
            new, _ = await svc.create("p", "x")
            d = asyncio.ensure_future(svc.step("p", "x", [3]))
            await asyncio.sleep(0)
            c = asyncio.ensure_future(svc.step("p", "x", [4]))  # drops b to make room
            await asyncio.sleep(0)
            pins_with_two_queued = new._pins
            gate.set()
            await d
            # runs: 0 a, 1 d, 2 c. Once c is in onnxruntime it is running: its result (and
            # unpin) comes back through this event loop, so nothing can end it before the
            # sweep below, which runs with no await in between, however slow the machine
            await until(lambda: len(fault.calls) >= 3)
            now[0] += 100.0  # the sweep runs while c is running
            evicted = store.evict_idle()
            got = await asyncio.gather(c, a, return_exceptions=True)
        await batcher.close()
        return pins_with_two_queued, evicted, got[0]

    pins, evicted, c_result = run(main())
    assert evicted == [] and not isinstance(c_result, BaseException), (
        f"evicted under its running request: {evicted}, the request got {c_result!r}"
    )
    assert pins == 2, f"two requests of the new session queued, {pins} pin(s)"


# --- 4. stats(): sessions loaded from --state-dir are counted nowhere ----------------------


def test_loaded_sessions_are_counted_so_the_counters_add_up(engine, toy, tmp_path):
    """Every other way a session appears is counted (create → created, restore and a copy
    installed from another replica → restored, fork → forked), so
    created + restored + forked = live + closed + evicted. SessionStore.load counts its
    sessions as restored (it had counted them nowhere: after a restart the closed / evicted
    counters outgrew what was ever counted in)."""

    async def main():
        now = [0.0]
        svc = await service(engine, now)
        await svc.create("p", "x")
        await svc.step("p", "x", [1, 2, 3])
        await svc.create("p", "y")
        await svc.batcher.close()
        svc.store.save(tmp_path)
        store2 = SessionStore(
            engine.state_size, capacity=8, ttl=10.0, snapshot_key=svc.store.snapshot_key,
            clock=lambda: now[0],
        )  # fmt: skip
        assert store2.load(tmp_path) == 2
        np.testing.assert_allclose(
            store2.read(store2.get("x", "p")), want_state(toy, [1, 2, 3]), atol=1e-5
        )
        store2.close("x", "p")
        now[0] += 100.0
        store2.evict_idle()  # y
        return store2.stats()

    st = run(main())
    counted_in = st["created"] + st["restored"] + st["forked"]
    counted_out = st["sessions"] + st["closed"] + st["evicted"]
    assert counted_in == counted_out, st
