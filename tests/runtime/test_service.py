"""SessionService without gRPC: every check in one place (each names its field and changes
nothing), the session operations for a principal, attachments bound to an incarnation, and
the one generation loop — compared with Engine.prefill / Engine.step on the same toy model."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from async_helpers import run, started_service
from faults import inject
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import (
    EngineFailure,
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from ssmstream.runtime.service import FETCHES_PER_PRINCIPAL, ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import MAX_POSITION

LIMITS = ServiceLimits(max_tokens_per_request=8, max_new_tokens=100, max_ttl=60.0)


async def started(engine, limits: ServiceLimits = LIMITS) -> SessionService:
    return await started_service(engine, limits)


@pytest.mark.parametrize(
    "tokens, values, exc, field",
    [
        ([], [], InvalidInput, "tokens"),
        ([1, 11], [], InvalidInput, "tokens"),
        ([-1], [], InvalidInput, "tokens"),
        ([2**63 - 1], [], InvalidInput, "tokens"),
        ([1], [1.0], InvalidInput, "values"),
        (list(range(9)), [], LimitExceeded, "tokens"),
    ],
)
def test_bad_token_inputs_name_the_field(toy_tok, tokens, values, exc, field):
    svc = SessionService(toy_tok, SessionStore(toy_tok.state_size), None, LIMITS)
    with pytest.raises(exc) as e:
        svc.inputs(np.array(tokens, dtype=np.int64), np.array(values, dtype=np.float32))
    assert str(e.value).startswith(f"{field}: "), e.value


@pytest.mark.parametrize(
    "tokens, values, exc",
    [
        ([], [1, 2], InvalidInput),
        ([], [1, 2, math.nan], InvalidInput),
        ([], [1, 2, math.inf], InvalidInput),
        ([1], [], InvalidInput),
        ([], [0.0] * 27, LimitExceeded),
    ],
)
def test_bad_value_inputs_are_refused(toy_sig, tokens, values, exc):
    svc = SessionService(toy_sig, SessionStore(toy_sig.state_size), None, LIMITS)
    with pytest.raises(exc):
        svc.inputs(np.array(tokens, dtype=np.int64), np.array(values, dtype=np.float32))


def test_good_inputs_come_back_as_the_model_takes_them(toy_tok, toy_sig):
    t = SessionService(toy_tok, SessionStore(toy_tok.state_size), None, LIMITS).inputs(
        [0, 10, 4], []
    )
    assert t.dtype == np.int64 and t.tolist() == [0, 10, 4]
    v = SessionService(toy_sig, SessionStore(toy_sig.state_size), None, LIMITS).inputs(
        [], [1, 2, 3, 4, 5, 6]
    )
    assert v.dtype == np.float32 and v.shape == (2, 3)
    np.testing.assert_array_equal(v, [[1, 2, 3], [4, 5, 6]])


def test_operations_for_a_principal_match_the_engine(toy_tok):
    """create / step / fork / snapshot / restore / close, each compared with Engine.prefill."""

    async def main():
        svc = await started(toy_tok)
        s, cached = await svc.create("alice", "a1", ttl=30.0)
        assert (s.id, s.position, s.ttl) == ("a1", 0, 30.0)
        y, pos = await svc.step("alice", "a1", [1, 2, 3])
        ref_y, ref_s = toy_tok.prefill(np.array([[1, 2, 3]]), toy_tok.new_state())
        np.testing.assert_allclose(y, ref_y[0], atol=1e-5)
        assert pos == 3
        child = await svc.fork("alice", "a1", "a2")
        data, position = await svc.snapshot("alice", "a1")
        copy = await svc.restore("alice", data)
        assert position == 3 and child.position == copy.position == 3
        want, _ = toy_tok.step(np.array([4]), ref_s)
        for sid in ("a1", "a2", copy.id):
            y, pos = await svc.step("alice", sid, [4])
            np.testing.assert_allclose(y[0], want[0], atol=1e-5)
            assert pos == 4
        with pytest.raises(SessionNotFound):
            await svc.step("bob", "a1", [1])  # another principal's session does not exist
        closed = await svc.close("alice", "a1")
        assert closed.position == 4
        with pytest.raises(SessionNotFound, match="closed"):
            await svc.step("alice", "a1", [1])
        await svc.batcher.close()

    run(main())


def test_bad_requests_change_nothing(toy_tok):
    async def main():
        svc = await started(toy_tok)
        await svc.create("alice", "a")
        await svc.step("alice", "a", [1, 2])
        before = svc.store.read(svc.store.get("a", "alice"))
        bad_calls = [
            (svc.step("alice", "a", [11]), InvalidInput),
            (svc.step("alice", "a", list(range(9))), LimitExceeded),
            (svc.step("alice", "a\n", [1]), InvalidInput),
            (svc.step("alice", "", [1]), InvalidInput),
            (svc.create("alice", "b", ttl=61.0), InvalidInput),
            (svc.create("alice", "b", ttl=math.nan), InvalidInput),
            (svc.create("alice", "a"), InvalidInput),  # in use
            (svc.fork("alice", "a", "q\n"), InvalidInput),
            (svc.restore("alice", b""), InvalidInput),
            (svc.restore("alice", b"garbage"), InvalidInput),
            (svc.restore("alice", np.zeros(90, np.uint8)), InvalidInput),  # not bytes
            (svc.create("alice", "b", snapshot=np.zeros(90, np.uint8)), InvalidInput),
            (svc.create("alice", "b", ttl=10**400), InvalidInput),  # was OverflowError
        ]
        for call, exc in bad_calls:
            with pytest.raises(exc):
                await call
        s = svc.store.get("a", "alice")
        assert s.position == 2 and len(svc.store) == 1
        np.testing.assert_array_equal(svc.store.read(s), before)
        await svc.batcher.close()

    run(main())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 101}, "max_new_tokens"),
        ({"top_k": 12}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"stop": [11]}, "stop"),
        ({"stop": [0] * 12}, "stop"),  # more stop tokens than the vocabulary has
        ({"prompt": []}, "prompt"),
        ({"prompt": [11]}, "prompt"),
    ],
)
def test_bad_generate_fields_name_the_field(toy_tok, kwargs, field):
    async def main():
        svc = await started(toy_tok)
        args = {"prompt": [1], "max_new_tokens": 5, **kwargs}
        with pytest.raises(InvalidInput) as e:
            async for _ in svc.generate("p", "", **args):
                pass
        assert str(e.value).startswith(f"{field}: "), e.value
        assert len(svc.store) == 0  # the temporary session was not made, or closed again
        await svc.batcher.close()

    run(main())


def test_generate_with_top_p_zero_samples_as_top_p_one(toy_tok):
    """The service takes top_p = 0 as off, as the wire and Engine.generate do (it was
    refused): the same seed draws the same tokens as top_p = 1."""

    async def main():
        svc = await started(toy_tok)
        got = {}
        for top_p in (0.0, 1.0):
            args = dict(max_new_tokens=12, temperature=1.0, top_p=top_p, seed=9)
            got[top_p] = [g.token async for _, g in svc.generate("p", "", [3, 1], **args)]
        await svc.batcher.close()
        return got

    got = run(main())
    in_process = toy_tok.generate([3, 1], max_new_tokens=12, temperature=1.0, seed=9)
    assert got[0.0] == got[1.0] == list(in_process)
    assert len(set(got[0.0])) > 1


def test_generate_is_the_engines_generation_and_feeds_all_but_the_last(toy_tok):
    """Greedy tokens equal Engine.generate's; the session holds the prompt and every token
    but the last; a stop token ends the loop and is returned."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "g")
        got = [
            g async for _, g in svc.generate("p", "g", [3, 1], max_new_tokens=6, temperature=0.0)
        ]
        want = list(toy_tok.generate([3, 1], max_new_tokens=6, temperature=0.0))
        assert [g.token for g in got] == want
        assert [g.index for g in got] == list(range(6)) and got[-1].finish == "max_tokens"
        assert [g.position for g in got] == list(range(2, 8))
        assert svc.store.get("g", "p").position == 2 + 5
        stop = want[2]
        cut = [g async for _, g in svc.generate("p", "", [3, 1], 6, 0.0, stop=[stop])]
        assert [g.token for g in cut] == want[: want.index(stop) + 1]
        assert cut[-1].finish == "stop_token" and len(svc.store) == 1  # temporary closed
        await svc.batcher.close()

    run(main())


