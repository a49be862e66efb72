"""Every resource of the in-process server returns to where it started once the clients are
gone: after a seeded random mix of calls cancelled at random moments, deadlines that pass
mid-call, streams dropped without a close, generations cut early, channels closed under an
open stream, refused requests, forks, restores and rewinds, and sessions left to expire.

Read afterwards: the store (sessions, free slots, per-principal counts), the service
(attached sessions, open streams, rewind checkpoint bytes and their shared budget), the
batcher (queued requests, the sessions it waits for), the prefix cache (within its budget,
its byte count the sum of its entries), the Prometheus gauges, the process's threads and open
file descriptors, and the tasks on the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_helpers import scrape, serve, target
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime import server as server_module
from ssmstream.runtime.admission import RpcLimit
from ssmstream.runtime.servicer import StreamingInferenceServicer

SEED = 20261207
TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789abc"}
LIMITS = dict(
    max_sessions=14,
    max_sessions_per_principal=8,
    max_tokens_per_request=12,
    max_new_tokens=40,
    rewind_window=24,
    rewind_memory_mb=0.002,  # ~2 KiB for all sessions' checkpoints: the budget is hit
    prefix_cache_mb=0.002,  # a few entries: the cache evicts
    session_ttl=60.0,  # a session nobody closed stays past the test (a sweep every 5 s)
    metrics_port=0,
    max_batch=4,
    max_batch_delay=0.002,
    max_concurrent_rpcs=9,
)
SHORT_TTL = 0.15  # sessions some workers leave to expire
SETTLE = 2.5  # s: the calls dropped end by their deadline
CHAOS_SECONDS = 3.0
REFUSED = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
}
GAUGES = ("ssmstream_sessions_active", "ssmstream_rewind_checkpoint_bytes", "ssmstream_draining")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def _read(srv) -> dict:
    """Every resource the server holds per session or per call, read on its event loop."""
    s = srv.server

    async def on_loop() -> dict:
        svc, store, b, cache = s.service, s.store, s.batcher, s.service.prefix_cache
        entries = [e for scope in cache._entries.values() for e in scope.values()]
        return {
            "sessions": len(store),
            "free_slots": store.stats()["free"],
            "per_principal": dict(store._per_principal),
            "attached": svc.attached,
            "open_streams": svc.open_streams,
            "checkpoint_bytes": svc.feature_stats()["checkpoint_bytes"],
            "checkpoint_budget_used": svc.checkpoint_budget.used,
            "batcher_pending": b.pending(),
            "batcher_queued": len(b._steps) + len(b._prefills) + len(b._waiting),
            "batcher_live_recent": sum(1 for _, x in b._recent.values() if x.live),
            "cache_consistent": cache.bytes == sum(e.nbytes for e in entries)
            and cache.bytes <= cache.max_bytes,
            "rpcs_running": srv.rpc_limit.running,
            "tasks": len(asyncio.all_tasks()),
        }

    return srv.call(on_loop(), timeout=10)


def _md(principal: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[principal]}"),)


class Worker:
    """One client thread's random schedule: its own channel (some closed under a call),
    the sessions it knows, each call's outcome one of REFUSED or OK."""

    def __init__(self, srv, n: int, principal: str, shared: dict):
        self.addr, self.principal, self.md = target(srv), principal, _md(principal)
        self.shared = shared[principal]  # the principal's sessions, of every worker
        self.rng = random.Random(SEED * 100 + n)
        self.known: set[str] = set()
        self.errors: list[BaseException] = []
        self.outcomes: Counter = Counter()  # (operation, status code name)
        self._channel()

    def _channel(self) -> None:
        self.ch = grpc.insecure_channel(self.addr)
        self.stub = pb_grpc.StreamingInferenceStub(self.ch)

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(11) for _ in range(n)]

    def _session(self) -> str | None:
        """One of this worker's sessions, or now and then one another worker uses."""
        pool = self.known if self.rng.random() < 0.7 else set(self.shared[:])
        return self.rng.choice(sorted(pool)) if pool else None

    def _learn(self, sid: str) -> None:
        self.known.add(sid)
        self.shared.append(sid)  # (a list: other threads copy it while this one appends)

    def run(self, until: float) -> None:
        ops = [self.create, self.step, self.stream, self.generate, self.refused, self.tree]
        while time.monotonic() < until:
            op = self.rng.choice(ops)
            try:
                if len(self.known) > 1:  # make room: the store is busy but not always full
                    sid = self.rng.choice(sorted(self.known))
                    self.known.discard(sid)
                    self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=self.md)
                op()
                self.outcomes[op.__name__, "OK"] += 1
            except grpc.RpcError as e:
                self.outcomes[op.__name__, e.code().name] += 1
                if e.code() not in REFUSED:
                    self.errors.append(e)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
        self.ch.close()

    def create(self) -> None:
        short = self.rng.random() < 0.4
        prompt = self._tokens(self.rng.randrange(0, 12)) if self.rng.random() < 0.6 else []
        s = self.stub.CreateSession(
            pb.CreateSessionRequest(ttl_seconds=SHORT_TTL if short else 0, prompt=prompt),
            metadata=self.md,
            timeout=self.rng.choice([0.002, 0.01, 2.0]),
        )
        if not short:  # a short one is left to expire
            self._learn(s.session_id)

    def step(self) -> None:
        sid = self._session()
        if sid is None:
            return
        fut = self.stub.Step.future(
            pb.StepRequest(session_id=sid, tokens=self._tokens(self.rng.randrange(1, 12))),
            metadata=self.md,
            timeout=self.rng.choice([0.001, 0.005, 2.0]),
        )
        if self.rng.random() < 0.3:
            time.sleep(self.rng.random() * 0.003)
            fut.cancel()
        try:
            fut.result()
        except grpc.FutureCancelledError:
            pass

    def stream(self) -> None:
        sid = self._session() if self.rng.random() < 0.5 else ""
        n = self.rng.randrange(1, 6)
        cut = self.rng.randrange(0, n + 1)
        how = self.rng.choice(["cancel", "drop", "close_channel", "deadline", "end", "hang"])
        gate = threading.Event()

        def requests():
            for i in range(n):
                yield pb.StepRequest(session_id=sid if i == 0 else "", tokens=self._tokens(1))
                if how == "hang":  # no half-close: the server waits for a next request
                    gate.wait(1.0)
                    return

        call = self.stub.Stream(
            requests(), metadata=self.md, timeout=0.02 if how == "deadline" else 2.0
        )
        for i, r in enumerate(call):
            self._learn(r.session_id)
            if i >= cut:
                break
        if how in ("cancel", "hang"):
            call.cancel()
            gate.set()
        elif how == "close_channel":
            self.ch.close()
            self._channel()
        elif how == "drop":
            del call
        elif how == "end":
            for _ in call:
                pass

    def generate(self) -> None:
        own = self.rng.random() < 0.5 and self.known
        sid = self._session() if own else ""
        keep = not own and self.rng.random() < 0.5
        how = self.rng.choice(["cancel", "close_channel", "deadline", "end", "drop"])
        call = self.stub.Generate(
            pb.GenerateRequest(
                session_id=sid,
                prompt=self._tokens(self.rng.randrange(1, 12)),
                max_new_tokens=self.rng.randrange(1, 30),
                temperature=1.0,
                seed=self.rng.randrange(1000),
                keep_session=keep,
            ),
            metadata=self.md,
            timeout=self.rng.choice([0.003, 0.02]) if how == "deadline" else 2.0,
        )
        cut = self.rng.randrange(0, 4)
        for i, r in enumerate(call):
            if keep:
                self._learn(r.session_id)
            if i >= cut and how != "end":
                break
        if how == "cancel":
            call.cancel()
        elif how == "close_channel":
            self.ch.close()
            self._channel()
        elif how == "drop":
            del call

    def refused(self) -> None:
        sid = self._session() or "no-such-session"
        bad = self.rng.choice(
            [
                lambda: self.stub.Step(
                    pb.StepRequest(session_id=sid, tokens=self._tokens(13)), metadata=self.md
                ),
                lambda: self.stub.Step(
                    pb.StepRequest(session_id=sid, tokens=[11]), metadata=self.md
                ),
                lambda: self.stub.Step(pb.StepRequest(session_id="?", tokens=[1])),
                lambda: self.stub.CreateSession(
                    pb.CreateSessionRequest(ttl_seconds=-1), metadata=self.md
                ),
                lambda: list(
                    self.stub.Generate(
                        pb.GenerateRequest(prompt=[1], max_new_tokens=41), metadata=self.md
                    )
                ),
                lambda: list(
                    self.stub.Stream(
                        iter([pb.StepRequest(tokens=[1]), pb.StepRequest(tokens=[99])]),
                        metadata=self.md,
                    )
                ),
                lambda: self.stub.RewindSession(
                    pb.RewindRequest(session_id=sid, position=10**6), metadata=self.md
                ),
                lambda: self.stub.RestoreSession(
                    pb.RestoreRequest(snapshot=b"junk"), metadata=self.md
                ),
            ]
        )
        bad()

    def tree(self) -> None:
        sid = self._session()
        if sid is None:
            return
        op = self.rng.choice(["fork", "restore", "rewind", "close"])
        t = self.rng.choice([0.003, 2.0])
        if op == "fork":
            s = self.stub.ForkSession(pb.ForkRequest(session_id=sid), metadata=self.md, timeout=t)
            self._learn(s.session_id)
        elif op == "restore":
            snap = self.stub.SnapshotSession(
                pb.SnapshotRequest(session_id=sid), metadata=self.md, timeout=2.0
            )
            s = self.stub.RestoreSession(
                pb.RestoreRequest(snapshot=snap.data), metadata=self.md, timeout=t
            )
            self._learn(s.session_id)
        elif op == "rewind":
            pos = self.rng.randrange(0, 40)
            self.stub.RewindSession(
                pb.RewindRequest(session_id=sid, position=pos), metadata=self.md, timeout=t
            )
        else:
            self.known.discard(sid)
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=self.md)

    def close_all(self) -> None:
        ch = grpc.insecure_channel(self.addr)
        stub = pb_grpc.StreamingInferenceStub(ch)
        for sid in sorted(self.known):
            try:
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=self.md)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        ch.close()


