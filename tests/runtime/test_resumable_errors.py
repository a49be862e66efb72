"""resumable_error for each SessionBusy the server says as FAILED_PRECONDITION: each is
passing (a retry may succeed), unlike the permanent refusals sharing that code."""

from __future__ import annotations

import grpc
import pytest
from grpc_helpers import RpcFailure
from ssmstream.runtime.client import resumable_error

BUSY = grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "details",
    [
        "session 'a' is held by replica 'r1'; retry",
        "session 'a' is attached to an open Stream",
        "session 'a' changed on another replica while a step of it is in flight here; retry",
    ],
    ids=["lease", "attached", "step-in-flight"],
)
def test_each_busy_session_is_resumable(details):
    assert resumable_error(RpcFailure(BUSY, details))
    assert not resumable_error(RpcFailure(BUSY, "snapshot of another model"))
