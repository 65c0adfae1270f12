"""End to end: QoS flows, retained and will messages, persistent sessions and v5 properties
behave through the front broker exactly as they do against Mosquitto directly.

Most tests are parametrized over the protocol (v3.1.1, v5) and over the target: ``direct``
(the module's Mosquitto) and ``front`` (a front broker forwarding to that same Mosquitto),
and assert the same observable result for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from broker.mqtt.packets import PacketType, Will, decode_publish, encode_ack, encode_disconnect, encode_publish
from broker.mqtt.properties import Prop
from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto, mosquitto_log, start_mosquitto
from tests.support.mqtt_bytes import connect, disconnect, publish, subscribe
from tests.support.raw_client import RawClient

pytestmark = pytest.mark.timeout(30)

V311 = aiomqtt.ProtocolVersion.V311
V5 = aiomqtt.ProtocolVersion.V5
USER = "project:team1:p1"
USER2 = "project:team1:p2"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
ALLOW_ALL = {"preset": "none", "rules": [{"who": "any", "effect": "allow", "action": "both", "pattern": "#"}]}


def props_for(packet_type: int) -> Any:
    """paho's Properties (untyped: attributes are set by name)."""
    return PahoProperties(packet_type)  # type: ignore[no-untyped-call]


def team_root() -> str:
    """A fresh topic tree that team1 projects may publish and subscribe to (flowfuse preset)."""
    return f"ff/v1/team1/c/{uid()}"


@dataclass
class Target:
    name: str
    port: int
    front: FrontBroker | None


@pytest.fixture(params=["direct", "front"])
async def target(request: pytest.FixtureRequest, mosquitto: Mosquitto, make_front: FrontFactory) -> Target:
    if request.param == "direct":
        return Target("direct", mosquitto.port, None)
    front: FrontBroker = await make_front()
    return Target("front", front_port(front), front)


@pytest.fixture(params=[V311, V5], ids=["v311", "v5"])
def proto(request: pytest.FixtureRequest) -> aiomqtt.ProtocolVersion:
    value: aiomqtt.ProtocolVersion = request.param
    return value


def client(port: int, proto: aiomqtt.ProtocolVersion, user: str = USER, **kw: Any) -> aiomqtt.Client:
    kw.setdefault("identifier", f"{user}:{uid()}")
    return aiomqtt.Client("127.0.0.1", port, username=user, password=PASSWORD, protocol=proto, **kw)


async def collect(c: aiomqtt.Client, n: int, timeout: float = 5.0) -> list[aiomqtt.Message]:
    out: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for msg in c.messages:
            out.append(msg)
            if len(out) >= n:
                break
    return out


async def expect_nothing(c: aiomqtt.Client, wait: float = 0.7) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for msg in c.messages:
                raise AssertionError(f"unexpected message on {msg.topic.value}: {msg.payload!r}")


async def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- raw client


async def raw_connect(port: int, v5: bool, client_id: str, **kw: Any) -> tuple[RawClient, bytes]:
    """Connect USER by hand and return the client and the CONNACK (asserting it accepted the client)."""
    raw = await RawClient.stream(port)
    raw.send(connect(client_id, USER, PASSWORD, v5=v5, **kw))
    connack = await raw.read_packet()
    assert connack[0] == 0x20, connack
    assert connack[3] == 0, f"CONNACK refused: {connack!r}"
    return raw, connack


# MQTT 5.0 section 3.14.2.1: the only reason codes a DISCONNECT may carry. 0x88 "Server unavailable",
# for one, is a CONNACK-only code.
DISCONNECT_REASONS = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96}
    | set(range(0x97, 0xA3))
)


def assert_closed_or_valid_disconnect(data: bytes) -> None:
    """What a v5 client may see when the server ends its connection: nothing, or one valid DISCONNECT."""
    if data == b"":
        return
    assert data[0] == 0xE0 and data[1] == len(data) - 2, f"not a single DISCONNECT packet: {data!r}"
    reason = data[2] if len(data) > 2 else 0
    assert reason in DISCONNECT_REASONS, f"0x{reason:02x} is not a valid DISCONNECT reason code: {data!r}"


