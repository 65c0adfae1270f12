"""End to end: every malformed input closes the offending connection with the right reason,
and the process keeps serving other clients.

Expected answers:
- an established v5 session: DISCONNECT with the reason (0x81 malformed, 0x82 protocol error,
  0x95 packet too large), then the close; v3.1.1: the close, nothing sent;
- an error inside CONNECT: v5 gets a CONNACK with the reason, v3.1.1 just the close;
- an error before the protocol version is known (framing of the first packet): the close.

After every case, a client that connected before the attack still publishes and receives,
and a new client can connect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import pytest

from broker.mqtt.primitives import encode_varint
from broker.server import FrontBroker
from tests.support.front import PASSWORD, front_port, uid
from tests.support.mqtt_bytes import connect_raw, disconnect, mstr, no_props, pkt, publish_raw, subscribe_raw
from tests.support.raw_client import RawClient

pytestmark = pytest.mark.timeout(20)

USER = "project:team1:p1"
BYSTANDER = "project:team1:p2"
MAX_PACKET = 65536  # limits.max_packet_size of the test front broker
MALFORMED, PROTOCOL_ERROR, TOO_LARGE = 0x81, 0x82, 0x95


# ---------------------------------------------------------------- hand-made packets


def connect(
    v5: bool,
    client_id: bytes | None = None,
    *,
    first: int = 0x10,
    flags: int = 0xC2,  # username, password, clean start
    name: bytes = b"MQTT",
    level: int | None = None,
    tail: bytes | None = None,
) -> bytes:
    """A CONNECT of USER (keep-alive 60 s) with any first byte, flags, protocol name, level or payload ``tail``."""
    if client_id is None:
        client_id = f"{USER}:{uid()}".encode()
    if level is None:
        level = 5 if v5 else 4
    if tail is None:
        tail = mstr(client_id)
        if flags & 0x80:
            tail += mstr(USER)
        if flags & 0x40:
            tail += mstr(PASSWORD)
    return connect_raw(level, flags, 60, no_props(v5), tail, name, first)


def connack(v5: bool, code: int) -> bytes:
    return bytes((0x20, 0x03, 0x00, code, 0x00)) if v5 else bytes((0x20, 0x02, 0x00, code))


# ---------------------------------------------------------------- the bystander


@dataclass
class Bystander:
    client: aiomqtt.Client
    topic: str


@pytest.fixture
async def bystander(front: FrontBroker) -> AsyncIterator[Bystander]:
    """A well-behaved v5 client connected (and subscribed) before the attack."""
    topic = f"ff/v1/team1/c/{uid()}"
    async with aiomqtt.Client(
        "127.0.0.1",
        front_port(front),
        username=BYSTANDER,
        password=PASSWORD,
        identifier=f"{BYSTANDER}:{uid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as c:
        await c.subscribe(f"{topic}/#", qos=1)
        yield Bystander(c, topic)


async def receive_one(c: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for msg in c.messages:
            return msg
    raise AssertionError("message iterator ended")


async def assert_still_serving(front: FrontBroker, bystander: Bystander) -> None:
    """The attacker's connection is gone; the bystander and a brand-new client both work."""
    deadline = time.monotonic() + 3
    while len(front.connections) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(front.connections) == 1, "the attacker's connection is still open in the front broker"
    await bystander.client.publish(f"{bystander.topic}/self", b"still here", qos=1)
    msg = await receive_one(bystander.client)
    assert (msg.topic.value, msg.payload) == (f"{bystander.topic}/self", b"still here")
    async with aiomqtt.Client(
        "127.0.0.1",
        front_port(front),
        username=USER,
        password=PASSWORD,
        identifier=f"{USER}:new-{uid()}",
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as newcomer:
        await newcomer.publish(f"{bystander.topic}/new", b"newcomer", qos=1)
        msg = await receive_one(bystander.client)
        assert (msg.topic.value, msg.payload) == (f"{bystander.topic}/new", b"newcomer")


# ---------------------------------------------------------------- raw connections


async def open_raw(front: FrontBroker) -> RawClient:
    return await RawClient.stream(front_port(front))


async def open_established(front: FrontBroker, v5: bool) -> RawClient:
    raw = await open_raw(front)
    raw.send(connect(v5))
    connack = await raw.read_packet()
    assert connack[0] == 0x20 and connack[3] == 0, f"CONNACK refused: {connack!r}"
    return raw


async def read_until_closed(raw: RawClient, timeout: float = 4.0) -> bytes:
    """What the server sends until it closes (or resets) the connection."""
    return await raw.read_until_closed(timeout, reset_ok=True)


# ---------------------------------------------------------------- packets on an established session

PacketBuilder = Callable[[bool], bytes]

# id -> (packet builder taking v5, v5 DISCONNECT reason; v3.1.1 always gets a silent close)
ESTABLISHED: dict[str, tuple[PacketBuilder, int]] = {
    "remaining-length-over-4-bytes": (lambda v5: b"\x30\xff\xff\xff\xff\x7f", MALFORMED),
    "remaining-length-not-minimal": (lambda v5: b"\xc0\x80\x00", MALFORMED),
    "topic-length-past-packet": (lambda v5: pkt(0x30, b"\x00\x40a/b"), MALFORMED),
    "topic-length-past-packet-qos1": (lambda v5: pkt(0x32, b"\x00\x05a/b"), MALFORMED),
    "filter-length-past-packet": (lambda v5: pkt(0x82, b"\x00\x01" + no_props(v5) + b"\x00\x30a/b\x01"), MALFORMED),
    "packet-id-missing": (lambda v5: pkt(0x32, mstr(b"a/b")), MALFORMED),
    "topic-utf8-surrogate": (lambda v5: publish_raw(b"a/\xed\xa0\x80", v5=v5), MALFORMED),
    "topic-utf8-overlong-nul": (lambda v5: publish_raw(b"a/\xc0\x80", v5=v5), MALFORMED),
    "topic-utf8-invalid-byte": (lambda v5: publish_raw(b"a/\xff", v5=v5), MALFORMED),
    "topic-utf8-truncated": (lambda v5: publish_raw(b"a/\xe2\x82", v5=v5), MALFORMED),
    "topic-u0000": (lambda v5: publish_raw(b"a/\x00b", v5=v5), MALFORMED),
    "filter-utf8-surrogate": (lambda v5: subscribe_raw([(b"a/\xed\xa0\x80", 1)], v5), MALFORMED),
    "filter-utf8-overlong-nul": (lambda v5: subscribe_raw([(b"a/\xc0\x80", 1)], v5), MALFORMED),
    "filter-u0000": (lambda v5: subscribe_raw([(b"a/\x00/#", 1)], v5), MALFORMED),
    "publish-wildcard-plus": (lambda v5: publish_raw(b"a/+", v5=v5), PROTOCOL_ERROR),
    "publish-wildcard-hash": (lambda v5: publish_raw(b"a/#", v5=v5), PROTOCOL_ERROR),
    "publish-wildcard-qos1": (lambda v5: publish_raw(b"a/#", v5=v5, first=0x32, packet_id=1), PROTOCOL_ERROR),
    "filter-hash-not-last": (lambda v5: subscribe_raw([(b"a/#/b", 1)], v5), PROTOCOL_ERROR),
    "filter-hash-not-whole-level": (lambda v5: subscribe_raw([(b"a/b#", 1)], v5), PROTOCOL_ERROR),
    "filter-plus-not-whole-level": (lambda v5: subscribe_raw([(b"a/b+/c", 1)], v5), PROTOCOL_ERROR),
    "filter-plus-prefix": (lambda v5: subscribe_raw([(b"+a", 1)], v5), PROTOCOL_ERROR),
    "publish-qos3": (lambda v5: publish_raw(b"a/b", v5=v5, first=0x36, packet_id=1), MALFORMED),
    # MQTT 5 section 3.8.3.1: subscription QoS 3 is a Protocol Error (v3.1.1: malformed, closed).
    "subscribe-qos3": (lambda v5: subscribe_raw([(b"a/b", 3)], v5), PROTOCOL_ERROR),
    "publish-dup-on-qos0": (lambda v5: publish_raw(b"a/b", v5=v5, first=0x38), MALFORMED),
    "publish-packet-id-0": (lambda v5: publish_raw(b"a/b", v5=v5, first=0x32, packet_id=0), PROTOCOL_ERROR),
    "subscribe-flags-0": (lambda v5: subscribe_raw([(b"a/b", 1)], v5, first=0x80), MALFORMED),
    "unsubscribe-flags-0": (lambda v5: pkt(0xA0, b"\x00\x01" + no_props(v5) + mstr(b"a/b")), MALFORMED),
    "pubrel-flags-0": (lambda v5: pkt(0x60, b"\x00\x01"), MALFORMED),
    "pingreq-with-flags": (lambda v5: b"\xc1\x00", MALFORMED),
    "pingreq-with-body": (lambda v5: b"\xc0\x01\x00", MALFORMED),
    "disconnect-with-flags": (lambda v5: b"\xe2\x00", MALFORMED),
    "reserved-packet-type-0": (lambda v5: b"\x00\x00", MALFORMED),
    "second-connect": (lambda v5: connect(v5), PROTOCOL_ERROR),
    "connack-from-client": (lambda v5: bytes((0x20, 0x03 if v5 else 0x02, 0, 0)) + no_props(v5), PROTOCOL_ERROR),
}


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
@pytest.mark.parametrize("case", list(ESTABLISHED))
async def test_malformed_on_established_session(front: FrontBroker, bystander: Bystander, case: str, v5: bool) -> None:
    build, reason = ESTABLISHED[case]
    raw = await open_established(front, v5)
    raw.send(build(v5))
    data = await read_until_closed(raw)
    raw.abort()
    assert data == (disconnect(True, reason) if v5 else b""), data
    await assert_still_serving(front, bystander)


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
async def test_malformed_after_valid_packets_in_same_write(front: FrontBroker, bystander: Bystander, v5: bool) -> None:
    """The valid packets before the bad one in the same write are still relayed; then the connection ends."""
    raw = await open_established(front, v5)
    topic = f"{bystander.topic}/before".encode()
    raw.send(
        publish_raw(topic, v5=v5) + publish_raw(topic, v5=v5, first=0x32, packet_id=7) + publish_raw(b"a/+", v5=v5)
    )
    data = await read_until_closed(raw)
    raw.abort()
    # The PUBACK for packet 7 may or may not beat the close; the reason code must be last.
    if v5:
        assert data.endswith(disconnect(True, PROTOCOL_ERROR)), data
        assert data in (disconnect(True, PROTOCOL_ERROR), b"\x40\x02\x00\x07" + disconnect(True, PROTOCOL_ERROR))
    else:
        assert data in (b"", b"\x40\x02\x00\x07"), data
    for _ in range(2):
        msg = await receive_one(bystander.client)
        assert (msg.topic.value, msg.payload) == (topic.decode(), b"payload")
    await assert_still_serving(front, bystander)


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
@pytest.mark.parametrize("case", ["topic-utf8-surrogate", "publish-wildcard-hash", "pingreq-with-flags"])
async def test_malformed_pipelined_behind_connect(
    front: FrontBroker, bystander: Bystander, case: str, v5: bool
) -> None:
    """A bad packet in the same write as CONNECT: the session is set up (CONNACK), then ended for it."""
    build, reason = ESTABLISHED[case]
    raw = await open_raw(front)
    raw.send(connect(v5) + build(v5))
    data = await read_until_closed(raw)
    raw.abort()
    accepted = bytes((0x20, data[1])) + data[2 : 2 + data[1]] if len(data) >= 2 else b""
    assert accepted[:4] == (b"\x20" + bytes((len(accepted) - 2,)) + b"\x00\x00"), data
    assert data[len(accepted) :] == (disconnect(True, reason) if v5 else b""), data
    await assert_still_serving(front, bystander)


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
async def test_publish_over_max_packet_size_refused_from_header(
    front: FrontBroker, bystander: Bystander, v5: bool
) -> None:
    """Only the fixed header is sent: the refusal must not wait for (or buffer) the body."""
    raw = await open_established(front, v5)
    raw.send(b"\x30" + encode_varint(MAX_PACKET + 100))
    data = await read_until_closed(raw)
    raw.abort()
    assert data == (disconnect(True, TOO_LARGE) if v5 else b""), data
    await assert_still_serving(front, bystander)


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
async def test_publish_at_max_packet_size_accepted(front: FrontBroker, bystander: Bystander, v5: bool) -> None:
    """Boundary: a PUBLISH of exactly max_packet_size bytes is relayed."""
    raw = await open_established(front, v5)
    topic = f"{bystander.topic}/big".encode()
    head = mstr(topic) + no_props(v5)
    # total = 1 (type) + 3 (remaining length of 65531) + body
    payload = b"p" * (MAX_PACKET - 4 - len(head))
    big = pkt(0x30, head + payload)
    assert len(big) == MAX_PACKET
    raw.send(big)
    await raw.writer.drain()
    msg = await receive_one(bystander.client)
    assert msg.payload == payload
    raw.send(b"\xe0\x00")  # DISCONNECT (a v5 one with the reason 0x00 left out)
    assert await read_until_closed(raw) == b""
    raw.abort()
    await assert_still_serving(front, bystander)


# ---------------------------------------------------------------- errors inside CONNECT

# id -> (CONNECT builder taking v5, reason for v5's CONNACK; None = closed without answer for both versions)
CONNECT_CASES: dict[str, tuple[PacketBuilder, int | None]] = {
    "remaining-length-over-4-bytes": (lambda v5: b"\x10\xff\xff\xff\xff\x7f", None),
    "connect-over-max-packet-size": (lambda v5: b"\x10" + encode_varint(MAX_PACKET + 100), None),
    "client-id-length-past-packet": (lambda v5: connect(v5, flags=0x02, tail=b"\x00\x40abc"), MALFORMED),
    "client-id-utf8-surrogate": (lambda v5: connect(v5, USER.encode() + b":\xed\xa0\x80"), MALFORMED),
    "client-id-utf8-overlong-nul": (lambda v5: connect(v5, USER.encode() + b":\xc0\x80"), MALFORMED),
    "client-id-u0000": (lambda v5: connect(v5, USER.encode() + b":\x00"), MALFORMED),
    "username-utf8-invalid": (
        lambda v5: connect(v5, flags=0x82, tail=mstr(USER.encode()) + mstr(b"project:\xff")),
        MALFORMED,
    ),
    "connect-reserved-flag": (lambda v5: connect(v5, flags=0xC3), MALFORMED),
    "connect-header-flags": (lambda v5: connect(v5, first=0x11), MALFORMED),
    "will-qos3": (lambda v5: connect(v5, flags=0xDE), MALFORMED),
    "will-retain-without-will": (lambda v5: connect(v5, flags=0xE2), MALFORMED),
    "trailing-bytes": (lambda v5: connect(v5, flags=0x02, tail=mstr(USER.encode()) + b"xx"), MALFORMED),
    "will-topic-wildcard": (
        lambda v5: connect(v5, flags=0x06, tail=mstr(USER.encode()) + no_props(v5) + mstr(b"a/#") + mstr(b"gone")),
        PROTOCOL_ERROR,
    ),
    "first-packet-pingreq": (lambda v5: b"\xc0\x00", None),
    "first-packet-publish": (lambda v5: publish_raw(b"a/b", v5=v5), None),
    "first-packet-subscribe": (lambda v5: subscribe_raw([(b"a/b", 1)], v5), None),
}


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
@pytest.mark.parametrize("case", list(CONNECT_CASES))
async def test_malformed_connect(front: FrontBroker, bystander: Bystander, case: str, v5: bool) -> None:
    build, reason = CONNECT_CASES[case]
    raw = await open_raw(front)
    raw.send(build(v5))
    data = await read_until_closed(raw)
    raw.abort()
    expected = connack(True, reason) if v5 and reason is not None else b""
    assert data == expected, data
    await assert_still_serving(front, bystander)


@pytest.mark.parametrize(
    ("name", "level", "expected"),
    [
        pytest.param(b"MQIsdp", 3, connack(False, 0x01), id="mqisdp-level-3"),
        pytest.param(b"MQTT", 3, connack(False, 0x01), id="mqtt-level-3"),
        pytest.param(b"MQTT", 0x84, connack(False, 0x01), id="bridge-bit-level-4"),
        pytest.param(b"MQTT", 0x85, connack(True, 0x84), id="bridge-bit-level-5"),
        pytest.param(b"MQTT", 6, connack(False, 0x01), id="level-6"),
        pytest.param(b"MQTX", 4, connack(False, 0x01), id="wrong-name-level-4"),
    ],
)
async def test_unsupported_protocol(
    front: FrontBroker, bystander: Bystander, name: bytes, level: int, expected: bytes
) -> None:
    raw = await open_raw(front)
    raw.send(connect(False, name=name, level=level))
    data = await read_until_closed(raw)
    raw.abort()
    assert data == expected, data
    await assert_still_serving(front, bystander)


# ---------------------------------------------------------------- the connect timeout (2 s in the fixture)

TIMEOUT_CASES: dict[str, Callable[[], bytes]] = {
    "nothing-sent": lambda: b"",
    "one-byte": lambda: b"\x10",
    "half-connect-v311": lambda: connect(False)[:12],
    "half-connect-v5": lambda: connect(True)[:12],
    "header-of-large-connect": lambda: b"\x10" + encode_varint(1000),
}


@pytest.mark.parametrize("case", list(TIMEOUT_CASES))
async def test_connect_timeout_closes_silent_clients(front: FrontBroker, bystander: Bystander, case: str) -> None:
    raw = await open_raw(front)
    started = time.monotonic()
    raw.send(TIMEOUT_CASES[case]())
    data = await read_until_closed(raw, timeout=6)
    elapsed = time.monotonic() - started
    raw.abort()
    assert data == b""
    assert 1.5 <= elapsed <= 4.5, f"closed after {elapsed:.2f}s, connect_timeout is 2s"
    await assert_still_serving(front, bystander)


async def test_many_attackers_at_once(front: FrontBroker, bystander: Bystander) -> None:
    """A burst of bad connections of every kind, concurrently: all closed, service intact."""

    async def attack(payload: bytes, established: bool, v5: bool) -> bytes:
        raw = await (open_established(front, v5) if established else open_raw(front))
        raw.send(payload)
        data = await read_until_closed(raw)
        raw.abort()
        return data

    jobs: list[Any] = []
    for v5 in (False, True):
        jobs += [attack(build(v5), True, v5) for build, _ in ESTABLISHED.values()]
        jobs += [attack(build(v5), False, v5) for build, _ in CONNECT_CASES.values()]
    results = await asyncio.gather(*jobs)
    assert len(results) == 2 * (len(ESTABLISHED) + len(CONNECT_CASES))
    await assert_still_serving(front, bystander)
