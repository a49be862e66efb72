"""The servicer at its edges: a request that mixes one token with values keeps both (the
service refuses the mix), the largest response the server sends and an OUTPUT_ALL that fills
it exactly, the fields of the Session and Generate replies, and a session made after its
call's deadline closed again by each RPC that makes one."""

from __future__ import annotations

import asyncio
import types

import grpc
import numpy as np
import pytest
from grpc_helpers import serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime import errors
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.metrics import ServerMetrics
from ssmstream.runtime.servicer import (
    StreamingInferenceServicer,
    check_response_size,
    max_send_bytes,
    request_arrays,
    snapshot_message_bytes,
)


def test_one_token_sent_with_values_keeps_the_values():
    """The one-token fast path is only for requests without values: one token and values
    reach the service as sent, which refuses the mix (dropping the values stepped the
    token as if they were never sent)."""
    req = pb.StepRequest(tokens=[3], values=[1.0, 2.5])
    t, v = request_arrays(req.tokens, req.values)
    assert t.tolist() == [3] and v.tolist() == [1.0, 2.5]


def test_the_largest_response_is_never_less_than_a_snapshot_or_one_row():
    """--max-message-bytes below what a snapshot or one row of outputs needs does not make
    those responses unsendable: the send limit is the largest of the three."""
    small = ServerConfig(model_dir="m", max_message_bytes=1000)
    S, D = 100_000, 50  # a 400 KB state, 200 B of outputs per row
    assert snapshot_message_bytes(S) == 4 * S + 1024
    assert max_send_bytes(small, D, S) == 4 * S + 1024  # the snapshot
    assert max_send_bytes(small, 100_000, 10) == 4 * 100_000 + 1024  # one row of outputs
    big = ServerConfig(model_dir="m", max_message_bytes=10**7)
    assert max_send_bytes(big, 100_000, S) == 10**7  # the flag, when it is the largest


def test_an_output_all_that_fills_the_response_exactly_is_accepted():
    """The bound is inclusive: 4·rows·d_output + 256 bytes equal to the send limit fit;
    one byte less refuses."""
    rows, d = 3, 10
    size = 4 * rows * d + 256
    check_response_size(rows, d, size)  # must not raise
    with pytest.raises(errors.LimitExceeded, match="^output: OUTPUT_ALL of 3 inputs x 10"):
        check_response_size(rows, d, size - 1)


@pytest.fixture(scope="module")
def stub(toy_token_model):
    with serve(toy_token_model["model_dir"], session_ttl=120.0) as srv:
        with grpc.insecure_channel(target(srv)) as ch:
            yield pb_grpc.StreamingInferenceStub(ch)


def test_a_new_session_reports_the_ttl_it_got(stub):
    """Session.ttl_seconds is the session's own TTL: the one asked for, else --session-ttl
    (a client schedules its keep-alives from it)."""
    asked = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=30.0), timeout=10)
    default = stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
    assert (asked.ttl_seconds, default.ttl_seconds) == (30.0, 120.0)
    fork = stub.ForkSession(pb.ForkRequest(session_id=asked.session_id), timeout=10)
    assert fork.ttl_seconds == 30.0 and fork.session_id != asked.session_id


class _Context:
    def __init__(self, time_remaining: float):
        self.left = time_remaining

    def time_remaining(self) -> float:
        return self.left


class _MakesSessions:
    """A SessionService stand-in whose create / fork / restore make one session each; it
    records the sessions discarded again."""

    info = {"input_kind": "tokens", "d_input": None, "d_output": 5, "state_size": 4}

    def __init__(self):
        self.discarded = []

    def _new(self):
        return types.SimpleNamespace(id="made", position=0, ttl=60.0)

    async def create(self, *args):
        s = self._new()
        args[-1](s)  # handed_out: create hands the session out (the servicer's deadline check)
        return s, 0

    async def fork(self, *args):
        return self._new()

    async def restore(self, *args):
        return self._new()

    def discard(self, s, principal):
        self.discarded.append(s.id)

    draining = False

    def generate(self, *args, handed_out):
        async def tokens():
            s = handed_out(self._new())  # just before the new session's id goes out
            yield (
                s.id,
                types.SimpleNamespace(token=4, logprob=-0.5, position=1, index=0, finish=None),
            )

        return tokens()

    def attach(self, principal, rpc, cancel):
        return _Attachment(self._new())


