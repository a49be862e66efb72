"""The in-process API refuses bad input with an error that names the field, and changes
nothing: Engine (step, prefill, generate, states, buffers, slabs), the sampling functions and
SessionService (create, close, step, attach, generate, snapshot, restore, fork, rewind).

After each refusal the states are bit-identical to before, and the next valid call gives
what an untouched twin gives: a second Engine on the same model, or a second session fed
the same inputs."""

from __future__ import annotations

import asyncio
import math
import warnings

import numpy as np
import pytest
from ssmstream.runtime import Engine, Sampler, SamplingConfig, SessionStore, sample
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.errors import (
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    SessionBusy,
    SessionNotFound,
)
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.slab import StateSlab
from ssmstream.runtime.snapshots import SnapshotKey

V, S = 11, 8  # the toy models' vocabulary and state size (tests/runtime/conftest.py)
LIMITS = ServiceLimits(max_tokens_per_request=8, max_new_tokens=16, max_ttl=60.0, rewind_window=16)


def named(error: BaseException, field: str) -> None:
    """The refusal names `field` first (InvalidInput.field, or "field: ..." in its words)."""
    assert str(error).startswith(f"{field}: "), error
    if isinstance(error, InvalidInput):
        assert error.field == field


@pytest.fixture(scope="module")
def twin_tok(toy_token_model):
    """A second engine on the token toy: the reference an engine after refusals must equal."""
    return Engine(toy_token_model["model_dir"], device="cpu", threads=1)


@pytest.fixture(scope="module")
def twin_sig(toy_signal_model):
    return Engine(toy_signal_model["model_dir"], device="cpu", threads=1)


def some_state(batch: int = 1) -> np.ndarray:
    return (np.random.default_rng(7).standard_normal((batch, S)) * 0.5).astype(np.float32)


# --- Engine: token model ------------------------------------------------------------------

P = pytest.param
NAN, INF = math.nan, math.inf

# (call(eng, s: states [1, S], g: a generate state [S]), the field its refusal names)
TOKEN_ENGINE = [
    P(lambda e, s, g: e.step(np.array([1.0]), s), "inputs", id="step-float-token"),
    P(lambda e, s, g: e.step([True], s), "inputs", id="step-bool-token"),
    P(lambda e, s, g: e.step(np.array([1], dtype=object), s), "inputs", id="step-object-array"),
    P(lambda e, s, g: e.step("1", s), "inputs", id="step-string"),
    P(lambda e, s, g: e.step(b"\xff", s), "inputs", id="step-bytes-past-vocab"),  # byte 255
    P(lambda e, s, g: e.step(None, s), "inputs", id="step-none"),
    P(lambda e, s, g: e.step(np.float32(1), s), "inputs", id="step-numpy-float-scalar"),
    P(lambda e, s, g: e.step([[1]], s), "inputs", id="step-2d"),
    P(lambda e, s, g: e.step([], s), "inputs", id="step-empty"),
    P(lambda e, s, g: e.step([-1], s), "inputs", id="step-negative"),
    P(lambda e, s, g: e.step([V], s), "inputs", id="step-vocab-size"),
    P(lambda e, s, g: e.step([2**63], s), "inputs", id="step-2**63"),
    P(lambda e, s, g: e.step(np.array([2**63], np.uint64), s), "inputs", id="step-uint64-2**63"),
    P(lambda e, s, g: e.step([2**64], s), "inputs", id="step-2**64"),
    P(lambda e, s, g: e.step([1, 2.5], np.repeat(s, 2, 0)), "inputs", id="step-mixed-list"),
    P(lambda e, s, g: e.step([1, True], np.repeat(s, 2, 0)), "inputs", id="step-bool-in-list"),
    P(lambda e, s, g: e.step([1], s[0]), "states", id="states-1d"),
    P(lambda e, s, g: e.step([1, 2], s), "states", id="states-batch-mismatch"),
    P(lambda e, s, g: e.step([1], s.astype(np.int64)), "states", id="states-int"),
    P(lambda e, s, g: e.step([1], s.astype(complex)), "states", id="states-complex"),
    P(lambda e, s, g: e.step([1], s.astype(object)), "states", id="states-object"),
    P(lambda e, s, g: e.step([1], s > 0), "states", id="states-bool"),
    P(lambda e, s, g: e.step([1], "x"), "states", id="states-string"),
    P(lambda e, s, g: e.step([1], np.full((1, S), 1e39)), "states", id="states-float32-overflow"),
    P(lambda e, s, g: e.step([1], s, out=5), "out", id="out-not-buffers"),
    P(
        lambda e, s, g: e.step([1, 2], np.repeat(s, 2, 0), out=e.step_buffers(1)),
        "out",
        id="out-too-small",
    ),
    P(lambda e, s, g: e.prefill([1, 2], s), "inputs", id="prefill-1d"),
    P(lambda e, s, g: e.prefill(np.zeros((1, 0), np.int64), s), "inputs", id="prefill-empty"),
    P(lambda e, s, g: e.prefill([[1.0, 2.0]], s), "inputs", id="prefill-float"),
    P(lambda e, s, g: e.prefill([[1, 2, 3, 4, 5, V]], s), "inputs", id="prefill-last-oov"),
    P(lambda e, s, g: e.prefill([[1, 2], [1]], np.repeat(s, 2, 0)), "inputs", id="prefill-ragged"),
    P(
        lambda e, s, g: e.prefill([[1]], s.astype(np.float64) * 1e39),
        "states",
        id="prefill-states-overflow",
    ),
    P(lambda e, s, g: e.new_state(0), "batch", id="new_state-0"),
    P(lambda e, s, g: e.new_state(1.0), "batch", id="new_state-float"),
    P(lambda e, s, g: e.new_state(True), "batch", id="new_state-bool"),
    P(lambda e, s, g: e.new_state(2**62), "batch", id="new_state-huge"),
    P(lambda e, s, g: e.step_buffers(0), "max_batch", id="step_buffers-0"),
    P(lambda e, s, g: e.step_buffers(2**50), "max_batch", id="step_buffers-huge"),
    P(lambda e, s, g: e.new_slab(-1), "capacity", id="new_slab-negative"),
    P(lambda e, s, g: e.new_slab("2"), "capacity", id="new_slab-string"),
    P(lambda e, s, g: e.step_slots([1, 2], [0, 0], e.new_slab(4)), "slots", id="slots-twice"),
    P(lambda e, s, g: e.step_slots([1], [4], e.new_slab(4)), "slots", id="slots-past-capacity"),
    P(lambda e, s, g: e.step_slots([1], [0.0], e.new_slab(4)), "slots", id="slots-float"),
    P(lambda e, s, g: e.step_slots([1], [0], "slab"), "slab", id="slab-not-a-slab"),
]


