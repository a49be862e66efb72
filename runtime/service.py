"""SessionService: what the server does with sessions, without gRPC.

    servicer (protobuf ↔ arrays, status codes)  ─►  SessionService  ─►  SessionStore (ids, slots)
    in-process users (tests, embedding)          ─►                 ─►  Batcher ─► Engine

Every operation takes the caller's principal and works on that principal's sessions:
create / close / step / attach (a Stream) / generate / snapshot / restore / fork. Inputs
are validated here, once, before anything changes (a rejected request applies nothing);
the store, batcher and engine behind it trust what they get. An error names the parameter
as these methods call it (`ttl`, `stop`); the servicer says the request's field instead
(`ttl_seconds`, `stop_tokens`).

Rules that live here:
- Locality: with a shared state store a session is made local (`store.fetch`, off the
  event loop) before it is used. A fetch may wait up to the lease time for another replica:
  fetches run in a pool of their own (FETCH_THREADS), concurrent fetches of one session are
  one fetch, and one principal has at most FETCHES_PER_PRINCIPAL in the pool at a time, so
  no client can keep the others' sessions from loading.
- Attachment: a Stream or Generate attaches to one session *incarnation*; other Steps,
  Rewinds, Streams and Generates of it wait up to DETACH_WAIT for it to detach (a call its
  client cut lets go within milliseconds), then are refused (SessionBusy). Once that
  session is closed, the attachment's next step is NOT_FOUND — also when a new session
  took its id meanwhile, which the attachment neither blocks nor reaches.
- Draining: after `drain()` new work is refused (Unavailable) and idle attachments are
  told to end (their `on_drain` callback).
- Generate runs the one generation loop (runtime/generation.py) through the batcher; the
  last generated token is not fed.

Dimension letters: T inputs in one request, I d_input, D d_output, V vocabulary size.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import numbers
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .batcher import Batcher
from .engine import NOT_LOGITS, Engine
from .errors import (
    CorruptState,
    InvalidInput,
    LimitExceeded,
    ModelError,
    RuntimeErrorBase,
    SessionBusy,
    SessionNotFound,
    Unavailable,
    as_array,
    as_tokens,
    check_session_id,
    integer,
    real_number,
)
from .generation import GenerateConfig, Generated, Generation
from .history import CheckpointBudget, History
from .prefix_cache import PrefixCache
from .sessions import Session, SessionStore
from .snapshots import BYTES_LIKE, BytesLike, snapshot_position

log = logging.getLogger(__name__)

# what a Stream ended by the drain is told, by where its session lives on (see `draining_says`)
DRAINING = {
    "memory": "server is shutting down; its sessions end with it",
    "state_dir": "server is shutting down; the session is saved, resume after the restart",
    "shared": "server is shutting down; the session is in the shared state store, resume on "
    "another replica",
}
PREFIX_CACHE_SCOPES = ("principal", "global")  # a cache per principal, or one for all
FETCH_THREADS = 16  # threads loading sessions from a shared state store
FETCHES_PER_PRINCIPAL = 4  # of them, what one principal's requests may hold at a time
# seconds a call on a session waits for the Stream or Generate holding it to let go before
# FAILED_PRECONDITION: a client that cuts its call (a `break` out of a generation) and goes on
# with the session at once is often ahead of the server's cancel of that call, by milliseconds
DETACH_WAIT = 0.5
# what the transport's call has left, in seconds (None: no deadline): set for each call by
# the gRPC servicer, so that the wait above ends in its refusal before the call's deadline
# (a DEADLINE_EXCEEDED instead would leave the client unsure whether the call applied)
call_time_left: contextvars.ContextVar[Callable[[], float | None]] = contextvars.ContextVar(
    "call_time_left", default=lambda: None
)
REFUSAL_TIME = 0.05  # seconds of a call's time left kept for its refusal to reach the client


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits and the session features' sizes (the server's
    --max-tokens-per-request, --max-new-tokens, --session-ttl, --rewind-window,
    --prefix-cache-mb, --prefix-cache-scope)."""

    max_tokens_per_request: int = 4096
    max_new_tokens: int = 4096
    max_ttl: float = math.inf
    rewind_window: int = 0
    rewind_memory_bytes: int = 0  # all sessions' checkpoints together (0: no limit)
    prefix_cache_bytes: int = 0
    prefix_cache_scope: str = "principal"  # or "global"

    def __post_init__(self):
        """Refuse a bad field naming it (InvalidInput), as the server's flags are refused:
        an embedding program's typo must not turn a feature off or every request away."""
        for name, low in (
            ("max_tokens_per_request", 1),
            ("max_new_tokens", 1),
            ("rewind_window", 0),
            ("rewind_memory_bytes", 0),
            ("prefix_cache_bytes", 0),
        ):
            object.__setattr__(self, name, integer(getattr(self, name), name, low))
        ttl = real_number(self.max_ttl, "max_ttl", "a number of seconds")
        if not ttl > 0:  # NaN too
            raise InvalidInput("max_ttl", f"must be > 0 seconds (math.inf: no bound), got {ttl}")
        object.__setattr__(self, "max_ttl", ttl)
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
            raise InvalidInput(
                "prefix_cache_scope",
                f"must be one of {PREFIX_CACHE_SCOPES}, got {self.prefix_cache_scope!r}",
            )


