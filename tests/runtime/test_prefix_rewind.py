"""The exact-prefix state cache and rewind, compared with independent computations: a fresh
session that prefills the whole prompt, the toy model's float64 recurrence, and the states a
session reported at each position as it went."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import OutOfRange, SessionBusy
from ssmstream.runtime.history import CheckpointBudget, History
from ssmstream.runtime.prefix_cache import PrefixCache
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore

V, S = 11, 8  # the toy token model (tests/runtime/conftest.py build_toy): chunk 4


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def engine(toy_token_model):
    return Engine(toy_token_model["model_dir"], device="cpu", threads=1)


async def started(engine, **limits) -> SessionService:
    store = SessionStore(engine.state_size, capacity=64)
    batcher = Batcher(engine, store, max_batch=8, max_batch_delay=0.0)
    await batcher.start()
    kw = {"max_tokens_per_request": 256, "prefix_cache_bytes": 1 << 20, "rewind_window": 16}
    return SessionService(engine, store, batcher, ServiceLimits(**{**kw, **limits}))


def fresh_state(engine, prompt) -> np.ndarray:
    """The state after `prompt` from zeros, by Engine.prefill alone (no cache, no service)."""
    _, s = engine.prefill(np.asarray(prompt, np.int64)[None], engine.new_state())
    return s[0]


# --- the cache on its own --------------------------------------------------------------------


def test_lookup_is_exact_and_longest():
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p = np.arange(10, dtype=np.int64)
    states = {n: (np.full(S, n, np.float32), np.full(3, n, np.float32)) for n in (4, 8, 10)}
    assert c.insert("a", p, states) == 3
    assert c.lookup("a", p).tokens == 10
    assert c.lookup("a", p[:9]).tokens == 8  # the tail of 9 is not cached: the chunk end is
    hit = c.lookup("a", np.r_[p[:6], 99, 99])
    assert hit.tokens == 4 and (hit.state == 4).all() and (hit.output == 4).all()
    assert c.lookup("a", np.r_[99, p[1:]]).tokens == 0  # the first piece differs
    assert c.lookup("b", p).tokens == 0  # another scope sees nothing
    assert c.lookup("a", p, limit=9).tokens == 8
    hit.state[:] = -1  # a hit is a copy: the cache is not changed through it
    assert (c.lookup("a", p[:4]).state == 4).all()


def test_a_forged_key_collision_does_not_match():
    """An entry is used only when its stored prefix equals the prompt's: planting another
    prompt's entry under this prompt's key is not enough."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p, q = np.arange(4, dtype=np.int64), np.arange(4, dtype=np.int64) + 5
    c.insert("s", q, {4: (np.ones(S, np.float32), np.ones(3, np.float32))})
    (entry,) = c._entries["s"].values()
    ((_, key_p),) = c._pieces("s", p.astype("<i8").tobytes())
    c._entries["s"][key_p] = entry  # the key of p now holds q's entry
    assert c.lookup("s", p).tokens == 0
    # a longer prompt whose longest key is forged still finds its true shorter prefix
    c2 = PrefixCache(1 << 20, chunk=4, model_sha="m")
    c2.insert("s", p, {4: (np.full(S, 4, np.float32), np.ones(3, np.float32))})
    long = np.r_[p, p]
    c2.insert("s", q, {4: (np.ones(S, np.float32), np.ones(3, np.float32))})
    forged = c2._entries["s"][c2._pieces("s", q.astype("<i8").tobytes())[0][1]]
    c2._entries["s"][c2._pieces("s", long.astype("<i8").tobytes())[1][1]] = forged
    hit = c2.lookup("s", long)
    assert hit.tokens == 4 and (hit.state == 4).all()


def test_a_later_piece_is_found_without_the_earlier_ones():
    """A prompt cached only at its end (a prefill graph without chunk-end states) is still
    found whole; a longer prompt finds prefixes only at its own piece ends."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p = np.arange(10, dtype=np.int64) % 7
    c.insert("s", p, {10: (np.ones(S, np.float32), np.ones(3, np.float32))})
    assert c.lookup("s", p).tokens == 10
    assert c.lookup("s", np.r_[p, 1, 2]).tokens == 0  # 10 is not a piece end of 12 tokens
    assert c.lookup("s", p[:8]).tokens == 0


def test_a_chain_lookup_stops_at_the_first_piece_not_cached_and_gives_each_pieces_state():
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p = np.arange(14, dtype=np.int64) % 9
    states = {n: (np.full(S, n, np.float32), np.full(3, n, np.float32)) for n in (4, 8, 12, 14)}
    c.insert("s", p, states)
    hit = c.lookup("s", p, chain=True)
    assert hit.tokens == 14 and sorted(hit.states) == [4, 8, 12, 14]
    assert all((hit.states[n] == n).all() for n in hit.states)
    assert c.lookup("s", p, limit=13, chain=True).tokens == 12
    assert c.lookup("s", p, chain=True, gap=3).tokens == 0  # 0 → 4 is more than 3 apart
    del c._entries["s"][c._pieces("s", p.astype("<i8").tobytes())[2][1]]  # the state after 12
    assert c.lookup("s", p).tokens == 14  # a plain lookup still takes the longest
    hit = c.lookup("s", p, chain=True)
    assert hit.tokens == 14 and sorted(hit.states) == [4, 8, 14]
    hit = c.lookup("s", p, chain=True, gap=4)  # 8 → 14 is more than 4 apart
    assert hit.tokens == 8 and sorted(hit.states) == [4, 8] and (hit.state == 8).all()
    assert c.lookup("s", p, chain=True, gap=6).tokens == 14


def test_under_pressure_a_prompts_first_pieces_stay_longest():
    """A chain lookup (rewind on) needs a prompt's pieces from its start: eviction takes the
    last pieces first, so a full cache still serves the beginning of an older prompt."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, 16) for _ in range(3)]
    states = {e: (np.zeros(S, np.float32), np.zeros(3, np.float32)) for e in (4, 8, 12, 16)}
    one = PrefixCache(1 << 20, 4, "m")
    one.insert("s", prompts[0], states)
    c = PrefixCache(int(2.5 * one.bytes), chunk=4, model_sha="m")  # room for 2.5 prompts
    for p in prompts:
        c.insert("s", p, states)
    assert c.stats()["evictions"] > 0
    got = [c.lookup("s", p, chain=True, gap=4).tokens for p in prompts]
    assert got[1:] == [16, 16] and 0 < got[0] < 16, got
    hit = c.lookup("s", prompts[0], chain=True, gap=4)
    assert sorted(hit.states) == list(range(4, hit.tokens + 1, 4))