def gen(**kwargs):
    """A generate call for TOKEN_ENGINE: the given arguments over valid ones."""

    def call(e, s, g):
        args = dict(prompt=[1, 2], state=g, max_new_tokens=3, seed=0) | kwargs
        return list(e.generate(**args))

    return call


TOKEN_ENGINE += [
    P(gen(prompt=[]), "prompt", id="prompt-empty"),
    P(gen(prompt=[[1]]), "prompt", id="prompt-2d"),
    P(gen(prompt=1.0), "prompt", id="prompt-float"),
    P(gen(prompt=True), "prompt", id="prompt-bool"),
    P(gen(prompt=None), "prompt", id="prompt-none"),
    P(gen(prompt=np.array(3)), "prompt", id="prompt-0d-array"),
    P(gen(prompt=[1, -1]), "prompt", id="prompt-negative"),
    P(gen(prompt=[V]), "prompt", id="prompt-vocab-size"),
    P(gen(prompt=[1, "2"]), "prompt", id="prompt-mixed"),
    P(gen(max_new_tokens=-1), "max_new_tokens", id="max_new_tokens-negative"),
    P(gen(max_new_tokens=2.0), "max_new_tokens", id="max_new_tokens-float"),
    P(gen(max_new_tokens=None), "max_new_tokens", id="max_new_tokens-none"),
    P(gen(max_new_tokens=True), "max_new_tokens", id="max_new_tokens-bool"),
    P(gen(temperature=-1), "temperature", id="temperature-negative"),
    P(gen(temperature=NAN), "temperature", id="temperature-nan"),
    P(gen(temperature=INF), "temperature", id="temperature-inf"),
    P(gen(temperature="1"), "temperature", id="temperature-string"),
    P(gen(top_p=1.5), "top_p", id="top_p-1.5"),
    P(gen(top_p=NAN), "top_p", id="top_p-nan"),
    P(gen(top_p=-0.1), "top_p", id="top_p-negative"),
    P(gen(top_k=-1), "top_k", id="top_k-negative"),
    P(gen(top_k=V + 1), "top_k", id="top_k-past-vocab"),
    P(gen(top_k=2**70), "top_k", id="top_k-huge"),
    P(gen(top_k=1.0), "top_k", id="top_k-float"),
    P(gen(seed=-1), "seed", id="seed-negative"),
    P(gen(seed=1.0), "seed", id="seed-float"),
    P(gen(seed="1"), "seed", id="seed-string"),
    P(gen(seed=True), "seed", id="seed-bool"),
    P(gen(stop=3), "stop", id="stop-int"),
    P(gen(stop=[V]), "stop", id="stop-vocab-size"),
    P(gen(stop=[1.0]), "stop", id="stop-float"),
    P(gen(stop=[True]), "stop", id="stop-bool"),
    P(gen(state=np.zeros(S)), "state", id="state-float64"),
    P(gen(state=np.zeros(S, np.float32)[None].repeat(2, 0)), "state", id="state-2-rows"),
    P(gen(state=np.zeros(2 * S, np.float32)[::2]), "state", id="state-not-contiguous"),
    P(gen(state=np.frombuffer(bytes(4 * S), np.float32)), "state", id="state-read-only"),
    P(gen(state=np.full(S, NAN, np.float32)), "state", id="state-nan"),
    P(gen(state=np.full(S, -INF, np.float32)), "state", id="state-inf"),
]


