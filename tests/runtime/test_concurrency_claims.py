"""What the runtime says is safe from several threads at once, run so, against the same calls
made one after another: concurrent `Engine.step` / `prefill` / `generate` (also with a
StepBuffers per thread), StateSlab row operations, every SessionStore method, and one sync
`Client` (and one session handle) shared by threads. Races may change the order things run
in, never a value: each result is compared with a serial reference."""

from __future__ import annotations

import threading
from concurrent import futures

import numpy as np
import pytest
from grpc_helpers import position_on_server, serve, target
from ssmstream.runtime.client import Client
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import SessionNotFound
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab

THREADS = 8


def run_together(work: list[list], n: int = THREADS) -> list[list]:
    """work[i]: the callables thread i runs in order; the threads start together. Returns
    each thread's results (a job's exception is raised here)."""
    assert len(work) == n
    start = threading.Barrier(n)

    def thread(jobs):
        start.wait(10)
        return [job() for job in jobs]

    with futures.ThreadPoolExecutor(n) as pool:
        done = [pool.submit(thread, jobs) for jobs in work]
        return [f.result(30) for f in done]


# --- Engine ------------------------------------------------------------------------------


def engine_jobs(eng: Engine, i: int, rng: np.random.Generator, V: int) -> list:
    """Thread i's calls: steps and prefills of several batch sizes and lengths (each
    prefill length around the graph's chunk and max_len), and a seeded generate."""
    C, L = eng.prefill_chunk, eng.prefill_max_len
    jobs = []
    for k in range(6):
        B = 1 + (i + k) % 3
        s = rng.standard_normal((B, eng.state_size)).astype(np.float32)
        x = rng.integers(0, V, B)
        jobs.append(("step", x, s))
        T = (1, C - 1, C, C + 1, L, L + C + 3)[(i + k) % 6]
        xs = rng.integers(0, V, (B, T))
        jobs.append(("prefill", xs, s))
        jobs.append(("generate", [int(t) for t in xs[0, :3]], s[:1].copy(), 100 * i + k))
    return jobs


def run_engine_job(eng: Engine, job, buffers=None):
    kind, *args = job
    if kind == "step":
        y, s = eng.step(*args, out=buffers)
        return y.copy(), s.copy()  # copies: buffers' views are overwritten by the next step
    if kind == "prefill":
        return eng.prefill(*args)
    prompt, state, seed = args
    state = state.copy()
    tokens = list(eng.generate(prompt, state, max_new_tokens=5, temperature=0.9, seed=seed))
    return tokens, state


@pytest.mark.parametrize("buffers", [False, True], ids=["fresh", "step_buffers_per_thread"])
def test_engine_calls_from_threads_match_the_same_calls_made_serially(toy_token_model, buffers):
    token_model_dir = toy_token_model["model_dir"]
    shared, serial = Engine(token_model_dir, device="cpu"), Engine(token_model_dir, device="cpu")
    V = shared.vocab_size
    rng = np.random.default_rng(7)
    work = [engine_jobs(shared, i, rng, V) for i in range(THREADS)]
    expected = [[run_engine_job(serial, j) for j in jobs] for jobs in work]
    for _ in range(3):
        per_thread = [shared.step_buffers(3) if buffers else None for _ in work]
        got = run_together(
            [
                [lambda j=j, b=b: run_engine_job(shared, j, b) for j in jobs]
                for jobs, b in zip(work, per_thread)
            ]
        )
        for jobs, want, have in zip(work, expected, got):
            for job, w, h in zip(jobs, want, have):
                if job[0] == "generate":
                    assert h[0] == w[0], job
                    np.testing.assert_array_equal(h[1], w[1])
                else:
                    np.testing.assert_array_equal(h[0], w[0])
                    np.testing.assert_array_equal(h[1], w[1])


# --- StateSlab ---------------------------------------------------------------------------


