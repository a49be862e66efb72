"""Values the metrics exporter reads from a real SessionStore at scrape time: open
sessions, slots, sessions evicted by the idle TTL."""

from __future__ import annotations

from ssmstream.runtime.metrics import ServerMetrics
from ssmstream.runtime.sessions import SessionStore


def test_store_metrics_count_sessions_evicted_by_the_idle_ttl():
    now = [0.0]
    store = SessionStore(4, capacity=8, ttl=1.0, clock=lambda: now[0])
    m = ServerMetrics()
    m.watch_store(store.stats)
    for _ in range(3):
        store.create()
    now[0] = 2.0  # past their TTL
    assert len(store.evict_idle()) == 3
    store.create()
    value = m.registry.get_sample_value
    assert value("ssmstream_sessions_evicted_total") == 3.0
    assert value("ssmstream_sessions_active") == 1.0
    assert value("ssmstream_sessions_capacity") == 8.0


def test_closing_the_exporter_stops_its_thread_and_frees_its_port():
    """close() ends the HTTP exporter's serving thread (not only its socket) and the port
    can be bound again."""
    import socket
    import threading

    before = set(threading.enumerate())
    m = ServerMetrics()
    port = m.serve(0, "127.0.0.1")
    started = set(threading.enumerate()) - before
    assert started  # the exporter's thread
    m.close()
    for t in started:
        t.join(timeout=2)
    assert not [t for t in started if t.is_alive()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_process_metrics_say_this_processs_memory_and_descriptors():
    """What an operator watches beside the server's own counters: resident memory against
    the container's request, open descriptors against the limit `serve` raises at start
    (each client connection holds one). The server's own registry had none of them."""
    import os
    import resource
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("prometheus-client reads them from /proc")
    m = ServerMetrics()
    value = m.registry.get_sample_value
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(value("process_resident_memory_bytes") - rss) < 64 << 20
    assert value("process_open_fds") == pytest.approx(len(os.listdir("/proc/self/fd")), abs=4)
    assert value("process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert value("process_cpu_seconds_total") > 0
