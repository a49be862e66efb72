"""The clients' streaming calls against a real server: what a handle learns from a Stream, a
Stream cancelled before its creating response got out, errors after a failed Stream, and
regenerate's argument checks, the same in the sync and the async client."""

from __future__ import annotations

import asyncio
import queue
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_helpers import position_on_server, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import AsyncClient, Client, step_request

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def srv(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64) as s:
        yield s


def test_a_stream_that_creates_the_session_gives_the_handle_its_id(srv):
    """A handle without an id: the Stream creates a session, and the handle continues it."""
    with Client(target(srv), timeout=10) as c:
        s = c.session("")
        created = list(s.stream([[1], [2], [3]]))[0].session_id
        assert created and (s.id, s.position) == (created, 3)
        assert s.step(tokens=[4]).position == 4
        s.close()

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = c.session("")
            created = [r async for r in s.stream([[1], [2], [3]])][0].session_id
            assert created and (s.id, s.position) == (created, 3)
            assert (await s.step(tokens=[4])).position == 4
            await s.close()

    asyncio.run(run())


def test_a_stream_cancelled_while_its_creating_response_is_written_keeps_the_session(
    make_toy, tmp_path
):
    """The creating request's step ran, its response (16 MiB, OUTPUT_ALL) is being written
    when the client cancels. The server cannot tell a client that read the id and cancelled
    from one that never read it, and closing would lose sessions clients know (11-20% of
    Generates cancelled right after their first token, under load): the session stays, at
    the position the response reports, until it is closed or its TTL ends."""
    wide = make_toy(tmp_path / "wide", "tokens", d_out=4096)
    with (
        serve(wide["model_dir"], max_message_bytes=32 << 20) as srv,
        Client(target(srv), timeout=10) as c,
    ):
        store = srv.server.store
        requests: queue.Queue = queue.Queue()
        call = c.stub.Stream(iter(requests.get, None))
        requests.put(step_request("", [1] * 1024, output="all"))  # 1024 x 4096 floats back
        assert wait_until(lambda: len(store) == 1 and store.sessions()[0].position == 1024)
        time.sleep(0.3)  # the response is being written; the client does not read it
        sid = store.sessions()[0].id
        call.cancel()
        requests.put(None)
        assert wait_until(lambda: srv.server.service.open_streams == 0)
        assert c.session(sid).close() == 1024 and len(store) == 0


def test_a_send_after_the_stream_failed_raises_its_status_in_both_clients(srv):
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        with s.open_stream() as st:
            st.send(tokens=[1])
            with pytest.raises(grpc.RpcError):
                st.send(tokens=[99])  # outside the vocabulary: ends the Stream
            with pytest.raises(grpc.RpcError) as sync_err:
                st.send(tokens=[2])
        s.close()

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            async with s.open_stream() as st:
                await st.send(tokens=[1])
                with pytest.raises(grpc.RpcError):
                    await st.send(tokens=[99])
                with pytest.raises(grpc.RpcError) as e:  # was asyncio.InvalidStateError
                    await st.send(tokens=[2])
            await s.close()
            return e.value

    async_err = asyncio.run(run())
    assert sync_err.value.code() == async_err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_regenerate_checks_its_arguments_before_it_rewinds(srv):
    """A regenerate the client refuses changes nothing (it had rewound first), and a
    regenerate not iterated yet has not rewound, in both clients (the sync one had)."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session(prompt=PROMPT)
        with pytest.raises(ValueError, match="^temperature: "):
            s.regenerate(3, [1], max_new_tokens=4, temperature="hot")
        with pytest.raises(ValueError, match="^position: "):
            s.regenerate(-1, [1])
        for bad, field in (  # the server's ranges too, from the model's info
            (dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"),
            (dict(max_new_tokens=0), "max_new_tokens"), (dict(prompt=[]), "prompt"),
            (dict(prompt=[99]), "prompt"), (dict(top_k=99), "top_k"),
        ):  # fmt: skip
            with pytest.raises(ValueError, match=f"^{field}: "):
                s.regenerate(3, **{"prompt": [1], **bad})
        pending = s.regenerate(3, [1], max_new_tokens=2, seed=0)
        assert position_on_server(srv, s.id) == 10
        assert [r.position for r in pending] == [4, 5]
        s.close()

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session(prompt=PROMPT)
            with pytest.raises(ValueError, match="^top_k: "):
                s.regenerate(3, [1], max_new_tokens=4, top_k=-1)
            with pytest.raises(ValueError, match="^temperature: "):  # when iteration starts
                [r async for r in s.regenerate(3, [1], temperature=-1.0)]
            pending = s.regenerate(3, [1], max_new_tokens=2, seed=0)
            await asyncio.sleep(0.05)
            assert position_on_server(srv, s.id) == 10
            assert [r.position async for r in pending] == [4, 5]
            await s.close()

    asyncio.run(run())


def test_concurrent_sends_on_one_handle_take_turns_in_both_clients(srv):
    """Threads on one StreamHandle and tasks on one AsyncStreamHandle each get their own
    response (the async sends had overlapped on the call: INTERNAL, or a hang)."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        with s.open_stream() as st, ThreadPoolExecutor(3) as pool:
            assert sorted(pool.map(lambda t: st.send(tokens=[t]).position, [1, 2, 3])) == [1, 2, 3]
        s.close()

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            async with s.open_stream() as st:
                got = await asyncio.gather(*(st.send(tokens=[t]) for t in (1, 2, 3)))
            await s.close()
            return sorted(r.position for r in got)

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [1, 2, 3]