def slab_jobs(eng: Engine, slab: StateSlab, i: int, rows: int, rng: np.random.Generator) -> list:
    """Thread i's row operations and slot steps on its own rows [i·rows, (i + 1)·rows)."""
    S, own = slab.state_size, list(range(i * rows, (i + 1) * rows))
    buffers = eng.step_buffers(rows)
    jobs = []
    for k in range(12):
        a, b = own[k % rows], own[(k * 5 + 1) % rows]
        state = rng.standard_normal(S).astype(np.float32)
        tokens = rng.integers(0, eng.vocab_size, rows)
        jobs += [
            lambda a=a, state=state: slab.write(a, state),
            lambda a=a, b=b: slab.copy(a, b) if a != b else None,
            lambda: slab.read_rows(own[::-1]),
            lambda t=tokens: eng.step_slots(t, own, slab, out=buffers).copy(),
            lambda t=tokens[:2]: eng.step_slots(t, own[-2:], slab),
            lambda b=b: slab.read(b),
        ]
        if k % 4 == 3:
            jobs.append(lambda a=a: slab.zero(a))
    return jobs


def test_slab_row_operations_and_slot_steps_from_threads_match_serial(toy_token_model):
    """Row operations are safe from several threads; on CPU, slot steps of disjoint rows
    from several threads (a StepBuffers each, or none) also leave the slab as serial ones
    do."""
    eng = Engine(toy_token_model["model_dir"], device="cpu")
    rows = 4
    slabs = [eng.new_slab(THREADS * rows) for _ in range(2)]
    work = [
        [slab_jobs(eng, slab, i, rows, np.random.default_rng(i)) for i in range(THREADS)]
        for slab in slabs
    ]
    expected = [[job() for job in jobs] for jobs in work[0]]
    got = run_together(work[1])
    for want, have in zip(expected, got):
        for w, h in zip(want, have):
            if w is None:
                assert h is None
            else:
                np.testing.assert_array_equal(h, w)
    np.testing.assert_array_equal(slabs[1].array, slabs[0].array)
    assert slabs[1].stats == slabs[0].stats


