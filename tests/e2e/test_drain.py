"""The drain (SIGTERM, ``ctl drain``) of an in-process front broker in front of a real Mosquitto: what the
clients wrote is forwarded, acks come before the goodbye, nobody is reset, the will is published as before,
and stuck peers cannot hold the process beyond ``limits.shutdown_timeout``. The real process under SIGTERM
(20 paho clients, ``--workers 2``) is in tests/process/test_drain.py."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from broker.mqtt.packets import PacketType, Will, decode_ack, decode_disconnect, encode_connack
from broker.server import FrontBroker
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect, publish, split_packets, subscribe
from tests.support.ops import get_json
from tests.support.raw_client import RawClient, connect_ok, read_packet

USER = "project:team1:p1"
METRICS = {"bind": "127.0.0.1:0", "ready_window": 30, "probe_interval": 0.2}


async def hand_driven(port: int, v5: bool, client_id: str | None = None) -> RawClient:
    """A client that reads only what the test reads, connected as USER."""
    client = await RawClient.stream(port)
    client.v5 = v5
    client.send(connect(client_id or f"{USER}:{uid()}", USER, PASSWORD, v5=v5, keepalive=30))
    connack = await client.read_packet()
    assert connack[0] == 0x20 and connack[3] == 0, connack
    return client


def disconnect_reason(packet: bytes) -> int:
    assert packet[0] >> 4 == PacketType.DISCONNECT, packet
    return decode_disconnect(packet, 0, len(packet), True).reason_code


def drain_fields(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "drained"]
    fields: dict[str, Any] = record.event_fields  # type: ignore[attr-defined]
    return fields


@pytest.mark.parametrize("v5", VERSIONS)
async def test_what_the_client_wrote_goes_through_and_its_acks_come_first(
    make_front: FrontFactory, mosquitto: Mosquitto, v5: bool
) -> None:
    front: FrontBroker = await make_front()
    topic = f"ff/v1/team1/c/{uid()}"
    watcher = await connect_ok(mosquitto.port, None, v5=True)  # on Mosquitto itself: what got through
    await watcher.subscribe(f"{topic}/#", qos=1)
    client = await hand_driven(front_port(front), v5)
    count = 300
    burst = b"".join(publish(f"{topic}/m", str(i).encode(), v5=v5, qos=1, packet_id=i) for i in range(1, count + 1))
    client.send(burst)  # handed to the socket before the drain starts; the front has read none of it yet
    reading = asyncio.ensure_future(client.read_until_closed())  # it reads (and closes after our FIN) meanwhile
    started = time.monotonic()
    await front.drain(timeout=5)
    took = time.monotonic() - started
    # Every PUBACK, in order, then (v5) DISCONNECT 0x8B, then a close: no reset (read_until_closed raises on one).
    packets = split_packets(await reading)
    acks = [p for p in packets if p[0] >> 4 == PacketType.PUBACK]
    assert [decode_ack(p, 0, len(p), v5).packet_id for p in acks] == list(range(1, count + 1))
    if v5:
        assert packets[-1][0] >> 4 == PacketType.DISCONNECT
        assert disconnect_reason(packets[-1]) == 0x8B
    assert len(packets) == count + (1 if v5 else 0)
    got: set[bytes] = set()
    async with asyncio.timeout(10):
        while len(got) < count:
            got.add((await watcher.next_message()).payload)
    assert got == {str(i).encode() for i in range(1, count + 1)}
    assert took < 2, took  # nothing was stuck: done at the first ticks, not at the deadline
    await watcher.close()


async def test_readyz_503_and_port_closed_while_a_stuck_client_holds_the_drain(
    make_front: FrontFactory, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never reads (a backlog of deliveries fills its socket) cannot keep the process past
    shutdown_timeout; meanwhile /readyz says 503 and the listener refuses new connections."""
    caplog.set_level(logging.INFO, logger="mqtt_front.server")
    front: FrontBroker = await make_front(metrics=METRICS)
    port = front_port(front)
    topic = f"ff/v1/team1/c/{uid()}"
    stuck = await hand_driven(port, True)
    stuck.send(subscribe([(f"{topic}/#", 0)], v5=True))
    assert (await stuck.read_packet())[0] >> 4 == PacketType.SUBACK
    feeder = await connect_ok(mosquitto.port, None, v5=True)
    for _ in range(24):  # 24 MiB: more than the client's and the front's socket buffers hold
        await feeder.publish(f"{topic}/big", b"x" * 1_048_576, qos=1)
    await asyncio.sleep(0.5)
    assert (await get_json(front, "/readyz"))[0] == 200
    timeout = 2.0
    started = time.monotonic()
    drain = asyncio.ensure_future(front.drain(timeout=timeout))
    await asyncio.sleep(0.3)
    code, body = await get_json(front, "/readyz")
    assert code == 503 and body["reason"].startswith("draining"), body
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await drain
    took = time.monotonic() - started
    assert 0.8 * timeout - 0.1 < took < timeout + 0.5, took
    assert not front.connections
    assert drain_fields(caplog)["aborted"] == 1  # its backlog (our goodbye behind it) never went out
    await feeder.close()
    stuck.abort()


