"""A load generator that is not the bottleneck: pre-encoded packets over raw asyncio sockets.

WebSocket clients send one MQTT packet per binary frame, as MQTT.js does, with an all-zero
mask key (legal, and it leaves the pre-encoded payload unchanged). Every function here runs
in a child process and returns plain data.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from dataclasses import dataclass

from broker.mqtt.packets import Connect, Subscribe, encode_connect, encode_publish, encode_subscribe

HOST = "127.0.0.1"


@dataclass
class Target:
    port: int
    ws: bool = False
    username: str | None = None
    password: str | None = None


def ws_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = bytes((0x82, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", n)
    return head + b"\x00\x00\x00\x00" + payload


class Deframer:
    """Server-to-client WebSocket frames (unmasked) -> the MQTT bytes they carry."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            hdr = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                b1 = struct.unpack_from("!H", buf, pos + 2)[0]
                hdr = 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                b1 = struct.unpack_from("!Q", buf, pos + 2)[0]
                hdr = 10
            if n - pos < hdr + b1:
                break
            opcode = buf[pos] & 0x0F
            if opcode in (0, 2):
                out.append(buf[pos + hdr : pos + hdr + b1])
            pos += hdr + b1
        self.buf = buf[pos:]
        return b"".join(out)


class Conn:
    """One MQTT 3.1.1 client connection, optionally over WebSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ws
        self.deframer = Deframer() if ws else None

    def frame(self, packet: bytes) -> bytes:
        return ws_frame(packet) if self.ws else packet

    async def read(self) -> bytes:
        data = await self.reader.read(1 << 20)
        if not data:
            raise ConnectionError("closed")
        return self.deframer.feed(data) if self.deframer is not None else data

    async def read_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            buf += await self.read()
        return buf

    def close(self) -> None:
        self.writer.close()

    async def finish(self) -> None:
        """DISCONNECT, then wait until every buffered byte has left (closing early would drop them)."""
        self.writer.write(self.frame(b"\xe0\x00"))
        await self.writer.drain()
        self.writer.close()
        await self.writer.wait_closed()


async def open_conn(target: Target, client_id: str, keepalive: int = 600) -> Conn:
    reader, writer = await asyncio.open_connection(HOST, target.port, limit=1 << 22)
    if target.ws:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /mqtt HTTP/1.1\r\nHost: {HOST}:{target.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket upgrade refused: {head[:60]!r}")
    conn = Conn(reader, writer, target.ws)
    connect = Connect(
        level=4,
        clean_start=True,
        keepalive=keepalive,
        client_id=client_id,
        username=target.username,
        password=target.password.encode() if target.password else None,
    )
    writer.write(conn.frame(encode_connect(connect)))
    connack = await conn.read_exactly(4)
    if connack[:2] != b"\x20\x02" or connack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {connack!r}")
    return conn


async def subscribe(conn: Conn, topic_filter: str, qos: int) -> None:
    conn.writer.write(conn.frame(encode_subscribe(Subscribe(1, [(topic_filter, qos)]), False)))
    suback = await conn.read_exactly(5)
    if suback[0] != 0x90 or suback[4] & 0x80:
        raise ConnectionError(f"SUBACK refused: {suback!r}")


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    return encode_publish(qos, False, False, topic, packet_id, None, payload)


# ------------------------------------------------------------------ throughput


def run_subscriber(target: Target, client_id: str, topic_filter: str, qos: int, packet_size: int, count: int,
                   ready: object, result: object, timeout: float) -> None:
    """Count ``count`` messages of a known size; QoS 1 messages are acknowledged."""
    asyncio.run(_subscriber(target, client_id, topic_filter, qos, packet_size, count, ready, result, timeout))


async def _subscriber(target: Target, client_id: str, topic_filter: str, qos: int, packet_size: int, count: int,
                      ready: object, result: object, timeout: float) -> None:
    conn = await open_conn(target, client_id)
    await subscribe(conn, topic_filter, qos)
    ready.set()  # type: ignore[attr-defined]
    got = 0  # messages
    first = last = 0.0
    pending = b""
    deadline = time.monotonic() + timeout
    id_at = packet_size - 64 - 2  # payloads are 64 bytes; the packet id sits just before
    try:
        while got < count:
            data = await asyncio.wait_for(conn.read(), max(0.1, deadline - time.monotonic()))
            now = time.perf_counter()
            if not first:
                first = now
            last = now
            data = pending + data
            whole = len(data) - len(data) % packet_size
            pending = data[whole:]
            got += whole // packet_size
            if qos:
                acks = b"".join(b"\x40\x02" + data[i + id_at : i + id_at + 2] for i in range(0, whole, packet_size))
                if acks:
                    conn.writer.write(conn.frame(acks))
    except (TimeoutError, ConnectionError):
        pass  # reported as fewer messages received
    conn.close()
    result.put({"received": got, "first": first, "last": last})  # type: ignore[attr-defined]


def run_publisher(target: Target, client_id: str, topics: list[str], qos: int, count: int, window: int,
                  result: object) -> None:
    asyncio.run(_publisher(target, client_id, topics, qos, count, window, result))


async def _publisher(target: Target, client_id: str, topics: list[str], qos: int, count: int, window: int,
                     result: object) -> None:
    conn = await open_conn(target, client_id)
    payload = b"x" * 64
    start = time.perf_counter()
    if qos == 0:
        packets = [conn.frame(publish_packet(t, payload)) for t in topics]
        batch = 200
        block = b"".join(packets[i % len(packets)] for i in range(batch))
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            conn.writer.write(block if n == batch else block[: n * len(packets[0])])
            sent += n
            await conn.writer.drain()
    else:
        # A window of in-flight QoS 1 publishes; each PUBACK releases the next one.
        ids = 1000
        packets = [conn.frame(publish_packet(topics[i % len(topics)], payload, 1, i + 1)) for i in range(ids)]
        first = min(window, count)
        conn.writer.write(b"".join(packets[i % ids] for i in range(first)))
        sent = first
        ack_bytes = acked = 0
        while acked < count:
            ack_bytes += len(await conn.read())  # PUBACKs are 4 bytes each
            k = ack_bytes // 4 - acked
            acked += k
            n = min(k, count - sent)
            if n > 0:
                conn.writer.write(b"".join(packets[(sent + i) % ids] for i in range(n)))
                sent += n
    await conn.finish()
    end = time.perf_counter()
    result.put({"start": start, "end": end})  # type: ignore[attr-defined]


# ------------------------------------------------------------------ fan-in latency


def run_fanin_subscriber(target: Target, client_id: str, topic_filter: str, count: int, ready: object,
                         result: object, timeout: float) -> None:
    asyncio.run(_fanin_subscriber(target, client_id, topic_filter, count, ready, result, timeout))


async def _fanin_subscriber(target: Target, client_id: str, topic_filter: str, count: int, ready: object,
                            result: object, timeout: float) -> None:
    conn = await open_conn(target, client_id)
    await subscribe(conn, topic_filter, 0)
    ready.set()  # type: ignore[attr-defined]
    latencies: list[int] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while len(latencies) < count:
            data = await asyncio.wait_for(conn.read(), max(0.1, deadline - time.monotonic()))
            now = time.perf_counter_ns()
            buf += data
            pos = 0
            while len(buf) - pos >= 2:
                rl = buf[pos + 1]
                if len(buf) - pos < 2 + rl:
                    break
                # payload = 8-byte send time + padding; it ends the packet
                sent = int.from_bytes(buf[pos + 2 + rl - 64 : pos + 2 + rl - 56], "big")
                latencies.append(now - sent)
                pos += 2 + rl
            buf = buf[pos:]
    except (TimeoutError, ConnectionError):
        pass
    conn.close()
    result.put(latencies)  # type: ignore[attr-defined]


def run_fanin_publishers(target: Target, base_id: str, topic: str, clients: int, rate_each: float,
                         duration: float, go: object, result: object) -> None:
    asyncio.run(_fanin_publishers(target, base_id, topic, clients, rate_each, duration, go, result))


async def _fanin_publishers(target: Target, base_id: str, topic: str, clients: int, rate_each: float,
                            duration: float, go: object, result: object) -> None:
    conns = [await open_conn(target, f"{base_id}{i}") for i in range(clients)]
    result.put("connected")  # type: ignore[attr-defined]
    while not go.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    interval = 1.0 / rate_each
    sent = 0
    pad = b"p" * 56

    async def one(conn: Conn, offset: float) -> None:
        nonlocal sent
        await asyncio.sleep(offset)
        start = time.monotonic()
        k = 0
        while True:
            due = start + k * interval
            if due - start > duration:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            conn.writer.write(conn.frame(publish_packet(topic, time.perf_counter_ns().to_bytes(8, "big") + pad)))
            sent += 1
            k += 1

    await asyncio.gather(*(one(c, i * interval / clients) for i, c in enumerate(conns)))
    await asyncio.gather(*(c.finish() for c in conns))
    result.put(sent)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ connections


def run_idle_clients(target: Target, base_id: str, clients: int, concurrency: int, hold: object,
                     result: object) -> None:
    asyncio.run(_idle_clients(target, base_id, clients, concurrency, hold, result))


async def _idle_clients(target: Target, base_id: str, clients: int, concurrency: int, hold: object,
                        result: object) -> None:
    sem = asyncio.Semaphore(concurrency)
    conns: list[Conn] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            try:
                conns.append(await open_conn(target, f"{base_id}{i}"))
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                errors += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    result.put({"connected": len(conns), "errors": errors})  # type: ignore[attr-defined]
    while not hold.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    for c in conns:
        c.close()
    await asyncio.sleep(0.2)


def run_storm(targets: list[Target], client_ids: list[str], go: object, result: object) -> None:
    asyncio.run(_storm(targets, client_ids, go, result))


async def _storm(targets: list[Target], client_ids: list[str], go: object, result: object) -> None:
    while not go.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.002)
    start = time.perf_counter()
    errors = 0
    done: list[float] = []

    async def one(target: Target, cid: str) -> None:
        nonlocal errors
        try:
            conn = await open_conn(target, cid)
            done.append(time.perf_counter())
            conn.close()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            errors += 1

    await asyncio.gather(*(one(t, c) for t, c in zip(targets, client_ids, strict=True)))
    result.put({"start": start, "done": done, "errors": errors})  # type: ignore[attr-defined]
