"""What the platform e2e tests share (tests/e2e/test_platform_auth.py, test_platform_acl.py, test_platform_flowfuse.py):
a front broker whose ``auth.http`` points at a :class:`~tests.support.platform.FakePlatform`, in either style,
and the platform's request logs read the same way for both styles.

Real parts only: the front broker listens on a real socket, its upstream is the test module's real Mosquitto,
the platform is a real aiohttp server that the front broker's httpx client talks to over loopback.
"""

from __future__ import annotations

from typing import Any

import aiomqtt
import pytest

from broker.server import FrontBroker
from tests.support.front import FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.ops import Scrape, scrape
from tests.support.platform import Endpoint, FakePlatform
from tests.support.raw_client import RawClient, connect_ok

STYLES = [pytest.param("emqx", id="emqx"), pytest.param("go-auth", id="go-auth")]

# Small numbers keep the files fast: a platform request that takes longer than TIMEOUT is refused, an allow is
# reused CACHE_TTL seconds, a deny NEGATIVE_TTL seconds.
TIMEOUT = 0.5
CACHE_TTL = 0.3
NEGATIVE_TTL = 0.3
METRICS = {"bind": "127.0.0.1:0"}

# CONNACK codes: v5, v3.1.1.
BAD_CREDENTIALS = (0x86, 0x04)
NOT_AUTHORIZED = (0x87, 0x05)
SERVER_UNAVAILABLE = (0x88, 0x03)


def code(v5: bool, codes: tuple[int, int]) -> int:
    return codes[0] if v5 else codes[1]


def suback_refused(v5: bool) -> int:
    return 0x87 if v5 else 0x80


def puback_refused(v5: bool, qos: int) -> int:
    """What a refused PUBLISH is acknowledged with: v5 0x87 for QoS 1/2, a plain ack for v3.1.1 (0 for QoS 0)."""
    return 0x87 if v5 and qos else 0


async def platform_front(
    make_front: FrontFactory,
    platform: FakePlatform,
    style: str,
    *,
    users_file: Any = None,
    upstream: dict[str, Any] | None = None,
    acl: dict[str, Any] | None = None,
    metrics: bool = True,
    **http: Any,
) -> FrontBroker:
    """A front broker asking ``platform`` in ``style`` for every login and (``acl.source: http``) every check."""
    http = {"timeout": TIMEOUT, "cache_ttl": CACHE_TTL, "negative_cache_ttl": NEGATIVE_TTL, **http}
    config = platform.emqx_config(**http) if style == "emqx" else platform.go_auth_config(**http)
    auth: dict[str, Any] = {"http": config}
    if users_file is not None:
        auth["users_file"] = str(users_file)
    sections: dict[str, Any] = {"auth": auth, "acl": {"source": "http", **(acl or {})}}
    if upstream is not None:
        sections["upstream"] = upstream
    if metrics:
        sections["metrics"] = METRICS
    front: FrontBroker = await make_front(**sections)
    return front


def auth_log(platform: FakePlatform, style: str) -> Endpoint:
    return platform.auth if style == "emqx" else platform.go_auth


def acl_log(platform: FakePlatform, style: str) -> Endpoint:
    return platform.acl if style == "emqx" else platform.go_acl


_ACC = {2: "publish", 4: "subscribe", 1: "deliver"}


def asked(platform: FakePlatform, style: str) -> list[tuple[str, str, str]]:
    """The ACL requests so far as (username, action, topic); go-auth's acc 1 reads as "deliver"."""
    if style == "emqx":
        return [(r["username"], r["action"], r["topic"]) for r in platform.acl.requests]
    return [(r["username"], _ACC.get(r["acc"], str(r["acc"])), r["topic"]) for r in platform.go_acl.requests]


def on_wire(style: str, action: str) -> str:
    """How an action appears in :func:`asked`: EMQX asks about a delivery as a subscribe of the literal topic."""
    return "subscribe" if style == "emqx" and action == "deliver" else action


def asked_about(platform: FakePlatform, style: str, topic: str) -> list[str]:
    """The actions asked about ``topic`` (any identity), in order."""
    return [action for _, action, t in asked(platform, style) if t == topic]


def auth_bodies(platform: FakePlatform, style: str) -> list[dict[str, Any]]:
    return list(auth_log(platform, style).requests)


def auth_body(style: str, username: str, password: str, client_id: str) -> dict[str, Any]:
    """The exact body the front broker must send for a CONNECT, per style."""
    return {"username": username, "password": password, "clientId" if style == "emqx" else "clientid": client_id}


async def connack(
    front: FrontBroker, username: str | None, password: str | None, v5: bool, **kw: Any
) -> int:
    """Connect with a raw client, return the CONNACK reason code, close."""
    kw.setdefault("client_id", username if username else f"raw-{uid()}")
    client, reason, _ = await RawClient.open(front_port(front), username, v5=v5, password=password, **kw)
    await client.close()
    return reason


async def login(front: FrontBroker, platform: FakePlatform, username: str, v5: bool, **kw: Any) -> RawClient:
    """A connected raw client of ``username`` (its password from the fake), client id ``<username>:<random>``."""
    kw.setdefault("client_id", f"{username}:{uid()}")
    return await connect_ok(front_port(front), username, v5, password=platform.passwords[username], **kw)


async def spy_on(mosquitto: Mosquitto) -> RawClient:
    """A client straight on Mosquitto (no front broker, no platform) that sees every non-$ topic."""
    spy = await connect_ok(mosquitto.port, None, True, client_id=f"spy-{uid()}")
    assert await spy.subscribe("#", qos=2) == [2]
    return spy


async def direct(mosquitto: Mosquitto) -> RawClient:
    """A publisher straight on Mosquitto: messages that reach the front broker only as deliveries."""
    return await connect_ok(mosquitto.port, None, True, client_id=f"direct-{uid()}")


def mqtt_client(
    front: FrontBroker, username: str, password: str, v5: bool, identifier: str | None = None, **kw: Any
) -> aiomqtt.Client:
    """aiomqtt (paho underneath), as an application would connect through the front broker."""
    return aiomqtt.Client(
        "127.0.0.1",
        front_port(front),
        username=username,
        password=password,
        identifier=identifier or f"{username}:{uid()}",
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        timeout=5,
        **kw,
    )


async def metrics_of(front: FrontBroker) -> Scrape:
    return await scrape(front)


def requests_total(s: Scrape, kind: str, result: str) -> float:
    return s.get("mqtt_front_auth_requests_total", backend="http", kind=kind, result=result)


def connect_results(s: Scrape) -> dict[str, float]:
    """mqtt_front_connect_attempts_total by result, zeros left out."""
    return {dict(k)["result"]: v for k, v in s.series("mqtt_front_connect_attempts_total").items() if v}

