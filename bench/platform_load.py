"""Load for the platform benchmarks (``bench.platform_cost``): each function runs in a spawned child.

Raw asyncio sockets on uvloop with pre-encoded packets, as in ``bench.loadgen``: an MQTT 5 login storm,
a client timing round trips through the front (it publishes to itself), subscribers whose deliveries
all need a fresh platform check, and a publisher of those deliveries. Every child reports its own CPU
seconds (``/proc/self/stat``) so the parent can tell whether the load generator was the bottleneck.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any

from bench.harness import cpu_seconds
from bench.loadgen import HOST, Target, open_conn, publish_packet, subscribe
from broker.mqtt.packets import Connect, encode_connect


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover
        asyncio.run(coro)


def _my_cpu() -> float:
    return cpu_seconds(os.getpid())


async def _wait(event: Any) -> None:
    while not event.is_set():
        await asyncio.sleep(0.002)


def _varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of the remaining length at ``pos``, or None if incomplete."""
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _packets(buf: bytes) -> tuple[list[tuple[int, int, int]], bytes]:
    """Complete packets in ``buf``: (first byte, body start, end) each, and the bytes left over."""
    out = []
    pos = 0
    while len(buf) - pos >= 2:
        got = _varint(buf, pos + 1)
        if got is None:
            break
        length, body = got
        if len(buf) < body + length:
            break
        out.append((buf[pos], body, body + length))
        pos = body + length
    return out, buf[pos:]


# ------------------------------------------------------------------ login storm (MQTT 5)


def run_storm_v5(port: int, usernames: list[str], passwords: list[str], go: Any, release: Any, result: Any) -> None:
    _run(_storm_v5(port, usernames, passwords, go, release, result))


async def _storm_v5(port: int, usernames: list[str], passwords: list[str], go: Any, release: Any,
                    result: Any) -> None:
    packets = [
        encode_connect(Connect(level=5, clean_start=True, keepalive=600, client_id=f"{u}:n", username=u,
                               password=p.encode()))
        for u, p in zip(usernames, passwords, strict=True)
    ]
    writers: list[asyncio.StreamWriter] = []
    done: list[float] = []
    written: list[float] = []  # when each CONNECT was written
    refused: dict[int, int] = {}
    errors = 0
    result.put("ready")
    await _wait(go)
    cpu0 = _my_cpu()
    start = time.perf_counter()

    async def one(packet: bytes) -> None:
        nonlocal errors
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writers.append(writer)
            writer.write(packet)
            written.append(time.perf_counter())
            buf = b""
            while True:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("closed before CONNACK")
                buf += data
                got, _ = _packets(buf)
                if got:
                    first, body, _end = got[0]
                    if first != 0x20:
                        raise ConnectionError(f"not a CONNACK: {first:#x}")
                    code = buf[body + 1]
                    if code == 0:
                        done.append(time.perf_counter())
                    else:
                        refused[code] = refused.get(code, 0) + 1
                    return
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            errors += 1

    await asyncio.gather(*(one(p) for p in packets))
    cpu = _my_cpu() - cpu0
    result.put({"start": start, "done": done, "written": written, "refused": refused, "errors": errors,
                "cpu": cpu})
    while not release.is_set():
        await asyncio.sleep(0.01)
    for w in writers:
        w.close()
    await asyncio.sleep(0.2)


# ------------------------------------------------------------------ round trips of one client


def run_rtt_client(target: Target, client_id: str, topic: str, rate: float, duration: float, ready: Any,
                   go: Any, result: Any) -> None:
    _run(_rtt_client(target, client_id, topic, rate, duration, ready, go, result))