@pytest.mark.parametrize("call, field", TOKEN_ENGINE)
def test_engine_refuses_bad_token_input_naming_the_field_and_stays_usable(
    toy_tok, twin_tok, call, field
):
    eng = toy_tok
    s = some_state()  # [1, S]
    g = s[0].copy()  # [S]: generate's state, updated in place by a valid call
    before_s, before_g = s.tobytes(), g.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning on the way to the refusal
        with pytest.raises(InvalidInput) as e:
            call(eng, s, g)
    named(e.value, field)
    assert s.tobytes() == before_s and g.tobytes() == before_g
    # the engine goes on as an untouched one
    y, s1 = eng.step(np.array([3]), s)
    want_y, want_s1 = twin_tok.step(np.array([3]), s.copy())
    assert y.tobytes() == want_y.tobytes() and s1.tobytes() == want_s1.tobytes()
    twin_g = g.copy()
    tokens = list(eng.generate([1, 2], state=g, max_new_tokens=3, seed=5))
    assert tokens == list(twin_tok.generate([1, 2], state=twin_g, max_new_tokens=3, seed=5))
    assert g.tobytes() == twin_g.tobytes()


# --- Engine: values model -----------------------------------------------------------------

VALUE_ENGINE = [
    P(lambda e, s: e.step(np.array([[1.0, NAN, 0.0]]), s), "inputs", id="nan"),
    P(lambda e, s: e.step(np.array([[1.0, -INF, 0.0]]), s), "inputs", id="inf"),
    P(lambda e, s: e.step(np.array([[1e39, 0.0, 0.0]]), s), "inputs", id="float32-overflow"),
    P(lambda e, s: e.step(np.ones((1, 4)), s), "inputs", id="wrong-d_input"),
    P(lambda e, s: e.step(np.ones(3), s), "inputs", id="1d"),
    P(lambda e, s: e.step(np.float32(1), s), "inputs", id="numpy-scalar"),
    P(lambda e, s: e.step(np.ones((0, 3)), s), "inputs", id="empty"),
    P(lambda e, s: e.step(np.ones((1, 3), bool), s), "inputs", id="bool"),
    P(lambda e, s: e.step(np.ones((1, 3), complex), s), "inputs", id="complex"),
    P(lambda e, s: e.step([["1", "2", "3"]], s), "inputs", id="strings"),
    P(lambda e, s: e.step(np.array([[1.0, None, 2.0]], object), s), "inputs", id="object"),
    P(lambda e, s: e.step([[1.0, 2.0, True]], s), "inputs", id="bool-in-list"),
    P(lambda e, s: e.step([[2**70, 0, 0]], s), "inputs", id="int-beyond-int64"),
    P(
        lambda e, s: e.prefill(np.r_[np.ones((4, 3)), [[0, 0, NAN]]][None], s),
        "inputs",
        id="prefill-nan-at-the-end",
    ),
    P(lambda e, s: e.prefill(np.ones((1, 0, 3)), s), "inputs", id="prefill-empty"),
    P(lambda e, s: e.generate([1]), "prompt", id="generate"),
]


@pytest.mark.parametrize("call, field", VALUE_ENGINE)
def test_engine_refuses_bad_values_naming_the_field_and_stays_usable(
    toy_sig, twin_sig, call, field
):
    eng = toy_sig
    s = some_state()
    before = s.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput) as e:
            call(eng, s)
    named(e.value, field)
    assert s.tobytes() == before
    u = np.linspace(-1, 1, 15, dtype=np.float32).reshape(1, 5, 3)  # [1, T, d_in]
    y, s1 = eng.prefill(u, s)
    want_y, want_s1 = twin_sig.prefill(u, s.copy())
    assert y.tobytes() == want_y.tobytes() and s1.tobytes() == want_s1.tobytes()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"device": "gpu"}, "device"),
        ({"device": None}, "device"),
        ({"threads": 0}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"step_threads": -1}, "step_threads"),
        ({"cuda_options": {"nope": 1}}, "cuda_options"),
        ({"cuda_options": "x"}, "cuda_options"),
    ],
)
def test_engine_options_are_refused_naming_the_option(toy_token_model, kwargs, field):
    with pytest.raises(InvalidInput) as e:
        Engine(toy_token_model["model_dir"], **({"device": "cpu"} | kwargs))
    named(e.value, field)


def test_refused_slot_steps_leave_every_row_of_the_slab_as_it_was(toy_tok, twin_tok):
    eng = toy_tok
    slab = eng.new_slab(4)
    eng.step_slots([1, 2, 3, 4], [0, 1, 2, 3], slab)  # every row non-zero
    rows = slab.array.copy()
    for inputs, slots, field in (
        ([1, 2], [0, 0], "slots"),
        ([1, 2], [0, 4], "slots"),
        ([1, 2], [0, -1], "slots"),
        ([1, 2], [0], "slots"),
        ([1, 2], [0.0, 1.0], "slots"),
        ([1, 2], [0, True], "slots"),
        ([1, V], [0, 1], "inputs"),
        ([1, -1], [0, 1], "inputs"),
        ([1.0, 2.0], [0, 1], "inputs"),
    ):
        with pytest.raises(InvalidInput) as e:
            eng.step_slots(inputs, slots, slab, out=eng.step_buffers(2))
        named(e.value, field)
        assert slab.array.tobytes() == rows.tobytes()
    y = eng.step_slots([5, 6], [2, 0], slab)
    want_y, want = twin_tok.step(np.array([5, 6]), rows[[2, 0]])
    assert y.tobytes() == want_y.tobytes()
    assert slab.array[[2, 0]].tobytes() == want.tobytes()
    assert slab.array[[1, 3]].tobytes() == rows[[1, 3]].tobytes()


