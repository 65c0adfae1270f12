"""Team mountpoints end to end: real clients -> front broker -> real Mosquitto, MQTT 3.1.1 and 5.

Each test runs once per source of the mountpoint (the 64 KiB-name test: local only):

- ``local``: a users-file Team Broker client (``alice@team1``) mounted by
  ``acl.mountpoints: {teamclient: "ff/v1/${team}/c/"}``, with a rule ``#`` relative to the mount (the
  flowfuse preset's Team Broker rules are full ``ff/v1/...`` topics, which a mounted check never sees);
- ``platform``: ``auth.http`` + ``acl.source: http`` against the fake FlowFuse platform
  (tests/support/platform.py), which answers ``client_attrs.team = "ff/v1/<team>/c/"`` for Team Broker
  identities and decides every check on the client-visible topic.

The unmounted side is ``forge_platform`` through the front broker and a "spy" subscribed to ``#``
straight on Mosquitto, which shows what really reached the upstream. Negative checks are synchronised
by barrier messages (MQTT keeps the order of one client's messages, and an awaited QoS 1 publish has
been routed by Mosquitto before the next one), so they need no sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.mqtt.packets import (
    PacketType,
    Subscribe,
    Unsubscribe,
    Will,
    decode_ack,
    decode_disconnect,
    encode_ack,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
)
from broker.mqtt.properties import Prop, Properties
from broker.server import FrontBroker
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid, write_users_file
from tests.support.mosquitto import Mosquitto
from tests.support.platform import FakePlatform
from tests.support.raw_client import Msg, RawClient, connect_ok, topics

M1 = "ff/v1/team1/c/"  # team1's mountpoint
M2 = "ff/v1/team2/c/"
ALICE, CAROL, BOB = "alice@team1", "carol@team1", "bob@team2"  # Team Broker clients (mounted)
PLATFORM, PROJECT = "forge_platform", "project:team1:p1"  # platform identities (not mounted)
USERS = [ALICE, CAROL, BOB, PLATFORM, PROJECT]
GROUP = "g1"  # a $share group the team clients may use
NOT_AUTHORIZED = 0x87
TOPIC_ALIAS_INVALID = 0x94

# Local identities: Team Broker clients are mounted, and their rules are relative to the mount.
LOCAL_ACL: dict[str, Any] = {
    "preset": "flowfuse",
    "mountpoints": {"teamclient": "ff/v1/${team}/c/"},
    "rules": [{"who": "teamclient", "effect": "allow", "action": "both", "pattern": "#"}],
    "share_groups": [GROUP, "platform", "browser", "${project}"],
}


@dataclass
class Team:
    """A front broker whose Team Broker clients are mounted, and how to log in to it."""

    source: str
    front: FrontBroker
    passwords: dict[str, str]
    platform: FakePlatform | None = None
    clients: list[RawClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        return front_port(self.front)

    async def connect(self, username: str, v5: bool, **kw: Any) -> RawClient:
        # FlowFuse's rule: a Team Broker client's id is its username; platform identities add a suffix.
        kw.setdefault("client_id", username if "@" in username else f"{username}:{uid()}")
        client = await connect_ok(self.port, username, v5, password=self.passwords[username], **kw)
        self.clients.append(client)
        return client

    async def observer(self, v5: bool, *filters: str) -> RawClient:
        """forge_platform through the front broker (unmounted: full topics), subscribed to ``filters``."""
        client = await self.connect(PLATFORM, v5)
        assert await client.subscribe(*filters, qos=2) == [2] * len(filters)
        return client


@pytest.fixture(scope="module")
def team_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users_file(tmp_path_factory.mktemp("mount-users") / "users.yaml", USERS)


@pytest.fixture(params=["local", "platform"])
async def team(request: pytest.FixtureRequest, make_front: FrontFactory, team_users: Path) -> AsyncIterator[Team]:
    platform: FakePlatform | None = None
    if request.param == "local":
        front = await make_front(auth={"users_file": str(team_users)}, acl=LOCAL_ACL)
        passwords = dict.fromkeys(USERS, PASSWORD)
    else:
        platform = await FakePlatform(team_client_id_rule=True).start()
        passwords = {u: platform.add(u) for u in USERS}
        front = await make_front(auth={"http": platform.emqx_config(timeout=2)}, acl={"source": "http"})
    setup = Team(request.param, front, passwords, platform)
    yield setup
    for client in setup.clients:
        await client.close()
    if platform is not None:
        await platform.stop()


async def spy_on(mosquitto: Mosquitto) -> RawClient:
    """A client straight on Mosquitto (no front broker) that sees every non-$ topic."""
    spy = await connect_ok(mosquitto.port, None, True, client_id=f"spy-{uid()}")
    assert await spy.subscribe("#", qos=2) == [2]
    return spy


def tagged(msgs: list[Msg], t: str) -> list[str]:
    return [m.topic for m in msgs if t in m.topic]


async def unsubscribe(client: RawClient, *filters: str) -> list[int]:
    """UNSUBSCRIBE and wait for UNSUBACK; its v5 reason codes (0x11: no such subscription upstream)."""
    pid = client.packet_id()
    client.send(encode_unsubscribe(Unsubscribe(pid, list(filters)), client.v5))
    packet = await client.expect(PacketType.UNSUBACK)
    assert int.from_bytes(packet[2:4], "big") == pid
    if not client.v5:
        return []
    props_len = packet[4]  # small property blocks: one-byte length
    return list(packet[5 + props_len :])


# -- publish and delivery ---------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("v5", VERSIONS)
async def test_publish_and_delivery_cross_the_mount(team: Team, mosquitto: Mosquitto, v5: bool, qos: int) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    plat = await team.observer(v5, f"{M1}{t}/#")
    alice = await team.connect(ALICE, v5)
    assert await alice.subscribe(f"{t}/down/#", qos=2) == [2]

    # Up: twice, so the second publish takes the fast path (topic already allowed) and is mounted too.
    for payload in (b"21.5", b"21.6"):
        assert await alice.publish(f"{t}/sensors/t", payload, qos=qos) == 0
        got = await plat.next_message()
        assert (got.topic, got.payload, got.qos) == (f"{M1}{t}/sensors/t", payload, qos)
    assert tagged(await spy.until(f"{M1}{t}/sensors/t"), t) == [f"{M1}{t}/sensors/t"]

    # Down: the platform writes the full topic, the mounted client reads it without the mount (twice too).
    for payload in (b"on", b"off"):
        assert await plat.publish(f"{M1}{t}/down/x", payload, qos=qos) == 0
        got = await alice.next_message()
        assert (got.topic, got.payload, got.qos) == (f"{t}/down/x", payload, qos)
    await spy.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_project_client_sees_the_team_space_directly(team: Team, mosquitto: Mosquitto, v5: bool) -> None:
    """A project (unmounted, through the front broker) and a client straight on Mosquitto share the space."""
    t = uid()
    project = await team.connect(PROJECT, v5)
    assert await project.subscribe(f"{M1}{t}/#", qos=1) == [1]
    direct = await connect_ok(mosquitto.port, None, v5, client_id=f"direct-{uid()}")
    assert await direct.subscribe(f"{M1}{t}/#", qos=1) == [1]
    alice = await team.connect(ALICE, v5)
    assert await alice.subscribe(f"{t}/from-project", f"{t}/from-direct", qos=1) == [1, 1]

    assert await alice.publish(f"{t}/from-alice", b"a", qos=1) == 0
    assert (await project.next_message()).topic == f"{M1}{t}/from-alice"
    assert (await direct.next_message()).topic == f"{M1}{t}/from-alice"
    assert await project.publish(f"{M1}{t}/from-project", b"p", qos=1) == 0
    assert await direct.publish(f"{M1}{t}/from-direct", b"d", qos=1) == 0
    got = [await alice.next_message(), await alice.next_message()]
    assert sorted((m.topic, m.payload) for m in got) == [(f"{t}/from-direct", b"d"), (f"{t}/from-project", b"p")]
    await direct.close()


# -- will -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_will_of_a_killed_client_arrives_under_the_mount(team: Team, v5: bool) -> None:
    t = uid()
    plat = await team.observer(v5, f"{M1}{t}/#")
    carol = await team.connect(CAROL, v5)
    assert await carol.subscribe(f"{t}/#", qos=1) == [1]
    will_props: Properties = {Prop.RESPONSE_TOPIC: f"{t}/will-reply"} if v5 else {}
    will = Will(f"{t}/status", b"gone", qos=1, retain=False, properties=will_props)
    alice = await team.connect(ALICE, v5, will=will)
    alice.abort()  # no DISCONNECT: the front broker drops the upstream connection, Mosquitto sends the will

    got = await plat.next_message()
    assert (got.topic, got.payload) == (f"{M1}{t}/status", b"gone")
    seen = await carol.next_message()
    assert (seen.topic, seen.payload) == (f"{t}/status", b"gone")
    if v5:  # the will's Response Topic went up under the mount, and comes down without it
        assert got.properties is not None and got.properties[Prop.RESPONSE_TOPIC] == f"{M1}{t}/will-reply"
        assert seen.properties is not None and seen.properties[Prop.RESPONSE_TOPIC] == f"{t}/will-reply"


# -- subscribe, unsubscribe -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_filter", "client_topic"),
    [("#", "{t}/a"), ("+/{t}", "x/{t}"), (f"$share/{GROUP}/{{t}}/s", "{t}/s"), (f"$share/{GROUP}/+/{{t}}", "y/{t}")],
    ids=["hash", "plus", "share", "share-plus"],
)
@pytest.mark.parametrize("v5", VERSIONS)
async def test_subscribe_filters_are_mounted(team: Team, v5: bool, client_filter: str, client_topic: str) -> None:
    t = uid()
    client_filter, client_topic = client_filter.format(t=t), client_topic.format(t=t)
    alice = await team.connect(ALICE, v5)
    assert await alice.subscribe(client_filter, qos=1) == [1]
    plat = await team.connect(PLATFORM, v5)
    assert await plat.publish(M1 + client_topic, b"in", qos=1) == 0
    got = await alice.until(client_topic)
    assert got[-1].payload == b"in" and not got[-1].topic.startswith("ff/")


@pytest.mark.parametrize("v5", VERSIONS)
async def test_unsubscribe_stops_deliveries(team: Team, v5: bool) -> None:
    t = uid()
    alice = await team.connect(ALICE, v5)
    assert await alice.subscribe(f"{t}/u/#", f"$share/{GROUP}/{t}/s", f"{t}/barrier", qos=1) == [1, 1, 1]
    plat = await team.connect(PLATFORM, v5)
    for topic in (f"{t}/u/1", f"{t}/s"):
        assert await plat.publish(M1 + topic, b"before", qos=1) == 0
    assert sorted(topics([await alice.next_message(), await alice.next_message()])) == [f"{t}/s", f"{t}/u/1"]

    codes = await unsubscribe(alice, f"{t}/u/#", f"$share/{GROUP}/{t}/s")
    if v5:  # 0x00, not 0x11 "no subscription existed": the mounted filters matched what was subscribed
        assert codes == [0, 0]
    for topic in (f"{t}/u/2", f"{t}/s", f"{t}/barrier"):
        assert await plat.publish(M1 + topic, b"after", qos=1) == 0
    assert topics(await alice.until(f"{t}/barrier")) == [f"{t}/barrier"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_partly_refused_subscribe_inside_the_mount(team: Team, v5: bool) -> None:
    """The refused filter is answered by the front broker, the others go upstream mounted; one SUBACK."""
    t = uid()
    if team.platform is not None:  # the platform's Team Broker rules: allow lists, relative to the mount
        team.platform.set_rules(ALICE, [(f"{t}/#", "both")])
    alice = await team.connect(ALICE, v5)
    refused = NOT_AUTHORIZED if v5 else 0x80
    # '$SYS/#' is refused: a '#' rule does not cover '$' topics (local), no rule allows it (platform).
    assert await alice.subscribe(f"{t}/a", "$SYS/#", f"{t}/b", qos=1) == [1, refused, 1]
    assert await alice.publish("$SYS/x", b"no", qos=1) == (NOT_AUTHORIZED if v5 else 0)
    plat = await team.connect(PLATFORM, v5)
    for topic in (f"{t}/a", f"{t}/c", f"{t}/b"):
        assert await plat.publish(M1 + topic, b"m", qos=1) == 0
    assert topics(await alice.until(f"{t}/b")) == [f"{t}/a", f"{t}/b"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_persistent_session_keeps_its_mounted_subscriptions(team: Team, v5: bool) -> None:
    """As FlowFuse's nodes connect (clean: false): messages queued while away arrive without the mount."""
    t = uid()
    props: Properties = {Prop.SESSION_EXPIRY_INTERVAL: 60} if v5 else {}
    carol = await team.connect(CAROL, v5, clean=False, props=props)
    assert await carol.subscribe(f"{t}/#", qos=1) == [1]
    await carol.disconnect()
    plat = await team.connect(PLATFORM, v5)
    for i in range(3):
        assert await plat.publish(f"{M1}{t}/queued", str(i).encode(), qos=1) == 0
    # Reconnected, the queued messages may come in the same read as the CONNACK.
    carol, code, _ = await RawClient.open(team.port, CAROL, v5=v5, client_id=CAROL, password=team.passwords[CAROL],
                                          clean=False, props=props)
    team.clients.append(carol)
    assert code == 0
    got = [await carol.next_message() for _ in range(3)]
    assert [(m.topic, m.payload) for m in got] == [(f"{t}/queued", str(i).encode()) for i in range(3)]
    assert await plat.publish(f"{M1}{t}/live", b"l", qos=1) == 0
    assert (await carol.next_message()).topic == f"{t}/live"
    await carol.disconnect()
    # Clean up the stored session.
    cleanup = await team.connect(CAROL, v5, clean=True)
    await cleanup.disconnect()