class SilentUpstream:
    """An upstream that accepts the CONNECT and then never acknowledges anything, nor closes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_packet(reader)
        writer.write(encode_connack(first[8] == 5 if len(first) > 8 else False, False, 0))
        while data := await reader.read(65536):
            self.received += data
        self.eof.set()  # the front's FIN; this side never answers it
        await asyncio.sleep(3600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_an_upstream_that_never_acks_is_left_at_the_deadline(
    make_front: FrontFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_front.server")
    upstream = SilentUpstream()
    up_port = await upstream.start()
    front: FrontBroker = await make_front(upstream={"url": f"mqtt://127.0.0.1:{up_port}"})
    client = await hand_driven(front_port(front), True)
    client.send(publish("ff/v1/team1/c/x", b"1", v5=True, qos=1, packet_id=1))
    await asyncio.sleep(0.2)
    timeout = 1.5
    reading = asyncio.ensure_future(client.read_until_closed())
    started = time.monotonic()
    await front.drain(timeout=timeout)
    took = time.monotonic() - started
    assert 0.8 * timeout - 0.1 < took < timeout + 0.5, took
    # Told at the forced end (0.8 x timeout), though its message was never acknowledged; then closed cleanly.
    packets = split_packets(await reading)
    assert [disconnect_reason(p) for p in packets] == [0x8B]
    # The upstream got the publish, then DISCONNECT 0x04 (the will stays), then our FIN.
    async with asyncio.timeout(2):
        await upstream.eof.wait()
    up_packets = split_packets(bytes(upstream.received))
    assert [p[0] >> 4 for p in up_packets] == [PacketType.PUBLISH, PacketType.DISCONNECT]
    assert disconnect_reason(up_packets[-1]) == 0x04
    fields = drain_fields(caplog)
    assert fields["forced"] == 1 and fields["aborted"] == 1
    await upstream.stop()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_the_will_is_published_as_before(make_front: FrontFactory, mosquitto: Mosquitto, v5: bool) -> None:
    """MQTT 5 (3.1.2.5): the server closing the connection without the client's DISCONNECT 0x00 publishes
    the will; the drain keeps that (v5: DISCONNECT 0x04 upstream, v3.1.1: a close)."""
    front: FrontBroker = await make_front()
    will_topic = f"ff/v1/team1/c/{uid()}/will"
    watcher = await connect_ok(mosquitto.port, None, v5=True)
    await watcher.subscribe(will_topic, qos=1)
    client = await connect_ok(front_port(front), USER, v5, will=Will(will_topic, b"gone", 1, False))
    await front.drain(timeout=3)
    await client.wait_closed()
    msg = await watcher.next_message()
    assert (msg.topic, msg.payload) == (will_topic, b"gone")
    await watcher.close()
