"""Listeners: turn a ``listeners:`` entry into a running asyncio server.

Owns the choice of protocol stack per listener: every listener ends in a
:class:`broker.relay.ClientConnection`, which only needs a :class:`broker.relay.ClientTransport`:
a plain TCP transport, or an adapter (WebSocket framing, a PROXY protocol header reader) that
looks like one. TLS is terminated by asyncio's ``ssl=`` with the listener's live context from
:mod:`broker.edge.tls`, or, behind a PROXY protocol header, by :mod:`broker.edge.proxy_transport`
once the header is read.

It must not know the front broker: the connections' owner is a :class:`broker.relay.ConnectionHost`,
and the TLS contexts and socket options are handed in.
"""

from __future__ import annotations

import asyncio

from broker.config import ListenerConfig
from broker.edge.proxy_transport import proxy_protocol_factory
from broker.edge.tls import TlsContexts, server_ssl_context
from broker.edge.websocket import websocket_factory
from broker.relay import ClientConnection, ConnectionHost, ProtocolFactory


def connection_factory(host: ConnectionHost, listener: ListenerConfig) -> ProtocolFactory:
    """The protocol factory for one listener (one protocol object per accepted socket).

    The caller hands it to ``create_server`` (:func:`start_listener` does), wrapped in the PROXY
    protocol reader when the listener has ``proxy_protocol: true``.
    """
    name = listener.name
    if listener.type == "ws":
        return websocket_factory(host, listener)

    def mqtt() -> asyncio.BaseProtocol:
        return ClientConnection(host, name)

    return mqtt


async def start_listener(
    host: ConnectionHost, listener: ListenerConfig, tls: TlsContexts, *, reuse_port: bool = False
) -> asyncio.Server:
    """Bind and serve one listener; its connections are owned by ``host``, its TLS context is ``tls``'.

    ``reuse_port``: several worker processes share the listening socket. Raises OSError when the
    address cannot be bound. The caller must keep the returned server and close it on shutdown.
    """
    loop = asyncio.get_running_loop()
    address, port = listener.host_port
    context = server_ssl_context(tls, listener)
    factory = connection_factory(host, listener)
    if listener.proxy_protocol:
        # The PROXY header comes before the TLS handshake: the reader runs TLS itself after it.
        factory = proxy_protocol_factory(factory, listener.name, context, listener.handshake_timeout)
        context = None
    return await loop.create_server(
        factory,
        address,
        port,
        reuse_address=True,
        reuse_port=reuse_port or None,
        backlog=4096,
        ssl=context,
        ssl_handshake_timeout=listener.handshake_timeout if context is not None else None,
    )
