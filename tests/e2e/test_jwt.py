"""JWT authentication (``auth.jwt``) end to end: real clients -> front broker -> real Mosquitto, MQTT 3.1.1 and 5.

Tokens are signed here with PyJWT (HS256 with a 32+ byte secret, RS256 with a 2048-bit key whose public
half the front broker reads from a PEM file or a JWKS file). The CONNECT password carries the token and
the CONNECT username is ignored: the identity is the token's ``sub``, which the client-id rule, the ACL
and the mountpoint all follow. A "spy" subscribed to ``#`` straight on Mosquitto shows what reached the
upstream; negative checks are synchronised with barrier messages, never sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from paho.mqtt.enums import CallbackAPIVersion

from broker.auth.backoff import LoginBackoff
from broker.mqtt.packets import PacketType, Will, decode_disconnect
from broker.server import FrontBroker
from tests.support.front import VERSIONS, FrontFactory, connack_code, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.raw_client import RawClient, connect_ok, topics

SECRET = "front-broker-e2e-hs256-secret-0123456789"  # >= 32 bytes, as RFC 7518 wants for HS256
OTHER_SECRET = "another-hs256-secret-that-is-long-enough!"
ISSUER = "https://forge.example.test"
AUDIENCE = "mqtt-front"
PROJECT = "project:team1:p1"
ALICE = "alice@team1"
NOT_AUTHORIZED = 0x87
MAXIMUM_CONNECT_TIME = 0xA0

# Local identities: Team Broker clients are mounted (rules relative to the mount), as in test_mountpoints.
ACL: dict[str, Any] = {
    "preset": "flowfuse",
    "mountpoints": {"teamclient": "ff/v1/${team}/c/"},
    "rules": [{"who": "teamclient", "effect": "allow", "action": "both", "pattern": "#"}],
}


@dataclass(frozen=True)
class Keys:
    issuer: rsa.RSAPrivateKey  # its public key is in the front broker's public_keys
    other_rsa: rsa.RSAPrivateKey  # known to no front broker at first
    public_pem: Path
    public_pem_bytes: bytes


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    path = tmp_path_factory.mktemp("jwt-keys") / "issuer.pem"
    path.write_bytes(pem(key))
    return Keys(key, other, path, pem(key))


def claims(sub: str = PROJECT, ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = time.time()
    base: dict[str, Any] = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": int(now), "exp": now + ttl}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(secret: str = SECRET, **kw: Any) -> str:
    return jwt.encode(claims(**kw), secret, algorithm="HS256")


def rs256(key: rsa.RSAPrivateKey, kid: str | None = None, **kw: Any) -> str:
    return jwt.encode(claims(**kw), key, algorithm="RS256", headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, as an attacker would: HMAC-SHA256 with ``key``, or no signature at all."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
async def front(make_front: FrontFactory, users_file: Path, keys: Keys) -> FrontBroker:
    jwt_config = {
        "secret": SECRET,
        "public_keys": [str(keys.public_pem)],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "leeway": 0,
        "mountpoint_claim": "mountpoint",
    }
    result: FrontBroker = await make_front(auth={"users_file": str(users_file), "jwt": jwt_config}, acl=ACL)
    return result


async def spy_on(mosquitto: Mosquitto) -> RawClient:
    spy = await connect_ok(mosquitto.port, None, True, client_id=f"spy-{uid()}")
    assert await spy.subscribe("#", qos=2) == [2]
    return spy


async def connect_token(port: int, token: str, v5: bool, client_id: str, **kw: Any) -> tuple[RawClient, int]:
    """CONNECT with the token as the password and a username the front broker must ignore."""
    client, code, _ = await RawClient.open(port, "jwt", v5=v5, client_id=client_id, password=token, **kw)
    return client, code


async def token_ok(port: int, token: str, v5: bool, client_id: str, **kw: Any) -> RawClient:
    client, code = await connect_token(port, token, v5, client_id, **kw)
    assert code == 0, f"CONNACK 0x{code:02x}"
    return client


def bad_credentials(v5: bool) -> int:
    return connack_code(v5, v5_code=0x86, v3_code=0x04)


# -- valid tokens: the identity is the claim ---------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
@pytest.mark.parametrize("v5", VERSIONS)
async def test_valid_token_connects_as_its_claim(
    front: FrontBroker, mosquitto: Mosquitto, keys: Keys, v5: bool, alg: str
) -> None:
    port, t = front_port(front), uid()
    token = hs256() if alg == "HS256" else rs256(keys.issuer)
    # The client-id rule is the claim's: not the CONNECT username's, not another project's.
    for wrong_id in ("jwt", "jwt:n", "project:team1:p2:n", "project:team2:p3:n"):
        client, code = await connect_token(port, token, v5, wrong_id)
        assert code == connack_code(v5, v5_code=0x85, v3_code=0x02), wrong_id
        await client.close()
    spy = await spy_on(mosquitto)
    client = await token_ok(port, token, v5, f"{PROJECT}:n")
    # The ACL is the claim's too: team1/p1's project-link rules.
    assert await client.publish(f"ff/v1/team2/p/p3/out/{t}", b"no", qos=1) == (NOT_AUTHORIZED if v5 else 0)
    assert await client.publish(f"ff/v1/team1/p/p2/out/{t}", b"no", qos=1) == (NOT_AUTHORIZED if v5 else 0)
    assert await client.publish(f"ff/v1/team1/p/p1/out/{t}", b"yes", qos=1) == 0
    assert [s for s in topics(await spy.until(f"ff/v1/team1/p/p1/out/{t}")) if t in s] == [f"ff/v1/team1/p/p1/out/{t}"]
    assert await client.subscribe(f"ff/v1/team1/p/p1/in/{t}", "ff/v1/team2/p/+/out/#", qos=1) == [
        1,
        NOT_AUTHORIZED if v5 else 0x80,
    ]
    for c in (client, spy):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_token_identity_gets_its_local_mountpoint(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    """A Team Broker identity in the token is mounted by acl.mountpoints, exactly like a users-file one."""
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    client = await token_ok(port, hs256(sub=ALICE), v5, ALICE)
    assert await client.subscribe(f"{t}/#", qos=1) == [1]
    assert await client.publish(f"{t}/sensors/t", b"20", qos=1) == 0
    assert [s for s in topics(await spy.until(f"ff/v1/team1/c/{t}/sensors/t")) if t in s] == [
        f"ff/v1/team1/c/{t}/sensors/t"
    ]
    assert (await client.next_message()).topic == f"{t}/sensors/t"  # its own message, back without the mount
    await spy.publish(f"ff/v1/team1/c/{t}/down", b"d", qos=1)
    assert (await client.next_message()).topic == f"{t}/down"
    for c in (client, spy):
        await c.close()


# -- the mountpoint claim and the ACL claim ----------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_mountpoint_claim(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    # A browser identity the configuration knows nothing about: the token gives it a space and rights in it.
    browser = f"browser-{t}"
    acl = [{"permission": "allow", "action": "all", "topic": "#"}]
    client = await token_ok(port, hs256(sub=browser, mountpoint="ff/v1/team2/c/", acl=acl), v5, f"{browser}:tab1")
    assert await client.subscribe("#", qos=1) == [1]
    assert await client.publish(f"{t}/hello", b"hi", qos=1) == 0
    assert (await client.next_message()).topic == f"{t}/hello"
    await spy.publish(f"ff/v1/team2/c/{t}/down", b"d", qos=1)
    await spy.publish(f"ff/v1/team1/c/{t}/other-team", b"x", qos=1)  # outside its mount: never delivered
    await spy.publish(f"ff/v1/team2/c/{t}/barrier", b"b", qos=1)
    assert topics(await client.until(f"{t}/barrier")) == [f"{t}/down", f"{t}/barrier"]
    assert f"ff/v1/team2/c/{t}/hello" in topics(await spy.until(f"ff/v1/team2/c/{t}/barrier"))
    # The claim wins over acl.mountpoints for a Team Broker identity too.
    alice = await token_ok(port, hs256(sub=ALICE, mountpoint=f"ff/v1/team1/c/{t}/sandbox/"), v5, ALICE)
    assert await alice.publish("x", b"boxed", qos=1) == 0
    assert [s for s in topics(await spy.until(f"ff/v1/team1/c/{t}/sandbox/x")) if t in s] == [
        f"ff/v1/team1/c/{t}/sandbox/x"
    ]
    # A claim that is no mountpoint refuses the token.
    for bad in ("ff/v1/team2/c", "ff/v1/+/c/", "#/", "$SYS/"):
        refused, code = await connect_token(port, hs256(sub=browser, mountpoint=bad), v5, browser)
        assert code == bad_credentials(v5), bad
        await refused.close()
    for c in (client, alice, spy):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_acl_claim_comes_before_the_other_rules(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    port, t = front_port(front), uid()
    denied_pub, extra_pub = f"ff/v1/team1/p/p1/out/{t}/secret", f"ff/v1/team1/extra/{t}"
    acl = [
        {"permission": "deny", "action": "publish", "topic": denied_pub},  # the preset would allow it
        {"permission": "allow", "action": "publish", "topic": "ff/v1/team1/extra/#"},  # the preset would deny it
        {"permission": "deny", "action": "subscribe", "topic": f"ff/v1/team1/p/+/out/{t}/hidden"},
    ]
    spy = await spy_on(mosquitto)
    client = await token_ok(port, hs256(acl=acl), v5, f"{PROJECT}:n")
    refused = NOT_AUTHORIZED if v5 else 0
    assert await client.publish(denied_pub, b"no", qos=1) == refused
    assert await client.publish(extra_pub, b"yes", qos=1) == 0
    assert await client.publish(f"ff/v1/team1/p/p1/out/{t}/open", b"yes", qos=1) == 0  # the preset still applies
    assert await client.publish(f"ff/v1/team2/p/p3/in/{t}", b"no", qos=1) == refused  # and still denies
    seen = [s for s in topics(await spy.until(f"ff/v1/team1/p/p1/out/{t}/open")) if t in s]
    assert seen == [extra_pub, f"ff/v1/team1/p/p1/out/{t}/open"]
    # Without the token, the same identity (users file) may not publish there: the claim allowed it.
    from_file = await connect_ok(port, PROJECT, v5, client_id=f"{PROJECT}:file")
    assert await from_file.publish(extra_pub, b"no", qos=1) == refused
    # The subscribe deny refuses the exact filter; a wider one is granted (the preset allows it) with the
    # denied topic carved out: its deliveries are dropped.
    fail = NOT_AUTHORIZED if v5 else 0x80
    assert await client.subscribe(f"ff/v1/team1/p/p2/out/{t}/hidden", qos=1) == [fail]
    assert await client.subscribe(f"ff/v1/team1/p/+/out/{t}/#", qos=1) == [1]
    p2 = await connect_ok(port, "project:team1:p2", v5, client_id=f"project:team1:p2:{t}")
    assert await p2.publish(f"ff/v1/team1/p/p2/out/{t}/hidden", b"no", qos=1) == 0
    assert await p2.publish(f"ff/v1/team1/p/p2/out/{t}/shown", b"yes", qos=1) == 0
    got = await client.until(f"ff/v1/team1/p/p2/out/{t}/shown")
    assert [s for s in topics(got) if t in s] == [f"ff/v1/team1/p/p2/out/{t}/shown"]
    for c in (client, from_file, spy, p2):
        await c.close()


# -- refused tokens ----------------------------------------------------------------------------------


def refused_tokens(keys: Keys) -> Iterator[tuple[str, str]]:
    yield "expired", hs256(ttl=-5)
    yield "expired-rs256", rs256(keys.issuer, ttl=-1)
    yield "not-yet-valid", hs256(nbf=int(time.time()) + 60)
    yield "issued-in-the-future", hs256(iat=int(time.time()) + 60)
    yield "wrong-secret", hs256(secret=OTHER_SECRET)
    yield "wrong-rsa-key", rs256(keys.other_rsa)
    yield "wrong-audience", hs256(aud="another-broker")
    yield "no-audience", hs256(aud=None)
    yield "wrong-issuer", hs256(iss="https://evil.example")
    yield "no-exp", hs256(exp=None)
    yield "alg-none", forge({"alg": "none", "typ": "JWT"}, claims(), None)
    # The alg-confusion attack: HS256 "signed" with the RSA public key the front broker trusts.
    yield "hs256-with-rsa-public-key", forge({"alg": "HS256", "typ": "JWT"}, claims(), keys.public_pem_bytes)
    yield "tampered", hs256()[:-6] + ("AAAAAA" if not hs256().endswith("AAAAAA") else "BBBBBB")


REFUSED = [
    "expired", "expired-rs256", "not-yet-valid", "issued-in-the-future", "wrong-secret", "wrong-rsa-key",
    "wrong-audience", "no-audience", "wrong-issuer", "no-exp", "alg-none", "hs256-with-rsa-public-key", "tampered",
]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_refused_tokens(front: FrontBroker, keys: Keys, v5: bool) -> None:
    port = front_port(front)
    tokens = dict(refused_tokens(keys))
    assert sorted(tokens) == sorted(REFUSED)
    for name, token in tokens.items():
        front.admission.backoff = LoginBackoff()  # each refusal on its own here (test_login_backoff: the back-off)
        client, code = await connect_token(port, token, v5, f"{PROJECT}:n")
        assert code == bad_credentials(v5), name
        await client.wait_closed()
        await client.close()
    front.admission.backoff = LoginBackoff()
    await (await token_ok(port, hs256(), v5, f"{PROJECT}:n")).close()  # positive control


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5], ids=["v311", "v5"])
async def test_aiomqtt_with_a_token(front: FrontBroker, version: aiomqtt.ProtocolVersion) -> None:
    port, t = front_port(front), uid()
    common: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "protocol": version, "username": "browser"}
    async with aiomqtt.Client(identifier=ALICE, password=hs256(sub=ALICE), **common) as client:
        await client.subscribe(f"{t}/#", qos=1)
        await client.publish(f"{t}/x", b"via aiomqtt", qos=1)
        async for message in client.messages:
            assert (str(message.topic), message.payload) == (f"{t}/x", b"via aiomqtt")
            break
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with aiomqtt.Client(identifier=ALICE, password=hs256(sub=ALICE, ttl=-5), **common):
            pass
    assert str(refused.value.rc) == "Bad user name or password"  # paho's name for 0x86, and for 3.1.1's 0x04


# -- expiry while connected --------------------------------------------------------------------------


def paho_until_disconnected(port: int, token: str, protocol: Any) -> tuple[Any, float]:
    """A threaded paho client with ``token``: its disconnect reason and when it came (time.time())."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{PROJECT}:paho", protocol=protocol)
    client.username_pw_set("browser", token)
    connected, gone = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["connack"] = reason
        connected.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result.setdefault("reason", reason)
        result.setdefault("at", time.time())
        gone.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(5) and not result["connack"].is_failure, result
        assert gone.wait(6), "not disconnected at the token's expiry"
    finally:
        client.loop_stop()
    return result["reason"], result["at"]


