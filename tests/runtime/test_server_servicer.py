"""The servicer's pure protobuf ↔ array helpers, the error → status-code table, and the
metrics it updates per token. (Input and sampling checks: test_service.py.)"""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest
from grpc_helpers import serve, target
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime import errors
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    FeaturesCollector,
    ServerMetrics,
    _RateWindow,
)
from ssmstream.runtime.servicer import (
    StreamingInferenceServicer,
    check_output_selection,
    log_softmax,
    request_arrays,
    step_response,
)
from ssmstream.runtime.status import status_of

TOKENS = {"input_kind": "tokens", "vocab_size": 10, "d_input": None, "d_output": 10}
VALUES = {"input_kind": "values", "vocab_size": None, "d_input": 3, "d_output": 2}


@pytest.mark.parametrize(
    "req, info, field",
    [
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=0), TOKENS, "top_k"),
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=11), TOKENS, "top_k"),
        # fewer outputs than the vocabulary (a model config allows it): ranks the outputs
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=7), {**TOKENS, "d_output": 6}, "top_k"),
        (pb.StepRequest(output=pb.OUTPUT_LAST, top_k=3), TOKENS, "top_k"),
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=1), VALUES, "output"),
        (pb.StepRequest(output=7), TOKENS, "output"),
    ],
)
def test_bad_output_selection_names_the_field(req, info, field):
    with pytest.raises(errors.InvalidInput, match=f"^{field}: "):
        check_output_selection(req, info)


def test_output_selection_shapes():
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((4, 10)).astype(np.float32)  # [T, V]
    last = step_response("s", 7, outputs, pb.StepRequest(output=pb.OUTPUT_LAST))
    assert (last.rows, last.cols, last.position) == (1, 10, 7)
    np.testing.assert_array_equal(np.asarray(last.outputs, np.float32), outputs[-1])
    every = step_response("s", 7, outputs, pb.StepRequest(output=pb.OUTPUT_ALL))
    assert (every.rows, every.cols) == (4, 10)
    np.testing.assert_array_equal(np.asarray(every.outputs, np.float32).reshape(4, 10), outputs)
    none = step_response("s", 7, outputs, pb.StepRequest(output=pb.OUTPUT_NONE))
    assert not none.outputs and not none.top_tokens and none.session_id == "s"


def test_request_arrays_keep_the_fields_as_sent():
    t, v = request_arrays(pb.StepRequest(tokens=[3]).tokens, pb.StepRequest().values)
    assert t.dtype == np.int64 and t.tolist() == [3] and v.size == 0
    t, v = request_arrays(pb.StepRequest().tokens, pb.StepRequest(values=[1, 2.5]).values)
    assert t.size == 0 and v.dtype == np.float32 and v.tolist() == [1.0, 2.5]
    t, _ = request_arrays(pb.StepRequest(tokens=[-1, 2**63 - 1]).tokens, ())
    assert t.tolist() == [-1, 2**63 - 1]  # unchecked here: the service refuses them


def test_step_response_encodes_outputs_as_protobuf_would():
    outputs = np.random.default_rng(2).standard_normal((5, 300)).astype(np.float32)  # [T, D]
    for output, rows in [(pb.OUTPUT_LAST, outputs[-1:]), (pb.OUTPUT_ALL, outputs)]:
        want = pb.StepResponse(session_id="abc", position=9, rows=rows.shape[0], cols=300)
        want.outputs.extend(rows.reshape(-1).tolist())
        got = step_response("abc", 9, outputs, pb.StepRequest(output=output))
        assert got == want and got.SerializeToString() == want.SerializeToString()


def test_top_k_log_probs_match_a_direct_softmax():
    z = np.array([0.5, 3.0, -1.0, 2.0, 2.5, 0.0], dtype=np.float32)
    r = step_response("s", 1, z[None], pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=3))
    # independent: python floats, log(exp(z_i) / sum exp(z))
    total = sum(math.exp(float(v)) for v in z)
    expect = sorted(
        ((math.log(math.exp(float(v)) / total), i) for i, v in enumerate(z)), reverse=True
    )
    assert list(r.top_tokens) == [i for _, i in expect[:3]] == [1, 4, 3]
    np.testing.assert_allclose(r.top_logprobs, [lp for lp, _ in expect[:3]], rtol=1e-6)
    assert math.isclose(sum(math.exp(v) for v in log_softmax(z)), 1.0, rel_tol=1e-12)


