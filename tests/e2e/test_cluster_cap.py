"""Issue 14, item 2: ``limits.store`` wired into admission. Two front brokers (standing in for two replicas)
share one team cap through a real redis-server, in front of a real Mosquitto; a store that is down refuses
team connections (on_error: closed, CONNACK 0x88 / 0x03) or lets them in on the local count (open)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from broker.server import FrontBroker
from broker.session import Authenticate
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port
from tests.support.ops import Scrape
from tests.support.raw_client import RawClient
from tests.support.redis_server import RedisServer, start_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis", password="store-secret")
    yield server
    server.stop()


def limits(redis: RedisServer, cap: int, on_error: str = "closed") -> dict[str, Any]:
    store = {"url": redis.url, "on_error": on_error, "timeout": 0.5, "heartbeat": 0.5, "ttl": 3.0}
    return {"max_packet_size": 65536, "connect_timeout": 5, "max_connections_per_team": cap, "store": store}


async def open_client(front: FrontBroker, username: str, tag: str, v5: bool = True) -> tuple[RawClient, int]:
    client, code, _ = await RawClient.open(front_port(front), username, v5=v5, client_id=f"{username}:{tag}")
    return client, code


async def admitted_soon(front: FrontBroker, username: str, tag: str, v5: bool) -> RawClient:
    """Log in until the front admits the client (a slot freed on another replica reaches the store)."""
    async with asyncio.timeout(5):
        while True:
            client, code = await open_client(front, username, tag, v5)
            if code == 0:
                return client
            await client.close()
            await asyncio.sleep(0.05)


def store_metrics(front: FrontBroker) -> Scrape:
    return Scrape(generate_latest(front.metrics.registry).decode())


@pytest.mark.parametrize("v5", VERSIONS)
async def test_two_replicas_share_the_team_cap(make_front: FrontFactory, redis_server: RedisServer, v5: bool) -> None:
    one = await make_front(limits=limits(redis_server, 2))
    two = await make_front(limits=limits(redis_server, 2))
    a, code_a = await open_client(one, "project:team1:p1", "a", v5)
    b, code_b = await open_client(two, "project:team1:p1", "b", v5)
    assert (code_a, code_b) == (0, 0)
    # Each replica has one team1 connection, below a per-replica cap of 2: the store says the team is full.
    c, code_c = await open_client(one, "project:team1:p1", "c", v5)
    d, code_d = await open_client(two, "project:team1:p1", "d", v5)
    assert (code_c, code_d) == ((0x97, 0x97) if v5 else (0x03, 0x03))
    other, code = await open_client(two, "project:team2:p3", "e", v5)
    assert code == 0  # another team has its own count
    await a.close()
    again = await admitted_soon(two, "project:team1:p1", "f", v5)  # a disconnect on one replica frees the slot
    assert one.admission.team_connections("team1") == 0 and two.admission.team_connections("team1") == 2
    metrics = store_metrics(one)
    assert metrics.get("mqtt_front_store_takes_total", result="ok") == 1
    assert metrics.get("mqtt_front_store_takes_total", result="refused") == 1
    assert metrics.get("mqtt_front_store_up") == 1
    for client in (b, c, d, other, again):
        await client.close()


async def test_a_store_that_is_down_refuses_team_logins_when_closed(
    make_front: FrontFactory, redis_server: RedisServer
) -> None:
    front = await make_front(limits=limits(redis_server, 5, "closed"))
    held, code = await open_client(front, "project:team1:p1", "a")
    assert code == 0
    redis_server.stop()
    v5, v5_code = await open_client(front, "project:team1:p1", "b", True)
    v3, v3_code = await open_client(front, "project:team1:p1", "c", False)
    assert (v5_code, v3_code) == (0x88, 0x03)  # server unavailable: fail closed
    assert front.admission.team_connections("team1") == 1  # the refused ones left no local count behind
    metrics = store_metrics(front)
    assert metrics.get("mqtt_front_store_up") == 0
    assert metrics.get("mqtt_front_store_takes_total", result="error") + metrics.get(
        "mqtt_front_store_takes_total", result="timeout"
    ) == 2
    assert not held.closed.is_set()  # connected clients stay
    for client in (held, v5, v3):
        await client.close()


async def test_a_store_that_is_down_lets_team_logins_in_when_open(
    make_front: FrontFactory, redis_server: RedisServer
) -> None:
    front = await make_front(limits=limits(redis_server, 2, "open"))
    redis_server.stop()
    a, code_a = await open_client(front, "project:team1:p1", "a")
    b, code_b = await open_client(front, "project:team1:p1", "b")
    c, code_c = await open_client(front, "project:team1:p1", "c")
    assert (code_a, code_b, code_c) == (0, 0, 0x97)  # in on this replica's own count, which still caps
    for client in (a, b, c):
        await client.close()


async def test_a_login_cancelled_while_the_store_is_asked_gives_its_slot_back(
    make_front: FrontFactory, redis_server: RedisServer
) -> None:
    """A login whose task is cancelled meanwhile (its connection shut down, the process stopping) while the
    store is asked: the local team slot it took goes back (it leaked: the team was locked out)."""
    config = limits(redis_server, 1)
    config["store"]["timeout"] = 5.0
    front = await make_front(limits=config)
    redis_server.pause()  # the store hangs: the take waits
    try:
        request = Authenticate("project:team1:p1", PASSWORD.encode(), "project:team1:p1:gone")
        login = asyncio.ensure_future(front.admission.admit(request, "mqtt", None, "127.0.0.1:1"))
        await asyncio.sleep(0.3)
        assert front.admission.team_connections("team1") == 1 and not login.done()
        login.cancel()
        with pytest.raises(asyncio.CancelledError):
            await login
        assert front.admission.team_connections("team1") == 0
    finally:
        redis_server.resume()
    client, code = await open_client(front, "project:team1:p1", "after")
    assert code == 0  # the team's cap of 1 is free
    await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_cap_set_by_a_reload_counts_the_connections_admitted_before_it(
    make_front: FrontFactory, redis_server: RedisServer, v5: bool
) -> None:
    """limits.store with no max_connections_per_team, then a reload sets one: the team's connections
    admitted before the cap count against it over all replicas (they were never counted in the store, so
    another replica let the team past its new cap)."""
    uncapped = limits(redis_server, 1)
    uncapped["max_connections_per_team"] = None
    one = await make_front(limits=uncapped)
    two = await make_front(limits=uncapped)
    a, code_a = await open_client(one, "project:team1:p1", "a", v5)
    b, code_b = await open_client(one, "project:team1:p1", "b", v5)
    assert (code_a, code_b) == (0, 0)
    for front in (one, two):
        front.admission.max_per_team = 2  # what a reload's swap sets (broker.control.Control._swap)
    c, code_c = await open_client(two, "project:team1:p1", "c", v5)
    assert code_c == (0x97 if v5 else 0x03)  # team1 has its 2 connections on the first replica
    await a.close()
    d = await admitted_soon(two, "project:team1:p1", "d", v5)  # a release is counted too: the slot is free again
    for client in (b, c, d):
        await client.close()