async def _aio_worker(addr: str, n: int, until: float, errors: list) -> None:
    """Asyncio clients (on the server's loop): Streams and Generates cancelled as tasks at
    random moments."""
    rng = random.Random(SEED * 1000 + n)
    md, known = _md("bob"), set()
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.StreamingInferenceStub(ch)

        async def gen():
            async for _ in stub.Generate(
                pb.GenerateRequest(prompt=[1, 2, 3], max_new_tokens=30, temperature=0.0),
                metadata=md,
            ):
                pass

        async def stream():
            async def reqs():
                for _ in range(rng.randrange(1, 8)):
                    yield pb.StepRequest(tokens=[rng.randrange(11)])
                    await asyncio.sleep(0)

            async for r in stub.Stream(reqs(), metadata=md):
                known.add(r.session_id)

        while time.monotonic() < until:
            task = asyncio.ensure_future(rng.choice([gen, stream])())
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
            for sid in sorted(known):  # a Stream's session, once its id was read
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md)
            known.clear()


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


async def _sweep(srv) -> None:
    srv.server.store.evict_idle()  # on the loop, as the server's sweep


def _settled(srv, base: dict, threads: set[str], timeout: float) -> dict:
    """The resources once equal to `base` (and no thread beyond `threads`: a dropped call's
    threads end at its deadline, at most 2 s), or as they are at the timeout. The idle
    sweep runs at each look (the server's runs every 5 s): the short-TTL sessions go."""
    deadline = time.monotonic() + timeout
    while True:
        srv.call(_sweep(srv))  # the idle sweep, run now
        now = _read(srv)
        same = all(now[k] == base[k] for k in base if k != "tasks")
        same = same and now["tasks"] <= base["tasks"]  # grpc's own tasks come and go
        if (same and _threads() <= threads) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


