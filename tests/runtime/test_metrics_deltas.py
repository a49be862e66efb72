"""The exact change each call makes to a running server's metrics, scraped over HTTP before
and after it: requests, tokens, latency and batch counts per RPC, open and evicted sessions,
the prefix cache's counters and sizes, errors by status code. A refused call changes
nothing but its error count — also when its prompt's prefix was in the prefix cache.

Served model: the token toy (V=11, S=8, D=5, prefill chunk 4: the cache keeps the states
after each 4 prompt tokens and after the prompt's end). Each test uses prompts of its own
first tokens (no hit on another test's entries) and closes the sessions it opens."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_helpers import scrape, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.prefix_cache import entry_bytes
from ssmstream.runtime.status import SERVICE_NAME

S, D = 8, 5  # the toy's state size and outputs
MAX_SESSIONS, MAX_TOKENS, MAX_NEW = 6, 16, 8
# what varies from run to run (times, rates, bytes moved) or is not a count of calls
NOT_COUNTS = ("_bucket", "_sum", "_created", "tokens_per_second", "state_slab_", "checkpoint_bytes")


@pytest.fixture(scope="module")
def server(toy_token_model):
    with serve(
        toy_token_model["model_dir"],
        metrics_port=0,
        prefix_cache_mb=1.0,
        rewind_window=32,
        max_sessions=MAX_SESSIONS,
        max_tokens_per_request=MAX_TOKENS,
        max_new_tokens=MAX_NEW,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(target(server)) as ch:
        yield pb_grpc.StreamingInferenceStub(ch)


@pytest.fixture(autouse=True)
def _no_session_left_open(server, stub):
    """Each test leaves the store as it found it (a failed one too: the next tests fill it)."""
    yield
    close(stub, *(s.id for s in server.server.store.sessions()))


def counts(server) -> dict[str, float]:
    return {
        k: v
        for k, v in scrape(server.server.metrics_port).items()
        if k.startswith("ssmstream_") and not any(n in k for n in NOT_COUNTS)
    }


def changes(before: dict, after: dict) -> dict[str, float]:
    return {
        k: after.get(k, 0.0) - before.get(k, 0.0)
        for k in sorted(before.keys() | after.keys())
        if after.get(k, 0.0) != before.get(k, 0.0)
    }


def changed_by(server, call) -> dict[str, float]:
    """What `call()` changed in the metrics (it returns once the server counted it)."""
    before = counts(server)
    call()
    return changes(before, counts(server))


def settled_changes(server, before: dict, expected: dict, timeout: float = 5.0) -> dict:
    """The changes since `before` once they equal `expected` (or after `timeout` s): for a
    call the server counts after its client saw it end (a deadline, a cancel)."""
    end = time.monotonic() + timeout
    while (got := changes(before, counts(server))) != expected and time.monotonic() < end:
        time.sleep(0.02)
    return got


def tokens(rpc, n):
    return {f'ssmstream_tokens_total{{rpc="{rpc}"}}': n}


def requests(rpc, n, latencies=None):
    return {
        f'ssmstream_requests_total{{rpc="{rpc}"}}': n,
        f'ssmstream_request_latency_seconds_count{{rpc="{rpc}"}}': n if latencies is None
        else latencies,
    }  # fmt: skip


def batches(n):
    return {"ssmstream_batch_size_count": n, "ssmstream_batch_latency_seconds_count": n}


def error(code):
    return {f'ssmstream_errors_total{{code="{code}"}}': 1}


def sessions(n):
    return {"ssmstream_sessions_active": n}


def cache(hits=0, misses=0, cached_tokens=0, entries=(), evictions=0):
    """The prefix cache's changes; entries: the prompt lengths of the entries added."""
    out = {
        "ssmstream_prefix_cache_hits_total": hits,
        "ssmstream_prefix_cache_misses_total": misses,
        "ssmstream_prefix_cache_cached_tokens_total": cached_tokens,
        "ssmstream_prefix_cache_evictions_total": evictions,
        "ssmstream_prefix_cache_entries": len(entries),
        "ssmstream_prefix_cache_bytes": sum(entry_bytes(t, S, D) for t in entries),
    }
    return {k: v for k, v in out.items() if v}


def create(stub, **kw) -> pb.Session:
    return stub.CreateSession(pb.CreateSessionRequest(**kw), timeout=10)


def close(stub, *ids) -> None:
    for sid in ids:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)


