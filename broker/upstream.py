"""Connections to the internal broker, one per accepted client."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from broker.connection import UpstreamConnection

if TYPE_CHECKING:
    from broker.connection import ClientConnection

log = logging.getLogger("mqtt_front.upstream")


class UpstreamConnector:
    def __init__(self, host: str, port: int, connect_timeout: float, label: str) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.label = label
        self.open = 0
        self.last_ok: float | None = None
        self.failures = 0
        self._last_failure_log = 0.0

    async def connect(self, client: ClientConnection) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(client), self.host, self.port),
            self.connect_timeout,
        )
        self.last_ok = time.monotonic()
        return transport

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        # One line per second at most: a down upstream must not flood the log.
        if now - self._last_failure_log >= 1.0:
            self._last_failure_log = now
            reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            log.error(
                "upstream_error %s (%s:%d): %s (%d failures so far)",
                self.label,
                self.host,
                self.port,
                reason,
                self.failures,
            )