# -- retained ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_retained_messages_inside_the_mount(team: Team, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    alice = await team.connect(ALICE, v5)
    plat = await team.connect(PLATFORM, v5)
    assert await alice.publish(f"{t}/r", b"from-alice", qos=1, retain=True) == 0
    assert await plat.publish(f"{M1}{t}/p", b"from-platform", qos=1, retain=True) == 0
    try:
        # Set before the subscription, received after it: mounted, and without the mount.
        carol = await team.connect(CAROL, v5)
        assert await carol.subscribe(f"{t}/#", qos=1) == [1]
        got = sorted([await carol.next_message(), await carol.next_message()], key=lambda m: m.topic)
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            (f"{t}/p", b"from-platform", True),
            (f"{t}/r", b"from-alice", True),
        ]
        # The same retained messages, seen from outside the mount.
        plat2 = await team.observer(v5, f"{M1}{t}/#")
        got = sorted([await plat2.next_message(), await plat2.next_message()], key=lambda m: m.topic)
        assert [(m.topic, m.retain) for m in got] == [(f"{M1}{t}/p", True), (f"{M1}{t}/r", True)]
        direct = await connect_ok(mosquitto.port, None, True, client_id=f"direct-{uid()}")
        assert await direct.subscribe(f"{M1}{t}/r", qos=1) == [1]
        msg = await direct.next_message()
        assert (msg.topic, msg.payload, msg.retain) == (f"{M1}{t}/r", b"from-alice", True)
        await direct.close()
        # Another team's client sees none of it, even subscribed to '#'.
        bob = await team.connect(BOB, v5)
        assert await bob.subscribe("#", qos=1) == [1]
        assert await bob.publish(f"{t}/bob-barrier", qos=1) == 0
        assert tagged(await bob.until(f"{t}/bob-barrier"), t) == [f"{t}/bob-barrier"]
    finally:  # clear them, from inside the mount
        assert await alice.publish(f"{t}/r", b"", qos=1, retain=True) == 0
        assert await alice.publish(f"{t}/p", b"", qos=1, retain=True) == 0


