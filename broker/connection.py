"""asyncio glue around :class:`broker.session.Session`: one client socket, one upstream socket.

Thin on purpose: bytes in, ``Session`` decides, bytes out. Writes are batched per read,
there is no await per packet, and back-pressure is transport flow control: when one
side's write buffer is full, the other side stops being read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from broker.codec import encode_disconnect
from broker.session import Authenticate, AuthResult, Close, OpenUpstream, Session, State
from broker.tls import peer_identity

if TYPE_CHECKING:
    from broker.listeners import ClientTransport
    from broker.server import FrontBroker

log = logging.getLogger("mqtt_front.connection")


def _join(parts: list[bytes]) -> bytes:
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ClientConnection(asyncio.Protocol):
    def __init__(self, front: FrontBroker, listener: str) -> None:
        self.front = front
        self.listener = listener
        self.transport: ClientTransport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._upstream_full = False  # upstream write buffer above its high-water mark
        self._client_full = False  # client write buffer above its high-water mark
        self._started = time.monotonic()
        self._closed = False
        self._team_slot: str | None = None  # counted against limits.max_connections_per_team

    # ------------------------------------------------------------ client transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A real TCP/TLS transport, or an adapter (WebSocket, PROXY protocol) shaped like one.
        self.transport = cast("ClientTransport", transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session = Session(self.front.session_settings, self.peer)
        self.front.connection_opened(self)
        limit = self.front.config.limits.max_connections
        if limit is not None and len(self.front.connections) > limit:
            # Refused before any CONNECT is read: the cheapest answer to a connection flood.
            self.session.stats.connect_result = "limit"
            self._shutdown(f"max_connections ({limit}) reached")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.front.config.limits.connect_timeout, self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        session.receive_client(data)
        self._pump()

    def eof_received(self) -> bool | None:
        self._shutdown("client closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown("client connection lost" if exc is None else f"client connection lost: {exc}")

    def pause_writing(self) -> None:
        # The client reads slower than we write to it: stop reading the upstream, and the client
        # too (the front broker answers some packets itself: acks of refused publishes, SUBACKs,
        # WebSocket pongs), so a client that never reads cannot grow its write buffer without bound.
        self._client_full = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        self._sync_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if self.upstream is not None and not self._closed:
            self.upstream.resume_reading()
        self._sync_reading()

    # ------------------------------------------------------------ upstream transport events

    def upstream_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        session.receive_upstream(data)
        self._pump()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._closed or self.session is None:
            return
        self.upstream = None
        self.session.upstream_failed("connection lost" if exc is None else str(exc))
        self._pump()

    def upstream_pause_writing(self) -> None:
        self._upstream_full = True
        self._sync_reading()

    def upstream_resume_writing(self) -> None:
        self._upstream_full = False
        self._sync_reading()

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        session = self.session
        if session is None or self._closed:
            return
        if session.out_upstream:
            if self.upstream is not None:
                self.upstream.write(_join(session.out_upstream))
            session.out_upstream.clear()
        if session.out_client:
            assert self.transport is not None
            self.transport.write(_join(session.out_client))
            session.out_client.clear()
        if session.actions:
            actions = session.actions[:]
            session.actions.clear()
            for action in actions:
                if isinstance(action, Close):
                    self._shutdown(action.reason)
                    return
                if isinstance(action, Authenticate):
                    self._cancel_timer()
                    self._spawn(self._authenticate(action))
                elif isinstance(action, OpenUpstream):
                    self._spawn(self._open_upstream())
        self._sync_reading()

    def _sync_reading(self) -> None:
        session = self.session
        if self.transport is None or session is None or self._closed:
            return
        pause = self._upstream_full or self._client_full or not session.reading_client
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _authenticate(self, action: Authenticate) -> None:
        if self.front.tls.identity_as_username(self.listener):
            # The verified client certificate is the identity: CONNECT's username/password are ignored.
            identity = peer_identity(self.transport)
            result = await self.front.authorize_identity(identity, action.client_id, self.peer)
        else:
            result = await self.front.authorize(action.username, action.password, action.client_id, self.peer)
        if self._closed or self.session is None:
            return
        if result.ok and result.team is not None:
            if self.front.admit_team(result.team):
                self._team_slot = result.team
            else:
                result = AuthResult(False, quota_exceeded=True)
        self.session.auth_done(result)
        self._pump()

    async def _open_upstream(self) -> None:
        try:
            transport = await self.front.upstream.connect(self)
        except Exception as exc:  # any failure means "server unavailable" to the client
            self.front.upstream.failed(exc)
            if self.session is not None and not self._closed:
                self.session.upstream_failed(str(exc) or type(exc).__name__)
                self._pump()
            return
        if self._closed or self.session is None:
            transport.close()
            return
        self.upstream = transport
        self.session.upstream_connected()
        # An upstream that accepts the connection but never answers CONNECT must not hang the client.
        timeout = self.front.upstream.connect_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._connack_timeout)
        self._pump()

    def _connack_timeout(self) -> None:
        self._timer = None
        session = self.session
        if session is not None and not self._closed and session.state is State.WAIT_CONNACK:
            session.upstream_failed(f"no CONNACK within {self.front.upstream.connect_timeout:g}s")
            self._pump()

    def server_shutdown(self) -> None:
        """The process is stopping: v5 clients are told so (0x8B) before the socket closes."""
        session = self.session
        if session is not None and session.v5 and session.state is State.ESTABLISHED:
            session.out_client.append(encode_disconnect(0x8B, "server shutting down"))
        self._shutdown("server shutting down")

    def _connect_timeout(self) -> None:
        self._timer = None
        if self.session is not None and self.session.state is State.WAIT_CONNECT:
            log.info("no CONNECT from %s within %.0fs", self.peer, self.front.config.limits.connect_timeout)
            self.session.stats.connect_result = "limit"
            self._shutdown("connect timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _shutdown(self, reason: str) -> None:
        """Close both sides; nothing of this connection outlives it."""
        if self._closed:
            return
        self._closed = True
        if self._team_slot is not None:
            self.front.release_team(self._team_slot)
            self._team_slot = None
        self._cancel_timer()
        session = self.session
        if session is not None:
            if session.state is not State.CLOSED:
                session.state = State.CLOSED
            if session.out_client and self.transport is not None:
                self.transport.write(_join(session.out_client))
            if session.out_upstream and self.upstream is not None:
                self.upstream.write(_join(session.out_upstream))
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        for task in self._tasks:
            task.cancel()
        self.front.connection_closed(self, reason, time.monotonic() - self._started)
