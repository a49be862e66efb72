"""Token ids are taken the same way by every API: bytes, a bytearray or a memoryview of
bytes are the byte values (a byte-level model's ids). Each API's result for bytes equals its
result for the same ids as a list of ints."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from grpc_helpers import serve, target
from ssmstream.runtime import Engine, SessionStore
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.client import Client
from ssmstream.runtime.service import ServiceLimits, SessionService

IDS = [3, 1, 4, 1, 5]  # the toy model's vocabulary is 11
BYTE_FORMS = [bytes(IDS), bytearray(IDS), memoryview(bytes(IDS))]
FORM_IDS = ["bytes", "bytearray", "memoryview"]


@pytest.fixture(scope="module")
def engine(toy_token_model):
    return Engine(str(toy_token_model["model_dir"]), device="cpu")


@pytest.mark.parametrize("form", BYTE_FORMS, ids=FORM_IDS)
def test_engine_step_takes_bytes_as_ids(engine, form):
    """Engine.step's tokens are one per session ([B]): bytes are B sessions' ids."""
    states = engine.new_state(len(IDS))
    want, want_states = engine.step(np.array(IDS), states)
    got, got_states = engine.step(form, states)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_states, want_states)


def test_the_session_service_takes_bytes_as_ids(engine):
    async def run():
        store = SessionStore(engine.state_size, model_sha=engine.info["step_sha256"])
        batcher = Batcher(engine, store)
        await batcher.start()
        svc = SessionService(engine, store, batcher, ServiceLimits())
        try:
            ref, _ = await svc.create("me")
            want = await svc.step("me", ref.id, IDS)
            for form in BYTE_FORMS:
                s, _ = await svc.create("me")
                got = await svc.step("me", s.id, form)
                np.testing.assert_array_equal(got[0], want[0])
                assert s.position == len(IDS)
                np.testing.assert_array_equal(store.read(s), store.read(ref))
                p, _ = await svc.create("me", prompt=form)
                assert p.position == len(IDS)
                np.testing.assert_array_equal(store.read(p), store.read(ref))
        finally:
            await batcher.close()

    asyncio.run(run())


def test_the_client_takes_bytes_as_ids(toy_token_model):
    with serve(toy_token_model["model_dir"]) as srv, Client(target(srv), timeout=10) as c:
        want = c.create_session().step(tokens=IDS, output="all").outputs
        for form in BYTE_FORMS:
            got = c.create_session().step(tokens=form, output="all").outputs
            np.testing.assert_array_equal(got, want)
            assert c.create_session(prompt=form).position == len(IDS)
