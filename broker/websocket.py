"""MQTT over WebSocket (``type: ws`` listeners; wss when the listener has ``tls:``).

The WebSocket wire protocol is the Sans-I/O :class:`websockets.server.ServerProtocol`
(websockets 15.x); this module adds the handshake policy (path, Host, Origin,
subprotocol, ``/healthz``, X-Forwarded-For) as pure functions, and one thin
``asyncio.Protocol`` that is at the same time the :class:`broker.listeners.ClientTransport`
of a :class:`broker.connection.ClientConnection`:

- the HTTP upgrade request goes through ``ServerProtocol``; after it, complete, masked,
  unfragmented binary frames (nearly every frame) are unmasked here (~0.6 us a frame
  instead of ~4 us through the library's generator parser), and every other frame
  (control, text, fragments, oversized, malformed) is handed to ``ServerProtocol`` whole
  and in order, so it decides all protocol errors and closes; the payloads of one read are
  joined into one ``ClientConnection.data_received`` (the MQTT framer handles packets
  spanning frames and frames holding several packets);
- each ``write`` of the ClientConnection (already one per read) is one binary frame,
  serialized here directly when no extension is negotiated (the common case) and by
  ``ServerProtocol.send_binary`` when permessage-deflate is on;
- pings, close handshakes and protocol errors (1002, 1007, 1009) are the library's;
  a text frame is an MQTT protocol error: close 1003, then TCP close.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import NegotiationError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, CloseCode, Frame
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from broker.connection import ClientConnection

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension is part of the wheels
    from websockets.utils import apply_mask

if TYPE_CHECKING:
    from broker.config import ListenerConfig
    from broker.server import FrontBroker

log = logging.getLogger("mqtt_front.websocket")

# The library logs every accepted connection at INFO and, at DEBUG, headers and frame
# payloads: neither belongs in this broker's logs (payloads and credentials are never logged).
_lib_log = logging.getLogger("mqtt_front.websocket.lib")
_lib_log.setLevel(logging.WARNING)
_lib_log.propagate = True

SUBPROTOCOLS: tuple[Subprotocol, ...] = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))
HEALTH_PATH = "/healthz"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_BINARY_FIN = 0x82


# ---------------------------------------------------------------- policy (pure functions)


@dataclass(frozen=True, slots=True)
class WsPolicy:
    """What a ws listener accepts, normalised once per listener."""

    path: str = "/"
    allowed_origins: frozenset[str] | None = None
    allowed_hosts: frozenset[str] | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_frame_size: int = 1_048_576
    require_subprotocol: bool = True
    handshake_timeout: float = 10.0
    compression: bool = False

    @classmethod
    def from_listener(cls, listener: ListenerConfig) -> WsPolicy:
        return cls(
            path=listener.path,
            allowed_origins=None
            if listener.allowed_origins is None
            else frozenset(normalize_origin(o) for o in listener.allowed_origins),
            allowed_hosts=None
            if listener.allowed_hosts is None
            else frozenset(h.strip().lower() for h in listener.allowed_hosts),
            trusted_proxies=tuple(ipaddress.ip_network(n, strict=False) for n in listener.trusted_proxies),
            max_frame_size=listener.max_frame_size,
            require_subprotocol=listener.require_subprotocol,
            handshake_timeout=listener.handshake_timeout,
            compression=listener.compression,
        )


def normalize_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


def request_path(request: Request) -> str:
    """The request target without its query string."""
    return request.path.split("?", 1)[0]


def _single(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once (raises MultipleValuesError otherwise)."""
    return headers.get(name)


def _host_matches(host: str, allowed: frozenset[str]) -> bool:
    host = host.strip().lower()
    if host in allowed:
        return True
    # Compare without the port too: "mqtt.example.com:443" matches "mqtt.example.com".
    if host.startswith("["):  # [v6]:port
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in allowed


def screen_request(request: Request, policy: WsPolicy) -> tuple[int, str] | None:
    """Path, Host and Origin checks before the WebSocket handshake proper.

    Returns ``(status, reason)`` to refuse the request, ``None`` to go on with
    ``ServerProtocol.accept`` (which checks the upgrade headers and the subprotocol).
    """
    if request_path(request) != policy.path:
        return 404, "no WebSocket endpoint at this path"
    headers = request.headers
    try:
        host = _single(headers, "Host")
        origin = _single(headers, "Origin")
    except MultipleValuesError as exc:
        return 400, f"duplicate {exc} header"
    if policy.allowed_hosts is not None:
        if host is None:
            return 400, "missing Host header"
        if not _host_matches(host, policy.allowed_hosts):
            return 403, "host not allowed"
    # No Origin header: not a browser (browsers always send one on WebSocket requests).
    if (
        origin is not None
        and policy.allowed_origins is not None
        and normalize_origin(origin) not in policy.allowed_origins
    ):
        return 403, "origin not allowed"
    return None