# -- QoS 1 and 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_qos2_inside_the_mount_is_exactly_once(team: Team, v5: bool) -> None:
    t = uid()
    carol = await team.connect(CAROL, v5)
    assert await carol.subscribe(f"{t}/#", qos=2) == [2]
    plat = await team.observer(v5, f"{M1}{t}/#")
    alice = await team.connect(ALICE, v5)

    # A retransmitted PUBLISH (DUP, same packet id) before PUBREL is still one message.
    pid = alice.packet_id()
    for dup in (False, True):
        alice.send(encode_publish(2, False, dup, f"{t}/once", pid, {} if v5 else None, b"once"))
        rec = await alice.expect(PacketType.PUBREC)
        assert decode_ack(rec, 0, len(rec), v5).packet_id == pid
    alice.send(encode_ack(PacketType.PUBREL, v5, pid))
    comp = await alice.expect(PacketType.PUBCOMP)
    assert decode_ack(comp, 0, len(comp), v5).packet_id == pid
    for i in range(5):  # then the fast path, several flows
        assert await alice.publish(f"{t}/n", str(i).encode(), qos=2) == 0
    assert await alice.publish(f"{t}/end", qos=1) == 0

    seen = await carol.until(f"{t}/end")
    assert [(m.topic, m.payload, m.qos) for m in seen] == [
        (f"{t}/once", b"once", 2),
        *[(f"{t}/n", str(i).encode(), 2) for i in range(5)],
        (f"{t}/end", b"x", 1),
    ]
    outside = await plat.until(f"{M1}{t}/end")
    assert [(m.topic, m.qos) for m in outside] == [
        (f"{M1}{t}/once", 2),
        *[(f"{M1}{t}/n", 2)] * 5,
        (f"{M1}{t}/end", 1),
    ]
    # Down, QoS 2 into the mount: exactly once too.
    for i in range(3):
        assert await plat.publish(f"{M1}{t}/down", str(i).encode(), qos=2) == 0
    assert await plat.publish(f"{M1}{t}/down-end", qos=1) == 0
    assert [(m.topic, m.payload, m.qos) for m in await carol.until(f"{t}/down-end")] == [
        *[(f"{t}/down", str(i).encode(), 2) for i in range(3)],
        (f"{t}/down-end", b"x", 1),
    ]


