"""/metrics after real traffic: real clients -> front broker -> real Mosquitto, counters exact."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.ops import Scrape, scrape
from tests.support.ports import free_port

TIMEOUT = 10.0
METRICS = {"bind": "127.0.0.1:0"}
ALLOWED_LABELS = {
    "le",
    "listener",
    "team",
    "direction",
    "action",
    "result",
    "type",
    "upstream",
    "version",
    "backend",
    "reason",
    "limit",
}
# Who sends which packet (MQTT 5.0 section 2.1.2): in = from clients, out = from the upstream.
BOTH_WAYS = {"publish", "puback", "pubrec", "pubrel", "pubcomp", "disconnect", "auth"}
PACKETS_IN = {"connect", "subscribe", "unsubscribe", "pingreq"} | BOTH_WAYS
PACKETS_OUT = {"connack", "suback", "unsuback", "pingresp"} | BOTH_WAYS


def publish_size(topic: str, payload: bytes, qos: int) -> int:
    """Size of an MQTT 3.1.1 PUBLISH packet."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    length = 1
    n = body
    while n > 127:
        n //= 128
        length += 1
    return 1 + length + body


def client(front: FrontBroker, user: str, **kwargs: Any) -> aiomqtt.Client:
    kwargs.setdefault("identifier", f"{user}:{uid()}")
    kwargs.setdefault("password", PASSWORD)
    return aiomqtt.Client("127.0.0.1", front_port(front), username=user, timeout=TIMEOUT, **kwargs)


