"""The StreamingInference servicer: protobuf ↔ numpy arrays and a call to the SessionService
(runtime/service.py), which does everything else. This module only

  * turns a request's fields into arrays (unchecked: the service validates),
  * turns outputs into a response (output selection: last row, all rows, top-k
    log-probs, nothing; refused before the call when the model cannot answer it),
  * counts tokens and request latency in the metrics,
  * maps runtime errors to status codes — in one place, `grpc_errors` — naming the
    request's field where the service's parameter is called otherwise (`as_sent`).

Dimension letters: T inputs in one request, V vocabulary size, D d_output, I d_input,
K top-k.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import numpy as np
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc

from .auth import current_principal
from .config import ServerConfig
from .errors import InvalidInput, LimitExceeded, Unavailable
from .generation import FINISH_MAX, FINISH_STOP, log_softmax
from .metrics import ServerMetrics
from .service import SessionService
from .sessions import Session
from .status import check_decoded, deadline_passed, end_as_expired, grpc_errors

log = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"

# --- protobuf ↔ arrays (pure helpers) -------------------------------------------------------


def request_arrays(tokens, values) -> tuple[np.ndarray, np.ndarray]:
    """A request's `tokens` / `values` fields as arrays: int64 [n], float32 [n] (unchecked)."""
    if len(tokens) == 1 and not len(values):  # the streaming hot path
        return np.array((tokens[0],), dtype=np.int64), _NO_VALUES  # 6x faster than (tokens)
    t = np.array(tokens, dtype=np.int64) if len(tokens) else _NO_TOKENS  # 6x np.fromiter's speed
    v = np.asarray(values, dtype=np.float32) if len(values) else _NO_VALUES
    return t, v


_NO_TOKENS, _NO_VALUES = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
_OUTPUT_SELECTIONS = frozenset(pb.OutputSelection.values())


@functools.lru_cache(maxsize=64)  # a stream's responses are all of one length
def _varint(n: int) -> bytes:
    """A protobuf base-128 varint (n >= 0)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def packed_floats(tag: bytes, x: np.ndarray) -> bytes:
    """`x` as a packed `repeated float` field on the protobuf wire: the field's tag, the byte
    length, the float32 little-endian values. Merged into a message it equals extending the
    field by x's values, at a fifth of the cost for 256 floats (no Python float per value)."""
    data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    return tag + _varint(len(data)) + data


# tag of StepResponse.outputs: field number, wire type 2 (length-delimited, packed)
_OUTPUTS_TAG = _varint(pb.StepResponse.DESCRIPTOR.fields_by_name["outputs"].number << 3 | 2)


def check_output_selection(req: pb.StepRequest, info: dict) -> None:
    """Refuse an output selection the model cannot answer (before any step runs)."""
    if not req.output and not req.top_k:  # the default, OUTPUT_LAST: always answerable
        return
    if req.output not in _OUTPUT_SELECTIONS:
        raise InvalidInput("output", f"unknown OutputSelection {req.output}")
    if req.output == pb.OUTPUT_TOP_K:
        if info["input_kind"] != "tokens":
            raise InvalidInput("output", "OUTPUT_TOP_K needs a token model (logits)")
        D = int(info["d_output"])  # the logits ranked (the vocabulary's, as the export writes)
        if not 1 <= req.top_k <= D:
            raise InvalidInput("top_k", f"must be in [1, d_output={D}] with OUTPUT_TOP_K")
    elif req.top_k:
        raise InvalidInput("top_k", "is only used with output=OUTPUT_TOP_K")


def max_send_bytes(config: ServerConfig, d_output: int, state_size: int) -> int:
    """The largest response message the server sends (grpc.max_send_message_length): the
    largest request it takes, --max-message-bytes, whose default is what a gRPC client
    receives by default (4 MiB: a larger response would fail in the client after its step
    applied), but never less than the responses no call can do without: one row of outputs
    (OUTPUT_LAST) and a snapshot, with 1 KiB for their other fields."""
    return max(config.max_message_bytes, 4 * d_output + 1024, snapshot_message_bytes(state_size))


def snapshot_message_bytes(state_size: int) -> int:
    """The most bytes a message carrying one snapshot takes: the state's 4·S, with 1 KiB for
    the snapshot's header and signature and the message's other fields (an id of <= 128)."""
    return 4 * state_size + 1024


def check_response_size(rows: int, d_output: int, max_send: int) -> None:
    """Refuse, before any step runs, an OUTPUT_ALL whose [rows, d_output] outputs would not fit
    in one response (else the step would apply and only its response fail)."""
    size = 4 * rows * d_output + 256  # the floats plus the message's other fields
    if size > max_send:
        raise LimitExceeded(
            f"output: OUTPUT_ALL of {rows} inputs x {d_output} outputs is about {size} bytes, "
            f"more than the largest response ({max_send} bytes: --max-message-bytes); send "
            f"fewer inputs per request or ask for OUTPUT_LAST"
        )


