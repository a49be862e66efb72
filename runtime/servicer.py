"""The StreamingInference servicer: protobuf ↔ numpy arrays, delegating everything else.

Sessions live in the SessionStore, steps go through the Batcher (which runs the Engine),
sampling is runtime/sampling.py. This module only

  * turns a request into arrays and checks it against the model and the limits
    (before anything changes: a rejected request applies nothing),
  * turns outputs into a response (output selection: last row, all rows, top-k
    log-probs, nothing),
  * keeps which sessions are attached to an open Stream / running Generate,
  * maps runtime errors to status codes — in one place, `grpc_errors`.

Dimension letters: T inputs in one request, V vocabulary size, D d_output, I d_input,
K top-k.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time

import grpc
import numpy as np
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc

from .auth import current_principal
from .config import ServerConfig
from .errors import (
    CorruptState,
    EngineFailure,
    InvalidInput,
    LimitExceeded,
    ModelError,
    OutOfRange,
    RuntimeErrorBase,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from .metrics import ServerMetrics
from .sampling import Sampler, SamplingConfig
from .sessions import Session, check_session_id
from .snapshots import snapshot_position

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StreamingInference"].full_name
SERVER_VERSION = "0.1.0"

# --- errors → status codes: the one place ------------------------------------------------

STATUS_OF = (  # first match wins (ModelError before InvalidInput: both are ValueErrors)
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineFailure, grpc.StatusCode.INTERNAL),
    (CorruptState, grpc.StatusCode.DATA_LOSS),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a runtime error becomes."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


def grpc_errors(method):
    """Decorator for servicer methods (coroutines or async generators): runtime errors
    end the RPC with their status code (`status_of`), anything unexpected with INTERNAL
    (logged, details not sent), and each non-OK status is counted in the metrics. A
    request that did not decode (DecodeGuard) is INVALID_ARGUMENT."""

    async def fail(self, exc: Exception, context) -> None:
        code, message = status_of(exc)
        if not isinstance(exc, RuntimeErrorBase):
            log.exception("unexpected error in %s", method.__name__)
        self.metrics.count_error(code.name)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def gen(self, request, context):
            try:
                check_decoded(request)
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(self, exc, context)

        return gen

    @functools.wraps(method)
    async def call(self, request, context):
        try:
            check_decoded(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await fail(self, exc, context)

    return call


class Malformed:
    """What request bytes that are not a valid message deserialize to (see DecodeGuard)."""

    def __init__(self, error: Exception):
        self.error = error


def check_decoded(request) -> None:
    """Raise InvalidInput when `request` is a Malformed placeholder (no-op otherwise)."""
    if isinstance(request, Malformed):
        raise InvalidInput(
            "request",
            f"not a valid protobuf message of this RPC ({type(request.error).__name__})",
        )


def _guard_deserializer(deserialize):
    def guarded(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf raises DecodeError (and others on odd input)
            return Malformed(e)

    return guarded


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message become a `Malformed` placeholder, which
    the servicer refuses with INVALID_ARGUMENT (`check_decoded`, via `grpc_errors` and per
    Stream message), instead of grpc's UNKNOWN and a logged traceback. Only this service's
    methods are guarded; their behaviors are not wrapped (no cost per message)."""

    def __init__(self, prefix: str = f"/{SERVICE_NAME}/"):
        self.prefix = prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        return handler._replace(
            request_deserializer=_guard_deserializer(handler.request_deserializer)
        )


# --- protobuf ↔ arrays (pure helpers) -------------------------------------------------------


