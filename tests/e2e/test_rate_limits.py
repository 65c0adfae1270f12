"""Issue 13, item 2: publish rates per client and per team, and connect rates per source, against a real
Mosquitto. Back-pressure loses nothing (every message arrives, in order, later); another team is not held
up by a throttled one; the disconnect action gives v5 clients 0x96."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from broker.mqtt.packets import PacketType, decode_disconnect
from tests.support.front import VERSIONS, FrontFactory, front_port
from tests.support.mqtt_bytes import publish
from tests.support.ops import Scrape
from tests.support.raw_client import RawClient, connect_ok, read_until_closed

T1, T2 = "ff/v1/team1/c", "ff/v1/team2/c"
LIMITS: dict[str, Any] = {"max_packet_size": 65536, "connect_timeout": 5}


def hits(front: Any, limit: str) -> float:
    return Scrape(generate_latest(front.metrics.registry).decode()).get("mqtt_front_limit_hits_total", limit=limit)


async def collect(client: RawClient, topic: str, n: int, timeout: float = 20) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            msg = await client.next_message(timeout=timeout)
            if msg.topic == topic:
                got.append(msg.payload)
    return got


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_client_over_its_rate_is_slowed_down_and_loses_nothing(make_front: FrontFactory, v5: bool) -> None:
    rate = {"client": {"messages": 100, "messages_burst": 50}}
    front = await make_front(limits={**LIMITS, "publish_rate": rate})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", v5)
    await listener.subscribe(f"{T1}/#", qos=0)
    other_listener = await connect_ok(port, "project:team2:p3", v5)
    await other_listener.subscribe(f"{T2}/#", qos=0)
    storm = await connect_ok(port, "project:team1:p1", v5)
    started = time.monotonic()
    storm.send(b"".join(publish(f"{T1}/storm", str(i).encode(), v5=v5) for i in range(250)))
    # Another team's client publishes while the storm is being held back: it is not throttled behind it.
    other = await connect_ok(port, "project:team2:p3", v5)
    await other.publish(f"{T2}/calm", b"hello", qos=1)
    assert (await other_listener.next_message()).topic == f"{T2}/calm"
    got = await collect(listener, f"{T1}/storm", 250)
    elapsed = time.monotonic() - started
    assert got == [str(i).encode() for i in range(250)]  # all of them, in order: back-pressure, not drops
    assert elapsed >= 1.5  # 50 at once, then 100/s for the other 200: about 2 s
    assert hits(front, "publish_rate") >= 1
    assert not storm.closed.is_set()
    for client in (storm, other, listener, other_listener):
        await client.close()


async def test_the_team_rate_is_shared_by_the_teams_connections(make_front: FrontFactory) -> None:
    rate = {"client": None, "team": {"messages": 100, "messages_burst": 40}}
    front = await make_front(limits={**LIMITS, "publish_rate": rate})
    port = front_port(front)
    listener = await connect_ok(port, "alice@team1", True, client_id="alice@team1")
    await listener.subscribe(f"{T1}/#", qos=0)
    a = await connect_ok(port, "project:team1:p1", True)
    b = await connect_ok(port, "project:team1:p2", True)
    started = time.monotonic()
    a.send(b"".join(publish(f"{T1}/a", str(i).encode(), v5=True) for i in range(100)))
    b.send(b"".join(publish(f"{T1}/b", str(i).encode(), v5=True) for i in range(100)))
    seen: dict[str, int] = {f"{T1}/a": 0, f"{T1}/b": 0}
    async with asyncio.timeout(20):
        while sum(seen.values()) < 200:
            seen[(await listener.next_message()).topic] += 1
    assert time.monotonic() - started >= 1.2  # 200 messages at 100/s shared, 40 of them at once
    assert hits(front, "publish_rate") >= 2
    for client in (a, b, listener):
        await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_the_disconnect_action_says_message_rate_too_high(make_front: FrontFactory, v5: bool) -> None:
    rate = {"client": {"bytes": 10_000, "bytes_burst": 10_000}, "action": "disconnect"}
    front = await make_front(limits={**LIMITS, "publish_rate": rate})
    port = front_port(front)
    client = await connect_ok(port, "project:team1:p1", v5)
    client.send(b"".join(publish(f"{T1}/x", b"p" * 1000, v5=v5) for _ in range(30)))
    if v5:
        packet = await client.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x96
    await client.wait_closed()
    assert hits(front, "publish_rate") == 1


async def test_the_default_client_rate_does_not_slow_ordinary_traffic(make_front: FrontFactory) -> None:
    front = await make_front(limits=LIMITS)  # publish_rate left at its default (10,000/s, burst 20,000)
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", True)
    await listener.subscribe(f"{T1}/#", qos=0)
    client = await connect_ok(port, "project:team1:p1", True)
    client.send(b"".join(publish(f"{T1}/n", str(i).encode(), v5=True) for i in range(2000)))
    assert len(await collect(listener, f"{T1}/n", 2000)) == 2000
    assert hits(front, "publish_rate") == 0
    await client.close()
    await listener.close()


async def test_connect_rate_per_source(make_front: FrontFactory) -> None:
    front = await make_front(limits={**LIMITS, "connect_rate": {"per_source": 2, "burst": 5}})
    port = front_port(front)
    held = [await connect_ok(port, "project:team1:p1", True) for _ in range(5)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_until_closed(reader, timeout=3.0) == b""  # refused at accept, before any CONNECT
    writer.close()
    assert hits(front, "connect_rate") == 1
    await asyncio.sleep(0.6)  # one token back (2/s)
    again = await connect_ok(port, "project:team1:p1", True)
    for client in [*held, again]:
        await client.close()
