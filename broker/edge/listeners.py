"""Listeners: turn a ``listeners:`` entry into a running asyncio server.

Owns the choice of protocol stack per listener: every listener ends in a
:class:`broker.relay.ClientConnection`, which only needs a :class:`broker.relay.ClientTransport`:
a plain TCP transport, or an adapter (WebSocket framing, a PROXY protocol header reader) that
looks like one. TLS is terminated by asyncio's ``ssl=`` with the listener's live context from
:mod:`broker.edge.tls`, or, behind a PROXY protocol header, by :mod:`broker.edge.proxy_transport`
once the header is read. :func:`bind_failure` words a listener that cannot bind, naming its key.

It must not know the front broker: the connections' owner is a :class:`broker.relay.ConnectionHost`,
and the TLS contexts and socket options are handed in.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence

from broker.config import ListenerConfig
from broker.edge.proxy_transport import proxy_protocol_factory
from broker.edge.tls import HandshakeFailures, TlsContexts, server_ssl_context
from broker.edge.websocket import websocket_factory
from broker.relay import ClientConnection, ConnectionHost, ProtocolFactory


def connection_factory(
    host: ConnectionHost, listener: ListenerConfig, failures: HandshakeFailures | None = None
) -> ProtocolFactory:
    """The protocol factory for one listener (one protocol object per accepted socket); refused
    WebSocket upgrades are counted in ``failures``.

    The caller hands it to ``create_server`` (:func:`start_listener` does), wrapped in the PROXY
    protocol reader when the listener has ``proxy_protocol: true``.
    """
    name = listener.name
    if listener.type == "ws":
        return websocket_factory(host, listener, failures)

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
    factory = connection_factory(host, listener, tls.failures)
    if listener.proxy_protocol:
        # The PROXY header comes before the TLS handshake: the reader runs TLS itself after it.
        factory = proxy_protocol_factory(factory, listener.name, context, listener.handshake_timeout, tls.failures)
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


# What the operator can do about the usual bind errors.
_BIND_HINTS = {
    errno.EADDRINUSE: "another process, or another bind of this configuration, has this port",
    errno.EADDRNOTAVAIL: "not an address of this host",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
}


def bind_reason(exc: OSError) -> str:
    """Why a bind failed, in a few words (``address already in use (...)``), the same from asyncio and uvloop:
    their own texts repeat the address, or are only the name service's."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {(exc.strerror or str(exc)).lower()}"
    if not exc.errno:
        return str(exc)
    reason = os.strerror(exc.errno)
    reason = reason[:1].lower() + reason[1:]
    hint = _BIND_HINTS.get(exc.errno)
    return f"{reason} ({hint})" if hint else reason


def bind_failure(listeners: Sequence[ListenerConfig], listener: ListenerConfig, exc: OSError) -> str:
    """The error of ``listener`` (one of ``listeners``, the configured list) failing to bind, naming its key:
    ``cannot listen on listeners.1.bind 127.0.0.1:8080 (listener ws, type ws): address already in use``."""
    index = next((i for i, item in enumerate(listeners) if item is listener), listeners.index(listener))
    return (
        f"cannot listen on listeners.{index}.bind {listener.bind} (listener {listener.name}, type {listener.type}): "
        f"{bind_reason(exc)}"
    )