def test_generate_feeds_the_prompt_it_checked_not_what_the_caller_writes_after(toy_tok):
    """generate checks its prompt when called and feeds it at the first next(): a token the
    caller writes into its array in between (its buffer reused) is never fed unchecked
    (−1 was fed as the last token of the vocabulary, an id past it failed in onnxruntime)."""
    want = list(toy_tok.generate([1, 2], max_new_tokens=4, temperature=0.0))
    for written in (-1, V, 4):
        prompt = np.array([1, 2], dtype=np.int64)
        tokens = toy_tok.generate(prompt, max_new_tokens=4, temperature=0.0)
        prompt[0] = written
        assert list(tokens) == want


def test_a_state_beyond_float32_range_is_refused_not_turned_into_inf(toy_tok):
    """A float64 state is converted to float32; one beyond float32's range became ±inf with
    numpy's overflow warning, and the step ran on it."""
    s = np.zeros((1, S))
    s[0, 3] = -4e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput, match=r"^states: .*float32 range"):
            toy_tok.step([1], s)
        with pytest.raises(InvalidInput, match=r"^states: .*float32 range"):
            toy_tok.prefill([[1, 2]], s)
    y, s1 = toy_tok.step([1], np.zeros((1, S)) + 3e38)  # within range: converted
    assert np.isfinite(s1).all() and np.isfinite(y).all()


# --- sampling ---------------------------------------------------------------------------

SAMPLING = [
    P(lambda: sample([[1.0], [1.0, 2.0]]), "logits", id="ragged-logits"),
    P(lambda: sample([1.0, True]), "logits", id="bool-among-logits"),
    P(lambda: sample(np.array([1, 2])), "logits", id="int-logits"),
    P(lambda: sample(np.zeros((2, 2))), "logits", id="2d-logits"),
    P(lambda: sample(np.zeros(0)), "logits", id="empty-logits"),
    P(lambda: sample(np.array([NAN, 1.0])), "logits", id="nan-logits"),
    P(lambda: sample(np.array([1.0, 2.0]), rng="x"), "rng", id="rng-string"),
    P(lambda: sample(np.array([1.0, 2.0]), rng=5), "rng", id="rng-int"),
    P(lambda: sample(np.array([1.0, 2.0]), temperature=NAN), "temperature", id="temperature"),
    P(lambda: Sampler("x"), "config", id="sampler-config-string"),
    P(lambda: Sampler({"temperature": 0.0}), "config", id="sampler-config-dict"),
    P(lambda: SamplingConfig(top_p=2), "top_p", id="config-top_p"),
    P(lambda: SamplingConfig(top_k=-1), "top_k", id="config-top_k"),
    P(lambda: SamplingConfig(seed=-1), "seed", id="config-seed"),
    P(lambda: StateSlab(1, S, device_id="x"), "device_id", id="slab-device_id"),
]


@pytest.mark.parametrize("call, field", SAMPLING)
def test_sampling_and_slab_arguments_are_refused_naming_the_field(call, field):
    with pytest.raises(InvalidInput) as e:
        call()
    named(e.value, field)


def test_sample_with_a_generator_is_reproducible():
    z = np.array([0.1, 0.5, 0.2, 0.9])
    a = [sample(z, rng=np.random.default_rng(3)) for _ in range(5)]
    assert a == [sample(z, rng=np.random.default_rng(3)) for _ in range(5)]
    assert Sampler(SamplingConfig(seed=3))(z) == Sampler(SamplingConfig(seed=3))(z)


# --- SessionService ---------------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(
    engine, limits: ServiceLimits = LIMITS, clock=None, delay: float = 0.0
) -> SessionService:
    store = SessionStore(
        engine.state_size,
        capacity=8,
        model_sha=engine.info["step_sha256"],
        **({"clock": clock} if clock else {}),
    )
    batcher = Batcher(engine, store, max_batch=4, max_batch_delay=delay)
    await batcher.start()
    return SessionService(engine, store, batcher, limits)


async def attempt(call) -> None:
    r = call()
    if hasattr(r, "__anext__"):
        async for _ in r:
            pass
    elif asyncio.iscoroutine(r):
        await r


def account(svc: SessionService, *sessions) -> tuple:
    """Everything a refused request must leave as it was: each session's signed bytes
    (state and position), the store's sessions and free slots, the attachments."""
    stats = svc.store.stats()
    snaps = tuple(svc.store.snapshot(s.id, "p") for s in sessions)
    counts = (stats["sessions"], stats["free"], stats["created"], stats["restored"])
    return snaps, counts, stats["forked"], svc.attached, svc.open_streams


async def twins(svc: SessionService, inputs: dict) -> tuple:
    """Two sessions fed the same inputs (a prompt, then two requests): the one a request is
    refused on, and its untouched twin."""
    pair = []
    for _ in range(2):
        if "tokens" in inputs:
            s, _ = await svc.create("p", prompt=[1, 2, 3, 4, 5, 6, 7])
            for _ in range(2):
                await svc.step("p", s.id, inputs["tokens"])
        else:
            s, _ = await svc.create("p")
            for _ in range(3):
                await svc.step("p", s.id, values=inputs["values"])
        pair.append(s)
    return tuple(pair)