def test_error_classes_map_to_status_codes():
    C = grpc.StatusCode
    cases = [
        (errors.InvalidInput("tokens", "bad"), C.INVALID_ARGUMENT, "tokens: bad"),
        (errors.SessionNotFound("x", "evicted"), C.NOT_FOUND, "(evicted)"),
        (errors.LimitExceeded("full"), C.RESOURCE_EXHAUSTED, "full"),
        (errors.SessionBusy("attached"), C.FAILED_PRECONDITION, "attached"),
        (errors.ModelError("other model"), C.FAILED_PRECONDITION, "other model"),
        (errors.Unavailable("draining"), C.UNAVAILABLE, "draining"),
        (errors.EngineFailure("ort"), C.INTERNAL, "ort"),
        (errors.OutOfRange("inputs", "past"), C.OUT_OF_RANGE, "inputs: past"),
        (errors.CorruptState("nan"), C.DATA_LOSS, "nan"),
        (KeyError("secret detail"), C.INTERNAL, "internal error"),
    ]
    for exc, code, text in cases:
        got, message = status_of(exc)
        assert got == code and text in message, exc
    assert "secret" not in status_of(KeyError("secret detail"))[1]


def _samples(registry) -> set[str]:
    text = generate_latest(registry).decode()
    return {
        ln for ln in text.splitlines() if ln and not ln.startswith("#") and "_created" not in ln
    }


def test_per_token_metrics_expose_what_prometheus_clients_own_metrics_would():
    """ServerMetrics' lock-free counters and histograms vs prometheus-client's Counter and
    Histogram fed the same observations: the same samples on /metrics."""
    rng = np.random.default_rng(3)
    ours = ServerMetrics()
    ref = CollectorRegistry()
    tokens = Counter("ssmstream_tokens", "t", ["rpc"], registry=ref)
    requests = Counter("ssmstream_requests", "r", ["rpc"], registry=ref)
    latency = Histogram(
        "ssmstream_request_latency_seconds", "l", ["rpc"], buckets=LATENCY_BUCKETS, registry=ref
    )
    size = Histogram("ssmstream_batch_size", "s", buckets=BATCH_BUCKETS, registry=ref)
    batch = Histogram("ssmstream_batch_latency_seconds", "b", buckets=LATENCY_BUCKETS, registry=ref)
    edges = [*LATENCY_BUCKETS, 0.0, 1e3]  # exactly on a bound counts in that bucket (le)
    for i in range(400):
        rpc = ["Stream", "Step", "Generate"][i % 3]
        n = int(rng.integers(1, 9))
        seconds = float(edges[i] if i < len(edges) else 10 ** rng.uniform(-5, 1.5))
        ours.count_tokens(rpc, n)
        ours.observe_request(rpc, seconds)
        tokens.labels(rpc).inc(n)
        requests.labels(rpc).inc()
        latency.labels(rpc).observe(seconds)
        if i % 4 == 0:
            B = int(rng.choice([1, 2, 3, 64, 1024, 5000]))
            ours.observe_batch(B, seconds)
            size.observe(B)
            batch.observe(seconds)
    ours.count_error("NOT_FOUND")
    Counter("ssmstream_errors", "e", ["code"], registry=ref).labels("NOT_FOUND").inc()
    Gauge("ssmstream_draining", "d", registry=ref)
    got = {
        s for s in _samples(ours.registry) if "tokens_per_second" not in s and "process_" not in s
    }  # (the process's own metrics: memory, CPU, descriptors)
    assert got == _samples(ref)


def test_rate_window_counts_the_last_seconds():
    now = [100.2]
    rate = _RateWindow(window=10, clock=lambda: now[0])
    events = {100: 5, 101: 7, 104: 1, 109: 3, 110: 2, 115: 4}  # second -> events
    for second, n in events.items():
        now[0] = second + 0.5
        rate.add(n)
    now[0] = 115.9  # the window is the bins of seconds 106..115: 9.9 s up to now
    assert rate.rate() == pytest.approx((3 + 2 + 4) / 9.9)
    now[0] = 130.0
    assert rate.rate() == 0.0


def test_rate_window_reads_a_steady_rate_wherever_in_the_second_it_is_read():
    """100 events/s read at any fraction of a second read 100 (the bins kept cover
    window - 1 s plus the current fraction; dividing by the window read 90 to 99.8)."""
    now = [1000.0]
    rate = _RateWindow(window=10, clock=lambda: now[0])
    readings = []
    for i in range(4000):  # one event every 10 ms for 40 s
        now[0] = 1000.0 + i * 0.01
        rate.add(1)
        if i > 2000 and i % 37 == 0:
            readings.append(rate.rate())
    assert min(readings) > 98.5 and max(readings) < 101.5, (min(readings), max(readings))