class _Recorded(StreamingInferenceServicer):
    """Records each session whose id the server handed to the transport: a client cut
    after that may not have read it, and the session stays (the contract of Stream, Generate
    and the unary calls that make one); the test closes these as their owner would, except
    the short-TTL ones, which must go by themselves."""

    handed: list = []

    def _handed_out(self, s, context):
        s = super()._handed_out(s, context)  # raises where the call's deadline passed
        if s.ttl != SHORT_TTL:  # those are left to expire
            self.handed.append((s.id, s.principal))
        return s


class _CountedLimit(RpcLimit):
    made: list[RpcLimit] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.made.append(self)


@pytest.fixture
def no_cycle_collection():
    """Cyclic garbage collection off: what a call holds must be let go when it ends, not
    when a collection happens to run (a quiet server may see none for a long time)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def limited_server(toy_token_model, tmp_path, monkeypatch):
    """A server with small limits, two principals; `srv.rpc_limit` its --max-concurrent-rpcs
    interceptor."""
    f = tmp_path / "tokens"
    f.write_text("".join(f"{tok} {who}\n" for who, tok in TOKENS.items()))
    made: list[RpcLimit] = []
    monkeypatch.setattr(_CountedLimit, "made", made)
    monkeypatch.setattr(server_module, "RpcLimit", _CountedLimit)
    monkeypatch.setattr(_Recorded, "handed", [])
    monkeypatch.setattr(server_module, "StreamingInferenceServicer", _Recorded)
    with serve(toy_token_model["model_dir"], auth_tokens=str(f), **LIMITS) as srv:
        (srv.rpc_limit,) = made
        yield srv


def _warm_up(srv) -> None:
    """One call of each kind, so that the lazily started threads (grpc's, the exporter's)
    are in the baseline."""
    with grpc.insecure_channel(target(srv)) as ch:
        stub, md = pb_grpc.StreamingInferenceStub(ch), _md("alice")
        s = stub.CreateSession(pb.CreateSessionRequest(prompt=[1, 2, 3]), metadata=md)
        stub.Step(pb.StepRequest(session_id=s.session_id, tokens=[4]), metadata=md)
        list(stub.Generate(pb.GenerateRequest(prompt=[1], max_new_tokens=2), metadata=md))
        stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=md)
    scrape(srv.server.metrics_port)


def _close_handed_out(srv) -> None:
    """Close every session the server handed out (NOT_FOUND: closed already), as its owner."""
    with grpc.insecure_channel(target(srv)) as ch:
        stub = pb_grpc.StreamingInferenceStub(ch)
        for sid, who in sorted(set(_Recorded.handed)):
            try:
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=_md(who))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e


def _chaos(srv) -> tuple[list, Counter]:
    """Run the client threads and the asyncio clients; returns the unexpected errors and
    how the threads' calls ended ({status code name: calls})."""
    until = time.monotonic() + CHAOS_SECONDS
    shared = {"alice": [], "bob": []}
    workers = [Worker(srv, n, "alice" if n % 2 else "bob", shared) for n in range(6)]
    threads = [threading.Thread(target=w.run, args=(until,)) for w in workers]
    aio_errors: list = []

    async def aio_clients():
        await asyncio.gather(*(_aio_worker(target(srv), n, until, aio_errors) for n in range(3)))

    for t in threads:
        t.start()
    # grpc.aio serves one event loop per process: the asyncio clients share the server's
    srv.call(aio_clients(), timeout=CHAOS_SECONDS + 10)
    for t in threads:
        t.join(CHAOS_SECONDS + 10)
        assert not t.is_alive()
    for w in workers:
        w.close_all()
    ended = Counter()
    for w in workers:
        for (_, code), n in w.outcomes.items():
            ended[code] += n
    return [e for w in workers for e in w.errors] + aio_errors, ended