async def same_as_twin(svc, a, b, inputs: dict) -> None:
    """a and b step alike and end bit-identical."""
    ya, pa = await svc.step("p", a.id, **inputs)
    yb, pb = await svc.step("p", b.id, **inputs)
    assert pa == pb and ya.tobytes() == yb.tobytes()
    assert svc.store.snapshot(a.id, "p") == svc.store.snapshot(b.id, "p")


def snap_of(svc, a):
    return svc.store.snapshot(a.id, "p")


def flipped(data: bytes, i: int) -> bytes:
    d = bytearray(data)
    d[i] ^= 0x10
    return bytes(d)


def other_model(svc, a):
    """The session's bytes as a model with another sha (same S, same key) signs them."""
    store = SessionStore(S, model_sha="f" * 64, snapshot_key=svc.store.snapshot_key)
    return store.pack_state(svc.store.read(a), a.position)


def other_key(svc, a):
    store = SessionStore(S, model_sha=svc.store.model_sha, snapshot_key=SnapshotKey.generate())
    return store.pack_state(svc.store.read(a), a.position)


def generate(a=None, **kwargs):
    """A Generate call: the given arguments over valid ones (on session `a` when given)."""

    def call(svc, s):
        args = dict(session_id=s.id if a is None else a, prompt=[1], max_new_tokens=2) | kwargs
        return svc.generate("p", **args)

    return call