def test_a_partly_cached_prompts_beginning_stays_longest_too():
    """A prompt whose first pieces were cached by an earlier one: inserting it puts those
    pieces behind its new ones in the LRU order, so pressure takes its last piece first and
    a chain lookup still finds 12 of its 13 tokens (its first pieces had gone first)."""
    a = np.arange(8) % V
    b = np.r_[a, [3, 1, 4, 1, 5]]  # pieces 4, 8 (a's), 12, 13
    states = {e: (np.zeros(S, np.float32), np.zeros(3, np.float32)) for e in (4, 8, 12, 13)}
    all_b, other = PrefixCache(1 << 20, 4, "m"), PrefixCache(1 << 20, 4, "m")
    all_b.insert("s", b, states)
    other.insert("s", np.full(4, 9), {4: states[4]})
    c = PrefixCache(all_b.bytes + other.bytes // 2, chunk=4, model_sha="m")  # b's, not more
    c.insert("s", a, states)
    assert c.lookup("s", b, chain=True, gap=4).tokens == 8
    c.insert("s", b, states)
    c.insert("s", np.full(4, 9), {4: states[4]})  # one piece too many: one goes
    assert c.stats()["evictions"] == 1
    assert c.lookup("s", b, chain=True, gap=4).tokens == 12


def test_eviction_holds_the_byte_limit_least_recently_used_first():
    one = PrefixCache(1 << 20, 4, "m")
    one.insert("s", np.arange(4), {4: (np.zeros(S, np.float32), np.zeros(3, np.float32))})
    size = one.bytes
    c = PrefixCache(3 * size, chunk=4, model_sha="m")
    prompts = [np.full(4, i, np.int64) for i in range(5)]
    for i, p in enumerate(prompts):
        c.insert("s", p, {4: (np.zeros(S, np.float32), np.zeros(3, np.float32))})
        if i == 2:
            assert c.lookup("s", prompts[0]).tokens == 4  # 0 is used: 1 is now the oldest
        assert c.bytes <= 3 * size
    assert [c.lookup("s", p).tokens for p in prompts] == [4, 0, 0, 4, 4]
    assert c.stats()["evictions"] == 2 and c.stats()["entries"] == 3


def test_off_caches_nothing():
    c = PrefixCache(0, 4, "m")
    assert c.insert("s", np.arange(8), {4: (np.zeros(S), np.zeros(3))}) == 0
    assert c.lookup("s", np.arange(8)).tokens == 0


# --- through the service ---------------------------------------------------------------------


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shared=st.lists(st.integers(0, V - 1), min_size=0, max_size=14),
    tails=st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=9), min_size=2, max_size=4),
)
@example(shared=[1, 2, 3, 4, 5, 6, 7, 8, 9], tails=[[1], [2, 3], [2, 3, 4, 5]])  # 8 shared served
def test_cached_sessions_equal_fresh_ones(engine, shared, tails):
    """Prompts sharing a prefix: each session from the cache holds the state a fresh prefill
    of the whole prompt gives (the same graphs on the same inputs: within the prefill-vs-step
    parity, 1e-5 here), and the cache served whole chunks of the shared prefix."""

    def ends(p: list) -> list[int]:  # where a prompt's pieces end: chunk ends and its end
        e = list(range(4, len(p) + 1, 4))
        return e if e and e[-1] == len(p) else [*e, len(p)]

    def expected(seen: list[list], p: list) -> int:
        """Tokens the cache can serve (counted independently of the cache): the prompt's
        pieces from the start, as long as an earlier prompt has the same prefix there."""
        served = 0
        for e in ends(p):
            if not any(e in ends(q) and q[:e] == p[:e] for q in seen):
                break
            served = e
        return served

    async def main():
        svc = await started(engine)
        seen = []
        for tail in tails:
            prompt = [*shared, *tail]
            s, cached = await svc.create("p", prompt=prompt)
            assert s.position == len(prompt) and cached == expected(seen, prompt), seen
            np.testing.assert_allclose(svc.store.read(s), fresh_state(engine, prompt), atol=1e-5)
            seen.append(prompt)
        again, cached = await svc.create("p", prompt=[*shared, *tails[0]])
        assert cached == len(shared) + len(tails[0])  # the whole prompt, the second time
        assert svc.prefix_cache.stats()["hits"] >= 1
        await svc.batcher.close()

    run(main())