async def _generating(engine, window: int):
    """A service (steps in the worker, as with other sessions active: a lone stream's inline
    step cannot be cut) whose Generate on session "g" (prompt [3, 1]) has sent 3 tokens:
    (service, the generator, the tokens sent)."""
    store = SessionStore(engine.state_size, capacity=4)
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0, inline=False)
    await batcher.start()
    limits = ServiceLimits(max_new_tokens=100, rewind_window=window)
    svc = SessionService(engine, store, batcher, limits)
    await svc.create("p", "g")
    gen = svc.generate("p", "g", [3, 1], max_new_tokens=6, temperature=0.0)
    return svc, gen, [(await gen.__anext__())[1] for _ in range(3)]


async def _cut_while_feeding(engine, gen, cancels: int = 1) -> None:
    """Cancel the generator's next step while it feeds the last token sent, that step running
    (held at a gate), `cancels` times (the later ones while the cut's rewind waits for it)."""
    gate = threading.Event()
    with inject(engine, gate=gate) as fake:
        nxt = asyncio.ensure_future(gen.__anext__())
        while not fake.calls:
            await asyncio.sleep(0.001)
        for _ in range(cancels):
            nxt.cancel()
            await asyncio.sleep(0.01)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await nxt


@pytest.mark.parametrize("window", [64, 0])
def test_a_generate_cut_while_it_feeds_a_sent_token_leaves_that_token_unfed(toy_tok, window):
    """A cancel (a client's, or grpc's at the end of a drain's grace) landing while Generate
    feeds the token it has just sent, with that step already running: the session goes back
    to that token's position, as a generation that ends leaves it (the last token sent is
    the next prompt's first). Without a rewind window it keeps the token."""

    async def main():
        svc, gen, sent = await _generating(toy_tok, window)
        await _cut_while_feeding(toy_tok, gen)
        s = svc.store.get("g", "p")
        await svc.batcher.close()
        return sent, s.position, svc.store.read(s)

    sent, position, state = run(main())
    fed = [3, 1, *[g.token for g in sent]]
    assert sent[-1].position == 4
    assert position == (4 if window else 5)
    want = toy_tok.prefill(np.array([fed[:position]]), toy_tok.new_state())[1][0]
    np.testing.assert_allclose(state, want, atol=1e-6)


def test_a_second_cancel_during_the_cuts_rewind_still_lets_go_of_the_session(toy_tok):
    """A cancel that lands while the cut's rewind waits (a client's cancel, then grpc's at the
    end of the grace): the Generate still detaches, so the session can be closed."""

    async def main():
        svc, gen, _ = await _generating(toy_tok, 64)
        await _cut_while_feeding(toy_tok, gen, cancels=2)
        attached = svc.attached
        closed = await svc.close("p", "g")
        await svc.batcher.close()
        return attached, closed.id

    assert run(main()) == (0, "g")


def test_a_failed_feed_is_no_cut_and_queues_no_rewind(toy_tok):
    """An error of the step that feeds a sent token (onnxruntime failed: nothing applied;
    or a state gone NaN, which the client is told) leaves the session as the error says:
    only a cancel takes the token back. A rewind to where a session is replays nothing."""

    async def main():
        svc, gen, sent = await _generating(toy_tok, 64)
        with inject(toy_tok, fail=1), pytest.raises(EngineFailure):
            await gen.__anext__()
        s = svc.store.get("g", "p")
        rewinds, position = svc.batcher.stats.rewinds, s.position
        with inject(toy_tok, "prefill") as replays:
            await svc.rewind("p", "g", position)
        await svc.batcher.close()
        return sent, rewinds, position, replays.calls

    sent, rewinds, position, replays = run(main())
    assert (rewinds, position, replays) == (0, sent[-1].position, [])


def test_generate_needs_a_token_model(toy_sig):
    async def main():
        svc = await started(toy_sig)
        with pytest.raises(ModelError, match="token model"):
            async for _ in svc.generate("p", "", [1], 3):
                pass
        await svc.batcher.close()

    run(main())


def test_an_attachment_excludes_others_and_is_bound_to_its_incarnation(toy_tok):
    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "s")
        a = svc.attach("p")
        await a.step("s", [1])
        with pytest.raises(SessionBusy, match="attached to an open Stream"):
            await svc.step("p", "s", [2])
        b = svc.attach("p")
        with pytest.raises(SessionBusy):
            await b.step("s", [2])
        b.detach()
        await svc.close("p", "s")
        again, _ = await svc.create("p", "s")  # the id's new owner is not blocked
        assert (await svc.step("p", "s", [5]))[1] == 1
        with pytest.raises(SessionNotFound, match="closed"):
            await a.step("", [3])
        assert svc.store.get("s", "p") is again and again.position == 1
        a.detach()
        assert svc.attached == 0 and svc.open_streams == 0
        await svc.batcher.close()

    run(main())