@pytest.mark.parametrize("v5", VERSIONS)
async def test_token_expiring_while_connected(front: FrontBroker, mosquitto: Mosquitto, v5: bool) -> None:
    """leeway 0, exp = now + 2 s: the session ends at exp (v5 DISCONNECT 0xA0; v3.1.1 the connection closes)."""
    port, t = front_port(front), uid()
    spy = await spy_on(mosquitto)
    exp = time.time() + 2.0
    short = hs256(exp=exp)
    will = Will(f"ff/v1/team1/p/p1/out/{t}/will", b"expired", qos=1, retain=False)
    client = await token_ok(port, short, v5, f"{PROJECT}:raw", will=will)
    lasting = await token_ok(port, hs256(ttl=60), v5, f"{PROJECT}:lasting")
    protocol = paho.MQTTv5 if v5 else paho.MQTTv311
    paho_task = asyncio.ensure_future(asyncio.to_thread(paho_until_disconnected, port, short, protocol))

    assert await client.publish(f"ff/v1/team1/p/p1/out/{t}/alive", qos=1) == 0  # works until exp
    if v5:
        packet = await client.expect(PacketType.DISCONNECT, timeout=6)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == MAXIMUM_CONNECT_TIME
    await client.wait_closed(timeout=6)
    closed_at = time.time()
    assert client.control.get_nowait() is None  # nothing else came (v3.1.1: no DISCONNECT, just the close)
    assert exp - 0.05 <= closed_at <= exp + 1.0, closed_at - exp
    # A real client sees the same: paho's reason is "Maximum connect time" (v5) or a lost connection.
    reason, paho_at = await paho_task
    assert exp - 0.05 <= paho_at <= exp + 1.0, paho_at - exp
    if v5:
        assert reason.value == MAXIMUM_CONNECT_TIME, reason
    # The upstream connection ended too (without a normal DISCONNECT: Mosquitto sent the will).
    spied = topics(await spy.until(f"ff/v1/team1/p/p1/out/{t}/will", timeout=3))
    assert f"ff/v1/team1/p/p1/out/{t}/alive" in spied
    # A token that is still valid keeps its connection.
    assert await lasting.publish(f"ff/v1/team1/p/p1/out/{t}/still-here", qos=1) == 0
    assert not lasting.closed.is_set()
    for c in (lasting, spy):
        await c.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_with_the_default_leeway_a_session_still_ends_at_exp(
    make_front: FrontFactory, users_file: Path, v5: bool
) -> None:
    """The leeway (30 s by default) is for the check at login: a session still ends at its token's exp. A
    token already past its exp, accepted inside the leeway, is not cut off at once."""
    jwt_config = {"secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE}
    front = await make_front(auth={"users_file": str(users_file), "jwt": jwt_config}, acl=ACL)
    port = front_port(front)
    exp = time.time() + 1.5
    client = await token_ok(port, hs256(exp=exp), v5, f"{PROJECT}:soon")
    late = await token_ok(port, hs256(exp=time.time() - 5), v5, f"{PROJECT}:late")
    if v5:
        packet = await client.expect(PacketType.DISCONNECT, timeout=5)
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == MAXIMUM_CONNECT_TIME
    await client.wait_closed(timeout=5)
    assert exp - 0.05 <= time.time() <= exp + 1.0
    assert await late.publish(f"ff/v1/team1/p/p1/out/{uid()}/late", qos=1) == 0  # until exp + 30 s
    assert not late.closed.is_set()
    await late.close()


# -- JWKS file, re-read on reload (SIGHUP) -----------------------------------------------------------


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "alg": "RS256", "use": "sig"}


