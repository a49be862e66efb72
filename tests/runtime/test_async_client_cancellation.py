"""The asyncio client's calls cancelled (a task's cancel, `asyncio.wait_for`,
`asyncio.timeout`) before their request is sent, while the server works on it and while its
response is read, against a server in this process:

- the caller sees CancelledError or TimeoutError, never a grpc error;
- a handle's position never goes back, and is the server's once a later call answered;
- the server lets go of the session of a cancelled Stream or Generate, and no session is
  left behind;
- the same client and handle then work, their results those of a sync client's twin session
  fed the same inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_helpers import Deaf, position_on_server, serve, stand_in, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime import client as client_mod
from ssmstream.runtime.client import AsyncClient, Client

CANCELLED = (asyncio.CancelledError, TimeoutError)


@pytest.fixture(scope="module")
def srv(toy_token_model):
    with serve(toy_token_model["model_dir"]) as s:
        yield s


class Gate:
    """Once closed, holds the server's steps and prefills until opened, but for the first
    `let` of them (`started`: one is held)."""

    def __init__(self, engine, monkeypatch):
        self.started, self.opened = threading.Event(), threading.Event()
        self.opened.set()
        self.let, self._lock = 0, threading.Lock()
        for name in ("run_slots", "prefill_unchecked"):
            real = getattr(engine, name)

            def held(*a, _real=real, **k):
                with self._lock:
                    passes = self.opened.is_set() or self.let > 0
                    self.let -= not self.opened.is_set() and self.let > 0
                if not passes:
                    self.started.set()
                    self.opened.wait(10)
                return _real(*a, **k)

            monkeypatch.setattr(engine, name, held)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)

    def close(self, let: int = 0) -> None:
        self.started.clear()
        self.let = let
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(srv, monkeypatch):
    g = Gate(srv.server.engine, monkeypatch)
    yield g
    g.open()


async def settled(srv, sessions: int | None = None, wait: float = 3.0) -> None:
    """Wait until the server holds no Stream or Generate and runs no step (and holds
    `sessions` sessions)."""
    svc, deadline = srv.server.service, time.monotonic() + wait
    while (
        svc.attached
        or svc.batcher.pending()
        or (sessions is not None and len(srv.server.store) != sessions)
    ):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert svc.attached == 0
    if sessions is not None:
        assert len(srv.server.store) == sessions


async def until(condition, wait: float = 3.0) -> None:
    deadline = time.monotonic() + wait
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert condition()


def twin_outputs(srv, feeds: list[list[int]]) -> list[np.ndarray]:
    """A sync client's session fed `feeds` in turn: each feed's outputs."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        try:
            return [s.step(tokens=f, output="all").outputs for f in feeds]
        finally:
            s.close()


async def end(task: asyncio.Task) -> BaseException | None:
    try:
        await task
    except BaseException as e:  # noqa: BLE001 — what the caller saw
        return e
    return None


# --- unary calls --------------------------------------------------------------------------


async def _check_next_step(srv, s, fed) -> None:
    """The handle steps on from where the server is, with the outputs of a twin session
    fed `fed` (or `fed(position)`, the position the step started from) first."""
    r = await s.step(tokens=[5, 6], output="all")
    assert r.position == s.position == position_on_server(srv, s.id)
    fed = [*(fed(r.position - 2) if callable(fed) else fed), [5, 6]]
    want = twin_outputs(srv, fed)[-1]
    np.testing.assert_allclose(r.outputs, want, rtol=1e-6, err_msg=str(fed))


@pytest.mark.parametrize("how", ["cancel", "wait_for", "timeout"])
@pytest.mark.parametrize("tokens", [[7], [7, 8, 9]], ids=["step", "prefill"])
def test_a_step_ended_while_the_server_works_on_it(srv, gate, how, tokens):
    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            await s.step(tokens=[1, 2])
            gate.close()
            if how == "cancel":
                task = asyncio.ensure_future(s.step(tokens=tokens))
                await gate.reached()
                task.cancel()
            elif how == "wait_for":
                task = asyncio.ensure_future(asyncio.wait_for(s.step(tokens=tokens), 0.2))
            else:

                async def bounded():
                    async with asyncio.timeout(0.2):
                        return await s.step(tokens=tokens)

                task = asyncio.ensure_future(bounded())
            e = await end(task)
            assert isinstance(e, CANCELLED), repr(e)
            assert s.position == 2  # no answer came
            gate.open()
            await settled(srv, n + 1)
            # a step cancelled while it runs still applies (its outputs dropped)
            await until(lambda: position_on_server(srv, s.id) == 2 + len(tokens))
            fed = [[1, 2], tokens]
            await _check_next_step(srv, s, fed)
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