def test_rate_window_in_the_first_seconds_divides_by_the_time_since_start():
    """Right after a start the window is not full yet: 50 events in the first second read
    50/s (dividing by the whole window read about a tenth of it)."""
    now = [100.0]
    rate = _RateWindow(window=10, clock=lambda: now[0])
    now[0] = 100.5
    rate.add(50)
    now[0] = 101.0
    assert rate.rate() == pytest.approx(50.0)
    now[0] = 102.0
    rate.add(0)
    assert rate.rate() == pytest.approx(25.0)  # 50 events in 2 s


class _Recorder:
    """A SessionService stand-in for the servicer: records generate's arguments."""

    def __init__(self, info: dict):
        self.info, self.calls = info, []

    def generate(self, *args, **kw):
        self.calls.append(args)

        async def none():
            return
            yield

        return none()


def _servicer(info: dict) -> tuple[StreamingInferenceServicer, _Recorder]:
    svc = _Recorder(info)
    return StreamingInferenceServicer(svc, ServerConfig(model_dir="m"), ServerMetrics()), svc


def test_generate_without_a_seed_asks_for_an_unseeded_generation():
    """No seed: None (a fresh random generator); seed 0 is a seed like any other."""
    servicer, svc = _servicer({**TOKENS, "state_size": 4})

    async def generate(**seed):
        request = pb.GenerateRequest(prompt=[1], max_new_tokens=3, **seed)
        return [r async for r in servicer.Generate(request, None)]

    for seed in ({}, {"seed": 0}, {"seed": 7}):
        asyncio.run(generate(**seed))
    assert [args[7] for args in svc.calls] == [None, 0, 7]  # generate(…, top_p, seed, …)


def test_output_all_of_a_values_model_counts_rows_not_values():
    """A values request of T rows × d_input values answers T output rows: the response size
    check counts rows (counting values refused answers that fit)."""
    d_in, d_out = 8, 2**16  # 256 KiB per output row; the response limit is 4 MiB
    info = {"input_kind": "values", "d_input": d_in, "d_output": d_out, "state_size": 4}
    servicer, _ = _servicer(info)
    assert servicer.max_send == 4 * 2**20  # --max-message-bytes: a gRPC client's default

    def request(rows):
        values = np.ones(rows * d_in, np.float32).tolist()
        return pb.StepRequest(values=values, output=pb.OUTPUT_ALL)

    tokens, values = servicer._check_request(request(15))  # 3.75 MiB: fits
    assert tokens.size == 0 and values.shape == (15 * d_in,)
    with pytest.raises(errors.LimitExceeded, match="^output: OUTPUT_ALL of 16 inputs x 65536"):
        servicer._check_request(request(16))  # 4 MiB and the message's other fields


@pytest.fixture(scope="module")
def stub(toy_token_model):
    with serve(toy_token_model["model_dir"]) as srv:
        with grpc.insecure_channel(target(srv)) as ch:
            yield pb_grpc.StreamingInferenceStub(ch)


def test_snapshot_names_the_step_graph_its_state_belongs_to(stub):
    """Snapshot.model_sha256 is the served step graph's sha256 (ModelInfo.step_sha256),
    the field a client checks before restoring the snapshot elsewhere."""
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    s = stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
    stub.Step(pb.StepRequest(session_id=s.session_id, tokens=[1, 2]), timeout=10)
    snap = stub.SnapshotSession(pb.SnapshotRequest(session_id=s.session_id), timeout=10)
    assert len(info.step_sha256) == 64
    assert snap.model_sha256 == info.step_sha256
    assert (snap.session_id, snap.position) == (s.session_id, 2)


