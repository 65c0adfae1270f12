"""Closing a finished connection without a reset: both sides half-closed, then read until their peers close.

A socket closed while bytes it received are still unread is reset by the kernel (RST) instead of closed
(FIN), and the peer may drop what it had not yet processed: Mosquitto discards what it had queued for a
reset connection, so a drain that closed its upstream sockets with PUBACKs still unread lost the last
publishes of its clients. A :class:`Linger` takes over both transports of a connection once the session
has said its last word (the drain's DISCONNECTs): it half-closes each (``write_eof`` on TCP; TLS and the
WebSocket adapter cannot, they get ``close()``, which sends close_notify or a close frame and reads on until
the peer answers), keeps reading (the caller discards what arrives), and closes each side once its peer has
closed. The caller bounds it in time with :meth:`Linger.abort`. Knows nothing of MQTT or of the session.

The client side also ends once everything we wrote is out and nothing arrived for QUIET seconds: a client
may keep its half open after our FIN (asyncio streams do), and with nothing unread the close is clean. The
upstream side waits for its peer's close: what arrives after ours would reset it, and Mosquitto would drop
what it had not yet processed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

# Seconds without a read after which the client side is closed (nothing unread: no reset). Not shorter: a
# client whose thread was starved that long, then writes again, gets a reset from the closed socket, and its
# kernel drops our DISCONNECT 0x8B still unread (seen with paho under load at 0.1 s).
QUIET = 0.5


class Side(Protocol):
    """The part of a transport a linger uses (an asyncio transport, or an adapter shaped like one)."""

    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_write_buffer_size(self) -> int: ...


def can_write_eof(transport: Any) -> bool:
    """A plain TCP transport can half-close; TLS and the WebSocket adapter cannot (or do not say)."""
    can = getattr(transport, "can_write_eof", None)
    try:
        return bool(can()) if can is not None else False
    except NotImplementedError:  # asyncio.Transport's default, e.g. the upstream TLS stream
        return False


def abort(*transports: Side | None) -> None:
    """Drop these transports now, whatever is unsent or unread (``close()`` where there is no ``abort()``)."""
    for transport in transports:
        if transport is not None:
            drop = getattr(transport, "abort", None)
            (drop if drop is not None else transport.close)()


class Linger:
    """The client and upstream sides of one finished connection, until both peers closed (or ``abort``).

    ``upstream_closes``: the upstream was sent a DISCONNECT and closes the connection itself, so a side that
    cannot half-close is left open for it to do so. ``client_reads`` counts the reads from the client (for
    QUIET). ``done`` is called once, when both sides are gone.
    """

    __slots__ = ("_done", "_reads", "_timer", "client", "open", "upstream")

    def __init__(
        self,
        client: Side | None,
        upstream: Side | None,
        upstream_closes: bool,
        client_reads: Callable[[], int],
        done: Callable[[], None],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self._done: Callable[[], None] | None = done
        self._reads = client_reads
        self._timer: asyncio.TimerHandle | None = None
        self.open: set[str] = set()
        for name, side in (("client", client), ("upstream", upstream)):
            if side is None or side.is_closing():
                continue
            self.open.add(name)
            side.resume_reading()  # the peer's FIN (or close_notify) must be read to be seen
            if can_write_eof(side):
                side.write_eof()  # type: ignore[attr-defined]  # after what is buffered is written
            elif name == "client" or not upstream_closes:
                side.close()
        if "client" in self.open:
            self._timer = asyncio.get_running_loop().call_later(QUIET, self._quiet, client_reads())
        if not self.open:
            self._finish()

    def _quiet(self, reads: int) -> None:
        self._timer = None
        client = self.client
        if "client" not in self.open or client is None:
            return
        now = self._reads()
        if now == reads and client.get_write_buffer_size() == 0:
            self.closed("client")
        else:
            self._timer = asyncio.get_running_loop().call_later(QUIET, self._quiet, now)

    def closed(self, name: str) -> None:
        """The peer of side ``name`` closed it (its EOF, or the connection was lost)."""
        self.open.discard(name)
        side = self.client if name == "client" else self.upstream
        if side is not None:
            side.close()  # after the peer's FIN: ours went already, nothing unread is left
        if not self.open:
            self._finish()

    def abort(self) -> None:
        """The deadline: both sides dropped now, and the linger is over."""
        abort(self.client, self.upstream)
        self.open.clear()
        self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._done = self._done, None
        if done is not None:
            done()


class Tarpit:
    """Connections refused before login for a hostile or broken CONNECT (over ``limits.max_connect_size``,
    malformed), held open without being read for HOLD seconds before the close, at most ``size`` at a
    time. A client that sends such CONNECTs in a loop then gets one refusal per HOLD seconds per
    connection instead of thousands a second: that accept, refuse and reset churn, on cores shared with
    everyone else, is what slowed other teams in bench/fairness.py's CONNECT flood. The refusal itself
    (CONNACK with its reason code) is sent at once; only the close waits."""

    HOLD = 1.0

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.held = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the held ones belong to

    def hold(self, transport: Side) -> bool:
        """Close ``transport`` HOLD seconds from now (False: the tarpit is full, close it yourself). Held
        connections no longer count against limits.max_connections: ``size`` bounds their descriptors."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a loop that ended took its timers (and held sockets) with it
            self._loop, self.held = loop, 0
        if self.held >= self.size:
            return False
        self.held += 1
        transport.pause_reading()
        loop.call_later(self.HOLD, self._release, transport)
        return True

    def _release(self, transport: Side) -> None:
        self.held -= 1
        transport.close()


TARPIT = Tarpit()