def step_response(
    session_id: str, position: int, outputs: np.ndarray, req: pb.StepRequest
) -> pb.StepResponse:
    """Fill a StepResponse from outputs [T, D] as `req.output` selects."""
    resp = pb.StepResponse(session_id=session_id, position=position)
    if req.output == pb.OUTPUT_NONE:
        return resp
    if req.output == pb.OUTPUT_TOP_K:
        lp = log_softmax(outputs[-1])  # [V]
        k = int(req.top_k)
        top = np.argpartition(-lp, k - 1)[:k]  # [K] unordered
        top = top[np.argsort(-lp[top], kind="stable")]  # [K] most likely first
        resp.top_tokens.extend(top.tolist())
        resp.top_logprobs.extend(lp[top].tolist())
        return resp
    rows = outputs if req.output == pb.OUTPUT_ALL else outputs[-1:]  # [T or 1, D]
    resp.rows, resp.cols = rows.shape
    resp.MergeFromString(packed_floats(_OUTPUTS_TAG, rows))
    return resp


def model_info(info: dict, config: ServerConfig, checkpoint_bytes: int) -> pb.ModelInfo:
    """ModelInfo from Engine.info, the server config and the most rewind checkpoint bytes
    per session."""
    S = int(info["state_size"])
    return pb.ModelInfo(
        name=str(info.get("name", "")),
        input_kind=info["input_kind"],
        vocab_size=int(info.get("vocab_size") or 0),
        d_input=int(info.get("d_input") or 0),
        d_output=int(info["d_output"]),
        state_size=S,
        state_bytes=4 * S,
        dtype=str(info.get("dtype", "")),
        provider=str(info.get("provider", "")),
        step_sha256=str(info.get("step_sha256", "")),
        prefill_sha256=str(info.get("prefill_sha256") or ""),
        server_version=SERVER_VERSION,
        limits=pb.Limits(
            max_sessions=config.max_sessions,
            max_sessions_per_principal=config.max_sessions_per_principal,
            max_tokens_per_request=config.max_tokens_per_request,
            max_message_bytes=config.max_message_bytes,
            session_ttl_seconds=config.session_ttl,
            max_batch=config.max_batch,
            max_batch_delay_ms=1e3 * config.max_batch_delay,
            max_new_tokens=config.max_new_tokens,
            rewind_window=config.rewind_window,
            checkpoint_bytes_per_session=checkpoint_bytes,
            prefix_cache_bytes=config.prefix_cache_bytes,
            prefix_cache_scope=config.prefix_cache_scope,
        ),
    )


def session_message(s, cached_tokens: int = 0, position: int | None = None) -> pb.Session:
    """position: the one to report (default: the session's now)."""
    position = s.position if position is None else position
    return pb.Session(
        session_id=s.id, position=position, ttl_seconds=s.ttl, cached_tokens=cached_tokens
    )


# the SessionService parameters whose request fields are named otherwise
FIELD_OF_PARAMETER = {"ttl": "ttl_seconds", "stop": "stop_tokens"}


@contextlib.contextmanager
def as_sent():
    """An InvalidInput about a service parameter that the request calls otherwise
    (FIELD_OF_PARAMETER) names the request's field: the client sent `stop_tokens`."""
    try:
        yield
    except InvalidInput as e:
        field = FIELD_OF_PARAMETER.get(e.field)
        if field is None:
            raise
        raise InvalidInput(field, str(e)[len(e.field) + 2 :]) from None


_FINISH = {
    None: pb.FINISH_NONE,
    FINISH_MAX: pb.FINISH_MAX_TOKENS,
    FINISH_STOP: pb.FINISH_STOP_TOKEN,
}


# --- the servicer -----------------------------------------------------------------------------