class _Attachment:
    """A Stream's attachment whose first step makes the session (a Stream without an id)."""

    def __init__(self, made):
        self.session, self._new, self.drained, self.detached = made, made, False, False

    async def step(self, session_id, tokens, values):
        return np.zeros((len(tokens), 5), np.float32), len(tokens)

    def handed_out(self):
        new, self._new = self._new, None
        return new

    def delivered(self):
        pass

    def detach(self):
        self.detached = True


@pytest.mark.parametrize(
    "rpc, req",
    [
        ("CreateSession", pb.CreateSessionRequest()),
        ("ForkSession", pb.ForkRequest(session_id="a")),
        ("RestoreSession", pb.RestoreRequest(snapshot=b"x")),
    ],
)
def test_a_session_made_after_the_calls_deadline_is_closed_again(rpc, req):
    """A session made when its call's deadline had passed (grpc drops the response: the
    client never learns the id) is discarded, not left holding a slot until its TTL, and
    the call counts as the DEADLINE_EXCEEDED its client got; in time, it is handed out."""
    service, metrics = _MakesSessions(), ServerMetrics()
    servicer = StreamingInferenceServicer(service, ServerConfig(model_dir="m"), metrics)
    reply = asyncio.run(getattr(servicer, rpc)(req, _Context(5.0)))
    assert reply.session_id == "made" and service.discarded == []
    _assert_discarded_past_the_deadline(
        lambda: asyncio.run(getattr(servicer, rpc)(req, _Context(0.0))), service, metrics
    )


def _assert_discarded_past_the_deadline(call, service, metrics) -> None:
    """`call` past its deadline: cancelled, its new session discarded, DEADLINE_EXCEEDED counted."""
    with pytest.raises(asyncio.CancelledError):
        call()
    assert service.discarded == ["made"]
    code = {"code": "DEADLINE_EXCEEDED"}
    assert metrics.registry.get_sample_value("ssmstream_errors_total", code) == 1.0


def test_generate_keeps_its_new_session_only_when_asked(stub):
    """keep_session=True leaves the session a Generate made open for more calls (its id is in
    the responses); without it, the session is closed when the call ends."""
    ids = {}
    for keep in (True, False):
        req = pb.GenerateRequest(prompt=[1, 2], max_new_tokens=2, keep_session=keep)
        (sid,) = {r.session_id for r in stub.Generate(req, timeout=10)}
        ids[keep] = sid
    kept = stub.Step(pb.StepRequest(session_id=ids[True], tokens=[3]), timeout=10)
    assert kept.position == 2 + 1 + 1  # the prompt, the first token fed back, this step
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(pb.StepRequest(session_id=ids[False], tokens=[3]), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_sampled_generate_without_top_p_samples_from_every_token(stub):
    """top_p left out (proto default 0) is nucleus sampling off (1.0), not a top_p of 0 that
    the sampler refuses."""
    req = pb.GenerateRequest(prompt=[1, 2], max_new_tokens=3, temperature=1.0, seed=5)
    assert len(list(stub.Generate(req, timeout=10))) == 3


def test_a_session_a_stream_made_after_the_calls_deadline_is_closed_again():
    """The Stream's first request made the session when the deadline had passed: no
    response goes out (grpc would drop it), the session is discarded and the call counts as
    DEADLINE_EXCEEDED."""
    service, metrics = _MakesSessions(), ServerMetrics()
    servicer = StreamingInferenceServicer(service, ServerConfig(model_dir="m"), metrics)

    async def requests():
        yield pb.StepRequest(tokens=[1])

    async def run(left):
        return [r async for r in servicer.Stream(requests(), _Context(left))]

    (reply,) = asyncio.run(run(5.0))
    assert (reply.session_id, reply.position) == ("made", 1) and service.discarded == []
    _assert_discarded_past_the_deadline(lambda: asyncio.run(run(0.0)), service, metrics)


def test_a_session_a_generate_made_after_the_calls_deadline_is_closed_again():
    """As for a Stream: a Generate's new session whose first response would go out after
    the deadline is discarded (even with keep_session), and the call counts as
    DEADLINE_EXCEEDED."""
    service, metrics = _MakesSessions(), ServerMetrics()
    servicer = StreamingInferenceServicer(service, ServerConfig(model_dir="m"), metrics)
    req = pb.GenerateRequest(prompt=[1], max_new_tokens=1, keep_session=True)

    async def run(left):
        return [r async for r in servicer.Generate(req, _Context(left))]

    (reply,) = asyncio.run(run(5.0))
    assert (reply.session_id, reply.token) == ("made", 4) and service.discarded == []
    _assert_discarded_past_the_deadline(lambda: asyncio.run(run(0.0)), service, metrics)