def _check_parts(engine: Engine, store: SessionStore, batcher: Batcher, limits) -> None:
    """A service's parts belong together (InvalidInput naming the one that does not): the
    batcher steps the sessions of its own store with its own engine, so a service over
    another store would have its sessions' steps answered NOT_FOUND, and one over another
    engine would check inputs against another model."""
    if not isinstance(limits, ServiceLimits):
        raise InvalidInput("limits", f"must be a ServiceLimits, got {type(limits).__name__}")
    if store.state_size != engine.state_size:
        raise InvalidInput(
            "store", f"state size {store.state_size} != the engine's {engine.state_size}"
        )
    if batcher is not None and (batcher.engine is not engine or batcher.store is not store):
        raise InvalidInput(
            "batcher", "steps another engine or store than the service's: make it with "
            "Batcher(engine, store) of the same two",
        )  # fmt: skip


class SessionService:
    """The session operations for one engine, store and batcher (see the module docstring);
    the batcher is Batcher(engine, store) of the same two."""

    def __init__(
        self, engine: Engine, store: SessionStore, batcher: Batcher, limits: ServiceLimits
    ):
        _check_parts(engine, store, batcher, limits)
        self.engine, self.store, self.batcher, self.limits = engine, store, batcher, limits
        self.info = engine.info
        self.draining = False
        # said to a Stream the drain ends; the server sets DRAINING["state_dir"] with --state-dir
        self.draining_says = DRAINING["shared" if store.replication is not None else "memory"]
        self.chunk = engine.prefill_chunk or 64  # checkpoints and cache entries are this far apart
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes, self.chunk, store.model_sha)
        self.checkpoint_budget = CheckpointBudget(limits.rewind_memory_bytes)
        # (session id, incarnation) -> the attachment driving it (a Stream or a Generate)
        self._attached: dict[tuple[str, str], Attachment] = {}
        self._fetching: dict[tuple[str, str], asyncio.Future] = {}  # (id, principal) -> fetch
        self._fetch_slots: dict[str, asyncio.Semaphore] = {}  # principal -> its share
        self._fetch_pool = (
            ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="ssmstream-fetch")
            if store.replication is not None
            else None
        )
        self._open_attachments: set[Attachment] = set()  # also those not yet attached

    # --- checks: the one place ---------------------------------------------------------

    def inputs(self, tokens, values, field: str = "") -> np.ndarray:
        """A request's inputs as the model takes them: int64 [T] or float32 [T, I], an array of
        their own (not the caller's).

        tokens: integers [n] or one integer, or bytes (byte ids) (empty if not sent); values:
        floats [n] row-major or [n / d_input, d_input], one float for d_input = 1 (empty if not
        sent); field: the name to report for the inputs ("tokens"/"values" by default). Nothing
        is converted before it is checked: floats, bools or strings as tokens are refused, not
        truncated. Raises InvalidInput naming the field, LimitExceeded for T >
        max_tokens_per_request.
        """
        tokens, values = as_tokens(tokens, field or "tokens"), as_array(values, field or "values")
        if self.engine.input_kind == "tokens":
            name = field or "tokens"
            if values.size:
                raise InvalidInput("values", "this model takes tokens; send `tokens`, not `values`")
            if not tokens.size:
                raise InvalidInput(name, "needs at least one token")
            x = tokens.reshape(1) if tokens.ndim == 0 else tokens
        else:
            name = field or "values"
            I = self.engine.d_input
            if tokens.size:
                raise InvalidInput("tokens", "this model takes values; send `values`, not `tokens`")
            if not values.size:
                raise InvalidInput(name, f"needs at least one row of d_input={I} values")
            if values.ndim <= 1 and values.size % I:
                raise InvalidInput(name, f"has {values.size} floats, not a multiple of d_input={I}")
            x = values.reshape(-1, I) if values.ndim <= 1 else values  # [T, I]: checked below
        T = x.shape[0]
        if T > self.limits.max_tokens_per_request:
            raise LimitExceeded(
                f"{name}: {T} inputs in one request exceed "
                f"max_tokens_per_request={self.limits.max_tokens_per_request}"
            )
        # a copy: the request may wait in the batcher's queue, and the caller's array (which
        # the check may hand back as it is) may be written meanwhile
        return self.engine.check_inputs(x, name, lead="T").copy()

    def _ttl(self, value: float | None) -> float | None:
        """0 or None → None (the server default); else 0 < ttl ≤ the server's --session-ttl."""
        if value is None or (isinstance(value, numbers.Real) and value == 0):
            return None
        ttl = real_number(value, "ttl", "a number of seconds")
        if not math.isfinite(ttl) or not 0 < ttl <= self.limits.max_ttl:
            raise InvalidInput(
                "ttl",
                f"must be finite, in (0, {self.limits.max_ttl:g}] seconds (0: default), got "
                f"{ttl:g}",
            )
        return ttl

    def _open(self, session: bool = True) -> None:
        """While draining, refuse new work saying where to go: a call on a session is told
        where that session lives on (`draining_says`: nowhere without --state-dir or
        --state-store), a new session where to make it (with a shared store the proxy's next
        replica serves it now)."""
        if not self.draining:
            return
        if session:
            raise Unavailable(self.draining_says)
        where = "the restarted server" if self.store.replication is None else "another replica"
        raise Unavailable(f"server is shutting down; retry on {where}")

    def _on_loop(self) -> None:
        """Every operation runs on the loop that started the batcher (RuntimeError, nothing
        applied, elsewhere): checked where an operation starts (`_session`, `create`,
        `generate`); a Stream's later steps meet the batcher's own check."""
        if self.batcher is not None:
            self.batcher.check_loop()

    @staticmethod
    def _callback(value, field: str) -> None:
        """A callback argument: callable or None, else TypeError naming it (not when it is
        called, after the request applied)."""
        if value is not None and not callable(value):
            raise TypeError(f"{field}: must be callable or None, got {type(value).__name__}")

    @staticmethod
    def _ref(session_id: str, field: str = "session_id") -> str:
        """A reference to an existing session: present and well-formed."""
        if not session_id:
            raise InvalidInput(field, "is required")
        return check_session_id(session_id, field)

    async def _session(self, session_id: str, principal: str) -> Session:
        """The live session `session_id` of `principal`, made local to this replica."""
        self._on_loop()
        self._ref(session_id)
        if not self.store.held(session_id, principal):
            await self._fetch(session_id, principal)
        s = self.store.get(session_id, principal)
        if s.history is None and self.limits.rewind_window > 0 and not s.pinned:
            self._track(s)  # loaded from --state-dir or another replica: its history starts here
        return s

    async def _fetch(self, session_id: str, principal: str) -> None:
        """store.fetch in the fetch pool; requests that need the same session meanwhile
        wait for the same fetch (see the module docstring)."""
        key = (session_id, principal)
        fut = self._fetching.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_once(session_id, principal))
            self._fetching[key] = fut

            def done(f: asyncio.Future) -> None:
                self._fetching.pop(key, None)
                if not f.cancelled():
                    f.exception()  # retrieved: each waiter raises it, or none is left

            fut.add_done_callback(done)
        await asyncio.shield(fut)

    async def _fetch_once(self, session_id: str, principal: str) -> None:
        slots = self._fetch_slots.setdefault(principal, asyncio.Semaphore(FETCHES_PER_PRINCIPAL))
        async with slots:
            loop = asyncio.get_running_loop()
            pool = self._fetch_pool  # None without replication: the default executor
            await loop.run_in_executor(pool, self.store.fetch, session_id, principal)

    def _check_detached(self, s: Session) -> None:
        holder = self._attached.get((s.id, s.incarnation))
        if holder is not None:
            raise SessionBusy(f"session {s.id!r} is attached to an open {holder.rpc}")

    async def _wait_detached(self, s: Session) -> None:
        """Wait up to DETACH_WAIT for the Stream or Generate holding `s` (if any) to let go;
        SessionBusy if it still holds it then. A call that was cut lets go as soon as the
        server runs its cancel; one in use holds on, and the wait ends in the refusal."""
        if (s.id, s.incarnation) not in self._attached:  # the common case: nothing to wait for
            return
        loop = asyncio.get_running_loop()
        wait, left = DETACH_WAIT, call_time_left.get()()
        if left is not None:
            wait = min(wait, left - REFUSAL_TIME)
        deadline = loop.time() + wait
        while (holder := self._attached.get((s.id, s.incarnation))) is not None:
            if loop.time() >= deadline:  # held still (by it, or by a call that came between)
                self._check_detached(s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(holder.let_go.wait(), deadline - loop.time())

    def _track(self, s: Session) -> Session:
        """Give a session this service made, loaded or took over its rewind History (when
        rewind is on), starting at its position."""
        if self.limits.rewind_window > 0:
            window, state = self.limits.rewind_window, self.store.read(s)
            history = History(window, self.chunk, s.position, state, self.checkpoint_budget)
            self.store.give_history(s, history)
        return s

    def checkpoint_bytes_per_session(self) -> int:
        """The most bytes of rewind history one session can hold."""
        if self.limits.rewind_window <= 0:
            return 0
        per_input = 8 if self.engine.input_kind == "tokens" else 4 * self.engine.d_input
        # without chunk-end states a request (or a prompt's cached pieces) leaves states only
        # where it ends, or a prefill call does: checkpoints up to one request apart
        spacing = 0 if self.engine.prefill_chunk_states else self.limits.max_tokens_per_request
        return History.max_bytes(
            self.limits.rewind_window,
            self.chunk,
            self.engine.state_size,
            per_input,
            self.checkpoint_budget.limit,
            spacing,
        )

    def feature_stats(self) -> dict:
        """The prefix cache's counters, the bytes of rewind history all sessions hold and the
        Streams and Generates open now."""
        # each history read once: a scrape runs in its own thread while a session may drop it
        histories = [s.history for s in self.store.sessions()]
        held = sum(h.nbytes for h in histories if h is not None)
        return {
            "prefix_cache": self.prefix_cache.stats(),
            "checkpoint_bytes": held,
            "streams_open": self.open_streams,
        }

    def _scope(self, principal: str) -> str:
        return "" if self.limits.prefix_cache_scope == "global" else f"principal:{principal}"

    async def _feed_prompt(self, s: Session, principal: str, prompt: np.ndarray) -> tuple:
        """Feed a new session (nobody else holds it yet) its prompt, from the prompt's longest
        cached prefix; cache the states after the prompt's pieces. Returns (the output of
        the last prompt input [D], how many prompt inputs the cache served). The caller
        counts the lookup (`prefix_cache.count`) once the session is handed out: a call
        that fails counts no hit or miss."""
        cache, scope = self.prefix_cache, self._scope(principal)
        # a session that may rewind takes the cached states as checkpoints, as far as they
        # lie at most a chunk apart (as a prefill's would; without chunk states, any)
        gap = self.chunk if self.engine.prefill_chunk_states else None
        hit = cache.lookup(scope, prompt, chain=s.history is not None, gap=gap, count=False)
        if hit.tokens:
            self.store.commit(s, hit.state, hit.tokens)
            if s.history is not None:  # as if prefilled: a rewind may go into the prompt
                s.history.record(prompt[: hit.tokens], hit.tokens, hit.states, shared=True)
        rest = prompt[hit.tokens :]
        if not len(rest):
            return hit.output, hit.tokens
        # the states after the rest's chunk ends and after its end, to cache: the batcher
        # reads them when the request runs (a Step of the same session may come right after)
        states: dict | None = {} if cache.enabled else None
        outputs, _ = await self.batcher.step(s, rest, states)
        if states:
            cache.insert(
                scope,
                prompt,
                {hit.tokens + t: (x, outputs[t - 1]) for t, x in states.items() if t > 0},
            )
        return outputs[-1], hit.tokens

    def discard(self, s: Session, principal: str) -> None:
        """Close a session this service created for a request whose caller never learns its
        id, if it is still there: that incarnation only (its id may have been closed and taken
        by a new session since)."""
        try:
            self.store.close(s.id, principal, incarnation=s.incarnation)
        except SessionNotFound:
            pass

    # --- lifecycle -----------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new work from now on; tell idle attachments to end."""
        self.draining = True
        for a in list(self._open_attachments):
            if a.idle and a.on_drain is not None:
                a.drained = True
                a.on_drain()

    async def settled(self, timeout: float = 2.0) -> None:
        """Wait (at most `timeout` s) until every Stream and Generate has let go of its
        session: handlers grpc cancelled at the end of the grace finish their cleanup (a
        temporary Generate's session closed) before the sessions are saved."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._open_attachments and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        """After the last request: end the fetch pool's threads (fetches not started are
        cancelled; one in progress ends at its lease wait)."""
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    async def fetches_ended(self) -> None:
        """Wait until the fetch pool's threads have ended (after `shutdown`; a fetch waiting
        for a lease ends once the store's final flush ran): none is left to hand its result
        to the event loop after the loop closed."""
        if self._fetch_pool is not None:
            await asyncio.to_thread(self._fetch_pool.shutdown, True)

    # --- unary operations ------------------------------------------------------------------

    async def create(
        self,
        principal: str,
        session_id: str = "",
        ttl: float | None = 0.0,
        snapshot: BytesLike = b"",
        prompt=(),
        handed_out: Callable[[Session], object] | None = None,
    ) -> tuple[Session, int]:
        """A new session at position 0, from a snapshot, or after a prompt (fed from its
        longest cached prefix); `session_id` "" lets the store choose; `ttl`: the seconds it
        may stay idle (0 or None: the store's default; at most `max_ttl`). Returns the session
        and how many prompt inputs the prefix cache served. `handed_out(session)` is called
        once the session is made (its prompt fed), as Generate's: where it raises (the
        server ends the call there when its deadline passed) the session is closed again
        and a prompt's cache lookup not counted."""
        self._on_loop()
        self._open(session=False)
        self._callback(handed_out, "handed_out")
        ttl_ = self._ttl(ttl)
        sid = check_session_id(session_id) if session_id else None
        if not isinstance(snapshot, BYTES_LIKE):
            raise InvalidInput("snapshot", f"must be bytes, got {type(snapshot).__name__}")
        prompt = as_tokens(prompt, "prompt")
        if prompt.size:
            if snapshot:
                raise InvalidInput("prompt", "cannot be combined with a snapshot")
            if self.engine.input_kind != "tokens":
                raise InvalidInput("prompt", "needs a token model; this model takes values")
            x = self.inputs(prompt, (), field="prompt")
        if snapshot:
            s = self._track(self.store.restore(snapshot, principal, sid, ttl_))
        else:
            s = self._track(self.store.create(principal, sid, ttl_))
        try:
            cached = (await self._feed_prompt(s, principal, x))[1] if prompt.size else 0
            if handed_out is not None:
                handed_out(s)
        except BaseException:  # the client never got the id: undo the session
            self.discard(s, principal)
            raise
        if prompt.size:
            self.prefix_cache.count(cached)
        return s, cached

    async def restore(
        self, principal: str, snapshot: BytesLike, session_id: str = "", ttl: float | None = 0.0
    ) -> Session:
        """A new session of `principal` holding a snapshot's state and position (`create`
        with a snapshot). A snapshot that is empty, corrupt, signed with another key
        (InvalidInput) or of another model (ModelError) is refused before anything changes."""
        if isinstance(snapshot, BYTES_LIKE) and not snapshot:
            raise InvalidInput("snapshot", "is empty")  # (`create` checks the type)
        return (await self.create(principal, session_id, ttl, snapshot))[0]

    async def close(self, principal: str, session_id: str) -> Session:
        """Close a session; returns it as it was (its final position). A session whose
        copy in the state store is unusable (CorruptState) is closed too, and still answers
        CorruptState: it has no final position to return."""
        try:
            s = await self._session(session_id, principal)
        except CorruptState as e:
            pool, loop = self._fetch_pool, asyncio.get_running_loop()
            close = self.store.close_unusable
            if await loop.run_in_executor(pool, close, session_id, principal):
                why = f" ({e.__cause__})" if e.__cause__ is not None else ""  # the failed check
                raise CorruptState(
                    f"session {session_id!r}: its copy in the state store was unusable{why}; "
                    "it is closed, its state lost"
                ) from None
            s = await self._session(session_id, principal)  # usable after all, or gone
        self.store.close(s.id, principal)
        return s

    async def snapshot(self, principal: str, session_id: str) -> tuple[bytes, int]:
        """(signed snapshot bytes, the position they hold)."""
        s = await self._session(session_id, principal)
        data = self.store.snapshot(s.id, principal)
        return data, snapshot_position(data)

    async def fork(self, principal: str, session_id: str, new_session_id: str = "") -> Session:
        """A new session of `principal` with a copy of the state and position of
        `session_id` (`new_session_id` "" lets the store choose its id); the two then go on
        independently. Its rewind history starts at the fork: it cannot go back before it."""
        self._open()
        parent = await self._session(session_id, principal)
        new_id = check_session_id(new_session_id, "new_session_id") if new_session_id else None
        try:
            return self._track(self.store.fork(parent.id, principal, new_id))
        except InvalidInput as e:  # the store speaks of the new session's id as session_id
            if e.field != "session_id":
                raise
            raise InvalidInput("new_session_id", str(e).split(": ", 1)[1]) from None

    async def step(self, principal: str, session_id: str, tokens=(), values=()) -> tuple:
        """Feed inputs (see `inputs`) to a session not attached elsewhere:
        (outputs [T, D], the new position)."""
        self._open()
        self._ref(session_id)  # the request's fields in order: session_id, then the inputs
        x = self.inputs(tokens, values)
        s = await self._session(session_id, principal)  # NOT_FOUND before FAILED_PRECONDITION
        await self._wait_detached(s)
        return await self.batcher.step(s, x)

    async def rewind(self, principal: str, session_id: str, position: int) -> Session:
        """Return a session to an earlier `position` within the rewind window (OutOfRange
        outside it, or ahead of the session when its turn comes after the steps queued before
        it); refused while a Stream or Generate is attached (after DETACH_WAIT)."""
        self._open()
        position = integer(position, "position")  # refused before any wait
        s = await self._session(session_id, principal)
        await self._wait_detached(s)
        await self.batcher.rewind(s, position)  # ahead or outside: checked at its turn
        return s

    # --- attached operations ----------------------------------------------------------------

    def attach(self, principal: str, rpc: str = "Stream", on_drain: Callable | None = None):
        """An Attachment that steps one session for a Stream (see Attachment); `detach()`
        it when the Stream ends. A session its first step creates (session_id "") is
        closed again at `detach()` unless a step's response was marked `delivered()` (or its
        id `handed_out()`): the transport's rule for an id that never reached its client. An
        in-process caller marks each response it used."""
        self._callback(on_drain, "on_drain")
        a = Attachment(self, principal, rpc, on_drain)
        self._open_attachments.add(a)
        return a

    async def generate(
        self,
        principal: str,
        session_id: str,
        prompt,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop=(),
        keep_session: bool = False,
        handed_out: Callable[[Session], object] | None = None,
    ) -> AsyncGenerator[tuple[str, Generated], None]:
        """Feed `prompt` (tokens, at least one), then yield (session id, Generated) per token,
        each before it is fed; the last one is not fed. Without a session_id a new session is
        used (closed at the end unless keep_session). Sampling: runtime/sampling.py;
        max_new_tokens in [1, --max-new-tokens]; generation stops after a `stop` token.
        `handed_out(session)` is called for a new session just before its id goes out with
        the first token (the server ends the call there when its deadline passed: the
        session is then closed again, as when the call ends before that token)."""
        self._on_loop()
        self._open(session=bool(session_id))
        if self.engine.input_kind != "tokens":
            raise ModelError("Generate needs a token model; this model takes values (use Step)")
        if self.engine.d_output > self.engine.vocab_size:
            raise ModelError(NOT_LOGITS.format(self.engine.d_output, self.engine.vocab_size))
        self._callback(handed_out, "handed_out")
        x = self.inputs(prompt, (), field="prompt")
        config = GenerateConfig.check(
            self.engine.vocab_size,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            max_limit=self.limits.max_new_tokens,
            min_new_tokens=1,
        )
        if session_id:
            check_session_id(session_id)
        temporary = not session_id and not keep_session
        a = self.attach(principal, "Generate")
        sent = False  # a new session's id reaches the client with the first token
        feeding = None  # the position of the token being fed, which was sent
        try:
            if session_id:
                outputs, position = await a.feed(session_id, x)
                logits = outputs[-1]
            else:  # a new session: the prompt's prefix may come from the cache
                a.adopt(self._track(self.store.create(principal, shared=not temporary)))
                logits, cached = await self._feed_prompt(a.session, principal, x)
                position = len(x)
            gen = Generation(config)
            g = gen(logits, position)
            if not session_id:
                if handed_out is not None:
                    handed_out(a.session)
                self.prefix_cache.count(cached)
            # handed out: a cancel from here on may come after the client read the id (as
            # the first response's write ends), so a kept session stays from here
            sent = True
            yield a.session.id, g
            while not g.last:  # in flight: it finishes while the server drains (its grace)
                feeding = g.position
                outputs, position = await a.feed("", np.array([g.token], dtype=np.int64))
                feeding = None
                g = gen(outputs[-1], position)
                yield a.session.id, g
        except asyncio.CancelledError:  # a cut: a client's cancel, the end of a drain's grace
            if feeding is not None and not temporary:  # still attached: nothing steps between
                await self._unfeed(a.session, feeding)
            raise
        finally:  # also when another cancel lands in that rewind
            a.detach()
            created = not session_id and a.session is not None
            if created and (temporary or not sent):  # not kept, or its id never got out
                self.discard(a.session, principal)

    async def _unfeed(self, s: Session, position: int) -> None:
        """A Generate cut while it fed the last token it sent (a cancel, the end of a drain's
        grace): the session goes back to `position`, that token not fed, as a generation
        leaves it when it ends (nothing to do where the step did not apply: the batcher's
        rewind to the position a session is at does nothing). Where it cannot (no rewind
        window, the session closed, the batcher closing) the session keeps the token."""
        try:
            await self.batcher.rewind(s, position)
        except RuntimeErrorBase as e:
            log.info("session %s: the token a cut Generate was feeding stays fed (%s)", s.id, e)

    @property
    def attached(self) -> int:
        """Sessions attached to a Stream or Generate now."""
        return len(self._attached)

    @property
    def open_streams(self) -> int:
        """Streams and Generates open now (attached or not yet)."""
        return len(self._open_attachments)