class StreamingInferenceServicer(pb_grpc.StreamingInferenceServicer):
    """Thin: protobuf ↔ arrays, a call to the SessionService, metrics; errors → status codes
    in `grpc_errors`."""

    def __init__(self, service: SessionService, config: ServerConfig, metrics: ServerMetrics):
        self.service, self.config, self.metrics = service, config, metrics
        self.info = service.info
        self.d_output = int(self.info["d_output"])
        self.max_send = max_send_bytes(config, self.d_output, int(self.info["state_size"]))
        self.d_input = int(self.info.get("d_input") or 1)  # values per input row

    def _check_request(self, req: pb.StepRequest) -> tuple[np.ndarray, np.ndarray]:
        """The output selection and the response size, checked before any step runs; the
        request's inputs as arrays (SessionService checks them)."""
        check_output_selection(req, self.info)
        tokens, values = request_arrays(req.tokens, req.values)
        if req.output == pb.OUTPUT_ALL:
            rows = len(tokens) or len(values) // self.d_input
            check_response_size(rows, self.d_output, self.max_send)
        return tokens, values

    def _handed_out(self, s: Session, context) -> Session:
        """`s`, the session this call created, unless the call's deadline passed meanwhile (a
        long prompt's prefill, the event loop held up): grpc would drop the response, so the
        client would never learn the id. The session is closed again (not left holding a
        slot and the principal's quota until its TTL) and the call ends as grpc ends a call
        it cancels (the client has its DEADLINE_EXCEEDED; a status sent now would fail)."""
        if not deadline_passed(context):
            return s
        self.service.discard(s, current_principal())
        log.info("session %r closed again: its call's deadline passed while it was made", s.id)
        end_as_expired()

    @grpc_errors
    async def GetModelInfo(self, request, context):
        return model_info(self.info, self.config, self.service.checkpoint_bytes_per_session())

    @grpc_errors
    async def CreateSession(self, request, context):
        with as_sent():
            s, cached = await self.service.create(
                current_principal(),
                request.session_id,
                request.ttl_seconds,
                request.snapshot,
                request_arrays(request.prompt, ())[0],
                functools.partial(self._handed_out, context=context),
            )
        if request.prompt:
            self.metrics.count_tokens("CreateSession", len(request.prompt))
        return session_message(s, cached)

    @grpc_errors
    async def CloseSession(self, request, context):
        return session_message(await self.service.close(current_principal(), request.session_id))

    @grpc_errors
    async def SnapshotSession(self, request, context):
        data, position = await self.service.snapshot(current_principal(), request.session_id)
        return pb.Snapshot(
            session_id=request.session_id,
            position=position,
            model_sha256=self.service.store.model_sha,
            data=data,
        )

    @grpc_errors
    async def RestoreSession(self, request, context):
        with as_sent():
            s = await self.service.restore(
                current_principal(), request.snapshot, request.session_id, request.ttl_seconds
            )
        return session_message(self._handed_out(s, context))

    @grpc_errors
    async def ForkSession(self, request, context):
        s = await self.service.fork(current_principal(), request.session_id, request.new_session_id)
        return session_message(self._handed_out(s, context))

    @grpc_errors
    async def RewindSession(self, request, context):
        s = await self.service.rewind(current_principal(), request.session_id, request.position)
        # where the rewind left it: a Step queued behind the rewind may have moved it on since
        return session_message(s, position=request.position)

    @grpc_errors
    async def Step(self, request, context):
        t0 = time.perf_counter()
        tokens, values = self._check_request(request)
        outputs, position = await self.service.step(
            current_principal(), request.session_id, tokens, values
        )
        self.metrics.count_tokens("Step", len(outputs))
        self.metrics.observe_request("Step", time.perf_counter() - t0)
        return step_response(request.session_id, position, outputs, request)

    @grpc_errors
    async def Stream(self, request_iterator, context):
        a = self.service.attach(current_principal(), "Stream", asyncio.current_task().cancel)
        try:
            async for req in request_iterator:
                t0 = time.perf_counter()
                check_decoded(req)
                outputs, position = await a.step(req.session_id, *self._check_request(req))
                if (new := a.handed_out()) is not None:  # the id goes out with this response
                    self._handed_out(new, context)
                yield step_response(a.session.id, position, outputs, req)
                a.delivered()
                self.metrics.count_tokens("Stream", len(outputs))
                self.metrics.observe_request("Stream", time.perf_counter() - t0)
                if self.service.draining:  # do not wait for a next request that would be refused
                    raise Unavailable(self.service.draining_says)
            # a client's cancel ends the requests as a half-close does, and grpc cancels this
            # task when the call's close reaches the event loop, most often in this loop turn:
            # let it land here, so that the call counts as CANCELLED. One that comes later
            # ends the call as OK (waiting for it would hold every half-closed stream's end)
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if a.drained:
                raise Unavailable(self.service.draining_says) from None
            raise
        finally:
            a.detach()

    @grpc_errors
    async def Generate(self, request, context):
        stream = self.service.generate(  # closed (its session let go) when this one is
            current_principal(),
            request.session_id,
            request_arrays(request.prompt, ())[0],
            request.max_new_tokens,
            float(request.temperature),
            int(request.top_k),
            1.0 if request.top_p == 0 else float(request.top_p),  # proto default 0: off
            request.seed if request.HasField("seed") else None,
            request.stop_tokens,  # read only up to the most that can be valid
            request.keep_session,
            handed_out=lambda s: self._handed_out(s, context),
        )
        t0, n = time.perf_counter(), len(request.prompt)
        with as_sent():  # a refused argument named as the request's field
            async with contextlib.aclosing(stream):
                async for sid, g in stream:
                    self.metrics.count_tokens("Generate", n)
                    self.metrics.observe_request("Generate", time.perf_counter() - t0, g.index == 0)
                    yield pb.GenerateResponse(
                        session_id=sid,
                        token=g.token,
                        logprob=g.logprob,
                        position=g.position,
                        index=g.index,
                        finish_reason=_FINISH[g.finish],
                    )
                    t0, n = time.perf_counter(), 1