UNARY = ["info", "create", "create_prompt", "step", "rewind", "snapshot", "restore", "fork",
         "close"]  # fmt: skip


def unary_call(call: str, c: AsyncClient, s, snap: bytes):
    return {
        "info": lambda: c.info(),
        "create": lambda: c.create_session(),
        "create_prompt": lambda: c.create_session(prompt=[4, 5]),
        "step": lambda: s.step(tokens=[4]),
        "rewind": lambda: s.rewind(3),
        "snapshot": lambda: s.snapshot(),
        "restore": lambda: c.restore(snap),
        "fork": lambda: s.fork(),
        "close": lambda: s.close(),
    }[call]()


@pytest.mark.parametrize("call", UNARY)
def test_a_unary_call_cancelled_at_each_moment(srv, call):
    """Cancelled after 0, 1, 2, ... turns of the event loop: before the request is sent,
    while it is, while the server works and while the response is read, until it returns.
    Each time the caller sees CancelledError, the handle's position does not go back and is
    one of the server's before and after, and the client and handle work on."""

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            base, store = len(srv.server.store), srv.server.store._sessions
            s = await c.create_session()
            await s.step(tokens=[1, 2, 3])
            snap = await s.snapshot()
            if call == "close":  # each try closes a session of its own
                await s.close()
            fed, finished, turns = [[1, 2, 3]], False, 0  # fed: the handle's session's inputs
            while not finished and turns < 5000:
                if call == "close":  # a session of its own each time
                    s = await c.restore(snap)
                if call == "rewind":  # from 4 back to 3
                    await s.rewind(3)
                    await s.step(tokens=[4])
                known = s.position
                ids_before = set(store) - ({s.id} if call == "close" else set())
                coro = unary_call(call, c, s, snap)
                task = asyncio.ensure_future(coro)
                for _ in range(turns):
                    await asyncio.sleep(0)
                finished = task.done()
                task.cancel()
                e = await end(task)
                if finished:
                    assert e is None or not isinstance(e, grpc.RpcError), repr(e)
                else:
                    assert isinstance(e, (asyncio.CancelledError, type(None))), repr(e)
                result = None if e else task.result()
                await settled(srv)
                if call == "rewind":  # unanswered, the handle cannot know it applied
                    assert s.position in (4, 3)
                    assert position_on_server(srv, s.id) in (4, 3)
                else:
                    assert s.position >= known
                if call not in ("rewind", "close"):
                    assert s.position <= position_on_server(srv, s.id)
                # sessions made by calls that returned are closed here; others must not stay
                if isinstance(result, client_mod.AsyncClientSession):
                    await result.close()
                if call == "close" and e is not None:  # NOT_FOUND where it was closed
                    with contextlib.suppress(grpc.RpcError):
                        await c.session(s.id).close()
                with contextlib.suppress(AssertionError):
                    await until(lambda ids=ids_before: not set(store) - ids, wait=2)
                made = set(store) - ids_before
                assert not made, f"{call} cancelled after {turns} turns left {made}"
                turns += 1 + turns // 50  # every moment at first, then faster
            assert finished
            if call in ("step", "rewind"):  # the cancelled steps or rewind that applied
                await _check_next_step(srv, s, lambda p: [[1, 2, 3], *[[4]] * (p - 3)])
            else:
                if call == "close":
                    s = await c.restore(snap)
                await _check_next_step(srv, s, fed)
            await s.close()
            await settled(srv, base)

    asyncio.run(asyncio.wait_for(main(), 20))


