"""A lean stand-in for the platform: FlowFuse's EMQX-style endpoints on a bare asyncio protocol (uvloop).

``tests.support.platform.FakePlatform`` (aiohttp, FlowFuse's full semantics, request logs) costs about
0.3 ms of CPU per request: at the 3,200 requests/s that 64 requests in flight answered after 20 ms
ask for, it would need a core of this 2-core machine for itself. This one answers the same requests
for a fraction of that, so the front broker, not the stand-in, is what the platform benchmarks measure:

- ``POST /api/comms/v2/auth`` ``{"username","password","clientId"}``: ``{"result":"allow","is_superuser":
  false,"client_attrs":{"team":""}}`` for a known username with the right password, else ``{"result":"deny"}``;
- ``POST /api/comms/v2/acls`` ``{"username","topic","action"}``: allow for a known username and a topic
  under ``ff/v1/team0/`` (what the benchmarks' project clients use), else deny.

HTTP/1.1 keep-alive with Content-Length bodies only (what httpx and aiohttp send); each answer is written
``delay`` seconds (+- ``jitter``, uniform) after its request arrived. Counts requests and the most in flight
at once, per endpoint.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

ALLOW_AUTH = json.dumps({"result": "allow", "is_superuser": False, "client_attrs": {"team": ""}}).encode()
ALLOW = b'{"result":"allow"}'
DENY = b'{"result":"deny"}'


class Endpoint:
    __slots__ = ("count", "delay", "first", "in_flight", "jitter", "last", "peak")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.jitter = 0.0  # each answer after delay +- up to jitter seconds (uniform), when set
        self.count = self.in_flight = self.peak = 0
        self.first = self.last = 0.0  # perf_counter of the first request and of the last answer since the clear


class LeanPlatform:
    def __init__(self, usernames: list[str], password: str, auth_delay: float, acl_delay: float) -> None:
        self.users = set(usernames)
        self.password = password
        self.auth, self.acl = Endpoint(auth_delay), Endpoint(acl_delay)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    def answer(self, path: bytes, body: bytes) -> tuple[Endpoint | None, bytes, int]:
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        known = data.get("username") in self.users
        if path == b"/api/comms/v2/auth":
            ok = known and data.get("password") == self.password
            return self.auth, ALLOW_AUTH if ok else DENY, 200
        if path == b"/api/comms/v2/acls":
            topic = data.get("topic")
            ok = known and isinstance(topic, str) and topic.startswith("ff/v1/team0/")
            return self.acl, ALLOW if ok else DENY, 200
        return None, b'{"error":"not found"}', 404

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Http(self), "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class _Http(asyncio.Protocol):
    def __init__(self, platform: LeanPlatform) -> None:
        self.platform = platform
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buf[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(buf) < end:
                break
            path = head.split(b" ", 2)[1]
            body = buf[head_end + 4 : end]
            buf = buf[end:]
            self._request(path, body)
        self.buf = buf

    def _request(self, path: bytes, body: bytes) -> None:
        endpoint, answer, status = self.platform.answer(path, body)
        response = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, b"OK" if status == 200 else b"Not Found", len(answer))
        ) + answer
        if endpoint is None:
            self._write(None, response)
            return
        endpoint.count += 1
        if not endpoint.first:
            endpoint.first = time.perf_counter()
        endpoint.in_flight += 1
        endpoint.peak = max(endpoint.peak, endpoint.in_flight)
        delay = endpoint.delay + (random.uniform(-endpoint.jitter, endpoint.jitter) if endpoint.jitter else 0.0)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._write, endpoint, response)
        else:
            self._write(endpoint, response)

    def _write(self, endpoint: Endpoint | None, response: bytes) -> None:
        if endpoint is not None:
            endpoint.in_flight -= 1
            endpoint.last = time.perf_counter()
        if self.transport is not None:
            self.transport.write(response)