def test_every_resource_returns_to_its_baseline_after_chaos(limited_server, no_cycle_collection):
    srv = limited_server
    _warm_up(srv)
    base = _read(srv)
    threads0, fds0 = _threads(), _fds()
    assert base["sessions"] == 0 and base["free_slots"] == LIMITS["max_sessions"]
    assert base["rpcs_running"] == 0 and base["per_principal"] == {}

    errors, ended = _chaos(srv)
    assert errors == []
    # the schedule reached the paths it is meant to: answers, passed deadlines, each refusal
    for code in ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
        assert ended[code] > 0, (code, ended)
    for code in ("NOT_FOUND", "OUT_OF_RANGE", "UNAUTHENTICATED"):
        assert ended[code] > 0, (code, ended)
    _close_handed_out(srv)
    now = _settled(srv, base, threads0, timeout=SETTLE)
    assert {k: v for k, v in now.items() if k != "tasks"} == {
        k: v for k, v in base.items() if k != "tasks"
    }
    assert now["tasks"] <= base["tasks"]
    # the batcher forgets the ended sessions it waited for at its next request
    waited_for = set(srv.server.batcher._recent)
    time.sleep(2 * srv.server.batcher.activity_window)
    _warm_up(srv)
    assert waited_for & set(srv.server.batcher._recent) == set()
    metrics = scrape(srv.server.metrics_port)
    for g in GAUGES:
        assert metrics[g] == 0, g
    assert metrics["ssmstream_prefix_cache_bytes"] <= srv.server.service.prefix_cache.max_bytes
    deadline = time.monotonic() + 0.5  # the exporter's thread that answered the scrape ends
    while not _threads() <= threads0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(_threads() - threads0) == []
    deadline = time.monotonic() + 2  # a file descriptor may close a moment after its call
    # ended (once in a full run: 42 open against 37 at the start, 39 allowed)
    while _fds() > fds0 + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= fds0 + 2
