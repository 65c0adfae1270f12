"""limits.max_connections and limits.max_connections_per_team against a real Mosquitto."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.exposition import generate_latest

from tests.conftest import FrontFactory, front_port, read_until_closed
from tests.ops_util import Scrape
from tests.test_e2e_isolation import VERSIONS, Raw, connack_code


async def gone(front: object, count: int) -> None:
    """Wait until the front broker holds ``count`` connections (closing is asynchronous)."""
    async with asyncio.timeout(5):
        while len(front.connections) != count:  # type: ignore[attr-defined]
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_team_connection_cap(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits={"max_connections_per_team": 2})
    port = front_port(front)
    first, code1, _ = await Raw.open(port, "project:team1:p1", v5=v5, client_id="project:team1:p1:a")
    second, code2, _ = await Raw.open(port, "project:team1:p2", v5=v5, client_id="project:team1:p2:a")
    assert (code1, code2) == (0, 0)
    third, code3, _ = await Raw.open(port, "alice@team1", v5=v5, client_id="alice@team1")
    assert code3 == connack_code(v5, v5_code=0x97, v3_code=0x03)  # quota exceeded / server unavailable
    await third.close()
    other, code4, _ = await Raw.open(port, "project:team2:p3", v5=v5, client_id="project:team2:p3:a")
    assert code4 == 0  # another team has its own count
    await first.close()
    await gone(front, 2)
    again, code5, _ = await Raw.open(port, "alice@team1", v5=v5, client_id="alice@team1")
    assert code5 == 0  # the freed slot is usable
    for client in (second, other, again):
        await client.close()
    await gone(front, 0)
    assert front.team_connections == {}
    metrics = Scrape(generate_latest(front.metrics.registry).decode())
    assert metrics.get("mqtt_front_connect_attempts_total", result="limit") == 1


async def test_max_connections_refuses_before_connect(make_front: FrontFactory) -> None:
    front = await make_front(limits={"max_connections": 2})
    port = front_port(front)
    held = [await Raw.open(port, "project:team1:p1", v5=True, client_id=f"project:team1:p1:{i}") for i in range(2)]
    assert [code for _, code, _ in held] == [0, 0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_until_closed(reader) == b""  # closed at once, nothing read or sent
    writer.close()
    await held[0][0].close()
    await gone(front, 1)
    client, code, _ = await Raw.open(port, "project:team1:p1", v5=True, client_id="project:team1:p1:x")
    assert code == 0
    await client.close()
    await held[1][0].close()
    await gone(front, 0)
    metrics = Scrape(generate_latest(front.metrics.registry).decode())
    assert metrics.get("mqtt_front_connect_attempts_total", result="limit") == 1