def request_inputs(req: pb.StepRequest, info: dict, max_tokens: int, field: str = "") -> np.ndarray:
    """The inputs of a StepRequest as an array: int64 [T] tokens or float32 [T, I] values.

    Raises InvalidInput naming the field (wrong kind, empty, out of range, NaN, ragged)
    or LimitExceeded (T > max_tokens).
    """
    tokens_field, values_field = field or "tokens", field or "values"
    if info["input_kind"] == "tokens":
        if len(req.values):
            raise InvalidInput("values", "this model takes tokens; send `tokens`, not `values`")
        T = len(req.tokens)
        if T == 0:
            raise InvalidInput(tokens_field, "needs at least one token")
        _check_length(tokens_field, T, max_tokens)
        V = int(info["vocab_size"])
        if T == 1:  # the streaming hot path: skip the vectorized checks
            t = req.tokens[0]
            if not 0 <= t < V:
                raise InvalidInput(tokens_field, f"[0] = {t} is outside [0, {V})")
            return np.array([t], dtype=np.int64)  # [1]
        x = np.fromiter(req.tokens, dtype=np.int64, count=T)  # [T]
        if x.min() < 0 or x.max() >= V:
            i = int(np.flatnonzero((x < 0) | (x >= V))[0])
            raise InvalidInput(tokens_field, f"[{i}] = {int(x[i])} is outside [0, {V})")
        return x
    if len(req.tokens):
        raise InvalidInput("tokens", "this model takes values; send `values`, not `tokens`")
    I = int(info["d_input"])
    n = len(req.values)
    if n == 0:
        raise InvalidInput(values_field, f"needs at least one row of d_input={I} values")
    if n % I:
        raise InvalidInput(values_field, f"has {n} floats, not a multiple of d_input={I}")
    T = n // I
    _check_length(values_field, T, max_tokens)
    x = np.asarray(req.values, dtype=np.float32).reshape(T, I)  # [T, I]
    if not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x.reshape(-1)))[0])
        raise InvalidInput(values_field, f"[{i}] is not finite (NaN or inf)")
    return x


def _check_length(field: str, T: int, max_tokens: int) -> None:
    if T > max_tokens:
        raise LimitExceeded(
            f"{field}: {T} inputs in one request exceed max_tokens_per_request={max_tokens}"
        )


_OUTPUT_SELECTIONS = frozenset(pb.OutputSelection.values())


def check_output_selection(req: pb.StepRequest, info: dict) -> None:
    """Refuse an output selection the model cannot answer (before any step runs)."""
    if req.output not in _OUTPUT_SELECTIONS:
        raise InvalidInput("output", f"unknown OutputSelection {req.output}")
    if req.output == pb.OUTPUT_TOP_K:
        if info["input_kind"] != "tokens":
            raise InvalidInput("output", "OUTPUT_TOP_K needs a token model (logits)")
        V = int(info["vocab_size"])
        if not 1 <= req.top_k <= V:
            raise InvalidInput("top_k", f"must be in [1, vocab_size={V}] with OUTPUT_TOP_K")
    elif req.top_k:
        raise InvalidInput("top_k", "is only used with output=OUTPUT_TOP_K")


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log p_v = z_v − log Σ_w exp z_w, in float64: [V] → [V]."""
    z = z.astype(np.float64)  # [V]
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


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
        resp.MergeFromString(packed_floats(_TOP_LOGPROBS, lp[top]))
        return resp
    rows = outputs if req.output == pb.OUTPUT_ALL else outputs[-1:]  # [T or 1, D]
    resp.rows, resp.cols = rows.shape
    resp.MergeFromString(packed_floats(_OUTPUTS, rows))
    return resp


_OUTPUTS = pb.StepResponse.DESCRIPTOR.fields_by_name["outputs"].number
_TOP_LOGPROBS = pb.StepResponse.DESCRIPTOR.fields_by_name["top_logprobs"].number


def packed_floats(field_number: int, x: np.ndarray) -> bytes:
    """A packed `repeated float` field in protobuf wire format: the key
    (field_number << 3 | 2, length-delimited), the byte length as a varint, then the values
    as little-endian float32. Merged into a message (`MergeFromString`), the values are
    copied in one go, where `extend(x.tolist())` converts them one Python float at a time
    (~15 µs for 256 values, the largest cost of a streamed token in this module)."""
    data = x.astype("<f4", copy=False).tobytes()  # [N] float32 LE, row-major
    return _varint(field_number << 3 | 2) + _varint(len(data)) + data


@functools.lru_cache(maxsize=256)  # the same few keys and lengths, message after message
def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of n >= 0: 7 bits per byte, low first, high bit = more."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def model_info(info: dict, config: ServerConfig) -> pb.ModelInfo:
    """ModelInfo from Engine.info and the server config."""
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
        ),
    )


def session_message(s) -> pb.Session:
    return pb.Session(session_id=s.id, position=s.position, ttl_seconds=s.ttl)


def request_ttl(value: float, field: str, max_ttl: float) -> float | None:
    """0 → None (the server default); else 0 < ttl ≤ the server's --session-ttl."""
    if value == 0:
        return None
    if not math.isfinite(value) or not 0 < value <= max_ttl:
        raise InvalidInput(field, f"must be in (0, {max_ttl:g}] seconds (0: default), got {value}")
    return float(value)


