"""The keep-alive HTTP/1.1 client that carries the platform's questions: httptools parses the answers,
thin asyncio Protocols do the I/O.

Why not aiohttp (which carried them first): every login and every cold-cache delivery check is one
request, and on this path aiohttp's client machinery (request and response objects, cookie and header
processing, a task per connection acquisition, timers) cost about 140 µs of CPU per request, which made
a 1,000-client login storm CPU-bound on the front's one event loop (docs/benchmarks.md). Here a request
is one future, one timer and one write of a head built once per target. Why httptools, not h11 (which
framed them before and still validates the configured headers at start): h11 is pure
Python and cost 44 µs per request and answer, httptools (llhttp, the parser of Node.js, in C) 0.6 µs,
and a login storm is CPU-bound on that loop. Nothing about HTTP is hand-parsed.

Answers are *paced*: an answer is parsed as it arrives (its slot goes to the next request at once),
but waiters worth at most ``PACE`` cost units are woken per turn of the event loop (four logins, or one
held delivery), so a platform answering many requests at the same instant (they were sent together)
cannot hold the loop for a burst of the waiters' continuations while other clients' packets wait; the
loop polls its sockets between two.

Owns: connections per origin (scheme, host, port), the bound on requests in flight shared by all
origins (waiters queue in order), the per-request timeout (waiting for a free slot included), the
idle expiry of kept-alive connections, a bound on the answer's size. Never retries: a request may
carry a one-time credential.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import h11
import httptools

from broker.config import FRAMING_HEADERS

# Below Node.js's default server keepAliveTimeout (5 s): a pooled connection is dropped before the platform
# closes it, so a request is never written into a connection the server is closing.
KEEPALIVE_EXPIRY: Final = 4.0
# Answers handed to their waiters per loop turn, in cost units: a request's ``cost`` says what its waiter's
# continuation costs (a login's: 1, about 0.1 ms; an ACL check that resumes a held delivery: PACE, a turn of
# its own, since its continuation writes the delivery and sends the next check while other sessions wait).
PACE: Final = 4
MAX_BODY: Final = 64 * 1024  # an authn/authz answer is a few dozen bytes
# Bytes read for one answer, whatever they are (head, 1xx answers, chunk headers, trailers): a platform that
# sends without end is cut off here, not by the timeout.
MAX_ANSWER: Final = 2 * MAX_BODY
MAX_HEADS: Final = 512  # request heads kept (one per target and body length)


class Meter(Protocol):
    """Where the client counts (``broker.auth.platform.PlatformStats``): plain integers, read at scrape time."""

    in_flight: int

    def observe(self, seconds: float) -> None:
        """One request answered (or failed) ``seconds`` after it was sent."""


class HttpError(Exception):
    """The exchange failed: connection refused or lost, TLS, a malformed or oversized answer."""


class SlotTimeout(TimeoutError):
    """No request slot became free within the timeout (the request was never sent)."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Target:
    """Where one URL's requests go, parsed once."""

    origin: tuple[str, str, int]  # (scheme, host, port)
    path: bytes  # request target: path and query
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if any(c <= " " or c == "\x7f" for c in path):  # a space or control would break the request line
            raise ValueError(f"URL path with spaces or control characters: {url!r}")
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = port == (443 if scheme == "https" else 80)
        return cls((scheme, host, port), path.encode("ascii"), (shown if default else f"{shown}:{port}").encode())


class _Request:
    __slots__ = ("body", "cost", "finished", "future", "sent_at", "target", "timer")

    def __init__(self, target: Target, body: bytes, future: asyncio.Future[Response], cost: int) -> None:
        self.target = target
        self.body = body
        self.future = future
        self.cost = cost  # of its waiter's continuation, in PACE units
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0  # loop time it got its slot (0: still waiting for one)
        self.finished = False  # its outcome is decided