def test_an_attachment_that_creates_its_session_undoes_it_when_the_first_step_fails(
    toy_tok,
):
    async def main():
        svc = await started(toy_tok)
        a = svc.attach("p")
        with pytest.raises(InvalidInput):
            await a.step("", [11])  # refused before anything is created
        assert len(svc.store) == 0
        await svc.batcher.close()
        with pytest.raises(Unavailable):
            await a.step("", [1])  # the batcher is closed: created, then undone
        assert len(svc.store) == 0
        a.detach()

    run(main())


def test_requests_queued_together_never_pass_the_largest_position(toy_tok):
    """Each request passes the position check when it arrives; the ones queued behind it
    are checked again when they run: refused (OUT_OF_RANGE), unapplied, and the session
    stays a valid one (its snapshot restores)."""

    async def main():
        svc = await started(toy_tok)
        zero = np.zeros(toy_tok.state_size, np.float32)
        s = await svc.restore("p", svc.store.pack_state(zero, MAX_POSITION - 2))
        got = await asyncio.gather(
            svc.step("p", s.id, [1]),  # to MAX - 1
            svc.step("p", s.id, [2, 3]),  # a prefill: would end at MAX + 1
            svc.step("p", s.id, [4]),  # to MAX
            svc.step("p", s.id, [5]),  # would end at MAX + 1
            return_exceptions=True,
        )
        state = svc.store.read(s)
        data, position = await svc.snapshot("p", s.id)
        restored = await svc.restore("p", data)
        await svc.batcher.close()
        return got, s.position, state, position, restored.position

    got, position, state, snap_position, restored = run(main())
    assert [g[1] for g in (got[0], got[2])] == [MAX_POSITION - 1, MAX_POSITION]
    for e in (got[1], got[3]):
        assert isinstance(e, OutOfRange) and str(e).startswith("inputs: "), e
    assert position == snap_position == restored == MAX_POSITION
    _, want = toy_tok.step(np.array([1]), toy_tok.new_state())  # only [1] and [4] applied
    _, want = toy_tok.step(np.array([4]), want)
    np.testing.assert_allclose(state, want[0], atol=1e-6)


def test_a_failed_or_finished_request_never_closes_a_newer_session_with_its_id(toy_tok):
    """A session id closed and taken by a new session while the request that created the
    first one was still running: that request's clean-up closes only its own incarnation."""

    async def main():
        svc = await started(toy_tok)
        # CreateSession with a prompt, closed and re-created under it while prefilling
        first = asyncio.ensure_future(svc.create("p", session_id="x", prompt=list(range(8))))
        await asyncio.sleep(0)  # "x" exists; its prompt is with the batcher
        await svc.close("p", "x")
        second, _ = await svc.create("p", session_id="x")
        with pytest.raises(SessionNotFound):
            await first
        case1 = second.live and svc.store.get("x", "p") is second
        # a temporary Generate whose id is closed and taken after its first token
        gen = svc.generate("p", "", [1, 2, 3], 50, 0.0)
        sid, _ = await gen.__anext__()
        await svc.close("p", sid)
        mine, _ = await svc.create("p", session_id=sid)
        with pytest.raises(SessionNotFound):
            await gen.__anext__()
        await gen.aclose()
        case2 = mine.live and svc.store.get(sid, "p") is mine
        await svc.batcher.close()
        return case1, case2

    assert run(main()) == (True, True)


def test_a_kept_generate_session_whose_id_never_got_out_is_undone(toy_tok):
    """Generate with keep_session and no session_id: when it fails or is cancelled before
    its first token (which carries the new id), the session it made is closed; once that
    token is out, the session stays."""

    async def main():
        svc = await started(toy_tok)
        gen = svc.generate("p", "", [1, 2, 3, 4, 5, 6], 4, 0.0, keep_session=True)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # its prompt is with the batcher
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        after_cancel = len(svc.store)
        with inject(toy_tok, "prefill", fail=1), pytest.raises(EngineFailure):
            async for _ in svc.generate("p", "", list(range(8)), 4, 0.0, keep_session=True):
                pass
        after_failure = len(svc.store)
        kept = [g async for g in svc.generate("p", "", [1, 2, 3], 4, 0.0, keep_session=True)]
        sid = kept[0][0]
        await svc.batcher.close()
        return after_cancel, after_failure, [s.id for s in svc.store.sessions("p")], sid

    after_cancel, after_failure, live, sid = run(main())
    assert (after_cancel, after_failure) == (0, 0)
    assert live == [sid]


def test_an_attachment_whose_session_was_evicted_is_told_evicted(toy_tok):
    async def main():
        now = [0.0]
        store = SessionStore(toy_tok.state_size, capacity=4, ttl=10.0, clock=lambda: now[0])
        batcher = Batcher(toy_tok, store, max_batch=4, max_batch_delay=0.0)
        await batcher.start()
        svc = SessionService(toy_tok, store, batcher, LIMITS)
        a = svc.attach("p")
        await a.step("", [1])
        sid = a.session.id
        now[0] += 100.0  # idle past its TTL
        store.evict_idle()
        errors = []
        for call in (a.step("", [2]), svc.step("p", sid, [2])):
            with pytest.raises(SessionNotFound) as e:
                await call
            errors.append(e.value.reason)
        a.detach()
        await batcher.close()
        return errors

    assert run(main()) == ["evicted", "evicted"]