async def wait_scrape(front: FrontBroker, ready: Any, timeout: float = TIMEOUT) -> Scrape:
    """Scrape until ``ready(scrape)`` holds (closing connections are counted a moment after the client leaves)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await scrape(front)
            if ready(result):
                return result
            await asyncio.sleep(0.05)


async def test_counters_after_real_traffic(make_front: FrontFactory, mosquitto: Mosquitto) -> None:
    # A persistent session subscribed before an ACL change is how a delivery gets denied:
    # front A (the preset) accepts the subscription; front B denies the topic at delivery time.
    p1_id = f"project:team1:p1:{uid()}"
    front_a = await make_front()
    async with client(front_a, "project:team1:p1", identifier=p1_id, clean_session=False) as c:
        await c.subscribe("ff/v1/team1/c/#", qos=1)
    secret = {"who": "project", "effect": "deny", "action": "both", "pattern": "ff/v1/team1/c/secret"}
    front = await make_front(metrics=METRICS, acl={"preset": "flowfuse", "rules": [secret]})
    up = f"127.0.0.1:{mosquitto.port}"

    before = await scrape(front)
    assert before.get("mqtt_front_build_info", version="0.1.0") == 1
    assert before.get("mqtt_front_connections", listener="mqtt", team="_none") == 0
    assert before.get("mqtt_front_upstream_connect_seconds_count", upstream=up) == 0

    sent_in: list[tuple[str, bytes]] = []
    delivered: list[tuple[str, bytes]] = []
    async with (
        client(front, "project:team1:p1", identifier=p1_id, clean_session=False) as sub,
        client(front, "project:team1:p2") as pub,
    ):
        await sub.subscribe("ff/v1/team1/p/p2/out/#", qos=1)
        await sub.subscribe("ff/v1/team2/#", qos=1)  # denied: another team's topics
        live = await scrape(front)
        assert live.get("mqtt_front_connections", listener="mqtt", team="team1") == 2
        assert live.get("mqtt_front_upstream_connections", upstream=up) == 2
        for i in range(5):
            topic, payload = f"ff/v1/team1/p/p2/out/t{i}", b"m" * (10 * i + 1)
            await pub.publish(topic, payload, qos=1)
            sent_in.append((topic, payload))
            delivered.append((topic, payload))
        cross = ("ff/v1/team2/p/p3/in/x", b"cross-team")
        await pub.publish(*cross, qos=1)  # denied publish (acknowledged, dropped)
        sent_in.append(cross)
        # Published directly upstream: the secret one reaches the persistent session and is denied.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, timeout=TIMEOUT) as direct:
            await direct.publish("ff/v1/team1/c/secret", b"hidden", qos=1)
            await direct.publish("ff/v1/team1/c/ok", b"fine", qos=1)
        delivered.append(("ff/v1/team1/c/ok", b"fine"))
        got = []
        async with asyncio.timeout(TIMEOUT):
            async for message in sub.messages:
                got.append((str(message.topic), bytes(message.payload)))
                if len(got) == len(delivered):
                    break
        assert sorted(got) == sorted(delivered)

    with pytest.raises(aiomqtt.MqttError):
        async with client(front, "project:team1:p2", password="wrong-password"):
            pass
    will = aiomqtt.Will("ff/v1/team1/c/x", b"bye")  # team2 may not leave a will in team1
    with pytest.raises(aiomqtt.MqttError):
        async with client(front, "project:team2:p3", will=will):
            pass

    s = await wait_scrape(
        front, lambda r: r.get("mqtt_front_connections_closed_total", listener="mqtt", team="team1") == 2
    )

    # Traffic, by team and direction: exactly what was sent and delivered.
    assert s.get("mqtt_front_messages_total", direction="in", team="team1") == 6
    assert s.get("mqtt_front_bytes_total", direction="in", team="team1") == sum(
        publish_size(t, p, 1) for t, p in sent_in
    )
    assert s.get("mqtt_front_messages_total", direction="out", team="team1") == 6
    assert s.get("mqtt_front_bytes_total", direction="out", team="team1") == sum(
        publish_size(t, p, 1) for t, p in delivered
    )
    # Denials by action and team.
    assert s.get("mqtt_front_denials_total", action="publish", team="team1") == 1
    assert s.get("mqtt_front_denials_total", action="subscribe", team="team1") == 1
    assert s.get("mqtt_front_denials_total", action="deliver", team="team1") == 1
    assert s.get("mqtt_front_denials_total", action="will", team="team2") == 1
    assert s.get("mqtt_front_denials_total", action="connect", team="_none") == 1
    denied = sum(s.series("mqtt_front_denials_total").values())
    assert denied == 5
    # Connect attempts by result.
    results = {dict(k)["result"]: v for k, v in s.series("mqtt_front_connect_attempts_total").items()}
    assert results == {
        "ok": 2,
        "bad_credentials": 1,
        "not_authorized": 1,
        "protocol_error": 0,
        "upstream_unavailable": 0,
        "auth_unavailable": 0,
        "limit": 0,
    }
    # Packets by type (in: from clients, out: from the upstream).
    assert s.get("mqtt_front_packets_total", direction="in", type="connect") == 4
    assert s.get("mqtt_front_packets_total", direction="in", type="publish") == 6
    assert s.get("mqtt_front_packets_total", direction="in", type="subscribe") == 2
    assert s.get("mqtt_front_packets_total", direction="out", type="connack") == 2
    assert s.get("mqtt_front_packets_total", direction="out", type="publish") == 7
    # Connections: accepted by listener, closed by listener and team, none open now.
    assert s.get("mqtt_front_connections_accepted_total", listener="mqtt") == 4
    assert s.get("mqtt_front_connections_closed_total", listener="mqtt", team="team2") == 1
    assert s.get("mqtt_front_connections_closed_total", listener="mqtt", team="_none") == 1
    assert sum(s.series("mqtt_front_connections").values()) == 0
    # Upstream: two connects observed, none failed, none open now.
    assert s.get("mqtt_front_upstream_connect_seconds_count", upstream=up) == 2
    assert s.get("mqtt_front_upstream_connect_failures_total", upstream=up) == 0
    assert s.get("mqtt_front_upstream_connections", upstream=up) == 0
    # Process collectors are there; no label finer than a team anywhere.
    assert "process_cpu_seconds_total" in s.names
    assert "python_gc_collections_total" in s.names
    for name, labels in s.samples:
        if name.startswith("mqtt_front_"):
            assert {k for k, _ in labels} <= ALLOWED_LABELS, (name, labels)
    assert "p1" not in s.text and "p2" not in s.text and "wrong-password" not in s.text


async def test_counters_never_go_backwards_when_sessions_close(make_front: FrontFactory) -> None:
    front = await make_front(metrics=METRICS)
    async with client(front, "project:team1:p1") as c:
        for _ in range(3):
            await c.publish("ff/v1/team1/p/p1/out/x", b"1", qos=1)
        live = await scrape(front)
        assert live.get("mqtt_front_messages_total", direction="in", team="team1") == 3
    closed = await wait_scrape(front, lambda r: r.get("mqtt_front_connections", listener="mqtt", team="team1") == 0)
    assert closed.get("mqtt_front_messages_total", direction="in", team="team1") == 3


async def test_upstream_unavailable_counts_failures(make_front: FrontFactory) -> None:
    port = free_port()  # nothing listens there
    front = await make_front(metrics=METRICS, upstream={"url": f"mqtt://127.0.0.1:{port}", "connect_timeout": 1})
    with pytest.raises(aiomqtt.MqttError):
        async with client(front, "project:team1:p1"):
            pass
    s = await wait_scrape(
        front, lambda r: r.get("mqtt_front_connect_attempts_total", result="upstream_unavailable") == 1
    )
    assert s.get("mqtt_front_upstream_connect_failures_total", upstream=f"127.0.0.1:{port}") == 1
    assert s.get("mqtt_front_connect_attempts_total", result="ok") == 0


async def test_team_label_cap_folds_into_other(make_front: FrontFactory) -> None:
    front = await make_front(metrics={"bind": "127.0.0.1:0", "max_teams": 2})
    # Teams get labels in the order they first authenticate: team1, team2, then team10 is "_other".
    for user, team in (("project:team1:p1", "team1"), ("project:team2:p3", "team2"), ("project:team10:p4", "team10")):
        project = user.rsplit(":", 1)[1]
        async with client(front, user) as c:
            await c.publish(f"ff/v1/{team}/p/{project}/out/x", b"hello", qos=1)
            await c.publish(f"ff/v1/{team}/p/{project}/out/x", b"hello", qos=1)
            await c.publish("elsewhere/topic", b"no", qos=1)  # denied
    # A plain user has no team: "_none", and it takes no team slot.
    async with client(front, "plainuser") as c:
        await c.publish("any/topic", b"no", qos=1)
    s = await wait_scrape(front, lambda r: sum(r.series("mqtt_front_connections_closed_total").values()) == 4)
    for label in ("team1", "team2", "_other"):
        assert s.get("mqtt_front_messages_total", direction="in", team=label) == 3
        assert s.get("mqtt_front_denials_total", action="publish", team=label) == 1
        assert s.get("mqtt_front_connections_closed_total", listener="mqtt", team=label) == 1
    assert s.get("mqtt_front_denials_total", action="publish", team="_none") == 1
    teams = set()
    for name in s.names:
        if name.startswith("mqtt_front_"):
            teams |= s.label_values(name, "team")
    assert teams == {"team1", "team2", "_other", "_none"}
    assert "team10" not in s.text


async def test_no_created_series_and_only_possible_packet_pairs(make_front: FrontFactory) -> None:
    front = await make_front(metrics=METRICS)
    # Traffic first: every kind of prometheus_client metric has a child by now (counters, histograms).
    async with client(front, "project:team1:p1") as c:
        await c.subscribe("ff/v1/team1/p/p1/out/#", qos=1)
        await c.publish("ff/v1/team1/p/p1/out/x", b"1", qos=2)
        await c.unsubscribe("ff/v1/team1/p/p1/out/#")
    s = await wait_scrape(front, lambda r: r.get("mqtt_front_connections_closed_total", listener="mqtt", team="team1"))
    # Counters and histograms of prometheus_client are there, and none has a _created twin.
    assert {"mqtt_front_connections_accepted_total", "mqtt_front_upstream_connect_seconds_count"} <= s.names
    assert not [name for name in s.names if name.endswith("_created")]
    assert "_created" not in s.text
    pairs = {(dict(labels)["direction"], dict(labels)["type"]) for labels in s.series("mqtt_front_packets_total")}
    assert pairs == {("in", t) for t in PACKETS_IN} | {("out", t) for t in PACKETS_OUT}
    assert ("in", "connack") not in pairs and ("out", "connect") not in pairs and ("out", "subscribe") not in pairs
    # The pairs that occurred are counted.
    assert s.get("mqtt_front_packets_total", direction="in", type="unsubscribe") == 1
    assert s.get("mqtt_front_packets_total", direction="out", type="unsuback") == 1
    assert s.get("mqtt_front_packets_total", direction="out", type="pubrec") == 1
    assert s.get("mqtt_front_packets_total", direction="in", type="pubrel") == 1
