"""OUTPUT_TOP_K accepts top_k == d_output (the documented range is [1, d_output])."""

from __future__ import annotations

import numpy as np
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.servicer import check_output_selection, step_response

TOKENS = {"input_kind": "tokens", "vocab_size": 10, "d_input": None, "d_output": 10}


def test_top_k_equal_to_d_output_is_accepted_and_ranks_every_output():
    req = pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=10)
    check_output_selection(req, TOKENS)  # must not raise
    check_output_selection(req, {**TOKENS, "d_output": 10, "vocab_size": 12})
    z = np.random.default_rng(0).standard_normal(10).astype(np.float32)
    r = step_response("s", 1, z[None], req)
    assert sorted(r.top_tokens) == list(range(10))
    assert list(r.top_tokens) == np.argsort(-z, kind="stable").tolist()
