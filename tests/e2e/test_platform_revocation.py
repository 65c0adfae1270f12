"""Live revocation with the platform deciding (``acl.source: http``): a changed platform answer takes a
subscription away in place, a platform that does not answer takes nothing away, and an operator's revoke
disconnects the identity and drops every cached decision of it."""

from __future__ import annotations

import pytest

from broker.mqtt.packets import PacketType, decode_disconnect
from tests.e2e.test_live_policy import no_subscriber_upstream
from tests.support.front import VERSIONS, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.platform import FakePlatform
from tests.support.platform_e2e import platform_front, suback_refused
from tests.support.raw_client import connect_ok, topics

ALICE, CAROL = "alice@team1", "carol@team1"
MOUNT = "ff/v1/team1/c/"


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_changed_platform_answer_revokes_the_subscription(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, v5: bool
) -> None:
    t = uid()
    password = platform.add(ALICE, rules=[(f"{t}/a/#", "both"), (f"{t}/b/#", "both")])
    front = await platform_front(make_front, platform, "emqx", cache_ttl=0.2, negative_cache_ttl=0.2)
    alice = await connect_ok(front_port(front), ALICE, v5, client_id=ALICE, password=password)
    assert await alice.subscribe(f"{t}/a/#", f"{t}/b/#", qos=1) == [1, 1]
    assert await front.control.recheck_platform() == 0  # nothing changed: nothing taken away

    platform.acl.fail = 503  # a platform that does not answer takes nothing away
    await _expire(front)
    assert await front.control.recheck_platform() == 0
    platform.acl.fail = None

    platform.set_rules(ALICE, [(f"{t}/a/#", "both")])  # the Team Broker rule for b/# is gone
    await _expire(front)
    assert await front.control.recheck_platform() == 1
    assert await no_subscriber_upstream(mosquitto, f"{MOUNT}{t}/b/x")
    assert not await no_subscriber_upstream(mosquitto, f"{MOUNT}{t}/a/x")
    assert await alice.subscribe(f"{t}/b/#", qos=1) == [suback_refused(v5)]
    assert await alice.publish(f"{t}/a/x", b"still", qos=1) == 0
    assert topics(await alice.until(f"{t}/a/x")) == [f"{t}/a/x"]
    await alice.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_revoke_disconnects_and_drops_cached_decisions(
    make_front: FrontFactory, platform: FakePlatform, v5: bool
) -> None:
    t = uid()
    alice_pw = platform.add(ALICE, rules=[(f"{t}/#", "both")])
    carol_pw = platform.add(CAROL, rules=[(f"{t}/#", "both")])
    front = await platform_front(make_front, platform, "emqx", cache_ttl=60, negative_cache_ttl=60)
    alice = await connect_ok(front_port(front), ALICE, v5, client_id=ALICE, password=alice_pw)
    carol = await connect_ok(front_port(front), CAROL, v5, client_id=CAROL, password=carol_pw)
    for client in (alice, carol):
        assert await client.subscribe(f"{t}/x", qos=1) == [1]
    assert front.platform is not None and front.platform.cache_size() == 2
    assert front.control.revoke(username=ALICE) == 1
    if v5:
        packet = await alice.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x98
    await alice.wait_closed()
    assert front.platform.cache_size() == 1  # Alice's allows are gone at once; Carol's stay
    assert await carol.publish(f"{t}/x", b"ok", qos=1) == 0
    assert topics(await carol.until(f"{t}/x")) == [f"{t}/x"]
    await carol.close()


async def _expire(front: object) -> None:
    import asyncio

    await asyncio.sleep(0.25)  # past cache_ttl: the next re-check asks the platform again
