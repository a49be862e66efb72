"""SessionService paths the other service tests leave open: fetches from a shared store
(a finished fetch is not reused, a cancelled waiter does not cancel the others' fetch),
rewind while attached or draining and to the session's own position, Generate's own limits,
fork's error fields, a Stream whose session's lease went elsewhere, and the prefix cache's
entries after a partly cached prompt — each against the toy model's Engine or counts
written down independently."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import InvalidInput, SessionBusy, Unavailable
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore

LIMITS = ServiceLimits(max_tokens_per_request=8, max_new_tokens=100, max_ttl=60.0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(engine, limits: ServiceLimits = LIMITS) -> SessionService:
    store = SessionStore(engine.state_size, capacity=16)
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0)
    await batcher.start()
    return SessionService(engine, store, batcher, limits)


def _not_held(svc, fetch):
    """Make svc's store answer as a replicated one whose sessions are all elsewhere."""
    svc.store.held = lambda sid, principal=None: False
    svc.store.fetch = fetch
    svc._fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="ssmstream-fetch")


def test_a_session_not_held_is_fetched_again_on_each_later_request(toy_tok):
    """A finished fetch is not kept: a later request for a session that is (again) not held
    here fetches it anew, so it sees what another replica did to it meanwhile."""

    async def main():
        svc = await started(toy_tok)
        sid = svc.store.create("p").id
        calls = []
        _not_held(svc, lambda s, principal: calls.append((s, principal)))
        for _ in range(3):
            await svc._session(sid, "p")
        svc._fetch_pool.shutdown()
        await svc.batcher.close()
        return sid, calls

    sid, calls = run(main())
    assert calls == [(sid, "p")] * 3


def test_a_cancelled_request_does_not_cancel_the_fetch_another_request_waits_for(toy_tok):
    """Two requests wait for one fetch of a session; cancelling the first (its client went
    away) leaves the fetch running for the second, which gets the session."""
    gate = threading.Event()

    async def main():
        svc = await started(toy_tok)
        sid = svc.store.create("p").id
        calls = []

        def fetch(s, principal):
            calls.append(s)
            gate.wait(10)

        _not_held(svc, fetch)
        first = asyncio.ensure_future(svc._session(sid, "p"))
        second = asyncio.ensure_future(svc._session(sid, "p"))
        await asyncio.sleep(0.05)  # both wait for the one fetch
        first.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        s = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        svc._fetch_pool.shutdown()
        await svc.batcher.close()
        return calls, s.id, sid

    calls, got, sid = run(main())
    assert calls == [sid] and got == sid


REWIND = ServiceLimits(max_tokens_per_request=8, max_new_tokens=100, rewind_window=12)


def test_rewind_is_refused_while_a_stream_is_attached_and_changes_nothing(toy_tok):
    """A Stream owns its session while attached: a Rewind of it is SessionBusy and leaves
    the position; after the Stream detaches the same Rewind works."""

    async def main():
        svc = await started(toy_tok, REWIND)
        await svc.create("p", "a")
        a = svc.attach("p")
        await a.step("a", tokens=[1, 2, 3])
        a.delivered()
        with pytest.raises(SessionBusy) as e:
            await svc.rewind("p", "a", 1)
        position_while_attached = svc.store.get("a", "p").position
        a.detach()
        s = await svc.rewind("p", "a", 1)
        await svc.batcher.close()
        return str(e.value), position_while_attached, s.position

    msg, attached_pos, rewound = run(main())
    assert msg == "session 'a' is attached to an open Stream"
    assert (attached_pos, rewound) == (3, 1)


def test_rewind_to_the_sessions_own_position_is_allowed_and_keeps_its_state(toy_tok):
    """position == the session's position is inside the window (a no-op), not "ahead"."""

    async def main():
        svc = await started(toy_tok, REWIND)
        await svc.create("p", "a")
        await svc.step("p", "a", tokens=[4, 5, 6])
        s = await svc.rewind("p", "a", 3)
        state = svc.store.read(s)
        await svc.batcher.close()
        return s.position, state

    position, state = run(main())
    _, want = toy_tok.prefill(np.array([[4, 5, 6]]), toy_tok.new_state())
    assert position == 3
    np.testing.assert_allclose(state, want[0], atol=1e-5)