def answered_unread(c: AsyncClient, rpc: str) -> asyncio.Event:
    """The client's `rpc` calls get the server's answer, then wait before their caller reads
    it (a cancel then lands after the server made the session): the event is set once an
    answer is in."""
    real, answered = getattr(c._stub, rpc), asyncio.Event()

    def call(req, **kw):
        async def answer():
            r = await real(req, **kw)
            answered.set()
            await asyncio.sleep(10)
            return r

        return answer()

    setattr(c._stub, rpc, call)
    return answered


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
@pytest.mark.parametrize("call", ["create", "create_prompt", "restore", "fork"])
def test_a_session_made_for_a_cancelled_call_is_closed_again(srv, call, how):
    """The server made the session and answered, but the caller was cancelled before the
    answer was read: it never learns the session's id (the client chose it), so the client
    closes it rather than leave it until its TTL."""

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            snap = await s.snapshot()
            rpc, make = {
                "create": ("CreateSession", lambda: c.create_session()),
                "create_prompt": ("CreateSession", lambda: c.create_session(prompt=[1, 2])),
                "restore": ("RestoreSession", lambda: c.restore(snap)),
                "fork": ("ForkSession", lambda: s.fork()),
            }[call]
            answered = answered_unread(c, rpc)
            if how == "cancel":
                task = asyncio.ensure_future(make())
                await answered.wait()
                assert len(srv.server.store) == n + 2
                task.cancel()
            else:
                task = asyncio.ensure_future(asyncio.wait_for(make(), 0.3))
            e = await end(task)
            assert isinstance(e, CANCELLED), repr(e)
            await until(lambda: len(srv.server.store) == n + 1)
            assert (await s.step(tokens=[3])).position == 1  # the handle's own session stays
            await s.close()
        assert len(srv.server.store) == n

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_client_closed_right_after_a_cancelled_create_has_closed_its_session(srv):
    async def main():
        c = AsyncClient(target(srv), timeout=10)
        await c.info()
        n = len(srv.server.store)
        answered = answered_unread(c, "CreateSession")
        task = asyncio.ensure_future(c.create_session())
        await answered.wait()
        task.cancel()
        assert isinstance(await end(task), asyncio.CancelledError)
        await c.close()
        assert len(srv.server.store) == n  # no wait: closed by the time close() returned

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_session_whose_id_the_caller_gave_stays_after_a_cancelled_create(srv):
    """The caller knows that id (it may resume the session, or hold it already): the
    client does not close it."""

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            await c.info()
            n = len(srv.server.store)
            answered = answered_unread(c, "CreateSession")
            task = asyncio.ensure_future(c.create_session("given-id"))
            await answered.wait()
            task.cancel()
            assert isinstance(await end(task), asyncio.CancelledError)
            await asyncio.sleep(0.2)  # a close would have reached the server by now
            assert len(srv.server.store) == n + 1
            assert await c.session("given-id").close() == 0

    asyncio.run(asyncio.wait_for(main(), 20))


# --- Stream, Generate and stream handles ----------------------------------------------------


def ended_by(how: str, gate: Gate, consume) -> asyncio.Future:
    """`consume()` (a coroutine function) run as a task and ended `how`, while the server
    works on one of its requests: its task."""
    if how == "wait_for":
        return asyncio.ensure_future(asyncio.wait_for(consume(), 0.3))

    async def bounded():
        async with asyncio.timeout(0.3):
            return await consume()

    if how == "timeout":
        return asyncio.ensure_future(bounded())
    task = asyncio.ensure_future(consume())

    async def cancel_when_held():
        await gate.reached()
        task.cancel()

    asyncio.ensure_future(cancel_when_held())
    return task


HOW = ["cancel", "wait_for", "timeout"]