class _Connection(asyncio.Protocol):
    """One kept-alive connection; at most one request on it at a time (no pipelining).

    Its answers are read by httptools (llhttp, Node.js's parser): the parser's callbacks only record, and
    what they recorded is judged after each ``feed_data``, so no exception crosses the C parser."""

    def __init__(self, pool: HttpClient, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0  # bytes of the current answer's body
        self.head_size = 0  # bytes read of the current answer's head (it must end within MAX_BODY)
        self.read = 0  # bytes read since the request was sent (at most MAX_ANSWER)
        self.in_head = False  # the current answer's head has begun and not ended
        self.framed = False  # the answer says where its body ends (Content-Length or chunked)
        self.complete = False  # a final answer was read whole
        self.keep_alive = False  # the final answer lets the connection be reused
        self.extra = False  # bytes after that answer began another: the connection is not reused
        self.error: str | None = None  # what a callback found wrong
        self.idle_since = 0.0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def send(self, request: _Request) -> None:
        assert self.transport is not None
        self.request = request
        self.status, self.body, self.size, self.complete, self.extra, self.read = 0, [], 0, False, False, 0
        self.transport.write(self.pool._head(request) + request.body)

    # -- httptools callbacks: record only ------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # (HTTP/1.1 cannot tell a stray answer from ours: the first one is taken)
            self.extra = True
            return
        if self.request is None and self.error is None:
            self.error = "an answer nobody asked for"
        self.in_head, self.head_size, self.framed = True, 0, False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.extra:
            return
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.extra:
            return
        self.in_head = False
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.extra or 100 <= self.status < 200:
            return
        self.size += len(body)
        if self.size > MAX_BODY:
            if self.error is None:
                self.error = f"answer larger than {MAX_BODY} bytes"
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        # (an informational answer, 1xx, precedes the final one; an answer already found wrong is not complete)
        if not self.extra and self.error is None and not 100 <= self.status < 200:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # (read here: the parser resets after this call)

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.parse(data)  # at once: the slot goes to the next request now; the waiter is woken paced

    def parse(self, data: bytes, eof: bool = False) -> None:
        """Read what arrived: an answer completes its request.

        ``eof``: the platform closed the connection cleanly; an answer whose body is delimited by the close
        (neither Content-Length nor chunked: RFC 9112 6.3) ends here, any other one was cut short."""
        if self.lost:
            return
        if data:
            self.read += len(data)
            if self.read > MAX_ANSWER and not self.complete:
                self.error = self.error or f"answer larger than {MAX_ANSWER} bytes"
                data = b""  # not parsed: a trailer or a chunk header without end costs the parser per byte
        if data:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.error = self.error or "the platform switched protocols"
            except httptools.HttpParserError as exc:
                self.error = self.error or f"malformed answer: {exc}"
            if self.in_head:
                self.head_size += len(data)
                if self.head_size > MAX_BODY and self.error is None:
                    self.error = f"answer head larger than {MAX_BODY} bytes"
        if self.complete:
            # What follows a complete answer (a stray one, or bytes the parser refuses) is not taken for the
            # next request's answer: the connection is closed.
            self._answered(reusable=False if self.extra or self.error is not None else None)
        elif self.error is None and eof and self.request is not None and self.status >= 200 and not self.in_head:
            if self.framed or self.status in (204, 304):
                self.error = "connection lost"
            else:
                self._answered(reusable=False)
        if self.error is not None:
            self._fail(HttpError(self.error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.parse(b"", eof=exc is None)  # a body delimited by the close ends here
        self.lost = True
        request, self.request = self.request, None
        self.pool._lost(self)
        if request is not None:
            self.pool._finish(request, HttpError("connection lost" if exc is None else f"connection lost: {exc}"))
            self.pool._next()

    def _answered(self, reusable: bool | None = None) -> None:
        request, self.request = self.request, None
        self.complete = False
        if request is None:
            return
        response = Response(self.status, b"".join(self.body))
        self.status = 0
        if reusable is None:
            reusable = self.keep_alive
        self.pool._finish(request, response)
        self.pool._released(self, reusable)

    def _fail(self, exc: HttpError) -> None:
        request, self.request = self.request, None
        self.close()
        if request is not None:
            self.pool._finish(request, exc)
            self.pool._next()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """POSTs to a few origins over kept-alive connections, at most ``max_in_flight`` at once.

    :meth:`post` returns a future of the :class:`Response`; it fails with :class:`HttpError`,
    :class:`SlotTimeout` (never sent) or :class:`TimeoutError` (sent, no answer in time).
    """

    def __init__(
        self,
        *,
        max_in_flight: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        headers: list[tuple[str, str]],
        meter: Meter,
    ) -> None:
        self._meter = meter
        self._max = max(1, max_in_flight)
        self._timeout = timeout
        self._ssl = ssl_context
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        framing = sorted({k for k, _ in headers if k.lower() in FRAMING_HEADERS})
        if framing:
            raise ValueError(f"invalid header: {', '.join(framing)} is set by the client itself")
        try:  # refuse a header h11 would refuse at the first request
            probe = h11.Request(method="POST", target="/", headers=[(b"Host", b"h"), *self._headers])
            h11.Connection(h11.CLIENT).send(probe)
        except h11.LocalProtocolError as exc:
            raise ValueError(f"invalid header: {exc}") from None
        self._busy = 0  # slots taken: requests on the wire plus connections being opened for one
        self._queue: deque[_Request] = deque()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._sent: dict[_Request, _Connection] = {}
        # Waiters to wake, with their cost.
        self._done: deque[tuple[asyncio.Future[Response], Response | Exception, int]] = deque()
        self._draining = False
        self._opening: dict[asyncio.Task[None], _Request] = {}  # connections being opened, for these requests
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heads: dict[tuple[Target, int], bytes] = {}

    @property
    def in_flight(self) -> int:
        return self._busy

    def post(self, target: Target, body: bytes, cost: int = 1) -> asyncio.Future[Response]:
        """``cost``: of the waiter's continuation, in PACE units (PACE: a loop turn of its own)."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[Response] = loop.create_future()
        if self._closed:
            future.set_exception(HttpError("client closed"))
            return future
        request = _Request(target, body, future, cost)
        request.timer = loop.call_at(loop.time() + self._timeout, self._expired, request)
        if self._busy < self._max:
            self._busy += 1
            self._meter.in_flight += 1
            self._start(request)
        else:
            self._queue.append(request)
        return future

    async def close(self) -> None:
        self._closed = True
        while self._queue:
            self._finish(self._queue.popleft(), HttpError("client closed"))
        for task, request in list(self._opening.items()):
            if task.cancel():  # not connected yet (a task cancelled before its first step runs none of _open)
                self._finish(request, HttpError("client closed"))
                self._next()  # the queue is empty: gives the slot back
        for conn in list(self._sent.values()):
            conn.close()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost run
        while self._done:  # every waiter knows before close() returns (no more pacing)
            self._drain()

    def _head(self, request: _Request) -> bytes:
        """The request head for this target and body length, built once (the configured headers were validated
        by h11 at start) and reused."""
        target, length = request.target, len(request.body)
        key = (target, length)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            headers = [(b"Host", target.host_header), *self._headers, (b"Content-Length", str(length).encode())]
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            head = self._heads[key] = b"POST " + target.path + b" HTTP/1.1\r\n" + lines + b"\r\n"
        return head

    # -- slots and connections ------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        """Send ``request`` (its slot is taken) on an idle connection to its origin, or open one."""
        assert self._loop is not None
        request.sent_at = self._loop.time()
        idle = self._idle.get(request.target.origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            # (Bytes arriving on an idle connection answer nothing: parse() closes it, so it is lost.)
            if not conn.lost and now - conn.idle_since < KEEPALIVE_EXPIRY:
                self._sent[request] = conn
                conn.send(request)
                return
            conn.close()
        task = self._loop.create_task(self._open(request))
        self._opening[task] = request
        task.add_done_callback(self._opened)

    async def _open(self, request: _Request) -> None:
        scheme, host, port = request.target.origin
        assert self._loop is not None
        try:
            # Bounded like the request: a connect or TLS handshake that hangs must not keep its slot.
            async with asyncio.timeout(self._timeout):
                _, conn = await self._loop.create_connection(
                    lambda: _Connection(self, request.target.origin),
                    host,
                    port,
                    ssl=self._ssl if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
        except (OSError, ssl.SSLError, ValueError) as exc:  # TimeoutError is an OSError
            self._finish(request, HttpError(f"cannot connect: {exc}"))
            self._next()
            return
        except asyncio.CancelledError:
            self._finish(request, HttpError("client closed"))
            raise
        if request.finished:  # timed out while connecting: keep the connection for the next one
            self._released(conn, True)
            return
        self._sent[request] = conn
        conn.send(request)

    def _opened(self, task: asyncio.Task[None]) -> None:
        del self._opening[task]

    def _released(self, conn: _Connection, reusable: bool) -> None:
        """``conn`` finished its request: give its slot to the next waiter, keep it for reuse or close it."""
        if reusable and not conn.lost and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()
        self._next()

    def _next(self) -> None:
        while self._queue:
            request = self._queue.popleft()
            if request.finished:
                continue
            if request.future.done():  # its caller left while it waited (a login cancelled): never sent
                self._finish(request, HttpError("caller gone"))
                continue
            self._start(request)
            return
        self._busy -= 1
        self._meter.in_flight -= 1

    def _lost(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def _expired(self, request: _Request) -> None:
        request.timer = None
        conn = self._sent.get(request)
        if conn is not None:  # sent: the answer is abandoned with its connection
            conn.request = None
            conn.close()
            self._finish(request, TimeoutError("no answer"))
            self._next()
        elif request.sent_at:  # connecting: _open gives the slot on when it is done
            self._finish(request, TimeoutError("no connection"))
        else:
            self._queue.remove(request)
            self._finish(request, SlotTimeout("no free request slot"))

    # -- answers, paced --------------------------------------------------------------------

    def _finish(self, request: _Request, outcome: Response | Exception) -> None:
        self._sent.pop(request, None)
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        if request.finished:
            return
        request.finished = True
        if request.sent_at and self._loop is not None:
            self._meter.observe(self._loop.time() - request.sent_at)
        self._done.append((request.future, outcome, request.cost))
        if not self._draining and self._loop is not None:
            self._draining = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Wake waiters worth at most PACE cost units per loop turn (at least one): each one's continuation is
        the costly part."""
        done = self._done
        budget = PACE
        while done and budget > 0:
            future, outcome, cost = done[0]
            if future.done():  # a caller that gave up cancelled it
                done.popleft()
                continue
            if cost > budget and budget < PACE:  # the rest of this turn is too small for it: the next one
                break
            done.popleft()
            budget -= cost
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if done and self._loop is not None:
            self._loop.call_soon(self._drain)  # next turn: the loop polls its sockets first
        else:
            self._draining = False
