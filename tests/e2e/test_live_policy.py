"""Changing policy live (issue 12): a reload of the whole file, revocation of sessions and subscriptions,
an operator's kick, against a real Mosquitto, over MQTT 3.1.1 and 5, while clients stay connected."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.config import load_config
from broker.mqtt.packets import PacketType, decode_ack, decode_disconnect
from broker.server import FrontBroker
from tests.support.front import USERS, VERSIONS, front_port, uid, write_users_file
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import publish
from tests.support.raw_client import connect_ok, topics

SECRET_DENY = {"who": "project", "effect": "deny", "action": "subscribe", "pattern": "ff/v1/${team}/c/secret/#"}
NO_MATCHING_SUBSCRIBERS = 0x10
Live = tuple[FrontBroker, Callable[..., None]]


@pytest.fixture
async def live(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Callable[..., Any]]:
    """``front, rewrite = await live(**sections)``: a front broker started from a config file (so it can
    reload it); ``rewrite(**sections)`` writes the file again with those sections changed."""
    fronts: list[FrontBroker] = []
    users = write_users_file(tmp_path / "users.yaml")

    async def start(**sections: Any) -> Live:
        path = tmp_path / f"front-{len(fronts)}.yaml"
        base: dict[str, Any] = {
            "listeners": [{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}],
            "upstream": {"url": mosquitto.url},
            "limits": {"connect_timeout": 2},
            "auth": {"users_file": str(users), "allow_anonymous": False},
            "acl": {"preset": "flowfuse"},
        }

        def rewrite(**changed: Any) -> None:
            path.write_text(yaml.safe_dump({**base, **changed}))

        rewrite(**sections)
        base.update(sections)
        front = FrontBroker(load_config(path), config_path=str(path))
        await front.start()
        fronts.append(front)
        return front, rewrite

    yield start
    for front in fronts:
        await front.stop()


async def no_subscriber_upstream(mosquitto: Mosquitto, topic: str) -> bool:
    """Publish straight into Mosquitto (v5, QoS 1): True when it says nobody is subscribed to ``topic``."""
    direct = await connect_ok(mosquitto.port, None, True, client_id=f"probe-{uid()}")
    direct.send(publish(topic, b"probe", v5=True, qos=1, packet_id=1))
    ack = await direct.expect(PacketType.PUBACK)
    await direct.close()
    return decode_ack(ack, 0, len(ack), True).reason_code == NO_MATCHING_SUBSCRIBERS


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_rule_added_revokes_a_subscription_without_a_reconnect(
    live: Callable[..., Any], mosquitto: Mosquitto, v5: bool
) -> None:
    front, rewrite = await live()
    t = uid()
    client = await connect_ok(front_port(front), "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    secret, ok = f"ff/v1/team1/c/secret/{t}", f"ff/v1/team1/c/ok/{t}"
    assert await client.subscribe(secret, f"$share/p1/{secret}/s", ok, qos=1) == [1, 1, 1]
    assert not await no_subscriber_upstream(mosquitto, secret)

    rewrite(acl={"preset": "flowfuse", "rules": [SECRET_DENY]})
    report = await front.control.reload()
    assert report["ok"] and report["changed"] == ["rules 0 -> 1"] and report["restart_needed"] == []
    assert report["subscriptions_revoked"] == 2 and report["sessions_disconnected"] == 0
    # Taken away upstream on the client's behalf (Mosquitto has no subscriber left), the client untold.
    await wait_for(lambda: True)
    assert await no_subscriber_upstream(mosquitto, secret)
    assert await no_subscriber_upstream(mosquitto, f"{secret}/s")
    writer = await connect_ok(front_port(front), "project:team1:p2", v5, client_id=f"project:team1:p2:{t}")
    for qos in (0, 1, 2):
        assert await writer.publish(secret, b"no", qos=qos) == 0
    assert await writer.publish(ok, b"yes", qos=1) == 0
    assert [m.topic for m in await client.until(ok)] == [ok]  # nothing on the revoked filters
    assert await client.subscribe(secret, qos=1) == [0x87 if v5 else 0x80]  # and not again
    # A retained message under the carved-out filter is not delivered by a wider subscription either.
    assert await writer.publish(f"{secret}/kept", b"r", qos=1, retain=True) == 0
    assert await client.subscribe("ff/v1/team1/c/#", qos=1) == [1]
    assert await writer.publish(ok, b"again", qos=1) == 0
    assert [m.topic for m in await client.until(ok) if t in m.topic] == [ok]
    assert await writer.publish(f"{secret}/kept", b"", qos=1, retain=True) == 0  # clear the retained message
    for c in (client, writer):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_rule_removed_takes_effect_for_connected_clients(live: Callable[..., Any], v5: bool) -> None:
    front, rewrite = await live(acl={"preset": "flowfuse", "rules": [SECRET_DENY]})
    t = uid()
    client = await connect_ok(front_port(front), "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    secret = f"ff/v1/team1/c/secret/{t}"
    assert await client.subscribe(secret, qos=1) == [0x87 if v5 else 0x80]
    rewrite(acl={"preset": "flowfuse"})
    report = await front.control.reload()
    assert report["changed"] == ["rules 1 -> 0"]
    assert await client.subscribe(secret, qos=1) == [1]
    assert await client.publish(secret, b"now", qos=1) == 0
    assert topics(await client.until(secret)) == [secret]
    await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_rule_changed_moves_the_carve_out(live: Callable[..., Any], mosquitto: Mosquitto, v5: bool) -> None:
    hidden = {**SECRET_DENY, "pattern": "ff/v1/${team}/c/hidden/#"}
    front, rewrite = await live(acl={"preset": "flowfuse", "rules": [SECRET_DENY]})
    t = uid()
    client = await connect_ok(front_port(front), "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    secret, other = f"ff/v1/team1/c/secret/{t}", f"ff/v1/team1/c/hidden/{t}"
    assert await client.subscribe(secret, other, qos=1) == [0x87 if v5 else 0x80, 1]
    rewrite(acl={"preset": "flowfuse", "rules": [hidden]})
    report = await front.control.reload()
    assert report["changed"] == ["rules 1 -> 1"] and report["subscriptions_revoked"] == 1
    assert await no_subscriber_upstream(mosquitto, other)
    assert await client.subscribe(secret, qos=1) == [1]
    assert await client.publish(secret, b"now", qos=1) == 0
    assert topics(await client.until(secret)) == [secret]
    await client.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_removed_user_is_disconnected_and_the_others_stay(
    live: Callable[..., Any], tmp_path: Path, v5: bool
) -> None:
    front, _ = await live()
    t = uid()
    gone = await connect_ok(front_port(front), "project:team1:p2", v5, client_id=f"project:team1:p2:{t}")
    stays = await connect_ok(front_port(front), "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    write_users_file(tmp_path / "users.yaml", [u for u in USERS if u != "project:team1:p2"])
    report = await front.control.reload()
    # (every hash is new: the file was written again; a new hash alone does not cut a session)
    assert report["changed"][0].startswith("users +0 -1") and report["sessions_disconnected"] == 1
    if v5:
        packet = await gone.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x87
    await gone.wait_closed()
    mine = f"ff/v1/team1/p/p1/out/{t}"
    assert await stays.subscribe(mine, qos=1) == [1]
    assert await stays.publish(mine, qos=1) == 0
    assert topics(await stays.until(mine)) == [mine]
    await stays.close()


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (b"listeners: [unclosed\n", "front"),
        (
            yaml.safe_dump({"acl": {"rules": [{"who": "project", "effect": "allow", "pattern": "a/#/b"}]}}).encode(),
            "acl.rules.0",
        ),
        (yaml.safe_dump({"auth": {"users_file": "/nonexistent/users.yaml"}}).encode(), "users"),
        (b"# caf\xe9\nlisteners: []\n", "UTF-8"),
    ],
    ids=["bad-yaml", "bad-rule", "missing-users-file", "not-utf8"],
)
async def test_an_invalid_file_is_refused_and_the_old_policy_keeps_serving(
    live: Callable[..., Any], content: bytes, names: str, caplog: pytest.LogCaptureFixture
) -> None:
    front, _ = await live()
    t = uid()
    client = await connect_ok(front_port(front), "project:team1:p1", True, client_id=f"project:team1:p1:{t}")
    assert front.config_path is not None
    original = Path(front.config_path).read_bytes()
    merged = content
    if content.startswith(b"acl") or content.startswith(b"auth"):
        data = {**yaml.safe_load(original), **yaml.safe_load(content)}
        merged = yaml.safe_dump(data).encode()
    Path(front.config_path).write_bytes(merged)
    report = await front.control.reload()
    assert report["ok"] is False and names in str(report["error"])
    assert "config_reload_failed" in caplog.text
    mine = f"ff/v1/team1/p/p1/out/{t}"
    assert await client.subscribe(mine, qos=1) == [1]
    assert await client.publish(mine, qos=1) == 0
    assert topics(await client.until(mine)) == [mine]
    await client.close()


async def test_keys_that_need_a_restart_are_reported_and_the_rest_applied(
    live: Callable[..., Any], mosquitto: Mosquitto
) -> None:
    front, rewrite = await live()
    rewrite(upstream={"url": "mqtt://127.0.0.1:1"}, limits={"connect_timeout": 3}, acl={"preset": "flowfuse"})
    report = await front.control.reload()
    assert report["ok"] and report["restart_needed"] == ["upstream"]
    assert report["changed"] == ["limits.connect_timeout 2.0 -> 3.0"]
    assert front.config.upstream is not None and front.config.upstream.url == mosquitto.url  # still running on it
    assert front.connect_timeout == 3.0
    again = await front.control.reload()
    assert again["changed"] == [] and again["restart_needed"] == ["upstream"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_kick_and_revoke(live: Callable[..., Any], v5: bool) -> None:
    front, _ = await live()
    t = uid()
    port = front_port(front)
    kicked = await connect_ok(port, "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    team1 = await connect_ok(port, "project:team1:p2", v5, client_id=f"project:team1:p2:{t}")
    team2 = await connect_ok(port, "project:team2:p3", v5, client_id=f"project:team2:p3:{t}")
    assert front.control.kick(f"project:team1:p1:{t}") and not front.control.kick("nobody")
    for client in (kicked,):
        if v5:
            packet = await client.expect(PacketType.DISCONNECT)
            assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x98
        await client.wait_closed()
    assert front.control.revoke(team="team1") == 1
    await team1.wait_closed()
    mine = f"ff/v1/team2/p/p3/out/{t}"
    assert await team2.subscribe(mine, qos=1) == [1]
    assert await team2.publish(mine, qos=1) == 0
    assert topics(await team2.until(mine)) == [mine]
    await team2.close()


# -- topic inventory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_the_inventory_counts_known_traffic_exactly(live: Callable[..., Any], v5: bool) -> None:
    front, _ = await live(inventory={"max_topics_per_team": 100, "samples": 2})
    t = uid()
    port = front_port(front)
    pub = await connect_ok(port, "project:team1:p1", v5, client_id=f"project:team1:p1:{t}")
    other = await connect_ok(port, "project:team2:p3", v5, client_id=f"project:team2:p3:{t}")
    a, b = f"ff/v1/team1/p/p1/out/{t}/a", f"ff/v1/team1/p/p1/out/{t}/b"
    sent: dict[str, list[bytes]] = {a: [], b: []}
    for i in range(25):  # past the samples: most of them are counted by the fast path
        payload = b'{"temp": %d, "unit": "C"}' % i
        sent[a].append(publish(a, payload, v5=v5, qos=i % 2, packet_id=i + 1 if i % 2 else 0))
        assert await pub.publish(a, payload, qos=i % 2) == 0
    for payload in (b"hello", b"\xff\x00\x01"):
        sent[b].append(publish(b, payload, v5=v5, qos=1, packet_id=1, retain=True))
        assert await pub.publish(b, payload, qos=1, retain=True) == 0
    assert await pub.publish(f"ff/v1/team2/p/p3/in/{t}", b"denied", qos=1) == (0x87 if v5 else 0)  # not counted
    assert await other.publish(f"ff/v1/team2/p/p3/out/{t}", b"x", qos=1) == 0
    assert front.control.topics("nobody") == []
    rows = {r["topic"]: r for r in front.control.topics("team1") or [] if t in str(r["topic"])}
    assert set(rows) == {a, b}
    assert rows[a]["messages"] == 25 and rows[a]["bytes"] == sum(len(p) for p in sent[a])
    assert rows[a]["retained"] is False
    assert rows[a]["payload"] == {"kind": "json", "keys": ["temp", "unit"], "more_keys": False}
    assert rows[b]["messages"] == 2 and rows[b]["retained"] is True
    assert rows[b]["payload"] == {"kind": "binary"}  # the widest of the kinds sampled (text, then binary)
    assert [r["topic"] for r in front.control.topics("team2") or [] if t in str(r["topic"])] == [
        f"ff/v1/team2/p/p3/out/{t}"
    ]
    assert await pub.publish(f"ff/v1/team1/p/p1/out/{t}/b", b"", qos=1, retain=True) == 0  # clear it
    for c in (pub, other):
        await c.close()


async def test_without_an_inventory_section_there_is_none(live: Callable[..., Any]) -> None:
    front, _ = await live()
    assert front.control.topics("team1") is None


@pytest.mark.parametrize("v5", VERSIONS)
async def test_jwt_sessions_are_checked_again_when_the_keys_change(
    live: Callable[..., Any], tmp_path: Path, v5: bool
) -> None:
    """A key retired from the JWKS file (a compromised one), or auth.jwt removed: the sessions whose
    token no longer verifies are disconnected (v5 DISCONNECT 0x87); a token the new keys accept stays. A
    reload that changes nothing of auth.jwt checks no token again."""
    def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
        data: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        return {**data, "kid": kid, "alg": "RS256", "use": "sig"}

    old_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(old_key, "k1"), jwk(new_key, "k2")]}))
    users = str(tmp_path / "users.yaml")
    jwt_auth = {"users_file": users, "allow_anonymous": False, "jwt": {"jwks_file": str(jwks), "algorithms": ["RS256"]}}
    front, rewrite = await live(auth=jwt_auth)

    def token(key: rsa.RSAPrivateKey, kid: str) -> bytes:
        claims = {"sub": "project:team1:p1", "exp": int(time.time()) + 300}
        return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": kid}).encode()

    t = uid()
    signed_old = await connect_ok(
        front_port(front), "jwt", v5, client_id=f"project:team1:p1:{t}a", password=token(old_key, "k1")
    )
    signed_new = await connect_ok(
        front_port(front), "jwt", v5, client_id=f"project:team1:p1:{t}b", password=token(new_key, "k2")
    )
    report = await front.control.reload()  # nothing changed
    assert report["sessions_disconnected"] == 0
    jwks.write_text(json.dumps({"keys": [jwk(new_key, "k2")]}))  # k1 retired
    report = await front.control.reload()
    assert report["sessions_disconnected"] == 1
    if v5:
        packet = await signed_old.expect(PacketType.DISCONNECT)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x87
    await signed_old.wait_closed()
    assert await signed_new.publish(f"ff/v1/team1/p/p1/out/{t}", qos=1) == 0
    # The token that stays counts as checked by the keys in force: later reloads do not check it again.
    assert front.admission.jwt is not None
    assert [g.jwt_fingerprint for g in front.grants.values()] == [front.admission.jwt.fingerprint]
    rewrite(auth={"users_file": users, "allow_anonymous": False})  # auth.jwt removed
    report = await front.control.reload()
    assert report["sessions_disconnected"] == 1
    await signed_new.wait_closed()