def optional_id(value: str, field: str = "session_id") -> str | None:
    """An optional client-chosen id: empty → None (the server picks one), else well-formed."""
    return check_session_id(value, field) if value else None


def session_ref(value: str, field: str = "session_id") -> str:
    """A request's reference to an existing session: present and well-formed."""
    if not value:
        raise InvalidInput(field, "is required")
    return check_session_id(value, field)


def sampling_config(req: pb.GenerateRequest, info: dict, max_new_tokens: int) -> SamplingConfig:
    """Check a GenerateRequest's sampling fields; proto defaults 0 mean "off"."""
    V = int(info["vocab_size"])
    if not 1 <= req.max_new_tokens <= max_new_tokens:
        raise InvalidInput(
            "max_new_tokens", f"must be in [1, {max_new_tokens}], got {req.max_new_tokens}"
        )
    if req.top_k > V:
        raise InvalidInput("top_k", f"must be in [0, vocab_size={V}] (0: off), got {req.top_k}")
    top_p = 1.0 if req.top_p == 0 else float(req.top_p)
    bad_stop = [t for t in req.stop_tokens if not 0 <= t < V]
    if bad_stop:
        raise InvalidInput("stop_tokens", f"{bad_stop[0]} is outside [0, {V})")
    seed = req.seed if req.HasField("seed") else None
    return SamplingConfig(
        temperature=float(req.temperature), top_k=int(req.top_k), top_p=top_p, seed=seed
    )


# --- the servicer -----------------------------------------------------------------------------