def test_a_principal_never_hits_another_principals_entries(engine):
    async def main():
        svc = await started(engine)
        prompt = list(range(10))
        _, first = await svc.create("alice", prompt=prompt)
        _, mine = await svc.create("alice", prompt=prompt)
        _, theirs = await svc.create("bob", prompt=prompt)
        assert (first, mine, theirs) == (0, 10, 0)
        await svc.batcher.close()
        shared = await started(engine, prefix_cache_scope="global")
        await shared.create("alice", prompt=prompt)
        assert (await shared.create("bob", prompt=prompt))[1] == 10
        await shared.batcher.close()

    run(main())


@pytest.mark.parametrize("prompt", [[5], [5, 6], list(range(4)), list(range(5))])
def test_a_step_queued_behind_a_prompt_never_reaches_its_cache_entry(engine, prompt):
    """CreateSession(prompt) under a chosen id with a Step of that id queued right behind it
    (the Step runs before the create resumes): the cache keeps the state after the prompt,
    so another principal's session (global scope) starts where a fresh prefill would."""

    async def main():
        svc = await started(engine, prefix_cache_scope="global")
        create = asyncio.ensure_future(svc.create("mallory", session_id="m1", prompt=prompt))
        await asyncio.sleep(0)  # the session exists, its prompt is with the batcher
        step = asyncio.ensure_future(svc.step("mallory", "m1", [7]))
        await asyncio.gather(create, step)
        victim, cached = await svc.create("alice", prompt=prompt)
        got = svc.store.read(victim)
        await svc.batcher.close()
        return cached, got

    cached, got = run(main())
    assert cached == len(prompt)
    np.testing.assert_allclose(got, fresh_state(engine, prompt), atol=1e-5)


def test_a_session_closed_while_its_batch_finishes_fails_no_other_request(engine):
    """A CloseSession that lands between a batch's commit and its rewind-history updates:
    every step of the batch applied, so every request gets its result (none INTERNAL), and
    the closed session's checkpoint bytes stay given back."""

    async def main():
        svc = await started(engine)
        loop = asyncio.get_running_loop()
        a, _ = await svc.create("p")
        b, _ = await svc.create("p")
        real = svc.store.give_back

        def give_back_then_close_a(sessions, consumed):  # on the worker thread
            out = real(sessions, consumed)
            if consumed and a in sessions:
                asyncio.run_coroutine_threadsafe(svc.close("p", a.id), loop).result(10)
            return out

        svc.store.give_back = give_back_then_close_a
        try:
            got = await asyncio.gather(
                svc.step("p", a.id, [3]), svc.step("p", b.id, [4]), return_exceptions=True
            )
        finally:
            svc.store.give_back = real
        state_b = svc.store.read(b)
        budget = svc.checkpoint_budget.used
        await svc.close("p", b.id)
        await svc.batcher.close()
        return got, b.position, state_b, budget, svc.checkpoint_budget.used

    got, position_b, state_b, budget, after = run(main())
    assert [g[1] for g in got] == [1, 1], got  # both applied and both told so
    assert position_b == 1
    np.testing.assert_allclose(state_b, fresh_state(engine, [4]), atol=1e-6)
    assert budget == S * 4 and after == 0  # only b's first checkpoint; then none


def test_generate_on_a_new_session_uses_the_cache(engine):
    async def main():
        svc = await started(engine)
        prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
        want = list(engine.generate(prompt, max_new_tokens=5, temperature=0.0))
        for _ in range(2):  # a miss, then a hit of the whole prompt (its last output cached)
            got = [g.token async for _, g in svc.generate("p", "", prompt, 5, 0.0)]
            assert got == want
        assert svc.prefix_cache.stats()["cached_tokens"] == len(prompt)
        assert len(svc.store) == 0
        await svc.batcher.close()

    run(main())


# --- rewind ------------------------------------------------------------------------------------


