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
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Literal, Protocol, cast

from broker.linger import TARPIT, Linger, abort
from broker.logs import format_peer, log_event
from broker.mqtt.reasons import DisconnectReason
from broker.pacing import LOGINS
from broker.session import (
    AccessPolicy,
    Authenticate,
    AuthResult,
    CheckAccess,
    Close,
    Continue,
    OpenUpstream,
    RateCheck,
    Session,
    SessionSettings,
    State,
)
from broker.session.ratelimit import PublishLimiter

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

    def decide_access(self, conn: ClientConnection, check: CheckAccess, done: Callable[[bool | None], None]) -> None:
        """Decide what the session's policy did not know (the platform), then call ``done`` from the loop."""

    def open_upstream(self, conn: ClientConnection) -> Awaitable[asyncio.Transport]:
        """A transport to the upstream whose protocol feeds ``conn``; raises when none answers."""

    def upstream_failed(self, exc: BaseException) -> None:
        """A client is refused because ``open_upstream`` raised ``exc`` (for logs and metrics)."""

    def upstream_dropped(self) -> None:
        """An established upstream connection was closed by the upstream (or the network), not by us."""

    def connection_closed(self, conn: ClientConnection, reason: str, duration: float) -> None:
        """The connection is gone; its session's counters are final."""

    def publish_limiter(self, team: str | None) -> PublishLimiter | None:
        """The publish rate limits of a client just admitted for ``team`` (None: none apply)."""


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
        self._draining = False  # the process stops (drain): the session finishes, then both sides linger
        self._drain_reads = 0  # ``reads`` at the last drain tick: unchanged means the client was quiet
        self._linger: Linger | None = None
        self.limiter: PublishLimiter | None = None  # limits.publish_rate, charged at the session's RateChecks
        self._throttled = False  # reading stopped until the rate limit's tokens refill
        self._throttle: asyncio.TimerHandle | None = None
        self._throttle_logged = 0.0  # when the last publish_rate log line for this connection was written

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

    def _rate_check(self) -> None:
        """The session's RateCheck: charge what the client sent since the last one; let it go on at once, or
        once the tokens refill (or disconnect it: limits.publish_rate.action)."""
        session = self.session
        assert session is not None
        limiter = self.limiter
        if limiter is None:
            session.allow_publishes(1 << 40, 1 << 40)
            return
        stats = session.stats
        wait = limiter.charge(stats.msgs_in, stats.bytes_in, time.monotonic())
        if wait <= 0:
            self._allow_publishes()
            return
        session.stats.limit_hit("publish_rate")
        now = time.monotonic()
        if now - self._throttle_logged >= 60.0:  # one line a minute per connection, however hard it pushes
            self._throttle_logged = now
            action = "disconnect" if limiter.disconnect else "pause"
            fields = {"peer": self.peer, "user": session.username, "limit": "publish_rate", "action": action}
            log_event(log, logging.INFO, "limit_exceeded", **fields)
        if limiter.disconnect:
            session.disconnect(DisconnectReason.MESSAGE_RATE_TOO_HIGH, "message rate too high")
            return
        self._throttled = True  # the session holds the client's bytes meanwhile; its reading is paused
        # Out of debt, plus 50 ms of tokens: waking at zero would let one message through per wake-up.
        self._throttle = asyncio.get_running_loop().call_later(wait + 0.05, self._rate_refilled)

    def _rate_refilled(self) -> None:
        self._throttled, self._throttle = False, None
        if self.session is not None and not self._closed:
            self._allow_publishes()
            self._pump()

    def _allow_publishes(self) -> None:
        assert self.session is not None and self.limiter is not None
        messages, size = self.limiter.allowance(time.monotonic())
        self.session.allow_publishes(messages, size)

    def eof_received(self) -> None:
        self._shutdown("client closed the connection")

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
            if self._linger is not None:
                self._linger.closed("upstream")
            return
        self.upstream = None
        self.host.upstream_dropped()
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
        again = True
        while again:  # a RateCheck answered at once lets the session go on: its new output goes out too
            again = False
            out = session.data_to_upstream()
            if out and self.upstream is not None:
                self.upstream.write(_join(out))
            out = session.data_to_client()
            if out:
                assert self.transport is not None
                self.transport.write(_join(out))
            for action in session.take_actions():
                if isinstance(action, Close):
                    self._shutdown(action.reason)
                    return
                if isinstance(action, Authenticate):
                    self._cancel_timer()
                    LOGINS.submit(partial(self._start_authentication, action))
                elif isinstance(action, OpenUpstream):
                    self._spawn(self._open_upstream())
                elif isinstance(action, CheckAccess):
                    self._check_access(action)
                elif isinstance(action, Continue):
                    asyncio.get_running_loop().call_soon(self._continue)
                elif isinstance(action, RateCheck):
                    self._rate_check()
                    again = True
        self._sync_reading()

    def _continue(self) -> None:
        """A read that spent its work budget goes on, after the other connections had their turn."""
        if self.session is not None and not self._closed:
            self.session.continue_client()
            self._pump()

    def _sync_reading(self) -> None:
        session = self.session
        if self.transport is None or session is None or self._closed:
            return
        pause = self._upstream_full or self._client_full or self._throttled or not session.reading_client
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
        if result.ok:
            self._team_slot = result.team  # counted by admit(); None: no team
            self.limiter = self.host.publish_limiter(result.team)
            if self.limiter is not None:
                self._allow_publishes()
            if result.expires_at is not None:
                delay = max(0.0, result.expires_at - time.time())
                self._expiry = asyncio.get_running_loop().call_later(delay, self._credentials_expired)
        self.session.auth_done(result)
        self._pump()

    def _check_access(self, check: CheckAccess) -> None:
        try:
            self.host.decide_access(self, check, partial(self._access_decided, check))
        except Exception:  # fail closed: an error in the decision path is a deny (a will's: 0x88)
            log.exception("access decision failed for %s", self.peer)
            asyncio.get_running_loop().call_soon(self._access_decided, check, None)

    def _access_decided(self, check: CheckAccess, allowed: bool | None) -> None:
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
        """The process is stopping now (no drain): the session says so to the client, then both sides close."""
        if self._closed:
            return
        if self.session is not None:
            self.session.server_shutdown()
            self._pump()
        self._shutdown("server shutting down")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _shutdown(self, reason: str) -> None:
        """Close both sides; nothing of this connection outlives it. While draining, both linger first."""
        if self._closed:
            if self._linger is not None:  # once closed, only the client's EOF or loss gets here
                self._linger.closed("client")
            return
        self._closed = True
        if self._team_slot is not None:
            self.host.release_team(self._team_slot)
            self._team_slot = None
        self._cancel_timer()
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
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
        for task in self._tasks:
            task.cancel()
        if self._draining:  # no reset: both sides half-closed and read until their peers close
            up, told = self.upstream, session is not None and session.v5  # v5: DISCONNECT sent, the upstream closes
            self._linger = Linger(self.transport, up, told, lambda: self.reads, lambda: self._gone(reason))
            return
        hostile = session is not None and session.bad_connect  # held a while before the close (linger.Tarpit)
        if self.transport is not None and not (hostile and TARPIT.hold(self.transport)):
            self.transport.close()  # flushes what is buffered, then closes
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self._gone(reason)

    def _gone(self, reason: str) -> None:
        self.upstream = None
        self.host.connection_closed(self, reason, time.monotonic() - self._started)

    def drain(self, step: Literal["start", "tick", "expire"], reading_over: bool = False) -> None:
        """The process stops: "start" (``Session.start_drain``), then "tick" every few tens of milliseconds
        until the connection is gone, "expire" when the time is nearly up; ``abort`` at the deadline."""
        session = self.session
        if session is None or self._closed:
            return
        if step == "start":
            if not self._draining:
                self._draining, self._drain_reads = True, self.reads
                session.start_drain()
        elif step == "tick":
            quiet = self.reads == self._drain_reads and not self._read_paused  # paused: we stopped reading it
            self._drain_reads = self.reads
            session.drain_tick(quiet, reading_over)
        else:
            self._draining = True
            session.drain_expired()
        self._pump()

    def abort(self) -> None:
        """The drain's deadline: both sides dropped now, whatever is still unsent or unread."""
        if not self._closed:
            upstream, self._draining = self.upstream, False
            self._shutdown("server shutting down (drain timed out)")
            abort(self.transport, upstream)
        elif self._linger is not None:
            self._linger.abort()