# (call(svc, a), the error type, the field it names or None)
SERVICE = [
    P(lambda v, a: v.create("p", "bad id!"), InvalidInput, "session_id", id="create-bad-id"),
    P(lambda v, a: v.create("p", 5), InvalidInput, "session_id", id="create-int-id"),
    P(lambda v, a: v.create("p", a.id), InvalidInput, "session_id", id="create-id-in-use"),
    P(lambda v, a: v.create("p", ttl=-1), InvalidInput, "ttl", id="ttl-negative"),
    P(lambda v, a: v.create("p", ttl=NAN), InvalidInput, "ttl", id="ttl-nan"),
    P(lambda v, a: v.create("p", ttl=INF), InvalidInput, "ttl", id="ttl-inf"),
    P(lambda v, a: v.create("p", ttl=61), InvalidInput, "ttl", id="ttl-past-max"),
    P(lambda v, a: v.create("p", ttl="1"), InvalidInput, "ttl", id="ttl-string"),
    P(lambda v, a: v.create("p", ttl=True), InvalidInput, "ttl", id="ttl-bool"),
    P(lambda v, a: v.create(None), InvalidInput, "principal", id="create-principal-none"),
    P(lambda v, a: v.create("p", prompt=[1.0]), InvalidInput, "prompt", id="prompt-float"),
    P(lambda v, a: v.create("p", prompt=[1, -1]), InvalidInput, "prompt", id="prompt-negative"),
    P(lambda v, a: v.create("p", prompt=[V]), InvalidInput, "prompt", id="prompt-vocab-size"),
    P(lambda v, a: v.create("p", prompt=[[1]]), InvalidInput, "prompt", id="prompt-2d"),
    P(lambda v, a: v.create("p", prompt="ab"), InvalidInput, "prompt", id="prompt-string"),
    P(lambda v, a: v.create("p", prompt=[1, True]), InvalidInput, "prompt", id="prompt-bool"),
    P(lambda v, a: v.create("p", prompt=[1] * 9), LimitExceeded, "prompt", id="prompt-too-long"),
    P(
        lambda v, a: v.create("p", prompt=[1], snapshot=snap_of(v, a)),
        InvalidInput,
        "prompt",
        id="prompt-and-snapshot",
    ),
    P(
        lambda v, a: v.create("p", prompt=[1], handed_out=5),
        TypeError,
        "handed_out",
        id="create-handed_out-not-callable",
    ),
    P(lambda v, a: v.close("p", "nope"), SessionNotFound, None, id="close-unknown"),
    P(lambda v, a: v.close("p", None), InvalidInput, "session_id", id="close-none"),
    P(lambda v, a: v.close("q", a.id), SessionNotFound, None, id="close-other-principal"),
    P(lambda v, a: v.step("p", None, [1]), InvalidInput, "session_id", id="step-id-none"),
    P(lambda v, a: v.step("p", "", [1]), InvalidInput, "session_id", id="step-id-empty"),
    P(lambda v, a: v.step("p", 5, [1]), InvalidInput, "session_id", id="step-id-int"),
    P(lambda v, a: v.step("p", "bad id!", [1]), InvalidInput, "session_id", id="step-bad-id"),
    P(lambda v, a: v.step("p", "nope", [1]), SessionNotFound, None, id="step-unknown"),
    P(lambda v, a: v.step("q", a.id, [1]), SessionNotFound, None, id="step-other-principal"),
    P(lambda v, a: v.step("p", a.id, [1.0]), InvalidInput, "tokens", id="tokens-float"),
    P(lambda v, a: v.step("p", a.id, [True]), InvalidInput, "tokens", id="tokens-bool"),
    P(lambda v, a: v.step("p", a.id, "1"), InvalidInput, "tokens", id="tokens-string"),
    P(
        lambda v, a: v.step("p", a.id, np.array([1], object)),
        InvalidInput,
        "tokens",
        id="tokens-object",
    ),
    P(lambda v, a: v.step("p", a.id, [[1, 2]]), InvalidInput, "tokens", id="tokens-2d"),
    P(lambda v, a: v.step("p", a.id, [1, -1]), InvalidInput, "tokens", id="tokens-negative"),
    P(lambda v, a: v.step("p", a.id, [V]), InvalidInput, "tokens", id="tokens-vocab-size"),
    P(lambda v, a: v.step("p", a.id, [2**63]), InvalidInput, "tokens", id="tokens-2**63"),
    P(lambda v, a: v.step("p", a.id, []), InvalidInput, "tokens", id="tokens-empty"),
    P(lambda v, a: v.step("p", a.id, None), InvalidInput, "tokens", id="tokens-none"),
    P(lambda v, a: v.step("p", a.id, [1] * 9), LimitExceeded, "tokens", id="tokens-too-many"),
    P(lambda v, a: v.step("p", a.id, [1], [1.0]), InvalidInput, "values", id="values-to-tokens"),
    P(lambda v, a: v.rewind("p", a.id, -1), InvalidInput, "position", id="rewind-negative"),
    P(lambda v, a: v.rewind("p", a.id, 20.0), InvalidInput, "position", id="rewind-float"),
    P(lambda v, a: v.rewind("p", a.id, None), InvalidInput, "position", id="rewind-none"),
    P(lambda v, a: v.rewind("p", a.id, True), InvalidInput, "position", id="rewind-bool"),
    P(lambda v, a: v.rewind("p", a.id, "20"), InvalidInput, "position", id="rewind-string"),
    P(lambda v, a: v.rewind("p", a.id, 24), OutOfRange, "position", id="rewind-ahead"),
    P(lambda v, a: v.rewind("p", a.id, 2**63), OutOfRange, "position", id="rewind-2**63"),
    P(lambda v, a: v.rewind("p", a.id, 2), OutOfRange, "position", id="rewind-out-of-window"),
    P(lambda v, a: v.rewind("p", "nope", 2), SessionNotFound, None, id="rewind-unknown"),
    P(lambda v, a: v.snapshot("p", "nope"), SessionNotFound, None, id="snapshot-unknown"),
    P(lambda v, a: v.snapshot("q", a.id), SessionNotFound, None, id="snapshot-other-principal"),
    P(lambda v, a: v.snapshot("p", 5), InvalidInput, "session_id", id="snapshot-int-id"),
    P(lambda v, a: v.restore("p", b""), InvalidInput, "snapshot", id="restore-empty"),
    P(lambda v, a: v.restore("p", None), InvalidInput, "snapshot", id="restore-none"),
    P(lambda v, a: v.restore("p", "x"), InvalidInput, "snapshot", id="restore-string"),
    P(
        lambda v, a: v.restore("p", snap_of(v, a)[:-1]),
        InvalidInput,
        "snapshot",
        id="restore-truncated-by-one",
    ),
    P(
        lambda v, a: v.restore("p", snap_of(v, a)[:20]),
        InvalidInput,
        "snapshot",
        id="restore-cut-in-header",
    ),
    P(
        lambda v, a: v.restore("p", snap_of(v, a) + b"\0"),
        InvalidInput,
        "snapshot",
        id="restore-appended",
    ),
    P(
        lambda v, a: v.restore("p", flipped(snap_of(v, a), 60)),
        InvalidInput,
        "snapshot",
        id="restore-bit-flipped-state",
    ),
    P(
        lambda v, a: v.restore("p", flipped(snap_of(v, a), 14)),
        InvalidInput,
        "snapshot",
        id="restore-bit-flipped-size",
    ),
    P(
        lambda v, a: v.restore("p", other_key(v, a)),
        InvalidInput,
        "snapshot",
        id="restore-another-key",
    ),
    P(lambda v, a: v.restore("p", other_model(v, a)), ModelError, None, id="restore-another-model"),
    P(
        lambda v, a: v.restore("p", v.store.pack_state(np.full(S, NAN, np.float32), 3)),
        InvalidInput,
        "snapshot",
        id="restore-nan-state",
    ),
    P(
        lambda v, a: v.restore("p", snap_of(v, a), a.id),
        InvalidInput,
        "session_id",
        id="restore-id-in-use",
    ),
    P(lambda v, a: v.fork("p", "nope"), SessionNotFound, None, id="fork-unknown"),
    P(lambda v, a: v.fork("p", a.id, "bad id!"), InvalidInput, "new_session_id", id="fork-bad-id"),
    P(lambda v, a: v.fork("p", a.id, 5), InvalidInput, "new_session_id", id="fork-int-id"),
    P(lambda v, a: v.fork("p", a.id, a.id), InvalidInput, "new_session_id", id="fork-id-in-use"),
    P(generate(max_new_tokens=0), InvalidInput, "max_new_tokens", id="generate-0-tokens"),
    P(generate(max_new_tokens=17), InvalidInput, "max_new_tokens", id="generate-past-max"),
    P(generate(max_new_tokens=1.0), InvalidInput, "max_new_tokens", id="generate-float-count"),
    P(generate(temperature=-1), InvalidInput, "temperature", id="generate-temperature-negative"),
    P(generate(temperature=NAN), InvalidInput, "temperature", id="generate-temperature-nan"),
    P(generate(top_p=1.5), InvalidInput, "top_p", id="generate-top_p-1.5"),
    P(generate(top_p=NAN), InvalidInput, "top_p", id="generate-top_p-nan"),
    P(generate(top_k=-1), InvalidInput, "top_k", id="generate-top_k-negative"),
    P(generate(top_k=V + 1), InvalidInput, "top_k", id="generate-top_k-past-vocab"),
    P(generate(top_k=2**70), InvalidInput, "top_k", id="generate-top_k-huge"),
    P(generate(seed=-1), InvalidInput, "seed", id="generate-seed-negative"),
    P(generate(seed="1"), InvalidInput, "seed", id="generate-seed-string"),
    P(generate(seed=2**64 + 0.5), InvalidInput, "seed", id="generate-seed-float"),
    P(generate(stop=[V]), InvalidInput, "stop", id="generate-stop-vocab-size"),
    P(generate(stop=3), InvalidInput, "stop", id="generate-stop-int"),
    P(generate(stop=[1.0]), InvalidInput, "stop", id="generate-stop-float"),
    P(generate(prompt=[]), InvalidInput, "prompt", id="generate-prompt-empty"),
    P(generate(prompt=[1.0]), InvalidInput, "prompt", id="generate-prompt-float"),
    P(generate(prompt=[1] * 9), LimitExceeded, "prompt", id="generate-prompt-too-long"),
    P(generate(prompt=None), InvalidInput, "prompt", id="generate-prompt-none"),
    P(generate("bad id!"), InvalidInput, "session_id", id="generate-bad-id"),
    P(generate("nope"), SessionNotFound, None, id="generate-unknown"),
    P(
        lambda v, a: v.generate("q", a.id, [1], 2),
        SessionNotFound,
        None,
        id="generate-other-principal",
    ),
    P(generate("", handed_out=5), TypeError, "handed_out", id="generate-handed_out-not-callable"),
    P(
        lambda v, a: v.attach("p", on_drain=5),
        TypeError,
        "on_drain",
        id="attach-on_drain-not-callable",
    ),
]