async def _rtt_client(target: Target, client_id: str, topic: str, rate: float, duration: float, ready: Any,
                      go: Any, result: Any) -> None:
    conn = await open_conn(target, client_id)
    await subscribe(conn, topic, 0)
    latencies: list[int] = []
    pad = b"p" * 56

    async def read_loop() -> None:
        pending = b""
        while True:
            data = await conn.read()
            now = time.perf_counter_ns()
            chunk = pending + data
            got, pending = _packets(chunk)
            for first, _body, end in got:
                if first >> 4 == 3:
                    latencies.append(now - int.from_bytes(chunk[end - 64 : end - 56], "big"))

    task = asyncio.ensure_future(read_loop())
    # Warm the platform's cache (publish, subscribe and delivery checks) and the session's.
    for _ in range(20):
        conn.writer.write(publish_packet(topic, time.perf_counter_ns().to_bytes(8, "big") + pad))
        await asyncio.sleep(0.05)
    latencies.clear()
    ready.set()
    await _wait(go)
    cpu0 = _my_cpu()
    interval = 1.0 / rate
    start = time.monotonic()
    sent = 0
    while sent * interval < duration:
        delay = start + sent * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        conn.writer.write(publish_packet(topic, time.perf_counter_ns().to_bytes(8, "big") + pad))
        sent += 1
    await asyncio.sleep(0.5)  # the last ones come back
    task.cancel()
    result.put({"kind": "rtt", "lat": latencies, "sent": sent, "cpu": _my_cpu() - cpu0})
    conn.close()


# ------------------------------------------------------------------ deliveries that need the platform


def run_cold_subscribers(port: int, usernames: list[str], password: str, filters: list[str], expected: int,
                         ready: Any, go: Any, window: float, result: Any) -> None:
    _run(_cold_subscribers(port, usernames, password, filters, expected, ready, go, window, result))


async def _cold_subscribers(port: int, usernames: list[str], password: str, filters: list[str], expected: int,
                            ready: Any, go: Any, window: float, result: Any) -> None:
    conns = [await open_conn(Target(port, username=u, password=password), f"{u}:c") for u in usernames]
    await asyncio.gather(*(subscribe(c, f, 0) for c, f in zip(conns, filters, strict=True)))
    ready.set()
    await _wait(go)
    t0 = time.perf_counter()
    cpu0 = _my_cpu()
    counts = [0] * len(conns)
    lasts = [0.0] * len(conns)

    async def count(i: int) -> None:
        pending = b""
        conn = conns[i]
        while counts[i] < expected:
            data = await conn.read()
            got, pending = _packets(pending + data)
            n = sum(1 for first, _b, _e in got if first >> 4 == 3)
            if n:
                counts[i] += n
                lasts[i] = time.perf_counter()

    tasks = [asyncio.ensure_future(count(i)) for i in range(len(conns))]
    await asyncio.wait(tasks, timeout=window)
    for t in tasks:
        t.cancel()
    result.put({"kind": "cold", "counts": counts, "lasts": [x - t0 for x in lasts], "cpu": _my_cpu() - cpu0,
                "all_done": all(c >= expected for c in counts)})
    for c in conns:
        c.close()
    await asyncio.sleep(0.2)


def run_publisher_all_topics(target: Target, client_id: str, topics: list[str], count: int, result: Any) -> None:
    _run(_publisher_all_topics(target, client_id, topics, count, result))


async def _publisher_all_topics(target: Target, client_id: str, topics: list[str], count: int, result: Any) -> None:
    """QoS 0 as fast as the socket takes it, cycling through every topic (they must encode to one size).

    ``bench.loadgen.run_publisher`` repeats a block of its first 200 packets, so it uses at most 200 topics.
    """
    conn = await open_conn(target, client_id)
    packets = [publish_packet(t, b"x" * 64) for t in topics]
    size = len(packets[0])
    assert all(len(p) == size for p in packets), "topics must encode to packets of one size"
    batch = 200
    reps = -(-max(batch, len(packets)) // len(packets)) + 1
    ring = b"".join(packets) * reps  # any window of `batch` packets starting at a packet boundary
    start = time.perf_counter()
    sent = 0
    at = 0
    while sent < count:
        n = min(batch, count - sent)
        conn.writer.write(ring[at * size : (at + n) * size])
        at = (at + n) % len(packets)
        sent += n
        await conn.writer.drain()
    await conn.finish()
    result.put({"start": start, "end": time.perf_counter()})


def run_cold_publisher(mosq_port: int, topics: list[str], go: Any, result: Any) -> None:
    _run(_cold_publisher(mosq_port, topics, go, result))


async def _cold_publisher(mosq_port: int, topics: list[str], go: Any, result: Any) -> None:
    """One message per topic, straight into Mosquitto: only the subscribers' delivery checks are cold."""
    conn = await open_conn(Target(mosq_port), f"cold-pub-{os.getpid()}")
    block = b"".join(publish_packet(t, b"c" * 64) for t in topics)
    await _wait(go)
    conn.writer.write(block)
    await conn.finish()
    result.put({"kind": "pub", "sent": len(topics)})
