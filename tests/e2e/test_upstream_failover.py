"""Several upstreams: failover in order, round robin, unreachable upstreams are "server unavailable"
(never a hang). The `upstream` configuration rules: tests/unit/test_upstream_config.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.server import FrontBroker
from tests.support.front import VERSIONS, connack_code, front_port, uid
from tests.support.mosquitto import Mosquitto, mosquitto_log, mqtts, start_mosquitto, start_tls_mosquitto
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.raw_client import RawClient, connect_ok


@pytest.fixture(scope="module")
def second_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto-b"))
    yield broker
    broker.stop()


def dead_url(scheme: str = "mqtt") -> str:
    return f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


async def round_trip(port: int, v5: bool) -> None:
    sub = await connect_ok(port, "project:team1:p1", v5)
    pub = await connect_ok(port, "project:team1:p2", v5)
    topic = f"ff/v1/team1/p/p1/in/{uid()}"
    assert await sub.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
    assert await pub.publish(topic, b"hello", qos=1) == 0
    assert (await sub.next_message()).topic == topic
    await pub.disconnect()
    await sub.disconnect()


def upstream_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mqtt_front.upstream"]


# -- plain upstreams, one or several ------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("form", ["url", "urls"])
async def test_plain_upstream_as_url_or_single_element_list(
    make_front: Any, mosquitto: Mosquitto, v5: bool, form: str
) -> None:
    upstream = {"url": mosquitto.url} if form == "url" else {"urls": [mosquitto.url]}
    front: FrontBroker = await make_front(upstream=upstream)
    await round_trip(front_port(front), v5)
    assert [t.tls for t in front.upstream.targets] == [False]


async def test_failover_to_the_second_upstream(
    make_front: Any, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    dead = dead_url()
    front: FrontBroker = await make_front(upstream={"urls": [dead, mosquitto.url]})
    first, second = front.upstream.targets
    with caplog.at_level(logging.INFO):
        await round_trip(front_port(front), True)
    assert first.failures == 1  # tried once; then it is tried last for a while
    assert second.last_ok is not None and second.failures == 0
    lines = upstream_lines(caplog)
    assert any(f"upstream={dead}" in m and "connection refused" in m and "trying the next upstream" in m
               for m in lines), lines
    # The dead upstream comes back: it is first in the list again once its retry delay passes.
    first.last_failure = time.monotonic() - 60
    assert front.upstream.order() == [first, second]


async def test_failover_skips_an_upstream_with_a_bad_certificate(
    make_front: Any, pki: Pki, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    expired = start_tls_mosquitto(tmp_path_factory.mktemp("expired"), pki, expired=True)
    good = start_tls_mosquitto(tmp_path_factory.mktemp("good"), pki)
    try:
        upstream = {"urls": [mqtts(expired), mqtts(good)], "tls": {"ca": str(pki.ca)}}
        with caplog.at_level(logging.INFO):
            front: FrontBroker = await make_front(upstream=upstream)
            await round_trip(front_port(front), False)
        assert any(f"upstream={mqtts(expired)}" in m and "certificate has expired" in m for m in upstream_lines(caplog))
        assert front.upstream.targets[1].handshakes >= 2
    finally:
        expired.stop()
        good.stop()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_no_upstream_reachable_is_server_unavailable(
    make_front: Any, v5: bool, caplog: pytest.LogCaptureFixture
) -> None:
    front: FrontBroker = await make_front(upstream={"urls": [dead_url(), dead_url()], "connect_timeout": 1})
    with caplog.at_level(logging.INFO):
        async with asyncio.timeout(5):
            client, code, _ = await RawClient.open(front_port(front), "project:team1:p1", v5=v5)
            await client.wait_closed()
    assert code == connack_code(v5, v5_code=0x88, v3_code=0x03)
    assert [t.failures for t in front.upstream.targets] == [1, 1]
    assert front.upstream.failures == 1
    assert any("no upstream available" in m for m in upstream_lines(caplog))


async def test_silent_tls_upstream_times_out(make_front: Any, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A TCP peer that accepts and never answers the ClientHello: the connect timeout applies."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"mqtts://127.0.0.1:{port}"
        front: FrontBroker = await make_front(
            upstream={"url": url, "connect_timeout": 0.5, "tls": {"ca": str(pki.ca)}}
        )
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            client, code, _ = await RawClient.open(front_port(front), "project:team1:p1", v5=True)
        assert code == 0x88 and 0.4 < time.monotonic() - started < 3
        await client.close()
        assert accepted and any(f"upstream={url}" in m and "timed out" in m for m in upstream_lines(caplog))
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_upstream_that_never_answers_connect_times_out(make_front: Any, v5: bool) -> None:
    """A plain upstream that accepts TCP and swallows CONNECT: the client gets server unavailable, not a hang."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        front: FrontBroker = await make_front(upstream={"url": f"mqtt://127.0.0.1:{port}", "connect_timeout": 0.5})
        started = time.monotonic()
        client, code, _ = await RawClient.open(front_port(front), "project:team1:p1", v5=v5)
        assert code == connack_code(v5, v5_code=0x88, v3_code=0x03)
        assert accepted and 0.4 < time.monotonic() - started < 3
        await client.close()
        async with asyncio.timeout(3):
            while front.connections:
                await asyncio.sleep(0.05)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_round_robin_spreads_connections(
    make_front: Any, mosquitto: Mosquitto, second_mosquitto: Mosquitto
) -> None:
    front: FrontBroker = await make_front(
        upstream={"urls": [mosquitto.url, second_mosquitto.url], "strategy": "round_robin"}
    )
    port = front_port(front)
    marker = uid()
    clients = [await connect_ok(port, "project:team1:p1", True, client_id=f"project:team1:p1:{marker}-{i}")
               for i in range(4)]
    assert [t.open for t in front.upstream.targets] == [2, 2]
    for broker in (mosquitto, second_mosquitto):
        assert mosquitto_log(broker).count(f"as project:team1:p1:{marker}-") == 2
    for client in clients:
        await client.disconnect()
    async with asyncio.timeout(5):
        while front.upstream.open:
            await asyncio.sleep(0.02)
    assert [t.open for t in front.upstream.targets] == [0, 0]
