from __future__ import annotations

import asyncio

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.server import FrontBroker
from tests.conftest import PASSWORD, front_port


async def test_v5_roundtrip_with_properties(front: FrontBroker) -> None:
    port = front_port(front)
    kw = dict(hostname="127.0.0.1", port=port, password=PASSWORD, protocol=aiomqtt.ProtocolVersion.V5)
    async with aiomqtt.Client(username="project:team1:p1", identifier="project:team1:p1:n", **kw) as sub, \
            aiomqtt.Client(username="project:team1:p2", identifier="project:team1:p2:n", **kw) as pub:
        sp = Properties(PacketTypes.SUBSCRIBE)
        sp.SubscriptionIdentifier = 7
        await sub.subscribe("ff/v1/team1/p/+/out/#", qos=2, properties=sp)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("_projectID", "p2")]
        props.CorrelationData = b"corr"
        await pub.publish("ff/v1/team1/p/p2/out/x", b"hello", qos=2, properties=props)
        async with asyncio.timeout(5):
            async for msg in sub.messages:
                assert msg.payload == b"hello"
                assert msg.properties is not None
                assert msg.properties.UserProperty == [("_projectID", "p2")]
                assert msg.properties.CorrelationData == b"corr"
                assert msg.properties.SubscriptionIdentifier == [7]
                break
