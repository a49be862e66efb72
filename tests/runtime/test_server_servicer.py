"""The servicer's pure protobuf ↔ array helpers and the error → status-code table."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import errors
from ssmstream.runtime.servicer import (
    check_output_selection,
    log_softmax,
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
