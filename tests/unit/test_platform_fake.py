"""The fake FlowFuse platform's semantics (tests/support/platform.py), without a socket: the e2e tests
trust it, so its rules are checked against ../shared/flowfuse-reference.md here."""

from __future__ import annotations

import pytest

from tests.support.platform import FakePlatform, mqtt_match

P = "project:team1:p1"


@pytest.fixture
def fake() -> FakePlatform:
    fake = FakePlatform()
    for username in (P, "device:team1:d1", "forge_platform", "alice@team1", "mq:hosted:team1:i1"):
        fake.add(username)
    return fake


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("subscribe", "ff/v1/team1/p/+/out/#", True),
        ("subscribe", "ff/v1/team1/p/p2/out/x", True),
        ("subscribe", "ff/v1/team2/p/p2/out/x", False),
        ("subscribe", "ff/v1/+/p/+/out/#", False),
        ("subscribe", "ff/v1/team1/p/p1/in/#", True),
        ("subscribe", "ff/v1/team1/p/p2/in/#", False),
        ("subscribe", "ff/v1/team1/p/p1/res/x", True),
        ("subscribe", "ff/v1/team1/p/p1/res-0123abcd/x", True),
        ("subscribe", "ff/v1/team1/p/p2/res/x", False),
        ("publish", "ff/v1/team1/p/p2/in/x", True),
        ("publish", "ff/v1/team1/p/p2/res-0123abcd/x", True),
        ("publish", "ff/v1/team1/p/p1/out/x", True),
        ("publish", "ff/v1/team1/p/p2/out/x", False),
        ("publish", "ff/v1/team1/c/any/thing", True),
        ("subscribe", "ff/v1/team1/c/#", True),
        ("subscribe", "ff/v1/team1/#", False),
        ("publish", "ff/v1/team2/c/x", False),
        ("subscribe", "$share/platform/ff/v1/team1/p/p1/in/#", True),
        ("subscribe", "$share/browser/ff/v1/team1/p/p1/in/#", True),
        ("subscribe", "$share/p1/ff/v1/team1/p/p1/in/#", True),
        ("subscribe", "$share/p2/ff/v1/team1/p/p1/in/#", False),
        ("subscribe", "$share/p1/ff/v1/team1/p/p2/in/#", False),
    ],
)
def test_project_link_rules(fake: FakePlatform, action: str, topic: str, allowed: bool) -> None:
    assert fake._emqx_acl({"username": P, "topic": topic, "action": action}) == {
        "result": "allow" if allowed else "deny"
    }


def test_device_platform_and_team_broker_rules(fake: FakePlatform) -> None:
    assert fake.allows("device:team1:d1", "subscribe", "ff/v1/team1/d/d1/command")
    assert fake.allows("device:team1:d1", "publish", "ff/v1/team1/d/d1/status")
    assert not fake.allows("device:team1:d1", "publish", "ff/v1/team1/d/d2/status")
    assert fake.allows("forge_platform", "subscribe", "ff/v1/+/l/+/status")
    assert not fake.allows("forge_platform", "publish", "other/topic")
    # Team Broker: relative to the mount, anything by default.
    assert fake.allows("alice@team1", "publish", "sensors/t")
    fake.set_rules("alice@team1", [("foo/+", "subscribe")])
    assert fake.allows("alice@team1", "subscribe", "foo/#")  # a filter matched as a topic (FlowFuse's quirk)
    assert not fake.allows("alice@team1", "publish", "foo/a")
    assert not fake.allows("nobody@team1", "publish", "foo/a")
    assert fake.allows("mq:hosted:team1:i1", "publish", "x/y")


def test_auth_answers_and_mounts(fake: FakePlatform) -> None:
    assert fake._emqx_auth({"username": P, "password": fake.passwords[P], "clientId": "x"}) == {
        "result": "allow", "is_superuser": False, "client_attrs": {"team": ""}
    }
    answer = fake._emqx_auth({"username": "alice@team1", "password": fake.passwords["alice@team1"]})
    assert answer == {"result": "allow", "is_superuser": False, "client_attrs": {"team": "ff/v1/team1/c/"}}
    answer = fake._emqx_auth({"username": "mq:hosted:team1:i1", "password": fake.passwords["mq:hosted:team1:i1"]})
    assert isinstance(answer, dict) and answer["client_attrs"] == {"team": "ff/v1/team1/c/"}
    assert fake._emqx_auth({"username": P, "password": "wrong"}) == {"result": "deny"}
    assert fake.passwords[P].startswith("ffbp_") and fake.passwords["forge_platform"].startswith("ffbpl_")


def test_team_client_id_rule_is_a_knob(fake: FakePlatform) -> None:
    body = {"username": "alice@team1", "password": fake.passwords["alice@team1"], "clientId": "other"}
    answer = fake._emqx_auth(body)
    assert isinstance(answer, dict) and answer["result"] == "allow"
    fake.team_client_id_rule = True
    assert fake._emqx_auth(body) == {"result": "deny"}


def test_one_time_credentials(fake: FakePlatform) -> None:
    password = fake.add("fe-team:u1:team1:s1")
    assert password.startswith("ffbtf_")
    body = {"username": "fe-team:u1:team1:s1", "password": password, "clientid": "c"}
    assert fake._go_auth(body) == 200
    assert fake._go_auth(body) == 401
    assert fake.consumed == ["fe-team:u1:team1:s1"]
    assert fake.allows("fe-team:u1:team1:s1", "publish", "ff/v1/team1/u/u1/s/s1/disconnected")  # ACL stays


@pytest.mark.parametrize(
    ("acc", "topic", "status"),
    [
        (2, "ff/v1/team1/p/p1/out/x", 200),
        (1, "ff/v1/team1/p/p2/out/x", 200),
        (3, "ff/v1/team1/p/p1/in/x", 200),
        (4, "ff/v1/team1/p/p2/in/x", 401),
        (2, "ff/v1/team1/p/p2/out/x", 401),
        (8, "ff/v1/team1/c/x", 401),
    ],
)
def test_go_auth_acl(fake: FakePlatform, acc: int, topic: str, status: int) -> None:
    assert fake._go_acl({"username": P, "clientid": "c", "topic": topic, "acc": acc}) == status


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [("#", "a/b", True), ("a/#", "a", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
     ("a/+", "a/#", True), ("a/b", "a/b", True), ("a/b", "a", False), ("+/b", "a/b", True), ("a", "a/b", False)],
)
def test_mqtt_match(pattern: str, topic: str, match: bool) -> None:
    assert mqtt_match(pattern, topic) is match