# --- SessionStore ------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store_jobs(store: SessionStore, i: int, expired: list[str], rng, model: dict) -> list:
    """Thread i's calls on sessions of its own, recording in `model` (id -> (state,
    position)) what each should hold; every call also meets the sessions that expired."""
    S = store.state_size
    principal = f"p{i % 3}"
    jobs = []
    live: list[str] = []

    def create(k):
        sid = f"t{i}-{k}"
        store.create(principal, sid, ttl=float("inf"))
        model[sid] = (np.zeros(S, np.float32), 0)
        live.append(sid)

    def commit(sid, n):
        state = rng.standard_normal(S).astype(np.float32)
        s = store.get(sid, principal)
        assert store.commit(s, state, n) == model[sid][1] + n
        model[sid] = (state, model[sid][1] + n)

    def step(sid, n):
        """What a batcher's step does: lend, write the row in place, give back."""
        state = rng.standard_normal(S).astype(np.float32)
        s = store.get(sid, principal)
        (lent,) = store.lend([s])
        store.slab.array[lent.slot, : S // 2] = state[: S // 2]
        store.slab.array[lent.slot, S // 2 :] = state[S // 2 :]
        assert store.give_back([lent], n) == [model[sid][1] + n]
        model[sid] = (state, model[sid][1] + n)

    def check(sid):
        s = store.get(sid, principal)
        state, position = model[sid]
        np.testing.assert_array_equal(store.read(s), state)
        assert s.position == position
        got_position, got_state = store.unpack(store.snapshot(sid, principal))
        assert got_position == position
        np.testing.assert_array_equal(got_state, state)

    def restore_and_fork(sid, k):
        snap = store.snapshot(sid, principal)
        store.restore(snap, principal, f"t{i}-r{k}")
        store.fork(sid, principal, f"t{i}-f{k}")
        model[f"t{i}-r{k}"] = model[f"t{i}-f{k}"] = model[sid]
        live.extend([f"t{i}-r{k}", f"t{i}-f{k}"])

    def close(sid):
        store.close(sid, principal)
        del model[sid]
        live.remove(sid)

    def gone(sid):
        with pytest.raises(SessionNotFound) as e:
            store.get(sid, "")
        assert e.value.reason == "evicted"

    for k in range(6):
        jobs.append(lambda k=k: create(k))
        sid = f"t{i}-{k}"
        jobs += [
            lambda sid=sid, n=k + 1: commit(sid, n),
            lambda sid=sid, n=k + 2: step(sid, n),
            lambda sid=sid: check(sid),
            lambda: store.evict_idle(),
            lambda: store.stats(),
            lambda k=k: gone(expired[(i + k) % len(expired)]),
        ]
        if k % 2:
            jobs.append(lambda sid=sid, k=k: restore_and_fork(sid, k))
        if k % 3 == 2:
            jobs.append(lambda sid=sid: close(sid))
    return jobs


def test_session_store_methods_from_threads_keep_each_state_with_its_position(toy_token_model):
    S = 8
    clock = FakeClock()
    store = SessionStore(S, capacity=THREADS * 12 + 4, clock=clock)
    expired = [store.create("", f"old-{j}", ttl=1.0).id for j in range(4)]
    clock.now = 10.0  # past their TTL: evicted by evict_idle or by the first get
    models = [{} for _ in range(THREADS)]
    work = [
        store_jobs(store, i, expired, np.random.default_rng(i), models[i]) for i in range(THREADS)
    ]
    for _ in run_together(work):
        pass
    want = {sid: v for m in models for sid, v in m.items()}
    live = store.sessions()
    assert sorted(s.id for s in live) == sorted(want)
    for s in live:
        np.testing.assert_array_equal(store.read(s), want[s.id][0])
        assert s.position == want[s.id][1]
    assert len({s.slot for s in live}) == len(live)  # no slot given twice
    stats = store.stats()
    assert stats["free"] == store.capacity - len(want)
    assert (stats["created"], stats["closed"], stats["evicted"]) == (
        THREADS * 6 + 4, THREADS * 2, 4
    )  # fmt: skip
    assert (stats["restored"], stats["forked"]) == (THREADS * 3, THREADS * 3)


def test_reads_meet_a_state_with_its_own_position_while_other_threads_step_it(tmp_path):
    """A step writes a lent row in the slab; a snapshot or save meanwhile waits (state_now
    answers None), so each (position, state) pair they give is one the session held."""
    S = 64
    store = SessionStore(S, capacity=4)
    saves = 0
    s = store.create("", "one")
    history = {0: np.zeros(S, np.float32)}  # position -> the state the session held
    stop = threading.Event()

    def stepper():
        rng = np.random.default_rng(0)
        position = 0
        while position < 300 or (not (saves and len(seen) > 20) and position < 20000):
            state = rng.standard_normal(S).astype(np.float32)
            history[position + 1] = state
            (lent,) = store.lend([s])
            for h in range(0, S, 8):  # row written piecewise, as a device copy may land
                store.slab.array[lent.slot, h : h + 8] = state[h : h + 8]
            (position,) = store.give_back([lent], 1)
        stop.set()

    seen = []

    def reader():
        while not stop.is_set():
            seen.append(store.unpack(store.snapshot("one")))
            now = store.state_now(s)  # (state, position), or None while the row is lent
            if now is not None:
                seen.append(now[::-1])

    def saver():
        nonlocal saves
        while not stop.is_set():
            store.save(tmp_path)
            copy = SessionStore(S, capacity=4, snapshot_key=store.snapshot_key)
            copy.load(tmp_path)
            s2 = copy.get("one")
            seen.append((s2.position, copy.read(s2)))
            saves += 1

    threads = [threading.Thread(target=f) for f in (stepper, reader, reader, saver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert store.get("one").position == len(history) - 1 >= 300
    assert saves and len(seen) > 20  # the readers and the saver ran while it stepped
    for position, state in seen:
        np.testing.assert_array_equal(state, history[position])


# --- the sync Client -----------------------------------------------------------------------


def client_jobs(c: Client, i: int, rng: np.random.Generator, V: int) -> list:
    """Thread i's calls through the shared client, on sessions of its own; each job returns
    values that depend on those calls alone."""
    chunks = [rng.integers(0, V, 1 + (i + k) % 7).tolist() for k in range(6)]
    prompt = rng.integers(0, V, 3).tolist()

    def steps():
        s = c.create_session()
        out = [(r.position, r.outputs) for r in (s.step(tokens=t, output="all") for t in chunks)]
        fork = s.fork()
        twin = c.restore(s.snapshot())
        more = [h.step(tokens=chunks[0]) for h in (s, fork, twin)]
        out += [(r.position, r.outputs) for r in more]
        for h in (s, fork, twin):
            out.append(h.close())
        return out

    def generate():
        s = c.create_session()
        got = [(g.token, g.position) for g in s.generate(prompt, max_new_tokens=6, seed=i)]
        return got, s.close()

    def streamed():
        s = c.create_session()
        rs = list(s.stream(chunks[:3], output="all"))
        return [(r.position, r.outputs) for r in rs], s.close()

    return [steps, generate, streamed]


def same(a, b) -> None:
    """Equal nested results (arrays to 1e-6: a batch may hold other sessions' rows)."""
    if isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


def test_one_client_shared_by_threads_answers_each_session_as_serial_calls_do(toy_token_model):
    V = toy_token_model["V"]
    with serve(toy_token_model["model_dir"]) as srv, Client(target(srv), timeout=20) as c:
        work = [client_jobs(c, i, np.random.default_rng(i), V) for i in range(THREADS)]
        expected = [[job() for job in jobs] for jobs in work]
        for _ in range(2):
            same(run_together(work), expected)
        assert srv.server.store.stats()["sessions"] == 0


def test_one_session_handle_stepped_from_threads_takes_each_position_once(toy_token_model):
    """Threads step one handle with the same token: whatever the order, position p's
    output is the p-th step's of that token, each position is answered once, and the
    handle ends where the server's session is."""
    per_thread, token = 6, 3
    n = THREADS * per_thread
    eng = Engine(toy_token_model["model_dir"], device="cpu")
    want, _ = eng.prefill(np.full((1, n), token), eng.new_state())  # [1, n, d_out]
    with serve(toy_token_model["model_dir"]) as srv, Client(target(srv), timeout=20) as c:
        s = c.create_session()
        step = lambda: s.step(tokens=[token])  # noqa: E731
        got = [r for rs in run_together([[step] * per_thread] * THREADS) for r in rs]
        assert sorted(r.position for r in got) == list(range(1, n + 1))
        for r in got:
            np.testing.assert_allclose(r.outputs[0], want[0, r.position - 1], rtol=1e-5, atol=1e-5)
        assert s.position == n == position_on_server(srv, s.id)


def test_one_stream_handle_sent_to_from_threads_answers_each_send_its_own_position(
    toy_token_model,
):
    """Sends from several threads take turns on one StreamHandle: each gets the response
    to its own request (the position its input made), none is lost or answered twice."""
    per_thread, token = 5, 4
    n = THREADS * per_thread
    eng = Engine(toy_token_model["model_dir"], device="cpu")
    want, _ = eng.prefill(np.full((1, n), token), eng.new_state())  # [1, n, d_out]
    with serve(toy_token_model["model_dir"]) as srv, Client(target(srv), timeout=20) as c:
        s = c.create_session()
        with s.open_stream() as st:
            send = lambda: st.send(tokens=[token])  # noqa: E731
            got = [r for rs in run_together([[send] * per_thread] * THREADS) for r in rs]
        assert sorted(r.position for r in got) == list(range(1, n + 1))
        for r in got:
            np.testing.assert_allclose(r.outputs[0], want[0, r.position - 1], rtol=1e-5, atol=1e-5)
        assert s.position == n == position_on_server(srv, s.id)


def test_reads_of_a_lent_row_wait_for_the_step_and_see_its_state_with_its_position(tmp_path):
    """While a step holds a session's row, read / snapshot / fork / save called from other
    threads wait; they then see the step's state with the position it made."""
    S = 8
    store = SessionStore(S, capacity=4)
    s = store.create("", "one")
    new = np.arange(1, S + 1, dtype=np.float32)

    def saved():
        store.save(tmp_path)
        copy = SessionStore(S, capacity=4, snapshot_key=store.snapshot_key)
        copy.load(tmp_path)
        return copy.get("one").position, copy.read(copy.get("one"))

    calls = {
        "read": lambda: (lambda state: (s.position, state))(store.read(s)),
        "snapshot": lambda: store.unpack(store.snapshot("one")),
        "fork": lambda: (lambda f: (f.position, store.read(f)))(store.fork("one")),
        "save": saved,
    }
    (lent,) = store.lend([s])
    store.slab.array[lent.slot] = new  # the step's write
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        running = {k: pool.submit(f) for k, f in calls.items()}
        try:
            done, _ = futures.wait(running.values(), timeout=0.1)
        finally:
            assert store.give_back([lent], 3) == [3]
        assert not [k for k, f in running.items() if f in done]  # all waited for the row
        for name, f in running.items():
            position, state = f.result(10)
            assert position == 3, name
            np.testing.assert_array_equal(state, new)
