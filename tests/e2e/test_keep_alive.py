"""Issue 13, item 4: the front broker enforces 1.5 x the keep-alive itself, in front of an upstream that
does not (a minimal broker written here: it answers CONNECT and PINGREQ and nothing else)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.mqtt.framer import Framer
from broker.mqtt.packets import Connect, PacketType, decode_disconnect, encode_connack, encode_connect
from broker.mqtt.properties import Prop
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.raw_client import RawClient


class LaxBroker:
    """Answers CONNECT (with ``server_keep_alive`` in a v5 CONNACK when set) and PINGREQ; never times out."""

    def __init__(self, server_keep_alive: int | None = None) -> None:
        self.server_keep_alive = server_keep_alive
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = Framer()
        v5 = True
        try:
            while data := await reader.read(65536):
                chunk, ends = framer.feed(data)
                start = 0
                for end in ends:
                    ptype = chunk[start] >> 4
                    if ptype == PacketType.CONNECT:
                        v5 = chunk[start + 8] == 5  # protocol level after "\x00\x04MQTT"
                        props: dict[int, Any] = {}
                        if v5 and self.server_keep_alive:
                            props[Prop.SERVER_KEEP_ALIVE] = self.server_keep_alive
                        writer.write(encode_connack(v5, False, 0, props if v5 else None))
                    elif ptype == PacketType.PINGREQ:
                        writer.write(b"\xd0\x00")
                    start = end
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def lax() -> AsyncIterator[LaxBroker]:
    broker = LaxBroker()
    yield broker
    await broker.stop()


async def silent_client(port: int, v5: bool, keepalive: int) -> tuple[RawClient, float]:
    client = await RawClient.attach(port, v5)
    cid = f"project:team1:p1:{uid()}"
    client.send(
        encode_connect(
            Connect(5 if v5 else 4, True, keepalive, cid, username="project:team1:p1", password=PASSWORD.encode())
        )
    )
    await client.expect(PacketType.CONNACK)
    return client, time.monotonic()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_silent_client_is_ended_after_one_and_a_half_keep_alives(
    make_front: FrontFactory, lax: LaxBroker, v5: bool
) -> None:
    front = await make_front(upstream={"url": f"mqtt://127.0.0.1:{await lax.start()}"})
    client, since = await silent_client(front_port(front), v5, keepalive=1)
    if v5:
        packet = await client.expect(PacketType.DISCONNECT, timeout=5)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x8D
    await client.wait_closed(timeout=5)
    waited = time.monotonic() - since
    assert 1.5 <= waited < 2.8, waited  # 1.5 x 1 s, plus at most one sweep (0.5 s) and scheduling


async def test_a_client_that_pings_stays(make_front: FrontFactory, lax: LaxBroker) -> None:
    front = await make_front(upstream={"url": f"mqtt://127.0.0.1:{await lax.start()}"})
    client, _ = await silent_client(front_port(front), True, keepalive=1)
    for _ in range(8):  # 3.2 s, more than twice 1.5 x the keep-alive
        await asyncio.sleep(0.4)
        client.send(b"\xc0\x00")  # PINGREQ
    assert not client.closed.is_set()
    await client.close()


async def test_the_servers_keep_alive_wins(make_front: FrontFactory) -> None:
    broker = LaxBroker(server_keep_alive=1)
    try:
        front = await make_front(upstream={"url": f"mqtt://127.0.0.1:{await broker.start()}"})
        client, since = await silent_client(front_port(front), True, keepalive=600)
        packet = await client.expect(PacketType.DISCONNECT, timeout=5)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x8D
        assert time.monotonic() - since < 2.8
    finally:
        await broker.stop()


async def test_keep_alive_zero_means_no_limit(make_front: FrontFactory, lax: LaxBroker) -> None:
    front = await make_front(upstream={"url": f"mqtt://127.0.0.1:{await lax.start()}"})
    client, _ = await silent_client(front_port(front), True, keepalive=0)
    await asyncio.sleep(2.0)
    assert not client.closed.is_set()
    await client.close()
