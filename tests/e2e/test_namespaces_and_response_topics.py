"""Issue 13, item 7, against a real Mosquitto: an anonymous client's ``${clientid}`` is its namespaced id
(it cannot reach a user's ``${clientid}`` topics by choosing the same id), and a v5 Response Topic must
be a topic name (wildcards are a protocol error, 0x82), in a PUBLISH and in a will."""

from __future__ import annotations

import pytest

from broker.mqtt.packets import PacketType, Will, decode_disconnect
from broker.mqtt.properties import Prop
from tests.support.front import VERSIONS, FrontFactory, front_port, uid
from tests.support.raw_client import RawClient, connect_ok, topics

CLIENTID_RULES = {
    "preset": "none",
    "rules": [{"who": "any", "effect": "allow", "action": "both", "pattern": "clients/${clientid}/#"}],
}


@pytest.mark.parametrize("v5", VERSIONS)
async def test_an_anonymous_client_cannot_take_a_users_clientid_topics(
    make_front: FrontFactory, users_file: object, v5: bool
) -> None:
    front = await make_front(auth={"users_file": str(users_file), "allow_anonymous": True}, acl=CLIENTID_RULES)
    port = front_port(front)
    t = uid()
    owner_id = f"plainuser:{t}"
    owner = await connect_ok(port, "plainuser", v5, client_id=owner_id)
    assert await owner.subscribe(f"clients/{owner_id}/#", qos=1) == [1]
    # The anonymous client names itself as the user's client: it is anonymous:<id> upstream and in its rules.
    intruder = await connect_ok(port, None, v5, client_id=owner_id, password=None)
    refused_sub = 0x87 if v5 else 0x80
    assert await intruder.subscribe(f"clients/{owner_id}/#", qos=1) == [refused_sub]
    assert await intruder.publish(f"clients/{owner_id}/cmd", b"x", qos=1) == (0x87 if v5 else 0)
    # Its own namespaced topics work (positive control), and the owner got nothing from it.
    own = f"clients/anonymous:{owner_id}/x"
    assert await intruder.subscribe(own, qos=1) == [1]
    assert await intruder.publish(own, b"mine", qos=1) == 0
    assert topics(await intruder.until(own)) == [own]
    assert await owner.publish(f"clients/{owner_id}/ok", b"ok", qos=1) == 0
    assert topics(await owner.until(f"clients/{owner_id}/ok")) == [f"clients/{owner_id}/ok"]
    for c in (owner, intruder):
        await c.close()


@pytest.mark.parametrize("response_topic", ["a/+/b", "a/#"])
async def test_a_wildcard_response_topic_is_a_protocol_error(
    make_front: FrontFactory, users_file: object, response_topic: str
) -> None:
    front = await make_front(auth={"users_file": str(users_file)})
    port = front_port(front)
    t = uid()
    client = await connect_ok(port, "project:team1:p1", True, client_id=f"project:team1:p1:{t}")
    topic = f"ff/v1/team1/p/p1/out/{t}"
    assert await client.publish(topic, b"ok", qos=1, props={Prop.RESPONSE_TOPIC: f"ff/v1/team1/p/p1/in/{t}"}) == 0
    client.send(_publish_with_response_topic(topic, response_topic))
    packet = await client.expect(PacketType.DISCONNECT)
    assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x82
    await client.wait_closed()
    # The same in a will: the CONNECT is refused with 0x82.
    will = Will(topic, b"bye", 1, False, {Prop.RESPONSE_TOPIC: response_topic})
    refused, code, _ = await RawClient.open(
        port, "project:team1:p1", v5=True, client_id=f"project:team1:p1:{t}w", will=will
    )
    assert code == 0x82
    await refused.close()


def _publish_with_response_topic(topic: str, response_topic: str) -> bytes:
    from tests.support.mqtt_bytes import publish

    return publish(topic, b"x", v5=True, qos=1, packet_id=7, props={Prop.RESPONSE_TOPIC: response_topic})