def test_a_send_after_close_is_an_rpc_error_in_both_clients(srv):
    """Not asyncio.CancelledError, which looks like the caller's own task was cancelled."""
    with Client(target(srv), timeout=10) as c:
        st = c.create_session().open_stream()
        st.send(tokens=[1])
        st.close()
        with pytest.raises(grpc.RpcError):
            st.send(tokens=[2])

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            st = (await c.create_session()).open_stream()
            await st.send(tokens=[1])
            await st.close()
            with pytest.raises(grpc.RpcError) as e:
                await st.send(tokens=[2])
            return e.value.code()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == grpc.StatusCode.CANCELLED


def test_a_stream_item_the_client_refuses_is_its_value_error_after_the_earlier_ones(srv):
    """As step() names the field: [1.5] is not a token (it had been RpcError UNKNOWN in the
    sync client and a bare CancelledError in the async one); the items before it applied."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        got = []
        with pytest.raises(ValueError, match="^tokens: "):
            for r in s.stream([[1], [1.5], [2]]):
                got.append(r.position)
        assert got == [1] and s.position == 1

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            got = []
            with pytest.raises(ValueError, match="^tokens: "):
                async for r in s.stream([[1], [2], [1.5], [3]]):
                    got.append(r.position)
            assert repr(s) == f"AsyncClientSession(id={s.id!r}, position=2)"
            return got

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [1, 2]


def test_the_servers_error_for_an_item_wins_over_a_later_refused_one(srv):
    """[999] ends the stream on the server; [1.5], refused by the client, was never sent:
    the caller gets the server's INVALID_ARGUMENT about 999, in both clients."""
    items = [[1], [999], [1.5]]
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        with pytest.raises(grpc.RpcError) as e:
            list(s.stream(items))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "999" in e.value.details()

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            with pytest.raises(grpc.RpcError) as e:
                [r async for r in s.stream(items)]
            return e.value.code(), e.value.details()

    code, details = asyncio.run(asyncio.wait_for(run(), 30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "999" in details


@pytest.mark.parametrize("tokens", [[2], [0.5]], ids=["valid", "refused"])
def test_an_async_send_after_close_says_the_stream_was_closed(srv, tokens):
    """The CANCELLED status of a send on a closed handle says so (not that an earlier send
    was cancelled), before its inputs are looked at, as the sync handle says it."""

    async def run():
        async with AsyncClient(target(srv), timeout=10) as c:
            s = await c.create_session()
            st = s.open_stream()
            await st.send(tokens=[1])
            await st.close()
            with pytest.raises(grpc.RpcError) as e:
                await st.send(tokens=tokens)
            await s.close()
            return e.value.code(), e.value.details()

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == (grpc.StatusCode.CANCELLED, "this stream was closed")


@pytest.mark.parametrize("tokens", [[2], [0.5]], ids=["valid", "refused"])
def test_a_sync_send_after_close_says_the_stream_was_closed(srv, tokens):
    """As the async handle does, not grpc's "Locally cancelled by application!"."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        st = s.open_stream()
        st.send(tokens=[1])
        st.close()
        with pytest.raises(grpc.RpcError) as e:
            st.send(tokens=tokens)
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.CANCELLED,
            "this stream was closed",
        )
        assert s.step(tokens=[3]).position == 2
        s.close()


def test_a_sync_send_in_flight_when_the_stream_is_closed_says_so(srv):
    """close() from another thread while a send waits for its response: that send raises
    CANCELLED "this stream was closed" too (not grpc's "Locally cancelled by application!")."""
    with Client(target(srv), timeout=10) as c:
        s = c.create_session()
        st = s.open_stream()

        class ClosedWhileItWaits:  # another thread's close() lands during the wait
            def __init__(self, call):
                self.call = call

            def __next__(self):
                st.close()
                return next(self.call)

            def cancel(self):
                return self.call.cancel()

        st._call = ClosedWhileItWaits(st._call)
        with pytest.raises(grpc.RpcError) as e:
            st.send(tokens=[1])
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.CANCELLED,
            "this stream was closed",
        )
        s.close()


class _Reset(grpc.RpcError):
    """What a proxy's reset of the Stream raises (INTERNAL RST_STREAM)."""

    def code(self):
        return grpc.StatusCode.INTERNAL

    def details(self):
        return "Stream removed (RST_STREAM (error code 2))"


def _answers(req: pb.StepRequest, n: int) -> pb.StepResponse:
    return pb.StepResponse(session_id=req.session_id, position=n)


class _ResetAfterTheAnswers:
    """A Stream stub that answers every request it reads, then fails with _Reset."""

    def Stream(self, requests, metadata=None):  # noqa: N802 - the stub's method name
        return _Call(requests)


class _Call:
    """The answers as grpc's call gives them: an iterable with cancel()."""

    def __init__(self, requests):
        self.requests = requests

    def __iter__(self):
        for n, req in enumerate(self.requests, 1):
            yield _answers(req, n)
        raise _Reset()

    def cancel(self):
        return True


class _AsyncResetAfterTheAnswers:
    """The same for grpc.aio: requests from an iterable or an async iterable."""

    def Stream(self, requests, metadata=None):  # noqa: N802
        return _AsyncCall(requests)


class _AsyncCall:
    def __init__(self, requests):
        self.requests = requests

    async def _responses(self):
        if not hasattr(self.requests, "__aiter__"):
            self.requests = _aitems(self.requests)
        n = 0
        async for req in self.requests:
            n += 1
            yield _answers(req, n)
        raise _Reset()

    def __aiter__(self):
        return self._responses()

    def cancel(self):
        return True


async def _aitems(items):
    for x in items:
        yield x


def test_a_refused_item_is_raised_when_the_stream_then_fails_after_every_answer():
    """Every item sent before the refused one was answered, then the Stream failed (a proxy
    reset it): the caller gets the refused item's ValueError, caused by that failure, in
    both clients (port 1: the stub answers, nothing is sent)."""
    items = [[1], [2], [1.5], [3]]
    with Client("127.0.0.1:1", timeout=5) as c:
        c.stub = _ResetAfterTheAnswers()
        s = c.session("sid")
        got = []
        with pytest.raises(ValueError, match="^tokens: ") as e:
            for r in s.stream(items):
                got.append(r.position)
        assert got == [1, 2] and s.position == 2 and isinstance(e.value.__cause__, _Reset)

    async def run(inputs):
        async with AsyncClient("127.0.0.1:1", timeout=5) as c:
            c.stub = _AsyncResetAfterTheAnswers()
            s = c.session("sid")
            got = []
            with pytest.raises(ValueError, match="^tokens: ") as e:
                async for r in s.stream(inputs):
                    got.append(r.position)
            return got, s.position, e.value.__cause__

    for inputs in (items, _aitems(items)):
        got, position, cause = asyncio.run(asyncio.wait_for(run(inputs), 30))
        assert got == [1, 2] and position == 2 and isinstance(cause, _Reset)