def write_jwks(path: Path, *entries: dict[str, Any]) -> None:
    """Atomically, as an operator (or a key-rotation job) should: write, then rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(entries)}))
    os.replace(tmp, path)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_jwks_file_is_re_read_on_reload(make_front: FrontFactory, tmp_path: Path, keys: Keys, v5: bool) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, jwk(keys.issuer, "k1"))
    front = await make_front(
        auth={"jwt": {"jwks_file": str(jwks), "algorithms": ["RS256"], "audience": AUDIENCE, "leeway": 0}}
    )
    port = front_port(front)
    old, new = rs256(keys.issuer, kid="k1"), rs256(keys.other_rsa, kid="k2")

    async def code(token: str) -> int:
        client, result = await connect_token(port, token, v5, f"{PROJECT}:n")
        await client.close()
        return result

    assert (await code(old), await code(new)) == (0, bad_credentials(v5))
    connected = await token_ok(port, old, v5, f"{PROJECT}:kept")
    write_jwks(jwks, jwk(keys.issuer, "k1"), jwk(keys.other_rsa, "k2"))  # rotation: the new key is added
    assert front.reload()
    assert (await code(old), await code(new)) == (0, 0)
    write_jwks(jwks, jwk(keys.other_rsa, "k2"))  # the old key is retired
    assert front.reload()
    assert (await code(old), await code(new)) == (bad_credentials(v5), 0)
    # A broken file is refused on reload: the keys in use stay.
    jwks.write_text("{not json")
    assert not front.reload()
    assert (await code(old), await code(new)) == (bad_credentials(v5), 0)
    # Connections stay across reloads.
    assert await connected.publish("ff/v1/team1/p/p1/out/still", qos=1) == 0
    await connected.close()