def code_of(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code().name


# --- calls that succeed ----------------------------------------------------------------------


def test_step_stream_and_session_calls_count_their_requests_and_tokens(server, stub):
    made = {}
    got = changed_by(server, lambda: made.setdefault("s", create(stub)))
    assert got == sessions(1)
    sid = made["s"].session_id

    step = pb.StepRequest(session_id=sid, tokens=[1, 2, 3])
    got = changed_by(server, lambda: stub.Step(step, timeout=10))
    assert got == {**tokens("Step", 3), **requests("Step", 1), **batches(1)}  # one prefill

    msgs = [pb.StepRequest(session_id=sid, tokens=[4]), pb.StepRequest(tokens=[5, 6])]
    got = changed_by(server, lambda: list(stub.Stream(iter(msgs), timeout=10)))
    assert got == {**tokens("Stream", 3), **requests("Stream", 2), **batches(2)}

    # a Stream without a session id makes one; it stays open after the stream
    out = []
    msgs = [pb.StepRequest(tokens=[1])]
    got = changed_by(server, lambda: out.extend(stub.Stream(iter(msgs), timeout=10)))
    assert got == {**tokens("Stream", 1), **requests("Stream", 1), **batches(1), **sessions(1)}

    fork = {}
    got = changed_by(
        server, lambda: fork.setdefault("f", stub.ForkSession(pb.ForkRequest(session_id=sid)))
    )
    assert got == sessions(1)
    snap = {}
    got = changed_by(
        server,
        lambda: snap.setdefault(
            "s", stub.SnapshotSession(pb.SnapshotRequest(session_id=sid), timeout=10)
        ),
    )
    assert got == {}
    restored = {}
    req = pb.RestoreRequest(snapshot=snap["s"].data)
    got = changed_by(server, lambda: restored.setdefault("r", stub.RestoreSession(req)))
    assert got == sessions(1)
    got = changed_by(
        server, lambda: stub.RewindSession(pb.RewindRequest(session_id=sid, position=3))
    )
    assert got == batches(1)  # the inputs since the checkpoint before it, replayed in one call
    ids = (sid, out[0].session_id, fork["f"].session_id, restored["r"].session_id)
    assert changed_by(server, lambda: close(stub, *ids)) == sessions(-4)


def test_the_tokens_help_text_says_what_a_generate_adds_to_it(server, stub):
    """A dashboard reads the counter by its HELP line: 4 tokens generated from a 2-token
    prompt add 5 (the last generated token is not fed), not 2 + 4 as "inputs consumed +
    tokens generated" said."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    (help_line,) = [
        ln for ln in text.splitlines() if ln.startswith("# HELP ssmstream_tokens_total")
    ]
    assert help_line == (
        "# HELP ssmstream_tokens_total inputs consumed: Step and Stream inputs, prompts, and "
        "each generated token but the last (fed back to the model)"
    )
    req = pb.GenerateRequest(prompt=[7, 8], max_new_tokens=4, temperature=0.0)
    got = changed_by(server, lambda: list(stub.Generate(req, timeout=10)))
    assert got['ssmstream_tokens_total{rpc="Generate"}'] == 2 + 4 - 1


def test_generate_counts_its_prompt_the_tokens_fed_back_and_one_request(server, stub):
    """N tokens generated from a P-token prompt: P + N - 1 inputs (the last token is not
    fed), one request, N latencies, 1 + N - 1 onnxruntime calls; a new session's prompt is
    looked up in the prefix cache (and cached)."""
    req = pb.GenerateRequest(prompt=[2, 3], max_new_tokens=4, temperature=0.0)
    got = changed_by(server, lambda: list(stub.Generate(req, timeout=10)))
    assert got == {
        **tokens("Generate", 2 + 3),
        **requests("Generate", 1, latencies=4),
        **batches(4),
        **cache(misses=1, entries=[2]),
    }
    out = []
    req = pb.GenerateRequest(prompt=[2, 3], max_new_tokens=1, keep_session=True)
    got = changed_by(server, lambda: out.extend(stub.Generate(req, timeout=10)))
    assert got == {
        **tokens("Generate", 2),
        **requests("Generate", 1),
        **cache(hits=1, cached_tokens=2),
        **sessions(1),
    }  # all from the cache: no onnxruntime call
    sid = out[0].session_id
    req = pb.GenerateRequest(session_id=sid, prompt=[4, 5, 6], max_new_tokens=2)
    got = changed_by(server, lambda: list(stub.Generate(req, timeout=10)))
    assert got == {**tokens("Generate", 3 + 1), **requests("Generate", 1, 2), **batches(2)}
    close(stub, sid)


def test_prompts_count_prefix_cache_hits_misses_and_entries(server, stub):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # pieces end at 4, 8, 9
    ids = []

    def make(p):
        return lambda: ids.append(create(stub, prompt=p).session_id)

    got = changed_by(server, make(prompt))
    assert got == {
        **tokens("CreateSession", 9),
        **batches(1),
        **cache(misses=1, entries=[4, 8, 9]),
        **sessions(1),
    }
    got = changed_by(server, make(prompt))
    assert got == {**tokens("CreateSession", 9), **cache(hits=1, cached_tokens=9), **sessions(1)}
    got = changed_by(server, make(prompt[:8] + [7, 7]))  # 8 from the cache, 2 prefilled
    assert got == {
        **tokens("CreateSession", 10),
        **batches(1),
        **cache(hits=1, cached_tokens=8, entries=[10]),
        **sessions(1),
    }
    close(stub, *ids)


def test_an_idle_session_past_its_ttl_counts_as_evicted(server, stub):
    sid = create(stub, ttl_seconds=0.05).session_id
    time.sleep(0.1)
    step = pb.StepRequest(session_id=sid, tokens=[1])
    got = changed_by(server, lambda: code_of(lambda: stub.Step(step, timeout=10)))
    # evicted by this Step or by the periodic sweep before it: counted once either way
    assert got == {**error("NOT_FOUND"), "ssmstream_sessions_evicted_total": 1, **sessions(-1)}


# --- refused calls: their error, nothing else -------------------------------------------------

CACHED = [8, 8, 8, 8, 1]  # fed once by the fixture below: its first piece is cached


@pytest.fixture(scope="module")
def cached_prompt(server, stub):
    close(stub, create(stub, prompt=CACHED).session_id)
    return CACHED


@pytest.fixture
def open_session(server, stub):
    return create(stub).session_id  # closed after the test (_no_session_left_open)


REFUSED = {
    # CreateSession: a prompt whose prefix is cached, refused for its other fields
    "prompt token out of the vocabulary": (
        "INVALID_ARGUMENT",
        lambda st, sid: create(st, prompt=CACHED + [11]),
    ),
    "prompt over max_tokens_per_request": (
        "RESOURCE_EXHAUSTED",
        lambda st, sid: create(st, prompt=CACHED * 4),
    ),
    "prompt with a bad ttl": (
        "INVALID_ARGUMENT",
        lambda st, sid: create(st, prompt=CACHED, ttl_seconds=-1),
    ),
    "prompt with a snapshot": (
        "INVALID_ARGUMENT",
        lambda st, sid: create(st, prompt=CACHED, snapshot=b"x"),
    ),
    "prompt for a session id in use": (
        "INVALID_ARGUMENT",
        lambda st, sid: create(st, prompt=CACHED, session_id=sid),
    ),
    "step of an unknown session": (
        "NOT_FOUND",
        lambda st, sid: st.Step(pb.StepRequest(session_id="nobody", tokens=[1]), timeout=10),
    ),
    "step token out of the vocabulary": (
        "INVALID_ARGUMENT",
        lambda st, sid: st.Step(pb.StepRequest(session_id=sid, tokens=[1, 11]), timeout=10),
    ),
    "step over max_tokens_per_request": (
        "RESOURCE_EXHAUSTED",
        lambda st, sid: st.Step(
            pb.StepRequest(session_id=sid, tokens=[1] * (MAX_TOKENS + 1)), timeout=10
        ),
    ),
    "step with a bad top_k": (
        "INVALID_ARGUMENT",
        lambda st, sid: st.Step(
            pb.StepRequest(session_id=sid, tokens=[1], output=pb.OUTPUT_TOP_K, top_k=99),
            timeout=10,
        ),
    ),
    "stream token out of the vocabulary": (
        "INVALID_ARGUMENT",
        lambda st, sid: list(
            st.Stream(iter([pb.StepRequest(session_id=sid, tokens=[11])]), timeout=10)
        ),
    ),
    "generate with a cached prompt over max_new_tokens": (
        "INVALID_ARGUMENT",
        lambda st, sid: list(
            st.Generate(pb.GenerateRequest(prompt=CACHED, max_new_tokens=MAX_NEW + 1), timeout=10)
        ),
    ),
    "generate with a cached prompt and a bad stop token": (
        "INVALID_ARGUMENT",
        lambda st, sid: list(
            st.Generate(
                pb.GenerateRequest(prompt=CACHED, max_new_tokens=2, stop_tokens=[11]), timeout=10
            )
        ),
    ),
    "generate of an unknown session": (
        "NOT_FOUND",
        lambda st, sid: list(
            st.Generate(
                pb.GenerateRequest(session_id="nobody", prompt=[1], max_new_tokens=2), timeout=10
            )
        ),
    ),
    "close of an unknown session": (
        "NOT_FOUND",
        lambda st, sid: close(st, "nobody"),
    ),
    "fork of an unknown session": (
        "NOT_FOUND",
        lambda st, sid: st.ForkSession(pb.ForkRequest(session_id="nobody"), timeout=10),
    ),
    "restore of bytes that are no snapshot": (
        "INVALID_ARGUMENT",
        lambda st, sid: st.RestoreSession(pb.RestoreRequest(snapshot=b"junk"), timeout=10),
    ),
    "rewind ahead of the session": (
        "OUT_OF_RANGE",
        lambda st, sid: st.RewindSession(pb.RewindRequest(session_id=sid, position=5), timeout=10),
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_call_counts_only_its_error(server, stub, cached_prompt, open_session, case):
    code, call = REFUSED[case]
    got = {}

    def run():
        got["code"] = code_of(lambda: call(stub, open_session))

    assert changed_by(server, run) == error(code)
    assert got["code"] == code


def test_bytes_that_are_no_request_count_only_their_error(server, stub):
    with grpc.insecure_channel(target(server)) as ch:
        step = ch.unary_unary(f"/{SERVICE_NAME}/Step")
        stream = ch.stream_stream(f"/{SERVICE_NAME}/Stream")
        got = changed_by(server, lambda: code_of(lambda: step(b"\xff\xff", timeout=10)))
        assert got == error("INVALID_ARGUMENT")
        got = changed_by(
            server, lambda: code_of(lambda: list(stream(iter([b"\xff\xff"]), timeout=10)))
        )
        assert got == error("INVALID_ARGUMENT")


def test_a_stream_refused_at_its_second_message_counts_the_first_and_its_error(
    server, stub, open_session
):
    msgs = [
        pb.StepRequest(session_id=open_session, tokens=[1, 2]),
        pb.StepRequest(tokens=[1] * (MAX_TOKENS + 1)),
    ]
    got = changed_by(server, lambda: code_of(lambda: list(stub.Stream(iter(msgs), timeout=10))))
    assert got == {
        **tokens("Stream", 2),
        **requests("Stream", 1),
        **batches(1),
        **error("RESOURCE_EXHAUSTED"),
    }


def test_reading_model_info_changes_no_count(server, stub):
    got = changed_by(server, lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
    assert got == {}


def test_calls_refused_by_a_full_store_count_only_their_error(server, stub, cached_prompt):
    before = counts(server)
    have = int(before["ssmstream_sessions_active"])
    ids = [create(stub).session_id for _ in range(MAX_SESSIONS - have)]
    try:
        refused = {
            "create": lambda: create(stub, prompt=CACHED),
            "generate": lambda: list(
                stub.Generate(pb.GenerateRequest(prompt=CACHED, max_new_tokens=2), timeout=10)
            ),
            "stream": lambda: list(stub.Stream(iter([pb.StepRequest(tokens=[1])]), timeout=10)),
            "fork": lambda: stub.ForkSession(pb.ForkRequest(session_id=ids[0]), timeout=10),
        }
        for name, call in refused.items():
            got = changed_by(server, functools.partial(code_of, call))
            assert got == error("RESOURCE_EXHAUSTED"), name
    finally:
        close(stub, *ids)


def test_a_step_of_a_session_attached_to_a_stream_counts_only_its_error(server, stub):
    sid = create(stub).session_id
    go = threading.Event()

    def requests_():
        yield pb.StepRequest(session_id=sid, tokens=[1])
        go.wait(10)

    before = counts(server)
    call = stub.Stream(requests_(), timeout=10)
    next(call)
    streamed = {**tokens("Stream", 1), **requests("Stream", 1), **batches(1)}
    streamed["ssmstream_streams_open"] = 1  # open while the Step below is refused
    assert settled_changes(server, before, streamed) == streamed  # counted after its write
    step = pb.StepRequest(session_id=sid, tokens=[1])
    got = changed_by(server, lambda: code_of(lambda: stub.Step(step, timeout=10)))
    go.set()
    list(call)
    close(stub, sid)
    assert got == error("FAILED_PRECONDITION")


# --- prompts that fail after a prefix-cache hit ------------------------------------------------


def test_a_prompt_whose_prefill_fails_after_a_cache_hit_counts_only_its_error(
    server, stub, monkeypatch
):
    """The prompt's cached prefix was found, then the rest's onnxruntime call failed: the
    call ends INTERNAL, its session is gone, and the cache counts no hit (nor the tokens
    it would have served) for it."""
    prompt = [9, 9, 9, 9, 2]
    close(stub, create(stub, prompt=prompt).session_id)  # caches the first piece
    engine = server.server.engine

    def fails(*args, **kwargs):
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(engine, "prefill_unchecked", fails)
    monkeypatch.setattr(engine, "step_unchecked", fails, raising=False)
    for name, call in {
        "create": lambda: create(stub, prompt=prompt[:4] + [3, 3]),
        "generate": lambda: list(
            stub.Generate(pb.GenerateRequest(prompt=prompt[:4] + [3, 3], max_new_tokens=2))
        ),
    }.items():
        got = changed_by(server, functools.partial(code_of, call))
        assert got == {**error("INTERNAL"), **batches(1)}, name  # the failed call is timed


def test_a_prompt_cancelled_by_its_deadline_after_a_cache_hit_counts_only_its_error(
    server, stub, monkeypatch
):
    """The deadline passed while the rest of a partly cached prompt ran: the call counts as
    ended by it (DEADLINE_EXCEEDED, or CANCELLED when the client's cancel came first) and
    its onnxruntime call ran, but nothing else: its session was closed before the rest's
    state landed (no inputs applied, none discarded), no tokens, no cache hit."""
    prompt = [10, 10, 10, 10, 2]
    close(stub, create(stub, prompt=prompt).session_id)
    engine = server.server.engine
    prefill, ran = engine.prefill_unchecked, threading.Event()

    def slow(*args, **kwargs):
        time.sleep(0.5)
        ran.set()
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "prefill_unchecked", slow)
    before = counts(server)
    with pytest.raises(grpc.RpcError):
        stub.CreateSession(pb.CreateSessionRequest(prompt=prompt[:4] + [3, 3]), timeout=0.2)
    assert ran.wait(5)
    expired = {**error("DEADLINE_EXCEEDED"), **batches(1)}
    got = settled_changes(server, before, expired)
    assert got in (expired, {**error("CANCELLED"), **batches(1)})


@pytest.mark.parametrize("rpc", ["CreateSession", "Generate"])
def test_a_prompt_fed_after_its_calls_deadline_counts_only_its_error(server, stub, rpc):
    """The prompt (all from the prefix cache) was fed, but the call's deadline had passed
    meanwhile (the event loop held up): the new session is closed again and the client got
    DEADLINE_EXCEEDED, so neither its tokens nor its cache hit count."""
    prompt = [7, 6, 5, 4, 3]
    close(stub, create(stub, prompt=prompt).session_id)

    class Expired:
        def time_remaining(self):
            return 0.0

    servicer = server.server.servicer
    if rpc == "CreateSession":
        call = servicer.CreateSession(pb.CreateSessionRequest(prompt=prompt), Expired())
    else:
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=2)

        async def generate():
            return [r async for r in servicer.Generate(req, Expired())]

        call = generate()

    def run():
        with pytest.raises((asyncio.CancelledError, concurrent.futures.CancelledError)):
            server.call(call)

    got = changed_by(server, run)
    assert got == error("DEADLINE_EXCEEDED")
    assert counts(server)["ssmstream_sessions_active"] == 0


def test_a_prompt_that_overfills_the_prefix_cache_counts_the_entries_it_evicts(
    toy_token_model,
):
    """A 500-byte cache holds one 4-token entry (180 bytes); an 8-token prompt adds two
    (180 + 212): the oldest entry goes, counted once, and the bytes and entries gauges
    follow."""
    assert (entry_bytes(4, S, D), entry_bytes(8, S, D)) == (180, 212)
    with (
        serve(toy_token_model["model_dir"], metrics_port=0, prefix_cache_mb=500 / 2**20) as srv,
        grpc.insecure_channel(target(srv)) as ch,
    ):
        st = pb_grpc.StreamingInferenceStub(ch)
        got = changed_by(srv, lambda: create(st, prompt=[1] * 4))
        assert got == {
            **tokens("CreateSession", 4),
            **batches(1),
            **cache(misses=1, entries=[4]),
            **sessions(1),
        }
        got = changed_by(srv, lambda: create(st, prompt=[2] * 8))
        assert got == {
            **tokens("CreateSession", 8),
            **batches(1),
            **cache(misses=1, evictions=1, entries=[8]),  # two added, one evicted
            **sessions(1),
        }
        assert counts(srv)["ssmstream_prefix_cache_bytes"] == 180 + 212