# ---------------------------------------------------------------- QoS


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
async def test_qos_flows_and_downgrade(target: Target, proto: aiomqtt.ProtocolVersion, sub_qos: int) -> None:
    """Publishes at QoS 0, 1, 2 arrive at min(publish QoS, subscription QoS)."""
    root = team_root()
    async with client(target.port, proto) as sub, client(target.port, proto, USER2) as pub:
        await sub.subscribe(f"{root}/#", qos=sub_qos)
        for qos in (0, 1, 2):
            await pub.publish(f"{root}/q{qos}", f"qos{qos}".encode(), qos=qos)
        msgs = await collect(sub, 3)
    got = sorted((m.topic.value, m.payload, m.qos, m.retain) for m in msgs)
    assert got == [(f"{root}/q{q}", f"qos{q}".encode(), min(q, sub_qos), False) for q in (0, 1, 2)]


async def test_qos2_large_burst_in_order(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    root = team_root()
    async with client(target.port, proto) as sub, client(target.port, proto, USER2) as pub:
        await sub.subscribe(f"{root}/burst", qos=2)
        await asyncio.gather(*(pub.publish(f"{root}/burst", str(i).encode(), qos=2) for i in range(50)))
        msgs = await collect(sub, 50)
    assert sorted(int(bytes(m.payload)) for m in msgs) == list(range(50))
    assert {m.qos for m in msgs} == {2}


# ---------------------------------------------------------------- retained


async def test_retained_delivered_to_later_subscriber_and_cleared(
    target: Target, proto: aiomqtt.ProtocolVersion
) -> None:
    topic = f"{team_root()}/state"
    async with client(target.port, proto, USER2) as pub:
        await pub.publish(topic, b"on", qos=1, retain=True)
        async with client(target.port, proto) as sub:
            await sub.subscribe(topic, qos=1)
            [msg] = await collect(sub, 1)
            assert (msg.payload, msg.retain, msg.qos) == (b"on", True, 1)
            # A live subscriber gets a fresh retained publish with the retain flag cleared (v3.1.1 and
            # v5 without retain-as-published).
            await pub.publish(topic, b"off", qos=1, retain=True)
            [msg] = await collect(sub, 1)
            assert (msg.payload, msg.retain) == (b"off", False)
        async with client(target.port, proto) as sub:
            await sub.subscribe(topic, qos=1)
            [msg] = await collect(sub, 1)
            assert (msg.payload, msg.retain) == (b"off", True)
        # An empty retained payload clears the retained message.
        await pub.publish(topic, b"", qos=1, retain=True)
        async with client(target.port, proto) as sub:
            await sub.subscribe(topic, qos=1)
            await expect_nothing(sub)


# ---------------------------------------------------------------- will


@pytest.mark.parametrize("ending", ["abort", "close", "disconnect"])
async def test_will_published_only_without_disconnect(
    target: Target, proto: aiomqtt.ProtocolVersion, ending: str
) -> None:
    v5 = proto == V5
    root = team_root()
    will_props: dict[int, Any] = {}
    if v5:
        will_props = {
            Prop.WILL_DELAY_INTERVAL: 0,
            Prop.CONTENT_TYPE: "text/plain",
            Prop.USER_PROPERTY: [("why", "socket died")],
        }
    will = Will(f"{root}/status", b"offline", 1, False, will_props)
    async with client(target.port, proto, USER2) as sub:
        await sub.subscribe(f"{root}/#", qos=1)
        raw, _ = await raw_connect(target.port, v5, f"{USER}:{uid()}", will=will)
        raw.send(PINGREQ)  # the session is fully up before it ends
        assert await raw.read_packet() == PINGRESP
        if ending == "abort":
            raw.abort()
        elif ending == "close":
            await raw.close()
        else:
            raw.send(disconnect(v5))
            assert await raw.read_until_closed() == b""
        if ending == "disconnect":
            await expect_nothing(sub, 1.0)
            return
        [msg] = await collect(sub, 1)
    assert (msg.topic.value, msg.payload, msg.qos, msg.retain) == (f"{root}/status", b"offline", 1, False)
    if v5:
        wp: Any = msg.properties
        assert wp is not None
        assert wp.ContentType == "text/plain"
        assert wp.UserProperty == [("why", "socket died")]


async def test_v5_disconnect_with_will_reason_publishes_will(target: Target) -> None:
    root = team_root()
    will = Will(f"{root}/status", b"bye", 0, False, {Prop.WILL_DELAY_INTERVAL: 0})
    async with client(target.port, V5, USER2) as sub:
        await sub.subscribe(f"{root}/#")
        raw, _ = await raw_connect(target.port, True, f"{USER}:{uid()}", will=will)
        raw.send(encode_disconnect(0x04))  # "disconnect with will message"
        assert await raw.read_until_closed() == b""
        [msg] = await collect(sub, 1)
    assert msg.payload == b"bye"


async def test_will_through_aiomqtt_when_socket_dies(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    root = team_root()
    props: Any = None
    if proto == V5:
        props = props_for(PacketTypes.WILLMESSAGE)
        props.WillDelayInterval = 0
    will = aiomqtt.Will(f"{root}/lwt", b"dead", qos=1, retain=False, properties=props)
    async with client(target.port, proto, USER2) as sub:
        await sub.subscribe(f"{root}/lwt", qos=1)
        dying = client(target.port, proto, will=will)
        await dying.__aenter__()
        # Kill the socket under paho: no DISCONNECT goes out.
        sock: Any = dying._client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        [msg] = await collect(sub, 1)
        assert msg.payload == b"dead"
        # aiomqtt saw the connection drop: collect that error so that it is not logged as unretrieved.
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(dying._disconnected, 5)
        with contextlib.suppress(Exception):
            await dying.__aexit__(None, None, None)


# ---------------------------------------------------------------- persistent sessions


async def test_persistent_session_queues_while_offline(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    v5 = proto == V5
    root = team_root()
    cid = f"{USER}:persist-{uid()}"
    props = {Prop.SESSION_EXPIRY_INTERVAL: 120} if v5 else {}
    # v3.1.1: clean session 0 from the start; v5: clean start, then resume with clean start 0.
    raw, connack = await raw_connect(target.port, v5, cid, clean=v5, props=props)
    assert connack[2] & 1 == 0  # no session yet
    raw.send(subscribe([(f"{root}/#", 1)], v5=v5, packet_id=1))
    suback = await raw.read_packet()
    assert suback[0] == 0x90 and suback[-1] == 1
    raw.send(disconnect(v5))
    assert await raw.read_until_closed() == b""
    if target.front is not None:
        front = target.front
        await wait_for(lambda: not front.connections, what="the front connection to close")
    await asyncio.sleep(0.2)  # let Mosquitto take the client offline

    async with client(target.port, proto, USER2) as pub:
        await pub.publish(f"{root}/queued", b"while-offline", qos=1)

    raw, connack = await raw_connect(target.port, v5, cid, clean=False, props=props)
    assert connack[2] & 1 == 1, f"session_present not set: {connack!r}"
    packet = await raw.read_packet()
    pub_packet = decode_publish(packet, 0, len(packet), v5)
    assert pub_packet.topic == f"{root}/queued"
    assert pub_packet.qos == 1
    assert packet[pub_packet.payload_start :] == b"while-offline"
    raw.send(encode_ack(PacketType.PUBACK, v5, pub_packet.packet_id))
    # End the session for good: a clean reconnect without expiry discards it.
    raw.send(disconnect(v5))
    await raw.read_until_closed()
    raw, connack = await raw_connect(target.port, v5, cid, clean=True)
    assert connack[2] & 1 == 0
    raw.send(disconnect(v5))
    await raw.read_until_closed()


async def test_persistent_session_with_aiomqtt(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    """The same with a stock client library: subscription survives, the offline message arrives."""
    root = team_root()
    cid = f"{USER}:persist-{uid()}"
    kw: dict[str, Any] = {"identifier": cid}
    if proto == V5:
        props = props_for(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 120
        kw.update(clean_start=False, properties=props)
    else:
        kw.update(clean_session=False)
    async with client(target.port, proto, **kw) as sub:
        await sub.subscribe(f"{root}/#", qos=1)
    if target.front is not None:
        front = target.front
        await wait_for(lambda: not front.connections, what="the front connection to close")
    await asyncio.sleep(0.2)
    async with client(target.port, proto, USER2) as pub:
        for i in range(3):
            await pub.publish(f"{root}/m", str(i).encode(), qos=1)
    async with client(target.port, proto, **kw) as sub:
        msgs = await collect(sub, 3)
    assert [m.payload for m in msgs] == [b"0", b"1", b"2"]


# ---------------------------------------------------------------- v5 properties


async def test_v5_properties_end_to_end(target: Target) -> None:
    root = team_root()
    async with client(target.port, V5) as sub, client(target.port, V5, USER2) as pub:
        for ident, filt in ((1, f"{root}/req/#"), (2, f"{root}/res/#")):
            sp = props_for(PacketTypes.SUBSCRIBE)
            sp.SubscriptionIdentifier = ident
            await sub.subscribe(filt, qos=1, properties=sp)
        props = props_for(PacketTypes.PUBLISH)
        props.UserProperty = [("a", "1"), ("a", "2"), ("_projectID", "p1")]
        props.CorrelationData = b"\x00\x01corr\xff"
        props.ResponseTopic = f"{root}/res/reply"
        props.ContentType = "application/json"
        props.MessageExpiryInterval = 3600
        props.PayloadFormatIndicator = 1
        await pub.publish(f"{root}/req/x", b'{"k": 1}', qos=1, properties=props)
        [msg] = await collect(sub, 1)
        p: Any = msg.properties
        assert p is not None
        assert msg.payload == b'{"k": 1}'
        assert p.UserProperty == [("a", "1"), ("a", "2"), ("_projectID", "p1")]
        assert p.CorrelationData == b"\x00\x01corr\xff"
        assert p.ResponseTopic == f"{root}/res/reply"
        assert p.ContentType == "application/json"
        assert 3590 <= p.MessageExpiryInterval <= 3600
        assert p.PayloadFormatIndicator == 1
        assert p.SubscriptionIdentifier == [1]
        # The reply goes to the response topic and is routed by the second subscription.
        reply = props_for(PacketTypes.PUBLISH)
        reply.CorrelationData = p.CorrelationData
        await pub.publish(p.ResponseTopic, b"reply", qos=0, properties=reply)
        [msg] = await collect(sub, 1)
        assert msg.topic.value == f"{root}/res/reply"
        rp: Any = msg.properties
        assert rp is not None
        assert rp.SubscriptionIdentifier == [2]
        assert rp.CorrelationData == b"\x00\x01corr\xff"
        assert not hasattr(rp, "UserProperty")


async def test_v5_message_expiry_applies_to_queued_message(target: Target) -> None:
    root = team_root()
    cid = f"{USER}:exp-{uid()}"
    cprops = props_for(PacketTypes.CONNECT)
    cprops.SessionExpiryInterval = 120
    async with client(target.port, V5, identifier=cid, clean_start=False, properties=cprops) as sub:
        await sub.subscribe(f"{root}/#", qos=1)
    await asyncio.sleep(0.2)
    async with client(target.port, V5, USER2) as pub:
        expiring = props_for(PacketTypes.PUBLISH)
        expiring.MessageExpiryInterval = 1
        await pub.publish(f"{root}/a", b"expires", qos=1, properties=expiring)
        await pub.publish(f"{root}/b", b"stays", qos=1)
    await asyncio.sleep(2.2)
    async with client(target.port, V5, identifier=cid, clean_start=False, properties=cprops) as sub:
        msgs = await collect(sub, 1)
        await expect_nothing(sub, 0.5)
    assert [m.payload for m in msgs] == [b"stays"]


async def test_v5_subscription_options(target: Target) -> None:
    """no-local, retain-as-published and retain handling are the upstream's to apply, unchanged."""
    from paho.mqtt.subscribeoptions import SubscribeOptions

    root = team_root()
    async with client(target.port, V5) as me, client(target.port, V5, USER2) as other:
        await me.subscribe(f"{root}/nl", options=SubscribeOptions(qos=1, noLocal=True))
        await me.subscribe(f"{root}/rap", options=SubscribeOptions(qos=1, retainAsPublished=True))
        await me.publish(f"{root}/nl", b"mine", qos=1)
        await other.publish(f"{root}/nl", b"theirs", qos=1)
        [msg] = await collect(me, 1)
        assert msg.payload == b"theirs"
        await other.publish(f"{root}/rap", b"kept", qos=1, retain=True)
        [msg] = await collect(me, 1)
        assert (msg.payload, msg.retain) == (b"kept", True)
        # Retain handling 2: no retained messages at subscribe time.
        await me.subscribe(f"{root}/rap", options=SubscribeOptions(qos=1, retainHandling=2))
        await expect_nothing(me, 0.5)
        await other.publish(f"{root}/rap", b"", qos=1, retain=True)
        await collect(me, 1)


async def test_v5_topic_alias_from_client(target: Target) -> None:
    root = team_root()
    async with client(target.port, V5, USER2) as sub:
        await sub.subscribe(f"{root}/#", qos=1)
        raw, _ = await raw_connect(target.port, True, f"{USER}:{uid()}")
        alias: dict[int, Any] = {Prop.TOPIC_ALIAS: 1}
        raw.send(encode_publish(1, False, False, f"{root}/aliased", 1, alias, b"first"))
        raw.send(encode_publish(1, False, False, "", 2, alias, b"second"))
        raw.send(encode_publish(1, False, False, f"{root}/other", 3, alias, b"third"))
        raw.send(encode_publish(1, False, False, "", 4, alias, b"fourth"))
        acks = [await raw.read_packet() for _ in range(4)]
        assert [a[0] for a in acks] == [0x40] * 4
        msgs = await collect(sub, 4)
        raw.send(disconnect(True))
        await raw.read_until_closed()
    assert [(m.topic.value, m.payload) for m in msgs] == [
        (f"{root}/aliased", b"first"),
        (f"{root}/aliased", b"second"),
        (f"{root}/other", b"third"),
        (f"{root}/other", b"fourth"),
    ]


async def test_unsubscribe(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    root = team_root()
    async with client(target.port, proto) as sub, client(target.port, proto, USER2) as pub:
        await sub.subscribe(f"{root}/a", qos=1)
        await sub.subscribe(f"{root}/b", qos=1)
        await sub.unsubscribe(f"{root}/a")
        await pub.publish(f"{root}/a", b"gone", qos=1)
        await pub.publish(f"{root}/b", b"kept", qos=1)
        [msg] = await collect(sub, 1)
        assert msg.payload == b"kept"
        await expect_nothing(sub, 0.3)


async def test_session_takeover(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    """A second connection with the same client id takes the session over; the first one is ended."""
    v5 = proto == V5
    cid = f"{USER}:{uid()}"
    first, _ = await raw_connect(target.port, v5, cid)
    second, _ = await raw_connect(target.port, v5, cid)
    data = await first.read_until_closed()
    # Mosquitto 2.0.11 just closes the first connection; a DISCONNECT (ideally 0x8E session taken
    # over) is also correct for v5, but only with a reason code that DISCONNECT may carry.
    if v5:
        assert_closed_or_valid_disconnect(data)
    else:
        assert data == b"", data
    second.send(PINGREQ)
    assert await second.read_packet() == PINGRESP
    second.send(disconnect(v5))
    assert await second.read_until_closed() == b""


async def test_v311_empty_client_id_needs_clean_session(target: Target) -> None:
    raw = await RawClient.stream(target.port)
    raw.send(connect("", USER, PASSWORD, v5=False, clean=False))
    assert await raw.read_until_closed() == b"\x20\x02\x00\x02"


# ---------------------------------------------------------------- mosquitto_pub / mosquitto_sub


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_clients_through_front(front: FrontBroker, version: str) -> None:
    port = str(front_port(front))
    topic = f"{team_root()}/cli"
    common = ["-h", "127.0.0.1", "-p", port, "-V", version, "-P", PASSWORD, "-q", "1"]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *common,
        "-u",
        USER,
        "-i",
        f"{USER}:sub-{uid()}",
        "-t",
        topic,
        "-C",
        "1",
        "-W",
        "15",
        "-v",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # The subscriber is ready some time after it starts: publish until it has received one.
        for attempt in range(40):
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub",
                *common,
                "-u",
                USER2,
                "-i",
                f"{USER2}:pub-{uid()}",
                "-t",
                topic,
                "-m",
                f"hello {attempt}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await pub.communicate()
            assert pub.returncode == 0, err.decode()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sub.wait()), 0.25)
                break
        out, err = await asyncio.wait_for(sub.communicate(), 5)
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    assert sub.returncode == 0, err.decode()
    line = out.decode().strip()
    assert line.startswith(f"{topic} hello "), line


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_pub_bad_password_refused(front: FrontBroker, version: str) -> None:
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *("-h", "127.0.0.1", "-p", str(front_port(front)), "-V", version),
        *("-u", USER, "-P", "wrong", "-i", USER, "-t", f"{team_root()}/x", "-m", "x"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(pub.communicate(), 10)
    assert pub.returncode != 0
    text = err.decode().lower()
    assert "bad user name or password" in text or "not authorized" in text, text


# ---------------------------------------------------------------- framing: many packets per write, one byte per write


def pipelined_session(v5: bool, cid: str, topic: str) -> bytes:
    """CONNECT, SUBSCRIBE, PUBLISH QoS 1 to the same topic, PINGREQ: sent without waiting for anything."""
    return b"".join(
        (
            connect(cid, USER, PASSWORD, v5=v5),
            subscribe([(topic, 1)], v5=v5, packet_id=1),
            publish(topic, b"echo", v5=v5, qos=1, packet_id=2),
            PINGREQ,
        )
    )


async def check_pipelined_answers(raw: RawClient, v5: bool, topic: str) -> None:
    connack = await raw.read_packet()
    assert connack[0] == 0x20 and connack[3] == 0
    packets = [await raw.read_packet() for _ in range(4)]
    kinds = sorted(p[0] >> 4 for p in packets)
    assert kinds == [PacketType.PUBLISH, PacketType.PUBACK, PacketType.SUBACK, PacketType.PINGRESP], packets
    by_kind = {p[0] >> 4: p for p in packets}
    assert by_kind[PacketType.SUBACK][-1] == 1
    assert by_kind[PacketType.PUBACK][2:4] == b"\x00\x02"
    echo = by_kind[PacketType.PUBLISH]
    pub = decode_publish(echo, 0, len(echo), v5)
    assert (pub.topic, pub.qos, echo[pub.payload_start :]) == (topic, 1, b"echo")
    raw.send(encode_ack(PacketType.PUBACK, v5, pub.packet_id) + disconnect(v5))
    assert await raw.read_until_closed() == b""


async def test_many_packets_in_one_write(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    v5 = proto == V5
    topic = f"{team_root()}/pipe"
    raw = await RawClient.stream(target.port)
    raw.send(pipelined_session(v5, f"{USER}:{uid()}", topic))
    await check_pipelined_answers(raw, v5, topic)


async def test_byte_by_byte_writes(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    v5 = proto == V5
    topic = f"{team_root()}/bytes"
    raw = await RawClient.stream(target.port)
    for byte in pipelined_session(v5, f"{USER}:{uid()}", topic):
        raw.send(bytes((byte,)))
        await raw.writer.drain()
        await asyncio.sleep(0.001)
    await check_pipelined_answers(raw, v5, topic)


async def test_many_publishes_in_one_write(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    """200 QoS 1 publishes in a single write: 200 PUBACKs, 200 deliveries in order."""
    v5 = proto == V5
    topic = f"{team_root()}/batch"
    async with client(target.port, proto, USER2) as sub:
        await sub.subscribe(topic, qos=1)
        raw, _ = await raw_connect(target.port, v5, f"{USER}:{uid()}")
        raw.send(b"".join(publish(topic, str(i).encode(), v5=v5, qos=1, packet_id=i + 1) for i in range(200)))
        acks = [await raw.read_packet() for _ in range(200)]
        assert [int.from_bytes(a[2:4], "big") for a in acks] == list(range(1, 201))
        assert {a[0] for a in acks} == {0x40}
        msgs = await collect(sub, 200)
        raw.send(disconnect(v5))
        await raw.read_until_closed()
    assert [m.payload for m in msgs] == [str(i).encode() for i in range(200)]


@pytest.mark.parametrize("ending", ["disconnect", "half-close"])
async def test_fire_and_forget_client(target: Target, proto: aiomqtt.ProtocolVersion, ending: str) -> None:
    """CONNECT + PUBLISH (+ DISCONNECT) in one write, then the socket ends without reading anything
    (``printf ... | nc``): the message is delivered as it is by Mosquitto itself."""
    v5 = proto == V5
    topic = f"{team_root()}/nc"
    async with client(target.port, proto, USER2) as sub:
        await sub.subscribe(topic, qos=1)
        raw = await RawClient.stream(target.port)
        data = connect(f"{USER}:{uid()}", USER, PASSWORD, v5=v5) + publish(topic, b"fire", v5=v5, qos=1, packet_id=1)
        if ending == "disconnect":
            data += disconnect(v5)
        raw.send(data)
        raw.writer.write_eof()
        [msg] = await collect(sub, 1)
        assert msg.payload == b"fire"
        answer = await raw.read_until_closed()
        assert answer.startswith(b"\x20"), answer
    if target.front is not None:
        front = target.front
        await wait_for(lambda: not front.connections, what="the front connection to close")


# ---------------------------------------------------------------- ping


async def test_pingreq_gets_pingresp(target: Target, proto: aiomqtt.ProtocolVersion) -> None:
    raw, _ = await raw_connect(target.port, proto == V5, f"{USER}:{uid()}")
    for _ in range(3):
        raw.send(PINGREQ)
        assert await raw.read_packet() == PINGRESP
    raw.send(PINGREQ + PINGREQ)
    assert await raw.read_packet() == PINGRESP
    assert await raw.read_packet() == PINGRESP
    raw.send(disconnect(proto == V5))
    assert await raw.read_until_closed() == b""


# ---------------------------------------------------------------- closing


@pytest.mark.parametrize("ending", ["disconnect", "close", "abort"])
async def test_client_close_closes_upstream(
    front: FrontBroker, mosquitto: Mosquitto, proto: aiomqtt.ProtocolVersion, ending: str
) -> None:
    v5 = proto == V5
    cid = f"{USER}:close-{uid()}"
    raw, _ = await raw_connect(front_port(front), v5, cid)
    [conn] = front.connections
    upstream = conn.upstream
    assert upstream is not None and not upstream.is_closing()
    if ending == "disconnect":
        raw.send(disconnect(v5))
        assert await raw.read_until_closed() == b""
    elif ending == "close":
        await raw.close()
    else:
        raw.abort()
    await wait_for(lambda: not front.connections, what="front.connections to empty")
    assert upstream.is_closing()
    expected = f"Client {cid} disconnected" if ending == "disconnect" else f"Client {cid} closed its connection"
    await wait_for(lambda: expected in mosquitto_log(mosquitto), what=f"{expected!r} in the Mosquitto log")


async def test_upstream_down_disconnects_clients_and_refuses_new(
    tmp_path: Path, make_front: FrontFactory, proto: aiomqtt.ProtocolVersion
) -> None:
    v5 = proto == V5
    private = start_mosquitto(tmp_path / "private")
    try:
        front: FrontBroker = await make_front(upstream={"url": private.url})
        port = front_port(front)
        raws = [(await raw_connect(port, v5, f"{USER}:{uid()}"))[0] for _ in range(3)]
        async with client(port, proto, USER2) as watcher:
            await watcher.subscribe(f"{team_root()}/x")
            await asyncio.to_thread(private.stop)
            for raw in raws:
                data = await raw.read_until_closed()
                if v5:
                    # Just the closed socket (what Mosquitto itself does when it stops), or a
                    # DISCONNECT with a reason code valid in DISCONNECT (0x89 server busy, 0x8B
                    # server shutting down, 0x80 unspecified error ...), then the close.
                    assert_closed_or_valid_disconnect(data)
                else:
                    assert data == b"", data
            await wait_for(lambda: not front.connections, what="every client connection to close")
        # New clients are refused with "server unavailable".
        raw = await RawClient.stream(port)
        raw.send(connect(f"{USER}:{uid()}", USER, PASSWORD, v5=v5))
        data = await raw.read_until_closed()
        assert data == (b"\x20\x03\x00\x88\x00" if v5 else b"\x20\x02\x00\x03"), data
        with pytest.raises(aiomqtt.MqttError):
            async with client(port, proto):
                pass
        # Once the upstream is back, new clients get in again.
        private = start_mosquitto(tmp_path / "private", port=private.port)
        async with client(port, proto) as again:
            await again.publish(f"{team_root()}/back", b"up", qos=1)
    finally:
        private.stop()


# ---------------------------------------------------------------- back-pressure


def front_buffered(front: FrontBroker) -> int:
    total = 0
    for conn in list(front.connections):
        if conn.transport is not None:
            total += conn.transport.get_write_buffer_size()
        if conn.upstream is not None:
            total += conn.upstream.get_write_buffer_size()
    return total


@pytest.mark.timeout(60)
async def test_slow_subscriber_keeps_front_memory_bounded(make_front: FrontFactory) -> None:
    front: FrontBroker = await make_front(acl=ALLOW_ALL)
    port = front_port(front)
    topic = f"bp/{uid()}"
    payload = b"x" * 60_000
    count = 350  # ~21 MB
    # A small reader limit: the subscriber's StreamReader stops reading the socket at 2 x 16 KiB.
    sub, _ = await raw_connect(port, False, f"{USER}:sub-{uid()}")
    sub.reader._limit = 2**14  # type: ignore[attr-defined]
    sub.send(subscribe([(topic, 0)], v5=False, packet_id=1))
    assert (await sub.read_packet())[0] == 0x90
    pub, _ = await raw_connect(port, False, f"{USER}:pub-{uid()}")

    peak = 0
    flooding = True

    async def sample() -> None:
        nonlocal peak
        while flooding:
            peak = max(peak, front_buffered(front))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        for i in range(count):
            pub.send(publish(topic, i.to_bytes(4, "big") + payload, v5=False))
            await pub.writer.drain()
        # Give the flood time to pile up against the stalled subscriber.
        await asyncio.sleep(1.0)
    finally:
        flooding = False
        await sampler
    assert peak < 4 * 2**20, f"front broker buffered {peak} bytes for a stalled subscriber"

    # The subscriber resumes: messages keep arriving, in order, to the very last one.
    pub.send(publish(topic, b"END", v5=False))
    seen: list[int] = []
    async with asyncio.timeout(40):
        while True:
            packet = await sub.read_packet(timeout=40)
            assert packet[0] >> 4 == PacketType.PUBLISH
            p = decode_publish(packet, 0, len(packet), False)
            body = packet[p.payload_start :]
            if body == b"END":
                break
            seen.append(int.from_bytes(body[:4], "big"))
            peak = max(peak, front_buffered(front))
    assert seen == sorted(seen)
    assert len(seen) == count, f"only {len(seen)} of {count} flood messages arrived"
    assert peak < 4 * 2**20
    for raw in (sub, pub):
        raw.send(disconnect(False))
        await raw.read_until_closed()


@pytest.mark.timeout(30)
async def test_stalled_upstream_keeps_front_memory_bounded(make_front: FrontFactory) -> None:
    """The other direction: an upstream that stops reading makes the front stop reading the publisher."""
    stalled: list[asyncio.StreamWriter] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)  # CONNECT (small: one length byte)
        await reader.readexactly(head[1])
        writer.write(b"\x20\x02\x00\x00")
        stalled.append(writer)  # ... and never read again

    server = await asyncio.start_server(upstream, "127.0.0.1", 0, limit=2**14)
    try:
        up_port = server.sockets[0].getsockname()[1]
        front: FrontBroker = await make_front(upstream={"url": f"mqtt://127.0.0.1:{up_port}"}, acl=ALLOW_ALL)
        pub, _ = await raw_connect(front_port(front), False, f"{USER}:pub-{uid()}")
        packet = publish("flood", b"x" * 60_000, v5=False)
        sent = 0
        peak = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(350):
                pub.send(packet)
                await pub.writer.drain()
                sent += len(packet)

        task = asyncio.create_task(flood())
        for _ in range(150):
            peak = max(peak, front_buffered(front))
            await asyncio.sleep(0.01)
        assert not task.done(), "the publisher pushed 21 MB into a front broker whose upstream reads nothing"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert peak < 4 * 2**20, f"front broker buffered {peak} bytes for a stalled upstream"
        assert sent < 16 * 2**20
        pub.abort()
    finally:
        for w in stalled:
            w.transport.abort()
        server.close()
        await server.wait_closed()
