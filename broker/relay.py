"""The connection pump: one asyncio protocol that moves bytes between a client, its Session and the upstream.

Thin on purpose: bytes in, :class:`broker.session.Session` decides, bytes out. Writes are
batched per read, there is no await per packet, and back-pressure is transport flow control:
when one side's write buffer is full, the other side stops being read. Every protocol question
(timeouts, refusals, what a shutdown tells the client) is a Session method; this module only
runs the slow steps the session asks for (authentication, the upstream connect) and the timers.

It depends on nothing above it: the process that owns it is a :class:`ConnectionHost`, the
socket (or a WebSocket / PROXY-protocol adapter) is a :class:`ClientTransport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol, cast

from broker.logs import format_peer
from broker.mqtt.reasons import DisconnectReason
from broker.session import (
    AccessPolicy,
    Authenticate,
    AuthResult,
    CheckAccess,
    Close,
    OpenUpstream,
    Session,
    SessionSettings,
    State,
)

log = logging.getLogger("mqtt_front.connection")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
"""What a listener calls for each accepted socket (asyncio's protocol factory)."""


class ClientTransport(Protocol):
    """The part of ``asyncio.Transport`` a ClientConnection uses (a socket, or an adapter shaped like one)."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def get_write_buffer_size(self) -> int: ...


class ConnectionHost(Protocol):
    """What a ClientConnection needs from the process that owns it (the front broker)."""

    @property
    def session_settings(self) -> SessionSettings: ...
    @property
    def connect_timeout(self) -> float:
        """Seconds a new connection may take to send its CONNECT."""

    @property
    def upstream_connect_timeout(self) -> float:
        """Seconds the upstream may take to answer CONNECT with CONNACK."""

    def connection_opened(self, conn: ClientConnection) -> str | None:
        """Count a new connection; a reason string refuses it at once (a connection limit)."""

    def admit(self, request: Authenticate, conn: ClientConnection) -> Awaitable[AuthResult]:
        """Authenticate and admit the client (team quotas included); a refusal is an AuthResult too."""

    def release_team(self, team: str) -> None:
        """Give back the team slot an admitted connection held."""

    def decide_access(self, conn: ClientConnection, check: CheckAccess) -> Awaitable[bool]:
        """Decide what the session's policy did not know yet (the platform); False on any failure."""

    def open_upstream(self, conn: ClientConnection) -> Awaitable[asyncio.Transport]:
        """A transport to the upstream whose protocol feeds ``conn``; raises when none answers."""

    def upstream_failed(self, exc: BaseException) -> None:
        """A client is refused because ``open_upstream`` raised ``exc`` (for logs and metrics)."""

    def connection_closed(self, conn: ClientConnection, reason: str, duration: float) -> None:
        """The connection is gone; its session's counters are final."""


class TurnPacer:
    """Runs callbacks in order, at most ``per_turn`` per turn of the event loop.

    A burst of new logins (a thousand CONNECTs read at once after an outage) would otherwise start all
    their authentications in one loop turn, each costing tens of microseconds, while the platform's
    answers to the first of them and other clients' packets wait for the next poll. Paced, the loop
    polls its sockets between two batches.
    """

    def __init__(self, per_turn: int = 16) -> None:
        self.per_turn = per_turn
        self._queue: deque[Callable[[], None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a run is scheduled on (None: none)

    def submit(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # left over from a loop that is gone (tests run one per test)
                self._queue.clear()
            self._loop = loop
            loop.call_soon(self._run)
        self._queue.append(callback)

    def _run(self) -> None:
        queue = self._queue
        try:
            for _ in range(min(self.per_turn, len(queue))):
                try:
                    queue.popleft()()
                except Exception:  # one login's failure must not stall the others
                    log.exception("starting an authentication failed")
        finally:
            if queue and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon(self._run)
            else:
                self._loop = None


LOGINS = TurnPacer()
"""Authentications started per loop turn (one event loop per process)."""


def _join(parts: list[bytes]) -> bytes:
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ClientConnection(asyncio.Protocol):
    """One client socket and its upstream connection, pumped through one Session."""

    def __init__(self, host: ConnectionHost, listener: str) -> None:
        self.host = host
        self.listener = listener
        self.transport: ClientTransport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._upstream_paused = False  # upstream reading paused (the client is full, or a delivery waits)
        self._expiry: asyncio.TimerHandle | None = None  # the credentials' expiry (a JWT's exp)
        self._upstream_full = False  # upstream write buffer above its high-water mark
        self._client_full = False  # client write buffer above its high-water mark
        self._started = time.monotonic()
        self.opened_at = time.time()  # wall clock, for the admin API's "connected since"
        self.reads = 0  # reads from the client so far
        self.quiet_since = 0.0  # when the keep-alive sweep last saw ``reads`` move (0: not swept yet)
        self._swept_reads = -1
        self._closed = False
        self._team_slot: str | None = None  # counted against limits.max_connections_per_team

    # ------------------------------------------------------------ client transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A real TCP/TLS transport, or an adapter (WebSocket, PROXY protocol) shaped like one.
        self.transport = cast("ClientTransport", transport)
        self.peer = format_peer(transport.get_extra_info("peername"))
        session = self.session = Session(self.host.session_settings, self.peer)
        refusal = self.host.connection_opened(self)
        if refusal is not None:
            # Refused before any CONNECT is read: the cheapest answer to a connection flood.
            session.refuse_at_accept(refusal)
            self._pump()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.host.connect_timeout, self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        self.reads += 1  # the keep-alive sweep compares it between two sweeps (no clock read per read)
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
        self._sync_reading()

    def resume_writing(self) -> None:
        self._client_full = False
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
        """Write what the session handed over, then run the actions it asked for."""
        session = self.session
        if session is None or self._closed:
            return
        out = session.data_to_upstream()
        if out and self.upstream is not None:
            self.upstream.write(_join(out))
        out = session.data_to_client()
        if out:
            assert self.transport is not None
            self.transport.write(_join(out))
        actions = session.take_actions()
        for action in actions:
            if isinstance(action, Close):
                self._shutdown(action.reason)
                return
            if isinstance(action, Authenticate):
                self._cancel_timer()
                LOGINS.submit(partial(self._start_authentication, action))
            elif isinstance(action, OpenUpstream):
                self._spawn(self._open_upstream())
            elif isinstance(action, CheckAccess):
                self._spawn(self._check_access(action))
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
        upstream = self.upstream
        if upstream is not None:
            pause = self._client_full or not session.reading_upstream
            if pause != self._upstream_paused:
                self._upstream_paused = pause
                if pause:
                    upstream.pause_reading()
                else:
                    upstream.resume_reading()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_authentication(self, action: Authenticate) -> None:
        if not self._closed and self.session is not None:
            self._spawn(self._authenticate(action))

    async def _authenticate(self, action: Authenticate) -> None:
        result = await self.host.admit(action, self)
        if self._closed or self.session is None:
            if result.ok and result.team is not None:
                self.host.release_team(result.team)
            return
        if result.ok and result.team is not None:
            self._team_slot = result.team
        if result.ok and result.expires_at is not None:
            delay = max(0.0, result.expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._credentials_expired)
        self.session.auth_done(result)
        self._pump()

    async def _check_access(self, check: CheckAccess) -> None:
        try:
            allowed = await self.host.decide_access(self, check)
        except Exception:  # fail closed: an error in the decision path is a deny
            log.exception("access decision failed for %s", self.peer)
            allowed = False
        if self._closed or self.session is None:
            return
        self.session.access_decided(check, allowed)
        self._pump()

    def replace_policy(self, policy: AccessPolicy) -> list[str]:
        """Rights changed while connected (a reload): the session checks against ``policy`` from now on."""
        if self.session is None or self._closed:
            return []
        revoked = self.session.replace_policy(policy)
        self._pump()
        return revoked

    def sweep_keep_alive(self, now: float) -> None:
        """The periodic keep-alive sweep (the server's): 1.5 x keep_alive seconds without a read from an
        established client end it. Costs one comparison per connection per sweep, nothing per packet."""
        session = self.session
        if session is None or self._closed or not session.keep_alive or session.state is not State.ESTABLISHED:
            return
        if self.reads != self._swept_reads or self._read_paused:  # paused: we stopped reading, not the client
            self._swept_reads = self.reads
            self.quiet_since = now
        elif now - self.quiet_since >= 1.5 * session.keep_alive:
            session.keep_alive_expired()
            self._pump()

    def revoke_filters(self, filters: list[str]) -> list[str]:
        """Take these subscriptions of the client away (its policy now refuses them)."""
        if self.session is None or self._closed:
            return []
        revoked = self.session.revoke_filters(filters)
        self._pump()
        return revoked

    def disconnect(self, reason: DisconnectReason, why: str, discard_will: bool = False) -> None:
        """The front broker ends this session (rights revoked, an operator's kick)."""
        if self.session is None or self._closed:
            return
        self.session.disconnect(reason, why, discard_will)
        self._pump()

    def _credentials_expired(self) -> None:
        self._expiry = None
        if self.session is not None and not self._closed:
            self.session.credentials_expired()
            self._pump()

    async def _open_upstream(self) -> None:
        try:
            transport = await self.host.open_upstream(self)
        except Exception as exc:  # any failure means "server unavailable" to the client
            self.host.upstream_failed(exc)
            if self.session is not None and not self._closed:
                self.session.upstream_failed(str(exc) or type(exc).__name__)
                self._pump()
            return
        if self._closed or self.session is None:
            transport.close()
            return
        self.upstream = transport
        self._upstream_paused = False
        self.session.upstream_connected()
        # An upstream that accepts the connection but never answers CONNECT must not hang the client.
        timeout = self.host.upstream_connect_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._connack_timeout, timeout)
        self._pump()

    def _connack_timeout(self, timeout: float) -> None:
        self._timer = None
        if self.session is not None and not self._closed:
            self.session.connack_timed_out(timeout)
            self._pump()

    def _connect_timeout(self) -> None:
        self._timer = None
        if self.session is not None and not self._closed:
            self.session.connect_timed_out(self.host.connect_timeout)
            self._pump()

    def server_shutdown(self) -> None:
        """The process is stopping: the session says so to the client, then both sides close."""
        if self.session is not None and not self._closed:
            self.session.server_shutdown()
            self._pump()
        self._shutdown("server shutting down")

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
            self.host.release_team(self._team_slot)
            self._team_slot = None
        self._cancel_timer()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        session = self.session
        if session is not None:
            session.connection_closed()
            out = session.data_to_client()
            if out and self.transport is not None:
                self.transport.write(_join(out))
            out = session.data_to_upstream()
            if out and self.upstream is not None:
                self.upstream.write(_join(out))
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        for task in self._tasks:
            task.cancel()
        self.host.connection_closed(self, reason, time.monotonic() - self._started)
