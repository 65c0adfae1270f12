"""Issue 13, item 1: work budgets, against a real Mosquitto. Each test first builds the packet the finding
used (a CONNECT packed with User Properties, a SUBSCRIBE of many filters, an alias for a 65 KB topic) and
checks the MQTT answer (v5 reason codes), the limit_exceeded log line and mqtt_front_limit_hits_total."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from broker.mqtt.packets import PacketType, Will, decode_connack, decode_disconnect
from broker.mqtt.primitives import encode_varint
from broker.mqtt.properties import Prop
from broker.mqtt.reasons import DisconnectReason
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.mqtt_bytes import connect, mstr, pkt, publish, subscribe_raw
from tests.support.ops import Scrape
from tests.support.raw_client import RawClient, connect_ok, read_until_closed

T = "ff/v1/team1/c"  # a topic tree project:team1:p1 may publish and subscribe to (flowfuse preset)
USER = "project:team1:p1"
LIMITS: dict[str, Any] = {"max_packet_size": 1_048_576, "connect_timeout": 5}


def hits(front: Any, limit: str) -> float:
    return Scrape(generate_latest(front.metrics.registry).decode()).get("mqtt_front_limit_hits_total", limit=limit)


def user_props(n: int, size: int = 0) -> dict[int, Any]:
    return {Prop.USER_PROPERTY: [("k" * size, "") for _ in range(n)]}


async def closed_with(client: RawClient, v5: bool, reason: int) -> None:
    """A v5 client gets DISCONNECT ``reason``, then the close; a v3.1.1 client just the close."""
    if v5:
        packet = await client.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == reason
    await client.wait_closed()


async def refused_connect(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = await read_until_closed(reader, timeout=5.0, reset_ok=True)
    writer.close()
    return got


# ---------------------------------------------------------------- before authentication


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_connect_over_max_connect_size_is_refused_from_its_header(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits={**LIMITS, "max_connect_size": 4096})
    port = front_port(front)
    big = connect(f"{USER}:{uid()}", USER, "p" * 8000, v5=v5)
    # Only the first bytes are sent: the refusal comes from the fixed header, before the body is buffered.
    got = await refused_connect(port, big[:64])
    if v5:
        assert decode_connack(got, 0, len(got), True).reason_code == 0x95  # packet too large
    else:
        assert got == b""
    assert hits(front, "connect_size") == 1
    # A real CONNECT with a will and properties fits in the default.
    client = await connect_ok(port, USER, v5, props={Prop.SESSION_EXPIRY_INTERVAL: 60} if v5 else None)
    await client.close()


async def test_a_connect_packed_with_user_properties_costs_at_most_the_cap(
    make_front: FrontFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The finding: ~200,000 empty User Properties in one CONNECT cost ~0.5 s of loop time. Now the decoder
    stops at the first one over the cap (64): CONNACK 0x97, no credentials checked."""
    front = await make_front(limits={**LIMITS, "max_connect_size": 1_048_576})
    port = front_port(front)
    packed = connect("x", None, None, v5=True, props=user_props(200_000))
    assert len(packed) > 800_000
    caplog.set_level(logging.INFO, "mqtt_front.session")
    got = await refused_connect(port, packed)
    assert decode_connack(got, 0, len(got), True).reason_code == 0x97  # quota exceeded
    assert hits(front, "user_properties") == 1
    assert any("limit_exceeded" in r.getMessage() and "user_properties" in r.getMessage() for r in caplog.records)
    # Under the cap is fine.
    client = await connect_ok(port, USER, True, props=user_props(64))
    await client.close()


async def test_a_will_with_too_many_user_properties_is_refused(make_front: FrontFactory) -> None:
    front = await make_front(limits={**LIMITS, "max_user_properties": 4})
    port = front_port(front)
    will = Will(f"{T}/will", b"gone", 0, False, user_props(5))
    got = await refused_connect(port, connect(f"{USER}:{uid()}", USER, PASSWORD, v5=True, will=will))
    assert decode_connack(got, 0, len(got), True).reason_code == 0x97


@pytest.mark.parametrize("v5", VERSIONS)
async def test_packets_pipelined_behind_the_connect_may_be_larger_than_it(make_front: FrontFactory, v5: bool) -> None:
    """The CONNECT's smaller limit is for the CONNECT only: a large PUBLISH sent in the same write (the client
    did not wait for CONNACK) is relayed."""
    front = await make_front(limits={**LIMITS, "max_connect_size": 1024})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", v5)
    await listener.subscribe(f"{T}/#", qos=0)
    client = await RawClient.attach(port, v5)
    payload = b"z" * 200_000
    client.send(connect(f"{USER}:{uid()}", USER, PASSWORD, v5=v5) + publish(f"{T}/big", payload, v5=v5))
    await client.expect(PacketType.CONNACK)
    msg = await listener.next_message()
    assert (msg.topic, msg.payload) == (f"{T}/big", payload)
    await client.close()
    await listener.close()


