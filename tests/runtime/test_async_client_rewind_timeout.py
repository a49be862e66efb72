"""AsyncClientSession.rewind takes its own timeout, as the sync handle's does, and a
StepResponse with no rows has no outputs. The stub is a stand-in: no call reaches a server."""

from __future__ import annotations

import asyncio

from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import AsyncClient, StepResult


class _Stub:
    def __init__(self):
        self.timeouts: list = []

    async def RewindSession(self, request, metadata=None, timeout=None):
        self.timeouts.append(timeout)
        return pb.Session(session_id=request.session_id, position=request.position)


def test_an_async_rewind_uses_its_own_timeout_not_the_clients():
    async def main():
        async with AsyncClient("127.0.0.1:1", timeout=30) as c:
            c.stub = stub = _Stub()
            s = c.session("s", 9)
            assert await s.rewind(4, timeout=2.5) == 4 and s.position == 4
            await s.rewind(3)
            return stub.timeouts

    assert asyncio.run(main()) == [2.5, 30.0]


def test_a_response_without_rows_has_no_outputs():
    r = StepResult.from_proto(pb.StepResponse(session_id="s", position=2, rows=0, cols=4))
    assert r.outputs is None and r.position == 2
