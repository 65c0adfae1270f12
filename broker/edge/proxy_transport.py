"""asyncio side of the PROXY protocol: read the header, then hand the connection on.

:class:`ProxyHeaderReader` sits in front of any protocol factory (the MQTT
:class:`~broker.relay.ClientConnection`, the WebSocket protocol). It reads exactly
the header's bytes (a ``BufferedProtocol`` asking :class:`ProxyHeaderParser` how many it
may take), so nothing after the header is consumed; then, with TLS, it runs the TLS
handshake on the same socket (``loop.start_tls``: the header comes before the
ClientHello, so ``create_server(ssl=...)`` cannot be used); finally it switches the
transport to a fresh inner protocol, seen through :class:`PeerTransport`, whose
``peername`` is the address the balancer reported.

It owns only the header read and the hand-over: parsing the header is
:mod:`broker.edge.proxy_protocol`'s (pure), deciding what to do with the client is the inner
protocol's. It must not look into the bytes after the header, nor know the front broker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, cast

from broker.edge.proxy_protocol import ProxyHeader, ProxyHeaderParser, ProxyProtocolError
from broker.edge.tls import HandshakeFailures
from broker.logs import format_peer, log_event
from broker.relay import ProtocolFactory

log = logging.getLogger("mqtt_front.proxy")

_handshakes: set[asyncio.Task[None]] = set()  # strong references to running TLS handshakes

# Why a connection was refused before its header was read: the ``reason`` values of
# mqtt_front_handshake_failures_total (a fixed set).
PROXY_REFUSALS = ("proxy_invalid", "proxy_timeout")


class PeerTransport(asyncio.Transport):
    """A view of a transport whose ``peername`` is the balancer-reported client address.

    Extra keys: ``proxy_header`` (the :class:`ProxyHeader`), ``real_peername`` (the balancer).
    """

    def __init__(self, transport: asyncio.Transport, peername: Any, header: ProxyHeader) -> None:
        super().__init__()
        self._transport = transport
        self._peername = peername
        self._header = header

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "proxy_header":
            return self._header
        if name == "real_peername":
            return self._transport.get_extra_info("peername", default)
        return self._transport.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def abort(self) -> None:
        self._transport.abort()

    def close(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _Handshaking(asyncio.Protocol):
    """The TLS transport's protocol between the end of the handshake and the hand-over."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True  # keep the transport open; the inner protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view))).cast("B")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


class ProxyHeaderReader(asyncio.BufferedProtocol):
    """Reads one PROXY protocol header (v1 or v2), then becomes ``inner_factory()``."""

    def __init__(
        self,
        inner_factory: ProtocolFactory,
        listener: str,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        failures: HandshakeFailures | None = None,
    ) -> None:
        self.inner_factory = inner_factory
        self.listener = listener
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.failures = failures  # refused headers are counted here (None: not counted)
        self.parser = ProxyHeaderParser()
        self.transport: asyncio.Transport | None = None
        self.real_peer = "?"
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.real_peer = format_peer(transport.get_extra_info("peername"))
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._on_timeout)

    def get_buffer(self, sizehint: int) -> bytearray:
        # Never more than the header can still need: what follows belongs to TLS or MQTT.
        self._buf = bytearray(max(1, self.parser.wanted()))
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self._done:
            return
        try:
            header = self.parser.feed(bytes(self._buf[:nbytes]))
        except ProxyProtocolError as exc:
            self._refuse(str(exc))
            return
        if header is not None:
            self._header_done(header)

    def eof_received(self) -> bool | None:
        if not self._done:
            self._refuse("connection closed before a complete PROXY protocol header")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._done = True

    def _on_timeout(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse(f"no PROXY protocol header within {self.timeout:g}s", "proxy_timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, reason: str, kind: str = "proxy_invalid") -> None:
        self._done = True
        self._cancel_timer()
        if self.failures is not None:
            self.failures.count(self.listener, kind)
        log_event(log, logging.INFO, "proxy_header_refused", listener=self.listener, peer=self.real_peer, reason=reason)
        if self.transport is not None:
            self.transport.abort()

    def _header_done(self, header: ProxyHeader) -> None:
        self._done = True
        self._cancel_timer()
        transport = self.transport
        assert transport is not None
        peername = header.source if header.source is not None else transport.get_extra_info("peername")
        log_event(
            log,
            logging.DEBUG,
            "proxy_header",
            listener=self.listener,
            balancer=self.real_peer,
            client=format_peer(peername),
            version=header.version,
            command=header.command,
        )
        if self.ssl_context is None:
            _hand_over(transport, self.inner_factory, peername, header, [self.parser.remainder], False)
            return
        if self.parser.remainder:  # cannot happen: reads stop at the header's end
            self._refuse("bytes after the header were read before the TLS handshake")
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in place
        task = asyncio.ensure_future(self._start_tls(transport, self.ssl_context, peername, header))
        _handshakes.add(task)
        task.add_done_callback(_handshakes.discard)

    async def _start_tls(
        self,
        transport: asyncio.Transport,
        context: ssl.SSLContext,
        peername: Any,
        header: ProxyHeader,
    ) -> None:
        loop = asyncio.get_running_loop()
        pending = _Handshaking()
        try:
            tls = await loop.start_tls(
                transport, pending, context, server_side=True, ssl_handshake_timeout=self.timeout
            )
        except Exception as exc:  # the handshake failed; start_tls has closed the socket
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log_event(
                log,
                logging.INFO,
                "tls_handshake_failed",
                listener=self.listener,
                peer=format_peer(peername),
                reason=reason,
            )
            return
        if tls is None or pending.lost:
            if tls is not None:
                tls.close()
            return
        _hand_over(tls, self.inner_factory, peername, header, pending.data, pending.eof)


def _hand_over(
    transport: asyncio.Transport,
    factory: ProtocolFactory,
    peername: Any,
    header: ProxyHeader,
    data: list[bytes],
    eof: bool,
) -> None:
    inner = factory()
    transport.set_protocol(inner)
    inner.connection_made(PeerTransport(transport, peername, header))
    for chunk in data:
        if chunk and not transport.is_closing():
            _deliver(inner, chunk)
    if eof and isinstance(inner, asyncio.Protocol | asyncio.BufferedProtocol) and not inner.eof_received():
        transport.close()


def proxy_protocol_factory(
    inner_factory: ProtocolFactory,
    listener: str,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    failures: HandshakeFailures | None = None,
) -> ProtocolFactory:
    """A protocol factory for a ``proxy_protocol: true`` listener.

    The caller must pass it to ``create_server`` *without* ``ssl=``: with ``ssl_context`` set, the
    reader runs the TLS handshake itself once the header is read. Refused headers are counted in ``failures``.
    """

    def make() -> asyncio.BaseProtocol:
        return ProxyHeaderReader(inner_factory, listener, ssl_context, timeout, failures)

    return make
