"""Odd Python and numpy values at the in-process API: refused naming the field, with nothing
changed, or taken as the same plain input would be.

- a bool among the numbers of a list is refused (numpy alone makes [65, True] the tokens
  [65, 1]); a pure-bool array already was;
- `stop` given as a 0-d array is refused like a numpy scalar (numpy's "iteration over a
  0-d array" came through);
- one float as `values` of a d_input = 1 model is one row; None / a dict / a generator as
  `values` are refused naming it (an IndexError came through);
- Engine.generate refuses a NaN `state` when called, and non-finite logits in the
  generation loop are CorruptState (the server's DATA_LOSS), not InvalidInput("logits");
- sizes numpy cannot allocate are refused naming the count (batch, max_batch, capacity);
- SessionStore.pack_state takes a list as the array and refuses a non-float state (a NaN
  one it signs: replication writes a state gone bad through; a restore refuses it).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import CorruptState, InvalidInput
from ssmstream.runtime.generation import GenerateConfig, Generation
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab

pytestmark = pytest.mark.timeout(120)

LIMITS = ServiceLimits(max_tokens_per_request=64, max_new_tokens=16)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def refused(field: str, fn, *args, **kw) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        fn(*args, **kw)
    assert e.value.field == field, str(e.value)
    return e.value


# --- a bool among numbers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens", [[3, True], (3, np.True_), [[3, 4], [5, False]], [np.array([1]), np.array([True])]]
)
def test_a_bool_among_tokens_is_refused_not_taken_as_1(toy_tok, tokens):
    e = refused("inputs", toy_tok.check_inputs, tokens, time_axis=np.ndim(tokens) == 2)
    assert "bool" in str(e)
    # the same numbers as ints are tokens: only the bool is refused
    plain = [[int(v) for v in np.ravel(r)] for r in tokens] if np.ndim(tokens) == 2 else None
    if plain is not None:
        assert toy_tok.check_inputs(plain, time_axis=True).tolist() == plain


def test_a_bool_among_values_and_slots_is_refused(toy_sig):
    refused("inputs", toy_sig.check_inputs, [[1.0, True, 0.5]])
    assert toy_sig.check_inputs([[1.0, 1, 0.5]]).tolist() == [[1.0, 1.0, 0.5]]
    slab = StateSlab(4, toy_sig.state_size)
    refused("slots", slab.check_slots, [0, True])
    assert slab.check_slots([0, 1]).tolist() == [[0], [1]]


def test_service_refuses_a_bool_in_tokens_or_a_prompt_and_changes_nothing(toy_tok):
    async def main():
        svc = SessionService(toy_tok, SessionStore(toy_tok.state_size), None, LIMITS)
        s, _ = await svc.create("p", "a")
        before = svc.store.snapshot("a", "p")
        refused("tokens", svc.inputs, [3, True], ())
        with pytest.raises(InvalidInput, match="^prompt: holds a bool"):
            await svc.create("p", "b", prompt=[7, np.True_])
        assert len(svc.store) == 1 and svc.store.snapshot("a", "p") == before

    run(main())


# --- stop as a 0-d array --------------------------------------------------------------------


@pytest.mark.parametrize("stop", [np.array(2), np.int64(2)])
def test_stop_as_a_0d_array_is_refused_like_a_scalar(toy_tok, stop):
    e = refused("stop", GenerateConfig.check, 11, 4, stop=stop)
    assert "must be an iterable of token ids" in str(e)
    state = toy_tok.new_state(1)
    refused("stop", toy_tok.generate, [1, 2], state=state, max_new_tokens=3, stop=stop)
    assert not state.any()
    # a 1-d array and a generator are iterables of ids
    assert GenerateConfig.check(11, 4, stop=np.array([2])).stop == {2}
    assert GenerateConfig.check(11, 4, stop=(t for t in [2, 3])).stop == {2, 3}


# --- values of odd types --------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_input(make_toy, tmp_path_factory):
    model = make_toy(tmp_path_factory.mktemp("toy_one_input"), "values", d_in=1)
    return Engine(model["model_dir"], device="cpu", threads=1)


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.array(0.5)])
def test_one_float_is_one_row_of_a_d_input_1_model(one_input, value):
    svc = SessionService(one_input, SessionStore(one_input.state_size), None, LIMITS)
    x = svc.inputs((), value)
    assert x.dtype == np.float32 and x.tolist() == [[0.5]]


@pytest.mark.parametrize("value", [None, {}, (v for v in [0.5])])
def test_values_that_are_no_numbers_are_refused_naming_values(one_input, value):
    svc = SessionService(one_input, SessionStore(one_input.state_size), None, LIMITS)
    e = refused("values", svc.inputs, (), value)
    assert "must be real numbers" in str(e)


def test_one_float_for_a_wider_input_is_refused(toy_sig):
    svc = SessionService(toy_sig, SessionStore(toy_sig.state_size), None, LIMITS)
    refused("values", svc.inputs, (), 0.5)


# --- non-finite states and logits in generate -----------------------------------------------


def test_generate_refuses_a_nan_state_when_called(toy_tok):
    state = toy_tok.new_state(1)
    state[0, 1] = np.nan
    refused("state", toy_tok.generate, [1, 2], state=state, max_new_tokens=3)
    assert np.isnan(state[0, 1]) and np.count_nonzero(state) == 1  # untouched


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_in_the_generation_loop_are_corrupt_state(bad):
    gen = Generation(GenerateConfig.check(4, 3, seed=0))
    assert gen(np.array([0.0, 1.0, 2.0, 3.0]), 5).index == 0
    with pytest.raises(CorruptState, match="outputs at position 6 are NaN or inf"):
        gen(np.array([0.0, bad, 2.0, 3.0]), 6)
    assert gen.index == 1  # nothing sampled


# --- sizes and pack_state -------------------------------------------------------------------


def test_sizes_numpy_cannot_allocate_are_refused_naming_the_count(toy_sig):
    refused("batch", toy_sig.new_state, 10**20)
    refused("max_batch", toy_sig.step_buffers, 10**20)
    refused("capacity", toy_sig.new_slab, 10**20)
    refused("capacity", SessionStore, toy_sig.state_size, capacity=2**62)


def test_pack_state_takes_a_list_as_the_array_and_refuses_ints(toy_sig):
    store = SessionStore(toy_sig.state_size)
    state = np.linspace(-1, 1, toy_sig.state_size, dtype=np.float32)
    assert store.pack_state(state.tolist(), 3) == store.pack_state(state, 3)
    assert store.restore(store.pack_state(state.tolist(), 3), "r").position == 3
    bad = state.copy()
    bad[2] = np.nan
    with pytest.raises(InvalidInput, match="^snapshot: .*NaN"):
        store.restore(store.pack_state(bad, 3), "n")
    refused("state", store.pack_state, np.arange(toy_sig.state_size), 3)
    refused("state", store.pack_state, state[:-1], 3)


def test_minus_inf_logits_are_a_mask_not_a_corrupt_state():
    gen = Generation(GenerateConfig.check(4, 3, seed=0))
    tokens = {gen(np.array([0.0, -np.inf, 1.0, 2.0]), 5 + i).token for i in range(3)}
    assert 1 not in tokens  # probability 0, as the sampler documents


@pytest.mark.parametrize(
    "value, has",
    [([1, 2, 3], False), ([1, True], True), ((1, (2, (3, np.True_))), True),
     ([[1, 2], [3, 4]], False), ([np.array([1]), np.array([False])], True), (np.array([1]), False),
     ([1.0, 2.5], False), ([], False)],
)  # fmt: skip
def test_holds_bool_looks_inside_nested_lists_and_arrays(value, has):
    from ssmstream.runtime.errors import holds_bool

    assert holds_bool(value) is has


def test_logits_that_are_all_minus_inf_are_a_corrupt_state_not_a_bad_argument():
    gen = Generation(GenerateConfig.check(4, 3, seed=0))
    with pytest.raises(CorruptState):
        gen(np.full(4, -np.inf), 5)
