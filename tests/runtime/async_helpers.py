"""Helpers of the asyncio tests of the Batcher and the SessionService: a coroutine run with a
deadline, and a started Batcher (with its store) or service on an engine."""

from __future__ import annotations

import asyncio

from ssmstream.runtime.batcher import Batcher
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


async def started_service(engine, limits: ServiceLimits) -> SessionService:
    """A service on a store of 16 sessions and a started Batcher (batches of up to 4, no
    delay)."""
    store = SessionStore(engine.state_size, capacity=16)
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=0.0)
    await batcher.start()
    return SessionService(engine, store, batcher, limits)