@pytest.mark.parametrize("call, exc, field", SERVICE)
def test_service_refuses_bad_requests_naming_the_field_and_changes_nothing(
    toy_tok, call, exc, field
):
    async def main():
        svc = await started(toy_tok)
        try:
            a, b = await twins(svc, {"tokens": [3, 1, 4, 1, 5, 9, 2, 6]})  # at position 23
            assert a.position == 23
            before = account(svc, a, b)
            with pytest.raises(exc) as e:
                await attempt(lambda: call(svc, a))
            if field is not None:
                named(e.value, field)
            assert account(svc, a, b) == before
            await same_as_twin(svc, a, b, {"tokens": [2, 7]})
            await svc.rewind("p", a.id, 20)  # the history was kept as the twin's
            await svc.rewind("p", b.id, 20)
            assert snap_of(svc, a) == snap_of(svc, b)
        finally:
            await svc.batcher.close()

    run(main())


VALUE_SERVICE = [
    P(lambda v, a: v.step("p", a.id, values=[1.0, NAN, 0.0]), "values", id="nan"),
    P(lambda v, a: v.step("p", a.id, values=[[1.0, 0.0, -INF]]), "values", id="inf"),
    P(lambda v, a: v.step("p", a.id, values=[1e39, 0.0, 0.0]), "values", id="float32-overflow"),
    P(lambda v, a: v.step("p", a.id, values=[1.0, 2.0]), "values", id="not-a-multiple-of-d_input"),
    P(lambda v, a: v.step("p", a.id, values=np.ones((2, 2))), "values", id="wrong-row-width"),
    P(lambda v, a: v.step("p", a.id, values=np.ones((1, 1, 3))), "values", id="3d"),
    P(lambda v, a: v.step("p", a.id, values=["a", "b", "c"]), "values", id="strings"),
    P(lambda v, a: v.step("p", a.id, values=[1.0, True, 0.0]), "values", id="bool"),
    P(lambda v, a: v.step("p", a.id, values=[[1.0, 2.0, 3.0], [1.0]]), "values", id="ragged"),
    P(lambda v, a: v.step("p", a.id, values=np.ones((9, 3))), "values", id="too-many-rows"),
    P(lambda v, a: v.step("p", a.id, values=[]), "values", id="empty"),
    P(lambda v, a: v.step("p", a.id, [1], [1.0, 2.0, 3.0]), "tokens", id="tokens-to-values"),
    P(lambda v, a: v.create("p", prompt=[1]), "prompt", id="prompt-to-values"),
]


@pytest.mark.parametrize("call, field", VALUE_SERVICE)
def test_service_refuses_bad_values_naming_the_field_and_changes_nothing(toy_sig, call, field):
    rows = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)

    async def main():
        svc = await started(toy_sig)
        try:
            a, b = await twins(svc, {"values": rows})
            before = account(svc, a, b)
            with pytest.raises((InvalidInput, LimitExceeded)) as e:
                await attempt(lambda: call(svc, a))
            named(e.value, field)
            assert account(svc, a, b) == before
            await same_as_twin(svc, a, b, {"values": rows[::-1].copy()})
        finally:
            await svc.batcher.close()

    run(main())


