"""SessionService behaviour at its edges:

- Generate on a token model whose d_output exceeds its vocab_size is refused up front
  (ModelError, FAILED_PRECONDITION) before any token is sampled and without leaving a
  session (as the engine's own generate is);
- a rewind replays the inputs the session consumed, not whatever an in-process caller later
  wrote into the array it passed (the history copies the rows of a values prefill);
- with rewind off (window 0) the checkpoint bound the server reports in ModelInfo.limits is
  0, not the bound of a window of 0 inputs;
- ServiceLimits' request limits default to the server's (--max-tokens-per-request,
  --max-new-tokens), so an embedding user gets the limits the server documents;
- a kept Generate whose consumer closed it right after the first token (the id never got
  out) leaves no session behind.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from async_helpers import run
from async_helpers import started_service as started
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import ModelError
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def wide_engine(make_toy, tmp_path_factory):
    """A token toy with more outputs (11) than tokens (5): its outputs are not logits."""
    model = make_toy(tmp_path_factory.mktemp("toy_wide"), "tokens", V=5, d_out=11)
    return Engine(model["model_dir"], device="cpu", threads=1)


@pytest.mark.parametrize("keep", [False, True])
def test_generate_on_a_model_whose_outputs_are_not_logits_is_refused(wide_engine, keep):
    async def main():
        svc = await started(wide_engine, ServiceLimits(max_new_tokens=100))
        try:
            gen = svc.generate("p", "", [1, 2], 20, seed=0, keep_session=keep)
            with pytest.raises(ModelError, match="d_output=11 is more than its vocab_size=5"):
                await gen.__anext__()
            assert len(svc.store) == 0 and svc.store.stats()["created"] == 0
            assert svc.batcher.stats.steps == svc.batcher.stats.prefills == 0
        finally:
            await svc.batcher.close()

    run(main())


def test_a_rewind_replays_the_inputs_consumed_not_the_callers_array_changed_since(toy_sig):
    """An embedding caller reuses its input buffer after a Step: a later rewind into that
    Step must still equal the state the session had (a history that kept views of the caller's
    rows would replay the overwritten values)."""
    limits = ServiceLimits(max_tokens_per_request=64, rewind_window=16)
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, toy_sig.d_input)).astype(np.float32)  # [6, d_in]

    async def main():
        svc = await started(toy_sig, limits)
        try:
            s, _ = await svc.create("p")
            buf = rows.copy()  # float32, C-contiguous: the engine takes it as it is
            _, pos = await svc.step("p", s.id, values=buf)
            assert pos == 6
            buf[:] = 1e3  # the caller reuses its buffer
            await svc.rewind("p", s.id, 3)
            return svc.store.read(s).copy(), s.position
        finally:
            await svc.batcher.close()

    state, position = run(main())
    _, expected = toy_sig.prefill(rows[None, :3], toy_sig.new_state())
    assert position == 3
    np.testing.assert_allclose(state, expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["toy_tok", "toy_sig"])
def test_with_rewind_off_no_checkpoint_bytes_are_reported(engine, request):
    """rewind_window=0: checkpoint_bytes_per_session() (ModelInfo.limits) is 0, not
    History.max_bytes(0, ...) = 3 states + a chunk of inputs."""
    eng = request.getfixturevalue(engine)
    store = SessionStore(eng.state_size, capacity=4)
    off = SessionService(eng, store, None, ServiceLimits(rewind_window=0))
    assert off.checkpoint_bytes_per_session() == 0
    assert off.feature_stats()["checkpoint_bytes"] == 0
    on = SessionService(eng, store, None, ServiceLimits(rewind_window=8))
    assert on.checkpoint_bytes_per_session() > 0


def test_service_limits_default_to_the_servers_request_limits():
    limits, config = ServiceLimits(), ServerConfig(model_dir="m")
    assert limits.max_tokens_per_request == config.max_tokens_per_request == 4096
    assert limits.max_new_tokens == config.max_new_tokens == 4096
    assert limits.prefix_cache_scope == config.prefix_cache_scope == "principal"


def test_a_kept_generate_closed_right_after_its_first_token_keeps_its_session(toy_tok):
    """The servicer writes each token before it asks for the next: a consumer that took the
    first token (with the new id) and then closed the generator may be a client that read
    the id and cancelled at once (Ctrl-C after the first token: 11-20% of such calls had
    found their kept session closed). The session stays, as when the generate is read to its
    end; one closed before its first token is undone."""

    async def main():
        svc = await started(toy_tok, ServiceLimits(max_new_tokens=100))
        try:
            gen = svc.generate("p", "", [1, 2, 3], 4, 0.0, keep_session=True)
            sid, _ = await gen.__anext__()
            await gen.aclose()  # cancelled as the first token's write ended
            after_first = [s.id for s in svc.store.sessions("p")]
            whole = [g async for g in svc.generate("p", "", [1, 2, 3], 4, 0.0, keep_session=True)]
            gen = svc.generate("p", "", [1, 2, 3], 4, 0.0, keep_session=True)
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)  # inside the prompt's step: no token handed out yet
            assert len(svc.store.sessions("p")) == 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return sid, after_first, whole[0][0], sorted(s.id for s in svc.store.sessions("p"))
        finally:
            await svc.batcher.close()

    sid, after_first, sid2, live = run(main())
    assert after_first == [sid]
    assert live == sorted([sid, sid2])  # the third, cancelled before its first token: undone
