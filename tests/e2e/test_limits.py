"""limits.max_connections and limits.max_connections_per_team against a real Mosquitto."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bcrypt
import pytest
import yaml
from prometheus_client.exposition import generate_latest

from tests.support.front import PASSWORD, VERSIONS, FrontFactory, connack_code, front_port
from tests.support.ops import Scrape
from tests.support.raw_client import RawClient, read_until_closed


async def gone(front: object, count: int) -> None:
    """Wait until the front broker holds ``count`` connections (closing is asynchronous)."""
    async with asyncio.timeout(5):
        while len(front.connections) != count:  # type: ignore[attr-defined]
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_team_connection_cap(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits={"max_connections_per_team": 2})
    port = front_port(front)
    first, code1, _ = await RawClient.open(port, "project:team1:p1", v5=v5, client_id="project:team1:p1:a")
    second, code2, _ = await RawClient.open(port, "project:team1:p2", v5=v5, client_id="project:team1:p2:a")
    assert (code1, code2) == (0, 0)
    third, code3, _ = await RawClient.open(port, "alice@team1", v5=v5, client_id="alice@team1")
    assert code3 == connack_code(v5, v5_code=0x97, v3_code=0x03)  # quota exceeded / server unavailable
    await third.close()
    other, code4, _ = await RawClient.open(port, "project:team2:p3", v5=v5, client_id="project:team2:p3:a")
    assert code4 == 0  # another team has its own count
    await first.close()
    await gone(front, 2)
    again, code5, _ = await RawClient.open(port, "alice@team1", v5=v5, client_id="alice@team1")
    assert code5 == 0  # the freed slot is usable
    for client in (second, other, again):
        await client.close()
    await gone(front, 0)
    assert front.admission.team_connections("team1") == 0
    assert front.admission.team_connections("team2") == 0
    metrics = Scrape(generate_latest(front.metrics.registry).decode())
    assert metrics.get("mqtt_front_connect_attempts_total", result="limit") == 1


async def test_max_connections_refuses_before_connect(make_front: FrontFactory) -> None:
    front = await make_front(limits={"max_connections": 2})
    port = front_port(front)
    held = [
        await RawClient.open(port, "project:team1:p1", v5=True, client_id=f"project:team1:p1:{i}") for i in range(2)
    ]
    assert [code for _, code, _ in held] == [0, 0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_until_closed(reader, timeout=3.0) == b""  # closed at once, nothing read or sent
    writer.close()
    await held[0][0].close()
    await gone(front, 1)
    client, code, _ = await RawClient.open(port, "project:team1:p1", v5=True, client_id="project:team1:p1:x")
    assert code == 0
    await client.close()
    await held[1][0].close()
    await gone(front, 0)
    metrics = Scrape(generate_latest(front.metrics.registry).decode())
    assert metrics.get("mqtt_front_connect_attempts_total", result="limit") == 1


@pytest.mark.parametrize("v5", VERSIONS)
async def test_password_check_queue_is_bounded(make_front: FrontFactory, tmp_path: Path, v5: bool) -> None:
    """auth.max_pending: connects beyond the queued bcrypt checks get "server busy" at once instead
    of queueing without bound (a connect flood); the queued ones are still checked."""
    slow = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()  # ~0.3 s per check
    users = tmp_path / "users.yaml"
    names = ["project:team1:p1", "project:team1:p2", "project:team1:p3"]
    users.write_text(yaml.safe_dump({"users": [{"username": n, "password_hash": slow} for n in names]}))
    front = await make_front(auth={"users_file": str(users), "max_pending": 1}, limits={"connect_timeout": 10})
    port = front_port(front)
    results = await asyncio.gather(*(RawClient.open(port, n, v5=v5, client_id=n) for n in names))
    codes = sorted(code for _, code, _ in results)
    busy = connack_code(v5, v5_code=0x89, v3_code=0x03)
    assert codes == sorted([0, busy, busy])
    for client, _, _ in results:
        await client.close()
    await gone(front, 0)
    again, code, _ = await RawClient.open(port, names[1], v5=v5, client_id=names[1])  # the queue drained
    assert code == 0
    await again.close()
