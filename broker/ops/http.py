"""The operations endpoint: /metrics, /healthz and /readyz over a tiny HTTP/1.1 server.

One request per connection (``Connection: close``), GET and HEAD only, request line and
headers read with size, count and time limits. No dependency beyond prometheus_client's
text exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Protocol

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from broker.mqtt.packets import Connect, encode_connect
from broker.ops.metrics import upstream_name
from broker.upstream.connector import UpstreamConnector
from broker.upstream.targets import UpstreamTarget

log = logging.getLogger("mqtt_front.http")

MAX_LINE = 8192  # bytes per request or header line
MAX_HEADERS = 64
REQUEST_TIMEOUT = 5.0  # seconds to read the whole request head
PROBE_TIMEOUT = 2.0  # seconds for the readiness TCP probe of the upstream

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class ReadinessSource(Protocol):
    """What readiness looks at: the process's listeners, whether it is draining, and its upstream connector."""

    @property
    def listening(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def upstream(self) -> UpstreamConnector: ...


class Readiness:
    """Listeners bound, not draining, and the upstream reachable: a recent successful connect, or a TCP probe.

    A connect that succeeded within ``window`` seconds (and no failure nor lost upstream connection
    since) is enough; otherwise the upstream is probed (a TCP connection opened and closed at once), at
    most every ``probe_interval`` seconds: requests in between get the last probe's answer. A lost upstream
    connection (``upstream_dropped``) makes the next request probe again, so a dead upstream turns /readyz
    503 at once rather than after ``window``.
    """

    def __init__(self, front: ReadinessSource, window: float = 10.0, probe_interval: float = 2.0) -> None:
        self.front = front
        self.window = window
        self.probe_interval = probe_interval
        self._probe_at: float | None = None
        self._probe_error: str | None = None
        self._dropped: float | None = None  # when an upstream connection was last lost (closed by the other side)
        self._lock = asyncio.Lock()

    def upstream_dropped(self) -> None:
        """An established upstream connection was closed by the upstream or the network, not by us."""
        self._dropped = time.monotonic()

    async def check(self) -> tuple[bool, str | None]:
        """(ready, reason when not)."""
        front = self.front
        if front.draining:
            return False, "draining: the process is stopping"
        if not front.listening:
            return False, "listeners not bound"
        upstream = front.upstream
        now = time.monotonic()
        last_ok = upstream.last_ok
        failures = [t.last_failure for t in upstream.targets if t.last_failure is not None]
        last_failure = max(failures) if failures else None
        dropped = self._dropped
        if last_failure is None or (dropped is not None and dropped > last_failure):
            last_failure = dropped
        if last_ok is not None and now - last_ok <= self.window and (last_failure is None or last_failure < last_ok):
            return True, None
        async with self._lock:
            probed = self._probe_at
            if probed is None or time.monotonic() - probed >= self.probe_interval or (dropped or 0) > probed:
                self._probe_error = await self._probe_any(upstream.targets)
                self._probe_at = time.monotonic()
            error = self._probe_error
        if error is not None:
            return False, f"upstream unreachable: {error}"
        return True, None

    async def _probe_any(self, targets: Sequence[UpstreamTarget]) -> str | None:
        """None when one of the upstreams accepts a TCP connection (answers a CONNECT, if it is known to
        hang), else every reason."""
        reasons = []
        for target in targets:
            error = await (self._probe_connect(target) if target.silent else self._probe(target.host, target.port))
            if error is None:
                return None
            reasons.append(f"{upstream_name(target)}: {error}")
        return "; ".join(reasons)

    async def _probe_connect(self, target: UpstreamTarget) -> str | None:
        """A node that accepted connections but never answered CONNECT (hung): a TCP connect proves nothing, and
        no client may come to find out while /readyz says 503. Ask it with a CONNECT of our own (no credentials,
        an id of its own: any CONNACK, even "not authorized", shows the broker answers)."""
        upstream = self.front.upstream
        context = upstream.context if target.tls else None
        hostname = target.server_hostname if target.tls else None
        connect = encode_connect(Connect(level=4, clean_start=True, keepalive=0,
                                         client_id=f"mqtt-front-readyz-{os.getpid()}-{os.urandom(4).hex()}"))
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, ssl=context, server_hostname=hostname
                )
                try:
                    writer.write(connect)
                    answered = await reader.read(1)
                    if answered:
                        writer.write(b"\xe0\x00")  # DISCONNECT, in case the CONNECT was accepted
                finally:
                    writer.close()
        except TimeoutError:
            return f"accepts connections but did not answer CONNECT within {PROBE_TIMEOUT:g}s"
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        if not answered:
            return "closed the connection without answering CONNECT"
        upstream.answered(target)  # it works again: clients may use it
        return None

    async def _probe(self, host: str, port: int) -> str | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None


class HttpEndpoint:
    """The HTTP handling shared by the per-process endpoint and the workers' aggregator."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        self.server = await asyncio.start_server(
            self._handle, host, port, reuse_address=True, reuse_port=reuse_port or None, limit=MAX_LINE
        )
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    async def start_unix(self, path: str) -> None:
        """A worker's endpoint, read by the parent process that serves metrics.bind."""
        self.server = await asyncio.start_unix_server(self._handle, path, limit=MAX_LINE)

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        raise NotImplementedError

    async def _send(self, writer: asyncio.StreamWriter, method: str, status: int, ctype: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n"
        )
        if status == 405:
            head += "Allow: GET, HEAD\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if method == "HEAD" else body))
        await writer.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    method, path = await self._read_head(reader)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                await self._send(writer, "GET", 400, "application/json", _json({"error": "bad request"}))
                return
            except TimeoutError:
                return
            if method not in ("GET", "HEAD"):
                await self._send(writer, "GET", 405, "application/json", _json({"error": "method not allowed"}))
                return
            status, ctype, body = await self._route(path.split("?", 1)[0])
            await self._send(writer, method, status, ctype, body)
        except (ConnectionError, OSError):
            pass
        except Exception:  # never let one request take the endpoint down
            log.exception("error serving an HTTP request")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        line = await reader.readuntil(b"\n")
        parts = line.decode("latin-1").strip().split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            raise ValueError("bad request line")
        for _ in range(MAX_HEADERS + 1):
            header = await reader.readuntil(b"\n")
            if header in (b"\r\n", b"\n"):
                return parts[0], parts[1]
        raise ValueError("too many headers")


class OpsServer(HttpEndpoint):
    """Serves /metrics, /healthz and /readyz for one front broker process."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        super().__init__()
        self.registry = registry
        self.readiness = readiness

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "application/json", _json({"status": "ok"})
        if path == "/readyz":
            ready, reason = await self.readiness.check()
            if ready:
                return 200, "application/json", _json({"status": "ready"})
            return 503, "application/json", _json({"status": "not ready", "reason": reason})
        return 404, "application/json", _json({"error": "not found"})


def _json(data: dict[str, object]) -> bytes:
    return json.dumps(data).encode() + b"\n"