# ---------------------------------------------------------------- after authentication


async def test_a_publish_with_too_many_user_properties_is_refused_and_not_relayed(make_front: FrontFactory) -> None:
    front = await make_front(limits={**LIMITS, "max_user_properties": 8, "max_user_property_bytes": 1024})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", True)
    await listener.subscribe(f"{T}/#", qos=0)
    ok = await connect_ok(port, USER, True)
    await ok.publish(f"{T}/fine", b"1", props=user_props(8))
    assert (await listener.next_message()).topic == f"{T}/fine"
    ok.send(publish(f"{T}/many", b"2", v5=True, props=user_props(9)))
    await closed_with(ok, True, 0x97)
    bytes_client = await connect_ok(port, USER, True)
    bytes_client.send(publish(f"{T}/large", b"3", v5=True, props={Prop.USER_PROPERTY: [("k" * 600, "v" * 600)]}))
    await closed_with(bytes_client, True, 0x97)
    assert hits(front, "user_properties") == 1
    assert hits(front, "user_property_bytes") == 1
    await ok.close()
    # Nothing of the refused publishes went upstream.
    await listener.publish(f"{T}/end", b"e")
    assert [m.topic for m in await listener.until(f"{T}/end")] == [f"{T}/end"]
    await listener.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("ptype", ["subscribe", "unsubscribe"])
async def test_too_many_filters_in_one_packet_end_the_session(make_front: FrontFactory, v5: bool, ptype: str) -> None:
    """The finding: a SUBSCRIBE of 200,000 one-character filters. Decoding stops at the first over the cap."""
    front = await make_front(limits={**LIMITS, "max_filters_per_packet": 100})
    port = front_port(front)
    client = await connect_ok(port, USER, v5)
    codes = await client.subscribe(*(f"{T}/{i}" for i in range(100)), qos=0)
    assert len(codes) == 100 and all(c == 0 for c in codes)
    filters: list[tuple[str | bytes, int]] = [("a", 0)] * 200_000
    if ptype == "subscribe":
        client.send(subscribe_raw(filters, v5=v5, packet_id=7))
    else:
        body = (7).to_bytes(2, "big") + (b"\x00" if v5 else b"") + b"".join(mstr(f) for f, _ in filters)
        client.send(pkt(0xA2, body))
    await closed_with(client, v5, 0x97)
    assert hits(front, "filters") == 1


@pytest.mark.parametrize("v5", VERSIONS)
async def test_topics_too_long_or_too_deep(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits={**LIMITS, "max_topic_length": 256, "max_topic_levels": 8})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", v5)
    await listener.subscribe(f"{T}/#", qos=0)
    deep_ok = f"{T}/a/b/c/d"  # 8 levels
    client = await connect_ok(port, USER, v5)
    await client.publish(deep_ok, b"ok")
    assert (await listener.next_message()).topic == deep_ok
    client.send(publish(f"{T}/a/b/c/d/e", b"deep", v5=v5))  # 9 levels: Topic Name invalid
    await closed_with(client, v5, DisconnectReason.TOPIC_NAME_INVALID)
    long_client = await connect_ok(port, USER, v5)
    long_client.send(publish(f"{T}/" + "x" * 300, b"long", v5=v5))
    await closed_with(long_client, v5, DisconnectReason.TOPIC_NAME_INVALID)
    sub_client = await connect_ok(port, USER, v5)
    sub_client.send(subscribe_raw([(f"{T}/a/b/c/d/e/#", 0)], v5=v5, packet_id=3))
    await closed_with(sub_client, v5, DisconnectReason.TOPIC_FILTER_INVALID)
    will = Will(f"{T}/" + "w" * 300, b"", 0, False, {})
    got = await refused_connect(port, connect(f"{USER}:{uid()}", USER, PASSWORD, v5=v5, will=will))
    if v5:
        assert decode_connack(got, 0, len(got), True).reason_code == 0x90
    else:
        assert decode_connack(got, 0, len(got), False).reason_code == 0x03  # server unavailable
    assert hits(front, "topic_levels") == 2
    assert hits(front, "topic_length") == 2
    await listener.publish(f"{T}/end", b"e")
    assert [m.topic for m in await listener.until(f"{T}/end")] == [f"{T}/end"]  # nothing refused was relayed
    await listener.close()