def test_limits_report_the_rewind_checkpoint_bytes_per_session(stub, toy_token_model):
    """ModelInfo.limits.checkpoint_bytes_per_session is the service's bound, not 0
    (rewind_window defaults to 4096, so rewind history is kept)."""
    lim = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits
    assert lim.rewind_window == 4096
    # History.max_bytes: at most 2 * W / chunk + 3 checkpoints of S float32, W + chunk int64 inputs
    W, chunk, S = 4096, toy_token_model["chunk"], toy_token_model["S"]
    assert lim.checkpoint_bytes_per_session == (2 * W // chunk + 3) * 4 * S + (W + 3 * chunk) * 8


def test_metrics_listen_only_on_the_host_they_are_given():
    """Serve(port, host) binds that address (127.0.0.1: not reachable from outside),
    not every interface."""
    m = ServerMetrics()
    port = m.serve(0, "127.0.0.1")
    try:
        assert m._http.server_address[:2] == ("127.0.0.1", port)
        assert m._http.socket.getsockname()[:2] == ("127.0.0.1", port)
    finally:
        m.close()


def test_a_scrape_whose_stats_fail_still_answers_the_other_metrics(caplog):
    """A stats() that raises (any exception) is logged and its families left out; the
    scrape still answers (a scrape must never take the server down)."""
    m = ServerMetrics()

    def broken():
        raise RuntimeError("store is gone")

    def broken_features():
        raise KeyError("prefix_cache")

    m.watch_store(broken)
    m.registry.register(FeaturesCollector(broken_features))
    m.count_tokens("Step", 3)
    text = generate_latest(m.registry).decode()
    assert 'ssmstream_tokens_total{rpc="Step"} 3.0' in text
    assert "ssmstream_sessions_active" not in text and "ssmstream_prefix_cache" not in text
    assert "metrics: SessionStore.stats() failed" in caplog.text
    assert "metrics: SessionService.feature_stats() failed" in caplog.text


def test_feature_metrics_map_each_stat_to_its_own_family():
    """Each prefix-cache / rewind stat lands in its own family (distinct values, so a
    swapped pair shows)."""
    from prometheus_client import CollectorRegistry

    stats = {
        "prefix_cache": {"hits": 3, "misses": 5, "cached_tokens": 70, "evictions": 2,
                         "bytes": 4096, "entries": 7},
        "checkpoint_bytes": 1234,
    }  # fmt: skip
    reg = CollectorRegistry()
    reg.register(FeaturesCollector(lambda: stats))
    got = {
        name: reg.get_sample_value(name)
        for name in (
            "ssmstream_prefix_cache_hits_total", "ssmstream_prefix_cache_misses_total",
            "ssmstream_prefix_cache_cached_tokens_total", "ssmstream_prefix_cache_evictions_total",
            "ssmstream_prefix_cache_bytes", "ssmstream_prefix_cache_entries",
            "ssmstream_rewind_checkpoint_bytes",
        )
    }  # fmt: skip
    assert got == {
        "ssmstream_prefix_cache_hits_total": 3.0, "ssmstream_prefix_cache_misses_total": 5.0,
        "ssmstream_prefix_cache_cached_tokens_total": 70.0,
        "ssmstream_prefix_cache_evictions_total": 2.0, "ssmstream_prefix_cache_bytes": 4096.0,
        "ssmstream_prefix_cache_entries": 7.0, "ssmstream_rewind_checkpoint_bytes": 1234.0,
    }  # fmt: skip


def test_a_bin_leaves_the_rate_when_its_second_leaves_the_window():
    """Events of second 100 count while second 100 is in the window (up to 109.x) and
    not from 110.0 on, also when no later event started a new bin (the current bin is
    kept exactly as _trim keeps finished ones)."""
    from ssmstream.runtime.metrics import _RateWindow

    now = [100.0]
    rate = _RateWindow(window=10, clock=lambda: now[0])
    now[0] = 100.5
    rate.add(50)
    now[0] = 109.5
    assert rate.rate() == 50 / 9.5  # seconds 100..109.5
    now[0] = 110.25
    assert rate.rate() == 0.0
    rate.add(4)  # a new bin (second 110) starts; second 100's bin is dropped
    assert rate.rate() == 4 / 9.25


def test_limits_report_the_prefix_cache_bytes_the_cache_holds(toy_token_model):
    """A fractional --prefix-cache-mb: GetModelInfo says the byte budget the cache keeps
    (rounded up, as the server sets it), not one byte less."""
    with serve(toy_token_model["model_dir"], prefix_cache_mb=0.0002) as srv:  # 209.7 bytes
        with grpc.insecure_channel(target(srv)) as ch:
            info = pb_grpc.StreamingInferenceStub(ch).GetModelInfo(pb.GetModelInfoRequest())
        held = srv.server.service.prefix_cache.max_bytes
    assert info.limits.prefix_cache_bytes == held == 210


def test_a_rewind_answers_the_position_it_went_to():
    """A Step queued behind a RewindSession may run before the rewind's answer is written:
    the answer still says the position the rewind left the session at."""

    class Moved:
        id, position, ttl = "s", 9, 600.0  # a later Step took it from 4 to 9

    class Service:
        info = {**TOKENS, "state_size": 4}

        async def rewind(self, principal, session_id, position):
            return Moved()

    servicer = StreamingInferenceServicer(Service(), ServerConfig(model_dir="m"), ServerMetrics())
    request = pb.RewindRequest(session_id="s", position=4)
    answer = asyncio.run(servicer.RewindSession(request, None))
    assert (answer.session_id, answer.position) == ("s", 4)