def test_fetches_are_shared_per_session_and_no_principal_holds_every_fetch_thread(toy_tok):
    """With a shared store, sessions not held here are fetched (a fetch may wait up to the
    lease time): ten requests for one session make one fetch, and one principal's many
    fetches take at most FETCHES_PER_PRINCIPAL threads, so another principal's fetch starts
    at once instead of queueing behind them."""

    async def main():
        svc = await started(toy_tok)
        store = svc.store
        mine = [store.create("mallory").id for _ in range(8)]
        theirs = store.create("alice").id
        lock, calls, running, done = threading.Lock(), [], {"mallory": 0, "alice": 0}, []
        peak, seen_done, alice_in = {"mallory": 0}, [], threading.Event()

        def fetch(sid, principal):  # as a replicated store's: blocks while it waits
            with lock:
                calls.append(sid)
                running[principal] += 1
                peak["mallory"] = max(peak["mallory"], running["mallory"])
                if principal == "alice":
                    seen_done.append(len(done))
                    alice_in.set()
            # mallory's fetches wait until alice's has started (not a fixed time, which a
            # loaded machine can outlast): queued behind them, hers would start only after
            # they time out
            alice_in.wait(10)
            with lock:
                running[principal] -= 1
                if principal == "mallory":
                    done.append(sid)

        store.held, store.fetch = (lambda sid, principal=None: False), fetch
        svc._fetch_pool = ThreadPoolExecutor(16)  # what a replicated store's service has
        burst = [svc._session(mine[0], "mallory") for _ in range(10)]
        burst += [svc._session(sid, "mallory") for sid in mine[1:]]
        tasks = [asyncio.ensure_future(c) for c in burst]
        await asyncio.sleep(0.01)
        got = await svc._session(theirs, "alice")
        sessions = await asyncio.gather(*tasks)
        await svc.batcher.close()
        return calls, peak["mallory"], seen_done, got, sessions

    calls, peak, seen_done, got, sessions = run(main())
    assert calls.count(calls[0]) == 1 and len(calls) == 8 + 1  # one fetch per session
    assert peak <= FETCHES_PER_PRINCIPAL
    assert seen_done == [0]  # alice's fetch ran before any of mallory's had finished
    assert got.principal == "alice" and {s.principal for s in sessions} == {"mallory"}


def test_shutdown_ends_the_fetch_pools_threads(toy_tok):
    """A stopped server leaves no fetch thread behind: shutdown() ends the idle ones and
    cancels fetches not yet started."""
    gate, fetching = threading.Event(), threading.Event()

    def fetch(sid, principal):  # a replicated store's fetch, blocked in its lease wait
        fetching.set()
        gate.wait(10)

    async def main():
        svc = await started(toy_tok)
        store = svc.store
        a, b = store.create("p").id, store.create("p").id
        store.held = lambda sid, principal=None: False
        store.fetch = fetch
        svc._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="ssmstream-fetch")
        first = asyncio.ensure_future(svc._session(a, "p"))  # runs, waiting on the gate
        queued = asyncio.ensure_future(svc._session(b, "p"))  # waits for the one thread
        # the pool's thread has taken the first fetch (both were handed to the pool in the
        # loop's first passes, before this wait can end); a fixed sleep could end first
        deadline = time.monotonic() + 30
        while not fetching.is_set():
            assert time.monotonic() < deadline, "the first fetch never started"
            await asyncio.sleep(0.005)
        svc.shutdown()
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await queued
        await svc.batcher.close()

    run(main())
    deadline = time.monotonic() + 20  # it exits within ms; left running, it never would
    while any(t.name.startswith("ssmstream-fetch") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a fetch thread outlived shutdown()"
        time.sleep(0.01)


def test_draining_refuses_new_work_and_ends_idle_attachments(toy_tok):
    async def main():
        svc = await started(toy_tok)
        ended = []
        idle = svc.attach("p", on_drain=lambda: ended.append("idle"))
        writing = svc.attach("p", on_drain=lambda: ended.append("writing"))
        await idle.step("", [1])
        idle.delivered()  # its response is out: it waits for the next request
        await writing.step("", [1])  # its response is being written: a drain lets it finish
        svc.drain()
        assert ended == ["idle"] and idle.drained and not writing.drained
        writing.delivered()
        assert writing.idle
        with pytest.raises(Unavailable, match="shutting down"):
            await svc.create("p")
        with pytest.raises(Unavailable):
            await svc.step("p", idle.session.id, [1])
        idle.detach()
        writing.detach()
        await svc.batcher.close()

    run(main())


def test_a_ttl_equal_to_the_server_limit_is_accepted(toy_tok):
    """ttl is in (0, --session-ttl], the bound included."""

    async def main():
        svc = await started(toy_tok)
        s, _ = await svc.create("p", "a", ttl=60.0)
        assert s.ttl == 60.0
        with pytest.raises(InvalidInput) as e:
            await svc.create("p", "b", ttl=60.5)
        assert str(e.value) == "ttl: must be finite, in (0, 60] seconds (0: default), got 60.5"
        await svc.batcher.close()

    run(main())


def test_fork_is_refused_while_draining_and_creates_nothing(toy_tok):
    """After drain() new work is refused (Unavailable), a fork (which
    creates a session) included, as create / step / rewind are."""
    from ssmstream.runtime.errors import Unavailable

    async def main():
        svc = await started(toy_tok)
        s, _ = await svc.create("p", "a")
        await svc.step("p", "a", tokens=[1, 2])
        svc.drain()
        with pytest.raises(Unavailable) as e:
            await svc.fork("p", "a", "b")
        # without --state-dir the parent ends with the server: no restarted server to go to
        assert str(e.value) == "server is shutting down; its sessions end with it"
        assert len(svc.store) == 1 and svc.store.local("b") is None
        await svc.batcher.close()

    run(main())


def test_a_prompt_create_that_fails_leaves_no_session(toy_tok):
    """The client never got the id of a session whose prompt
    failed: it is closed again (its id free, nothing counted as live)."""
    from ssmstream.runtime.errors import SessionNotFound, Unavailable

    async def main():
        svc = await started(toy_tok)
        await svc.batcher.close()  # the prompt's prefill will fail: Unavailable
        with pytest.raises(Unavailable):
            await svc.create("p", "a", prompt=[1, 2, 3])
        assert len(svc.store) == 0
        with pytest.raises(SessionNotFound) as e:
            svc.store.get("a", "p")
        assert e.value.reason == "closed"

    run(main())


def test_cached_prefix_outputs_are_the_output_of_the_prefix_last_input(toy_tok):
    """The cache entry for u[0:end] keeps the output of input
    end-1 (what a Generate from that prompt samples its first token from)."""
    limits = ServiceLimits(max_tokens_per_request=64, max_new_tokens=8, prefix_cache_bytes=1 << 20)

    async def main():
        svc = await started(toy_tok, limits)
        assert svc.chunk == 4
        prompt = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5], np.int64)
        await svc.create("p", "a", prompt=prompt)
        outputs, _ = toy_tok.prefill(prompt[None], toy_tok.new_state())  # [1, T, D]
        for end in (4, 8, 9):
            hit = svc.prefix_cache.lookup(svc._scope("p"), prompt[:end])
            assert hit.tokens == end
            np.testing.assert_allclose(hit.output, outputs[0, end - 1], rtol=1e-5, atol=1e-6)
        # a Generate served wholly from the cache samples from that output
        logits = outputs[0, 3].astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        first = [g async for _, g in svc.generate("p", "", list(prompt[:4]), 1, 0.0)][0]
        assert first.token == int(np.argmax(logits)) and first.position == 4
        assert first.logprob == pytest.approx(logp[first.token], rel=1e-4, abs=1e-5)
        await svc.batcher.close()

    run(main())


