"""MQTT over WebSocket (``type: ws`` listeners; wss when the listener has ``tls:``): the asyncio protocol.

Owns one socket's WebSocket life. The wire protocol is the Sans-I/O
:class:`websockets.server.ServerProtocol` (websockets 15.x); the handshake policy (path, Host,
Origin, subprotocol, ``/healthz``, X-Forwarded-For) is :mod:`broker.edge.ws_policy`'s and the
frame fast path :mod:`broker.edge.ws_frames`'. :class:`WebSocketConnection` drives both and is at
the same time the :class:`broker.relay.ClientTransport` of a :class:`broker.relay.ClientConnection`:

- the HTTP upgrade request goes through ``ServerProtocol``; after it, a
  :class:`~broker.edge.ws_frames.FrameSplitter` unmasks the complete, masked, unfragmented binary
  frames (nearly every frame) and hands every other frame to ``ServerProtocol`` whole and in
  order, so the library decides all protocol errors and closes; the payloads of one read are
  joined into one ``ClientConnection.data_received`` (the MQTT framer handles packets spanning
  frames and frames holding several packets);
- each ``write`` of the ClientConnection (already one per read) is one binary frame, serialized
  by :func:`~broker.edge.ws_frames.binary_frame` when no extension is negotiated (the common case)
  and by ``ServerProtocol.send_binary`` when permessage-deflate is on;
- pings, close handshakes and protocol errors (1002, 1007, 1009) are the library's;
  a text frame is an MQTT protocol error: close 1003, then TCP close.

It must not make MQTT decisions (the ClientConnection and its session do) nor know the front
broker: the connection's owner is a :class:`broker.relay.ConnectionHost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from websockets.exceptions import NegotiationError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, CloseCode, Frame
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from broker.config import ListenerConfig
from broker.edge.tls import HandshakeFailures
from broker.edge.ws_frames import FrameSplitter, Handover, binary_frame
from broker.edge.ws_policy import (
    BAD_REQUEST,
    HEALTH_PATH,
    SUBPROTOCOLS,
    WsPolicy,
    forwarded_peer,
    health_response,
    request_path,
    screen_request,
    select_subprotocol,
)
from broker.logs import format_peer, log_event
from broker.relay import ClientConnection, ConnectionHost

log = logging.getLogger("mqtt_front.websocket")

# The library logs every accepted connection at INFO and, at DEBUG, headers and frame
# payloads: neither belongs in this broker's logs (payloads and credentials are never logged).
_lib_log = logging.getLogger("mqtt_front.websocket.lib")
_lib_log.setLevel(logging.WARNING)
_lib_log.propagate = True

# Why an upgrade was refused: the ``reason`` values of mqtt_front_handshake_failures_total (a fixed set).
WS_REFUSALS = ("ws_path", "ws_host", "ws_origin", "ws_subprotocol", "ws_bad_request", "ws_timeout")


def refusal_reason(refusal: tuple[int, str] | None, exc: BaseException | None) -> str:
    """The WS_REFUSALS value of a refused upgrade: ``refusal`` is screen_request's answer, ``exc`` the
    library's reason when it refused (the upgrade headers, the subprotocol)."""
    if refusal is not None:
        status, text = refusal
        if status == 404:
            return "ws_path"
        if text == "origin not allowed":
            return "ws_origin"
        if text in ("host not allowed", "missing Host header"):
            return "ws_host"
        return "ws_bad_request"  # a duplicate Host or Origin header
    if isinstance(exc, NegotiationError) and "subprotocol" in str(exc):
        return "ws_subprotocol"
    return "ws_bad_request"