def test_rewind_to_every_position_in_the_window_equals_the_state_it_had(engine):
    """A session fed by single steps and prompts of several lengths; after each request its
    state is read. Rewinding to any position in the window gives that state (bit-identical
    where the same steps made it, within 1e-5 where a prefill made it), and continuing from
    there gives the same outputs again."""

    async def main():
        svc = await started(engine, rewind_window=16)
        s, _ = await svc.create("p")
        rng = np.random.default_rng(0)
        seen = {0: svc.store.read(s)}
        for n in [1, 1, 6, 1, 1, 1, 9, 1, 1, 2, 1, 5, 1, 1]:
            x = rng.integers(0, V, n)
            await svc.step("p", s.id, x)
            seen[s.position] = svc.store.read(s)
        top = s.position
        for target in range(top, top - 17, -1):
            if target not in seen:
                continue
            await svc.rewind("p", s.id, target)
            assert s.position == target
            np.testing.assert_allclose(svc.store.read(s), seen[target], atol=1e-5)
            replay = [p for p in seen if p > target]
            if not replay:
                continue
            x = rng.integers(0, V, 1)
            y, _ = await svc.step("p", s.id, x)
            want, _ = engine.step(x, seen[target][None])
            np.testing.assert_allclose(y, want, atol=1e-5)
            await svc.rewind("p", s.id, target)  # undo that step too
        await svc.batcher.close()

    run(main())


@pytest.mark.parametrize("generate", [False, True], ids=["CreateSession", "Generate"])
def test_a_session_from_a_cached_prompt_rewinds_into_it_as_a_prefilled_one_does(engine, generate):
    """Whether a prompt came from the cache or was prefilled, the session can rewind to any
    position of it in the window, with checkpoints at most a chunk apart; the state there is
    the state after that prefix computed afresh."""
    prompt = np.arange(14, dtype=np.int64) % V

    async def session(svc):
        if not generate:
            return await svc.create("p", prompt=prompt)
        gen = svc.generate("p", "", prompt, 1, 0.0, keep_session=True)
        (sid,) = {sid async for sid, _ in gen}
        return svc.store.get(sid, "p"), svc.prefix_cache.stats()["cached_tokens"]

    async def main():
        svc = await started(engine, rewind_window=16)
        cold, cached = await session(svc)
        assert cached == 0
        warm, cached = await session(svc)
        assert svc.prefix_cache.stats()["cached_tokens"] == 14
        at = [p for p, _ in warm.history._checkpoints]
        assert at[0] == 0 and max(np.diff(at)) <= svc.chunk, at
        for target in (13, 5, 3, 0):
            want = fresh_state(engine, prompt[:target]) if target else engine.new_state()[0]
            for s in (cold, warm):
                await svc.rewind("p", s.id, target)
                np.testing.assert_allclose(svc.store.read(s), want, atol=1e-5)
        await svc.batcher.close()

    run(main())


def test_rewind_outside_the_window_is_refused_and_changes_nothing(engine):
    async def main():
        svc = await started(engine, rewind_window=8)
        s, _ = await svc.create("p")
        for _ in range(20):
            await svc.step("p", s.id, [1])
        before = svc.store.read(s)
        for bad in (20 - 9, 0, 21):
            with pytest.raises(OutOfRange, match="position"):
                await svc.rewind("p", s.id, bad)
            assert s.position == 20
            np.testing.assert_array_equal(svc.store.read(s), before)
        await svc.rewind("p", s.id, 16)
        with pytest.raises(OutOfRange, match=r"outside the rewind window \[12, 16\]"):
            await svc.rewind("p", s.id, 11)  # a rewind does not widen the window
        await svc.rewind("p", s.id, 12)  # exactly the window back from the furthest, 20
        np.testing.assert_allclose(svc.store.read(s), fresh_state(engine, [1] * 12), atol=1e-5)
        a = svc.attach("p")
        await a.step(s.id, [2])
        with pytest.raises(SessionBusy):
            await svc.rewind("p", s.id, 12)
        a.detach()
        off = await started(engine, rewind_window=0)
        t, _ = await off.create("p")
        await off.step("p", t.id, [1, 2])
        with pytest.raises(OutOfRange, match="no rewind history"):
            await off.rewind("p", t.id, 1)
        await svc.batcher.close()
        await off.batcher.close()

    run(main())


def test_snapshot_fork_and_restore_of_a_session_with_history(engine):
    async def main():
        svc = await started(engine, rewind_window=16)
        s, _ = await svc.create("p", prompt=list(range(9)))
        await svc.step("p", s.id, [1])
        data, position = await svc.snapshot("p", s.id)
        child = await svc.fork("p", s.id)
        copy = await svc.restore("p", data)
        assert position == child.position == copy.position == 10
        for t in (s, child, copy):  # each rewinds within its own history
            await svc.step("p", t.id, [2, 3])
            await svc.rewind("p", t.id, 11)
            np.testing.assert_allclose(
                svc.store.read(t), fresh_state(engine, [*range(9), 1, 2]), atol=1e-5
            )
        with pytest.raises(OutOfRange):
            await svc.rewind("p", child.id, 9)  # before the fork: not in the child's history
        await svc.batcher.close()

    run(main())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-6, 13).filter(bool), min_size=1, max_size=60))
