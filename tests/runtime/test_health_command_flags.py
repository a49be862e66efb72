"""`ssmstream health` at its edges, against a stand-in health stub (no server; nothing listens
on port 1): a --wait it cannot keep is refused (exit 2) before any call; the Client it makes
sends no keepalive pings and reconnects quickly; each Check has --timeout as its deadline;
only SERVING exits 0; and the pauses between Checks never outlast --wait."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2
from ssmstream.runtime import probe
from ssmstream.runtime.probe import main

NOWHERE = ["--server", "127.0.0.1:1"]
Status = health_pb2.HealthCheckResponse


@pytest.mark.parametrize("wait", ["inf", "1e9"])
def test_a_wait_without_end_is_refused(wait, capsys):
    with pytest.raises(SystemExit) as e:
        main([*NOWHERE, "--wait", wait])
    assert e.value.code == 2
    assert (
        f"ssmstream health: error: --wait: must be >= 0 and < 1e9 seconds, got {float(wait)}"
        in (capsys.readouterr().err)
    )


class _Stub:
    """Answers every Check with `status`, keeping each call's request and timeout."""

    def __init__(self, status, seen: list):
        self.status, self.seen = status, seen

    def Check(self, request, timeout=None):
        self.seen.append((request.service, timeout))
        return Status(status=self.status)


@pytest.fixture
def answering(monkeypatch):
    """Makes health answer `status`; returns the Checks seen and the Client's options."""
    seen: list = []
    made: dict = {}
    connect = probe.connect

    def connect_and_keep(*args, **kw):
        client = connect(*args, **kw)
        made["options"] = dict(client.options)
        return client

    def answer(status):
        monkeypatch.setattr(probe, "connect", connect_and_keep)
        monkeypatch.setattr(probe.health_pb2_grpc, "HealthStub", lambda _: _Stub(status, seen))
        return seen, made

    return answer


def test_the_client_sends_no_pings_and_reconnects_quickly(answering, capsys):
    seen, made = answering(Status.SERVING)
    assert main([*NOWHERE, "--timeout", "1.5"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert seen == [("", 1.5)]
    options = made["options"]
    assert options["grpc.keepalive_time_ms"] == 2**31 - 1  # keepalive=0: no pings
    assert "grpc.keepalive_timeout_ms" not in options
    assert options["grpc.initial_reconnect_backoff_ms"] == 100
    assert options["grpc.max_reconnect_backoff_ms"] == 500


@pytest.mark.parametrize("status", [Status.NOT_SERVING, Status.SERVICE_UNKNOWN, Status.UNKNOWN])
def test_only_serving_exits_0(answering, capsys, status):
    answering(status)
    assert main(NOWHERE) == 1
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err == f"ssmstream health: {Status.ServingStatus.Name(status)}\n"


def test_the_pauses_between_checks_never_outlast_the_wait(answering, monkeypatch):
    seen, _ = answering(Status.NOT_SERVING)
    slept: list[float] = []
    monkeypatch.setattr(probe.time, "sleep", slept.append)  # the loop runs on the clock alone
    assert main([*NOWHERE, "--wait", "0.05"]) == 1
    assert slept and max(slept) <= 0.05
    assert len(seen) == len(slept) + 1
