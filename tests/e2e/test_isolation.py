"""End-to-end team isolation: real clients -> front broker -> real Mosquitto.

Every attack is paired with a positive control proving that in-team traffic still flows, and a
"spy" subscribed to `#` directly on Mosquitto proves what never reached the upstream. Negative
checks are synchronised with barrier messages sent after the attack on the same connection, so
they need no sleeps: MQTT keeps the order of one client's messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import bcrypt
import pytest

from broker.mqtt.packets import (
    Connect,
    PacketType,
    Subscribe,
    Will,
    decode_ack,
    decode_connack,
    decode_disconnect,
    decode_suback,
    encode_ack,
    encode_connect,
    encode_publish,
    encode_subscribe,
)
from broker.mqtt.properties import Prop, Properties
from broker.server import FrontBroker
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, connack_code, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.raw_client import TIMEOUT, Msg, RawClient, connect_ok, topics

NOT_AUTHORIZED_V5 = 0x87
SUBACK_FAIL_V3 = 0x80
ANON_PUBLIC = {"who": "anonymous", "effect": "allow", "action": "both", "pattern": "public/#"}


def refused_sub(v5: bool) -> int:
    return NOT_AUTHORIZED_V5 if v5 else SUBACK_FAIL_V3


async def spy_on(mosquitto: Mosquitto) -> RawClient:
    """A client straight on Mosquitto (no front broker) that sees every non-$ topic."""
    spy = await connect_ok(mosquitto.port, None, True, client_id=f"spy-{uid()}")
    assert await spy.subscribe("#", qos=2) == [2]
    return spy


def with_tag(msgs: list[Msg], marker: str) -> list[str]:
    return [m.topic for m in msgs if marker in m.topic]


# -- cross-team publish ------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("v5", VERSIONS)
async def test_cross_team_publish_is_dropped(front: FrontBroker, mosquitto: Mosquitto, v5: bool, qos: int) -> None:
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    sub = await connect_ok(port, "project:team1:p1", v5)
    assert await sub.subscribe("ff/v1/team1/p/+/out/#", "ff/v1/team1/p/p1/in/#", qos=2) == [2, 2]
    attacker = await connect_ok(port, "project:team2:p3", v5)
    peer = await connect_ok(port, "project:team1:p2", v5)

    expected = NOT_AUTHORIZED_V5 if v5 and qos else 0
    for topic in (f"ff/v1/team1/p/p1/out/{t}", f"ff/v1/team1/p/p1/in/{t}", f"ff/v1/team1/c/{t}"):
        assert await attacker.publish(topic, b"evil", qos=qos) == expected
    # The attacker's own team still works (and is the spy's barrier: same connection, later message).
    own = f"ff/v1/team2/p/p3/out/{t}"
    assert await attacker.publish(own, b"ok", qos=qos) == 0
    assert with_tag(await spy.until(own), t) == [own]

    # Positive control: in-team traffic reaches the team1 subscriber, the attack never did.
    ok = f"ff/v1/team1/p/p2/out/{t}"
    assert await peer.publish(ok, b"hello", qos=qos) == 0
    got = await sub.until(ok)
    assert with_tag(got, t) == [ok]
    assert got[-1].payload == b"hello"
    assert with_tag(await spy.until(ok), t) == [ok]
    # The denied QoS 2 flow is complete: the attacker can go on publishing.
    assert await attacker.publish(own, b"again", qos=qos) == 0
    for c in (spy, sub, attacker, peer):
        await c.close()


async def test_v311_denied_qos2_flow_completes_with_pubcomp(front: FrontBroker) -> None:
    attacker = await connect_ok(front_port(front), "project:team2:p3", False)
    for pid in (1, 2, 1):  # a packet id is reusable once the refused flow completed
        attacker.send(encode_publish(2, False, False, "ff/v1/team1/c/x", pid, None, b"evil"))
        rec = await attacker.expect(PacketType.PUBREC)
        assert decode_ack(rec, 0, len(rec), False).packet_id == pid
        attacker.send(encode_ack(PacketType.PUBREL, False, pid))
        comp = await attacker.expect(PacketType.PUBCOMP)
        assert decode_ack(comp, 0, len(comp), False).packet_id == pid
    await attacker.close()


# -- retained ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_cross_team_retained_never_lands(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    attacker = await connect_ok(port, "project:team2:p3", v5)
    owner = await connect_ok(port, "project:team1:p1", v5)
    evil = f"ff/v1/team1/p/p1/out/{t}/evil"
    assert await attacker.publish(evil, b"evil", qos=1, retain=True) == (NOT_AUTHORIZED_V5 if v5 else 0)
    barrier = f"ff/v1/team2/p/p3/out/{t}"
    assert await attacker.publish(barrier, qos=1) == 0
    good = f"ff/v1/team1/p/p1/out/{t}/good"
    assert await owner.publish(good, b"kept", qos=1, retain=True) == 0
    seen = with_tag(await spy.until(good), t)
    assert evil not in seen

    later = await connect_ok(port, "project:team1:p2", v5)
    assert await later.subscribe(f"ff/v1/team1/p/p1/out/{t}/#", qos=1) == [1]
    msg = await later.next_message()
    assert (msg.topic, msg.payload, msg.retain) == (good, b"kept", True)
    direct = await connect_ok(mosquitto.port, None, True, client_id=f"direct-{t}")
    assert await direct.subscribe(f"ff/v1/team1/p/p1/out/{t}/#", qos=1) == [1]
    msg = await direct.next_message()
    assert (msg.topic, msg.retain) == (good, True)
    # Nothing else retained: a barrier publish arrives next, not the attacker's message.
    assert await owner.publish(f"ff/v1/team1/p/p1/out/{t}/end", qos=1) == 0
    assert topics(await later.until(f"ff/v1/team1/p/p1/out/{t}/end")) == [f"ff/v1/team1/p/p1/out/{t}/end"]
    assert topics(await direct.until(f"ff/v1/team1/p/p1/out/{t}/end")) == [f"ff/v1/team1/p/p1/out/{t}/end"]
    await owner.publish(good, b"", qos=1, retain=True)  # clear the retained message
    for c in (spy, attacker, owner, later, direct):
        await c.close()


# -- will --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "will_topic"),
    [
        ("project:team2:p3", "ff/v1/team1/p/p1/out/will"),  # another team
        ("project:team2:p3", "ff/v1/team1/c/will"),
        ("project:team1:p1", "ff/v1/team1/p/p2/out/will"),  # in team, but another project's broadcast
        ("project:team10:p4", "ff/v1/team1/c/will"),  # team prefix confusion
    ],
)
@pytest.mark.parametrize("v5", VERSIONS)
async def test_will_on_foreign_topic_refuses_connect(
    front: FrontBroker, mosquitto: Mosquitto, v5: bool, username: str, will_topic: str
) -> None:
    for retain in (False, True):
        will = Will(will_topic, b"evil-will", 1, retain)
        client, code, _ = await RawClient.open(front_port(front), username, v5=v5, will=will)
        assert code == connack_code(v5, v5_code=0x87, v3_code=0x05)
        await client.wait_closed()
        await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_own_will_is_published_when_the_socket_dies(
    front: FrontBroker, mosquitto: Mosquitto, v5: bool
) -> None:
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    watcher = await connect_ok(port, "project:team1:p2", v5)
    assert await watcher.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    will_topic = f"ff/v1/team1/p/p1/out/{t}/will"
    dying = await connect_ok(port, "project:team1:p1", v5, will=Will(will_topic, b"gone", 1, False))
    dying.writer.transport.abort()  # no DISCONNECT: the socket just dies
    msg = await watcher.next_message()
    assert (msg.topic, msg.payload) == (will_topic, b"gone")
    assert will_topic in with_tag(await spy.until(will_topic), t)
    await dying.close()
    await watcher.close()
    await spy.close()


# -- topic aliases -----------------------------------------------------------------------------------


async def test_topic_alias_cannot_smuggle_a_foreign_topic(front: FrontBroker, mosquitto: Mosquitto) -> None:
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    sub = await connect_ok(port, "project:team1:p2", True)
    assert await sub.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    client, code, props = await RawClient.open(port, "project:team1:p1", v5=True)
    assert code == 0
    assert props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0) >= 3

    own = f"ff/v1/team1/p/p1/out/{t}"
    assert await client.publish(own, b"1", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
    assert await client.publish("", b"2", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
    got = [await sub.next_message(), await sub.next_message()]
    assert [(m.topic, m.payload) for m in got] == [(own, b"1"), (own, b"2")]
    assert all(Prop.TOPIC_ALIAS not in (m.properties or {}) for m in got)

    foreign = f"ff/v1/team2/p/p3/out/{t}"
    assert await client.publish(foreign, b"evil", qos=1, props={Prop.TOPIC_ALIAS: 2}) == NOT_AUTHORIZED_V5
    assert await client.publish("", b"evil2", qos=1, props={Prop.TOPIC_ALIAS: 2}) == NOT_AUTHORIZED_V5
    assert await client.publish("", b"evil3", qos=2, props={Prop.TOPIC_ALIAS: 2}) == NOT_AUTHORIZED_V5
    # Re-pointing alias 1 at a foreign topic does not let a later empty-topic publish through either.
    assert await client.publish(foreign, b"evil4", qos=1, props={Prop.TOPIC_ALIAS: 1}) == NOT_AUTHORIZED_V5
    assert await client.publish("", b"evil5", qos=1, props={Prop.TOPIC_ALIAS: 1}) == NOT_AUTHORIZED_V5
    assert await client.publish(own, b"end", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
    assert await client.publish("", b"end2", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
    seen = await spy.until(own)
    seen += await spy.until(own)
    seen += await spy.until(own)
    seen += await spy.until(own)
    assert [m.payload for m in seen if m.topic == own] == [b"1", b"2", b"end", b"end2"]
    assert foreign not in topics(seen)
    assert [m.payload for m in (await sub.until(own)) + (await sub.until(own))] == [b"end", b"end2"]

    # An alias that was never set is a protocol error: DISCONNECT 0x94.
    client.send(encode_publish(1, False, False, "", client.packet_id(), {Prop.TOPIC_ALIAS: 3}, b"?"))
    packet = await client.expect(PacketType.DISCONNECT)
    assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x94
    await client.wait_closed()
    for c in (spy, sub, client):
        await c.close()


async def test_topic_alias_above_maximum_disconnects(front: FrontBroker) -> None:
    client, code, props = await RawClient.open(front_port(front), "project:team1:p1", v5=True)
    assert code == 0
    too_big = props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0) + 1
    client.send(encode_publish(0, False, False, "ff/v1/team1/c/x", 0, {Prop.TOPIC_ALIAS: too_big}, b"?"))
    packet = await client.expect(PacketType.DISCONNECT)
    assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x94
    await client.wait_closed()
    await client.close()


# -- $share ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_shared_subscription_stealing(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    p1 = await connect_ok(port, "project:team1:p1", v5)
    codes = await p1.subscribe(
        "$share/platform/ff/v1/team2/p/+/out/#",  # allowed group, other team's topics
        "$share/p2/ff/v1/team1/p/+/out/#",  # another project's group
        "$share/p3/ff/v1/team1/p/+/out/#",
        "$share/p1/ff/v1/team1/p/p2/in/#",  # own group, another project's inbox
        "$share/p1/ff/v1/team1/p/+/out/#",  # own project group: allowed
        qos=1,
    )
    assert codes == [refused_sub(v5)] * 4 + [1]
    p3 = await connect_ok(port, "project:team2:p3", v5)
    p2 = await connect_ok(port, "project:team1:p2", v5)
    spy = await spy_on(mosquitto)
    assert await p3.publish(f"ff/v1/team2/p/p3/out/{t}", qos=1) == 0
    assert await p2.publish(f"ff/v1/team1/p/p2/in/{t}", qos=1) == 0
    ok = f"ff/v1/team1/p/p2/out/{t}"
    assert await p2.publish(ok, b"shared", qos=1) == 0
    assert len(with_tag(await spy.until(ok), t)) == 3  # all three reached Mosquitto
    got = await p1.until(ok)
    assert with_tag(got, t) == [ok]
    assert got[-1].payload == b"shared"
    for c in (p1, p2, p3, spy):
        await c.close()


# -- wildcard spying ---------------------------------------------------------------------------------

SPY_FILTERS = ["#", "+/#", "ff/v1/+/p/+/out/#", "ff/v1/#", "ff/+/team2/#", "$SYS/#", "ff/v1/team1/#",
               "ff/v1/team1/p/+/+/#", "ff/v1/team1/+/#", "ff/v1/team2/p/+/out/#", "+/v1/team1/p/+/out/#"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_wildcard_spying_refused_per_filter(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    p1 = await connect_ok(port, "project:team1:p1", v5)
    codes = await p1.subscribe(*SPY_FILTERS, "ff/v1/team1/p/+/out/#", qos=1)
    assert codes == [refused_sub(v5)] * len(SPY_FILTERS) + [1]
    p2 = await connect_ok(port, "project:team1:p2", v5)
    p3 = await connect_ok(port, "project:team2:p3", v5)
    assert await p3.publish(f"ff/v1/team2/p/p3/out/{t}", qos=1) == 0
    assert await p3.publish(f"ff/v1/team2/c/{t}", qos=1) == 0
    assert await p2.publish(f"ff/v1/team1/p/p2/in/{t}", qos=1) == 0  # p2's inbox: not for p1
    assert await p2.publish(f"ff/v1/team1/p/p2/res/{t}", qos=1) == 0
    ok = f"ff/v1/team1/p/p2/out/{t}"
    assert await p2.publish(ok, qos=1) == 0
    assert with_tag(await p1.until(ok), t) == [ok]
    for c in (p1, p2, p3):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_team_id_prefix_confusion(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    p4 = await connect_ok(port, "project:team10:p4", v5)
    codes = await p4.subscribe(
        "ff/v1/team1/p/+/out/#", "ff/v1/team1/c/#", "ff/v1/team1/p/p4/in/#", "ff/v1/team10/p/+/out/#", qos=1
    )
    assert codes == [refused_sub(v5)] * 3 + [1]
    p1 = await connect_ok(port, "project:team1:p1", v5)
    assert await p1.subscribe("ff/v1/team10/p/+/out/#", "ff/v1/team1/p/+/out/#", qos=1) == [refused_sub(v5), 1]
    denied = NOT_AUTHORIZED_V5 if v5 else 0
    assert await p4.publish(f"ff/v1/team1/p/p1/in/{t}", qos=1) == denied
    assert await p4.publish(f"ff/v1/team1/p/p4/out/{t}", qos=1) == denied
    assert await p1.publish(f"ff/v1/team10/p/p4/in/{t}", qos=1) == denied
    mine = f"ff/v1/team1/p/p1/out/{t}"
    assert await p1.publish(mine, qos=1) == 0
    theirs = f"ff/v1/team10/p/p4/out/{t}"
    assert await p4.publish(theirs, qos=1) == 0
    assert with_tag(await p4.until(theirs), t) == [theirs]
    assert with_tag(await p1.until(mine), t) == [mine]
    for c in (p1, p4):
        await c.close()


# -- delivery-time check -----------------------------------------------------------------------------

SECRET_RULES = [{"who": "project", "effect": "deny", "action": "subscribe", "pattern": "ff/v1/${team}/c/secret/#"}]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_deliveries_are_checked_against_read_rights(
    make_front: FrontFactory, mosquitto: Mosquitto, v5: bool
) -> None:
    """A subscription wider than the client's read rights (made before the operator added a deny rule,
    kept by a persistent session upstream) must not deliver what the rules now deny, at any QoS, and the
    dropped QoS 1/2 flows are completed upstream so later deliveries still arrive."""
    t = uid()
    cid = f"project:team1:p1:{t}"
    session_props: Properties = {Prop.SESSION_EXPIRY_INTERVAL: 300} if v5 else {}
    before = await make_front()
    old = await connect_ok(front_port(before), "project:team1:p1", v5, client_id=cid, clean=False,
                           props=session_props)
    assert await old.subscribe("ff/v1/team1/c/#", qos=2) == [2]
    await old.disconnect()

    after = await make_front(acl={"preset": "flowfuse", "rules": SECRET_RULES})
    port = front_port(after)
    # Queued while the client is away: one secret, then one allowed message.
    direct = await connect_ok(mosquitto.port, None, True, client_id=f"direct-{t}")
    assert await direct.publish(f"ff/v1/team1/c/secret/{t}/offline", b"s", qos=1) == 0
    assert await direct.publish(f"ff/v1/team1/c/ok/{t}/offline", b"o", qos=1) == 0

    client, code, _ = await RawClient.open(port, "project:team1:p1", v5=v5, client_id=cid, clean=False,
                                     props=session_props)
    assert code == 0
    # New subscriptions follow the rules: the deny rule carves its topics out of the wide filter (granted,
    # its secret deliveries dropped) and refuses the filter it covers whole.
    assert await client.subscribe("ff/v1/team1/c/#", "ff/v1/team1/c/secret/#", qos=2) == [2, refused_sub(v5)]
    platform = await connect_ok(port, "forge_platform", v5, client_id=f"forge_platform:{t}")
    # More denied QoS 1/2 deliveries than Mosquitto's default in-flight window (20): if the front did not
    # acknowledge them upstream, the allowed messages after them would never arrive.
    for i in range(12):
        for qos in (0, 1, 2):
            assert await platform.publish(f"ff/v1/team1/c/secret/{t}/p{qos}-{i}", b"s", qos=qos) == 0
            assert await direct.publish(f"ff/v1/team1/c/secret/{t}/d{qos}-{i}", b"s", qos=qos) == 0
    allowed: list[str] = []
    for qos in (0, 1, 2, 1, 2):
        topic = f"ff/v1/team1/c/ok/{t}/{len(allowed)}"
        allowed.append(topic)
        assert await platform.publish(topic, b"ok", qos=qos) == 0
    got = await client.until(allowed[-1], timeout=10)
    assert with_tag(got, t) == [f"ff/v1/team1/c/ok/{t}/offline", *allowed]
    assert [m.qos for m in got[1:]] == [0, 1, 2, 1, 2]
    assert not any("secret" in m.topic for m in got)
    # The session stays usable: own publishes still flow.
    mine = f"ff/v1/team1/c/ok/{t}/mine"
    assert await client.publish(mine, qos=2) == 0
    assert topics(await client.until(mine)) == [mine]
    assert after.connections  # nothing was torn down
    for c in (client, platform, direct):
        await c.close()


# -- client-id takeover ------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_client_id_takeover_refused(
    make_front: FrontFactory, mosquitto: Mosquitto, users_file: Path, v5: bool
) -> None:
    t = uid()
    front = await make_front(
        auth={"users_file": str(users_file), "allow_anonymous": True},
        acl={"preset": "flowfuse", "rules": [ANON_PUBLIC]},
    )
    port = front_port(front)
    cid = f"project:team1:p1:{t}"
    session_props: Properties = {Prop.SESSION_EXPIRY_INTERVAL: 300} if v5 else {}
    legit = await connect_ok(port, "project:team1:p1", v5, client_id=cid, clean=False, props=session_props)
    assert await legit.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]

    for username in ("project:team2:p3", "project:team1:p2", "project:team10:p4", "alice@team1", "plainuser"):
        thief, code, _ = await RawClient.open(port, username, v5=v5, client_id=cid)
        assert code == connack_code(v5, v5_code=0x85, v3_code=0x02), username
        await thief.wait_closed()
        await thief.close()
    # Anonymous clients live in their own client-id namespace upstream.
    anon = await connect_ok(port, None, v5, client_id=cid)
    assert await anon.subscribe("public/#", qos=1) == [1]

    p2 = await connect_ok(port, "project:team1:p2", v5)
    ok = f"ff/v1/team1/p/p2/out/{t}"
    assert await p2.publish(ok, qos=1) == 0
    assert with_tag(await legit.until(ok), t) == [ok]
    assert not legit.closed.is_set()
    assert not anon.closed.is_set()
    for c in (legit, anon, p2):
        await c.close()


async def test_empty_client_id_gets_an_id_bound_to_the_user(front: FrontBroker) -> None:
    client, code, props = await RawClient.open(front_port(front), "project:team1:p1", v5=True, client_id="")
    assert code == 0
    assert props[Prop.ASSIGNED_CLIENT_IDENTIFIER].startswith("project:team1:p1:")
    await client.close()


# -- spoofed usernames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("project:team1:p1", "wrong-password"),
        ("project:team1:p1:x", PASSWORD),  # extra part: not in the users file
        ("project:team1:p1:n", PASSWORD),
        ("project:team1", PASSWORD),
        ("project:team1:p9", PASSWORD),
        ("Project:team1:p1", PASSWORD),
        ("project:team1:p1 ", PASSWORD),
        ("anonymous", PASSWORD),
    ],
)
@pytest.mark.parametrize("v5", VERSIONS)
async def test_spoofed_username_refused(front: FrontBroker, v5: bool, username: str, password: str) -> None:
    client, code, _ = await RawClient.open(front_port(front), username, v5=v5, password=password, client_id=username)
    assert code == connack_code(v5, v5_code=0x86, v3_code=0x04)
    await client.wait_closed()
    await client.close()


# -- anonymous ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("v5", VERSIONS)
async def test_anonymous_refused_by_default(front: FrontBroker, v5: bool) -> None:
    client, code, _ = await RawClient.open(front_port(front), None, v5=v5)
    assert code == connack_code(v5, v5_code=0x87, v3_code=0x05)
    await client.wait_closed()
    await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_anonymous_gets_public_only(
    make_front: FrontFactory, mosquitto: Mosquitto, users_file: Path, v5: bool
) -> None:
    t = uid()
    front = await make_front(
        auth={"users_file": str(users_file), "allow_anonymous": True},
        acl={"preset": "flowfuse", "rules": [ANON_PUBLIC]},
    )
    port = front_port(front)
    spy = await spy_on(mosquitto)
    anon = await connect_ok(port, None, v5)
    codes = await anon.subscribe("#", "ff/v1/#", "ff/v1/team1/c/#", "+/#", "$share/platform/ff/v1/#", "public/#",
                                 qos=1)
    assert codes == [refused_sub(v5)] * 5 + [1]
    denied = NOT_AUTHORIZED_V5 if v5 else 0
    for topic in (f"ff/v1/team1/c/{t}", f"ff/v1/team1/p/p1/in/{t}", f"private/{t}"):
        assert await anon.publish(topic, qos=1) == denied
    ok = f"public/{t}"
    assert await anon.publish(ok, b"hi", qos=1) == 0
    assert with_tag(await spy.until(ok), t) == [ok]
    assert with_tag(await anon.until(ok), t) == [ok]
    # Team traffic never reaches the anonymous client.
    p1 = await connect_ok(port, "project:team1:p1", v5)
    assert await p1.publish(f"ff/v1/team1/c/{t}", qos=1) == 0
    assert await p1.publish(f"public/{t}/2", qos=1) == denied  # projects get nothing outside ff/v1/<team>
    assert await anon.publish(f"public/{t}/3", qos=1) == 0
    assert with_tag(await anon.until(f"public/{t}/3"), t) == [f"public/{t}/3"]
    # A password without a username is not anonymous: bad credentials (v5 only allows that shape).
    if v5:
        bad = await RawClient.attach(port, True)
        bad.send(encode_connect(Connect(5, True, 60, "x", password=b"pw")))
        packet = await bad.expect(PacketType.CONNACK)
        assert decode_connack(packet, 0, len(packet), True).reason_code == 0x86
        await bad.close()
    for c in (spy, anon, p1):
        await c.close()


# -- framing -----------------------------------------------------------------------------------------


def _attack_bytes(v5: bool, t: str) -> bytes:
    connect = encode_connect(
        Connect(5 if v5 else 4, True, 60, f"project:team1:p1:{t}", username="project:team1:p1",
                password=PASSWORD.encode())
    )
    sub = encode_subscribe(Subscribe(1, [("ff/v1/team2/#", 1), ("#", 1), (f"ff/v1/team1/c/{t}/#", 1)]), v5)
    props: Properties | None = {} if v5 else None
    evil = encode_publish(1, False, False, f"ff/v1/team2/c/{t}", 2, props, b"evil")
    good = encode_publish(1, False, False, f"ff/v1/team1/c/{t}/ok", 3, props, b"good")
    return connect + sub + evil + good


async def _check_attack_outcome(client: RawClient, spy: RawClient, v5: bool, t: str) -> None:
    packet = await client.expect(PacketType.CONNACK)
    assert decode_connack(packet, 0, len(packet), v5).reason_code == 0
    # The front answers the denied PUBLISH itself while SUBACK and the other PUBACK come from Mosquitto:
    # MQTT does not order a SUBACK relative to PUBACKs, so collect the three in any order.
    subacks: list[list[int]] = []
    acks: list[tuple[int, int]] = []
    for _ in range(3):
        async with asyncio.timeout(TIMEOUT):
            item = await client.control.get()
        assert item is not None, "connection closed"
        ptype, packet = item
        if ptype == PacketType.SUBACK:
            subacks.append(decode_suback(packet, 0, len(packet), v5).reason_codes)
        else:
            assert ptype == PacketType.PUBACK, packet
            ack = decode_ack(packet, 0, len(packet), v5)
            acks.append((ack.packet_id, ack.reason_code))
    assert subacks == [[refused_sub(v5)] * 2 + [1]]
    assert sorted(acks) == [(2, NOT_AUTHORIZED_V5 if v5 else 0), (3, 0)]
    ok = f"ff/v1/team1/c/{t}/ok"
    msg = await client.next_message()
    assert (msg.topic, msg.payload) == (ok, b"good")
    assert with_tag(await spy.until(ok), t) == [ok]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_packets_split_byte_by_byte(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    client = await RawClient.attach(front_port(front), v5)
    for i, byte in enumerate(_attack_bytes(v5, t)):
        client.send(bytes((byte,)))
        await client.writer.drain()
        if i % 7 == 0:
            await asyncio.sleep(0.001)  # let the bytes arrive in separate reads
    await _check_attack_outcome(client, spy, v5, t)
    await client.close()
    await spy.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_packets_coalesced_in_one_write(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    client = await RawClient.attach(front_port(front), v5)
    client.send(_attack_bytes(v5, t))
    await _check_attack_outcome(client, spy, v5, t)
    await client.close()
    await spy.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_write_ending_mid_packet_right_after_connect(
    front: FrontBroker, mosquitto: Mosquitto, v5: bool
) -> None:
    """CONNECT + SUBSCRIBE + half a PUBLISH in one write, the rest later: a client that does not wait
    for CONNACK is legal MQTT, and the packets must be processed in order."""
    t = uid()
    spy = await spy_on(mosquitto)
    data = _attack_bytes(v5, t)
    cut = len(data) - 5  # inside the last PUBLISH
    client = await RawClient.attach(front_port(front), v5)
    client.send(data[:cut])
    await client.writer.drain()
    await asyncio.sleep(0.05)
    client.send(data[cut:])
    await _check_attack_outcome(client, spy, v5, t)
    await client.close()
    await spy.close()


# -- deny_action: disconnect -------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_deny_action_disconnect(make_front: FrontFactory, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    front = await make_front(acl={"preset": "flowfuse", "deny_action": "disconnect"})
    port = front_port(front)
    spy = await spy_on(mosquitto)
    attacker = await connect_ok(port, "project:team2:p3", v5)
    own = f"ff/v1/team2/p/p3/out/{t}"
    assert await attacker.publish(own, qos=1) == 0  # allowed traffic first
    evil = f"ff/v1/team1/c/{t}"
    attacker.send(encode_publish(1, False, False, evil, attacker.packet_id(), {} if v5 else None, b"evil"))
    if v5:
        packet = await attacker.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x87
    else:
        assert await attacker.control.get() is None  # closed without a PUBACK
    await attacker.wait_closed()
    # Other clients are unaffected, and the denied message never reached Mosquitto.
    p1 = await connect_ok(port, "project:team1:p1", v5)
    ok = f"ff/v1/team1/c/{t}/ok"
    assert await p1.publish(ok, qos=1) == 0
    assert with_tag(await spy.until(ok), t) == [own, ok]
    for c in (spy, attacker, p1):
        await c.close()


# -- other identity kinds ----------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_team_broker_client_scope(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    alice = await connect_ok(port, "alice@team1", v5, client_id="alice@team1")
    codes = await alice.subscribe("ff/v1/team2/c/#", "ff/v1/team1/p/+/out/#", "ff/v1/team1/#", "#",
                                  "ff/v1/team1/c/#", qos=1)
    assert codes == [refused_sub(v5)] * 4 + [1]
    bob = await connect_ok(port, "bob@team2", v5, client_id="bob@team2")
    assert await bob.subscribe("ff/v1/team1/c/#", "ff/v1/team2/c/#", qos=1) == [refused_sub(v5), 1]
    denied = NOT_AUTHORIZED_V5 if v5 else 0
    assert await alice.publish(f"ff/v1/team2/c/{t}", qos=1) == denied
    assert await alice.publish(f"ff/v1/team1/p/p1/in/{t}", qos=1) == denied
    assert await bob.publish(f"ff/v1/team1/c/{t}/bob", qos=1) == denied
    mine = f"ff/v1/team1/c/{t}"
    assert await alice.publish(mine, qos=1) == 0
    assert with_tag(await alice.until(mine), t) == [mine]
    theirs = f"ff/v1/team2/c/{t}"
    assert await bob.publish(theirs, qos=1) == 0
    assert with_tag(await bob.until(theirs), t) == [theirs]
    # Team Broker client ids must be the username.
    other, code, _ = await RawClient.open(port, "alice@team1", v5=v5, client_id="bob@team2")
    assert code == connack_code(v5, v5_code=0x85, v3_code=0x02)
    for c in (alice, bob, other):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_device_scope(front: FrontBroker, v5: bool) -> None:
    port, t = front_port(front), uid()
    d1 = await connect_ok(port, "device:team1:d1", v5, client_id="device:team1:d1")
    codes = await d1.subscribe("ff/v1/team1/d/+/#", "ff/v1/team1/d/d2/#", "ff/v1/team1/c/#",
                               "ff/v1/team2/d/d1/#", "ff/v1/team1/d/d1/#", qos=1)
    assert codes == [refused_sub(v5)] * 4 + [1]
    denied = NOT_AUTHORIZED_V5 if v5 else 0
    assert await d1.publish(f"ff/v1/team1/d/d2/status/{t}", qos=1) == denied
    assert await d1.publish(f"ff/v1/team2/d/d1/status/{t}", qos=1) == denied
    mine = f"ff/v1/team1/d/d1/status/{t}"
    assert await d1.publish(mine, qos=1) == 0
    assert with_tag(await d1.until(mine), t) == [mine]
    await d1.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_platform_scope(front: FrontBroker, v5: bool) -> None:
    port, t = front_port(front), uid()
    platform = await connect_ok(port, "forge_platform", v5, client_id="forge_platform:0123456789abcdef")
    assert await platform.subscribe("#", "$SYS/#", "+/#", "ff/v1/#", qos=1) == [refused_sub(v5)] * 3 + [1]
    assert await platform.publish(f"other/{t}", qos=1) == (NOT_AUTHORIZED_V5 if v5 else 0)
    p3 = await connect_ok(port, "project:team2:p3", v5)
    assert await p3.subscribe("ff/v1/team2/p/p3/in/#", qos=1) == [1]
    inbox = f"ff/v1/team2/p/p3/in/{t}"
    assert await platform.publish(inbox, b"cmd", qos=1) == 0
    assert with_tag(await p3.until(inbox), t) == [inbox]
    seen = with_tag(await platform.until(inbox), t)
    assert seen == [inbox]
    for c in (platform, p3):
        await c.close()


# -- usernames that are a prefix of a structured identity --------------------------------------------


async def test_prefix_username_cannot_take_over_project_session(make_front: FrontFactory) -> None:
    """Even if an auth backend accepted `project` or `project:team1`, the front refuses them at CONNECT, so
    they cannot use a project's client ids (upstream, the id would kick the real project's session)."""
    front = await make_front()
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
    for name in ("project", "project:team1", "device"):
        front.authenticator.users[name] = hashed  # what a lax backend would accept
    port, t = front_port(front), uid()
    cid = f"project:team1:p1:{t}"
    legit = await connect_ok(port, "project:team1:p1", True, client_id=cid)
    for username in ("project", "project:team1"):
        thief, code, _ = await RawClient.open(port, username, v5=True, client_id=cid, clean=False,
                                        props={Prop.SESSION_EXPIRY_INTERVAL: 300})
        assert code == 0x86, f"{username!r} was allowed to use client id {cid!r}"
        await thief.close()
    thief, code, _ = await RawClient.open(port, "device", v5=True, client_id="device:team1:d1")
    assert code == 0x86, "'device' was allowed to use client id 'device:team1:d1'"
    await thief.close()
    # The real session was not kicked upstream: it still round-trips a message.
    assert await legit.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
    inbox = f"ff/v1/team1/p/p1/in/{t}"
    assert await legit.publish(inbox, qos=1) == 0
    assert topics(await legit.until(inbox)) == [inbox]
    await legit.close()
