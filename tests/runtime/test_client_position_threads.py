"""A session handle's `position` when several threads (or tasks) call through it at once: an
answer that arrives after a later one (the server answered it first) does not take the
position back, so the handle ends where the server's session is; a rewind, and a call that no
other call overlapped, still set it to the server's answer (another client may have rewound
the session).

The stand-in server numbers a session's positions in the order the steps arrive, as the real
one does, and can hold back the answer to one step."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import pytest
from grpc_helpers import position_on_server, serve, stand_in, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import AsyncClient, Client


class Counter(pb_grpc.StreamingInferenceServicer):
    """Step adds the inputs to the session's position; after `hold_next()`, the next Step's
    answer waits for `release`."""

    def __init__(self):
        self.positions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._hold = False
        self.held, self.release = threading.Event(), threading.Event()

    def hold_next(self) -> None:
        self._hold = True

    def Step(self, request, context):
        with self._lock:
            sid = request.session_id
            position = self.positions[sid] = self.positions.get(sid, 0) + len(request.tokens)
            hold, self._hold = self._hold, False
        if hold:
            self.held.set()
            self.release.wait(10)
        return pb.StepResponse(session_id=sid, position=position)


@pytest.fixture()
def counter():
    with stand_in(Counter()) as c:
        yield c
        c.release.set()


def test_a_late_answer_does_not_take_a_sync_handles_position_back(counter):
    with Client(counter.target, timeout=10) as c:
        s = c.session("s-1")
        counter.hold_next()
        late: list[int] = []
        t = threading.Thread(target=lambda: late.append(s.step(tokens=[1]).position))
        t.start()
        assert counter.held.wait(10)  # numbered 1, its answer held
        assert s.step(tokens=[2, 3]).position == 3  # numbered 3, answered at once
        counter.release.set()
        t.join(10)
    assert late == [1] and s.position == 3 == counter.positions["s-1"]


def test_a_late_answer_does_not_take_an_async_handles_position_back(counter):
    async def run():
        async with AsyncClient(counter.target, timeout=10) as c:
            s = c.session("s-1")
            counter.hold_next()
            late = asyncio.ensure_future(s.step(tokens=[1]))
            assert await asyncio.to_thread(counter.held.wait, 10)
            early = (await s.step(tokens=[2, 3])).position
            counter.release.set()
            return (await late).position, early, s.position

    assert asyncio.run(asyncio.wait_for(run(), 30)) == (1, 3, 3)
    assert counter.positions["s-1"] == 3


@pytest.fixture(scope="module")
def toy_server(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64) as s:
        yield s


def test_threads_stepping_one_handle_leave_it_at_the_servers_position(toy_server):
    """4 threads × 20 steps through one handle: the position another thread reads never
    goes back, and ends at the server's."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
        seen, done = [], threading.Event()

        def watch():
            while not done.wait(0.0002):
                seen.append(s.position)

        def steps():
            for _ in range(20):
                s.step(tokens=[1], output="none")

        watcher = threading.Thread(target=watch)
        watcher.start()
        with futures.ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(steps) for _ in range(4)]:
                f.result()
        done.set()
        watcher.join(10)
        assert seen == sorted(seen)
        assert s.position == 80 == position_on_server(toy_server, s.id)


def test_a_handle_takes_a_position_another_client_rewound_to(toy_server):
    """Calls that nothing overlapped follow the server, backwards too: another handle (as
    another client) rewound the session."""
    with Client(target(toy_server), timeout=10) as c:
        s = c.create_session()
        s.step(tokens=[1, 2, 3, 4, 5])
        assert c.session(s.id).rewind(2) == 2
        assert s.step(tokens=[6]).position == s.position == 3
        assert position_on_server(toy_server, s.id) == 3
