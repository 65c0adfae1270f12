"""broker.auth.http_client against real loopback servers written here (asyncio.start_server), whose answers
are the exact bytes each test gives: framing, keep-alive, the in-flight bound, timeouts, failures, close,
pacing, HTTPS. Requests are read server-side with h11 (the server's own parser, not the client's code)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trustme

from broker.auth import http_client
from broker.auth.http_client import MAX_BODY, PACE, HttpClient, HttpError, Response, SlotTimeout, Target
from broker.auth.platform import ssl_context
from tests.support.ports import free_port


@dataclass
class Meter:
    in_flight: int = 0
    observed: list[float] = field(default_factory=list)

    def observe(self, seconds: float) -> None:
        self.observed.append(seconds)


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]  # names in lower case
    body: bytes


def ok(body: bytes = b"ok", status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


async def read_request(reader: asyncio.StreamReader) -> Seen | None:
    """One request as h11's server side sees it; None at a clean EOF between requests."""
    conn = h11.Connection(h11.SERVER)
    head: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Seen(head.method, head.target, dict(head.headers), body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


# An answer writes to the connection what the test wants; it returns whether to read the next request on it.
Answer = Callable[["Server", Seen, asyncio.StreamWriter], Awaitable[bool]]


def reply(data: bytes | Callable[[Seen], bytes], keep: bool = True, trickle: bool = False) -> Answer:
    """Answer ``data`` at once, or ``trickle``d in about 50 small TCP segments."""

    async def answer(srv: Server, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        answer = data(seen) if callable(data) else data
        if not trickle:
            writer.write(answer)
            return keep
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = max(2, len(answer) // 50)
        for i in range(0, len(answer), step):
            writer.write(answer[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.001)
        return keep

    return answer


echo = reply(lambda seen: ok(seen.body))


async def hold(srv: Server, seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Answer when the test resolves the gate queued in ``srv.held`` (with the bytes to write); never if never."""
    gate: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    srv.held.put_nowait((seen, gate, writer))
    writer.write(await gate)
    return True


class Server:
    def __init__(self, answer: Answer | None) -> None:
        self.answer = answer
        self.accepts = 0
        self.ended = 0  # connections whose handler is done (closed server-side)
        self.seen: list[Seen] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.held: asyncio.Queue[tuple[Seen, asyncio.Future[bytes], asyncio.StreamWriter]] = asyncio.Queue()
        self.active = self.peak = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def target(self, path: str = "/", scheme: str = "http") -> Target:
        return Target.parse(f"{scheme}://127.0.0.1:{self.port}{path}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepts += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            await self._serve(reader, writer)
        writer.close()
        self.ended += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while self.answer is None and await reader.read(65536):  # silent: a TLS handshake with it never ends
            pass
        while self.answer is not None and (seen := await read_request(reader)) is not None:
            self.seen.append(seen)
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                keep = await self.answer(self, seen, writer)
            finally:
                self.active -= 1
            if not keep:
                return

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Env:
    """Servers and clients of one test, all stopped and closed at its end."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.clients: list[tuple[HttpClient, Meter]] = []

    async def server(self, answer: Answer | None = echo, tls: ssl.SSLContext | None = None) -> Server:
        srv = await Server(answer).start(tls)
        self.servers.append(srv)
        return srv

    def client(self, *, max_in_flight: int = 4, timeout: float = 2.0, **kw: Any) -> tuple[HttpClient, Meter]:
        meter = Meter()
        kw = {"ssl_context": None, "headers": [], **kw}
        client = HttpClient(max_in_flight=max_in_flight, timeout=timeout, meter=meter, **kw)
        self.clients.append((client, meter))
        return client, meter


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    env = Env()
    yield env
    for client, meter in env.clients:
        await client.close()
        await until(lambda: client.in_flight == meter.in_flight == 0)  # noqa: B023 (called at once)
    for srv in env.servers:
        await srv.stop()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def failure(future: asyncio.Future[Response], kind: type[BaseException] = HttpError, within: float = 1) -> str:
    """``future`` fails with exactly ``kind`` within ``within`` seconds; its message."""
    done, _ = await asyncio.wait([future], timeout=within)
    assert done, f"no outcome within {within}s"
    exc = future.exception()
    assert type(exc) is kind, repr(exc)
    return str(exc)


async def held(srv: Server, count: int) -> list[tuple[Seen, asyncio.Future[bytes], asyncio.StreamWriter]]:
    return [await asyncio.wait_for(srv.held.get(), 2) for _ in range(count)]


# -- framing -----------------------------------------------------------------------------------------------------------


async def test_plain_answer_and_the_request_the_server_sees(env: Env) -> None:
    srv = await env.server(reply(ok(b'{"result":"allow"}', 201)))
    headers = [("Content-Type", "application/json"), ("X-Api-Key", "k1")]
    client, _ = env.client(headers=headers)
    target = srv.target("/api/auth?x=1&y=%2F")
    assert await client.post(target, b'{"u":1}') == Response(201, b'{"result":"allow"}')
    assert await client.post(target, b"") == Response(201, b'{"result":"allow"}')  # another length, same target
    first, second = srv.seen
    assert (first.method, first.target, first.body) == (b"POST", b"/api/auth?x=1&y=%2F", b'{"u":1}')
    assert first.headers[b"host"] == f"127.0.0.1:{srv.port}".encode()
    assert (first.headers[b"content-type"], first.headers[b"x-api-key"]) == (b"application/json", b"k1")
    assert (first.headers[b"content-length"], second.headers[b"content-length"], second.body) == (b"7", b"0", b"")


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\nX-T: 1\r\n\r\n"
INFORMATIONAL = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
FRAMINGS = {  # answer, whether the connection stays open, what the client returns
    "content-length": (ok(b"plain"), True, Response(200, b"plain")),
    "max-body": (ok(b"b" * MAX_BODY), True, Response(200, b"b" * MAX_BODY)),
    "chunked": (CHUNKED, True, Response(200, b"abcdefgh")),
    "1xx-first": (INFORMATIONAL + CHUNKED.replace(b"200 OK", b"403 No"), True, Response(403, b"abcdefgh")),
    "connection-close": (ok(b"bye", extra=b"Connection: close\r\n"), False, Response(200, b"bye")),
    # No Content-Length, no chunks: the body ends with the connection (RFC 9112 6.3, rule 8).
    "close-delimited": (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", False, Response(200, b"until the end")),
}


@pytest.mark.parametrize("trickle", [False, True], ids=["at-once", "tiny-writes"])
@pytest.mark.parametrize("name", FRAMINGS)
async def test_framings_and_keep_alive(env: Env, name: str, trickle: bool) -> None:
    """Sequential requests share one kept-alive connection, unless the answer closes it (then each opens one)."""
    answer, keep, expected = FRAMINGS[name]
    srv = await env.server(reply(answer, keep, trickle))
    client, _ = env.client()
    for _ in range(4):
        assert await client.post(srv.target(), b"x") == expected
    assert srv.accepts == (1 if keep else 4)


# -- keep-alive --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [True, False], ids=["close-seen", "close-racing"])
async def test_server_closing_an_idle_connection(env: Env, wait: bool) -> None:
    """The server closes a kept-alive connection right after answering (no ``Connection: close``). Once the client
    has seen the close, the next request opens a new connection and succeeds; sent at once (before the FIN is
    read: what happens here) it goes out on the closing connection and fails fast, HttpError "connection lost",
    never retried. Either way the one after succeeds."""
    srv = await env.server(reply(ok(b"one"), keep=False))
    client, _ = env.client()

    async def closes_seen() -> None:
        await until(lambda: srv.ended == srv.accepts)
        await asyncio.sleep(0.05)

    assert await client.post(srv.target(), b"x") == Response(200, b"one")
    if wait:
        await closes_seen()
        assert await client.post(srv.target(), b"x") == Response(200, b"one")
    else:
        with contextlib.suppress(HttpError):
            assert await asyncio.wait_for(client.post(srv.target(), b"x"), 1) == Response(200, b"one")
    await closes_seen()
    assert await client.post(srv.target(), b"x") == Response(200, b"one")
    assert srv.accepts == len(srv.seen)


async def test_idle_connection_expires(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "KEEPALIVE_EXPIRY", 0.1)
    srv = await env.server()
    client, _ = env.client()
    await client.post(srv.target(), b"x")
    await client.post(srv.target(), b"x")
    assert srv.accepts == 1
    await asyncio.sleep(0.15)
    await client.post(srv.target(), b"x")
    assert srv.accepts == 2


# -- the in-flight bound -----------------------------------------------------------------------------------------------


async def test_at_most_max_in_flight_and_the_others_queue_in_order(env: Env) -> None:
    """And the meter: requests in flight, one latency observed per request, its clock started at its slot."""
    srv = await env.server(hold)
    client, meter = env.client(max_in_flight=3)
    futures = [client.post(srv.target(), b"%d" % i) for i in range(20)]
    waiting = await held(srv, 3)
    assert sorted(seen.body for seen, _, _ in waiting) == [b"0", b"1", b"2"]
    await asyncio.sleep(0.2)
    assert srv.held.empty() and client.in_flight == meter.in_flight == 3 and meter.observed == []
    for i in range(3, 20):  # each answer frees one slot: the oldest waiter, and only it, is sent
        seen, gate, _ = waiting.pop(0)
        gate.set_result(ok(seen.body))
        waiting += await held(srv, 1)
        assert waiting[-1][0].body == b"%d" % i
        assert srv.held.empty() and srv.active == 3
    for seen, gate, _ in waiting:
        gate.set_result(ok(seen.body))
    assert [r.body for r in await asyncio.gather(*futures)] == [b"%d" % i for i in range(20)]
    assert (srv.peak, srv.accepts, len(srv.seen), len(meter.observed)) == (3, 3, 20, 20)
    assert client.in_flight == meter.in_flight == 0
    assert min(meter.observed[:3]) >= 0.2 > 0.1 > max(meter.observed[3:])


# -- timeouts ----------------------------------------------------------------------------------------------------------


async def test_no_answer_times_out_and_gives_the_slot_back(env: Env) -> None:
    srv = await env.server(hold)
    client, meter = env.client(max_in_flight=1, timeout=0.3)
    started = time.monotonic()
    never = client.post(srv.target(), b"never")
    await held(srv, 1)
    await failure(never, TimeoutError)
    assert time.monotonic() - started > 0.25
    assert client.in_flight == meter.in_flight == 0 and len(meter.observed) == 1
    later = client.post(srv.target(), b"later")
    (seen, gate, _), *_ = await held(srv, 1)
    gate.set_result(ok(b"fine"))
    assert (seen.body, await later) == (b"later", Response(200, b"fine"))
    assert srv.accepts == 2  # the timed-out answer was abandoned with its connection


async def test_waiting_for_a_slot_too_long_is_a_slot_timeout_and_never_sent(env: Env) -> None:
    """A slot outlives its request's timeout only while its connection is being opened: here a TLS handshake
    with a server that never speaks holds the only slot; the request queued behind it is never sent."""
    silent = await env.server(None)
    srv = await env.server()
    client, meter = env.client(max_in_flight=1, timeout=0.3, ssl_context=ssl.create_default_context())
    connecting = client.post(silent.target(scheme="https"), b"a")
    queued = client.post(srv.target(), b"b")
    assert "slot" in await failure(queued, SlotTimeout)
    await failure(connecting, TimeoutError, within=0.1)
    assert (srv.accepts, srv.seen, len(meter.observed)) == (0, [], 1)
    await silent.stop()  # the handshake fails: the slot is given back
    assert await client.post(srv.target(), b"c") == Response(200, b"c")
    assert [seen.body for seen in srv.seen] == [b"c"]


# -- failures ----------------------------------------------------------------------------------------------------------


async def test_connection_refused_fails_fast_and_frees_its_slot(env: Env) -> None:
    client, meter = env.client(max_in_flight=1)
    target = Target.parse(f"http://127.0.0.1:{free_port()}/")
    first, second = client.post(target, b"x"), client.post(target, b"x")  # the second waits for the slot
    assert "cannot connect" in await failure(first)
    await failure(second)
    assert client.in_flight == meter.in_flight == 0 and len(meter.observed) == 2


@pytest.mark.parametrize(
    ("answer", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", False),
        (b"HTTP/1.1 200 OK\r\nContent-Le", False),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),
        (ok(b"b" * (MAX_BODY + 1)), True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"8000\r\n" + b"c" * 0x8000 + b"\r\n") * 3, True),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * (MAX_BODY + 1), True),  # a head that never ends
        # Bytes that are neither head nor body: a trailer, a chunk extension, 1xx bodies without end.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"t" * (4 * MAX_BODY), True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;" + b"e" * (4 * MAX_BODY), True),
        (b"HTTP/1.1 150 Odd\r\nTransfer-Encoding: chunked\r\n\r\n8000\r\n" + b"i" * (4 * MAX_BODY), True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_BODY // 8), True),
    ],
    ids=["closed-mid-body", "closed-mid-head", "garbage", "bad-status", "bad-chunk", "large", "large-chunked", "head",
         "trailer-flood", "extension-flood", "1xx-body-flood", "1xx-flood"],
)
async def test_bad_answers_fail_with_http_error(env: Env, answer: bytes, keep: bool) -> None:
    bad = await env.server(reply(answer, keep))
    good = await env.server()
    client, meter = env.client(max_in_flight=1)
    await failure(client.post(bad.target(), b"x"))
    assert await client.post(good.target(), b"y") == Response(200, b"y")  # the slot was given back
    assert client.in_flight == meter.in_flight == 0 and len(meter.observed) == 2


@pytest.mark.parametrize("settle", [True, False], ids=["stray-parsed", "stray-racing"])
@pytest.mark.parametrize("stray", [ok(b"stray"), b"junk\r\n"], ids=["answer", "junk"])
async def test_unsolicited_bytes_on_an_idle_connection(env: Env, stray: bytes, settle: bool) -> None:
    srv = await env.server()
    client, _ = env.client()
    assert await client.post(srv.target(), b"one") == Response(200, b"one")
    srv.writers[0].write(stray)
    if settle:
        await asyncio.sleep(0.05)
    with contextlib.suppress(HttpError):
        # Once parsed, stray bytes close the connection; bytes already on the wire when a request is written
        # are read as its answer (HTTP/1.1 has no way to tell): the stray answer, never a hang.
        expected = [Response(200, b"two")] if settle else [Response(200, b"two"), Response(200, b"stray")]
        assert await asyncio.wait_for(client.post(srv.target(), b"two"), 1) in expected
    await asyncio.sleep(0.05)  # the real answer to "two", if it came after the stray one, closes that connection
    assert await client.post(srv.target(), b"three") == Response(200, b"three")


async def test_close_fails_sent_queued_and_connecting_requests(env: Env) -> None:
    srv = await env.server(hold)
    client, meter = env.client(max_in_flight=2)
    sent = [client.post(srv.target(), b"a"), client.post(srv.target(), b"b")]
    queued = [client.post(srv.target(), b"c"), client.post(srv.target(), b"d")]
    await held(srv, 2)
    await client.close()
    for future in sent + queued:
        assert future.done() and isinstance(future.exception(), HttpError)
    assert client.in_flight == meter.in_flight == 0 and len(meter.observed) == 2
    assert "closed" in await failure(client.post(srv.target(), b"e"))
    assert len(srv.seen) == 2

    other, meter = env.client()
    connecting = other.post(srv.target(), b"f")  # closed before its connection is even attempted
    await other.close()
    await failure(connecting, within=0.5)
    assert other.in_flight == meter.in_flight == 0


@pytest.mark.parametrize("costs", [[1] * 40, [PACE] * 40, [1, PACE, 1, 1, 2] * 8], ids=["logins", "checks", "mixed"])
async def test_answers_arriving_together_are_handed_over_paced(env: Env, costs: list[int]) -> None:
    """40 answers land in one loop turn; waiters worth at most PACE cost units complete per turn (one at least),
    in order, and the loop runs other callbacks between two batches. Turns are counted by a callback that
    reschedules itself, not by time."""
    loop = asyncio.get_running_loop()
    srv = await env.server(hold)
    client, _ = env.client(max_in_flight=40)
    futures = [client.post(srv.target(), b"%d" % i, cost=costs[i]) for i in range(40)]
    waiting = await held(srv, 40)
    turn = 0
    completed_at: list[int] = []  # the turn of each answer's delivery
    marker: list[int] = []  # answers delivered when a callback scheduled at the first delivery ran

    def tick() -> None:
        nonlocal turn
        turn += 1
        if len(completed_at) < 40:
            loop.call_soon(tick)

    def completed(_: object) -> None:
        completed_at.append(turn)
        if len(completed_at) == 1:
            loop.call_soon(lambda: marker.append(len(completed_at)))

    for future in futures:
        future.add_done_callback(completed)
    for seen, _, writer in waiting:  # all written before the client's next poll of its sockets
        writer.write(ok(seen.body))
    tick()
    assert [r.body for r in await asyncio.gather(*futures)] == [b"%d" % i for i in range(40)]
    assert completed_at == sorted(completed_at)  # in order
    per_turn: dict[int, int] = {}
    for i, at in enumerate(completed_at):
        per_turn[at] = per_turn.get(at, 0) + costs[i]
    assert all(units <= PACE for units in per_turn.values()), per_turn
    assert len(per_turn) >= sum(costs) // PACE
    assert marker and marker[0] < 40
    for _, gate, _ in waiting:
        gate.set_result(b"")


async def test_https_trusts_the_configured_ca_only(env: Env, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    srv = await env.server(tls=server_tls)
    client, _ = env.client(ssl_context=ssl_context(tmp_path / "ca.pem"))
    for body in (b"one", b"two"):
        assert await client.post(srv.target(scheme="https"), body) == Response(200, body)
    assert srv.accepts == 1
    stranger, _ = env.client(ssl_context=ssl_context(None))
    assert "cannot connect" in await failure(stranger.post(srv.target(scheme="https"), b"x"))
    assert len(srv.seen) == 2


# -- Target.parse and headers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin", "path", "host"),
    [
        ("http://platform/", ("http", "platform", 80), b"/", b"platform"),
        ("https://Platform.example", ("https", "platform.example", 443), b"/", b"platform.example"),
        ("HTTP://h:8080/a/b?x=1&y=2#frag", ("http", "h", 8080), b"/a/b?x=1&y=2", b"h:8080"),
        ("https://h:80/", ("https", "h", 80), b"/", b"h:80"),
        ("http://[::1]:8080/auth", ("http", "::1", 8080), b"/auth", b"[::1]:8080"),
        ("https://[fe80::1]/", ("https", "fe80::1", 443), b"/", b"[fe80::1]"),
    ],
)
def test_target_parse(url: str, origin: tuple[str, str, int], path: bytes, host: bytes) -> None:
    assert Target.parse(url) == Target(origin, path, host)


@pytest.mark.parametrize("url", ["ftp://h/", "h/path", "http:///x", "unix:///tmp/s", "ws://h/"])
def test_target_parse_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Target.parse(url)


@pytest.mark.parametrize("url", ["http://h/a b", "http://h/a\x00b", "http://h/a\x7f", "http://h/?q=a b"])
def test_target_parse_refuses_what_would_break_the_request_line(url: str) -> None:
    """The request line is written as bytes, not by an HTTP library: a space or a control character in the
    path would split it (a second request smuggled into the first)."""
    with pytest.raises(ValueError, match="spaces or control"):
        Target.parse(url)


async def test_a_second_answer_in_the_same_read_is_not_taken_for_the_next_request(env: Env) -> None:
    """Two answers in one segment to one request: the first is the answer, the connection is then not trusted
    (closed), and the next request opens a new one and gets its own answer."""
    srv = await env.server(reply(ok(b"first") + ok(b"second")))
    client, _ = env.client()
    assert await client.post(srv.target(), b"x") == Response(200, b"first")
    assert await client.post(srv.target(), b"y") == Response(200, b"first")
    assert srv.accepts == 2


@pytest.mark.parametrize(
    "header",
    [("Bad Name", "v"), ("X-Key", "a\r\nInjected: 1"), ("Content-Length", "5"), ("transfer-encoding", "chunked"),
     ("Connection", "upgrade"), ("Host", "other"), ("Upgrade", "websocket"), ("TE", "trailers"),
     ("Expect", "100-continue")],
)
def test_invalid_configured_header_is_refused(header: tuple[str, str]) -> None:
    """Headers the client frames itself would contradict it (two lengths, a body read as chunks): refused at start."""
    with pytest.raises(ValueError, match="invalid header"):
        HttpClient(max_in_flight=1, timeout=1, ssl_context=None, headers=[header], meter=Meter())


@pytest.mark.parametrize("after", [b"junk\r\n", b"\x00\x01"], ids=["junk", "binary"])
async def test_bytes_refused_after_a_complete_answer_do_not_lose_it(env: Env, after: bytes) -> None:
    """A complete answer followed in the same read by bytes the parser refuses: the answer counts (as with h11),
    the connection is closed, the next request opens a new one."""
    srv = await env.server(reply(ok(b"fine") + after))
    client, _ = env.client()
    assert await client.post(srv.target(), b"x") == Response(200, b"fine")
    assert await client.post(srv.target(), b"y") == Response(200, b"fine")
    assert srv.accepts == 2


async def test_a_request_whose_caller_left_while_queued_is_never_sent(env: Env) -> None:
    """A login cancelled while it waits for a slot must not spend its one-time credential on the platform."""
    srv = await env.server(hold)
    client, _ = env.client(max_in_flight=1)
    first = client.post(srv.target(), b"first")
    gone = client.post(srv.target(), b"one-time")
    third = client.post(srv.target(), b"third")
    (_seen, gate, _writer), = await held(srv, 1)
    gone.cancel()
    gate.set_result(ok(b"1"))
    assert await first == Response(200, b"1")
    (_seen3, gate3, _w3), = await held(srv, 1)
    gate3.set_result(ok(b"3"))
    assert await third == Response(200, b"3")
    assert [s.body for s in srv.seen] == [b"first", b"third"]
    assert client.in_flight == 0
