"""The cluster-wide per-team connection cap in Redis (issue 14, item 2: ``limits.store``), against a real
redis-server started per test on a free loopback port.

Two ``ClusterCounts`` in one event loop stand for two replicas: they share nothing but Redis. What is shown:
the cap holds over both (also under concurrent takes and while heartbeats rewrite the counts), a release
frees a slot for the other replica, a killed replica stops counting after ``ttl`` and a closed one at once,
a stopped store answers None within the timeout and is logged once (password starred), a store restarted
empty gets the counts back from the heartbeats, and a hung store (SIGSTOP) never holds up a release.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from broker.cluster_store import ClusterCounts
from broker.config import StoreConfig
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, start_redis

PASSWORD = "s3cret-store"
TIMEOUT, HEARTBEAT, TTL = 0.25, 0.2, 1.0
SETTINGS: dict[str, Any] = {"timeout": TIMEOUT, "heartbeat": HEARTBEAT, "ttl": TTL, "key_prefix": "t"}

Make = Callable[..., Awaitable[ClusterCounts]]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis", password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client, to look at what the replicas keep in Redis."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Make]:
    started: list[ClusterCounts] = []

    async def make(name: str, **settings: Any) -> ClusterCounts:
        counts = ClusterCounts(StoreConfig(url=redis_server.url, **{**SETTINGS, **settings}), name)
        await counts.start()
        started.append(counts)
        return counts

    yield make
    for counts in started:
        await counts.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", None) == name]


async def test_two_replicas_share_one_team_cap(replicas: Make, raw: Redis) -> None:
    a, b = await replicas("a"), await replicas("b")
    assert [await a.take("team1", 3), await a.take("team1", 3), await b.take("team1", 3)] == [True, True, True]
    assert await b.take("team1", 3) is False
    assert await a.take("team1", 3) is False
    assert await a.take("team2", 3) is True  # the cap is per team
    assert (a.team_count("team1"), b.team_count("team1")) == (2, 1)
    assert await raw.hgetall("t:conns:a") == {"team1": "2", "team2": "1"}
    assert await raw.hgetall("t:conns:b") == {"team1": "1"}
    assert set(await raw.zrange("t:replicas", 0, -1)) == {"a", "b"}

    a.release("team1")
    assert a.team_count("team1") == 1  # at once; Redis learns it in a's next batch

    async def a_has_one() -> bool:
        return await raw.hget("t:conns:a", "team1") == "1"

    await until(a_has_one, 1.0, "the release reaching Redis")
    assert await b.take("team1", 3) is True  # the slot a freed
    assert await a.take("team1", 3) is False
    assert (a.stats.requests, a.stats.refused, a.stats.errors, a.stats.timeouts) == (5, 2, 0, 0)
    assert (b.stats.requests, b.stats.refused) == (3, 1)


async def test_concurrent_takes_from_both_replicas_never_exceed_the_cap(replicas: Make, raw: Redis) -> None:
    a, b = await replicas("a"), await replicas("b")
    for team in ("x", "y", "z"):
        results = await asyncio.gather(*(replica.take(team, 10) for _ in range(25) for replica in (a, b)))
        assert (results.count(True), results.count(False)) == (10, 40)
        assert a.team_count(team) + b.team_count(team) == 10
        stored = [await raw.hget(f"t:conns:{name}", team) for name in ("a", "b")]
        assert sum(int(value or 0) for value in stored) == 10


async def test_the_cap_holds_while_heartbeats_rewrite_the_counts(replicas: Make, raw: Redis) -> None:
    """Takes and releases on both replicas for several heartbeats (each rewrites the replica's whole hash):
    the connections admitted at any moment never exceed the cap, and Redis ends equal to the local truth."""
    a, b = await replicas("a"), await replicas("b")
    rng = random.Random(14)
    highest = 0
    deadline = time.monotonic() + HEARTBEAT * 4

    async def churn(replica: ClusterCounts) -> None:
        nonlocal highest
        while time.monotonic() < deadline:
            if await replica.take("team1", 5):
                highest = max(highest, a.team_count("team1") + b.team_count("team1"))
            if replica.team_count("team1") and rng.random() < 0.4:
                replica.release("team1")
            await asyncio.sleep(rng.random() * 0.004)

    await asyncio.gather(*(churn(replica) for replica in (a, b, a, b)))
    assert highest == 5  # reached, never passed
    assert a.stats.refused + b.stats.refused > 0

    async def converged() -> bool:
        stored = [int(await raw.hget(f"t:conns:{name}", "team1") or 0) for name in ("a", "b")]
        return stored == [a.team_count("team1"), b.team_count("team1")]

    await until(converged, 1.0, "Redis equal to the local counts")


async def test_a_killed_replica_stops_counting_after_ttl(replicas: Make, raw: Redis) -> None:
    a, b = await replicas("a"), await replicas("b")
    for _ in range(3):
        assert await a.take("team1", 3) is True
    assert a._task is not None
    a._task.cancel()  # as a SIGKILL would: no close, no more heartbeats

    async def b_gets_in() -> bool:
        return await b.take("team1", 3) is True

    assert await b.take("team1", 3) is False  # a's connections still count
    forgotten = await until(b_gets_in, TTL + 1.0, "the killed replica forgotten")
    # Its last batch was at most one heartbeat before the kill: forgotten ttl after it, not before.
    assert TTL - HEARTBEAT - 0.1 <= forgotten <= TTL + 0.5
    assert await raw.exists("t:conns:a") == 0
    assert await raw.zscore("t:replicas", "a") is None


async def test_a_closed_replica_frees_its_slots_at_once(replicas: Make, raw: Redis) -> None:
    a, b = await replicas("a"), await replicas("b")
    for _ in range(3):
        assert await a.take("team1", 3) is True
    assert await b.take("team1", 3) is False
    await a.close()
    assert await b.take("team1", 3) is True
    assert await raw.exists("t:conns:a") == 0
    assert await raw.zscore("t:replicas", "a") is None


async def test_a_stopped_store_answers_none_in_time_logs_once_then_heals(
    replicas: Make, redis_server: RedisServer, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mqtt_front.store")
    a = await replicas("a")
    assert await a.take("team1", 5) is True
    redis_server.stop()

    started = time.perf_counter()
    assert await a.take("team1", 5) is None
    assert time.perf_counter() - started < TIMEOUT + 0.1
    started = time.perf_counter()
    for _ in range(20):
        assert await a.take("team1", 5) is None  # known down: answered at once, no I/O
    assert time.perf_counter() - started < 0.05
    assert not a.available
    a.add("team1")  # on_error: open let one in on the local count
    await asyncio.sleep(HEARTBEAT * 3)  # the heartbeat tries again, and fails, a few times

    unavailable = events(caplog, "store_unavailable")
    assert len(unavailable) == 1
    assert f"url=redis://:***@127.0.0.1:{redis_server.port}/0" in unavailable[0].getMessage()
    assert PASSWORD not in caplog.text
    assert a.stats.errors + a.stats.timeouts == 21

    redis_server.start()  # empty: nothing was saved

    async def restored() -> bool:
        return await raw.hgetall("t:conns:a") == {"team1": "2"}  # the take before and the one let in

    await until(restored, HEARTBEAT * 2 + 1.0, "the counts back in Redis")
    assert a.available
    assert len(events(caplog, "store_recovered")) == 1
    assert await a.take("team1", 2) is False


async def test_a_store_restarted_empty_gets_every_replica_counts_back(
    replicas: Make, redis_server: RedisServer, raw: Redis
) -> None:
    a, b = await replicas("a"), await replicas("b")
    assert [await a.take("team1", 3), await a.take("team1", 3), await b.take("team1", 3)] == [True, True, True]
    redis_server.stop()
    redis_server.start()

    async def restored() -> bool:
        return [await raw.hgetall(f"t:conns:{name}") for name in ("a", "b")] == [{"team1": "2"}, {"team1": "1"}]

    await until(restored, HEARTBEAT * 2 + 1.0, "both replicas' counts back in Redis")
    assert await b.take("team1", 3) is False
    assert await a.take("team1", 3) is False


async def test_the_heartbeat_rewrites_a_count_gone_wrong(replicas: Make, raw: Redis) -> None:
    """A write lost or applied twice (a batch that timed out and still ran) is corrected by the next
    heartbeat, which writes the replica's whole hash from its own counts."""
    a = await replicas("a")
    assert [await a.take("team1", 3), await a.take("team2", 3)] == [True, True]
    await raw.hset("t:conns:a", mapping={"team1": "3", "team3": "1"})
    await raw.hdel("t:conns:a", "team2")

    async def rewritten() -> bool:
        return await raw.hgetall("t:conns:a") == {"team1": "1", "team2": "1"}

    await until(rewritten, HEARTBEAT + 0.5, "the heartbeat's rewrite")
    assert await a.take("team1", 3) is True


async def test_a_lost_registration_is_rewritten_before_the_next_take(replicas: Make, raw: Redis) -> None:
    """Between two heartbeats (a long one here), a take that finds this replica unregistered (the store was
    flushed or restarted) writes its whole count first: the cap still holds."""
    a = await replicas("a", heartbeat=5.0, ttl=10.0)
    assert [await a.take("team1", 3), await a.take("team1", 3)] == [True, True]
    await raw.flushall()
    assert await a.take("team1", 3) is True
    assert await a.take("team1", 3) is False
    assert await raw.hgetall("t:conns:a") == {"team1": "3"}


async def test_a_hung_store_never_holds_up_a_release(replicas: Make, redis_server: RedisServer, raw: Redis) -> None:
    loop = asyncio.get_running_loop()
    a = await replicas("a")
    assert [await a.take("team1", 5), await a.take("team1", 5)] == [True, True]
    redis_server.pause()  # SIGSTOP: connections accepted, nothing answered
    try:
        started = time.perf_counter()
        pending = asyncio.create_task(a.take("team1", 5))
        await asyncio.sleep(0.05)  # its batch is on the wire, unanswered
        before = time.perf_counter()
        a.release("team1")
        assert time.perf_counter() - before < 0.005
        assert a.team_count("team1") == 1
        before = loop.time()
        await asyncio.sleep(0.01)
        assert loop.time() - before < 0.1  # the loop keeps turning
        assert await pending is None
        assert time.perf_counter() - started < TIMEOUT + 0.15
        assert a.stats.timeouts == 1
    finally:
        redis_server.resume()

    async def released() -> bool:
        # The hung batch runs when Redis resumes (its take counted there); the next heartbeat rewrites the truth.
        return await raw.hget("t:conns:a", "team1") == "1"

    await until(released, HEARTBEAT * 3 + 1.0, "the release reaching Redis")


async def test_start_never_raises_and_the_heartbeat_connects_later(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "later", PASSWORD)
    url = f"redis://127.0.0.1:{server.port}/0"  # the password as its own key this time
    counts = ClusterCounts(StoreConfig(url=url, password=PASSWORD, **SETTINGS), "a")
    await counts.start()  # nothing listens yet
    try:
        assert not counts.available
        assert await counts.take("team1", 1) is None
        server.start()

        async def connected() -> bool:
            return counts.available

        await until(connected, HEARTBEAT * 2 + 1.0, "connected by the heartbeat")
        assert await counts.take("team1", 1) is True
        assert await counts.take("team1", 1) is False
    finally:
        await counts.close()
        server.stop()


async def test_rediss_with_a_ca_file(tmp_path: Path, pki: Pki) -> None:
    server = start_redis(tmp_path / "tls", tls=(pki.server_cert, pki.server_key, pki.ca))
    trusted = ClusterCounts(StoreConfig(url=server.url, ca_file=pki.ca, **SETTINGS), "a")
    untrusted = ClusterCounts(StoreConfig(url=server.url, ca_file=pki.other_ca, **SETTINGS), "b")
    try:
        await trusted.start()
        await untrusted.start()  # a certificate it does not trust: unavailable, never raised
        assert trusted.available and not untrusted.available
        assert await trusted.take("team1", 1) is True
        assert await trusted.take("team1", 1) is False
        assert await untrusted.take("team1", 1) is None
    finally:
        await trusted.close()
        await untrusted.close()
        server.stop()