class Attachment:
    """One Stream's (or Generate's) hold on one session.

    The first `step` attaches: to the session it names, or to a new one (`create`), which
    is closed again if that first step fails, or at `detach` if its response was not
    `handed_out` (a cancel after that may come after the client read the id: the session
    stays) nor `delivered`. Later steps
    go to the same incarnation (NOT_FOUND once it is closed). `idle` is True while waiting
    for the client's next request: before the first step, and from each step's `delivered`
    (its response is written) or failure on; `on_drain` is called when the server drains
    meanwhile. A step's response being written is not idle: a drain then lets it finish.
    """

    def __init__(self, service: SessionService, principal: str, rpc: str, on_drain):
        self.service, self.principal, self.rpc, self.on_drain = service, principal, rpc, on_drain
        self.session: Session | None = None
        self.idle, self.drained = True, False
        self._new: Session | None = None  # created by the first step, its id not yet out
        self.detached = False  # detach() was called: steps are refused
        self.let_go = asyncio.Event()  # set at detach: the session is free for other calls

    async def step(self, session_id: str, tokens=(), values=()) -> tuple:
        """(outputs [T, D], position); an empty session_id on the first step creates a
        session (see the class docstring)."""
        self.service._open(session=bool(session_id) or self.session is not None)
        x = self.service.inputs(tokens, values)
        return await self.feed(session_id, x, create=self.session is None and not session_id)

    async def feed(self, session_id: str, inputs: np.ndarray, create: bool = False) -> tuple:
        """`step` for inputs already checked (SessionService.inputs). RuntimeError once
        detached (nothing applied: another attachment may hold the session by then)."""
        if self.detached:
            raise RuntimeError(f"this {self.rpc}'s attachment was detached; attach() another")
        svc = self.service
        self.idle = False
        try:
            if self.session is None:
                return await self._first(session_id, inputs, create)
            if session_id and session_id != self.session.id:
                raise InvalidInput(
                    "session_id", f"this stream is attached to {self.session.id!r}; open another"
                )
            s = self.session
            if not (s.live and svc.store.held(s.id)):  # else it is still the one attached
                self.session = await self._rebind(s)
            return await svc.batcher.step(self.session, inputs)
        except BaseException:
            self.idle = True
            raise

    def adopt(self, s: Session) -> None:
        """Attach to a session (FAILED_PRECONDITION when another attachment holds it)."""
        self.service._check_detached(s)
        self.service._attached[s.id, s.incarnation] = self
        self.session = s

    async def _first(self, session_id: str, inputs: np.ndarray, create: bool) -> tuple:
        svc = self.service
        svc._on_loop()  # refused off the loop before anything is made
        if create:
            s = svc._track(svc.store.create(self.principal))
        else:
            s = await svc._session(session_id, self.principal)
            await svc._wait_detached(s)
        try:
            self.adopt(s)
        except SessionBusy:
            if create:
                svc.discard(s, self.principal)
            raise
        try:
            result = await svc.batcher.step(s, inputs)
        except BaseException:  # also a cancel: the client never got the new id
            if create:  # the request that created the session failed: undo both
                svc.discard(s, self.principal)
            raise
        if create:
            self._new = s
        return result

    def handed_out(self) -> Session | None:
        """The step's response goes to the client now: a session that step created stays at
        `detach` from here (a cancel that ends the write may come after the client read the
        id: keep the session rather than close one the client knows). Returns it (None when
        the step created none)."""
        s, self._new = self._new, None
        return s

    def delivered(self) -> None:
        """The step's response is out: the attachment is idle again (and a session the step
        created stays, if `handed_out` was not called)."""
        self._new = None
        self.idle = True

    async def _rebind(self, bound: Session) -> Session:
        """The attached incarnation, for its next step (NOT_FOUND once it was closed)."""
        if bound.live and self.service.store.held(bound.id):
            return bound
        err = None if bound.live else bound.gone()
        if isinstance(err, SessionNotFound):  # ended here: say how (a new session may use
            raise err  # its id by now)
        try:
            s = await self.service._session(bound.id, self.principal)
        except SessionNotFound as e:  # closed or evicted, as the store says
            reason = e.reason if e.reason in ("closed", "evicted") else "closed"
            raise SessionNotFound(bound.id, reason) from None
        if s.incarnation != bound.incarnation:
            raise SessionNotFound(bound.id, "closed")
        return s

    def detach(self) -> None:
        """Let go of the session (its id may be attached again); later steps are refused."""
        self.detached = True
        self.service._open_attachments.discard(self)
        if self._new is not None:  # cancelled before the new session's id got out
            self.service.discard(self._new, self.principal)
            self._new = None
        s = self.session
        if s is not None and self.service._attached.get((s.id, s.incarnation)) is self:
            del self.service._attached[s.id, s.incarnation]
        self.let_go.set()