def test_generate_on_a_values_model_is_refused_before_anything_is_made(toy_sig):
    async def main():
        svc = await started(toy_sig)
        try:
            before = account(svc)
            with pytest.raises(ModelError, match="token model"):
                await attempt(lambda: svc.generate("p", "", [1], 2))
            assert account(svc) == before
        finally:
            await svc.batcher.close()

    run(main())


def test_closed_and_evicted_sessions_are_not_found_by_every_operation(toy_tok):
    now = [0.0]

    async def main():
        svc = await started(toy_tok, clock=lambda: now[0])
        try:
            a, b = await twins(svc, {"tokens": [1, 2]})
            closed, _ = await svc.create("p", prompt=[1, 2])
            idle, _ = await svc.create("p", prompt=[1, 2], ttl=5.0)
            await svc.close("p", closed.id)
            now[0] = 6.0  # `idle` is past its TTL
            before = account(svc, a, b)
            for sid, reason in ((closed.id, "closed"), (idle.id, "evicted")):
                for call in (
                    lambda sid: svc.step("p", sid, [1]),
                    lambda sid: svc.rewind("p", sid, 1),
                    lambda sid: svc.snapshot("p", sid),
                    lambda sid: svc.fork("p", sid),
                    lambda sid: svc.close("p", sid),
                    lambda sid: svc.generate("p", sid, [1], 2),
                    lambda sid: svc.attach("p").step(sid, [1]),
                ):
                    with pytest.raises(SessionNotFound) as e:
                        await attempt(lambda: call(sid))  # noqa: B023 (awaited here)
                    assert e.value.reason == reason, (sid, e.value)
                    for x in list(svc._open_attachments):
                        x.detach()
            after = account(svc, a, b)
            assert after[0] == before[0] and after[3:] == (0, 0)
            assert svc.store.stats()["free"] == 8 - 2  # the evicted one's slot came back
            await same_as_twin(svc, a, b, {"tokens": [4]})
        finally:
            await svc.batcher.close()

    run(main())


def test_a_refused_step_of_an_attached_stream_keeps_the_stream_and_its_session(toy_tok):
    """A Stream's bad request is refused; the stream stays attached and steps on as the twin."""

    async def main():
        svc = await started(toy_tok)
        try:
            a, b = await twins(svc, {"tokens": [1, 2]})
            stream = svc.attach("p")
            await stream.step(a.id, [5])
            await svc.step("p", b.id, [5])
            before = account(svc, a, b)
            bad = (([V], InvalidInput), ([1.0], InvalidInput), ([1] * 9, LimitExceeded))
            for tokens, exc in bad:
                with pytest.raises(exc, match=r"^tokens: "):
                    await stream.step(a.id, tokens)
            with pytest.raises(InvalidInput, match=r"^session_id: this stream is attached"):
                await stream.step(b.id, [1])
            for call in (
                lambda: svc.step("p", a.id, [1]),
                lambda: svc.rewind("p", a.id, 20),
                lambda: svc.generate("p", a.id, [1], 2),
                lambda: svc.attach("p").step(a.id, [1]),
            ):
                with pytest.raises(SessionBusy, match="attached to an open Stream"):
                    await attempt(call)
            for other in list(svc._open_attachments - {stream}):
                other.detach()
            assert account(svc, a, b) == before and svc.attached == 1
            ya, _ = await stream.step(a.id, [6])
            yb, _ = await svc.step("p", b.id, [6])
            assert ya.tobytes() == yb.tobytes() and snap_of(svc, a) == snap_of(svc, b)
            stream.detach()
        finally:
            await svc.batcher.close()

    run(main())


@pytest.mark.parametrize("kind", ["tokens", "values"])
def test_a_queued_request_runs_the_inputs_that_were_checked(toy_tok, toy_sig, kind):
    """A request may wait in the batcher's queue (for another active session's step to join
    its batch): what the caller writes into its array meanwhile (a reused buffer) does not
    reach the model (a −1 token was stepped as the last token of the vocabulary; a NaN
    value made the session's state unusable)."""
    eng = toy_tok if kind == "tokens" else toy_sig
    good = np.array([3]) if kind == "tokens" else np.array([[0.5, -0.25, 1.0]], np.float32)
    bad = -1 if kind == "tokens" else NAN

    async def main():
        svc = await started(eng, delay=0.2)
        try:
            ref, _ = await svc.create("p")
            s, _ = await svc.create("p")
            await svc.step("p", ref.id, **{kind: good.copy()})  # ref: active, one step in
            buf = good.copy()
            queued = asyncio.ensure_future(svc.step("p", s.id, **{kind: buf}))
            for _ in range(3):
                await asyncio.sleep(0)  # checked and queued: its batch waits for ref's step
            assert not queued.done() and svc.batcher.pending() == 1
            buf[...] = bad
            _, position = await queued
            assert position == 1 and snap_of(svc, s) == snap_of(svc, ref)
        finally:
            await svc.batcher.close()

    run(main())


def test_commit_refuses_what_is_not_a_session_and_changes_nothing():
    store = SessionStore(S, capacity=2)
    s = store.create("p")
    before = store.snapshot(s.id, "p")
    for session in ("x", None, s.id):
        with pytest.raises(InvalidInput, match=r"^session: must be a Session"):
            store.commit(session, np.ones(S, np.float32), 1)
    assert store.snapshot(s.id, "p") == before and len(store) == 1
