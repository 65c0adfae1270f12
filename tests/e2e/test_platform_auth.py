"""The platform decides who logs in (``auth.http``), end to end, in both styles and both protocol versions.

Real parts: aiomqtt and raw-socket clients -> the front broker -> the module's real Mosquitto, and the front
broker's httpx client -> a FakePlatform (aiohttp) over loopback with FlowFuse's semantics. The platform's
request log is the witness for "asked exactly once"; a recording TCP relay in front of Mosquitto is the witness
for "the internal broker never sees a client's password". Counters come from the front's own /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from broker.mqtt.packets import PacketType, decode_connect
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import split_packets
from tests.support.net import Relay
from tests.support.platform import FakePlatform
from tests.support.platform_e2e import (
    BAD_CREDENTIALS,
    SERVER_UNAVAILABLE,
    STYLES,
    auth_bodies,
    auth_body,
    auth_log,
    code,
    connack,
    connect_results,
    direct,
    metrics_of,
    mqtt_client,
    platform_front,
    requests_total,
)
from tests.support.raw_client import connect_ok, topics

PROJECT = "project:team1:pa"
SHORT = 0.25  # auth.http.timeout of the tests that wait for it


# -- allow and deny ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_login_allowed_with_exactly_one_request(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    password = platform.add(PROJECT)
    front = await platform_front(make_front, platform, style)
    cid = f"{PROJECT}:n"
    async with mqtt_client(front, PROJECT, password, v5, identifier=cid) as client:
        assert auth_bodies(platform, style) == [auth_body(style, PROJECT, password, cid)]
        inbox = f"ff/v1/team1/p/pa/in/{uid()}"
        await client.subscribe("ff/v1/team1/p/pa/in/#", qos=1)
        await client.publish(inbox, b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(client.messages)
        assert (str(message.topic), message.payload) == (inbox, b"hello")
    assert auth_log(platform, style).count == 1  # the topic checks never log in again
    s = await metrics_of(front)
    assert connect_results(s) == {"ok": 1}
    assert requests_total(s, "auth", "allow") == 1
    assert sum(requests_total(s, "auth", r) for r in ("deny", "error", "timeout")) == 0


def _denials(style: str) -> list[tuple[str, Any]]:
    """Answers that refuse a login as bad credentials (the platform said no), per style."""
    if style == "emqx":
        return [("override", {"result": "deny"}), ("override", {"result": "ignore"}), ("override", lambda b: 403)]
    return [("override", lambda b: 401), ("override", lambda b: 403)]


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_platform_deny_is_bad_credentials(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    password = platform.add(PROJECT)
    front = await platform_front(make_front, platform, style)
    bad = code(v5, BAD_CREDENTIALS)
    assert await connack(front, PROJECT, password + "x", v5) == bad  # the fake's own check: wrong password
    assert await connack(front, "project:team1:ghost", password, v5) == bad  # unknown to the platform
    endpoint = auth_log(platform, style)
    for knob, value in _denials(style):
        setattr(endpoint, knob, value)
        assert await connack(front, PROJECT, password, v5) == bad, value
        setattr(endpoint, knob, None)
    assert await connack(front, PROJECT, password, v5) == 0  # positive control: the right password still works
    denied = 2 + len(_denials(style))
    assert endpoint.count == denied + 1  # one request per CONNECT, never retried
    s = await metrics_of(front)
    assert connect_results(s) == {"ok": 1, "bad_credentials": denied}
    assert requests_total(s, "auth", "deny") == denied and requests_total(s, "auth", "allow") == 1
    assert s.get("mqtt_front_denials_total", action="connect", team="_none") == denied


def _failures(style: str) -> list[tuple[str, str, Any, str]]:
    """(name, knob, value, counted result): the platform does not answer usefully."""
    common = [
        ("timeout", "delay", SHORT + 0.2, "timeout"),
        ("500", "fail", 500, "error"),
        ("503", "fail", 503, "error"),
    ]
    if style == "emqx":
        return [
            *common,
            ("garbage body", "garbage", b"<html>oops</html>", "error"),
            ("unexpected JSON", "override", {"result": "maybe"}, "error"),
            ("JSON without a verdict", "override", {"allow": True}, "error"),
        ]
    # go-auth reads only the status (any 2xx allows): its failures are other statuses.
    return [*common, ("redirect", "override", lambda b: (302, b"elsewhere"), "error")]


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_platform_failure_fails_closed(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool, caplog: pytest.LogCaptureFixture
) -> None:
    password = platform.add(PROJECT)
    front = await platform_front(make_front, platform, style, timeout=SHORT)
    endpoint = auth_log(platform, style)
    unavailable = code(v5, SERVER_UNAVAILABLE)
    failures = _failures(style)
    with caplog.at_level(logging.WARNING):
        for name, knob, value, _ in failures:
            setattr(endpoint, knob, value)
            started = time.monotonic()
            assert await connack(front, PROJECT, password, v5) == unavailable, name
            assert time.monotonic() - started < SHORT + 0.2, name  # the timeout bounds the wait
            endpoint.reset()
        assert endpoint.count == 0
        assert await connack(front, PROJECT, password, v5) == 0  # it answers again: logins work again
        await platform.stop()  # nothing listens any more: connection refused
        assert await connack(front, PROJECT, password, v5) == unavailable
    s = await metrics_of(front)
    assert connect_results(s) == {"ok": 1, "auth_unavailable": len(failures) + 1}
    timeouts = sum(1 for f in failures if f[3] == "timeout")
    assert requests_total(s, "auth", "timeout") == timeouts
    assert requests_total(s, "auth", "error") == len(failures) - timeouts + 1
    assert requests_total(s, "auth", "allow") == 1 and requests_total(s, "auth", "deny") == 0
    # Failures are said (platform_error, rate-limited), and a refusal is not a denial of the client.
    assert any(getattr(r, "event", None) == "platform_error" for r in caplog.records)
    assert all(password not in r.getMessage() for r in caplog.records)
    assert s.get("mqtt_front_denials_total", action="connect", team="_none") == 0


# -- one-time credentials ---------------------------------------------------------------------------------

# (username, a filter its platform rules allow, a topic under it) as FlowFuse's browser and assistant use them.
ONE_TIME = [
    pytest.param("frontend:team1:d1", "ff/v1/team1/d/d1/logs", "ff/v1/team1/d/d1/logs", id="frontend"),
    pytest.param("fe-team:u1:team1:s1", "ff/v1/team1/u/u1/s/s1/#", "ff/v1/team1/u/u1/s/s1/x", id="fe-team"),
    pytest.param("expert-client:u1:s1", "ff/v1/expert/u1/s1/#", "ff/v1/expert/u1/s1/x", id="expert-client"),
]


@pytest.mark.parametrize(("username", "allowed_filter", "topic"), ONE_TIME)
@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_one_time_credential_is_checked_exactly_once(
    make_front: FrontFactory,
    mosquitto: Mosquitto,
    platform: FakePlatform,
    style: str,
    v5: bool,
    username: str,
    allowed_filter: str,
    topic: str,
) -> None:
    password = platform.add(username)
    tap = await Relay(mosquitto.port).start()  # records what the internal broker is sent
    front_identity = {"url": f"mqtt://127.0.0.1:{tap.port}", "username": "frontsvc", "password": "front-secret"}
    front = await platform_front(make_front, platform, style, upstream=front_identity)
    try:
        client = await connect_ok(front_port(front), username, v5, client_id=username, password=password)
        assert auth_bodies(platform, style) == [auth_body(style, username, password, username)]
        assert platform.consumed == [username]
        # The session works after the one check: a subscription and a delivery the platform allows.
        assert await client.subscribe(allowed_filter, qos=1) == [1]
        publisher = await direct(mosquitto)
        assert await publisher.publish(topic, b"log line", qos=1) == 0
        assert topics(await client.until(topic)) == [topic]
        await client.disconnect()
        await publisher.close()
        # The platform deleted it: a second CONNECT with it is refused (and asked once more, never retried).
        assert await connack(front, username, password, v5) == code(v5, BAD_CREDENTIALS)
        assert auth_log(platform, style).count == 2
        assert platform.consumed == [username]
        # The internal broker never saw the password: the front broker logged in as itself.
        sent = bytes(tap.upstream_bytes)
        assert password.encode() not in sent
        first = split_packets(sent[: _packet_end(sent)])[0]
        assert first[0] >> 4 == PacketType.CONNECT
        upstream_connect = decode_connect(first, 0, len(first))
        assert (upstream_connect.username, upstream_connect.password) == ("frontsvc", b"front-secret")
        assert upstream_connect.client_id == username
    finally:
        await tap.stop()


def _packet_end(data: bytes) -> int:
    """The end of the first packet in ``data``."""
    length, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if byte < 0x80:
            return i + length


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_one_time_credential_on_a_slow_platform_is_never_retried(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool
) -> None:
    username = "frontend:team1:d1"
    password = platform.add(username)
    endpoint = auth_log(platform, style)
    endpoint.delay = SHORT + 0.1
    front = await platform_front(make_front, platform, style, timeout=SHORT)
    assert await connack(front, username, password, v5) == code(v5, SERVER_UNAVAILABLE)
    async with asyncio.timeout(5):
        while not platform.consumed:  # the platform finishes the check after the front broker gave up
            await asyncio.sleep(0.02)
    endpoint.delay = 0
    await asyncio.sleep(0.05)
    assert endpoint.count == 1  # the one request used it up; nobody asked again
    assert await connack(front, username, password, v5) == code(v5, BAD_CREDENTIALS)
    assert endpoint.count == 2 and platform.consumed == [username]
    s = await metrics_of(front)
    assert connect_results(s) == {"auth_unavailable": 1, "bad_credentials": 1}
    assert requests_total(s, "auth", "timeout") == 1 and requests_total(s, "auth", "deny") == 1


@pytest.mark.parametrize(("username", "allowed_filter", "topic"), ONE_TIME)
@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_a_client_id_the_rule_refuses_never_uses_up_a_one_time_credential(
    make_front: FrontFactory, platform: FakePlatform, style: str, v5: bool, username: str, allowed_filter: str,
    topic: str,
) -> None:
    """The client-id rule depends on the username and the configuration only: it is applied before the
    platform is asked, so a CONNECT it refuses anyway does not consume the credential (MQTT.js's default
    ``mqttjs_<hex>`` id with a browser's one-time token)."""
    password = platform.add(username)
    front = await platform_front(make_front, platform, style)
    assert await connack(front, username, password, v5, client_id="mqttjs_ab12cd34") == (0x85 if v5 else 0x02)
    assert auth_log(platform, style).count == 0 and platform.consumed == []
    client = await connect_ok(front_port(front), username, v5, client_id=username, password=password)
    assert platform.consumed == [username]
    await client.close()
    s = await metrics_of(front)
    assert connect_results(s) == {"not_authorized": 1, "ok": 1}
    assert requests_total(s, "auth", "allow") == 1


# -- backend chain ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_users_file_is_asked_first(
    make_front: FrontFactory, platform: FakePlatform, users_file: Path, style: str, v5: bool
) -> None:
    file_user = "project:team1:p1"  # in the users file (password PASSWORD)
    platform.add(file_user, password="the-platform-s-password")  # the platform knows the name too
    platform_password = platform.add(PROJECT)  # only the platform knows this one
    front = await platform_front(make_front, platform, style, users_file=users_file)
    endpoint = auth_log(platform, style)
    bad = code(v5, BAD_CREDENTIALS)
    assert await connack(front, file_user, PASSWORD, v5) == 0
    assert await connack(front, file_user, "the-platform-s-password", v5) == bad  # the file decides
    assert endpoint.count == 0  # a user of the file never reaches the platform
    assert await connack(front, PROJECT, platform_password, v5) == 0
    assert auth_bodies(platform, style) == [auth_body(style, PROJECT, platform_password, PROJECT)]
    # Without the platform, the file's users still log in; the platform's are refused as unavailable.
    await platform.stop()
    assert await connack(front, file_user, PASSWORD, v5) == 0
    assert await connack(front, PROJECT, platform_password, v5) == code(v5, SERVER_UNAVAILABLE)
    assert endpoint.count == 1
    s = await metrics_of(front)
    assert connect_results(s) == {"ok": 3, "bad_credentials": 1, "auth_unavailable": 1}
    assert requests_total(s, "auth", "allow") == 1 and requests_total(s, "auth", "error") == 1
