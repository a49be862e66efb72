"""`ssmstream generate --session`'s rewind after a cut: one call with the wait as its
deadline (the server holds it until the cancelled Generate lets go of the session), and
any error named."""

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


def test_one_rewind_with_the_wait_as_its_deadline():
    s = _Session([])
    assert _rewind_after_cut(s, 7, wait=5.0) is None
    assert s.calls == [(7, 5.0)]


def test_an_error_is_named_and_not_retried():
    s = _Session([RpcFailure(grpc.StatusCode.OUT_OF_RANGE, "beyond the rewind window")])
    assert _rewind_after_cut(s, 7, wait=5.0) == " (OUT_OF_RANGE: beyond the rewind window)"
    assert len(s.calls) == 1


def test_a_second_interrupt_is_said():
    s = _Session([KeyboardInterrupt()])
    assert _rewind_after_cut(s, 7) == " (interrupted)"
