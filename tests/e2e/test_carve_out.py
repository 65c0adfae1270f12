"""Deny rules that carve out (docs/acl.md): real clients (aiomqtt) -> front broker -> real Mosquitto.

A filter wider than a deny rule is granted, and the front broker drops the deliveries on the denied
topics, retained ones included, acknowledging QoS 1/2 ones upstream on the client's behalf. A spy
straight on Mosquitto proves the carved-out messages were published (so their absence is the front
broker's doing), and barrier messages from the same publisher, which MQTT keeps in order, make the
negative checks exact without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import pytest

from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.raw_client import TIMEOUT

NOT_AUTHORIZED_V5, SUBACK_FAIL_V3 = 0x87, 0x80
USER = "plainuser"  # a plain user: preset none, the operator's rules only


def refused(v5: bool) -> int:
    return NOT_AUTHORIZED_V5 if v5 else SUBACK_FAIL_V3


def deny_sub(pattern: str, who: str = "any") -> dict[str, str]:
    return {"who": who, "effect": "deny", "action": "subscribe", "pattern": pattern}


def allow_both(pattern: str) -> dict[str, str]:
    return {"who": "any", "effect": "allow", "action": "both", "pattern": pattern}


@asynccontextmanager
async def mqtt(port: int, username: str | None, v5: bool) -> AsyncIterator[aiomqtt.Client]:
    """A connected aiomqtt client; its client id is `<username>:<random>` (the prefix rule)."""
    version = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    ident = f"{username or 'spy'}:{uid()}"
    password = PASSWORD if username else None
    async with aiomqtt.Client(
        "127.0.0.1", port, username=username, password=password, identifier=ident, protocol=version
    ) as client:
        yield client


async def subscribe(client: aiomqtt.Client, *filters: str, qos: int = 2) -> list[int]:
    """One SUBSCRIBE with every filter; the SUBACK's codes (granted QoS, or the refusal code)."""
    codes: Any = await client.subscribe([(f, qos) for f in filters], timeout=TIMEOUT)
    return [int(getattr(code, "value", code)) for code in codes]


async def until(client: aiomqtt.Client, topic: str) -> list[aiomqtt.Message]:
    """Every message received up to and including the first one on `topic`."""
    seen: list[aiomqtt.Message] = []
    async with asyncio.timeout(TIMEOUT):
        async for message in client.messages:
            seen.append(message)
            if str(message.topic) == topic:
                return seen
    raise AssertionError("unreachable: the iterator never ends while connected")


def topics(messages: list[aiomqtt.Message], within: str = "") -> list[str]:
    return [str(m.topic) for m in messages if str(m.topic).startswith(within)]


# -- the Paho interop suite's case: deny subscribe test/nosubscribe, allow # -------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_paho_nosubscribe(make_front: FrontFactory, mosquitto: Mosquitto, v5: bool) -> None:
    front = await make_front(acl={"preset": "none", "rules": [deny_sub("test/nosubscribe"), allow_both("#")]})
    port, t = front_port(front), uid()
    barrier = f"test/{t}/ok"
    async with (
        mqtt(mosquitto.port, None, v5) as spy,
        mqtt(port, USER, v5) as sub,
        mqtt(port, USER, v5) as pub,
    ):
        assert await subscribe(spy, "test/#") == [2]
        # `#` is granted with test/nosubscribe carved out; test/nosubscribe itself is refused (one SUBSCRIBE).
        assert await subscribe(sub, "#", "test/nosubscribe") == [2, refused(v5)]
        assert await subscribe(sub, "test/nosubscribe") == [refused(v5)]
        for qos in (0, 1, 2):
            await pub.publish("test/nosubscribe", f"carved {qos}".encode(), qos=qos)
        await pub.publish(f"test/{t}/other", b"kept", qos=1)
        # QoS 2: paho hands a QoS 2 message over at PUBREL, so only a QoS 2 barrier comes after them all.
        await pub.publish(barrier, qos=2)
        assert topics(await until(sub, barrier), "test/") == [f"test/{t}/other", barrier]
        seen = await until(spy, barrier)
        assert sorted(topics(seen)) == sorted([*["test/nosubscribe"] * 3, f"test/{t}/other", barrier])


