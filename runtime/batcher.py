"""Batcher: cross-session dynamic batching of steps on one Engine (asyncio).

Many sessions each send their next input; one step of the recurrence is the same graph
for all of them, so requests that arrive close together run as one onnxruntime call of the
slot graph (runtime/slab.py), on the rows of the store's slab that hold their states:

    outputs [B, d_out] = step_slots(inputs [B], slots [B], slab)   slab rows stepped in place
    position += 1                                                   (SessionStore.give_back)

A batch runs as one ORT call per `StepBuffers.chunk_rows` sessions (a chunk that stays in
cache is cheaper per stream). No state is copied: the graph gathers the rows, steps them
and scatters them back into the slab, on the engine's device.

Rules:
- A request with T > 1 inputs is a prefill: it runs on its own through Engine.prefill.
- Per session, requests run one at a time in arrival order: a second request for a session
  with one in flight waits in that session's queue (it is not refused).
- A step request waits at most `max_batch_delay` seconds for others to join its batch, and
  not at all when waiting cannot help: when the batch is full (`max_batch`) or already holds
  the next step of every *active* session (one that sent a request within the last
  `activity_window` seconds and is still open). So a lone stream never sits out the delay,
  also right after other sessions closed.
- onnxruntime runs in one dedicated worker thread; the event loop only moves requests
  between queues. A batch larger than one ORT call hands each
  call's results back as soon as it is done: those clients' next requests are queued
  while the rest of the batch runs. It hands a job to the worker through a queue
  and gets the results back in one `call_soon_threadsafe` callback, which also starts the
  next job: no scheduler task wakes up in between.
- A lone stream skips the worker (`inline`): while no other session is active and nothing
  is queued or running, its step runs on the event loop, through the same `_run_steps`,
  without the hop to the worker and back (a queue put, a thread wake-up, a callback through
  the loop's self-pipe). The step of the session that is already the only active one runs
  as soon as it arrives (no future, no scheduler pass); any other batch of one step with
  no other session active runs in the scheduler pass, so requests that arrive together
  are still batched. Either holds the loop for one B = 1 step, which that stream would
  have waited for anyway.
- A request applies fully or not at all: inputs are validated before queueing; if the
  session is closed or evicted before its step commits, or onnxruntime fails, its state and
  position are unchanged and the request raises. A request cancelled while still queued is
  dropped; one cancelled while running still applies (its result is discarded).

Dimension letters: B batch (sessions in one ORT call), T inputs in one request, S state size.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine
from .errors import (
    INTERNAL_ERROR,
    CorruptState,
    EngineFailure,
    InvalidInput,
    LimitExceeded,
    OutOfRange,
    SessionNotFound,
    Unavailable,
    integer,
    real_number,
)
from .sessions import Session, SessionStore
from .snapshots import MAX_POSITION

log = logging.getLogger(__name__)


def _key(s: Session) -> tuple[str, str]:
    """A session's key in the scheduler: its incarnation, not only its id."""
    return s.id, s.incarnation


def _past_end(s: Session, T: int) -> OutOfRange | None:
    """The error for T more inputs that would take `s` past the largest position, or None."""
    if s.position <= MAX_POSITION - T:
        return None
    return OutOfRange(
        "inputs",
        f"session {s.id!r} is at position {s.position}; {T} more inputs pass the largest "
        f"position, 2**63 - 1",
    )


def _timed(job: Callable, reqs: list) -> tuple[object, float]:
    """(job(reqs), or the exception it raised; seconds it took)."""
    t0 = time.perf_counter()
    try:
        results = job(reqs)
    except Exception as e:
        log.exception("engine job failed")
        results = e
    return results, time.perf_counter() - t0


@dataclass(eq=False)
class _Request:
    session: Session
    inputs: np.ndarray  # [T] tokens | [T, d_in] values, validated
    future: asyncio.Future | None  # None: run inline, the caller gets the result directly
    enqueued: float = 0.0
    delivered: bool = False  # its result was handed back before its job ended
    states: dict | None = None  # a prefill's {t: state after t inputs [S]}, when asked for
    rewind_to: int | None = None  # a rewind (no inputs) to this earlier position

    @property
    def T(self) -> int:
        return self.inputs.shape[0]


