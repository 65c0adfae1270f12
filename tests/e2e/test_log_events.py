"""Structured log events of a running front broker: JSON lines with stable event names, rate-limited denials,
no secrets (the formatting alone: tests/unit/test_logs.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import aiomqtt
import pytest

from broker.logs import JsonFormatter
from tests.support.front import PASSWORD, FrontFactory, front_port
from tests.support.ports import free_port

TIMEOUT = 10.0
PAYLOAD = b"payload-" + uuid.uuid4().hex.encode()
WRONG = "wrong-" + uuid.uuid4().hex


def client(port: int, user: str, password: str = PASSWORD, **kwargs: Any) -> aiomqtt.Client:
    kwargs.setdefault("identifier", f"{user}:{uuid.uuid4().hex[:8]}")
    return aiomqtt.Client("127.0.0.1", port, username=user, password=password, timeout=TIMEOUT, **kwargs)


def events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in caplog.records]


async def wait_for_event(caplog: pytest.LogCaptureFixture, name: str, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not any(getattr(r, "event", None) == name for r in caplog.records):
            await asyncio.sleep(0.02)


async def test_json_events_and_no_secrets(make_front: FrontFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_front")
    front = await make_front()
    port = front_port(front)
    async with client(port, "project:team1:p1") as c:
        await c.publish("ff/v1/team1/p/p1/out/x", PAYLOAD, qos=1)
        await c.publish("ff/v1/team2/p/p3/in/x", PAYLOAD, qos=1)  # denied
        await c.subscribe("ff/v1/team2/#")  # denied
    with pytest.raises(aiomqtt.MqttError):
        async with client(port, "project:team1:p1", password=WRONG):
            pass
    dead = await make_front(upstream={"url": f"mqtt://127.0.0.1:{free_port()}", "connect_timeout": 1})
    with pytest.raises(aiomqtt.MqttError):
        async with client(front_port(dead), "project:team1:p2"):
            pass
    await wait_for_event(caplog, "disconnect")

    lines = events(caplog)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if "event" in line:
            by_event.setdefault(line["event"], []).append(line)
    assert {"connect", "connect_refused", "deny", "disconnect", "upstream_error"} <= set(by_event)

    connect = by_event["connect"][0]
    assert connect["user"] == "project:team1:p1" and connect["team"] == "team1" and connect["protocol"] == "3.1.1"
    denies = {d["action"]: d for d in by_event["deny"]}
    assert denies["publish"]["topic"] == "ff/v1/team2/p/p3/in/x"
    assert denies["publish"]["rule"] == "default deny"
    assert denies["subscribe"]["topic"] == "ff/v1/team2/#"
    refused = [r for r in by_event["connect_refused"] if r.get("result") == "bad_credentials"]
    assert refused and refused[0]["user"] == "project:team1:p1"
    unavailable = [r for r in by_event["connect_refused"] if r.get("result") == "upstream_unavailable"]
    assert unavailable
    disconnect = by_event["disconnect"][0]
    assert isinstance(disconnect["duration"], float) and disconnect["reason"]
    assert by_event["upstream_error"][0]["level"] == "error"

    # Never a password or a payload, in the text or the JSON form of any line.
    texts = [r.getMessage() for r in caplog.records] + [json.dumps(line) for line in lines]
    for text in texts:
        assert PASSWORD not in text and WRONG not in text
        assert PAYLOAD.decode() not in text


async def test_deny_flood_is_rate_limited(make_front: FrontFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_front.session")
    front = await make_front()
    flood = 500
    async with client(front_port(front), "project:team1:p1") as c:
        for i in range(flood):
            await c.publish(f"ff/v1/team2/p/p3/in/{i}", b"x", qos=0)
        await c.publish("ff/v1/team1/p/p1/out/sync", b"x", qos=1)  # acked after all the above were handled
        await asyncio.sleep(1.1)  # one token back
        await c.publish("ff/v1/team2/p/p3/in/last", b"x", qos=1)
    denies = [r for r in caplog.records if getattr(r, "event", None) == "deny"]
    assert 2 <= len(denies) <= 15  # the burst (10), plus what one second refills
    suppressed = [r.event_fields.get("suppressed", 0) for r in denies]  # type: ignore[attr-defined]
    assert suppressed[-1] > 0  # the first line after the flood tells how many were dropped
    assert len(denies) + sum(suppressed) == flood + 1  # every denial is either logged or counted