# -- the case: deny ff/v1/${team}/c/secret/# on top of the flowfuse preset ---------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_flowfuse_preset_with_a_secret_carve_out(make_front: FrontFactory, v5: bool) -> None:
    secret = deny_sub("ff/v1/${team}/c/secret/#", who="project")
    front = await make_front(acl={"preset": "flowfuse", "rules": [secret]})
    port, t = front_port(front), uid()
    barrier = f"ff/v1/team1/c/{t}/ok"
    async with mqtt(port, "project:team1:p1", v5) as sub, mqtt(port, "project:team1:p2", v5) as pub:
        assert await subscribe(sub, "ff/v1/team1/c/#") == [2]
        assert await subscribe(sub, "ff/v1/team1/c/secret/#", "ff/v1/team1/c/secret/x") == [refused(v5)] * 2
        assert await subscribe(sub, "ff/v1/team2/c/#") == [refused(v5)]  # the carve-out widens nothing
        await pub.publish(f"ff/v1/team1/c/secret/{t}", b"secret", qos=1)
        await pub.publish("ff/v1/team1/c/secret", b"secret", qos=2)
        await pub.publish(barrier, b"open", qos=2)  # after the QoS 2 one (see test_paho_nosubscribe)
        assert topics(await until(sub, barrier)) == [barrier]


# -- FlowFuse's case: allow foo/bar/#, deny foo/bar/ben (listed first: first match) -----------------------


def ben_rules(root: str) -> dict[str, Any]:
    return {"preset": "none", "rules": [deny_sub(f"{root}/foo/bar/ben"), allow_both(f"{root}/foo/bar/#")]}


@pytest.mark.parametrize("v5", VERSIONS)
async def test_retained_on_the_carved_out_topic_is_not_delivered(make_front: FrontFactory, v5: bool) -> None:
    root = f"r{uid()}"  # this test's own retained messages
    front = await make_front(acl=ben_rules(root))
    port, bar = front_port(front), f"{root}/foo/bar"
    async with mqtt(port, USER, v5) as pub:
        try:
            await pub.publish(f"{bar}/ben", b"ben's", qos=1, retain=True)
            await pub.publish(f"{bar}/bob", b"bob's", qos=1, retain=True)
            for topic_filter in (f"{bar}/#", f"{bar}/+"):
                async with mqtt(port, USER, v5) as sub:
                    assert await subscribe(sub, topic_filter, qos=1) == [1]
                    await pub.publish(f"{bar}/ben", b"live", qos=1)
                    await pub.publish(f"{bar}/end", b"end", qos=1)
                    seen = await until(sub, f"{bar}/end")
                    assert [(str(m.topic), m.payload, m.retain) for m in seen] == [
                        (f"{bar}/bob", b"bob's", True),
                        (f"{bar}/end", b"end", False),
                    ]
            async with mqtt(port, USER, v5) as sub:
                # Refused, so never sent upstream: no retained message comes of it.
                assert await subscribe(sub, f"{bar}/ben", f"{bar}/bob", f"{bar}/end", qos=1) == [refused(v5), 1, 1]
                await pub.publish(f"{bar}/end", qos=1)
                assert topics(await until(sub, f"{bar}/end")) == [f"{bar}/bob", f"{bar}/end"]
        finally:
            for name in ("ben", "bob"):
                await pub.publish(f"{bar}/{name}", b"", qos=1, retain=True)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_carved_out_qos1_and_qos2_deliveries_do_not_wedge_the_session(
    make_front: FrontFactory, mosquitto: Mosquitto, v5: bool
) -> None:
    root = f"r{uid()}"
    front = await make_front(acl=ben_rules(root))
    port, bar = front_port(front), f"{root}/foo/bar"
    async with (
        mqtt(mosquitto.port, None, v5) as spy,
        mqtt(port, USER, v5) as sub,
        mqtt(port, USER, v5) as pub,
    ):
        assert await subscribe(spy, f"{bar}/#") == [2]
        assert await subscribe(sub, f"{bar}/#") == [2]
        # More than Mosquitto's in-flight window (max_inflight_messages 20): unacknowledged, they would stall it.
        for i in range(30):
            await pub.publish(f"{bar}/ben", f"carved {i}".encode(), qos=1 + i % 2)
        await pub.publish(f"{bar}/bob", b"one", qos=1)
        await pub.publish(f"{bar}/bob2", b"two", qos=2)
        seen = await until(sub, f"{bar}/bob2")
        assert [(str(m.topic), m.payload, m.qos) for m in seen] == [
            (f"{bar}/bob", b"one", 1),
            (f"{bar}/bob2", b"two", 2),
        ]
        # paho hands a QoS 2 message over at PUBREL: the spy's QoS 1 and 2 messages may interleave.
        assert sorted(topics(await until(spy, f"{bar}/bob2"))) == [*[f"{bar}/ben"] * 30, f"{bar}/bob", f"{bar}/bob2"]
        # And again: the dropped flows are complete, nothing waits upstream.
        for qos in (2, 1):
            await pub.publish(f"{bar}/ben", qos=qos)
        await pub.publish(f"{bar}/bob", b"three", qos=2)
        assert [(str(m.topic), m.payload) for m in await until(sub, f"{bar}/bob")] == [(f"{bar}/bob", b"three")]
