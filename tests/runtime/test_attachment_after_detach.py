"""An Attachment (SessionService.attach) that was detached steps nothing: its session may be
attached to another Stream by then, which alone may step it. The refusal applies nothing
and makes no session; the session goes on as an untouched twin fed the same inputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore


def test_a_detached_attachment_steps_nothing(toy_tok):
    async def main():
        store = SessionStore(toy_tok.state_size, capacity=8)
        batcher = Batcher(toy_tok, store, max_batch=4, max_batch_delay=0.0)
        await batcher.start()
        svc = SessionService(toy_tok, store, batcher, ServiceLimits())
        try:
            s, _ = await svc.create("p")
            twin, _ = await svc.create("p")
            first = svc.attach("p")
            await first.step(s.id, [1])
            first.detach()
            second = svc.attach("p")  # the session is free again: another Stream takes it
            await second.step(s.id, [2])
            state = store.read(s).copy()
            with pytest.raises(RuntimeError, match="^this Stream's attachment was detached"):
                await first.step(s.id, [3])
            with pytest.raises(RuntimeError, match="^this Stream's attachment was detached"):
                await first.step("", [3])  # no new session either
            assert (s.position, len(store)) == (2, 2)
            assert np.array_equal(store.read(s), state)
            out, position = await second.step(s.id, [4])
            second.detach()
            await svc.step("p", twin.id, [1, 2])
            want, _ = await svc.step("p", twin.id, [4])
            assert position == 3 and np.array_equal(out, want)
            assert np.array_equal(store.read(s), store.read(twin))
        finally:
            await batcher.close()

    asyncio.run(asyncio.wait_for(main(), 30))