@example([6, *[-3, 4] * 20])  # rewinds and prefills in turn: a begin state kept each time
def test_checkpoints_are_at_most_a_chunk_apart_and_bounded(lengths):
    """Requests of any lengths (1: a step, more: a prefill with its states where it began,
    at its chunk ends and at its end, as the batcher records them; < 0: a rewind that many
    inputs back, within the window): no two checkpoints are more than Q apart (a rewind
    replays fewer than Q inputs), and the bytes stay within max_bytes."""
    W, Q = 16, 4
    h = History(window=W, chunk=Q, position=0, state=np.zeros(S, np.float32))
    bound = History.max_bytes(W, Q, S, 8)
    position = 0
    for T in lengths:
        end = position + T
        if T < 0:
            end = max(end, h.oldest)
            x, replay = h.plan(end)
            h.rewound(end)
        elif T == 1:
            h.step(np.array([end % V]), end, np.full, S, end, np.float32)
        else:
            ends = [*range(position + Q, end, Q), end]
            states = {p: np.full(S, p, np.float32) for p in [position, *ends]}
            h.record(np.arange(position, end) % V, end, states)
        position = end
        marks = [c for c, _ in h._checkpoints]
        assert all(b - a <= Q for a, b in zip(marks, marks[1:])), marks
        assert all(x[0] == c for c, x in h._checkpoints)  # each holds its own state
        assert h.nbytes <= bound
        assert len(h._inputs) <= W + Q and len(marks) <= 2 * W // Q + 3
        # only the latest checkpoint at or below position - W is kept below the window
        assert len(marks) == 1 or marks[1] > position - W, (marks, position)
        for r in range(h.oldest, position + 1):
            x, replay = h.plan(r)
            assert len(replay) < Q and x[0] == max(c for c in marks if c <= r)


def test_history_bytes_are_bounded_by_the_window():
    h = History(window=32, chunk=4, position=0, state=np.zeros(S, np.float32))
    bound = History.max_bytes(32, 4, S, 8)
    for p in range(1, 500):
        h.record(np.array([p % V]), p, {p: np.full(S, p, np.float32)})
        assert h.nbytes <= bound
    assert h.oldest == 499 - 32


def test_the_shared_budget_bounds_all_sessions_checkpoints_and_is_given_back(engine):
    """Past the budget the growing session drops its own oldest checkpoints (its window
    shrinks, rewinds inside it stay exact); closing sessions gives their bytes back."""

    async def main():
        per_checkpoint = 4 * engine.state_size
        svc = await started(engine, rewind_window=64, rewind_memory_bytes=6 * per_checkpoint)
        a, _ = await svc.create("p")
        b, _ = await svc.create("p")
        for _ in range(40):
            await svc.step("p", a.id, [1])
            await svc.step("p", b.id, [2])
        assert svc.checkpoint_budget.used <= 6 * per_checkpoint + 2 * per_checkpoint
        oldest = a.history.oldest
        assert oldest > 40 - 64  # the window shrank below the configured 64
        with pytest.raises(OutOfRange):
            await svc.rewind("p", a.id, oldest - 1)
        await svc.rewind("p", a.id, oldest)
        np.testing.assert_allclose(svc.store.read(a), fresh_state(engine, [1] * oldest), atol=1e-5)
        await svc.close("p", a.id)
        await svc.close("p", b.id)
        assert svc.checkpoint_budget.used == 0
        await svc.batcher.close()

    run(main())


def test_a_prefill_graph_without_chunk_states_still_serves_both_features(
    toy_token_model_without_chunk_states,
):
    """Older exports have no chunk_states: the engine reports states at the end of each
    prefill call instead, the cache still finds whole prompts, and rewind stays exact."""
    toy = toy_token_model_without_chunk_states
    engine = Engine(toy["model_dir"], device="cpu", threads=1)
    assert not engine.prefill_chunk_states
    states: dict = {}
    x = np.arange(14, dtype=np.int64)[None] % V  # 3 pieces of 4 (max_len 12) + 2 steps
    engine.prefill_unchecked(x, engine.new_state(), states)
    assert sorted(states) == [12, 14]
    for t, s in states.items():
        np.testing.assert_allclose(s[0], fresh_state(engine, x[0, :t]), atol=1e-5)

    async def main():
        svc = await started(engine, rewind_window=32)
        prompt = list(range(10))
        await svc.create("p", prompt=prompt)
        s, cached = await svc.create("p", prompt=prompt)
        assert cached == 10
        await svc.step("p", s.id, [1, 2, 3, 4, 5, 6, 7, 8, 9])
        await svc.rewind("p", s.id, 13)
        np.testing.assert_allclose(
            svc.store.read(s), fresh_state(engine, [*prompt, 1, 2, 3]), atol=1e-5
        )
        await svc.batcher.close()

    run(main())


def test_a_released_history_plans_nothing_and_ignores_late_updates():
    """After release, plan says the history is gone (OutOfRange on
    `position`) and a late record / step neither records nor takes budget bytes."""
    budget = CheckpointBudget()
    h = History(8, 4, 0, np.zeros(4, np.float32), budget)
    h.record(np.arange(4), 4, {4: np.ones(4, np.float32)})
    assert budget.used == 2 * 16
    h.release()
    assert budget.used == 0 and h.released
    with pytest.raises(OutOfRange) as e:
        h.plan(4)
    assert e.value.field == "position"
    assert str(e.value) == "position: the session's rewind history is gone (closed)"
    h.record(np.arange(4), 8, {8: np.ones(4, np.float32)})
    h.step(np.arange(1), 9, lambda: np.ones(4, np.float32))
    assert budget.used == 0 and h.nbytes == 0


def _states(*ends, S=4, D=2):
    return {n: (np.full(S, n, np.float32), np.full(D, n, np.float32)) for n in ends}


