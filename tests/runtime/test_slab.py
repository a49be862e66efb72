"""The state slab and the slot graph (runtime/slab.py): a slot step equals the plain step of
each session alone, bit for bit; only inputs, slots and outputs move per step; bad slots
never reach onnxruntime; a failed step changes nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest
from faults import inject
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import EngineFailure, InvalidInput, ModelError
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab, identity_model, slot_model

pytestmark = pytest.mark.timeout(300)


def inputs_for(eng: Engine, rng, B: int) -> np.ndarray:
    if eng.input_kind == "tokens":
        return rng.integers(0, eng.vocab_size, size=B)  # [B]
    return rng.standard_normal((B, eng.d_input)).astype(np.float32)  # [B, d_in]


def random_slab(eng: Engine, rng, capacity: int) -> tuple[StateSlab, np.ndarray]:
    slab = eng.new_slab(capacity)
    states = (rng.standard_normal((capacity, eng.state_size)) * 0.3).astype(np.float32)
    for row, state in enumerate(states):
        slab.write(row, state)
    return slab, states  # [capacity, S]


# --- the slot graph --------------------------------------------------------------------


def test_the_slot_graph_is_the_step_graph_with_a_gather_before_and_a_scatter_after(tok_engine):
    step = (tok_engine.model_dir / "step.onnx").read_bytes()
    m = onnx.load_from_string(slot_model(step, tok_engine.state_size))
    onnx.checker.check_model(m, full_check=True)  # valid, topologically sorted, shapes agree
    plain = onnx.load_from_string(step)
    assert [i.name for i in m.graph.input] == ["input", "slab", "slots"]
    assert [o.name for o in m.graph.output] == ["output", "slab_out"]
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["GatherND", *(n.op_type for n in plain.graph.node), "ScatterND"]
    assert len(m.graph.initializer) == len(plain.graph.initializer)  # weights as they were


def test_a_graph_without_state_has_no_slot_graph():
    with pytest.raises(ModelError, match="state"):
        slot_model(identity_model(), 4)


@pytest.mark.parametrize("field, name", [("input", "state"), ("output", "state_out")])
def test_a_step_graph_with_a_second_state_has_no_slot_graph(toy_tok, field, name):
    m = onnx.load_from_string((toy_tok.model_dir / "step.onnx").read_bytes())
    values = getattr(m.graph, field)
    values.append(next(v for v in values if v.name == name))
    with pytest.raises(ModelError, match=f"no single state input and .*'{name}': 2"):
        slot_model(m.SerializeToString(), toy_tok.state_size)


# --- slot steps ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tok_engine", "sig_engine"])
def test_slot_steps_equal_plain_steps_bit_for_bit_and_touch_only_their_rows(which, request):
    eng, rng = request.getfixturevalue(which), np.random.default_rng(3)
    slab, states = random_slab(eng, rng, 12)
    ptr = slab.value.data_ptr()
    buf = eng.step_buffers(8)
    for B in (1, 5, 8, 3):
        slots = rng.choice(12, size=B, replace=False)  # scattered, unordered
        x = inputs_for(eng, rng, B)
        want_y, want_s = eng.step(x, states[slots])
        y = eng.step_slots(x, slots, slab, out=buf)
        assert np.shares_memory(y, buf.outputs)
        np.testing.assert_array_equal(y, want_y)
        states[slots] = want_s
        np.testing.assert_array_equal(slab.array, states)  # its rows, and no other row
    assert slab.value.data_ptr() == ptr == slab.array.ctypes.data
    for io in buf._slot_bindings.values():  # the slab is bound as input and output at once
        assert sorted(v.data_ptr() for v in io.get_outputs()) == sorted(
            [ptr, buf.outputs.ctypes.data]
        )


def test_one_slot_step_equals_each_session_alone_bit_for_bit(tok_engine):
    """Batch rows do not change each other's numbers: a step of 7 rows equals 7 steps of 1."""
    rng = np.random.default_rng(5)
    slab, states = random_slab(tok_engine, rng, 7)
    x = inputs_for(tok_engine, rng, 7)
    y = tok_engine.step_slots(x, np.arange(7)[::-1], slab)
    for j, row in enumerate(range(6, -1, -1)):
        want_y, want_s = tok_engine.step(x[j : j + 1], states[row : row + 1])
        np.testing.assert_array_equal(y[j : j + 1], want_y)
        np.testing.assert_array_equal(slab.read(row)[None], want_s)


