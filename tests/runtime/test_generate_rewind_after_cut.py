"""`ssmstream generate --session`'s rewind after a cut retries while the cancelled
Generate still holds the session (FAILED_PRECONDITION "attached to an open Generate"), and
gives up at once on any other error."""

from __future__ import annotations

import grpc
from grpc_helpers import RpcFailure
from ssmstream.runtime.generate import _rewind_after_cut


class _Session:
    def __init__(self, errors):
        self.errors, self.calls = list(errors), []

    def rewind(self, position, timeout=None):
        self.calls.append((position, timeout))
        if self.errors:
            raise self.errors.pop(0)
        return position


BUSY = RpcFailure(
    grpc.StatusCode.FAILED_PRECONDITION, "session 's' is attached to an open Generate"
)


def test_a_session_still_held_by_the_cancelled_generate_is_retried_until_it_is_free():
    s = _Session([BUSY, BUSY])
    assert _rewind_after_cut(s, 7, wait=5.0) is None
    assert [p for p, _ in s.calls] == [7, 7, 7]
    assert all(0 < t <= 5.0 for _, t in s.calls)  # each try's deadline: what is left
    first, second, third = (t for _, t in s.calls)
    assert first > second > third  # less on each try


def test_another_error_is_not_retried_and_is_named():
    s = _Session([RpcFailure(grpc.StatusCode.OUT_OF_RANGE, "beyond the rewind window")])
    assert _rewind_after_cut(s, 7, wait=5.0) == " (OUT_OF_RANGE: beyond the rewind window)"
    assert len(s.calls) == 1


def test_retries_stop_when_the_wait_is_over():
    s = _Session([BUSY] * 1000)
    why = _rewind_after_cut(s, 7, wait=0.2)
    assert why == f" (FAILED_PRECONDITION: {BUSY.details()})" and 1 < len(s.calls) < 1000
    assert min(t for _, t in s.calls) >= 0.05  # the last try too (a timeout <= 0 is refused)