# -- v5: topic aliases, request/response, subscription identifiers ----------------------------------


async def test_topic_alias_is_resolved_then_mounted(team: Team, mosquitto: Mosquitto) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    carol = await team.connect(CAROL, True)
    assert await carol.subscribe(f"{t}/#", qos=1) == [1]
    alice, code, props = await RawClient.open(team.port, ALICE, v5=True, client_id=ALICE,
                                              password=team.passwords[ALICE])
    team.clients.append(alice)
    assert code == 0 and props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0) >= 2, props
    sends = [(f"{t}/a", 1, b"1"), ("", 1, b"2"), (f"{t}/b", 1, b"3"), ("", 1, b"4"), (f"{t}/c", 2, b"5"), ("", 2, b"6")]
    for topic, alias, payload in sends:
        assert await alice.publish(topic, payload, qos=1, props={Prop.TOPIC_ALIAS: alias}) == 0
    want = [f"{t}/a", f"{t}/a", f"{t}/b", f"{t}/b", f"{t}/c", f"{t}/c"]
    got = [await carol.next_message() for _ in want]
    assert [(m.topic, m.payload) for m in got] == list(zip(want, [p for _, _, p in sends], strict=True))
    assert all(Prop.TOPIC_ALIAS not in (m.properties or {}) for m in got)  # full topics, no aliases down
    assert tagged(await spy.until(f"{M1}{t}/c"), t) == [M1 + w for w in want[:5]]
    # An alias the client never set is a protocol error (nothing is guessed, nothing goes upstream).
    alice.send(encode_publish(1, False, False, "", alice.packet_id(), {Prop.TOPIC_ALIAS: 3}, b"?"))
    packet = await alice.expect(PacketType.DISCONNECT)
    assert decode_disconnect(packet, 0, len(packet), True).reason_code == TOPIC_ALIAS_INVALID
    await spy.close()