@pytest.mark.parametrize(
    "slots, match",
    [
        ([0, 12], r"slot 12 is outside \[0, capacity=12\)"),
        ([-1, 2], "slot -1 is outside"),
        ([3, 3], "holds a slot twice"),
        ([1.0, 2.0], "integer"),
        ([[1, 2]], "1-D"),
        ([], "non-empty"),
        ([1, 2, 3], "3 slots for 2 inputs"),
    ],
)
def test_bad_slots_never_reach_onnxruntime(tok_engine, monkeypatch, slots, match):
    rng = np.random.default_rng(6)
    slab, states = random_slab(tok_engine, rng, 12)

    class Untouchable:
        def run_with_iobinding(self, *a, **k):
            raise AssertionError("bad slots reached onnxruntime")

    monkeypatch.setattr(tok_engine, "_slot_session", Untouchable())
    with pytest.raises(InvalidInput, match=match) as e:
        tok_engine.step_slots(np.array([1, 2]), slots, slab)
    assert e.value.field == "slots"
    np.testing.assert_array_equal(slab.array, states)


def test_a_slab_of_another_shape_or_engine_is_refused(tok_engine, sig_engine):
    with pytest.raises(InvalidInput, match="slab"):
        tok_engine.step_slots(np.array([1]), [0], sig_engine.new_slab(2))
    for not_a_slab in (None, np.zeros((4, tok_engine.state_size), np.float32)):
        with pytest.raises(InvalidInput, match="slab"):  # not AttributeError
            tok_engine.step_slots(np.array([1]), [0], not_a_slab)
    with pytest.raises(InvalidInput, match="out"):
        tok_engine.step_slots(
            np.array([1, 2, 3]), [0, 1, 2], tok_engine.new_slab(4), out=tok_engine.step_buffers(2)
        )


def test_a_failed_slot_step_leaves_the_slab_unchanged(tok_engine):
    rng = np.random.default_rng(7)
    slab, states = random_slab(tok_engine, rng, 6)

    with inject(tok_engine, fail=1), pytest.raises(EngineFailure, match="injected"):
        tok_engine.step_slots(np.array([1, 2]), [4, 1], slab)
    np.testing.assert_array_equal(slab.array, states)


def test_cuda_graph_buckets_pad_with_the_scratch_row(tiny_token_model, monkeypatch):
    """The CUDA-graph path on CPU buffers (onnxruntime ignores gpu_graph_id there): batches
    of 1..8 run in buckets of 1, 2, 4, 8 rows padded with the scratch row; outputs and the
    sessions' rows equal plain steps bit for bit, no other row changes (the warm-up runs
    before a capture step only the scratch row), and each bucket moves b rows of I/O."""
    eng = Engine(tiny_token_model["model_dir"], device="cpu", threads=1)
    monkeypatch.setattr(eng, "cuda_graphs", True)
    rng = np.random.default_rng(9)
    slab = eng.new_slab(12)
    assert slab.scratch == 12 and slab.array.shape == (13, eng.state_size)
    with pytest.raises(InvalidInput, match="scratch"):
        eng.step_slots(np.array([1]), [0], StateSlab(12, eng.state_size))
    states = (rng.standard_normal((12, eng.state_size)) * 0.3).astype(np.float32)
    slab.array[:12] = states
    buf = eng.step_buffers(8)
    for B in (3, 8, 1, 5, 2, 4, 7):
        slots = rng.choice(12, size=B, replace=False)
        x = rng.integers(0, eng.vocab_size, size=B)
        want_y, want_s = eng.step(x, states[slots])
        before = slab.stats.step_bytes_in, slab.stats.step_bytes_out
        np.testing.assert_array_equal(eng.step_slots(x, slots, slab, out=buf), want_y)
        states[slots] = want_s
        np.testing.assert_array_equal(slab.array[:12], states)
        b = 1 << (B - 1).bit_length()
        moved = slab.stats.step_bytes_in - before[0], slab.stats.step_bytes_out - before[1]
        assert moved == (16 * b, 4 * eng.d_output * b)
    assert sorted(b for _, b in eng._graphs) == [1, 2, 4, 8]  # one graph per bucket, kept
    runs = 0
    real = eng._slot_session

    class Counting:
        def run_with_iobinding(self, *a, **k):
            nonlocal runs
            runs += 1
            return real.run_with_iobinding(*a, **k)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(eng, "_slot_session", Counting())
    eng.step_slots(np.array([1, 2, 3]), [0, 1, 2], slab)  # no `out`: the kept graph, 1 run
    assert runs == 1 and len(eng._graphs) == 4
    assert not np.array_equal(slab.array[12], np.zeros(eng.state_size))  # padding stepped it


# --- row operations --------------------------------------------------------------------