@pytest.mark.parametrize("how", HOW)
def test_a_stream_ended_while_the_server_works_lets_the_session_go(srv, gate, how):
    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            await s.step(tokens=[1, 2])
            got = []

            async def consume():
                async for r in s.stream([[3], [4], [5], [6]]):
                    got.append(r.position)

            gate.close(let=1)  # the first request's step runs, the next one is held
            e = await end(ended_by(how, gate, consume))
            assert isinstance(e, CANCELLED), repr(e)
            # (a cancel may land before the first response is read: the step's position)
            assert got == list(range(3, 3 + len(got))) and s.position == (got or [2])[-1]
            gate.open()
            await settled(srv, n + 1)
            on_server = position_on_server(srv, s.id)
            assert on_server >= s.position
            await _check_next_step(srv, s, [[1, 2], *([t] for t in range(3, on_server + 1))])
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("how", HOW)
def test_a_generation_ended_while_the_server_works_lets_the_session_go(srv, gate, how):
    with Client(target(srv), timeout=10) as sync:
        greedy = [g.token for g in sync.generate([1, 2], max_new_tokens=6, temperature=0.0)]

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            tokens = []

            async def consume():
                async for g in s.generate([1, 2], max_new_tokens=6, temperature=0.0):
                    tokens.append(g.token)

            gate.close(let=2)  # the prompt runs (one or two calls): a later step is held
            e = await end(ended_by(how, gate, consume))
            assert isinstance(e, CANCELLED), repr(e)
            # the handle is at the last token received; none yet (a cancel as soon as the
            # server holds a step may come before the first token is read): where create left it
            assert tokens == greedy[: len(tokens)]
            assert s.position == (1 + len(tokens) if tokens else 0)
            gate.open()
            await settled(srv, n + 1)
            on_server = position_on_server(srv, s.id)
            assert on_server >= s.position
            fed = [[1, 2], *([t] for t in greedy[: on_server - 2])]
            await _check_next_step(srv, s, fed)
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("how", HOW)
def test_a_regeneration_ended_while_the_server_works(srv, gate, how):
    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            await s.step(tokens=[1, 2, 3])

            async def consume():
                gate.close()  # the rewind's replay, or the prompt's step
                async for _ in s.regenerate(1, [4], max_new_tokens=4, temperature=0.0):
                    pass

            e = await end(ended_by(how, gate, consume))
            assert isinstance(e, CANCELLED), repr(e)
            gate.open()
            await settled(srv, n + 1)
            assert s.position <= position_on_server(srv, s.id) or s.position == 3
            await s.rewind(1)  # from a known place
            assert s.position == position_on_server(srv, s.id) == 1
            await _check_next_step(srv, s, [[1]])
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("how", HOW)
def test_a_stream_handle_send_ended_while_the_server_works(srv, gate, how):
    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            st = s.open_stream()
            assert (await st.send(tokens=[1, 2])).position == 2
            gate.close()
            e = await end(ended_by(how, gate, lambda: st.send(tokens=[3])))
            assert isinstance(e, CANCELLED), repr(e)
            assert s.position == 2
            with pytest.raises(grpc.RpcError) as refused:  # the call ended with the send
                await st.send(tokens=[4])
            assert refused.value.code() == grpc.StatusCode.CANCELLED
            gate.open()
            await settled(srv, n + 1)
            on_server = position_on_server(srv, s.id)
            assert on_server in (2, 3)
            await st.close()
            await _check_next_step(srv, s, [[1, 2], *([[3]] if on_server == 3 else [])])
            async with s.open_stream() as again:  # the session is free for another Stream
                r = await again.send(tokens=[7])
            assert r.position == s.position == position_on_server(srv, s.id)
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_stream_handle_close_cancelled_at_each_moment(srv):
    """The close ends the call all the same (cancelled), and the server lets go of the
    session: a Step on it is not refused as attached to an open Stream."""

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            finished, turns = False, 0
            while not finished and turns < 200:
                st = s.open_stream()
                await st.send(tokens=[1])
                task = asyncio.ensure_future(st.close())
                for _ in range(turns):
                    await asyncio.sleep(0)
                finished = task.done()
                task.cancel()
                e = await end(task)
                assert e is None or isinstance(e, asyncio.CancelledError), repr(e)
                if not st._closed:  # cancelled before it began: the stream is still open
                    assert turns == 0 and (await st.send(tokens=[2])).position == s.position
                    await st.close()
                await until(st._call.done, wait=2)
                await settled(srv, n + 1)
                await s.step(tokens=[2])
                assert s.position == position_on_server(srv, s.id)
                turns += 1
            assert finished
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("how", HOW)
def test_a_stream_handle_close_ended_while_it_waits_still_ends_the_call(how):
    """The close waits STREAM_CLOSE_WAIT for a server that does not end the call; ended
    meanwhile, it still cancels the call (the server's Stream ends)."""

    async def main(deaf):
        async with AsyncClient(deaf.target, timeout=10) as c:
            st = c.session("s-1").open_stream()
            await st.send(tokens=[1])
            if how == "cancel":
                task = asyncio.ensure_future(st.close())
                await asyncio.sleep(0.1)
                task.cancel()
            elif how == "wait_for":
                task = asyncio.ensure_future(asyncio.wait_for(st.close(), 0.1))
            else:

                async def bounded():
                    async with asyncio.timeout(0.1):
                        await st.close()

                task = asyncio.ensure_future(bounded())
            e = await end(task)
            assert isinstance(e, CANCELLED), repr(e)
            assert st._call.cancelled()
            assert await asyncio.to_thread(deaf.ended.wait, 5)

    with stand_in(Deaf()) as deaf:
        asyncio.run(asyncio.wait_for(main(deaf), 20))