async def test_an_alias_for_a_long_topic_is_refused_before_any_amplification(make_front: FrontFactory) -> None:
    """The finding: aliases set to 65 KB topics, then 5,000 alias-only publishes of 8 bytes: 40 kB in, 326 MB
    to the upstream. An alias may now stand for at most max_alias_topic_length bytes."""
    front = await make_front(limits={**LIMITS, "max_topic_length": 65_535, "max_alias_topic_length": 1024})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", True)
    await listener.subscribe(f"{T}/#", qos=0)
    client = await connect_ok(port, USER, True, props={Prop.TOPIC_ALIAS_MAXIMUM: 10})
    short = f"{T}/short"
    client.send(publish(short, b"set", v5=True, props={Prop.TOPIC_ALIAS: 1}))
    client.send(publish("", b"again", v5=True, props={Prop.TOPIC_ALIAS: 1}))
    assert [(m.topic, m.payload) for m in (await listener.next_message(), await listener.next_message())] == [
        (short, b"set"),
        (short, b"again"),
    ]
    long_topic = f"{T}/" + "L" * 65_000
    client.send(publish(long_topic, b"set", v5=True, props={Prop.TOPIC_ALIAS: 2}))
    client.send(b"".join(publish("", b"x", v5=True, props={Prop.TOPIC_ALIAS: 2}) for _ in range(5000)))
    await closed_with(client, True, 0x97)
    assert hits(front, "alias_topic_length") == 1
    stats = front.metrics.closed.teams
    assert sum(s.bytes_in for s in stats.values()) < 100_000  # the 5,000 alias-only publishes were never relayed
    await listener.publish(f"{T}/end", b"e")
    assert [m.topic for m in await listener.until(f"{T}/end")] == [f"{T}/end"]
    await listener.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_burst_over_the_work_budget_is_relayed_whole_and_in_order(make_front: FrontFactory, v5: bool) -> None:
    """One write of 3,000 full-path packets (cold topics, SUBSCRIBEs) is worked through across loop turns:
    nothing is lost or reordered, and the read was paused (work_budget hits) instead of blocking the loop."""
    front = await make_front(limits={**LIMITS, "work_budget": 4096})
    port = front_port(front)
    listener = await connect_ok(port, "project:team1:p2", v5)
    await listener.subscribe(f"{T}/#", qos=0)
    client = await connect_ok(port, USER, v5)
    burst = []
    for i in range(1000):
        burst.append(publish(f"{T}/cold/{i}", str(i).encode(), v5=v5, qos=1, packet_id=i % 60000 + 1))
        burst.append(subscribe_raw([(f"{T}/s/{i}", 0)], v5=v5, packet_id=2001 + i))
        burst.append(publish(f"{T}/cold/{i}", b"again", v5=v5))
    client.send(b"".join(burst))
    got = [m async for m in _messages(listener, 2000)]
    assert [m.topic for m in got[::2]] == [f"{T}/cold/{i}" for i in range(1000)]
    assert [m.payload for m in got[::2]] == [str(i).encode() for i in range(1000)]
    assert hits(front, "work_budget") > 10
    # The client is still connected and served.
    await client.publish(f"{T}/after", b"a", qos=1)
    assert (await listener.next_message()).topic == f"{T}/after"
    await client.close()
    await listener.close()


async def _messages(client: RawClient, n: int) -> Any:
    for _ in range(n):
        yield await client.next_message(timeout=20)


@pytest.mark.parametrize("ptype", [0x40, 0x62, 0xE0])  # PUBACK, PUBREL, DISCONNECT
async def test_acks_and_disconnect_packed_with_user_properties_are_capped_too(
    make_front: FrontFactory, ptype: int
) -> None:
    """Not only PUBLISH and CONNECT: every packet with a property block is decoded within the caps."""
    front = await make_front(limits=LIMITS)
    client = await connect_ok(front_port(front), USER, True)
    props = b"\x26\x00\x00\x00\x00" * 200_000  # empty User Properties
    head = b"\x00" if ptype == 0xE0 else b"\x00\x01\x00"  # DISCONNECT: reason; acks: packet id 1, reason 0
    client.send(pkt(ptype, head + encode_varint(len(props)) + props))
    await closed_with(client, True, 0x97)
    assert hits(front, "user_properties") == 1


async def test_a_second_subscription_identifier_is_refused_before_more_are_built(make_front: FrontFactory) -> None:
    front = await make_front(limits=LIMITS)
    client = await connect_ok(front_port(front), USER, True)
    props = b"\x0b\x01" * 400_000
    client.send(subscribe_raw([(f"{T}/x", 0)], v5=True, packet_id=5, props=encode_varint(len(props)) + props))
    await closed_with(client, True, 0x82)
