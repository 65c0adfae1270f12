"""The front broker's connection to the internal broker on behalf of one client.

It only moves bytes and flow-control events to the client connection (an :class:`UpstreamSink`)
and counts itself open and closed on its :class:`OpenCounter` (the connector).
"""

from __future__ import annotations

import asyncio
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
    def closed(self, target: UpstreamTarget) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """The front broker's connection to the internal broker on behalf of one client."""

    __slots__ = ("_counted", "client", "connector", "target")

    def __init__(self, client: UpstreamSink, connector: OpenCounter, target: UpstreamTarget) -> None:
        self.client = client
        self.connector = connector
        self.target = target
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counted = True
        self.connector.opened(self.target)

    def data_received(self, data: bytes) -> None:
        self.client.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.connector.closed(self.target)
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.client.upstream_resume_writing()