def test_row_operations_move_single_rows_and_count_them():
    slab = StateSlab(5, 3)
    assert slab.nbytes == 5 * 3 * 4 and slab.row_bytes == 12
    slab.write(2, np.array([1, 2, 3], dtype=np.float32))
    slab.copy(2, 4)
    np.testing.assert_array_equal(slab.read(4), [1, 2, 3])
    np.testing.assert_array_equal(slab.read_rows([4, 0]), [[1, 2, 3], [0, 0, 0]])
    slab.read(4)[:] = 9  # host copies: writing them leaves the slab as it was
    slab.read_rows([4])[:] = 9
    np.testing.assert_array_equal(slab.array[4], [1, 2, 3])
    slab.zero(2)
    np.testing.assert_array_equal(slab.array[2], [0, 0, 0])
    st = slab.stats
    assert (st.rows_in, st.rows_out) == (3, 6)  # write, copy, zero in; copy, 2 reads, 3 out
    assert (st.bytes_in, st.bytes_out) == (36, 72)
    for bad, match in ((5, "outside"), (-1, "outside"), (True, "integer"), (1.0, "integer")):
        with pytest.raises(InvalidInput, match=match):
            slab.read(bad)
    with pytest.raises(InvalidInput, match="state"):
        slab.write(0, np.zeros(4, dtype=np.float32))
    for bad in (0, -2, "8"):
        with pytest.raises(InvalidInput, match="capacity"):
            StateSlab(bad, 3)
        with pytest.raises(InvalidInput) as e:
            StateSlab(3, bad)
        assert e.value.field == "state_size"
    with pytest.raises(InvalidInput, match="device"):
        StateSlab(2, 3, device="tpu")


def test_served_steps_move_only_inputs_slots_and_outputs(tok_engine):
    """8 sessions, 20 batched steps: the slab's own buffer is stepped in place (no row is
    copied in or out by a step, the buffer never moves) and per step only the tokens, the
    slots and the outputs cross between the host and the slab's device."""
    rng = np.random.default_rng(8)

    async def main():
        store = SessionStore(tok_engine.state_size, capacity=16, slab=tok_engine.new_slab(16))
        batcher = Batcher(tok_engine, store, max_batch=8, max_batch_delay=0.005)
        await batcher.start()
        sessions = [store.create() for _ in range(8)]
        ptr, rows = store.slab.value.data_ptr(), store.slab.stats.rows_in
        for _ in range(20):
            x = rng.integers(0, tok_engine.vocab_size, size=8)
            await asyncio.gather(*(batcher.step(s, x[j : j + 1]) for j, s in enumerate(sessions)))
        await batcher.close()
        return store, ptr, rows, batcher.stats

    store, ptr, rows, stats = asyncio.run(main())
    st = store.slab.stats
    assert store.slab.value.data_ptr() == ptr and st.rows_in == rows and st.rows_out == 0
    assert st.steps == stats.batches and stats.steps == 160
    assert st.step_bytes_in == 160 * (8 + 8)  # an int64 token and an int64 slot per step
    assert st.step_bytes_out == 160 * 4 * tok_engine.d_output


def test_a_store_and_an_engine_on_different_devices_are_refused(tok_engine):
    store = SessionStore(
        tok_engine.state_size, capacity=2, slab=StateSlab(2, tok_engine.state_size)
    )
    store.slab.device = "cuda"  # as a slab made by a CUDA engine would say
    with pytest.raises(InvalidInput, match="new_slab"):
        Batcher(tok_engine, store)
    with pytest.raises(InvalidInput, match="slab"):
        SessionStore(tok_engine.state_size, capacity=3, slab=StateSlab(2, tok_engine.state_size))


