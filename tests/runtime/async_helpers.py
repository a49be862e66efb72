"""Helpers of the asyncio tests of the Batcher and the SessionService: a coroutine run with a
deadline, a started Batcher (with its store) or service on an engine, and a session with a
rewind history stepped one input at a time."""

from __future__ import annotations

import asyncio

import numpy as np
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.history import History
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def started_batcher(engine, capacity: int = 64, **kw) -> tuple[Batcher, SessionStore]:
    """A started Batcher (`kw` are its arguments) on a store of `capacity` sessions."""
    store = SessionStore(engine.state_size, capacity=capacity)
    batcher = Batcher(engine, store, **kw)
    await batcher.start()
    return batcher, store


async def stepped_with_history(engine, tokens=(1, 2, 3)):
    """(batcher, store, session): a started Batcher (no batch delay) and a session with a
    History (window 8, checkpoints 4 apart) stepped through `tokens` one at a time."""
    batcher, store = await started_batcher(engine, max_batch_delay=0.0)
    s = store.create()
    s.history = History(8, 4, 0, store.read(s))
    for t in tokens:
        await batcher.step(s, np.array([t]))
    return batcher, store, s


async def started_service(engine, limits: ServiceLimits) -> SessionService:
    """A service on a store of 16 sessions and a started Batcher (batches of up to 4, no
    delay)."""
    store = SessionStore(engine.state_size, capacity=16)
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0)
    await batcher.start()
    return SessionService(engine, store, batcher, limits)
