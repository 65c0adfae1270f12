"""The platform decides every check (``acl.source: http``), end to end, in both styles and both protocol versions.

Real parts: raw-socket and aiomqtt clients -> the front broker -> the module's real Mosquitto; the front broker's
httpx client -> a FakePlatform (aiohttp) over loopback. Negative checks need no sleeps: each is followed by a
barrier message on the same connection (MQTT keeps one connection's order), and a spy straight on Mosquitto
shows what reached the internal broker. The platform's request log shows what was asked, and how often.
"""

from __future__ import annotations

import asyncio
import time

import jwt as pyjwt
import pytest

from broker.mqtt.packets import Will
from tests.support.front import VERSIONS, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import publish
from tests.support.platform import FakePlatform
from tests.support.platform_e2e import (
    BAD_CREDENTIALS,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    STYLES,
    TIMEOUT,
    acl_log,
    asked,
    asked_about,
    auth_log,
    code,
    connack,
    connect_results,
    direct,
    login,
    metrics_of,
    on_wire,
    platform_front,
    puback_refused,
    requests_total,
    spy_on,
    suback_refused,
)
from tests.support.raw_client import Msg, connect_ok, topics

PA = "project:team1:pa"
TTL = 0.4  # cache_ttl and negative_cache_ttl of the TTL tests: long enough for a few round trips
PB = "project:team1:pb"


def mine(msgs: list[Msg], marker: str) -> list[str]:
    """The topics of ``msgs`` that belong to this test (carry its marker)."""
    return [m.topic for m in msgs if marker in m.topic]


# -- PUBLISH ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_publish_allowed_and_denied_by_the_platform(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    platform.add(PA)
    platform.add(PB)
    front = await platform_front(make_front, platform, style)
    t = uid()
    spy = await spy_on(mosquitto)
    sub = await login(front, platform, PB, v5)
    assert await sub.subscribe("ff/v1/team1/p/+/out/#", qos=2) == [2]
    pub = await login(front, platform, PA, v5)
    own = f"ff/v1/team1/p/pa/out/{t}"  # a project's own broadcast: allowed
    foreign = f"ff/v1/team1/p/pb/out/{t}"  # another project's broadcast: FlowFuse denies it
    for qos in (0, 1, 2):
        assert await pub.publish(f"{foreign}/{qos}", b"evil", qos=qos) == puback_refused(v5, qos)
        assert await pub.publish(f"{own}/{qos}", b"ok", qos=qos) == 0  # the barrier, on the same connection
    got = await sub.until(f"{own}/2")
    assert mine(got, t) == [f"{own}/0", f"{own}/1", f"{own}/2"]
    assert mine(await spy.until(f"{own}/2"), t) == [f"{own}/0", f"{own}/1", f"{own}/2"]  # nothing else went up
    for qos in (0, 1, 2):
        assert asked_about(platform, style, f"{foreign}/{qos}") == ["publish"]
        assert asked_about(platform, style, f"{own}/{qos}") == ["publish", on_wire(style, "deliver")]
    for c in (spy, sub, pub):
        await c.close()