def select_subprotocol(offered: Sequence[str], required: bool) -> Subprotocol | None:
    """``mqtt`` (or ``mqttv3.1``); none only when the listener does not require one.

    Raises NegotiationError (HTTP 400) when the client offers only other subprotocols,
    or none while one is required.
    """
    for candidate in SUBPROTOCOLS:
        if candidate in offered:
            return candidate
    if not offered and not required:
        return None
    raise NegotiationError("missing subprotocol" if not offered else "unsupported subprotocol; expected mqtt")


def _parse_ip(text: str) -> IPAddress | None:
    """An address from X-Forwarded-For: ``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:5678``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def forwarded_peer(peer: Any, forwarded_for: Sequence[str], trusted: tuple[IPNetwork, ...]) -> Any:
    """The client address: the TCP peer, or, when the TCP peer is a trusted proxy, the
    right-most address of X-Forwarded-For that is not itself a trusted proxy.

    Only hops appended by trusted proxies are believed; a client can put anything in the
    left part of the header. An unparsable hop stops the walk at the last trusted hop.
    """
    if not trusted or not forwarded_for or not isinstance(peer, tuple) or not peer:
        return peer
    current = _parse_ip(str(peer[0]))
    if current is None or not _trusted(current, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _parse_ip(hop)
        if address is None:
            break
        current = address
        if not _trusted(address, trusted):
            break
    if str(current) == str(peer[0]):
        return peer
    return (str(current), 0)


def health_response() -> Response:
    body = b"ok\n"
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(200, "OK", headers, body)


_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\n\r\nBad Request\n"
)


def binary_frame(data: bytes) -> bytes:
    """One unmasked final binary frame (server to client, no extensions)."""
    n = len(data)
    if n < 126:
        return bytes((_BINARY_FIN, n)) + data
    if n < 65536:
        return _HEAD16.pack(_BINARY_FIN, 126, n) + data
    return _HEAD64.pack(_BINARY_FIN, 127, n) + data


# ---------------------------------------------------------------- asyncio glue


class WebSocketConnection(asyncio.Protocol):
    """One ws/wss client socket: the asyncio protocol of the socket, and the
    ClientTransport of the MQTT ClientConnection created once the handshake succeeds."""

    def __init__(
        self,
        front: FrontBroker,
        listener: str,
        policy: WsPolicy,
        extensions: Sequence[ServerExtensionFactory] | None = None,
    ) -> None:
        self.front = front
        self.listener = listener
        self.policy = policy
        required = policy.require_subprotocol

        def choose(_protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            return select_subprotocol(offered, required)

        self.ws = ServerProtocol(
            subprotocols=list(SUBPROTOCOLS),
            select_subprotocol=choose,
            extensions=extensions,
            max_size=policy.max_frame_size,
            logger=_lib_log,
        )
        self.transport: asyncio.Transport | None = None
        self.conn: ClientConnection | None = None
        self.peer: Any = None
        self._open = False  # handshake done and no close frame seen: binary frames flow
        self._closing = False
        self._fast = True  # serialize binary frames here (no extension negotiated)
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending = b""  # handshake: the last bytes fed; then: an incomplete frame header
        # An incomplete frame whose size is known: reads collected until it is whole, joined once
        # (a large frame trickled in small reads is not re-copied on every read).
        self._frame_parts: list[bytes] = []
        self._frame_have = 0
        self._frame_need = 0

    # ------------------------------------------------------------ socket events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.policy.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._open and self._fast:
            self._receive_frames(data)
        elif self.conn is None and not self._open:
            self._receive_handshake(data)
        else:  # permessage-deflate: every frame through the library
            chunks: list[bytes] = []
            self._receive_library(data, chunks)
            self._deliver(chunks)
        if self.ws.writes:
            self._flush()

    def _receive_handshake(self, data: bytes) -> None:
        """Give the library the HTTP request and nothing after it: the frames that follow go
        through :meth:`_receive_frames`, so the library is left at a frame boundary."""
        probe = self._pending + data
        end = probe.find(b"\r\n\r\n")
        if end < 0:
            self._pending = probe[-3:]  # the terminator may straddle two reads
            self._receive_library(data, [])  # the library enforces the request's size limits
            return
        cut = end + 4 - len(self._pending)  # >= 1: the terminator ends inside `data`
        self._pending = b""
        self._receive_library(data[:cut], [])
        rest = data[cut:]
        if rest and self._open:
            self.data_received(rest)

    def _receive_frames(self, data: bytes) -> None:
        """The hot path: complete, masked, unfragmented binary frames are unmasked here; any
        other complete frame (control, text, fragments, reserved bits) goes to the library,
        frame by frame and in order, so its state stays exact. A header announcing more than
        max_frame_size, or an unmasked frame, is handed to the library, which fails the
        connection (1009, 1002). A partial frame waits here, at most max_frame_size + 14 bytes."""
        if self._frame_parts:
            self._frame_parts.append(data)
            self._frame_have += len(data)
            if self._frame_have < self._frame_need:
                return
            data = b"".join(self._frame_parts)
            self._frame_parts, self._frame_have, self._frame_need = [], 0, 0
        buf = self._pending + data if self._pending else data
        self._pending = b""
        need = 0
        ws = self.ws
        limit = self.policy.max_frame_size
        chunks: list[bytes] = []
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            head2 = buf[pos + 1]
            length = head2 & 0x7F
            start = pos + 2
            if length == 126:
                if n - start < 2:
                    break
                (length,) = _LEN16.unpack_from(buf, start)
                start += 2
            elif length == 127:
                if n - start < 8:
                    break
                (length,) = _LEN64.unpack_from(buf, start)
                start += 8
            if length > limit or not head2 & 0x80:
                self._receive_library(buf[pos:], chunks)  # fails the connection
                pos = n
                break
            end = start + 4 + length
            if end > n:
                need = end - pos
                break
            if buf[pos] == _BINARY_FIN and ws.cur_size is None:
                chunks.append(apply_mask(buf[start + 4 : end], buf[start : start + 4]))
            elif not self._receive_library(buf[pos:end], chunks):
                pos = n
                break
            pos = end
        if pos < n:
            if need:
                self._frame_parts = [buf[pos:]]
                self._frame_have = n - pos
                self._frame_need = need
            else:
                self._pending = buf[pos:]
        self._deliver(chunks)

    def _receive_library(self, data: bytes, chunks: list[bytes]) -> bool:
        """Feed the library; binary payloads are appended to ``chunks`` for the caller to
        deliver. False once the connection is closing (text frame, close frame, protocol
        error); what came before is delivered first."""
        ws = self.ws
        try:
            ws.receive_data(data)
        except EOFError:  # data after the end of the stream: nothing more to read
            return False
        events = ws.events_received()
        if events and not self._handle(events, chunks):
            return False
        if ws.state is not OPEN or not self._open:
            self._deliver(chunks)
            chunks.clear()
            return False
        return True

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        if self.conn is not None:
            self.conn.eof_received()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._open = False
        self._cancel_timer()
        if self.conn is not None:
            self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.conn is not None:
            self.conn.resume_writing()

    # ------------------------------------------------------------ WebSocket events

    def _handle(self, events: list[Request | Response | Frame], chunks: list[bytes]) -> bool:
        """Act on the library's events; False once the connection is closing."""
        for event in events:
            if isinstance(event, Frame):
                opcode = event.opcode
                if opcode is OP_BINARY or opcode is OP_CONT:
                    # OP_CONT only ever continues a binary message: a text frame fails first.
                    data = event.data
                    chunks.append(data if isinstance(data, bytes) else bytes(data))
                elif opcode is OP_TEXT:
                    self._deliver(chunks)
                    chunks.clear()
                    self._fail(CloseCode.UNSUPPORTED_DATA, "text frames are not MQTT")
                    return False
                elif opcode is OP_CLOSE:
                    self._deliver(chunks)
                    chunks.clear()
                    self._peer_closed()
                    return False
                # ping and pong: answered by the library
            elif isinstance(event, Request):
                self._handshake(event)
                if not self._open:
                    return False
        return True

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.conn is not None and self._open:
            self.conn.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _handshake(self, request: Request) -> None:
        ws = self.ws
        policy = self.policy
        if request_path(request) == HEALTH_PATH:
            ws.send_response(health_response())
            return
        refusal = screen_request(request, policy)
        if refusal is not None:
            response = ws.reject(refusal[0], f"Failed to open a WebSocket connection: {refusal[1]}.\n")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            reason = refusal[1] if refusal is not None else str(ws.handshake_exc or response.reason_phrase)
            log.info(
                "websocket_refused peer=%s listener=%s status=%d reason=%s",
                _fmt_peer(self.peer),
                self.listener,
                response.status_code,
                reason,
            )
            return
        self._cancel_timer()
        self._fast = not ws.extensions
        self.peer = forwarded_peer(self.peer, request.headers.get_all("X-Forwarded-For"), policy.trusted_proxies)
        self._open = True
        conn = ClientConnection(self.front, self.listener)
        self.conn = conn
        conn.connection_made(self)  # type: ignore[arg-type]  # a ClientTransport, not a socket transport
        if self._write_paused:
            conn.pause_writing()

    def _peer_closed(self) -> None:
        """The client sent a close frame (the library has queued the echo and the EOF)."""
        self._open = False
        if self.conn is not None:
            self.conn.eof_received()

    def _fail(self, code: int, reason: str) -> None:
        peer = _fmt_peer(self.peer)
        log.info("websocket_error peer=%s listener=%s code=%d reason=%s", peer, self.listener, code, reason)
        self._open = False
        if self.ws.state is OPEN:
            self.ws.fail(code, reason)
        self._flush()
        if self.conn is not None:
            self.conn.connection_lost(None)

    def _flush(self) -> None:
        """Send what the library queued (handshake response, pongs, close frames, EOF)."""
        transport = self.transport
        writes = self.ws.data_to_send()
        if transport is None or not writes:
            return
        eof = False
        out: list[bytes] = []
        for chunk in writes:
            if chunk:
                out.append(chunk)
            else:
                eof = True
        if out and not transport.is_closing():
            transport.write(b"".join(out))
        if not eof:
            return
        exc = self.ws.parser_exc
        if self._open and exc is not None and not isinstance(exc, EOFError) and self.ws.close_sent is not None:
            # a WebSocket protocol error (1002), an oversized frame (1009), invalid UTF-8 (1007)
            close = self.ws.close_sent
            peer = _fmt_peer(self.peer)
            log.info("websocket_error peer=%s listener=%s code=%d reason=%s", peer, self.listener, close.code, exc)
        if self.ws.handshake_exc is not None and self.ws.state is not OPEN and not out:
            # An unparsable HTTP request: the library closes without a word; say why.
            transport.write(_BAD_REQUEST)
            log.info(
                "websocket_refused peer=%s listener=%s status=400 reason=%s",
                _fmt_peer(self.peer),
                self.listener,
                self.ws.handshake_exc,
            )
        self._open = False
        self._closing = True
        self._cancel_timer()
        transport.close()  # flushes what is buffered, then closes

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.conn is None and not self._closing and self.transport is not None:
            log.info(
                "websocket_timeout peer=%s listener=%s reason=no handshake within %gs",
                _fmt_peer(self.peer),
                self.listener,
                self.policy.handshake_timeout,
            )
            self._closing = True
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------ ClientTransport

    def write(self, data: bytes) -> None:
        if not self._open or self._closing:
            return
        transport = self.transport
        assert transport is not None
        if self._fast:
            transport.write(binary_frame(data))
        else:
            self.ws.send_binary(data)
            self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._open = False
        self._cancel_timer()
        ws = self.ws
        transport = self.transport
        if transport is None:
            return
        if ws.state is OPEN:
            ws.send_close(CloseCode.NORMAL_CLOSURE)
        out = [chunk for chunk in ws.data_to_send() if chunk]
        if out and not transport.is_closing():
            transport.write(b"".join(out))
        transport.close()

    def is_closing(self) -> bool:
        return self._closing or self.transport is None or self.transport.is_closing()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()


def _fmt_peer(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def websocket_factory(front: FrontBroker, listener: ListenerConfig) -> Callable[[], WebSocketConnection]:
    """The protocol factory of a ws listener (the policy is computed once)."""
    policy = WsPolicy.from_listener(listener)
    extensions = enable_server_permessage_deflate(None) if policy.compression else None
    name = listener.name

    def factory() -> WebSocketConnection:
        return WebSocketConnection(front, name, policy, extensions)

    return factory
