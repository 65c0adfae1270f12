"""The front broker's connection to the internal broker on behalf of one client.

It only moves bytes and flow-control events to the client connection (an :class:`UpstreamSink`)
and counts itself open and closed on its :class:`OpenCounter` (the connector).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from broker.upstream.targets import UpstreamTarget


class UpstreamSink(Protocol):
    """What the upstream connection feeds: the client connection it serves."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class OpenCounter(Protocol):
    """Counts open upstream connections per target (for metrics and readiness)."""

    def opened(self, target: UpstreamTarget) -> None: ...
    def answered(self, target: UpstreamTarget) -> None:
        """The upstream's first byte on a connection."""

    def closed(self, target: UpstreamTarget, silent_for: float | None) -> None:
        """``silent_for``: seconds the connection lasted without one byte from the upstream (None: it spoke)."""


class UpstreamConnection(asyncio.Protocol):
    """The front broker's connection to the internal broker on behalf of one client."""

    __slots__ = ("_counted", "_opened_at", "client", "connector", "target")

    def __init__(self, client: UpstreamSink, connector: OpenCounter, target: UpstreamTarget) -> None:
        self.client = client
        self.connector = connector
        self.target = target
        self._counted = False
        self._opened_at: float | None = None  # until the upstream's first byte (a hung broker sends none)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counted = True
        self._opened_at = time.monotonic()
        self.connector.opened(self.target)

    def data_received(self, data: bytes) -> None:
        if self._opened_at is not None:  # the first read only
            self._opened_at = None
            self.connector.answered(self.target)
        self.client.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            opened = self._opened_at
            self.connector.closed(self.target, None if opened is None else time.monotonic() - opened)
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.client.upstream_resume_writing()
