"""every ModelInfo / Limits field GetModelInfo reports carries the server's setting in
the field's unit (several were never compared: a client sizing its batching or cache from
ModelInfo would read wrong numbers)."""

from __future__ import annotations

import pytest
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.servicer import model_info

INFO = {
    "name": "toy", "input_kind": "tokens", "vocab_size": 11, "d_input": None, "d_output": 11,
    "state_size": 8, "dtype": "fp32", "provider": "CPUExecutionProvider",
    "step_sha256": "a" * 64, "prefill_sha256": "b" * 64,
}  # fmt: skip


def test_model_info_reports_every_setting_in_its_unit():
    cfg = ServerConfig(
        model_dir="m", max_sessions=7, max_sessions_per_principal=3, max_tokens_per_request=99,
        max_message_bytes=123456, session_ttl=42.5, max_batch=5, max_batch_delay=0.004,
        max_new_tokens=77, rewind_window=33, prefix_cache_mb=1.5, prefix_cache_scope="global",
    )  # fmt: skip
    m = model_info(INFO, cfg, checkpoint_bytes=4321)
    assert (m.name, m.input_kind, m.vocab_size, m.d_input, m.d_output) == (
        "toy",
        "tokens",
        11,
        0,
        11,
    )
    assert (m.state_size, m.state_bytes, m.dtype) == (8, 32, "fp32")
    assert (m.step_sha256, m.prefill_sha256) == ("a" * 64, "b" * 64)
    L = m.limits
    assert (L.max_sessions, L.max_sessions_per_principal, L.max_tokens_per_request) == (7, 3, 99)
    assert (L.max_message_bytes, L.max_batch, L.max_new_tokens) == (123456, 5, 77)
    assert L.session_ttl_seconds == pytest.approx(42.5)
    assert L.max_batch_delay_ms == pytest.approx(4.0)  # milliseconds, not seconds
    assert L.rewind_window == 33 and L.checkpoint_bytes_per_session == 4321
    assert L.prefix_cache_bytes == int(1.5 * 2**20) and L.prefix_cache_scope == "global"


def test_a_model_without_prefill_reports_an_empty_prefill_sha():
    m = model_info({**INFO, "prefill_sha256": None}, ServerConfig(model_dir="m"), 0)
    assert m.prefill_sha256 == ""
