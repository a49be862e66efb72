"""The servicer's pure protobuf ↔ array helpers, the error → status-code table, and the
metrics it updates per token."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import errors
from ssmstream.runtime.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServerMetrics, _RateWindow
from ssmstream.runtime.servicer import (
    check_output_selection,
    log_softmax,
    packed_floats,
    request_inputs,
    request_ttl,
    sampling_config,
    status_of,
    step_response,
)

TOKENS = {"input_kind": "tokens", "vocab_size": 10, "d_input": None, "d_output": 10}
VALUES = {"input_kind": "values", "vocab_size": None, "d_input": 3, "d_output": 2}


def test_token_inputs_become_int64_vector():
    x = request_inputs(pb.StepRequest(tokens=[0, 9, 4]), TOKENS, max_tokens=8)
    assert x.dtype == np.int64 and x.tolist() == [0, 9, 4]


def test_values_become_float32_rows():
    req = pb.StepRequest(values=[1, 2, 3, 4, 5, 6])
    x = request_inputs(req, VALUES, max_tokens=8)
    assert x.dtype == np.float32 and x.shape == (2, 3)
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize(
    "req, info, exc, field",
    [
        (pb.StepRequest(), TOKENS, errors.InvalidInput, "tokens"),
        (pb.StepRequest(tokens=[1, 10]), TOKENS, errors.InvalidInput, "tokens"),
        (pb.StepRequest(tokens=[-1]), TOKENS, errors.InvalidInput, "tokens"),
        (pb.StepRequest(tokens=[2**63 - 1]), TOKENS, errors.InvalidInput, "tokens"),
        (pb.StepRequest(tokens=[1], values=[1.0]), TOKENS, errors.InvalidInput, "values"),
        (pb.StepRequest(tokens=list(range(9))), TOKENS, errors.LimitExceeded, "tokens"),
        (pb.StepRequest(values=[1, 2]), VALUES, errors.InvalidInput, "values"),
        (pb.StepRequest(values=[1, 2, math.nan]), VALUES, errors.InvalidInput, "values"),
        (pb.StepRequest(values=[1, 2, math.inf]), VALUES, errors.InvalidInput, "values"),
        (pb.StepRequest(tokens=[1]), VALUES, errors.InvalidInput, "tokens"),
        (pb.StepRequest(values=[0.0] * 27), VALUES, errors.LimitExceeded, "values"),
    ],
)
def test_bad_inputs_name_the_field(req, info, exc, field):
    with pytest.raises(exc) as e:
        request_inputs(req, info, max_tokens=8)
    assert str(e.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "req, info, field",
    [
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=0), TOKENS, "top_k"),
        (pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=11), TOKENS, "top_k"),
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


@pytest.mark.parametrize("shape", [(1, 10), (3, 200), (1, 1), (0, 4)])
def test_packed_floats_equal_protobufs_own_encoding(shape):
    """The hand-written wire format parses to the same message protobuf builds from a list,
    special values and a float64 input (rounded to float32) included."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 1e3  # float64
    special = [np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38]
    x.reshape(-1)[: len(special)] = special[: x.size]
    built = pb.StepResponse(session_id="s", position=3)
    built.outputs.extend(float(v) for v in x.reshape(-1))
    merged = pb.StepResponse(session_id="s", position=3)
    merged.MergeFromString(packed_floats(3, x))
    assert merged.SerializeToString() == built.SerializeToString()
    assert np.asarray(merged.outputs, np.float32).tobytes() == x.astype(np.float32).tobytes()
    strided = np.asarray(x.T)  # a non-contiguous view is encoded in row-major order
    merged.Clear()
    merged.MergeFromString(packed_floats(3, strided))
    np.testing.assert_array_equal(
        np.asarray(merged.outputs, np.float32), strided.reshape(-1).astype(np.float32)
    )


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
        (KeyError("secret detail"), C.INTERNAL, "internal error"),
    ]
    for exc, code, text in cases:
        got, message = status_of(exc)
        assert got == code and text in message, exc
    assert "secret" not in status_of(KeyError("secret detail"))[1]


def test_request_ttl_bounds():
    assert request_ttl(0.0, "ttl_seconds", 60) is None
    assert request_ttl(30.0, "ttl_seconds", 60) == 30.0
    for bad in (-1.0, 61.0, math.inf, math.nan):
        with pytest.raises(errors.InvalidInput, match="^ttl_seconds: "):
            request_ttl(bad, "ttl_seconds", 60)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 101}, "max_new_tokens"),
        ({"top_k": 11}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"stop_tokens": [10]}, "stop_tokens"),
    ],
)
def test_bad_sampling_fields_name_the_field(kwargs, field):
    req = pb.GenerateRequest(**{"prompt": [1], "max_new_tokens": 5, **kwargs})
    with pytest.raises(errors.InvalidInput, match=f"^{field}: "):
        sampling_config(req, TOKENS, max_new_tokens=100)


def test_sampling_defaults_mean_off():
    cfg = sampling_config(pb.GenerateRequest(max_new_tokens=5), TOKENS, 100)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed) == (0.0, 0, 1.0, None)
    seeded = pb.GenerateRequest(max_new_tokens=5, seed=0, temperature=0.5)
    assert sampling_config(seeded, TOKENS, 100).seed == 0


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
    got = {s for s in _samples(ours.registry) if "tokens_per_second" not in s}
    assert got == _samples(ref)


def test_rate_window_counts_the_last_seconds():
    now = [100.2]
    rate = _RateWindow(window=10, clock=lambda: now[0])
    events = {100: 5, 101: 7, 104: 1, 109: 3, 110: 2, 115: 4}  # second -> events
    for second, n in events.items():
        now[0] = second + 0.5
        rate.add(n)
    now[0] = 115.9  # the window is the bins of seconds 106..115
    assert rate.rate() == pytest.approx((3 + 2 + 4) / 10)
    now[0] = 130.0
    assert rate.rate() == 0.0