# --- any sequence of session operations --------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("create")),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("fork"), st.integers(0, 7)),
        st.tuples(st.just("restore"), st.integers(0, 7)),
        st.tuples(st.just("step"), st.lists(st.integers(0, 7), min_size=1, max_size=6)),
        st.tuples(st.just("prefill"), st.integers(0, 7), st.integers(2, 9)),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_any_sequence_of_session_operations_equals_plain_steps_bit_for_bit(tok_engine, ops, seed):
    """create / close / fork / restore / batched steps / prefills through the store and the
    batcher, with sessions joining and leaving batches, against each session's own state
    stepped alone with Engine.step: states, positions and outputs equal bit for bit."""
    rng = np.random.default_rng(seed)

    async def main():
        store = SessionStore(tok_engine.state_size, capacity=8, slab=tok_engine.new_slab(8))
        batcher = Batcher(tok_engine, store, max_batch=4, max_batch_delay=0.002)
        await batcher.start()
        live, want = [], {}  # Session, id -> (state [1, S], position)
        try:
            for op in ops:
                one = len(op) > 1 and isinstance(op[1], int) and live
                pick = live[op[1] % len(live)] if one else None
                if op[0] == "create" and len(live) < 8:
                    s = store.create()
                    live.append(s)
                    want[s.id] = (tok_engine.new_state(), 0)
                elif op[0] == "close" and pick:
                    store.close(pick.id)
                    live.remove(pick)
                elif op[0] in ("fork", "restore") and pick and len(live) < 8:
                    if op[0] == "fork":
                        s = store.fork(pick.id)
                    else:
                        s = store.restore(store.snapshot(pick.id))
                    live.append(s)
                    want[s.id] = want[pick.id]
                elif op[0] == "step" and live:
                    chosen = list(dict.fromkeys(live[k % len(live)] for k in op[1]))
                    x = rng.integers(0, tok_engine.vocab_size, size=len(chosen))
                    got = await asyncio.gather(
                        *(batcher.step(s, x[j : j + 1]) for j, s in enumerate(chosen))
                    )
                    for j, (s, (y, pos)) in enumerate(zip(chosen, got)):
                        state, p = want[s.id]
                        want_y, state = tok_engine.step(x[j : j + 1], state)
                        np.testing.assert_array_equal(y, want_y)
                        want[s.id] = (state, p + 1)
                        assert pos == p + 1
                elif op[0] == "prefill" and pick:
                    x = rng.integers(0, tok_engine.vocab_size, size=op[2])
                    y, pos = await batcher.step(pick, x)
                    state, p = want[pick.id]
                    want_y, state = tok_engine.prefill(x[None], state)
                    np.testing.assert_array_equal(y, want_y[0])
                    want[pick.id] = (state, p + op[2])
                    assert pos == p + op[2]
                for s in live:
                    state, p = want[s.id]
                    assert s.position == p
                    np.testing.assert_array_equal(store.read(s), state[0])
        finally:
            await batcher.close()

    asyncio.run(main())


def test_a_batcher_on_cuda_graphs_captures_its_buckets_before_serving(tiny_token_model):
    """(On CPU buffers, as above.) The buckets up to max_batch are captured at start, none
    later; served steps equal plain steps; a slab without a scratch row is refused."""
    eng = Engine(tiny_token_model["model_dir"], device="cpu", threads=1)
    eng.cuda_graphs = True
    with pytest.raises(InvalidInput, match="scratch row"):
        Batcher(eng, SessionStore(eng.state_size, capacity=4))
    rng = np.random.default_rng(10)

    async def main():
        store = SessionStore(eng.state_size, capacity=8, slab=eng.new_slab(8))
        batcher = Batcher(eng, store, max_batch=6, max_batch_delay=0.005)
        await batcher.start()
        captured = sorted(b for _, b in eng._graphs)
        sessions = [store.create() for _ in range(5)]
        x = rng.integers(0, eng.vocab_size, size=(3, 5))
        got = []
        for t in range(3):
            steps = (batcher.step(s, x[t, j : j + 1]) for j, s in enumerate(sessions))
            got.append([y for y, _ in await asyncio.gather(*steps)])
        await batcher.close()
        return captured, sorted(b for _, b in eng._graphs), got, x

    captured, after, got, x = asyncio.run(main())
    assert captured == after == [1, 2, 4, 8]
    s = eng.new_state(5)
    for t in range(3):
        want, s = eng.step(x[t], s)
        np.testing.assert_array_equal(np.concatenate(got[t]), want)


def test_a_step_graph_with_external_weights_gets_its_slot_graph(tiny_token_model, tmp_path):
    """onnxruntime opens the slot graph from bytes: it is told where step.onnx's external
    weights are, so such a model (hand-made or very large) still serves."""
    import shutil

    src = tiny_token_model["model_dir"]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    onnx.save(
        onnx.load(src / "step.onnx"), tmp_path / "step.onnx",
        save_as_external_data=True, location="step.weights", size_threshold=200,
    )  # fmt: skip
    assert (tmp_path / "step.weights").stat().st_size > 0
    eng = Engine(tmp_path, device="cpu", check_sha=False)
    rng = np.random.default_rng(11)
    slab, states = random_slab(eng, rng, 4)
    x = inputs_for(eng, rng, 2)
    want_y, want_s = eng.step(x, states[[3, 1]])
    np.testing.assert_array_equal(eng.step_slots(x, [3, 1], slab), want_y)
    np.testing.assert_array_equal(slab.read_rows([3, 1]), want_s)