def test_lookup_limit_is_inclusive():
    """`limit` is the most tokens the hit may have."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p = np.arange(10, dtype=np.int64)
    assert c.insert("s", p, _states(4, 8, 10)) == 3
    assert c.lookup("s", p, limit=8).tokens == 8
    assert c.lookup("s", p, limit=10).tokens == 10
    assert c.lookup("s", p, limit=9).tokens == 8
    assert c.lookup("s", p, limit=4).tokens == 4
    assert c.lookup("s", p, limit=3).tokens == 0


def test_an_entry_larger_than_the_whole_budget_is_not_cached_and_evicts_nothing():
    """An entry over max_bytes is skipped; it must not flush
    the entries that fit (and then itself)."""
    c = PrefixCache(300, chunk=4, model_sha="m")
    small = np.arange(4, dtype=np.int64)
    assert c.insert("s", small, _states(4)) == 1  # 32 + 16 + 8 + 96 = 152 bytes
    big = np.arange(100, 140, dtype=np.int64)
    assert c.insert("s", big, _states(40)) == 0  # 320 + 16 + 8 + 96 = 440 > 300
    assert c.stats() == {
        "hits": 0, "misses": 0, "cached_tokens": 0, "evictions": 0, "bytes": 152, "entries": 1,
    }  # fmt: skip
    assert c.lookup("s", small).tokens == 4


S, D = 8, 3  # the state and output sizes of the History and PrefixCache unit tests below


def _x(p: int) -> np.ndarray:
    return np.full(S, p, np.float32)


@pytest.mark.parametrize("W", [2, 6, 8])
def test_nbytes_counts_checkpoints_and_held_inputs_exactly_step_by_step(W):
    """Fed single steps, checkpoints sit at multiples of Q; the oldest one kept is the
    latest at or below position - W (trimmed at every step, not only at checkpoints), and
    the inputs from it on are held: nbytes = checkpoints * 4S + inputs * 8."""
    Q = 4
    h = History(window=W, chunk=Q, position=0, state=_x(0))
    for p in range(1, 40):
        h.step(np.array([p % 11], np.int64), p, lambda p=p: _x(p))
        cps = [c for c in range(0, p + 1, Q)]
        while len(cps) > 1 and cps[1] <= p - W:
            cps.pop(0)
        want = len(cps) * 4 * S + (p - cps[0]) * 8
        assert h.nbytes == want, p
        assert h.oldest == max(cps[0], p - W)


def test_the_window_counts_back_from_the_furthest_position_reached():
    """A rewind does not widen the window: it stays furthest - W until the session passes
    its furthest position again, and then moves on with it."""
    Q, W = 4, 10
    h = History(window=W, chunk=Q, position=0, state=_x(0))
    for p in range(1, 21):
        h.step(np.array([p], np.int64), p, lambda p=p: _x(p))
    assert h.oldest == 10
    for back in (15, 12):
        h.rewound(back)
        assert h.oldest == 10 and h.furthest == 20
        with pytest.raises(OutOfRange, match=rf"outside the rewind window \[10, {back}\]"):
            h.plan(9)
    for p in range(13, 25):  # on past 20: the window moves with the new furthest position
        h.step(np.array([p], np.int64), p, lambda p=p: _x(p))
        assert h.oldest == max(10, p - W) and h.furthest == max(20, p)
    x, rows = h.plan(14)
    np.testing.assert_array_equal(x, _x(12))
    assert rows.tolist() == [13, 14]


def test_a_restart_holds_no_stale_inputs_so_a_replay_uses_the_inputs_after_it():
    """A record that does not follow on (a state installed from elsewhere) restarts the
    history at its end with no inputs: a later replay from there feeds the later inputs."""
    h = History(window=16, chunk=4, position=0, state=_x(0))
    h.record(np.array([1, 2], np.int64), 2, {2: _x(2)})
    h.record(np.array([7, 8, 9], np.int64), 13, {13: _x(13)})  # 13 - 3 != 2: restart at 13
    assert h.oldest == 13 and h.nbytes == 4 * S
    h.record(np.array([5], np.int64), 14, {14: _x(14)})
    x, rows = h.plan(14)
    np.testing.assert_array_equal(x, _x(13))
    assert rows.tolist() == [5]
    with pytest.raises(OutOfRange, match=r"outside the rewind window \[13, 14\]"):
        h.plan(12)


def test_a_single_step_that_does_not_follow_on_restarts_the_history():
    """`step` is `record` for one input: a step ending anywhere but position + 1 restarts
    the history there, even when a checkpoint would not yet be due."""
    h = History(window=16, chunk=4, position=0, state=_x(0))
    for p in range(1, 6):
        h.step(np.array([p], np.int64), p, lambda p=p: _x(p))
    assert h.position == 5 and h.oldest == 0
    h.step(np.array([3], np.int64), 7, lambda: _x(70))  # skips position 6: not a continuation
    assert h.position == 7 and h.oldest == 7
    x, rows = h.plan(7)
    np.testing.assert_array_equal(x, _x(70))
    assert rows.size == 0
    with pytest.raises(OutOfRange):
        h.plan(5)


def test_pruning_a_middle_checkpoint_gives_its_bytes_back_to_the_budget():
    """After a rewind a checkpoint between two others may become redundant and is dropped:
    its bytes go back to the shared budget, so a released history leaves the budget at 0."""
    budget = CheckpointBudget()
    h = History(window=16, chunk=4, position=0, state=_x(0), budget=budget)
    h.record(np.arange(6, dtype=np.int64), 6, {1: _x(1), 6: _x(6)})  # checkpoints 0, 1, 6
    h.rewound(1)  # checkpoints 0, 1
    h.record(np.arange(5, dtype=np.int64), 6, {2: _x(2), 6: _x(6)})  # 2 makes 1 redundant
    assert h.nbytes == 3 * 4 * S + 6 * 8  # checkpoints 0, 2, 6 and inputs 0..5
    assert budget.used == 3 * 4 * S
    h.release()
    assert budget.used == 0


def test_a_prefill_state_at_the_last_checkpoint_is_not_kept_twice():
    """A prefill reports the state where it began, which is the latest checkpoint already:
    it is not added again (one checkpoint per position)."""
    budget = CheckpointBudget()
    h = History(window=32, chunk=4, position=4, state=_x(4), budget=budget)
    h.record(np.arange(9, dtype=np.int64), 13, {4: _x(4), 13: _x(13)})  # no chunk-end states
    assert h.nbytes == 2 * 4 * S + 9 * 8
    assert budget.used == 2 * 4 * S
    x, rows = h.plan(6)
    np.testing.assert_array_equal(x, _x(4))
    assert rows.tolist() == [0, 1]


def _entry_bytes(end):  # prefix + state + output + 96 (see _Entry.nbytes)
    return 8 * end + 4 * S + 4 * D + 96


def test_a_chain_lookup_keeps_the_prompts_first_piece_longest():
    """After a chain lookup (a session with rewind) the prompt's first piece is the most
    recently used, its last piece the least: under pressure the last one goes first."""
    p = np.arange(12, dtype=np.int64)
    other = np.full(4, 99, np.int64)
    budget = sum(_entry_bytes(e) for e in (4, 8, 12)) + _entry_bytes(4) - 1
    c = PrefixCache(budget, chunk=4, model_sha="m")
    assert c.insert("s", p, _states(4, 8, 12, S=S, D=D)) == 3
    hit = c.lookup("s", p, chain=True)
    assert hit.tokens == 12 and sorted(hit.states) == [4, 8, 12]
    assert (
        c.insert("s", other, _states(4, S=S, D=D)) == 1
    )  # evicts one entry: the least recently used
    assert c.stats()["evictions"] == 1
    assert c.lookup("s", p[:4]).tokens == 4  # the first piece stayed
    assert c.lookup("s", p[:8]).tokens == 8
    assert c.lookup("s", p).tokens == 8  # the last piece went


def test_an_empty_prompt_is_neither_a_hit_nor_a_miss():
    """Nothing to look up: the counters (exported as metrics) do not move."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    c.insert("s", np.arange(4, dtype=np.int64), _states(4, S=S, D=D))
    hit = c.lookup("s", np.empty(0, np.int64))
    assert hit.tokens == 0 and hit.state is None
    assert c.stats() == {
        "hits": 0,
        "misses": 0,
        "cached_tokens": 0,
        "evictions": 0,
        "bytes": _entry_bytes(4),
        "entries": 1,
    }


