"""Hostile sequences that once hurt the process, and a well-behaved client that must not notice.

- a client that never reads while the front broker answers it itself (PUBACK 0x87 for refused
  publishes, WebSocket pongs) grew its write buffer without bound: it is no longer read while
  its write buffer is full;
- 1,024 distinct long allowed topics pinned ~64 MB per cache and session (raw-topic caches of
  the session, decision caches of the ACL): long topics are not cached.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import pytest

from broker.server import FrontBroker
from tests.support import mqtt_bytes
from tests.support.front import PASSWORD, FrontFactory, front_port, uid
from tests.support.mqtt_bytes import subscribe, ws_client_frame

pytestmark = pytest.mark.timeout(30)

ATTACKER = "project:team1:p1"
BYSTANDER = "project:team1:p2"
WRITE_BUFFER_BOUND = 512 * 1024  # far above the transports' high-water marks (64 KiB)


def connect(user: str, client_id: str | None = None, password: bytes = PASSWORD.encode()) -> bytes:
    return mqtt_bytes.connect(client_id if client_id is not None else f"{user}:{uid()}", user, password, v5=True)


def publish(topic: str, payload: bytes, packet_id: int = 0) -> bytes:
    return mqtt_bytes.publish(topic, payload, v5=True, qos=1 if packet_id else 0, packet_id=packet_id)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    return first, await reader.readexactly(length)


class Bystander:
    """A v5 client connected before the attack, publishing QoS 1 to a topic it subscribed to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, topic: str) -> None:
        self.reader, self.writer, self.topic, self.n = reader, writer, topic, 0

    @classmethod
    async def connect(cls, front: FrontBroker) -> Bystander:
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front))
        writer.write(connect(BYSTANDER))
        first, body = await asyncio.wait_for(read_packet(reader), 5)
        assert first == 0x20 and body[1] == 0, body
        topic = f"ff/v1/team1/c/{uid()}"
        writer.write(subscribe([(topic, 1)], v5=True))
        first, body = await asyncio.wait_for(read_packet(reader), 5)
        assert first == 0x90 and body[-1] == 1, body
        return cls(reader, writer, topic)

    async def check(self) -> None:
        self.n += 1
        payload = f"ping {self.n}".encode()
        self.writer.write(publish(self.topic, payload, self.n))
        got_ack = got_msg = False
        async with asyncio.timeout(5):
            while not (got_ack and got_msg):
                first, body = await read_packet(self.reader)
                if first >> 4 == 4:
                    got_ack = True
                elif first >> 4 == 3:
                    assert body.endswith(payload)
                    got_msg = True
                    pid = body[2 + len(self.topic) : 4 + len(self.topic)]
                    self.writer.write(b"\x40\x02" + pid)

    def close(self) -> None:
        self.writer.transport.abort()


def raw_socket(port: int) -> socket.socket:
    """A blocking client socket with a tiny receive buffer: it never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def flood(sock: socket.socket, chunk: bytes, seconds: float, front: FrontBroker) -> int:
    """Send ``chunk`` over and over without reading; the largest client write buffer seen.

    The attacker must still be connected at the end (the fix throttles it, it does not drop it)."""
    for conn in front.connections:
        if conn.transport is not None and conn.session is not None and conn.session.username == ATTACKER:
            # A small kernel send buffer, so what the front broker holds shows within seconds.
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    deadline = time.monotonic() + seconds
    largest = 0
    pending = memoryview(chunk)
    while time.monotonic() < deadline:
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        pending = pending[sent:] or memoryview(chunk)
        if not sent:
            await asyncio.sleep(0.02)  # the front broker stopped reading us: what the fix is about
        else:
            await asyncio.sleep(0)
        for conn in front.connections:
            if conn.transport is not None:
                largest = max(largest, conn.transport.get_write_buffer_size())
    assert len(front.connections) == 2, "the attacker was disconnected"
    return largest


async def test_never_reading_client_with_refused_qos1_publishes(make_front: FrontFactory) -> None:
    front = await make_front()
    bystander = await Bystander.connect(front)
    sock = raw_socket(front_port(front))
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, connect(ATTACKER))
        await asyncio.sleep(0.3)  # CONNACK (left unread)
        # Another team's topic: every one is answered by the front broker itself (PUBACK 0x87).
        refused = b"".join(publish("ff/v1/team2/p/p3/in/x", b"", i + 1) for i in range(5000))
        largest = await flood(sock, refused, 4.0, front)
        assert largest < WRITE_BUFFER_BOUND, f"client write buffer grew to {largest} bytes"
        await bystander.check()
    finally:
        sock.close()
        bystander.close()


async def test_never_reading_websocket_client_with_ping_flood(make_front: FrontFactory) -> None:
    front = await make_front(
        listeners=[
            {"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"},
            {"name": "ws", "type": "ws", "bind": "127.0.0.1:0", "path": "/mqtt"},
        ]
    )
    bystander = await Bystander.connect(front)
    sock = raw_socket(front_port(front, "ws"))
    loop = asyncio.get_running_loop()
    try:
        key = base64.b64encode(os.urandom(16))
        upgrade = (
            b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
        await loop.sock_sendall(sock, upgrade + ws_client_frame(connect(ATTACKER), 2))
        await asyncio.sleep(0.3)
        pings = ws_client_frame(b"p" * 125, 9) * 2000  # each answered by a 127-byte pong
        largest = await flood(sock, pings, 4.0, front)
        assert largest < WRITE_BUFFER_BOUND, f"client write buffer grew to {largest} bytes"
        await bystander.check()
    finally:
        sock.close()
        bystander.close()


async def test_long_topics_are_not_cached(make_front: FrontFactory) -> None:
    # Topics of 20 KB are allowed here (the default limits.max_topic_length is 4 KiB): is what is cached bounded?
    front = await make_front(limits={"max_packet_size": 65536, "connect_timeout": 2, "max_topic_length": 65535})
    bystander = await Bystander.connect(front)
    reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front))
    try:
        writer.write(connect(ATTACKER))
        first, body = await asyncio.wait_for(read_packet(reader), 5)
        assert first == 0x20 and body[1] == 0
        writer.write(subscribe([("ff/v1/team1/p/p1/out/#", 0)], v5=True))
        first, _ = await asyncio.wait_for(read_packet(reader), 5)
        assert first == 0x90
        base = "ff/v1/team1/p/p1/out/"
        for i in range(50):
            writer.write(publish(f"{base}{i:04d}/" + "x" * 20_000, b""))
        writer.write(publish(base + "short", b"", 1))
        async with asyncio.timeout(10):  # the deliveries come back (so they were checked), then the ack
            while (await read_packet(reader))[0] >> 4 != 4:
                pass
        (conn,) = [c for c in front.connections if c.session is not None and c.session.username == ATTACKER]
        session = conn.session
        assert session is not None
        raw_caches = (session._publish_ok, session._publish_ok_retained, session._receive_ok)
        assert all(len(topic) <= 256 for cache in raw_caches for topic in cache)
        assert (base + "short").encode() in session._publish_ok  # short topics still take the fast path
        policy = session.policy
        acl_caches = (policy._pub_cache, policy._pub_retained_cache, policy._recv_cache)
        assert all(len(topic) <= 256 for cache in acl_caches for topic in cache)
        await bystander.check()
    finally:
        writer.transport.abort()
        bystander.close()