def test_cuda_graphs_asked_of_a_cpu_engine_say_they_are_not_used(tiny_token_model, caplog):
    with caplog.at_level("WARNING", logger="ssmstream.runtime.engine"):
        eng = Engine(
            tiny_token_model["model_dir"], device="cpu", cuda_options={"enable_cuda_graph": True}
        )
    assert not eng.cuda_graphs and eng.new_slab(2).scratch is None
    assert "CUDA graphs requested, but the engine runs on CPUExecutionProvider" in caplog.text


def test_tf32_asked_of_a_cpu_engine_says_it_is_not_used(tiny_token_model, caplog):
    """`serve --device cpu --tf32` warns that TF32 is not used, as --cuda-graphs does."""
    with caplog.at_level("WARNING", logger="ssmstream.runtime.engine"):
        Engine(tiny_token_model["model_dir"], device="cpu", cuda_options={"use_tf32": True})
        Engine(tiny_token_model["model_dir"], device="cpu")
    said = [r.getMessage() for r in caplog.records]
    assert said == ["TF32 requested, but the engine runs on CPUExecutionProvider: not used"]


def test_nbytes_counts_the_scratch_row():
    """nbytes is the buffer's size: with scratch=True it holds capacity + 1 rows."""
    plain, padded = StateSlab(4, 3), StateSlab(4, 3, scratch=True)
    assert plain.nbytes == 4 * 12 == plain.array.nbytes
    assert padded.scratch == 4 and padded.nbytes == 5 * 12 == padded.array.nbytes
    assert "0.0 MiB" in repr(padded)


def test_unsigned_slots_are_accepted(toy_tok):
    """check_slots takes any integer dtype (documented: 'integer array'), unsigned included."""
    eng = toy_tok
    slab = eng.new_slab(4)
    states = (np.random.default_rng(2).standard_normal((4, eng.state_size)) * 0.3).astype(
        np.float32
    )
    slab.array[:] = states
    x = np.array([3, 5])
    want_y, want_s = eng.step(x, states[[2, 0]])
    y = eng.step_slots(x, np.array([2, 0], dtype=np.uint32), slab)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(slab.array[[2, 0]], want_s)
    np.testing.assert_array_equal(
        slab.check_slots(np.array([3, 1], dtype=np.uint8)), np.array([[3], [1]], dtype=np.int64)
    )
    assert slab.check_slots(np.array([3, 1], dtype=np.uint8)).dtype == np.int64


def test_copy_names_the_bad_destination():
    slab = StateSlab(3, 2)
    with pytest.raises(InvalidInput, match=r"slot 3 is outside \[0, capacity=3\)") as e:
        slab.copy(0, 3)
    assert e.value.field == "dst"
    with pytest.raises(InvalidInput) as e:
        slab.copy(-1, 0)
    assert e.value.field == "src"


def test_write_refuses_a_batched_state_shape():
    """write takes one row float32 [S]; [1, S] is refused (a caller passing the wrong shape
    must not be silently broadcast)."""
    slab = StateSlab(3, 2)
    with pytest.raises(InvalidInput, match=r"must have shape \[2\], got \(1, 2\)") as e:
        slab.write(0, np.ones((1, 2), dtype=np.float32))
    assert e.value.field == "state"
    np.testing.assert_array_equal(slab.array, np.zeros((3, 2)))
    assert slab.stats.rows_in == 0


def test_read_rows_counts_every_row_and_names_the_slots_field():
    slab = StateSlab(4, 2)
    before = slab.stats.rows_out
    rows = slab.read_rows([0, 2, 3])
    assert rows.shape == (3, 2)
    assert slab.stats.rows_out - before == 3 and slab.stats.bytes_out == 3 * 8
    # numpy integers are slot numbers too (a slot array's elements)
    np.testing.assert_array_equal(slab.read_rows(np.array([3, 0])), rows[[2, 0]])
    np.testing.assert_array_equal(slab.read(np.int64(2)), rows[1])
    with pytest.raises(InvalidInput) as e:
        slab.read_rows([1, 4])
    assert e.value.field == "slots"
    assert "slot 4 is outside [0, capacity=4)" in str(e.value)


@pytest.mark.parametrize(
    "slots, words",
    [
        ([[0], [1]], "int64 (2, 1)"),
        ([], "float64 (0,)"),
        (np.empty(0, np.int64), "int64 (0,)"),
        (1, "int64 ()"),
    ],
)
def test_slots_that_are_not_a_non_empty_vector_are_refused(slots, words):
    with pytest.raises(InvalidInput) as e:
        StateSlab(3, 2).check_slots(slots)
    assert e.value.field == "slots"
    assert f"must be a non-empty 1-D integer array, got {words}" in str(e.value)