class StreamingInferenceServicer(pb_grpc.StreamingInferenceServicer):
    """Thin: converts, checks, delegates to `store` (SessionStore) and `batcher` (Batcher)."""

    def __init__(self, engine, store, batcher, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.store, self.batcher = engine, store, batcher
        self.config, self.metrics = config, metrics
        self.info = engine.info
        self.draining = False
        # (session id, incarnation) -> "Stream" | "Generate": an id reused after a close is
        # another session, which an old Stream neither blocks nor reaches
        self._attached: dict[tuple[str, str], str] = {}
        self._streams: dict[asyncio.Task, bool] = {}  # open Stream handler -> idle (awaiting)
        self._drain_cancelled: set[asyncio.Task] = set()

    # --- lifecycle hooks (called by the server) ---

    def drain(self) -> None:
        """Refuse new work from now on; end Streams that are waiting for their next request."""
        self.draining = True
        for task, idle in list(self._streams.items()):
            if idle:
                self._drain_cancelled.add(task)
                task.cancel()

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry on the restarted server")

    def _attach(self, s: Session, rpc: str) -> None:
        """Mark the session as driven by this Stream / Generate (until it ends)."""
        self._check_detached(s)
        self._attached[s.id, s.incarnation] = rpc

    def _discard(self, session_id: str, principal: str) -> None:
        """Close a session this server created for a request, if it is still there."""
        try:
            self.store.close(session_id, principal)
        except SessionNotFound:
            pass

    async def _local(self, session_id: str, principal: str) -> None:
        """With a shared state store: make this replica the session's holder (it may load the
        session from the store, waiting for another replica's lease). No-op otherwise."""
        if not self.store.held(session_id):
            await asyncio.to_thread(self.store.fetch, session_id, principal)

    def _check_detached(self, s: Session) -> None:
        holder = self._attached.get((s.id, s.incarnation))
        if holder is not None:
            raise SessionBusy(f"session {s.id!r} is attached to an open {holder}")

    async def _session(self, session_id: str, principal: str) -> Session:
        """The live session `session_id` of `principal`, held by this replica."""
        await self._local(session_id, principal)
        return self.store.get(session_id, principal)

    async def _rebind(self, bound: Session, principal: str) -> Session:
        """The session a Stream / Generate attached to, for its next step: NOT_FOUND once it
        was closed or evicted, also when its id was taken by a new session meanwhile."""
        if bound.live and self.store.held(bound.id):
            return bound
        try:
            s = await self._session(bound.id, principal)
        except SessionNotFound:
            raise SessionNotFound(bound.id, "closed") from None
        if s.incarnation != bound.incarnation:
            raise SessionNotFound(bound.id, "closed")
        return s

    # --- unary RPCs ---

    @grpc_errors
    async def GetModelInfo(self, request, context):
        return model_info(self.info, self.config)

    @grpc_errors
    async def CreateSession(self, request, context):
        self._check_open()
        ttl = request_ttl(request.ttl_seconds, "ttl_seconds", self.config.session_ttl)
        principal, sid = current_principal(), optional_id(request.session_id)
        if request.snapshot:
            s = self.store.restore(request.snapshot, principal, sid, ttl)
        else:
            s = self.store.create(principal, sid, ttl)
        return session_message(s)

    @grpc_errors
    async def CloseSession(self, request, context):
        principal = current_principal()
        await self._local(session_ref(request.session_id), principal)
        s = self.store.get(request.session_id, principal)
        msg = session_message(s)
        self.store.close(request.session_id, principal)
        return msg

    @grpc_errors
    async def SnapshotSession(self, request, context):
        principal = current_principal()
        await self._local(session_ref(request.session_id), principal)
        data = self.store.snapshot(request.session_id, principal)
        return pb.Snapshot(
            session_id=request.session_id,
            position=snapshot_position(data),
            model_sha256=self.store.model_sha,
            data=data,
        )

    @grpc_errors
    async def RestoreSession(self, request, context):
        self._check_open()
        if not request.snapshot:
            raise InvalidInput("snapshot", "is empty")
        ttl = request_ttl(request.ttl_seconds, "ttl_seconds", self.config.session_ttl)
        s = self.store.restore(
            request.snapshot, current_principal(), optional_id(request.session_id), ttl
        )
        return session_message(s)

    @grpc_errors
    async def ForkSession(self, request, context):
        self._check_open()
        parent, principal = session_ref(request.session_id), current_principal()
        await self._local(parent, principal)
        new_id = optional_id(request.new_session_id, "new_session_id")
        try:
            s = self.store.fork(parent, principal, new_id)
        except InvalidInput as e:  # the parent id is checked above: this is about the new id
            if e.field != "session_id":
                raise
            raise InvalidInput("new_session_id", str(e).split(": ", 1)[1]) from e
        return session_message(s)

    @grpc_errors
    async def Step(self, request, context):
        t0 = time.perf_counter()
        self._check_open()
        session_ref(request.session_id)
        x = request_inputs(request, self.info, self.config.max_tokens_per_request)
        check_output_selection(request, self.info)
        principal = current_principal()
        s = await self._session(request.session_id, principal)  # NOT_FOUND first
        self._check_detached(s)
        outputs, position = await self.batcher.step(s, x, principal)
        resp = step_response(request.session_id, position, outputs, request)
        self.metrics.count_tokens("Step", len(x))
        self.metrics.observe_request("Step", time.perf_counter() - t0)
        return resp

    # --- streaming RPCs ---

    @grpc_errors
    async def Stream(self, request_iterator, context):
        task = asyncio.current_task()
        principal = current_principal()
        session, created = None, False
        self._streams[task] = True
        try:
            async for req in request_iterator:
                self._streams[task] = False
                t0 = time.perf_counter()
                check_decoded(req)
                self._check_open()
                x = request_inputs(req, self.info, self.config.max_tokens_per_request)
                check_output_selection(req, self.info)
                if session is None:
                    created = not req.session_id
                    if created:
                        s = self.store.create(principal)
                    else:
                        s = await self._session(session_ref(req.session_id), principal)
                    self._attach(s, "Stream")
                    session = s
                elif req.session_id and req.session_id != session.id:
                    raise InvalidInput(
                        "session_id", f"this stream is attached to {session.id!r}; open another"
                    )
                else:
                    session = await self._rebind(session, principal)
                try:
                    outputs, position = await self.batcher.step(session, x, principal)
                    yield step_response(session.id, position, outputs, req)
                except BaseException:  # also a cancel: the client never got the new id
                    if created:  # the request that created the session failed: undo both
                        self._discard(session.id, principal)
                    raise
                created = False
                self.metrics.count_tokens("Stream", len(x))
                self.metrics.observe_request("Stream", time.perf_counter() - t0)
                if self.draining:  # do not wait for a next request that would be refused
                    raise Unavailable(
                        "server is shutting down; the session is saved, resume after the restart"
                    )
                self._streams[task] = True
        except asyncio.CancelledError:
            if task in self._drain_cancelled:
                raise Unavailable(
                    "server is shutting down; the session is saved, resume after the restart"
                ) from None
            raise
        finally:
            self._streams.pop(task, None)
            self._drain_cancelled.discard(task)
            if session is not None:
                self._attached.pop((session.id, session.incarnation), None)

    @grpc_errors
    async def Generate(self, request, context):
        self._check_open()
        info = self.info
        if info["input_kind"] != "tokens":
            raise ModelError("Generate needs a token model; this model takes values (use Step)")
        if not len(request.prompt):
            raise InvalidInput(
                "prompt", "needs at least one token (to continue, send the last generated token)"
            )
        prompt = request_inputs(
            pb.StepRequest(tokens=request.prompt),
            info,
            self.config.max_tokens_per_request,
            "prompt",
        )
        sampler = Sampler(sampling_config(request, info, self.config.max_new_tokens))
        stop = set(request.stop_tokens)
        principal = current_principal()
        if request.session_id:
            s = await self._session(session_ref(request.session_id), principal)
            temporary = False
        else:
            s, temporary = self.store.create(principal), not request.keep_session
        sid = s.id
        try:
            self._attach(s, "Generate")
        except SessionBusy:
            if temporary:
                self._discard(sid, principal)
            raise
        try:
            outputs, position = await self.batcher.step(s, prompt, principal)  # prefill
            self.metrics.count_tokens("Generate", len(prompt))
            for i in range(request.max_new_tokens):
                t0 = time.perf_counter()
                logits = outputs[-1]  # [V]
                token = sampler(logits)
                last = i + 1 == request.max_new_tokens or token in stop
                reason = pb.FINISH_NONE
                if token in stop:
                    reason = pb.FINISH_STOP_TOKEN
                elif last:
                    reason = pb.FINISH_MAX_TOKENS
                yield pb.GenerateResponse(
                    session_id=sid,
                    token=token,
                    logprob=float(log_softmax(logits)[token]),
                    position=position,
                    index=i,
                    finish_reason=reason,
                )
                if last:
                    break
                self._check_open()
                x = np.array([token], dtype=np.int64)  # [1]
                s = await self._rebind(s, principal)
                outputs, position = await self.batcher.step(s, x, principal)
                self.metrics.count_tokens("Generate", 1)
                self.metrics.observe_request("Generate", time.perf_counter() - t0)
        finally:
            self._attached.pop((s.id, s.incarnation), None)
            if temporary:
                self._discard(sid, principal)