def test_a_prefix_cache_smaller_than_one_entry_caches_nothing_and_serves_every_prompt(toy_tok):
    """--prefix-cache-mb below one entry's bytes: an insert that keeps nothing for a new
    scope had raised KeyError (INTERNAL for every CreateSession with a prompt and every
    Generate on a new session); the prompts are served by prefill, and nothing is cached."""
    limits = ServiceLimits(max_tokens_per_request=64, max_new_tokens=8, prefix_cache_bytes=64)

    async def main():
        svc = await started(toy_tok, limits)
        prompt = np.array([3, 1, 4, 1, 5, 9], np.int64)
        s, cached = await svc.create("p", "a", prompt=prompt)
        assert (s.position, cached) == (6, 0)
        outputs, state = toy_tok.prefill(prompt[None], toy_tok.new_state())  # [1, T, D]
        np.testing.assert_allclose(svc.store.read(s), state[0], rtol=1e-5, atol=1e-6)
        first = [g async for _, g in svc.generate("p", "", list(prompt), 1, 0.0)][0]
        assert first.token == int(np.argmax(outputs[0, -1])) and first.position == 6
        assert svc.prefix_cache.stats() == {
            "hits": 0, "misses": 2, "cached_tokens": 0, "evictions": 0, "bytes": 0, "entries": 0
        }  # fmt: skip
        assert len(svc.store) == 1  # the Generate's temporary session closed
        await svc.batcher.close()

    run(main())


async def _attached_stream(svc, sid="a"):
    """A Stream attached to session `sid` (created here), after one step."""
    svc.store.create("p", sid)
    a = svc.attach("p")
    _, pos = await a.step(sid, tokens=[1])
    assert pos == 1 and a.session.id == sid
    return a


def test_a_stream_whose_session_moved_away_and_was_replaced_by_another_incarnation_is_not_found(
    toy_tok,
):
    """The replica lost the session ("moved"), and what
    it loads back under the id is another incarnation (closed and created again elsewhere):
    the Stream is NOT_FOUND "closed", never rebound to the other session."""
    from ssmstream.runtime.errors import SessionNotFound

    async def main():
        svc = await started(toy_tok)
        a = await _attached_stream(svc)
        old = a.session
        svc.store.drop(old, "moved")  # what the replication does when another replica takes it
        new = svc.store.install(
            "a", "p", 60.0, 7, np.zeros(toy_tok.state_size, np.float32), "other"
        )
        with pytest.raises(SessionNotFound) as e:
            await a.step("", tokens=[2])
        assert (e.value.session_id, e.value.reason) == ("a", "closed")
        assert new.position == 7 and a.session is old
        a.detach()
        await svc.batcher.close()

    run(main())


def test_a_stream_whose_moved_session_is_gone_everywhere_is_told_closed(toy_tok):
    """The attached session moved away and no longer
    exists: the store says "unknown" (it forgets a moved id), the Stream, which held it, says
    "closed"."""
    from ssmstream.runtime.errors import SessionNotFound

    async def main():
        svc = await started(toy_tok)
        a = await _attached_stream(svc)
        svc.store.drop(a.session, "moved")
        with pytest.raises(SessionNotFound) as e:
            svc.store.get("a", "p")
        assert e.value.reason == "unknown"
        with pytest.raises(SessionNotFound) as e:
            await a.step("", tokens=[2])
        assert (e.value.session_id, e.value.reason) == ("a", "closed")
        a.detach()
        await svc.batcher.close()

    run(main())


def test_rewind_refuses_a_bool_position_and_changes_nothing(toy_tok):
    """True is not a position (it would rewind to 1)."""
    limits = ServiceLimits(max_tokens_per_request=8, rewind_window=16)

    async def main():
        svc = await started(toy_tok, limits)
        await svc.create("p", "a")
        _, pos = await svc.step("p", "a", tokens=[1, 2, 3])
        assert pos == 3
        with pytest.raises(InvalidInput) as e:
            await svc.rewind("p", "a", True)
        assert str(e.value) == "position: must be an integer >= 0, got True"
        assert svc.store.get("a", "p").position == 3
        assert (await svc.rewind("p", "a", 1)).position == 1  # an int is fine
        await svc.batcher.close()

    run(main())


def test_an_infinite_ttl_is_refused_even_without_a_server_limit(toy_tok):
    """ttl must be finite; with --session-ttl unlimited
    (max_ttl = inf) a client must still not make a session that never expires."""
    import math

    async def main():
        svc = await started(toy_tok, ServiceLimits(max_ttl=math.inf))
        for bad in (math.inf, math.nan, -1.0, 10**400):  # 10**400: beyond float range
            with pytest.raises(InvalidInput) as e:
                await svc.create("p", "a", ttl=bad)
            assert e.value.field == "ttl"
        assert len(svc.store) == 0
        s, _ = await svc.create("p", "a", ttl=1e9)
        assert s.ttl == 1e9
        await svc.batcher.close()

    run(main())


def test_an_empty_session_id_is_required_not_malformed(toy_tok):
    """A missing session_id says "is required" (not the id-format message), for
    step, close, snapshot, fork and rewind alike."""

    async def main():
        svc = await started(toy_tok)
        calls = [
            lambda: svc.step("p", "", tokens=[1]),
            lambda: svc.close("p", ""),
            lambda: svc.snapshot("p", ""),
            lambda: svc.fork("p", ""),
            lambda: svc.rewind("p", "", 0),
        ]
        for c in calls:
            with pytest.raises(InvalidInput) as e:
                await c()
            assert e.value.field == "session_id"
            assert str(e.value) == "session_id: is required"
        await svc.batcher.close()

    run(main())