# -- cache TTLs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_publish_decisions_are_reused_for_their_ttl_then_asked_again(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    allowed, denied = f"ff/v1/team1/c/{t}/allowed", f"ff/v1/team1/c/{t}/denied"
    platform.add(PA, rules=[(allowed, "publish")])
    front = await platform_front(make_front, platform, style, cache_ttl=TTL, negative_cache_ttl=TTL)
    spy = await spy_on(mosquitto)
    client = await login(front, platform, PA, v5)
    barrier = f"ff/v1/team1/c/{t}/barrier"

    async def reaches_upstream(topic: str) -> bool:
        platform.set_rules(PA, [*rules, (barrier, "publish")])
        ack = await client.publish(topic, b"m", qos=1)
        assert await client.publish(barrier, qos=1) == 0
        seen = mine(await spy.until(barrier), t)
        if v5:  # v5 is told why (PUBACK 0x87); v3.1.1 gets a plain PUBACK either way
            assert (ack == 0) == (topic in seen)
        return topic in seen

    rules = [(allowed, "publish")]
    assert await reaches_upstream(allowed)
    assert await reaches_upstream(allowed)
    assert asked_about(platform, style, allowed) == ["publish"]  # the allow is reused
    rules = []  # the platform changes its answer: within cache_ttl the allow still serves ...
    assert await reaches_upstream(allowed)
    assert asked_about(platform, style, allowed) == ["publish"]
    await asyncio.sleep(TTL + 0.05)
    assert not await reaches_upstream(allowed)  # ... after it, the new answer counts
    assert asked_about(platform, style, allowed) == ["publish", "publish"]

    assert not await reaches_upstream(denied)
    rules = [(denied, "publish")]  # now allowed, but the deny is reused for negative_cache_ttl ...
    assert not await reaches_upstream(denied)
    assert asked_about(platform, style, denied) == ["publish"]
    await asyncio.sleep(TTL + 0.05)
    assert await reaches_upstream(denied)  # ... then asked again
    assert asked_about(platform, style, denied) == ["publish", "publish"]
    await client.close()
    await spy.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_delivery_decisions_are_reused_for_their_ttl_then_asked_again(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    space = f"ff/v1/team1/c/{t}"
    topic, barrier = f"{space}/news", f"{space}/barrier"
    platform.add(PA, rules=[(f"{space}/#", "subscribe")])
    front = await platform_front(make_front, platform, style, cache_ttl=TTL, negative_cache_ttl=TTL)
    sub = await login(front, platform, PA, v5)
    assert await sub.subscribe(f"{space}/#", qos=1) == [1]
    publisher = await direct(mosquitto)

    async def delivered() -> bool:
        assert await publisher.publish(topic, b"m", qos=1) == 0
        assert await publisher.publish(barrier, qos=1) == 0
        return topic in topics(await sub.until(barrier))

    assert await delivered()
    assert await delivered()
    assert asked_about(platform, style, topic) == [on_wire(style, "deliver")]
    platform.set_rules(PA, [(barrier, "subscribe")])  # reading `topic` revoked: served from the cache ...
    assert await delivered()
    await asyncio.sleep(TTL + 0.05)
    assert not await delivered()  # ... until cache_ttl has passed
    assert asked_about(platform, style, topic) == [on_wire(style, "deliver")] * 2
    await sub.close()
    await publisher.close()


# -- SUBSCRIBE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_subscribe_is_checked_filter_by_filter(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    platform.add(PA)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    t = uid()
    client = await login(front, platform, PA, v5)
    broadcasts = "ff/v1/team1/p/+/out/#"  # any project's broadcasts of the team: allowed
    foreign = "ff/v1/team2/p/+/out/#"  # another team's: denied
    inbox = f"ff/v1/team1/p/pa/in/{t}/#"  # its own inbox: allowed
    assert await client.subscribe(broadcasts, foreign, inbox, qos=1) == [1, suback_refused(v5), 1]
    # The platform was asked about each filter as the client sent it (EMQX: the filter itself, go-auth: acc 4).
    assert [(a, topic) for _, a, topic in asked(platform, style)] == [
        ("subscribe", broadcasts), ("subscribe", foreign), ("subscribe", inbox)
    ]
    publisher = await direct(mosquitto)
    for topic in (f"ff/v1/team2/p/pc/out/{t}", f"ff/v1/team1/p/pb/out/{t}", f"ff/v1/team1/p/pa/in/{t}/x"):
        assert await publisher.publish(topic, qos=1) == 0
    # The refused filter never reached Mosquitto: team2's message is not even offered to the session.
    got = await client.until(f"ff/v1/team1/p/pa/in/{t}/x")
    assert mine(got, t) == [f"ff/v1/team1/p/pb/out/{t}", f"ff/v1/team1/p/pa/in/{t}/x"]
    assert asked_about(platform, style, f"ff/v1/team2/p/pc/out/{t}") == []
    # The answers are reused (within cache_ttl / negative_cache_ttl) for the next SUBSCRIBE.
    assert await client.subscribe(broadcasts, foreign, qos=1) == [1, suback_refused(v5)]
    assert asked_about(platform, style, broadcasts) == ["subscribe"]
    assert asked_about(platform, style, foreign) == ["subscribe"]
    await client.close()
    await publisher.close()


# -- will -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_will_topic_is_checked(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    platform.add(PA)
    platform.add(PB)
    front = await platform_front(make_front, platform, style)
    t = uid()
    own_will = f"ff/v1/team1/p/pa/out/{t}/status"
    foreign_will = f"ff/v1/team1/p/pb/out/{t}/status"  # pb's broadcast: pa may not publish there
    # A denied will refuses the CONNECT (after a successful login: the platform's answer on the will decides).
    assert await connack(
        front, PA, platform.passwords[PA], v5, client_id=f"{PA}:n", will=Will(foreign_will, b"gone", 1, False)
    ) == code(v5, NOT_AUTHORIZED)
    assert asked(platform, style) == [(PA, "publish", foreign_will)]
    watcher = await login(front, platform, PB, v5)
    assert await watcher.subscribe(f"ff/v1/team1/p/pa/out/{t}/#", qos=1) == [1]
    dying = await login(front, platform, PA, v5, will=Will(own_will, b"gone", 1, False))
    assert asked_about(platform, style, own_will) == ["publish"]
    dying.abort()  # no DISCONNECT: Mosquitto publishes the will
    msg = await watcher.next_message()
    assert (msg.topic, msg.payload) == (own_will, b"gone")
    # A will the platform cannot be asked about is refused too (fail closed), as "server unavailable": the
    # client is told to retry later, not that its will is forbidden.
    acl_log(platform, style).fail = 503
    assert await connack(
        front, PA, platform.passwords[PA], v5, client_id=f"{PA}:x", will=Will(f"{own_will}/2", b"gone", 0, False)
    ) == code(v5, SERVER_UNAVAILABLE)
    s = await metrics_of(front)
    assert s.get("mqtt_front_denials_total", action="will", team="team1") == 2
    assert s.get("mqtt_front_connect_attempts_total", result="not_authorized") == 1
    assert s.get("mqtt_front_connect_attempts_total", result="auth_unavailable") == 1
    await watcher.close()
    await dying.close()


# -- deliveries -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_deliveries_are_checked_on_the_literal_topic(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    space = f"ff/v1/team1/c/{t}"
    # FlowFuse matches a filter as if it were a topic: the rule foo/+ lets the client subscribe foo/#. EMQX then
    # delivers foo/a/b too; the front broker asks about the literal topic of every delivery and drops it.
    platform.add(PA, rules=[(f"{space}/foo/+", "both")])
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    client = await login(front, platform, PA, v5)
    assert await client.subscribe(f"{space}/foo/#", qos=1) == [1]
    publisher = await direct(mosquitto)
    for topic in (f"{space}/foo/a", f"{space}/foo/a/b", f"{space}/foo/z"):
        for qos in (0, 1, 2):
            assert await publisher.publish(topic, f"{qos}".encode(), qos=qos) == 0
    got = await client.until(f"{space}/foo/z")
    got += [await client.next_message() for _ in range(2)]
    assert [(m.topic, m.payload) for m in got] == [
        (f"{space}/foo/a", b"0"), (f"{space}/foo/a", b"1"), (f"{space}/foo/a", b"2"),
        (f"{space}/foo/z", b"0"), (f"{space}/foo/z", b"1"), (f"{space}/foo/z", b"2"),
    ]
    deliver = on_wire(style, "deliver")
    assert asked_about(platform, style, f"{space}/foo/a/b") == [deliver]  # asked once; the deny is cached
    assert asked_about(platform, style, f"{space}/foo/a") == [deliver]
    s = await metrics_of(front)
    assert s.get("mqtt_front_denials_total", action="deliver", team="team1") == 3
    # The dropped QoS 1/2 deliveries were completed upstream on the client's behalf: the session goes on.
    assert await publisher.publish(f"{space}/foo/end", qos=2) == 0
    assert topics(await client.until(f"{space}/foo/end")) == [f"{space}/foo/end"]
    await client.close()
    await publisher.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_order_is_kept_while_checks_are_pending(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    platform.add(PA)
    platform.add(PB)
    front = await platform_front(make_front, platform, style, cache_ttl=30)
    sub = await login(front, platform, PB, v5)
    assert await sub.subscribe(f"ff/v1/team1/p/pa/out/{t}/#", qos=1) == [1]
    pub = await login(front, platform, PA, v5)
    warm = f"ff/v1/team1/p/pa/out/{t}/warm"
    assert await pub.publish(warm, b"warm-up", qos=1) == 0
    assert topics(await sub.until(warm)) == [warm]  # publish and delivery of `warm` are cached now
    acl_log(platform, style).delay = 0.03  # every fresh topic now waits for the platform, both ways
    sent = []
    for i in range(12):
        topic = warm if i % 3 == 1 else f"ff/v1/team1/p/pa/out/{t}/fresh{i}"  # cached ones behind pending ones
        pub.send(publish(topic, f"{i}".encode(), v5=v5, qos=i % 2, packet_id=100 + i))
        sent.append((topic, f"{i}".encode()))
    got = [await sub.next_message() for _ in sent]
    assert [(m.topic, m.payload) for m in got] == sent
    fresh = [topic for topic, _ in sent if topic != warm]
    for topic in fresh:
        assert asked_about(platform, style, topic) == ["publish", on_wire(style, "deliver")]
    await pub.close()
    await sub.close()


# -- coalescing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_concurrent_checks_of_one_topic_are_coalesced(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    topic = f"ff/v1/team1/p/pb/out/{t}"
    platform.add(PA)
    front = await platform_front(make_front, platform, style, cache_ttl=30)
    # Eight sessions of one identity (FlowFuse's HA instances: project:<team>:<project>:n:<hex>).
    subs = [await login(front, platform, PA, v5, client_id=f"{PA}:n:{i:04x}") for i in range(8)]
    for sub in subs:
        assert await sub.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    platform.acl.reset()
    platform.go_acl.reset()
    acl_log(platform, style).delay = 0.2  # the eight delivery checks overlap
    publisher = await direct(mosquitto)
    assert await publisher.publish(topic, b"one message, eight deliveries", qos=1) == 0
    for sub in subs:
        assert topics(await sub.until(topic)) == [topic]
    s = await metrics_of(front)
    if style == "emqx":
        # The identity, the topic and the action are the key: one request for all eight.
        assert asked(platform, style) == [(PA, "subscribe", topic)]
        assert s.get("mqtt_front_auth_coalesced_waits_total", backend="http") == 7
    else:
        # go-auth sends the client id, so the platform may answer per client: one request per session.
        assert sorted(r["clientid"] for r in platform.go_acl.requests) == [f"{PA}:n:{i:04x}" for i in range(8)]
        assert s.get("mqtt_front_auth_coalesced_waits_total", backend="http") == 0
    assert acl_log(platform, style).peak == (1 if style == "emqx" else 8)
    # A second message is answered from the cache: no request at all.
    before = acl_log(platform, style).count
    assert await publisher.publish(topic, b"again", qos=1) == 0
    for sub in subs:
        assert topics(await sub.until(topic)) == [topic]
    assert acl_log(platform, style).count == before
    for sub in (*subs, publisher):
        await sub.close()


# -- outage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_platform_outage_after_warm_up(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    platform.add(PA)
    platform.add(PB)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    spy = await spy_on(mosquitto)
    sub = await login(front, platform, PB, v5)
    assert await sub.subscribe(f"ff/v1/team1/p/pa/out/{t}/#", qos=1) == [1]
    pub = await login(front, platform, PA, v5)
    warm, denied = f"ff/v1/team1/p/pa/out/{t}/warm", f"ff/v1/team1/p/pb/out/{t}/denied"
    assert await pub.publish(warm, b"1", qos=1) == 0
    assert topics(await sub.until(warm)) == [warm]
    assert await pub.publish(denied, b"1", qos=1) == puback_refused(v5, 1)
    await platform.stop()  # the platform is gone: connection refused from now on

    # Cached decisions keep serving: the warm topic flows both ways, the cached deny still refuses.
    assert await pub.publish(warm, b"2", qos=1) == 0
    assert [(m.topic, m.payload) for m in await sub.until(warm)] == [(warm, b"2")]
    assert await pub.publish(denied, b"2", qos=1) == puback_refused(v5, 1)
    # A topic nobody checked yet is refused (fail closed), and the session goes on.
    fresh = f"ff/v1/team1/p/pa/out/{t}/fresh"
    assert await pub.publish(fresh, b"3", qos=1) == puback_refused(v5, 1)
    assert await pub.publish(warm, b"4", qos=1) == 0
    assert [(m.topic, m.payload) for m in await sub.until(warm)] == [(warm, b"4")]
    upstream = [m for _ in range(3) for m in await spy.until(warm) if t in m.topic]
    assert [(m.topic, m.payload) for m in upstream] == [(warm, b"1"), (warm, b"2"), (warm, b"4")]  # nothing else
    # A delivery on a topic the subscriber never read is refused too.
    publisher = await direct(mosquitto)
    assert await publisher.publish(fresh, b"5", qos=1) == 0
    assert await pub.publish(warm, b"6", qos=1) == 0
    assert [(m.topic, m.payload) for m in await sub.until(warm)] == [(warm, b"6")]
    # Subscriptions too: a filter asked about before is answered from the cache, a new one is refused.
    assert await sub.subscribe(f"ff/v1/team1/p/pa/out/{t}/#", f"ff/v1/team1/p/pb/out/{t}/#", qos=1) == [
        1, suback_refused(v5)
    ]
    # New logins are refused as "server unavailable" (CONNACK 0x88 / 0x03).
    assert await connack(front, PA, platform.passwords[PA], v5, client_id=f"{PA}:late") == code(
        v5, SERVER_UNAVAILABLE
    )
    s = await metrics_of(front)
    assert requests_total(s, "acl", "error") == 3  # fresh (its publish and its delivery), the new filter
    assert requests_total(s, "auth", "error") == 1
    assert s.get("mqtt_front_connect_attempts_total", result="auth_unavailable") == 1
    for c in (spy, sub, pub, publisher):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_a_subscribe_of_100_filters_during_an_outage_is_refused_after_one_request_each(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    """Errors are not cached: each filter's answer lives only in the session until the SUBSCRIBE is
    answered. With more than 64 filters (100 may come in one packet), those answers were dropped and the
    SUBSCRIBE asked the platform again from its first filter without end, never answered."""
    platform.add(PA)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    client = await login(front, platform, PA, v5)
    acl_log(platform, style).fail = 503
    t = uid()
    filters = [f"ff/v1/team1/p/pa/in/{t}/{i}" for i in range(100)]
    async with asyncio.timeout(10):
        assert await client.subscribe(*filters, qos=1) == [suback_refused(v5)] * 100
    assert sorted(topic for _, _, topic in asked(platform, style)) == sorted(filters)  # each once
    acl_log(platform, style).fail = None
    assert await client.subscribe(filters[0], qos=1) == [1]  # the session goes on
    await client.close()


# -- metrics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_auth_metrics_after_known_traffic(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    t = uid()
    platform.add(PA)
    platform.add(PB)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    before = await metrics_of(front)
    results = ("allow", "deny", "error", "timeout")
    assert all(requests_total(before, k, r) == 0 for k in ("auth", "acl") for r in results)

    sub = await login(front, platform, PA, v5)  # auth allow 1
    assert await connack(front, PA, "wrong", v5) == code(v5, BAD_CREDENTIALS)  # auth deny 1
    broadcasts = f"ff/v1/team1/p/pb/out/{t}/#"
    assert await sub.subscribe(broadcasts, "ff/v1/team2/#", qos=1) == [1, suback_refused(v5)]  # acl allow, deny
    pub = await login(front, platform, PB, v5)  # auth allow 2
    topic, denied = f"ff/v1/team1/p/pb/out/{t}/x", f"ff/v1/team1/p/pa/out/{t}/x"
    for _ in range(3):
        # The first publish and its delivery ask (acl allow 2 and 3); the others take the sessions' fast paths.
        assert await pub.publish(topic, qos=1) == 0
    assert topics([await sub.next_message() for _ in range(3)]) == [topic] * 3
    for _ in range(2):
        assert await pub.publish(denied, qos=1) == puback_refused(v5, 1)  # acl deny 2, then a cache hit
    second = await login(front, platform, PB, v5)  # auth allow 3
    # A new session of the identity: EMQX's key (username, topic, action) is answered by the platform client's
    # cache; go-auth's carries the client id, so the new client asks (acl allow 4).
    assert await second.publish(topic, qos=1) == 0
    shared = style == "emqx"
    assert topics([await sub.next_message()]) == [topic]
    acl_log(platform, style).fail = 500
    assert await pub.publish(f"ff/v1/team1/p/pb/out/{t}/500", qos=1) == puback_refused(v5, 1)  # acl error
    acl_log(platform, style).fail = None
    acl_log(platform, style).delay = TIMEOUT + 0.2
    assert await pub.publish(f"ff/v1/team1/p/pb/out/{t}/slow", qos=1) == puback_refused(v5, 1)  # acl timeout
    auth_log(platform, style).fail = 503
    assert await connack(front, PB, platform.passwords[PB], v5, client_id=f"{PB}:late") == code(
        v5, SERVER_UNAVAILABLE
    )  # auth error

    s = await metrics_of(front)
    assert {r: requests_total(s, "auth", r) for r in ("allow", "deny", "error", "timeout")} == {
        "allow": 3, "deny": 1, "error": 1, "timeout": 0
    }
    assert {r: requests_total(s, "acl", r) for r in ("allow", "deny", "error", "timeout")} == {
        "allow": 3 if shared else 4, "deny": 2, "error": 1, "timeout": 1
    }
    # Hits: the second denied publish (and, emqx, the second session's publish). Misses: every request.
    assert s.get("mqtt_front_auth_cache_hits_total", backend="http") == (2 if shared else 1)
    assert s.get("mqtt_front_auth_cache_misses_total", backend="http") == (7 if shared else 8)
    assert s.get("mqtt_front_auth_coalesced_waits_total", backend="http") == 0
    assert s.get("mqtt_front_auth_cache_entries", backend="http") == (5 if shared else 6)  # allows and denies
    assert s.get("mqtt_front_auth_in_flight", backend="http") == 0
    # Every request is timed, the timed-out one too: 5 logins and the ACL requests.
    assert s.get("mqtt_front_auth_request_seconds_count", backend="http") == (12 if shared else 13)
    assert connect_results(s) == {"ok": 3, "bad_credentials": 1, "auth_unavailable": 1}
    assert s.get("mqtt_front_denials_total", action="publish", team="team1") == 4
    assert s.get("mqtt_front_denials_total", action="subscribe", team="team1") == 1
    # No label finer than backend/kind/result: no username, topic or client id in the auth families.
    for (name, labels), _ in s.samples.items():
        if name.startswith("mqtt_front_auth"):
            assert {k for k, _ in labels} <= {"backend", "kind", "result", "le"}, (name, labels)
    assert t not in s.text and PA not in s.text and PB not in s.text
    for c in (sub, pub, second):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_platform_decisions_expire_behind_a_jwt_acl_claim(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    """A JWT's ACL claim comes first; what it does not match falls to the platform, with the platform's TTLs."""
    t = uid()
    space = f"ff/v1/team1/c/{t}"
    user = "project:team1:pj"
    platform.add(user, rules=[(f"{space}/#", "subscribe")])  # the platform decides what the claim does not
    secret = "a-test-secret-of-at-least-32-bytes!"
    http = platform.emqx_config() if style == "emqx" else platform.go_auth_config()
    front = await make_front(
        auth={
            "http": {**http, "timeout": 0.5, "cache_ttl": TTL, "negative_cache_ttl": TTL},
            "jwt": {"secret": secret, "algorithms": ["HS256"]},
        },
        acl={"source": "http"},
    )
    claims = {"sub": user, "exp": int(time.time()) + 60, "acl": [
        {"permission": "allow", "action": "publish", "topic": f"{space}/claimed/#"}
    ]}
    token = pyjwt.encode(claims, secret, algorithm="HS256")
    client = await connect_ok(front_port(front), user, v5, client_id=f"{user}:n", password=token)
    assert auth_log(platform, style).count == 0  # the token decided the login
    assert await client.subscribe(f"{space}/#", qos=1) == [1]  # no claim for it: the platform allowed it
    assert await client.publish(f"{space}/claimed/x", qos=1) == 0  # the claim allows it, the platform is not asked
    assert asked_about(platform, style, f"{space}/claimed/x") == [on_wire(style, "deliver")]
    publisher = await direct(mosquitto)
    topic, barrier = f"{space}/news", f"{space}/barrier"

    async def delivered() -> bool:
        assert await publisher.publish(topic, b"m", qos=1) == 0
        assert await publisher.publish(barrier, qos=1) == 0
        return topic in topics(await client.until(barrier))

    assert await delivered()
    platform.set_rules(user, [(barrier, "subscribe")])  # reading `topic` revoked
    assert await delivered()  # within cache_ttl
    await asyncio.sleep(TTL + 0.05)
    assert not await delivered()  # after it: the platform's new answer counts behind the claim too
    await client.close()
    await publisher.close()


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_a_will_behind_a_jwt_acl_claim_the_platform_cannot_answer_is_server_unavailable(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    """No claim matches the will: the platform decides it, and it does not answer. The client is told to
    retry later (0x88 / 0x03), as without a token, not that its will is forbidden (0x87 / 0x05)."""
    user = "project:team1:pj"
    platform.add(user)
    secret = "a-test-secret-of-at-least-32-bytes!"
    http = platform.emqx_config() if style == "emqx" else platform.go_auth_config()
    front = await make_front(
        auth={"http": {**http, "timeout": 0.5}, "jwt": {"secret": secret, "algorithms": ["HS256"]}},
        acl={"source": "http"},
    )
    claims = {"sub": user, "exp": int(time.time()) + 60, "acl": [
        {"permission": "allow", "action": "publish", "topic": "ff/v1/team1/c/claimed/#"}
    ]}
    token = pyjwt.encode(claims, secret, algorithm="HS256")
    acl_log(platform, style).fail = 503
    will = Will("ff/v1/team1/p/pj/out/status", b"gone", 1, False)
    assert await connack(front, user, token, v5, client_id=f"{user}:n", will=will) == code(v5, SERVER_UNAVAILABLE)
    acl_log(platform, style).fail = None
    assert await connack(front, user, token, v5, client_id=f"{user}:n", will=will) == 0
