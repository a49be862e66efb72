"""grpc.health.v1 for the server: Check and Watch of the serving status of "" (the server),
the inference service and "ssmstream.StateStore".

grpc's reference servicer keeps a Watch open until the client leaves, so one load balancer
watching the server held every shutdown for the whole --grace. Here a Watch ends once it has
sent the status the shutdown set (NOT_SERVING); statuses set after the shutdown began are
ignored, as in the reference servicer.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self):
        self._status = {"": SERVING}
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._closing = False

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:  # the name cut: anyone may ask, and it came back whole (up to 4 MiB)
            name = request.service[:64] + ("…" if len(request.service) > 64 else "")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {name!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        """The status now, then every change (SERVICE_UNKNOWN for a name not set); ends
        after the shutdown's."""
        sent = None
        while True:
            changed = self._changed  # taken before the read: a change meanwhile sets it
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
                continue  # read again: it may have changed during the write
            if self._closing:
                return
            await changed.wait()

    async def set(self, service: str, status) -> None:
        if not self._closing:
            self._update({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; open Watches send it and end."""
        if not self._closing:
            self._closing = True
            self._update(dict.fromkeys(self._status, NOT_SERVING))

    def _update(self, statuses: dict) -> None:
        self._status.update(statuses)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
