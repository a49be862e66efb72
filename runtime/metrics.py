"""Prometheus metrics of one server (prometheus-client), served over HTTP on --metrics-port.

    ssmstream_tokens_total{rpc}            inputs consumed (Generate: its prompt and the
                                           generated tokens fed back; CreateSession: its
                                           prompt) (counter)
    ssmstream_tokens_discarded_total       inputs applied after their call ended (the
                                           client cancelled it or its deadline passed
                                           while they ran: the session advanced, the
                                           outputs were dropped; BatcherStats)
    ssmstream_tokens_per_second            inputs/s over the last WINDOW seconds (gauge)
    ssmstream_requests_total{rpc}          Step requests / Stream messages / Generate calls …
    ssmstream_errors_total{code}           RPCs that ended with a non-OK status, by code
                                           (those the server answers, and CANCELLED /
                                           DEADLINE_EXCEEDED for those grpc ended — an
                                           expired call whose client's cancel arrived
                                           before the server's copy of the deadline
                                           passed counts as CANCELLED; grpc refuses a
                                           message over --max-message-bytes itself,
                                           uncounted)
    ssmstream_request_latency_seconds{rpc} wall time of one request, per-token for streams
    ssmstream_batch_size                   sessions per onnxruntime call (histogram; a
                                           prefill or a rewind's replay counts as one call)
    ssmstream_batch_latency_seconds        time of one batched onnxruntime call (histogram)
    ssmstream_sessions_active              open sessions (from SessionStore.stats())
    ssmstream_sessions_evicted_total       sessions evicted by the idle TTL
    ssmstream_draining                     1 while shutting down
    process_*                              the process's CPU seconds, resident and virtual
                                           memory, open and most file descriptors, start
                                           time (prometheus-client's ProcessCollector; Linux)

Each server owns its CollectorRegistry, so several servers in one process (tests) do
not collide.

The per-token metrics (tokens, requests, request latency, batch size and latency, tokens/s)
are plain counters and bucket lists that the event loop updates without locks and a
collector turns into metric families at scrape time: prometheus-client's own Counter and
Histogram take a lock and walk the buckets in Python on every observation, ~10 µs per
streamed token. Only the event-loop thread writes them; a scrape (HTTP thread) reads a
consistent-enough snapshot (each count is read once).
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

WINDOW = 10.0  # seconds over which tokens_per_second is averaged
LATENCY_BUCKETS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _RateWindow:
    """Events per second over the last `window` seconds, in 1 s bins. `add` is for one
    writer thread and takes the lock only when a new second starts; `rate` may run in
    any thread."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self.bins: collections.deque[tuple[int, int]] = collections.deque()  # (second, count)
        self.lock = threading.Lock()
        self.start = clock()
        self._second, self._count = int(self.start), 0  # the current bin

    def add(self, n: int) -> None:
        now = int(self.clock())
        if now != self._second:
            with self.lock:
                if self._count:
                    self.bins.append((self._second, self._count))
                self._second, self._count = now, 0
                self._trim(now)
        self._count += n

    def rate(self) -> float:
        now = self.clock()
        with self.lock:
            self._trim(int(now))
            total = sum(c for _, c in self.bins)
            if self._second > int(now) - self.window:  # the bin being filled, kept as _trim does
                total += self._count
        # the kept bins cover whole seconds from the oldest one not trimmed, up to now
        covered = now - (math.floor(int(now) - self.window) + 1)
        span = min(covered, max(now - self.start, 1e-9))
        return total / span

    def _trim(self, now: int) -> None:
        while self.bins and self.bins[0][0] <= now - self.window:
            self.bins.popleft()


class _Histogram:
    """Bucket counts of one histogram (one writer, no lock): `counts[i]` observations in
    (bounds[i-1], bounds[i]], the last one above every bound (+Inf)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs as the exposition format wants them."""
        counts, total, out = list(self.counts), 0, []
        for bound, c in zip((*self.bounds, float("inf")), counts):
            total += c
            out.append((floatToGoString(bound), total))
        return out