class SlowToMake(pb_grpc.StreamingInferenceServicer):
    """Makes sessions slowly (answers once its client cancels the call, too late); notes
    each CloseSession as (the session closed, the call's x-session-id)."""

    def __init__(self):
        self.making, self.closes = threading.Event(), []

    def _make(self, session_id: str, context) -> pb.Session:
        self.making.set()
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(10)
        return pb.Session(session_id=session_id)

    def CreateSession(self, request, context):
        return self._make(request.session_id, context)

    def ForkSession(self, request, context):
        return self._make(request.new_session_id, context)

    def CloseSession(self, request, context):
        sticky = dict(context.invocation_metadata()).get("x-session-id")
        self.closes.append((request.session_id, sticky))
        return pb.Session(session_id=request.session_id)


def test_the_close_of_a_cancelled_fork_goes_where_the_fork_went():
    """A cancelled fork's new session is closed with the parent's x-session-id (the replica
    that held the parent made it); a create's, with its own."""

    async def main(server):
        async with AsyncClient(server.target, timeout=10) as c:
            calls = [("parent", lambda: c.session("parent").fork()), (None, c.create_session)]
            for sent_as, make in calls:
                server.making.clear()
                task = asyncio.ensure_future(make())
                assert await asyncio.to_thread(server.making.wait, 5)
                task.cancel()
                assert isinstance(await end(task), asyncio.CancelledError)
                await until(lambda: len(server.closes) == 1)
                (closed, sticky), *_ = server.closes
                assert closed and sticky == (sent_as or closed)
                server.closes.clear()

    with stand_in(SlowToMake()) as server:
        asyncio.run(asyncio.wait_for(main(server), 20))


@pytest.mark.parametrize("what", ["generate", "temporary", "stream"])
def test_a_consumer_cancelled_between_items_lets_the_session_go(srv, what):
    """Cancelled in its own body (not while the iterator waits on the server): the
    iterator, dropped unclosed, still ends its call."""
    with Client(target(srv), timeout=10) as sync:
        greedy = [g.token for g in sync.generate([1, 2], max_new_tokens=50, temperature=0.0)]
    fed = {
        "generate": lambda p: [[1, 2], *([t] for t in greedy[: p - 2])],
        "temporary": lambda p: [],  # the handle's own session was not fed
        "stream": lambda p: [[t] for t in range(1, p + 1)],
    }[what]

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            items = {
                "generate": lambda: s.generate([1, 2], max_new_tokens=50, temperature=0.0),
                "temporary": lambda: c.generate([1, 2], max_new_tokens=50, temperature=0.0),
                "stream": lambda: s.stream([[t] for t in range(1, 50)]),
            }[what]()
            got = []

            async def consume(items):
                async for r in items:
                    got.append(r)
                    await asyncio.sleep(10)

            task = asyncio.ensure_future(consume(items))
            await until(lambda: got)
            task.cancel()
            assert isinstance(await end(task), asyncio.CancelledError)
            del items
            await settled(srv, n + 1)
            await _check_next_step(srv, s, fed)
            await s.close()
            await settled(srv, n)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_send_cancelled_while_it_waits_its_turn_leaves_the_stream_working(srv, gate):
    """Cancelled before its request was written (another task's send held by the server):
    the stream goes on, the held send gets its own answer, the next one the next."""

    async def main():
        async with AsyncClient(target(srv), timeout=10) as c:
            n = len(srv.server.store)
            s = await c.create_session()
            async with s.open_stream() as st:
                await st.send(tokens=[1, 2])
                gate.close()
                first = asyncio.ensure_future(st.send(tokens=[3]))
                await gate.reached()
                waiting = asyncio.ensure_future(st.send(tokens=[4]))
                await asyncio.sleep(0.05)
                waiting.cancel()
                assert isinstance(await end(waiting), asyncio.CancelledError)
                gate.open()
                assert (await first).position == 3
                r = await st.send(tokens=[5], output="all")
                assert r.position == s.position == 4
            await settled(srv, n + 1)
            assert position_on_server(srv, s.id) == 4
            np.testing.assert_allclose(r.outputs, twin_outputs(srv, [[1, 2], [3], [5]])[-1])
            await s.close()

    asyncio.run(asyncio.wait_for(main(), 20))