class WebSocketConnection(asyncio.Protocol):
    """One ws/wss client socket: the asyncio protocol of the socket, and the
    ClientTransport of the MQTT ClientConnection created once the handshake succeeds."""

    def __init__(
        self,
        host: ConnectionHost,
        listener: str,
        policy: WsPolicy,
        extensions: Sequence[ServerExtensionFactory] | None = None,
        failures: HandshakeFailures | None = None,
    ) -> None:
        self.host = host
        self.listener = listener
        self.policy = policy
        self.failures = failures  # refused upgrades are counted here (None: not counted)
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
        self._tail = b""  # handshake: the last bytes fed (the request's end may straddle two reads)
        self._frames = FrameSplitter(policy.max_frame_size)  # used once the handshake is done

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
            # The hot path, inlined: the splitter's payloads of one read go to the ClientConnection in one call.
            frames = self._frames
            payloads = frames.feed(data)
            if frames.handovers:
                self._receive_mixed(payloads, frames.take_handovers())
            elif payloads and self.conn is not None:
                self.conn.data_received(payloads[0] if len(payloads) == 1 else b"".join(payloads))
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
        through the frame splitter, so the library is left at a frame boundary."""
        probe = self._tail + data
        end = probe.find(b"\r\n\r\n")
        if end < 0:
            self._tail = probe[-3:]  # the terminator may straddle two reads
            self._receive_library(data, [])  # the library enforces the request's size limits
            return
        cut = end + 4 - len(self._tail)  # >= 1: the terminator ends inside `data`
        self._tail = b""
        self._receive_library(data[:cut], [])
        rest = data[cut:]
        if rest and self._open:
            self.data_received(rest)

    def _receive_mixed(self, payloads: Sequence[bytes], handovers: Sequence[Handover]) -> None:
        """A read with frames for the library (control, text, fragments, a failing header): each
        goes to the library in its place, so its state stays exact; its binary payloads join the
        splitter's in order. The first refused frame ends the read (what came before is delivered)."""
        chunks: list[bytes] = []
        done = 0
        for position, raw in handovers:
            if position > done:
                chunks.extend(payloads[done:position])
                done = position
            if not self._receive_library(raw, chunks):
                break
        else:
            chunks.extend(payloads[done:])
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
            self._count(refusal_reason(refusal, ws.handshake_exc))
            log_event(
                log,
                logging.INFO,
                "websocket_refused",
                peer=format_peer(self.peer),
                listener=self.listener,
                status=response.status_code,
                reason=reason,
            )
            return
        self._cancel_timer()
        self._fast = not ws.extensions
        self.peer = forwarded_peer(self.peer, request.headers.get_all("X-Forwarded-For"), policy.trusted_proxies)
        self._open = True
        conn = ClientConnection(self.host, self.listener)
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
        peer = format_peer(self.peer)
        log_event(log, logging.INFO, "websocket_error", peer=peer, listener=self.listener, code=code, reason=reason)
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
            code = self.ws.close_sent.code
            peer = format_peer(self.peer)
            log_event(
                log, logging.INFO, "websocket_error", peer=peer, listener=self.listener, code=code, reason=str(exc)
            )
        if self.ws.handshake_exc is not None and self.ws.state is not OPEN and not out:
            # An unparsable HTTP request: the library closes without a word; say why.
            transport.write(BAD_REQUEST)
            self._count("ws_bad_request")
            log_event(
                log,
                logging.INFO,
                "websocket_refused",
                peer=format_peer(self.peer),
                listener=self.listener,
                status=400,
                reason=str(self.ws.handshake_exc),
            )
        self._open = False
        self._closing = True
        self._cancel_timer()
        transport.close()  # flushes what is buffered, then closes

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.conn is None and not self._closing and self.transport is not None:
            self._count("ws_timeout")
            log_event(
                log,
                logging.INFO,
                "websocket_timeout",
                peer=format_peer(self.peer),
                listener=self.listener,
                reason=f"no handshake within {self.policy.handshake_timeout:g}s",
            )
            self._closing = True
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _count(self, reason: str) -> None:
        if self.failures is not None:
            self.failures.count(self.listener, reason)

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


def websocket_factory(
    host: ConnectionHost, listener: ListenerConfig, failures: HandshakeFailures | None = None
) -> Callable[[], WebSocketConnection]:
    """The protocol factory of a ws listener (the policy is computed once); pass it to ``create_server``.
    Refused upgrades are counted in ``failures``."""
    policy = WsPolicy.from_listener(listener)
    extensions = enable_server_permessage_deflate(None) if policy.compression else None
    name = listener.name

    def factory() -> WebSocketConnection:
        return WebSocketConnection(host, name, policy, extensions, failures)

    return factory