class _HotCollector:
    """The per-token metrics of ServerMetrics, turned into metric families at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self):
        m = self.m
        for name, doc, values in (
            (
                "ssmstream_tokens",
                "inputs consumed: Step and Stream inputs, prompts, and each generated token "
                "but the last (fed back to the model)",
                m._tokens,
            ),
            ("ssmstream_requests", "requests handled", m._requests),
        ):
            family = CounterMetricFamily(name, doc, labels=["rpc"])
            for rpc, n in list(values.items()):
                family.add_metric([rpc], n)
            yield family
        if m._batcher_stats is not None:
            yield CounterMetricFamily(
                "ssmstream_tokens_discarded",
                "inputs applied after their call ended (cancelled or past its deadline while "
                "they ran): the session advanced, the outputs were dropped",
                value=m._batcher_stats.discarded_inputs,
            )
        latency = HistogramMetricFamily(
            "ssmstream_request_latency_seconds",
            "wall time of one request (one message for Stream, one token for Generate)",
            labels=["rpc"],
        )
        for rpc, h in list(m._latency.items()):
            latency.add_metric([rpc], h.buckets(), h.sum)
        yield latency
        for name, doc, h in (
            ("ssmstream_batch_size", "sessions per onnxruntime call", m._batch_size),
            ("ssmstream_batch_latency_seconds", "time of one batched onnxruntime call",
             m._batch_latency),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, doc)
            family.add_metric([], h.buckets(), h.sum)
            yield family


def _scrape(stats: Callable[[], dict], what: str) -> dict | None:
    """stats(), or None (logged) when it fails: a scrape must never take the server down."""
    try:
        return stats()
    except Exception:
        log.exception("metrics: %s failed", what)
        return None


class _StoreCollector:
    """Reads SessionStore.stats() at scrape time (active sessions, evictions, capacity)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = _scrape(self.stats, "SessionStore.stats()")
        if s is None:
            return
        active = GaugeMetricFamily("ssmstream_sessions_active", "open sessions")
        active.add_metric([], float(s.get("sessions", 0)))
        yield active
        capacity = GaugeMetricFamily("ssmstream_sessions_capacity", "state slots")
        capacity.add_metric([], float(s.get("capacity", 0)))
        yield capacity
        evicted = CounterMetricFamily(
            "ssmstream_sessions_evicted", "sessions evicted by the idle TTL"
        )
        evicted.add_metric([], float(s.get("evicted", 0)))
        yield evicted
        slab = s.get("slab")
        if slab:
            moved = CounterMetricFamily(
                "ssmstream_state_slab_transfer_bytes",
                "bytes moved into (in) and out of (out) the state slab's device: by the "
                "batched steps (inputs, slots, outputs) and by row copies (create, restore, "
                "fork, snapshot, save, prefill)",
                labels=["path", "direction"],
            )
            for path, prefix in (("step", "step_bytes_"), ("rows", "bytes_")):
                for direction in ("in", "out"):
                    moved.add_metric([path, direction], float(slab[prefix + direction]))
            yield moved
            steps = CounterMetricFamily("ssmstream_state_slab_steps", "batched slot steps run")
            steps.add_metric([], float(slab["steps"]))
            yield steps


class ServerMetrics:
    """The metric objects a server updates; `serve(port)` exposes them over HTTP."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.errors = Counter(
            "ssmstream_errors", "RPCs ended with a non-OK status", ["code"], registry=r
        )
        self.draining = Gauge("ssmstream_draining", "1 while shutting down", registry=r)
        ProcessCollector(registry=r)  # memory and descriptors, as the default registry has
        self._tokens: dict[str, int] = {}  # rpc -> tokens
        self._requests: dict[str, int] = {}  # rpc -> requests
        self._latency: dict[str, _Histogram] = {}  # rpc -> seconds per request
        self._batch_size = _Histogram(BATCH_BUCKETS)
        self._batch_latency = _Histogram(LATENCY_BUCKETS)
        self._rate = _RateWindow()
        self._batcher_stats = None  # BatcherStats, for ssmstream_tokens_discarded_total
        r.register(_HotCollector(self))
        Gauge(
            "ssmstream_tokens_per_second", f"inputs/s over the last {WINDOW:g} s", registry=r
        ).set_function(self._rate.rate)
        self._http = None

    def watch_store(self, stats: Callable[[], dict]) -> None:
        """Export SessionStore.stats() (called at each scrape)."""
        self.registry.register(_StoreCollector(stats))

    def watch_batcher(self, stats) -> None:
        """Export the inputs a Batcher applied for calls that had ended (`stats`: its
        BatcherStats, read at each scrape)."""
        self._batcher_stats = stats

    def count_tokens(self, rpc: str, n: int) -> None:
        """Inputs consumed / tokens generated by `rpc` (event-loop thread)."""
        self._tokens[rpc] = self._tokens.get(rpc, 0) + n
        self._rate.add(n)

    def observe_request(self, rpc: str, seconds: float, count: bool = True) -> None:
        """One request of `rpc` (or one token of a Generate call: count only its first)
        took `seconds` (event-loop thread)."""
        if count:
            self._requests[rpc] = self._requests.get(rpc, 0) + 1
        h = self._latency.get(rpc)
        if h is None:
            h = self._latency[rpc] = _Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """One onnxruntime call for `size` sessions took `seconds` (event-loop thread)."""
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds)

    def count_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter in a thread; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL has it
        log.info("metrics on http://%s:%d/metrics", shown, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class FeaturesCollector:
    """The session features' metrics, from SessionService.feature_stats() at each scrape:

    ssmstream_prefix_cache_{hits,misses,cached_tokens,evictions}_total, _bytes, _entries;
    ssmstream_rewind_checkpoint_bytes (rewind history held by all sessions);
    ssmstream_streams_open (Stream and Generate calls open now).
    """

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = _scrape(self.stats, "SessionService.feature_stats()")
        if s is None:
            return
        c = s["prefix_cache"]
        for key, doc in (
            ("hits", "prompts whose prefix came from the prefix cache"),
            ("misses", "prompts with no cached prefix"),
            ("cached_tokens", "prompt inputs served from the prefix cache"),
            ("evictions", "prefix cache entries evicted (least recently used)"),
        ):
            yield CounterMetricFamily(f"ssmstream_prefix_cache_{key}", doc, value=c[key])
        yield GaugeMetricFamily(
            "ssmstream_prefix_cache_bytes", "bytes held by the prefix cache", value=c["bytes"]
        )
        yield GaugeMetricFamily(
            "ssmstream_prefix_cache_entries", "prefix states cached", value=c["entries"]
        )
        yield GaugeMetricFamily(
            "ssmstream_rewind_checkpoint_bytes",
            "bytes of rewind history (checkpoints and inputs) held by all sessions",
            value=s["checkpoint_bytes"],
        )
        yield GaugeMetricFamily(
            "ssmstream_streams_open", "Stream and Generate calls open now", value=s["streams_open"]
        )