def test_a_prompt_cannot_be_combined_with_a_snapshot(toy_tok):
    """Prompt + snapshot is refused (field prompt) and creates nothing; the
    mutant silently restored the snapshot and dropped the prompt."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        await svc.step("p", "a", tokens=[1, 2])
        data, pos = await svc.snapshot("p", "a")
        assert pos == 2
        with pytest.raises(InvalidInput) as e:
            await svc.create("p", "b", snapshot=data, prompt=[3, 4])
        assert e.value.field == "prompt"
        assert str(e.value) == "prompt: cannot be combined with a snapshot"
        assert len(svc.store) == 1
        with pytest.raises(SessionNotFound) as e2:
            svc.store.get("b", "p")
        assert e2.value.reason == "unknown"
        await svc.batcher.close()

    run(main())


def test_a_prompt_on_a_value_model_names_the_prompt_field(toy_sig):
    """A prompt needs a token model; on a value model the error names the
    prompt (not `tokens`, a field the request did not send) and creates nothing."""

    async def main():
        svc = await started(toy_sig)
        with pytest.raises(InvalidInput) as e:
            await svc.create("p", "a", prompt=[1, 2])
        assert e.value.field == "prompt"
        assert str(e.value) == "prompt: needs a token model; this model takes values"
        assert len(svc.store) == 0
        await svc.batcher.close()

    run(main())


def test_an_attached_stream_refuses_steps_naming_another_session(toy_tok):
    """Once attached, a step naming another session id is refused
    (and steps nothing); the attached session stays where it was."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        await svc.create("p", "b")
        a = svc.attach("p")
        _, pos = await a.step("a", tokens=[1, 2])
        a.delivered()
        assert pos == 2
        with pytest.raises(InvalidInput) as e:
            await a.step("b", tokens=[3])
        assert e.value.field == "session_id"
        assert str(e.value) == "session_id: this stream is attached to 'a'; open another"
        assert svc.store.get("a", "p").position == 2 and svc.store.get("b", "p").position == 0
        assert a.idle
        _, pos = await a.step("a", tokens=[3])  # its own id (or none) still works
        assert pos == 3
        a.detach()
        await svc.batcher.close()

    run(main())


def test_a_stream_created_session_whose_response_was_handed_out_stays_after_detach(toy_tok):
    """Once the first step's response (with the new id) is handed to the transport, the
    session the stream created is the client's: detach leaves it open, also when the
    write is never reported done (a cancel as it ends may come after the client read it)."""

    async def main():
        svc = await started(toy_tok)
        a = svc.attach("p")
        await a.step("", tokens=[1, 2, 3])
        sid = a.session.id
        assert a.handed_out() is a.session and a.handed_out() is None  # once
        a.detach()
        s = svc.store.get(sid, "p")
        assert s.live and s.position == 3 and len(svc.store) == 1
        # not delivered: undone at detach
        b = svc.attach("p")
        await b.step("", tokens=[1])
        bid = b.session.id
        b.detach()
        with pytest.raises(SessionNotFound) as e:
            svc.store.get(bid, "p")
        assert e.value.reason == "closed"
        await svc.batcher.close()

    run(main())


def test_too_many_inputs_name_the_field_they_came_in(toy_tok, toy_sig):
    """The LimitExceeded for T > max_tokens_per_request names the request's
    field (prompt / values), not always `tokens`."""

    async def main():
        from ssmstream.runtime.errors import LimitExceeded

        svc = await started(toy_tok)
        with pytest.raises(LimitExceeded) as e:
            await svc.create("p", "a", prompt=list(range(1, 10)))
        assert str(e.value) == "prompt: 9 inputs in one request exceed max_tokens_per_request=8"
        assert len(svc.store) == 0
        await svc.batcher.close()
        sig = await started(toy_sig)
        I = toy_sig.d_input
        with pytest.raises(LimitExceeded) as e:
            sig.inputs((), np.zeros(9 * I, np.float32))
        assert str(e.value) == "values: 9 inputs in one request exceed max_tokens_per_request=8"
        await sig.batcher.close()

    run(main())


def test_an_idle_stream_step_after_drain_is_refused_and_steps_nothing(toy_tok):
    """After drain() a Stream's next request is new work: Unavailable,
    its session not stepped."""
    from ssmstream.runtime.errors import Unavailable

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        a = svc.attach("p")
        await a.step("a", tokens=[1, 2])
        a.delivered()
        svc.drain()
        with pytest.raises(Unavailable) as e:
            await a.step("a", tokens=[3])
        assert str(e.value) == "server is shutting down; its sessions end with it"
        assert svc.store.get("a", "p").position == 2
        a.detach()
        await svc.batcher.close()

    run(main())


def test_a_second_detach_does_not_release_another_streams_hold(toy_tok):
    """Detach removes only this attachment's hold; a repeated detach
    after another Stream attached to the same incarnation leaves that Stream's hold."""
    from ssmstream.runtime.errors import SessionBusy

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        first = svc.attach("p")
        await first.step("a", tokens=[1])
        first.delivered()
        first.detach()
        second = svc.attach("p")
        await second.step("a", tokens=[2])
        second.delivered()
        first.detach()  # again (a handler's finally after an explicit detach)
        assert svc.attached == 1
        with pytest.raises(SessionBusy) as e:
            await svc.step("p", "a", tokens=[3])
        assert str(e.value) == "session 'a' is attached to an open Stream"
        assert svc.store.get("a", "p").position == 2
        second.detach()
        assert svc.attached == 0
        await svc.batcher.close()

    run(main())


def test_a_stream_whose_step_failed_is_idle_and_ended_by_a_drain(toy_tok):
    """A failed step leaves the Stream idle (waiting for the client),
    so a drain tells it to end."""
    ended = []

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        a = svc.attach("p", on_drain=lambda: ended.append(1))
        await a.step("a", tokens=[1])
        a.delivered()
        with pytest.raises(InvalidInput):
            await a.step("b", tokens=[2])  # another session's id: refused
        assert a.idle
        svc.store.close("a", "p")
        with pytest.raises(SessionNotFound) as e:
            await a.step("", tokens=[2])
        assert e.value.reason == "closed"
        assert a.idle
        svc.drain()
        assert ended == [1] and a.drained
        a.detach()
        await svc.batcher.close()

    run(main())


def test_an_empty_token_list_says_it_needs_a_token(toy_tok):
    """No tokens is refused with this message, naming the request's field."""
    svc = SessionService(toy_tok, SessionStore(toy_tok.state_size), None, LIMITS)
    for field, expected in (("", "tokens"), ("prompt", "prompt")):
        with pytest.raises(InvalidInput) as e:
            svc.inputs(np.array([], np.int64), np.array([], np.float32), field=field)
        assert e.value.field == expected
        assert str(e.value) == f"{expected}: needs at least one token"


def test_step_reports_a_bad_session_id_before_bad_inputs(toy_tok):
    """The request's fields are checked in order: session_id, then the inputs."""

    async def main():
        svc = await started(toy_tok)
        with pytest.raises(InvalidInput) as e:
            await svc.step("p", "-bad", tokens=[])
        assert e.value.field == "session_id"
        with pytest.raises(InvalidInput) as e:
            await svc.step("p", "", tokens=[99])
        assert str(e.value) == "session_id: is required"
        await svc.batcher.close()

    run(main())


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

    assert run(main()) == ("server is shutting down; its sessions end with it", 3)