async def test_response_topic_request_response_inside_the_mount(team: Team) -> None:
    t = uid()
    plat = await team.observer(True, f"{M1}{t}/#")
    responder = await team.connect(CAROL, True)
    assert await responder.subscribe(f"{t}/req", qos=1) == [1]
    requester = await team.connect(ALICE, True)
    assert await requester.subscribe(f"{t}/resp/#", qos=1) == [1]

    for n in range(2):  # twice: the second request is on a topic already allowed
        corr = f"corr-{n}".encode()
        props: Properties = {Prop.RESPONSE_TOPIC: f"{t}/resp/{n}", Prop.CORRELATION_DATA: corr}
        assert await requester.publish(f"{t}/req", b"ask", qos=1, props=props) == 0
        outside = await plat.next_message()
        assert outside.topic == f"{M1}{t}/req"
        assert outside.properties is not None and outside.properties[Prop.RESPONSE_TOPIC] == f"{M1}{t}/resp/{n}"
        request = await responder.next_message()
        assert request.properties is not None
        assert (request.topic, request.properties[Prop.RESPONSE_TOPIC]) == (f"{t}/req", f"{t}/resp/{n}")
        assert request.properties[Prop.CORRELATION_DATA] == corr
        reply: Properties = {Prop.CORRELATION_DATA: request.properties[Prop.CORRELATION_DATA]}
        assert await responder.publish(request.properties[Prop.RESPONSE_TOPIC], b"answer", qos=1, props=reply) == 0
        response = await requester.next_message()
        assert (response.topic, response.payload) == (f"{t}/resp/{n}", b"answer")
        assert response.properties is not None and response.properties[Prop.CORRELATION_DATA] == corr
        assert (await plat.next_message()).topic == f"{M1}{t}/resp/{n}"

    # A response topic outside the mount is not shown to a mounted client at all; one inside is unmounted.
    for rt, shown in ((f"{M2}{t}/x", None), ("elsewhere/x", None), (f"{M1}{t}/resp/z", f"{t}/resp/z")):
        assert await plat.publish(f"{M1}{t}/req", b"q", qos=1, props={Prop.RESPONSE_TOPIC: rt}) == 0
        got = await responder.next_message()
        assert got.topic == f"{t}/req"
        assert (got.properties or {}).get(Prop.RESPONSE_TOPIC) == shown
        await plat.next_message()  # the observer's own copy
    # A response topic that tries to climb out stays a literal topic under the mount.
    escape: Properties = {Prop.RESPONSE_TOPIC: f"../../team2/c/{t}", Prop.CORRELATION_DATA: b"c"}
    assert await requester.publish(f"{t}/req", b"ask", qos=1, props=escape) == 0
    outside = await plat.next_message()
    assert outside.properties is not None and outside.properties[Prop.RESPONSE_TOPIC] == f"{M1}../../team2/c/{t}"


