"""Prometheus metrics of one server (prometheus-client), served over HTTP on --metrics-port.

    ssmstream_tokens_total{rpc}            inputs consumed + tokens generated (counter)
    ssmstream_tokens_per_second            inputs/s over the last WINDOW seconds (gauge)
    ssmstream_requests_total{rpc}          Step requests / Stream messages / Generate calls …
    ssmstream_errors_total{code}           RPCs that ended with a non-OK status, by code
    ssmstream_request_latency_seconds{rpc} wall time of one request, per-token for streams
    ssmstream_batch_size                   sessions per onnxruntime call (histogram)
    ssmstream_batch_latency_seconds        time of one batched onnxruntime call (histogram)
    ssmstream_sessions_active              open sessions (from SessionStore.stats())
    ssmstream_sessions_evicted_total       sessions evicted by the idle TTL
    ssmstream_draining                     1 while shutting down

Each server owns its CollectorRegistry, so several servers in one process (tests) do
not collide.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

WINDOW = 10.0  # seconds over which tokens_per_second is averaged
LATENCY_BUCKETS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _RateWindow:
    """Events per second over the last `window` seconds, in 1 s bins (thread-safe)."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self.bins: collections.deque[list[float]] = collections.deque()  # [second, count]
        self.lock = threading.Lock()
        self.start = clock()

    def add(self, n: int) -> None:
        now = int(self.clock())
        with self.lock:
            if self.bins and self.bins[-1][0] == now:
                self.bins[-1][1] += n
            else:
                self.bins.append([now, n])
            self._trim(now)

    def rate(self) -> float:
        now = self.clock()
        with self.lock:
            self._trim(int(now))
            total = sum(c for _, c in self.bins)
        span = min(self.window, max(now - self.start, 1e-9))
        return total / span

    def _trim(self, now: int) -> None:
        while self.bins and self.bins[0][0] <= now - self.window:
            self.bins.popleft()


class _StoreCollector:
    """Reads SessionStore.stats() at scrape time (active sessions, evictions, capacity)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        try:
            s = self.stats()
        except Exception:  # a scrape must never take the server down
            log.exception("metrics: SessionStore.stats() failed")
            return
        active = GaugeMetricFamily("ssmstream_sessions_active", "open sessions")
        active.add_metric([], float(s.get("active", s.get("sessions", 0))))
        yield active
        capacity = GaugeMetricFamily("ssmstream_sessions_capacity", "state slots")
        capacity.add_metric([], float(s.get("capacity", 0)))
        yield capacity
        evicted = CounterMetricFamily(
            "ssmstream_sessions_evicted", "sessions evicted by the idle TTL"
        )
        evicted.add_metric([], float(s.get("evicted", s.get("evictions", 0))))
        yield evicted


class ServerMetrics:
    """The metric objects a server updates; `serve(port)` exposes them over HTTP."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter(
            "ssmstream_tokens", "inputs consumed + tokens generated", ["rpc"], registry=r
        )
        self.requests = Counter("ssmstream_requests", "requests handled", ["rpc"], registry=r)
        self.errors = Counter(
            "ssmstream_errors", "RPCs ended with a non-OK status", ["code"], registry=r
        )
        self.latency = Histogram(
            "ssmstream_request_latency_seconds",
            "wall time of one request (one message for Stream, one token for Generate)",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ssmstream_batch_size",
            "sessions per onnxruntime call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "ssmstream_batch_latency_seconds",
            "time of one batched onnxruntime call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.draining = Gauge("ssmstream_draining", "1 while shutting down", registry=r)
        self._rate = _RateWindow()
        self._children: dict[tuple[int, str], object] = {}
        Gauge(
            "ssmstream_tokens_per_second", f"inputs/s over the last {WINDOW:g} s", registry=r
        ).set_function(self._rate.rate)
        self._http = None

    def watch_store(self, stats: Callable[[], dict]) -> None:
        """Export SessionStore.stats() (called at each scrape)."""
        self.registry.register(_StoreCollector(stats))

    def count_tokens(self, rpc: str, n: int) -> None:
        self._child(self.tokens, rpc).inc(n)
        self._rate.add(n)

    def observe_request(self, rpc: str, seconds: float) -> None:
        self._child(self.requests, rpc).inc()
        self._child(self.latency, rpc).observe(seconds)

    def _child(self, metric, label: str):
        """metric.labels(label), cached (the hot path runs this per message)."""
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds)

    def count_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter in a thread; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