@pytest.mark.parametrize("says", ["memory", "state_dir"])
def test_while_draining_a_session_s_call_hears_where_it_lives_on_a_new_one_where_to_go(
    toy_tok, says
):
    """A call on a session is told what becomes of that session (nothing survives without
    --state-dir: no "retry on the restarted server" for it); a new session, be it created,
    a temporary Generate's or a Stream's first, is told to retry on the restarted server."""
    from ssmstream.runtime.service import DRAINING

    async def main():
        svc = await started(toy_tok, REWIND)
        svc.draining_says = DRAINING[says]  # as the server sets it with --state-dir
        await svc.create("p", "a")
        svc.drain()
        said = {}
        calls = {
            "step": lambda: svc.step("p", "a", tokens=[1]),
            "rewind": lambda: svc.rewind("p", "a", 0),
            "fork": lambda: svc.fork("p", "a", "b"),
            "generate a": lambda: anext(svc.generate("p", "a", [1], 2)),
            "stream a": lambda: svc.attach("p").step("a", tokens=[1]),
            "create": lambda: svc.create("p", "c"),
            "generate": lambda: anext(svc.generate("p", "", [1], 2)),
            "stream": lambda: svc.attach("p").step("", tokens=[1]),
        }
        for name, call in calls.items():
            with pytest.raises(Unavailable) as e:
                await call()
            said[name] = str(e.value)
        assert svc.store.get("a", "p").position == 0 and len(svc.store) == 1
        await svc.batcher.close()
        return said

    said = run(main())
    new = "server is shutting down; retry on the restarted server"
    assert said == {
        **dict.fromkeys(["step", "rewind", "fork", "generate a", "stream a"], DRAINING[says]),
        **dict.fromkeys(["create", "generate", "stream"], new),
    }


