"""Listeners: turn a ``listeners:`` entry into a running asyncio server.

Every listener ends in a :class:`broker.connection.ClientConnection`, which only needs a
:class:`ClientTransport`: a plain TCP transport, or an adapter (WebSocket framing, a PROXY
protocol header reader) that looks like one. TLS is terminated by asyncio's ``ssl=`` with the
listener's live context from :mod:`broker.tls`, or, behind a PROXY protocol header, by
:mod:`broker.proxy_transport` once the header is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from broker.connection import ClientConnection
from broker.proxy_transport import proxy_protocol_factory
from broker.tls import server_ssl_context
from broker.websocket import websocket_factory

if TYPE_CHECKING:
    from broker.config import ListenerConfig
    from broker.server import FrontBroker


class ClientTransport(Protocol):
    """The part of ``asyncio.Transport`` a ClientConnection uses."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def get_write_buffer_size(self) -> int: ...


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def connection_factory(front: FrontBroker, listener: ListenerConfig) -> ProtocolFactory:
    """The protocol factory for one listener (one protocol object per accepted socket)."""
    name = listener.name
    if listener.type == "ws":
        return websocket_factory(front, listener)

    def mqtt() -> asyncio.BaseProtocol:
        return ClientConnection(front, name)

    return mqtt


async def start_listener(front: FrontBroker, listener: ListenerConfig) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    host, port = listener.host_port
    context = server_ssl_context(front, listener)
    factory = connection_factory(front, listener)
    if listener.proxy_protocol:
        # The PROXY header comes before the TLS handshake: the reader runs TLS itself after it.
        factory = proxy_protocol_factory(factory, listener.name, context, listener.handshake_timeout)
        context = None
    return await loop.create_server(
        factory,
        host,
        port,
        reuse_address=True,
        reuse_port=front.reuse_port or None,
        backlog=4096,
        ssl=context,
        ssl_handshake_timeout=listener.handshake_timeout if context is not None else None,
    )