@dataclass
class BatcherStats:
    """Counters since start: ORT calls (`batches`; `batch_sizes`: how many step calls had
    each number of sessions), steps, prefills and rewinds run (`inline`: of the steps, run on
    the event loop), requests failed; `discarded_inputs`: inputs applied to their session
    after the caller stopped waiting (cancelled while they ran: the outputs were dropped)."""

    batches: int = 0
    steps: int = 0
    prefills: int = 0
    prefill_inputs: int = 0
    rewinds: int = 0
    failed: int = 0
    cancelled: int = 0
    discarded_inputs: int = 0
    inline: int = 0
    busy_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.steps / self.batches if self.batches else 0.0


class Batcher:
    """Batches concurrent step requests of many sessions (see the module docstring).

    Args:
        engine: the Engine to run.
        store: the SessionStore holding the sessions' states (same state size).
        max_batch: most sessions in one step call (1 = batching off).
        max_batch_delay: seconds a step waits for others to join (0 = never wait).
        max_queue_per_session: requests a session may have waiting behind its running one.
        activity_window: seconds after its last request that a session counts as active
            (None: max(20 × max_batch_delay, 10 ms)).
        inline: run a lone stream's steps on the event loop (see the module docstring).
    """

    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        max_batch: int = 64,
        max_batch_delay: float = 0.001,
        max_queue_per_session: int = 64,
        activity_window: float | None = None,
        inline: bool = True,
    ):
        max_batch = integer(max_batch, "max_batch", 1)
        delay = real_number(max_batch_delay, "max_batch_delay", "seconds")
        if not 0 <= delay < 10:
            raise InvalidInput(
                "max_batch_delay", f"must be in [0, 10) seconds, got {max_batch_delay!r}"
            )
        max_queue_per_session = integer(max_queue_per_session, "max_queue_per_session")
        window = activity_window
        if window is not None:
            window = real_number(window, "activity_window", "seconds or None")
        if window is not None and not window > 0:
            raise InvalidInput(
                "activity_window", f"must be positive seconds or None, got {activity_window!r}"
            )
        if store.state_size != engine.state_size:
            raise InvalidInput(
                "store", f"state size {store.state_size} != the engine's {engine.state_size}"
            )
        if (store.slab.device, store.slab.device_id) != (engine.device, engine.device_id):
            raise InvalidInput(
                "store", f"its slab is on {store.slab.device}, the engine runs on "
                f"{engine.device} (make it with slab=engine.new_slab(capacity))",
            )  # fmt: skip
        if engine.cuda_graphs and store.slab.scratch is None:
            raise InvalidInput(
                "store", "the engine runs CUDA graphs: its slab needs a scratch row "
                "(make it with slab=engine.new_slab(capacity))",
            )  # fmt: skip
        self.engine, self.store = engine, store
        self.max_batch, self.max_batch_delay = max_batch, delay
        self.max_queue_per_session = max_queue_per_session
        self.activity_window = max(20 * delay, 0.01) if window is None else window
        self.inline = bool(inline)
        self.stats = BatcherStats()
        self._listeners: list[Callable[[int, float], None]] = []
        self._steps: deque[_Request] = deque()  # ready T = 1 requests, one per session
        self._prefills: deque[_Request] = deque()  # ready T > 1 requests
        # keyed by (id, incarnation): a new session under a closed one's id shares nothing
        self._waiting: dict[tuple, deque[_Request]] = {}  # behind a session's running request
        self._busy: set[tuple] = set()  # sessions with a request ready or running
        # session key -> (its last request's time, the session), oldest first
        self._recent: dict[tuple, tuple[float, Session]] = {}
        # a batch holds distinct sessions: never more rows than the store has
        self._buffers = engine.step_buffers(min(self.max_batch, store.capacity))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue | None = None  # (requests, job) for the worker; None: stop
        self._worker: threading.Thread | None = None
        self._job: Callable | None = None  # the job the worker is running, None while idle
        # (sessions, seconds) of each ORT call of the job running (jobs run one at a time,
        # inline ones too), counted when it ends (_account)
        self._calls: list[tuple[int, float]] = []
        self._prefill_turn = False  # after a step batch, a waiting prefill goes first
        self._pump_soon = False  # a _pump is scheduled for the end of this loop iteration
        self._timer: asyncio.TimerHandle | None = None  # the batch delay's deadline
        self._ended_seen = 0  # store.ended when `_complete` last dropped ended sessions
        self._idle: asyncio.Event | None = None
        self._closing = False

    # --- lifecycle -----------------------------------------------------------------------

    def add_listener(self, callback: Callable[[int, float], None]) -> None:
        """Call `callback(batch_size, seconds)` after every ORT call (from the event loop)."""
        self._listeners.append(callback)

    @property
    def running(self) -> bool:
        """Whether `start` was called and `close` has not ended the worker thread."""
        return self._worker is not None

    async def start(self) -> None:
        """Start the worker thread (results come back to the running event loop)."""
        if self.running:
            return
        if self.engine.cuda_graphs:  # capture every bucket now, while nothing else runs
            rows = min(self.max_batch, self._buffers.chunk_rows)
            self.engine.capture_graphs(self.store.slab, rows)
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self._jobs = queue.SimpleQueue()
        self._worker = threading.Thread(
            target=self._work, args=(self._jobs, self._loop), name="ssmstream-engine", daemon=True
        )
        self._worker.start()

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, stop the worker."""
        if self._worker is None:
            return
        if not self._loop.is_closed():  # its loop ended (asyncio.run over): nothing can run
            self.check_loop()  # from another loop it would wait for ever, refusing everything
        self._closing = True
        await self._idle.wait()
        if self._worker is None:  # another close() finished meanwhile
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._jobs.put(None)  # the worker is idle: it exits at once
        self._worker = self._jobs = None

    def pending(self) -> int:
        """Requests queued or running."""
        return len(self._busy) + sum(len(q) for q in self._waiting.values())

    # --- submitting ----------------------------------------------------------------------

    async def step(
        self, s: Session, x: np.ndarray, states: dict | None = None
    ) -> tuple[np.ndarray, int]:
        """Feed inputs to a session; returns (outputs [T, d_out], new position).

        Args:
            s: a live Session from the store (its owner checked by the caller).
            x: inputs as Engine.check_inputs returns them: tokens int64 [T] | values
                float32 [T, d_in]; T > 1 = prefill.
        Raises SessionNotFound, LimitExceeded (session queue full), OutOfRange
        (past the largest position), Unavailable (closing / not started), EngineFailure: the
        session's state and position are unchanged. CorruptState: the step applied, but
        its outputs are NaN / inf (the state it came from is unusable).
        states: a dict to fill with {t: the state after the first t inputs, float32 [S]}: at
            a prefill's chunk ends and at T (Engine.prefill_unchecked), at 1 for a step; read
            when the request runs, before any later request of the session.
        """
        self._check_open()
        if not s.live:
            raise s.gone()
        past_end = _past_end(s, x.shape[0])  # checked again when it runs: others may be queued
        if past_end is not None:
            raise past_end
        loop = self._loop
        now = loop.time()
        if (
            self.inline
            and not self._busy  # nothing queued or running: the worker's buffers are free
            and x.shape[0] == 1
            and self._job is None
            and self._active(now) == 1
            and _key(s) in self._recent  # the one active session already
        ):
            outputs, position = self._step_inline(s, x, now, states)
        else:
            req = _Request(s, x, loop.create_future(), now, states=states)
            outputs, position = await self._enqueue(req)
        if not np.isfinite(outputs).all():
            raise CorruptState(
                f"session {s.id!r}: the model's outputs up to position {position} are NaN or "
                f"inf; its state is unusable (close it, or restore a good snapshot)"
            )
        return outputs, position

    def _step_inline(
        self, s: Session, x: np.ndarray, now: float, states: dict | None = None
    ) -> tuple[np.ndarray, int]:
        """A lone stream's step, run at once (see `inline`): its (outputs, position)."""
        req = _Request(s, x, None, now, states=states)
        self._recent[_key(s)] = now, s
        self.store.pin(s)
        try:
            (result,) = self._run_inline([req], self._run_steps)
        finally:
            self.store.unpin(s)
        if isinstance(result, BaseException):
            self.stats.failed += 1
            raise result
        return result

    async def rewind(self, s: Session, position: int) -> int:
        """Return a session to an earlier position from its History (runtime/history.py): in
        the session's request order, like a step: OutOfRange for a position ahead of the
        session or outside the window when its turn comes."""
        self._check_open()
        if not s.live:
            raise s.gone()
        loop = self._loop
        x = np.empty(0, dtype=np.int64)
        req = _Request(s, x, loop.create_future(), loop.time(), rewind_to=position)
        return (await self._enqueue(req))[1]

    def _check_open(self) -> None:
        """Unavailable unless running; RuntimeError off the event loop that started it (the
        request's future and the queues belong to that loop: nothing is applied)."""
        if self._closing or not self.running:
            raise Unavailable("batcher is not running (closing or not started)")
        self.check_loop()

    def check_loop(self) -> None:
        """RuntimeError when called off the event loop that started the batcher (before the
        start: nothing to check)."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "the Batcher (and the SessionService over it) runs on the event loop that "
                "started it; call it from that loop (from another thread: "
                "asyncio.run_coroutine_threadsafe(coro, loop))"
            )

    async def _enqueue(self, req: _Request) -> tuple[np.ndarray, int]:
        """Queue a request behind the session's others and wait for its result."""
        loop, s = asyncio.get_running_loop(), req.session
        key = _key(s)
        if key in self._busy:
            q = self._waiting.setdefault(key, deque())
            if len(q) >= self.max_queue_per_session:  # the cancelled ones make room first
                for gone in [r for r in q if r.future.cancelled()]:
                    q.remove(gone)
                    self.store.unpin(gone.session)
                    self.stats.cancelled += 1
            if len(q) >= self.max_queue_per_session:
                raise LimitExceeded(
                    f"session {s.id!r} already has {len(q)} requests queued "
                    f"(max_queue_per_session={self.max_queue_per_session})"
                )
            self.store.pin(s)
            q.append(req)
        else:
            self.store.pin(s)
            self._busy.add(key)
            self._idle.clear()
            self._ready(req)
        self._recent.pop(key, None)
        self._recent[key] = req.enqueued, s
        self._active(req.enqueued)  # drops the stale: only 1-input steps did (one per session)
        if not self._pump_soon:  # after the other requests of this loop iteration arrived
            self._pump_soon = True
            loop.call_soon(self._pump)
        return await req.future

    def _ready(self, req: _Request) -> None:
        (self._steps if req.T == 1 else self._prefills).append(req)

    def _finish(self, req: _Request) -> None:
        """After a request ran (or was dropped): unpin, start the session's next request."""
        self.store.unpin(req.session)
        key = _key(req.session)
        q = self._waiting.get(key)
        if q:
            self._ready(q.popleft())
            if not q:
                del self._waiting[key]
        else:
            self._busy.discard(key)
            if not self._busy:
                self._idle.set()

    # --- scheduling ----------------------------------------------------------------------

    def _active(self, now: float) -> int:
        """Sessions that sent a request within the activity window."""
        horizon = now - self.activity_window
        while self._recent:
            key, (t, _) = next(iter(self._recent.items()))
            if t >= horizon or key in self._busy:
                break
            del self._recent[key]
        return len(self._recent)

    def _complete(self, now: float) -> bool:
        """True when waiting cannot grow the batch: full, or every active session is in it."""
        n = len(self._steps)
        if n >= self.max_batch or n + len(self._prefills) >= self._active(now):
            return True
        # a session closed or evicted since its last request sends no more: not waited for
        # (looked for when sessions ended since the last look; one still busy, again later)
        ended = self.store.ended
        if ended == self._ended_seen:
            return False
        gone = [k for k, (_, s) in self._recent.items() if not s.live]
        for key in gone:
            if key not in self._busy:
                del self._recent[key]
        if not any(key in self._busy for key in gone):
            self._ended_seen = ended
        return n + len(self._prefills) >= len(self._recent)

    def _pump(self) -> None:
        """Start the next job if the worker is free. Runs on the event loop whenever that can
        change: requests arrived, a job finished, a batch delay ran out."""
        self._pump_soon = False
        if self._job is not None or self._jobs is None:
            return  # the worker is busy: its completion pumps again
        try:
            while self._steps or self._prefills:
                if self._steps and not (self._prefill_turn and self._prefills):
                    if self.max_batch_delay > 0:
                        now = self._loop.time()
                        deadline = self._steps[0].enqueued + self.max_batch_delay
                        if now < deadline and not self._complete(now):
                            if self._timer is None:
                                self._timer = self._loop.call_at(deadline, self._on_deadline)
                            return
                    batch = self._take_steps()
                    if batch:
                        self._prefill_turn = True
                        if self.inline and len(batch) == 1 and self._lone(batch[0]):
                            results = self._run_inline(batch, self._run_steps)
                            self._hand_back(list(zip(batch, results)))
                            continue  # its session's next request may be ready now
                        self._submit(batch, self._run_steps)
                        return
                    continue  # every one was cancelled
                self._prefill_turn = False
                req = self._prefills.popleft()
                if req.future.cancelled():
                    self._drop(req)
                    continue
                self._submit([req], self._run_prefill)
                return
        except Exception:  # a bug here must not hang every client: fail what is queued
            log.exception("batcher scheduler failed; failing queued requests")
            self._fail_queued()

    def _lone(self, req: _Request) -> bool:
        """True when `req`'s session is the only active one (see `_active`)."""
        return self._active(self._loop.time()) <= 1 and _key(req.session) in self._recent

    def _run_inline(self, reqs: list[_Request], job: Callable) -> list:
        """Run a job on the event loop, as the worker would, and count it; returns a
        result or exception per request."""
        self.stats.inline += len(reqs)
        return self._account(reqs, job, *_timed(job, reqs))

    def _on_deadline(self) -> None:
        self._timer = None
        self._pump()

    def _fail_queued(self) -> None:
        reqs = [*self._steps, *self._prefills]
        self._steps.clear()
        self._prefills.clear()
        for req in reqs:
            if not req.future.done():
                req.future.set_exception(EngineFailure("batcher scheduler failed"))
            self._finish(req)

    def _submit(self, reqs: list[_Request], job: Callable) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._job = job
        self._jobs.put((reqs, job))

    def _take_steps(self) -> list[_Request]:
        batch = []
        while self._steps and len(batch) < self.max_batch:
            req = self._steps.popleft()
            if req.future.cancelled():
                self._drop(req)
            else:
                batch.append(req)
        return batch

    def _drop(self, req: _Request) -> None:
        self.stats.cancelled += 1
        self._finish(req)

    def _done(self, reqs: list[_Request], job: Callable, results, seconds: float) -> None:
        """Back on the event loop after a job: deliver each request's result or exception,
        then start the next job."""
        self._job = None
        try:
            self._deliver(reqs, job, results, seconds)
        finally:
            self._pump()

    def _deliver(self, reqs: list[_Request], job: Callable, results, seconds: float) -> None:
        results = self._account(reqs, job, results, seconds)
        self._hand_back([(r, x) for r, x in zip(reqs, results) if not r.delivered])

    def _account(self, reqs: list[_Request], job: Callable, results, seconds: float) -> list:
        """Count a job that ran in the stats and tell the listeners; returns its result or
        exception per request (a job that failed as a whole fails each)."""
        if isinstance(results, Exception):  # the job itself failed: nothing was committed
            e = results
            err = e if isinstance(e, EngineFailure) else EngineFailure(INTERNAL_ERROR)  # logged
            results = [err] * len(reqs)
        calls, self._calls = self._calls, []
        st = self.stats
        st.batches += len(calls)
        st.busy_seconds += seconds
        if job == self._run_steps:
            st.steps += len(reqs)
            for B, _ in calls:
                st.batch_sizes[B] = st.batch_sizes.get(B, 0) + 1
        elif reqs[0].rewind_to is not None:
            st.rewinds += 1
        else:
            st.prefills += 1
            st.prefill_inputs += reqs[0].T
        for B, sec in calls:
            for callback in self._listeners:
                try:
                    callback(B, sec)
                except Exception:  # a metrics hook must not break serving
                    log.exception("batch listener %r failed", callback)
        return results

    def _hand_back(self, items: list[tuple[_Request, object]]) -> None:
        """Resolve each request's future with its result (or exception); start its next."""
        for req, result in items:
            req.delivered = True
            if not req.future.done():
                if isinstance(result, BaseException):
                    self.stats.failed += 1
                    req.future.set_exception(result)
                else:
                    req.future.set_result(result)
            elif not isinstance(result, BaseException) and req.rewind_to is None:
                self.stats.discarded_inputs += req.T  # applied; its caller had gone
            self._finish(req)

    # --- worker thread -------------------------------------------------------------------

    def _work(self, jobs: queue.SimpleQueue, loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread: run each job, hand its results back to the event loop."""
        while (item := jobs.get()) is not None:
            reqs, job = item
            results, seconds = _timed(job, reqs)
            try:
                loop.call_soon_threadsafe(self._done, reqs, job, results, seconds)
            except RuntimeError:  # the event loop is closed: nobody waits for these results
                return

    def _run_steps(self, reqs: list[_Request]) -> list:
        """One batch of steps, as one ORT call per `chunk_rows` sessions. Returns a result or
        exception per request; the requests of one call apply or fail together. Every call's
        results but the last are handed back to the event loop at once, so those clients
        send their next request while the next call runs."""
        live = [r for r in reqs if r.session.live]
        c = self._buffers.chunk_rows
        results = {}
        for i in range(0, len(live), c):
            part = live[i : i + c]
            try:
                done = self._step_part(part)
            except Exception as e:
                if not isinstance(e, EngineFailure):  # a bug: its text stays in the log
                    log.exception("step batch failed")
                    e = EngineFailure(INTERNAL_ERROR)
                done = dict.fromkeys(part, e)
            if i + c < len(live):
                try:
                    self._loop.call_soon_threadsafe(self._hand_back, list(done.items()))
                except RuntimeError:  # the event loop is closed: nobody waits for these
                    pass
            results.update(done)
        if len(results) < len(reqs):
            for r in reqs:  # closed before its step ran
                if r not in results:
                    results[r] = r.session.gone()
        return [results[r] for r in reqs]

    def _step_part(self, part: list[_Request]) -> dict:
        """One ORT call: the sessions' slab rows, stepped in place (Engine.run_slots).
        A step that would pass the largest position (requests queued together each passed
        the check at their arrival) is refused here, unapplied."""
        buf, store = self._buffers, self.store
        refused = {r: e for r in part if (e := _past_end(r.session, 1)) is not None}
        if refused:
            part = [r for r in part if r not in refused]
        lent = store.lend([r.session for r in part])
        try:
            if len(lent) < len(part):  # closed meanwhile: SessionNotFound from _run_steps
                kept = set(lent)
                part = [r for r in part if r.session in kept]
            B = len(part)
            if not B:
                return refused
            for j, r in enumerate(part):
                buf.inputs[j] = r.inputs[0]
                buf.slots[j, 0] = r.session.slot
            outputs = self._call(B, self.engine.run_slots, store.slab, B, buf)
        except BaseException:
            store.give_back(lent, 0)  # nothing was written
            raise
        out = outputs.copy()  # [B, d_out], one copy: the buffer is reused next call
        positions = store.give_back(lent, 1)  # from here on, the steps have applied
        for r, pos in zip(part, positions):
            if isinstance(pos, Exception):
                continue
            if r.states is not None:  # read now: a later request of the session may be next
                x = self._state_of(r.session)
                if x is not None:
                    r.states[1] = x
            h = r.session.history
            if h is not None:
                self._keep_history(r.session, h.step, r.inputs, pos, self._state_of, r.session)
        return refused | {
            r: pos if isinstance(pos, Exception) else (out[j : j + 1], pos)
            for j, (r, pos) in enumerate(zip(part, positions))
        }

    def _call(self, B: int, run: Callable, *args):
        """run(*args): one onnxruntime call for B sessions, recorded (sessions, seconds) for
        the stats and listeners (_account), failed or not."""
        t0 = time.perf_counter()
        try:
            return run(*args)
        finally:
            self._calls.append((B, time.perf_counter() - t0))

    def _keep_history(self, s: Session, update: Callable, *args) -> None:
        """Apply a History update after a request applied; a failure there never fails the
        request: the session loses its rewind history instead (rewind then says so)."""
        try:
            update(*args)
        except Exception:
            if s.live:
                log.exception("rewind history of session %r dropped", s.id)
                h, s.history = s.history, None
                if h is not None:
                    h.release()

    def _state_of(self, s: Session) -> np.ndarray | None:
        """The session's state [S] (a History checkpoint's source), None once it is gone or
        unreadable: a step that applied is never failed by its checkpoint."""
        try:
            return self.store.read(s)
        except (SessionNotFound, Unavailable):
            return None
        except Exception:
            log.exception("rewind checkpoint of session %r skipped", s.id)
            return None

    def _run_prefill(self, reqs: list[_Request]) -> list:
        (r,) = reqs
        if r.rewind_to is not None:
            return [self._rewind(r)]
        past_end = _past_end(r.session, r.T)
        if past_end is not None:
            return [past_end]
        h = r.session.history
        try:
            state = self.store.read(r.session)[None]  # [1, S]
        except (SessionNotFound, Unavailable) as e:
            return [e]
        states = {} if (r.states is not None or h is not None) else None
        outputs, new_state = self._call(
            1, self.engine.prefill_unchecked, r.inputs[None], state, states
        )
        try:
            position = self.store.commit(r.session, new_state[0], r.T)
        except (SessionNotFound, Unavailable) as e:  # Unavailable: moved to another replica
            return [e]
        if states is not None:
            states.setdefault(r.T, new_state)
            states = {t: x[0] for t, x in states.items()}  # [S] each
            if h is not None:  # its checkpoints may also take the state the prefill began at
                at = {position - r.T + t: x for t, x in states.items()} | {position - r.T: state[0]}
                self._keep_history(r.session, h.record, r.inputs, position, at)
            if r.states is not None:
                r.states.update(states)
        return [(outputs[0], position)]  # [T, d_out]

    def _rewind(self, r: _Request):
        """Replay the session's History up to r.rewind_to; (no outputs, the position) or the
        error. The session's state and position change only when everything worked."""
        h, s = r.session.history, r.session
        if not s.live:  # closed or evicted while it waited
            return s.gone()
        if r.rewind_to > s.position:  # checked here, at its turn: steps may have been queued
            return OutOfRange(
                "position", f"{r.rewind_to} is ahead of the session (at position {s.position})"
            )
        if h is None:
            return OutOfRange("position", f"session {s.id!r} has no rewind history (rewind is off)")
        if r.rewind_to == s.position:  # already there: its state as it is, no replay
            return np.empty((0, self.engine.d_output), dtype=np.float32), r.rewind_to
        try:
            state, inputs = h.plan(r.rewind_to)  # [S], [n] | [n, d_in]
            if len(inputs):
                _, state = self._call(1, self.engine.prefill_unchecked, inputs[None], state[None])
                state = state[0]
            self.store.rewind(s, state, r.rewind_to)
        except (OutOfRange, SessionNotFound, Unavailable) as e:  # Unavailable: moved away
            return e if s.live or isinstance(e, Unavailable) else s.gone()
        h.rewound(r.rewind_to)
        return np.empty((0, self.engine.d_output), dtype=np.float32), r.rewind_to