def test_rewind_is_refused_while_draining(toy_tok):
    """After drain() a Rewind is new work: Unavailable, the session not moved."""

    async def main():
        svc = await started(toy_tok, REWIND)
        await svc.create("p", "a")
        await svc.step("p", "a", tokens=[1, 2, 3])
        svc.drain()
        with pytest.raises(Unavailable) as e:
            await svc.rewind("p", "a", 1)
        pos = svc.store.get("a", "p").position
        await svc.batcher.close()
        return str(e.value), pos

    assert run(main()) == ("server is shutting down; retry on the restarted server", 3)


def test_a_session_a_stream_created_can_rewind(toy_tok):
    """A session made by a Stream's first step has its rewind history like a created one:
    a later Rewind returns it to the state Engine.prefill gives for the inputs before."""

    async def main():
        svc = await started(toy_tok, REWIND)
        a = svc.attach("p")
        await a.step("", tokens=[7, 8, 9, 10])
        a.delivered()
        sid = a.session.id
        a.detach()
        s = await svc.rewind("p", sid, 2)
        state = svc.store.read(s)
        await svc.batcher.close()
        return s.position, state

    position, state = run(main())
    _, want = toy_tok.prefill(np.array([[7, 8]]), toy_tok.new_state())
    assert position == 2
    np.testing.assert_allclose(state, want[0], atol=1e-5)


def test_generate_may_make_more_tokens_than_one_request_may_send(toy_tok):
    """max_new_tokens is bounded by --max-new-tokens (100 here), not by
    --max-tokens-per-request (8): 20 new tokens are generated, as Engine.generate's."""

    async def main():
        svc = await started(toy_tok)
        got = [g.token async for _, g in svc.generate("p", "", [3, 1], 20, 0.0)]
        with pytest.raises(InvalidInput) as e:
            async for _ in svc.generate("p", "", [3, 1], 101, 0.0):
                pass
        await svc.batcher.close()
        return got, e.value.field

    got, field = run(main())
    assert got == list(toy_tok.generate([3, 1], max_new_tokens=20, temperature=0.0))
    assert field == "max_new_tokens"


def test_fork_errors_about_the_new_id_name_new_session_id(toy_tok):
    """A malformed or taken new id is the request's new_session_id field, not session_id
    (which names the parent, and is fine)."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        await svc.create("p", "b")
        errors = []
        for new_id in ("q\n", "b"):
            with pytest.raises(InvalidInput) as e:
                await svc.fork("p", "a", new_id)
            errors.append(e.value.field)
        n = len(svc.store)
        await svc.batcher.close()
        return errors, n

    assert run(main()) == (["new_session_id", "new_session_id"], 2)


def test_values_not_a_multiple_of_d_input_are_refused_naming_the_field(toy_sig):
    """4 floats for d_input=3 (more than one row, not whole rows) are InvalidInput."""
    svc = SessionService(toy_sig, SessionStore(toy_sig.state_size), None, LIMITS)
    assert toy_sig.d_input == 3
    for n in (4, 5, 7):
        with pytest.raises(InvalidInput) as e:
            svc.inputs([], np.arange(n, dtype=np.float32))
        assert str(e.value) == f"values: has {n} floats, not a multiple of d_input=3"


def test_a_values_models_rewind_bound_counts_its_input_rows(toy_sig):
    """checkpoint_bytes_per_session for a values model: at most 2 * W / chunk + 3 states of
    S float32 and W + chunk input rows of d_input float32; the bytes a session's history
    really holds (feature_stats) stay within it."""
    W, Q, S, I = 12, 4, toy_sig.state_size, toy_sig.d_input
    limits = ServiceLimits(max_tokens_per_request=8, rewind_window=W)

    async def main():
        svc = await started(toy_sig, limits)
        assert svc.chunk == Q
        bound = svc.checkpoint_bytes_per_session()
        s, _ = await svc.create("p", "a")
        held = []
        rng = np.random.default_rng(0)
        for _ in range(3 * W):
            await svc.step("p", "a", values=rng.standard_normal(I).astype(np.float32))
            held.append((svc.feature_stats()["checkpoint_bytes"], s.history.nbytes))
        await svc.batcher.close()
        return bound, held

    bound, held = run(main())
    assert bound == (2 * W // Q + 3) * 4 * S + (W + Q) * 4 * I
    assert all(stats == own for stats, own in held)
    assert 0 < max(own for _, own in held) <= bound


def test_a_partly_cached_prompt_caches_its_new_pieces_at_their_place_in_the_prompt(toy_tok):
    """A prompt whose first chunk came from the cache caches the states after its later
    pieces at their positions in the whole prompt: the same prompt again is served whole,
    and the first chunk's entry is still the state after that chunk (Engine.prefill)."""
    limits = ServiceLimits(max_tokens_per_request=64, prefix_cache_bytes=1 << 20)
    first = [3, 1, 4, 1, 5, 9, 2, 6]
    second = first[:4] + [7, 7, 7, 7]

    async def main():
        svc = await started(toy_tok, limits)
        assert svc.chunk == 4
        got = []
        for prompt in (first, second, second, first[:4] + [0]):
            s, cached = await svc.create("p", prompt=prompt)
            got.append((cached, s.position, svc.store.read(s)))
        await svc.batcher.close()
        return got

    got = run(main())
    want = [(0, 8, first), (4, 8, second), (8, 8, second), (4, 5, first[:4] + [0])]
    for (cached, position, state), (w_cached, w_position, prompt) in zip(got, want):
        _, ref = toy_tok.prefill(np.array([prompt]), toy_tok.new_state())
        assert (cached, position) == (w_cached, w_position)
        np.testing.assert_allclose(state, ref[0], atol=1e-5)


