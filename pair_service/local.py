"""LocalReceiver: the sender's way to a receiver in the same process — the ReceiverPool contract, no gRPC."""

from __future__ import annotations

import time

from telepathy.protos.v1 import common_pb2, receiver_pb2
from telepathy.receiver_service.servicer import ReceiverServicer
from telepathy.serving.errors import ServiceError, status_of
from telepathy.serving.metrics import ServiceMetrics


class LocalReceiver:
    address = "in-process"
    connected = True

    def __init__(self, receiver: ReceiverServicer, metrics: ServiceMetrics):
        self.receiver, self._metrics = receiver, metrics

    async def start(self) -> None:
        """Nothing to connect: the receiver is up whenever this process is."""
        self._metrics.receiver_connected.set(1)

    async def close(self) -> None:
        """Nothing to close: the receiver part drains with its host."""

    async def call(self, request: receiver_pb2.ClassifyStreamRequest, deadline: float | None) -> common_pb2.ClassifyResult:
        """The stream item's answer from the receiver's own checks and batchers; errors read as over the stream."""
        try:
            return await self.receiver.classify_item(request, deadline, time.monotonic())
        except Exception as exc:  # noqa: BLE001 - mapped to the status the stream would have carried
            err = status_of(exc)
            raise ServiceError(err.code, f"receiver: {err.message}", err.field) from None