async def test_subscription_identifiers_are_preserved(team: Team) -> None:
    t = uid()
    alice = await team.connect(ALICE, True)
    assert await alice.subscribe(f"{t}/a/#", qos=1, props={Prop.SUBSCRIPTION_IDENTIFIER: [7]}) == [1]
    assert await alice.subscribe(f"{t}/b/#", qos=1, props={Prop.SUBSCRIPTION_IDENTIFIER: [300]}) == [1]
    assert await alice.subscribe(f"{t}/c", qos=1) == [1]  # none
    plat = await team.connect(PLATFORM, True)
    for topic in (f"{t}/a/1", f"{t}/b/1", f"{t}/c", f"{t}/a/1"):
        assert await plat.publish(M1 + topic, b"m", qos=1) == 0
    got = [await alice.next_message() for _ in range(4)]
    assert [(m.topic, (m.properties or {}).get(Prop.SUBSCRIPTION_IDENTIFIER)) for m in got] == [
        (f"{t}/a/1", [7]),
        (f"{t}/b/1", [300]),
        (f"{t}/c", None),
        (f"{t}/a/1", [7]),
    ]


# -- escape attempts --------------------------------------------------------------------------------

ESCAPE_FILTERS = ["#", "+/#", f"$share/{GROUP}/#", "../#", "+", "../../team2/c/#", "/#", "+/+/+/+/#"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_mounted_client_never_receives_outside_its_mount(team: Team, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    alice = await team.connect(ALICE, v5)
    codes = await alice.subscribe(*ESCAPE_FILTERS, qos=2)
    assert codes == [2] * len(ESCAPE_FILTERS), codes  # all granted: mounted, every one of them stays inside
    bob = await team.connect(BOB, v5)  # another team's mounted client, writing into its own space
    assert await bob.publish(f"{t}/team2", b"b", qos=1) == 0
    plat = await team.connect(PLATFORM, v5)
    project = await team.connect(PROJECT, v5)
    assert await project.publish(f"ff/v1/team1/p/p1/out/{t}", b"p", qos=1) == 0
    # Straight on Mosquitto, no ACL in the way: anything at all may be published around the mount.
    writer = await connect_ok(mosquitto.port, None, v5, client_id=f"writer-{uid()}")
    outside = [
        f"{M2}{t}/x",  # team2's space
        f"ff/v1/team1/p/p1/out/{t}/x",  # team1's platform topics
        "ff/v1/team1/c",  # the mount's parent level, which '#' under the mount matches in MQTT
        "ff/v1/team1/c/",  # the mount itself with an empty last level: no client topic left
        f"ff/v1/team1/cx/{t}",  # a sibling sharing the prefix but not the '/'
        f"ff/v1/team10/c/{t}",
        t,
    ]
    # QoS 2, and more than Mosquitto's 20 in flight: the front broker completes the dropped flows itself,
    # or the barrier below would wait behind them.
    for topic in [*outside, *["ff/v1/team1/c"] * 25]:
        assert await writer.publish(topic, b"outside", qos=2) == 0
    assert await plat.publish(f"{M2}{t}/from-platform", b"outside", qos=1) == 0
    assert await plat.publish(f"{M1}{t}/barrier", b"in", qos=1) == 0

    # Mosquitto did route all of them (the spy saw them), and the front broker dropped them for alice.
    spied = set(topics(await spy.until(f"{M1}{t}/barrier")))
    assert {f"{M2}{t}/team2", "ff/v1/team1/c", "ff/v1/team1/c/", *outside[:2]} <= spied
    seen = topics(await alice.until(f"{t}/barrier"))
    assert set(seen) == {f"{t}/barrier"}, seen
    # Copies of the barrier from the other matching subscriptions may follow; then a second barrier.
    assert await plat.publish(f"{M1}{t}/barrier2", b"in", qos=1) == 0
    seen = topics(await alice.until(f"{t}/barrier2"))
    assert set(seen) <= {f"{t}/barrier", f"{t}/barrier2"}, seen
    await writer.close()
    await spy.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_mounted_client_never_publishes_outside_its_mount(team: Team, mosquitto: Mosquitto, v5: bool) -> None:
    t = uid()
    spy = await spy_on(mosquitto)
    alice = await team.connect(ALICE, v5)
    attempts = [
        f"../team2/c/{t}",
        f"../../team2/c/{t}",
        f"/ff/v1/team2/c/{t}",
        f"{M2}{t}",  # a full topic is just a topic inside the mount
        f"ff/v1/team1/p/p1/in/{t}",
        f"{t}/../../..",
        f"$share/{GROUP}/{t}",
        f"$SYS/{t}",
    ]
    landed = []
    for topic in attempts:
        code = await alice.publish(topic, b"escape?", qos=1)
        assert code in (0, NOT_AUTHORIZED), (topic, code)
        if code == 0 and v5:
            landed.append(M1 + topic)
    if v5:  # via a topic alias too: set on one topic, reused with an empty one
        assert await alice.publish(f"../{t}/alias", b"a", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
        assert await alice.publish("", b"a", qos=1, props={Prop.TOPIC_ALIAS: 1}) == 0
        landed += [f"{M1}../{t}/alias"] * 2
    bob = await team.connect(BOB, v5)
    assert await bob.publish(f"{t}/bob", qos=1) == 0  # team2 writes into team2's space only
    assert await alice.publish(f"{t}/barrier", qos=1) == 0
    seen = tagged(await spy.until(f"{M1}{t}/barrier"), t)
    assert [s for s in seen if not s.startswith(M1)] == [f"{M2}{t}/bob"], seen
    if v5:  # (v3.1.1 cannot tell a refused publish from an allowed one: only "nothing outside" is checked)
        assert [s for s in seen if s.startswith(M1)] == [*landed, f"{M1}{t}/barrier"]
        assert f"{M1}../team2/c/{t}" in landed and f"{M1}{M2}{t}" in landed  # kept, literally, inside
    await spy.close()


# -- real clients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5], ids=["v311", "v5"])
async def test_aiomqtt_team_client_inside_its_mount(team: Team, version: aiomqtt.ProtocolVersion) -> None:
    t = uid()

    def client(username: str, identifier: str) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", team.port, identifier=identifier, username=username,
                              password=team.passwords[username], protocol=version)

    async with client(ALICE, ALICE) as alice, client(PROJECT, f"{PROJECT}:n") as project:
        await alice.subscribe(f"{t}/#", qos=2)
        await project.subscribe(f"{M1}{t}/#", qos=2)
        await project.publish(f"{M1}{t}/to-team", b"hello team", qos=2)
        await alice.publish(f"{t}/to-platform", b"hello platform", qos=2)
        assert await received(alice, 2) == [(f"{t}/to-team", b"hello team"), (f"{t}/to-platform", b"hello platform")]
        assert await received(project, 2) == [
            (f"{M1}{t}/to-team", b"hello team"),
            (f"{M1}{t}/to-platform", b"hello platform"),
        ]


async def received(client: aiomqtt.Client, n: int) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(5):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append((str(message.topic), message.payload))
            if len(got) == n:
                return got
    raise AssertionError(f"connection closed after {got}")


def paho_mounted_roundtrip(port: int, password: str, protocol: Any, t: str) -> list[tuple[str, bytes, bool]]:
    """A threaded paho Team Broker client: retained publish, subscribe, receive it back without the mount."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=ALICE, protocol=protocol)
    client.username_pw_set(ALICE, password)
    connected, received = threading.Event(), threading.Event()
    got: list[tuple[str, bytes, bool]] = []
    codes: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason)
        connected.set()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        got.append((message.topic, message.payload, bool(message.retain)))
        received.set()

    client.on_connect, client.on_message = on_connect, on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(5) and not codes[0].is_failure, codes
        client.publish(f"{t}/kept", b"retained", qos=1, retain=True).wait_for_publish(5)
        client.subscribe(f"{t}/#", qos=1)
        assert received.wait(5), "retained message not delivered"
        client.publish(f"{t}/kept", b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["v311", "v5"])
async def test_paho_team_client_retained_inside_its_mount(team: Team, mosquitto: Mosquitto, protocol: Any) -> None:
    t = uid()
    direct = await connect_ok(mosquitto.port, None, True, client_id=f"direct-{uid()}")
    assert await direct.subscribe(f"{M1}{t}/#", qos=1) == [1]
    got = await asyncio.to_thread(paho_mounted_roundtrip, team.port, team.passwords[ALICE], protocol, t)
    assert got[0] == (f"{t}/kept", b"retained", True)
    msg = await direct.next_message()
    assert (msg.topic, msg.payload) == (f"{M1}{t}/kept", b"retained")
    await direct.close()


# -- names that do not fit under the mount ----------------------------------------------------------

MAX_NAME = 65535  # bytes: the longest MQTT string, so the longest topic or filter upstream


@pytest.fixture
async def roomy(make_front: FrontFactory, team_users: Path) -> AsyncIterator[Team]:
    """The local setup with packets big enough for 64 KiB topics."""
    front = await make_front(auth={"users_file": str(team_users)}, acl=LOCAL_ACL,
                             limits={"max_packet_size": 1_048_576, "connect_timeout": 2,
                                     "max_topic_length": 65_535, "max_alias_topic_length": 65_535,
                                     "max_connect_size": 1_048_576})
    setup = Team("local", front, dict.fromkeys(USERS, PASSWORD))
    yield setup
    for client in setup.clients:
        await client.close()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_name_too_long_for_the_mount_is_refused(
    roomy: Team, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture, v5: bool
) -> None:
    """A client topic or filter that is valid, but longer than MQTT allows once mounted, never goes upstream
    (it cannot be encoded there): v5 DISCONNECT 0x90 / 0x8F, v3.1.1 closed, and no error in the broker."""
    t = uid()
    fits = t + "/" + "a" * (MAX_NAME - len(M1) - len(t) - 1)
    too_long = fits + "b"
    spy = await spy_on(mosquitto)
    alice = await roomy.connect(ALICE, v5)
    assert await alice.publish(fits, b"fits", qos=1) == 0  # exactly 65535 bytes upstream
    got = await spy.next_message()
    assert (len(got.topic), got.payload) == (MAX_NAME, b"fits")

    async def refused(client: RawClient, packet: bytes, reason: int) -> None:
        client.send(packet)
        if v5:
            disconnect = await client.expect(PacketType.DISCONNECT)
            assert decode_disconnect(disconnect, 0, len(disconnect), True).reason_code == reason
        await client.wait_closed()

    await refused(alice, encode_publish(1, False, False, too_long, 7, {} if v5 else None, b"no"), 0x90)
    sub = await roomy.connect(ALICE, v5)
    await refused(sub, encode_subscribe(Subscribe(3, [(too_long, 1)]), v5), 0x8F)
    unsub = await roomy.connect(ALICE, v5)
    await refused(unsub, encode_unsubscribe(Unsubscribe(4, [too_long]), v5), 0x8F)
    if v5:  # a response topic, and a topic set with an alias (the re-encoding path)
        rt = await roomy.connect(ALICE, v5)
        await refused(rt, encode_publish(1, False, False, f"{t}/x", 8, {Prop.RESPONSE_TOPIC: too_long}, b"no"), 0x90)
        alias = await roomy.connect(ALICE, v5)
        await refused(alias, encode_publish(1, False, False, too_long, 9, {Prop.TOPIC_ALIAS: 1}, b"no"), 0x90)
    # A will that cannot be mounted: the CONNECT is refused (as a will that is not allowed).
    wills = [Will(too_long, b"w", qos=0, retain=False)]
    if v5:
        wills.append(Will(f"{t}/will", b"w", qos=0, retain=False, properties={Prop.RESPONSE_TOPIC: too_long}))
    for will in wills:
        client, code, _ = await RawClient.open(roomy.port, ALICE, v5=v5, client_id=ALICE, will=will)
        assert code == (0x90 if v5 else 0x05)
        await client.close()
    ok = await roomy.connect(ALICE, v5)
    assert await ok.publish(f"{t}/barrier", qos=1) == 0
    assert [m.topic for m in await spy.until(f"{M1}{t}/barrier") if t in m.topic] == [f"{M1}{t}/barrier"]
    assert errors_logged(caplog) == []  # before the fix: "Fatal error: protocol.data_received() call failed"
    await spy.close()