def test_an_entry_is_a_copy_of_the_callers_state_and_output():
    """insert copies: a caller that reuses its buffers afterwards does not change the cache."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    state, output = np.full(S, 1.5, np.float32), np.full(D, 2.5, np.float32)
    c.insert("s", np.arange(4, dtype=np.int64), {4: (state, output)})
    state[:] = -1.0
    output[:] = -1.0
    hit = c.lookup("s", np.arange(4, dtype=np.int64))
    np.testing.assert_array_equal(hit.state, np.full(S, 1.5, np.float32))
    np.testing.assert_array_equal(hit.output, np.full(D, 2.5, np.float32))


def test_a_plain_lookup_takes_the_longest_prefix_whatever_the_gap():
    """`gap` only limits a chain lookup (a session with rewind takes the pieces' states as
    checkpoints); the service passes it for every lookup, so a plain one must ignore it."""
    c = PrefixCache(1 << 20, chunk=4, model_sha="m")
    p = np.arange(12, dtype=np.int64)
    c.insert("s", p, _states(12, S=S, D=D))  # only the whole prompt: 12 inputs from 0
    assert c.lookup("s", p, chain=False, gap=4).tokens == 12
    assert c.lookup("s", p, chain=True, gap=4).tokens == 0  # the chain cannot reach it
    assert c.lookup("s", p, chain=True, gap=None).tokens == 12


def test_eviction_takes_from_the_scope_holding_the_most_so_others_hits_stay():
    """Room for 4 entries: bob caches 2 prompts, then alice sends 10. Alice's own oldest go;
    bob's stay hits, so his hits do not tell how much alice sent. When bob holds the most,
    his least recently used entry goes first, even before alice's older one."""
    one = lambda n: {4: (np.full(S, n, np.float32), np.ones(3, np.float32))}  # noqa: E731
    prompt = lambda n: np.full(4, n, dtype=np.int64)  # noqa: E731
    probe = PrefixCache(1 << 20, chunk=4, model_sha="m")
    probe.insert("x", prompt(0), one(0))
    c = PrefixCache(4 * probe.bytes, chunk=4, model_sha="m")
    for n in (1, 2):
        c.insert("bob", prompt(n), one(n))
    for n in range(10, 20):
        c.insert("alice", prompt(n), one(n))
        assert c.bytes <= c.max_bytes
    assert [c.lookup("bob", prompt(n)).tokens for n in (1, 2)] == [4, 4]
    assert [c.lookup("alice", prompt(n)).tokens for n in (17, 18, 19)] == [0, 4, 4]
    assert c.stats()["entries"] == 4 and c.stats()["evictions"] == 8
    assert c.bytes == sum(c._scope_bytes.values()) == 4 * probe.bytes
    c.insert("bob", prompt(3), one(3))  # bob 3, alice 2: bob's least recent (1) goes
    assert c.lookup("bob", prompt(1)).tokens == 0
    assert [c.lookup("bob", prompt(n)).tokens for n in (2, 3)] == [4, 4]
    assert [c.lookup("alice", prompt(n)).tokens for n in (18, 19)] == [4, 4]