def test_a_session_a_stream_created_can_rewind(toy_tok):
    """A session made by a Stream's first step has its rewind history like a created one:
    a later Rewind returns it to the state Engine.prefill gives for the inputs before."""

    async def main():
        svc = await started(toy_tok, REWIND)
        a = svc.attach("p")
        await a.step("", tokens=[7, 8, 9, 10])
        a.handed_out()
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
    assert bound == (2 * W // Q + 3) * 4 * S + (W + 3 * Q) * 4 * I  # 2 Q rows spare
    assert all(stats == own for stats, own in held)
    assert 0 < max(own for _, own in held) <= bound


@pytest.mark.parametrize("states", [1, 3])
def test_the_rewind_bound_counts_at_most_the_memory_limit_of_checkpoints(toy_sig, states):
    """Under --rewind-memory-mb below one session's checkpoints, checkpoint_bytes_per_session
    counts the limit (one state at least: a session keeps its newest checkpoint), and a
    session stepped through three windows holds no more than that."""
    W, Q, S, I = 32, 4, toy_sig.state_size, toy_sig.d_input
    limit = states * 4 * S + 1  # a few bytes past `states` checkpoints: room for exactly them
    limits = ServiceLimits(max_tokens_per_request=8, rewind_window=W, rewind_memory_bytes=limit)

    async def main():
        svc = await started(toy_sig, limits)
        bound = svc.checkpoint_bytes_per_session()
        s, _ = await svc.create("p", "a")
        rng = np.random.default_rng(0)
        held = []
        for _ in range(3 * W):
            await svc.step("p", "a", values=rng.standard_normal(I).astype(np.float32))
            held.append(s.history.nbytes)
        await svc.batcher.close()
        return bound, held

    bound, held = run(main())
    inputs = (W + 3 * Q) * 4 * I  # kept and spare rows
    assert bound == max(limit, 4 * S) + inputs < (2 * W // Q + 3) * 4 * S + inputs
    assert max(held) <= bound and max(held) > states * 4 * S  # the limit is reached, not passed


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


@pytest.mark.parametrize(
    "tokens, says",
    [
        ([1.7], "tokens: must be integer token ids, got dtype float64"),
        ([True], "tokens: must be integer token ids, got dtype bool"),
        (["5"], "tokens: must be integer token ids, got dtype <U1"),
        ([2**63], "tokens: token 9223372036854775808 is outside [0, vocab_size=11)"),
        ([[1, 2]], "tokens: must have shape [T] (non-empty), got (1, 2)"),
    ],
    ids=repr,
)
def test_in_process_tokens_are_checked_not_converted(toy_tok, tokens, says):
    """A Python list is checked as it is: floats are not truncated, bools and strings are not
    token ids, an int past int64 is out of range (as Engine.step says); nothing applies."""

    async def main():
        svc = await started(toy_tok)
        try:
            s, _ = await svc.create("p")
            with pytest.raises(InvalidInput) as e:
                await svc.step("p", s.id, tokens=tokens)
            assert str(e.value) == says
            with pytest.raises(InvalidInput) as e:
                await svc.create("p", prompt=tokens)
            # (the prompt's field is not the input kind's name: it is said, as Engine says it)
            prompt_says = says.replace("tokens: must have", "tokens: tokens must have")
            assert str(e.value) == prompt_says.replace("tokens: ", "prompt: ", 1)
            assert s.position == 0 and len(svc.store) == 1
        finally:
            await svc.batcher.close()

    run(main())


def test_a_scalar_token_is_one_input_and_ttl_none_is_the_default(toy_tok):
    async def main():
        svc = await started(toy_tok)
        try:
            s, _ = await svc.create("p", ttl=None)
            ref, _ = await svc.create("p", ttl=0)
            assert s.ttl == ref.ttl == svc.store.ttl
            out, position = await svc.step("p", s.id, tokens=np.int64(5))
            want, _ = await svc.step("p", ref.id, tokens=[5])
            assert position == 1 and np.array_equal(out, want)
            p, _ = await svc.create("p", prompt=5)
            assert p.position == 1
            assert np.array_equal(svc.store.read(p), svc.store.read(s))
            for bad in ("5", True, [1]):
                with pytest.raises(InvalidInput, match=r"^ttl: must be a number"):
                    await svc.create("p", ttl=bad)
        finally:
            await svc.batcher.close()

    run(main())


def test_values_rows_must_be_d_input_wide(toy_sig):
    """d_input = 3: a [3, 2] array is refused (not taken as two rows of 3); a [2, 3] array
    is the same two rows as their six floats in a row."""
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((2, 3)).astype(np.float32)

    async def main():
        svc = await started(toy_sig)
        try:
            s, _ = await svc.create("p")
            ref, _ = await svc.create("p")
            with pytest.raises(InvalidInput) as e:
                await svc.step("p", s.id, values=rows.reshape(3, 2))
            assert str(e.value) == "values: must have shape [T, d_input=3], got (3, 2)"
            assert s.position == 0
            out, _ = await svc.step("p", s.id, values=rows)
            want, _ = await svc.step("p", ref.id, values=rows.ravel().tolist())
            assert out.shape == (2, toy_sig.d_output) and np.array_equal(out, want)
        finally:
            await svc.batcher.close()

    run(main())


def test_a_history_made_for_a_session_closed_meanwhile_gives_its_bytes_back(toy_tok):
    """SessionStore is thread-safe: a session the service creates may be closed by another
    thread while the service makes its rewind History. That History had been attached
    after the close released nothing, its bytes held in the shared budget for good."""

    async def main():
        svc = await started(toy_tok, ServiceLimits(rewind_window=8, rewind_memory_bytes=1 << 20))
        try:
            real = svc.store.read

            def read_then_closed_elsewhere(s):
                state = real(s)
                svc.store.close(s.id, s.principal)  # another thread, right then
                return state

            svc.store.read = read_then_closed_elsewhere
            await svc.create("p", "a")
            assert svc.checkpoint_budget.used == 0
            del svc.store.read
            s, _ = await svc.create("p", "b")  # and a session that stays keeps its history
            assert s.history is not None and svc.checkpoint_budget.used > 0
            await svc.close("p", "b")
            assert svc.checkpoint_budget.used == 0
        finally:
            await svc.batcher.close()

    run(main())


def test_a_call_from_another_event_loop_is_refused_and_applies_nothing(toy_tok):
    """The service runs on the loop that started its batcher: any operation awaited on
    another thread's loop is refused before it applies anything; the session stays usable."""

    async def main():
        svc = await started(toy_tok, ServiceLimits(rewind_window=8))
        try:
            s, _ = await svc.create("p")
            await svc.step("p", s.id, tokens=[1, 2])
            errors = []

            calls = (
                lambda: svc.step("p", s.id, tokens=[1, 2, 3]),
                lambda: svc.rewind("p", s.id, 1),
                lambda: svc.close("p", s.id),
                lambda: svc.fork("p", s.id),
                lambda: svc.create("p"),
                lambda: svc.snapshot("p", s.id),
                lambda: svc.generate("p", s.id, [1], 2).__anext__(),
                lambda: svc.attach("p").step("", tokens=[1]),  # had made a session, then undone it
                lambda: svc.batcher.close(),  # had waited for ever, refusing everything since
            )

            def elsewhere():
                for call in calls:
                    try:
                        asyncio.run(asyncio.wait_for(call(), 10))
                    except RuntimeError as e:
                        errors.append(str(e))

            await asyncio.get_running_loop().run_in_executor(None, elsewhere)
            assert len(errors) == len(calls)
            assert all("runs on the event loop that started it" in e for e in errors)
            assert s.position == 2 and svc.batcher.pending() == 0 and len(svc.store) == 1
            assert svc.store.stats()["created"] == 1 and svc.batcher.running
            assert (await svc.step("p", s.id, tokens=[3]))[1] == 3
        finally:
            await svc.batcher.close()

    run(main())


def test_generate_on_an_existing_session_never_calls_handed_out(toy_tok):
    """`handed_out` is called only for a session the Generate made (just before its id goes
    out); generating on the caller's own session never calls it, and a new one's is called
    once, with that session."""

    async def main():
        svc = await started(toy_tok)
        await svc.create("p", "a")
        own, new = [], []
        async for _ in svc.generate("p", "a", [3, 1], 3, 0.0, handed_out=own.append):
            pass
        made = [
            sid
            async for sid, _ in svc.generate(
                "p", "", [3, 1], 3, 0.0, keep_session=True, handed_out=new.append
            )
        ]
        await svc.batcher.close()
        return own, new, made

    own, new, made = run(main())
    assert own == []
    assert [s.id for s in new] == made[:1] and len(set(made)) == 1


def test_a_stream_created_session_whose_response_was_delivered_stays_after_detach(toy_tok):
    """A first step's response reported delivered without `handed_out` (the transport wrote
    it): the session that step created is the client's and stays open at detach, at the
    position and state of the inputs it was fed."""

    async def main():
        svc = await started(toy_tok)
        a = svc.attach("p")
        await a.step("", tokens=[4, 5, 6])
        sid = a.session.id
        a.delivered()
        a.detach()
        s = svc.store.get(sid, "p")
        state = svc.store.read(s)
        await svc.batcher.close()
        return s.live, s.position, state

    live, position, state = run(main())
    _, want = toy_tok.prefill(np.array([[4, 5, 6]]), toy_tok.new_state())
    assert live and position == 3
    np.testing.assert_allclose(state, want[0], atol=1e-5)


def test_a_stream_whose_session_another_replica_evicted_is_told_evicted(toy_tok):
    """With a shared store, the attached session is not held here and the fetch finds it
    evicted elsewhere (idle past its TTL): the Stream's next step is NOT_FOUND "evicted",
    as the store says, not "closed"."""

    async def main():
        svc = await started(toy_tok)
        a = await _attached_stream(svc)
        a.delivered()
        _not_held(svc, lambda sid, principal: svc.store.drop(a.session, "evicted"))
        with pytest.raises(SessionNotFound) as e:
            await a.step("", tokens=[2])
        a.detach()
        svc._fetch_pool.shutdown()
        await svc.batcher.close()
        return e.value

    err = run(main())
    assert (err.session_id, err.reason) == ("a", "evicted")


def test_a_loaded_session_with_a_step_in_flight_gets_its_history_after_that_step(toy_tok):
    """A session loaded from elsewhere (no history) whose step is still in flight (pinned)
    is not given a history by a request meanwhile (its state is that step's to change); the
    first request once the step is done gives it one, starting where the session is then."""

    async def main():
        svc = await started(toy_tok, REWIND)
        s = svc.store.install("a", "p", 60.0, 5, toy_tok.new_state()[0], "elsewhere")
        svc.store.pin(s)  # what a step in flight holds
        await svc.snapshot("p", "a")
        during = s.history
        svc.store.unpin(s)
        await svc.snapshot("p", "a")
        after = s.history
        await svc.batcher.close()
        return during, after

    during, after = run(main())
    assert during is None and after is not None and after.oldest == 5