def test_an_attached_stream_whose_session_is_not_held_here_fetches_it_before_stepping(toy_tok):
    """With a shared store, an attached Stream's session whose lease is not ours (another
    replica stepped it meanwhile) is fetched first: the next step continues from the
    fetched position and state, not from the stale local copy."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        a = svc.attach("p")
        await a.step("a", tokens=[1])
        a.delivered()
        s = a.session
        elsewhere = toy_tok.new_state()[0] + 0.25  # what another replica holds now
        fetched = []

        def fetch(sid, principal):
            fetched.append((sid, principal))
            svc.store.install(sid, principal, 60.0, 5, elsewhere, s.incarnation)

        _not_held(svc, fetch)
        y, position = await a.step("", tokens=[2])
        a.detach()
        svc._fetch_pool.shutdown()
        await svc.batcher.close()
        return fetched, y, position, elsewhere

    fetched, y, position, elsewhere = run(main())
    want, _ = toy_tok.step(np.array([2]), elsewhere[None])
    assert fetched == [("a", "p")] and position == 6
    np.testing.assert_allclose(y[0], want[0], atol=1e-5)


def test_a_rewinding_session_takes_cached_states_only_a_chunk_apart(toy_tok):
    """With rewind on (and a prefill graph with chunk states), a prompt whose cached
    pieces are after 4 and 12 inputs but not 8 is served up to 4 only: a cached state more
    than a chunk past the last one is not taken (a prefill would have had a checkpoint
    between). The rest is fed, and the state is Engine.prefill's."""
    limits = ServiceLimits(max_tokens_per_request=64, prefix_cache_bytes=1 << 20, rewind_window=16)
    prompt = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], np.int64)

    async def main():
        svc = await started(toy_tok, limits)
        assert svc.chunk == 4 and toy_tok.prefill_chunk_states
        outs, _ = toy_tok.prefill(prompt[None], toy_tok.new_state())
        entries = {}
        for end in (4, 12):
            _, st = toy_tok.prefill(prompt[None, :end], toy_tok.new_state())
            entries[end] = (st[0], outs[0, end - 1])
        svc.prefix_cache.insert(svc._scope("p"), prompt, entries)
        s, cached = await svc.create("p", prompt=prompt)
        state = svc.store.read(s)
        await svc.batcher.close()
        return cached, s.position, state

    cached, position, state = run(main())
    _, want = toy_tok.prefill(prompt[None], toy_tok.new_state())
    assert (cached, position) == (4, 12)
    np.testing.assert_allclose(state, want[0], atol=1e-5)