@pytest.mark.parametrize("by", ["steps", "prefills"])
def test_kept_inputs_cost_their_bytes_not_an_object_each(by):
    """The inputs kept for replay were one numpy array per input (~100 bytes of object for an
    8-byte token): a server's memory for rewind was ~5× what it reported. In one array they
    cost their bytes; what the process holds stays within max_bytes (checkpoints of small
    states add their arrays' object headers, hence the margin)."""
    import tracemalloc

    S, W, Q = 64, 4096, 64
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        h = History(W, Q, 0, np.zeros(S, np.float32))
        state = np.zeros(S, np.float32)
        for p in range(1, W + 5 * Q + 1) if by == "steps" else ():
            h.step(np.array([p % 256]), p, lambda: state)
        for end in range(Q, W + 5 * Q + 1, Q) if by == "prefills" else ():
            h.record(np.arange(Q, dtype=np.int64), end, {end: state})
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(h._inputs) >= W
    assert held <= 1.5 * History.max_bytes(W, Q, S, 8), (held, History.max_bytes(W, Q, S, 8))


def test_after_a_rewind_the_positions_it_left_are_outside_the_window():
    """The window's top is the session's position, not the furthest it reached: after a
    rewind to 5 from 9, planning 6 is OutOfRange naming [oldest, 5] (the inputs after 5 are
    forgotten), while 5 still plans from the checkpoint at 4 with input 4."""
    h = History(window=16, chunk=4, position=0, state=_x(0))
    for p in range(1, 10):
        h.step(np.array([p - 1], np.int64), p, lambda p=p: _x(p))
    h.rewound(5)
    for ahead in (6, 9):
        with pytest.raises(OutOfRange, match=r"outside the rewind window \[0, 5\]"):
            h.plan(ahead)
    x, rows = h.plan(5)
    np.testing.assert_array_equal(x, _x(4))
    assert rows.tolist() == [4]


def test_a_rewind_that_lands_after_release_is_ignored():
    """A replayed rewind the worker reports after the session closed (its history released)
    changes nothing and raises nothing: the budget stays at 0 and the history stays empty."""
    budget = CheckpointBudget()
    h = History(window=16, chunk=4, position=0, state=_x(0), budget=budget)
    h.record(np.arange(6, dtype=np.int64), 6, {4: _x(4), 6: _x(6)})
    h.release()
    h.rewound(2)
    assert budget.used == 0 and h.nbytes == 0 and h.released


def test_without_chunk_states_a_session_holds_at_most_the_bytes_the_limits_say(make_toy, tmp_path):
    """An older export's prefill leaves a state only where each call ends (here 48 inputs
    apart), so a session keeps the inputs since a checkpoint that far back:
    checkpoint_bytes_per_session (GetModelInfo) still bounds what it holds."""
    toy = make_toy(tmp_path / "old", chunk_states=False)
    manifest = toy["model_dir"] / "manifest.json"
    m = json.loads(manifest.read_text())
    m["graphs"]["prefill"]["max_len"] = 48  # one call for a whole request
    manifest.write_text(json.dumps(m))
    engine = Engine(toy["model_dir"], device="cpu", threads=1)

    async def main():
        svc = await started(engine, rewind_window=8, max_tokens_per_request=48)
        s, _ = await svc.create("p")
        await svc.step("p", s.id, np.arange(48) % V)  # states at 0 and 48 only
        assert [c for c, _ in s.history._checkpoints] == [0, 48]
        assert s.history.nbytes == 2 * 4 * S + 48 * 8
        assert s.history.nbytes <= svc.checkpoint_bytes_per_session()
        await svc.rewind("p", s.id, 40)  # the window's start: 40 inputs replayed from 0
        np.testing.assert_allclose(
            svc.store.read(s), fresh_state(engine, np.arange(40) % V), atol=1e-5
        )
        await svc.batcher.close()

    run(main())
