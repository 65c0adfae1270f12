"""broker.auth.platform.PlatformClient against a real HTTP server playing FlowFuse (tests/support/platform.py).

No mocks of httpx: every answer comes over a socket. Small TTLs (0.2 s) keep the file fast.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import broker.auth.platform as platform_module
from broker.auth.platform import PlatformClient, PlatformVerdict
from broker.config import HttpAuthConfig
from broker.ops.metrics import Metrics
from tests.support.pki import Pki
from tests.support.platform import FakePlatform
from tests.support.ports import free_port

Make = Callable[..., Awaitable[PlatformClient]]
PROJECT = "project:team1:p1"


@pytest.fixture
async def make_client(platform: FakePlatform) -> AsyncIterator[Make]:
    """``await make_client(style="emqx", **auth_http)`` -> a started client of ``platform``."""
    clients: list[PlatformClient] = []

    async def make(style: str = "emqx", **extra: Any) -> PlatformClient:
        data = platform.go_auth_config(**extra) if style == "go-auth" else platform.emqx_config(**extra)
        client = PlatformClient(HttpAuthConfig.model_validate(data))
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# -- authentication --------------------------------------------------------------------------


async def test_emqx_auth_allows_and_keeps_client_attrs(platform: FakePlatform, make_client: Make) -> None:
    project_pw = platform.add(PROJECT)
    team_pw = platform.add("alice@team1")
    client = await make_client()
    verdict = await client.authenticate(PROJECT, project_pw.encode(), f"{PROJECT}:n")
    assert verdict == PlatformVerdict(True, "allow", superuser=False, client_attrs={"team": ""})
    assert platform.auth.requests == [{"username": PROJECT, "password": project_pw, "clientId": f"{PROJECT}:n"}]
    verdict = await client.authenticate("alice@team1", team_pw.encode(), "alice@team1")
    assert verdict.ok and verdict.client_attrs == {"team": "ff/v1/team1/c/"}
    assert (await client.authenticate(PROJECT, b"wrong", "x")) == PlatformVerdict(False, "deny")
    assert (await client.authenticate("nobody@team1", b"x", "x")).reason == "deny"
    assert platform.auth.count == 4
    assert client.stats.requests[("auth", "allow")] == 2 and client.stats.requests[("auth", "deny")] == 2


async def test_superuser_and_attrs_are_read_strictly(platform: FakePlatform, make_client: Make) -> None:
    client = await make_client()
    platform.auth.override = {"result": "allow", "is_superuser": True, "client_attrs": {"team": "m/", "n": 3}}
    verdict = await client.authenticate("u", b"p", "c")
    assert verdict.superuser and verdict.client_attrs == {"team": "m/"}  # string values only
    platform.auth.override = {"result": "allow", "is_superuser": "true", "client_attrs": ["x"]}
    verdict = await client.authenticate("u", b"p", "c")
    assert verdict.ok and not verdict.superuser and verdict.client_attrs == {}


async def test_each_authenticate_sends_one_request_never_cached(platform: FakePlatform, make_client: Make) -> None:
    password = platform.add(PROJECT)
    client = await make_client()
    for _ in range(3):
        assert (await client.authenticate(PROJECT, password.encode(), "c")).ok
    assert platform.auth.count == 3


@pytest.mark.parametrize(
    "username", ["frontend:team1:d1", "fe-team:u1:team1:s1", "expert-client:u1:s1"]
)
async def test_one_time_credential_is_checked_once(platform: FakePlatform, make_client: Make, username: str) -> None:
    password = platform.add(username)
    client = await make_client()
    assert (await client.authenticate(username, password.encode(), username)).ok
    assert platform.auth.count == 1 and platform.consumed == [username]
    # The platform deleted it: the second use is the platform's deny, not ours.
    assert (await client.authenticate(username, password.encode(), username)) == PlatformVerdict(False, "deny")
    assert platform.auth.count == 2


async def test_one_time_credential_on_a_slow_platform_is_not_retried(platform: FakePlatform, make_client: Make) -> None:
    username = "frontend:team1:d1"
    password = platform.add(username)
    platform.auth.delay = 0.5
    client = await make_client(timeout=0.2)
    verdict = await client.authenticate(username, password.encode(), username)
    assert verdict == PlatformVerdict(False, "timeout")
    async with asyncio.timeout(5):
        while not platform.consumed:  # the platform finishes the check after we gave up
            await asyncio.sleep(0.05)
    assert platform.auth.count == 1 and platform.consumed == [username]  # used up by the one request, never again


@pytest.mark.parametrize(
    ("knob", "reason"),
    [
        ({"delay": 1.0}, "timeout"),
        ({"fail": 500}, "error"),
        ({"fail": 503}, "error"),
        ({"fail": 401}, "deny"),
        ({"fail": 404}, "deny"),
        ({"garbage": b"<html>oops</html>"}, "error"),
        ({"override": {"result": "ignore"}}, "deny"),
        ({"override": {"result": "deny"}}, "deny"),
        ({"override": {"result": "maybe"}}, "error"),
        ({"override": {"allow": True}}, "error"),
        ({"override": lambda body: (200, b'["allow"]')}, "error"),
        ({"override": lambda body: 204}, "error"),  # only 200 + {"result":"allow"} logs in
        ({"override": lambda body: (201, {"result": "allow"})}, "error"),
    ],
)
async def test_emqx_auth_fails_closed(
    platform: FakePlatform, make_client: Make, knob: dict[str, Any], reason: str
) -> None:
    password = platform.add(PROJECT)
    for name, value in knob.items():
        setattr(platform.auth, name, value)
    client = await make_client(timeout=0.3)
    verdict = await client.authenticate(PROJECT, password.encode(), "c")
    assert verdict == PlatformVerdict(False, reason)
    assert platform.auth.count == 1  # never retried
    assert client.stats.requests[("auth", reason)] == 1


async def test_connection_refused_is_an_error() -> None:
    port = free_port()
    config = HttpAuthConfig(auth_url=f"http://127.0.0.1:{port}/a", acl_url=f"http://127.0.0.1:{port}/b")
    client = PlatformClient(config)
    await client.start()
    try:
        assert (await client.authenticate("u", b"p", "c")) == PlatformVerdict(False, "error")
        assert await client.check("u", "c", "publish", "t") is False
        assert await client.check("u", "c", "publish", "t") is False
        assert client.stats.requests[("acl", "error")] == 2  # an error is not cached
    finally:
        await client.close()


async def test_password_not_utf8_is_refused_without_a_request(platform: FakePlatform, make_client: Make) -> None:
    client = await make_client()
    assert (await client.authenticate(PROJECT, b"\xff\xfe", "c")) == PlatformVerdict(False, "deny")
    assert platform.auth.count == 0


async def test_missing_username_and_password_are_sent_empty(platform: FakePlatform, make_client: Make) -> None:
    client = await make_client()
    assert not (await client.authenticate(None, None, "c")).ok
    assert platform.auth.requests == [{"username": "", "password": "", "clientId": "c"}]


@pytest.mark.parametrize(("status", "ok", "reason"), [(200, True, "allow"), (204, True, "allow"),
                                                      (401, False, "deny"), (500, False, "error")])
async def test_go_auth_login(platform: FakePlatform, make_client: Make, status: int, ok: bool, reason: str) -> None:
    client = await make_client("go-auth")
    platform.go_auth.override = lambda body: status
    assert (await client.authenticate("u", b"p", "cid")) == PlatformVerdict(ok, reason)
    assert platform.go_auth.requests == [{"username": "u", "password": "p", "clientid": "cid"}]


async def test_go_auth_semantics(platform: FakePlatform, make_client: Make) -> None:
    password = platform.add(PROJECT)
    client = await make_client("go-auth")
    assert (await client.authenticate(PROJECT, password.encode(), "c")) == PlatformVerdict(True, "allow")
    assert (await client.authenticate(PROJECT, b"bad", "c")) == PlatformVerdict(False, "deny")


# -- authorization ---------------------------------------------------------------------------


async def test_emqx_acl_requests_and_flowfuse_rules(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    client = await make_client()
    assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/p/p2/in/x") is True
    assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/p/p2/out/x") is False
    assert await client.check(PROJECT, "c", "subscribe", "ff/v1/team1/p/+/out/#") is True
    assert await client.check(PROJECT, "c", "subscribe", "ff/v1/+/p/+/out/#") is False
    assert await client.check(PROJECT, "c", "subscribe", "$share/p1/ff/v1/team1/p/p1/in/#") is True
    assert await client.check(PROJECT, "c", "subscribe", "$share/other/ff/v1/team1/p/p1/in/#") is False
    assert await client.check(PROJECT, "c", "deliver", "ff/v1/team1/p/p2/out/y") is True
    assert platform.acl.requests[0] == {"username": PROJECT, "topic": "ff/v1/team1/p/p2/in/x", "action": "publish"}
    # A delivery is checked as a subscribe of the literal topic.
    assert platform.acl.requests[-1] == {"username": PROJECT, "topic": "ff/v1/team1/p/p2/out/y", "action": "subscribe"}
    assert client.stats.requests[("acl", "allow")] == 4 and client.stats.requests[("acl", "deny")] == 3


async def test_emqx_acl_answers(platform: FakePlatform, make_client: Make) -> None:
    client = await make_client(negative_cache_ttl=0)
    cases: list[tuple[Any, bool, str]] = [
        (lambda body: 204, True, "allow"),
        ({"result": "allow"}, True, "allow"),
        ({"result": "deny"}, False, "deny"),
        ({"result": "ignore"}, False, "deny"),
        (lambda body: 403, False, "deny"),
        (lambda body: 502, False, "error"),
        (lambda body: (200, b"not json"), False, "error"),
        ({"result": 1}, False, "error"),
    ]
    for i, (override, allowed, result) in enumerate(cases):
        platform.acl.override = override
        before = client.stats.requests[("acl", result)]
        assert await client.check("u", "c", "publish", f"t/{i}") is allowed, override
        assert client.stats.requests[("acl", result)] == before + 1


async def test_go_auth_acc_codes_and_client_id_key(platform: FakePlatform, make_client: Make) -> None:
    platform.add("alice@team1", rules=[("a/#", "both")])
    client = await make_client("go-auth")
    for action in ("publish", "subscribe", "deliver"):
        assert await client.check("alice@team1", "alice@team1", action, "a/b") is True
    assert [r["acc"] for r in platform.go_acl.requests] == [2, 4, 1]
    assert platform.go_acl.requests[0] == {"username": "alice@team1", "clientid": "alice@team1", "topic": "a/b",
                                           "acc": 2}
    assert await client.check("alice@team1", "alice@team1:2", "publish", "a/b") is True  # another client id: asks
    assert platform.go_acl.count == 4
    assert await client.check("alice@team1", "alice@team1", "publish", "b/c") is False
    assert await client.check("alice@team1", "alice@team1", "publish", "a/b") is True  # cached
    assert platform.go_acl.count == 5


async def test_team_broker_rules_are_relative_and_live(platform: FakePlatform, make_client: Make) -> None:
    platform.add("alice@team1", rules=[("foo/+", "subscribe"), ("out/#", "publish")])
    client = await make_client(cache_ttl=0, negative_cache_ttl=0)
    assert await client.check("alice@team1", "alice@team1", "subscribe", "foo/#") is True  # FlowFuse's quirk
    assert await client.check("alice@team1", "alice@team1", "publish", "foo/a") is False
    assert await client.check("alice@team1", "alice@team1", "publish", "out/x/y") is True
    platform.set_rules("alice@team1", [])
    assert await client.check("alice@team1", "alice@team1", "publish", "out/x/y") is False


async def test_allow_cached_for_cache_ttl(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    client = await make_client(cache_ttl=0.2)
    topic = "ff/v1/team1/c/x"
    assert client.cached(PROJECT, "c", "publish", topic) is None
    assert await client.check(PROJECT, "c", "publish", topic) is True
    assert client.cached(PROJECT, "c", "publish", topic) is True
    assert await client.check(PROJECT, "c", "publish", topic) is True
    assert platform.acl.count == 1
    await asyncio.sleep(0.25)
    assert client.cached(PROJECT, "c", "publish", topic) is None
    assert await client.check(PROJECT, "c", "publish", topic) is True
    assert platform.acl.count == 2
    assert (client.stats.cache_hits, client.stats.cache_misses) == (2, 2)


async def test_deny_cached_for_negative_cache_ttl(platform: FakePlatform, make_client: Make) -> None:
    platform.add("alice@team1", rules=[])
    client = await make_client(cache_ttl=60, negative_cache_ttl=0.2)
    assert await client.check("alice@team1", "alice@team1", "publish", "a") is False
    platform.set_rules("alice@team1", [("a", "publish")])
    assert await client.check("alice@team1", "alice@team1", "publish", "a") is False  # the cached deny
    assert client.cached("alice@team1", "alice@team1", "publish", "a") is False
    assert platform.acl.count == 1
    await asyncio.sleep(0.25)
    assert await client.check("alice@team1", "alice@team1", "publish", "a") is True
    assert platform.acl.count == 2


async def test_failures_are_not_cached_but_cached_decisions_serve(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    client = await make_client(cache_ttl=60, timeout=0.2)
    allowed = "ff/v1/team1/c/ok"
    assert await client.check(PROJECT, "c", "publish", allowed) is True
    for knob, value in (("fail", 503), ("garbage", b"?"), ("delay", 0.5)):
        platform.acl.reset()
        setattr(platform.acl, knob, value)
        # The platform is down: the cached allow keeps serving, an unknown topic is refused and asked again.
        assert await client.check(PROJECT, "c", "publish", allowed) is True
        assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/new") is False
        assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/new") is False
        assert platform.acl.count == 2, knob
    platform.acl.reset()
    assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/new") is True
    assert client.stats.requests[("acl", "error")] == 4 and client.stats.requests[("acl", "timeout")] == 2


async def test_concurrent_misses_are_coalesced(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    platform.acl.delay = 0.2
    client = await make_client()
    results = await asyncio.gather(*(client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x") for _ in range(50)))
    assert results == [True] * 50
    assert platform.acl.count == 1
    assert client.stats.coalesced == 49 and client.stats.cache_misses == 50
    # A delivery and a subscribe of the same literal topic are the same request (emqx): one entry.
    assert client.cached(PROJECT, "c", "deliver", "ff/v1/team1/c/x") is None
    assert await client.check(PROJECT, "c", "subscribe", "ff/v1/team1/c/x") is True
    assert client.cached(PROJECT, "c", "deliver", "ff/v1/team1/c/x") is True


async def test_cancelled_caller_does_not_cancel_the_shared_request(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    platform.acl.delay = 0.2
    client = await make_client()
    first = asyncio.ensure_future(client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x"))
    second = asyncio.ensure_future(client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x"))
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second is True
    assert client.cached(PROJECT, "c", "publish", "ff/v1/team1/c/x") is True
    assert platform.acl.count == 1


async def test_max_concurrency_is_respected(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    platform.acl.delay = 0.05
    client = await make_client(max_concurrency=3)
    topics = [f"ff/v1/team1/c/{i}" for i in range(20)]
    results = await asyncio.gather(*(client.check(PROJECT, "c", "publish", t) for t in topics))
    assert results == [True] * 20 and platform.acl.count == 20
    assert platform.acl.peak == 3
    assert client.stats.in_flight == 0
    assert len(set(platform.acl.peers)) <= 3  # kept-alive connections, never one per request


async def test_waiting_for_a_slot_counts_towards_the_timeout(platform: FakePlatform, make_client: Make) -> None:
    platform.acl.delay = 0.6
    client = await make_client(max_concurrency=1, timeout=0.3)
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(client.check("u", "c", "publish", "a"), client.check("u", "c", "publish", "b"))
    assert list(results) == [False, False]
    assert client.stats.requests[("acl", "timeout")] == 2
    # The second waited for the only slot within its own 0.3 s: both are refused at 0.3 s, not 0.3 + 0.3.
    assert asyncio.get_running_loop().time() - started < 0.5


async def test_sequential_requests_share_one_connection(platform: FakePlatform, make_client: Make) -> None:
    password = platform.add(PROJECT)
    client = await make_client()
    for i in range(10):
        await client.check(PROJECT, "c", "publish", f"ff/v1/team1/c/{i}")
        await client.authenticate(PROJECT, password.encode(), "c")
    assert len(set(platform.acl.peers) | set(platform.auth.peers)) == 1


@pytest.mark.parametrize(
    ("bound", "checks", "smallest", "kept_from"),
    [(3, 5, 3, 4), (64, 200, 60, 140)],  # at 64 a sixteenth (4) of the oldest goes at once
    ids=["one-by-one", "a-sixteenth-at-once"],
)
async def test_cache_is_bounded(platform: FakePlatform, bound: int, checks: int, smallest: int, kept_from: int) -> None:
    platform.add(PROJECT)
    client = PlatformClient(HttpAuthConfig.model_validate(platform.emqx_config()), max_cache_entries=bound)
    await client.start()
    try:
        for i in range(checks):
            await client.check(PROJECT, "c", "publish", f"ff/v1/team1/c/{i}")
        assert smallest <= client.cache_size() <= bound
        assert client.cached(PROJECT, "c", "publish", "ff/v1/team1/c/0") is None  # the oldest went first
        assert all(client.cached(PROJECT, "c", "publish", f"ff/v1/team1/c/{i}") for i in range(kept_from, checks))
    finally:
        await client.close()


async def test_forget_drops_one_identity(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    platform.add("project:team1:p2")
    client = await make_client()
    await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x")
    await client.check(PROJECT, "c", "publish", "ff/v1/team2/c/x")
    await client.check("project:team1:p2", "c", "publish", "ff/v1/team1/c/x")
    client.forget(PROJECT)
    assert client.cached(PROJECT, "c", "publish", "ff/v1/team1/c/x") is None
    assert client.cached(PROJECT, "c", "publish", "ff/v1/team2/c/x") is None
    assert client.cached("project:team1:p2", "c", "publish", "ff/v1/team1/c/x") is True
    platform.remove(PROJECT)  # revoked: the next check asks and is denied
    assert await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x") is False
    assert platform.acl.count == 4


async def test_forget_while_a_request_is_in_flight(platform: FakePlatform, make_client: Make) -> None:
    platform.add(PROJECT)
    platform.acl.delay = 0.2
    client = await make_client()
    pending = asyncio.ensure_future(client.check(PROJECT, "c", "publish", "ff/v1/team1/c/x"))
    await asyncio.sleep(0.05)
    client.forget(PROJECT)
    assert await pending is True  # answered, but the answer predates the revocation: not cached
    assert client.cached(PROJECT, "c", "publish", "ff/v1/team1/c/x") is None


async def test_close_refuses_pending_checks(platform: FakePlatform) -> None:
    platform.acl.delay = 1.0
    client = PlatformClient(HttpAuthConfig.model_validate(platform.emqx_config()))
    await client.start()
    pending = asyncio.ensure_future(client.check("u", "c", "publish", "a"))
    await asyncio.sleep(0.05)
    await client.close()
    assert await pending is False
    assert (await client.authenticate("u", b"p", "c")).reason == "error"


# -- transport -------------------------------------------------------------------------------


async def test_headers_from_file_env_and_literal(
    platform: FakePlatform, make_client: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("Bearer from-a-file\nsecond line ignored\n")
    monkeypatch.setenv("PLATFORM_KEY", "from-env")
    client = await make_client(
        headers={"Authorization": f"file:{token}", "X-Key": "env:PLATFORM_KEY", "X-Literal": "plain", "Accept": "*/*"}
    )
    await client.authenticate("u", b"p", "c")
    await client.check("u", "c", "publish", "t")
    for seen in (platform.auth.headers[0], platform.acl.headers[0]):
        assert seen["Authorization"] == "Bearer from-a-file"
        assert seen["X-Key"] == "from-env" and seen["X-Literal"] == "plain"
        assert seen["Content-Type"] == "application/json" and seen["Accept"] == "*/*"
        assert seen["User-Agent"].startswith("mqtt-front/")


def _server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


async def test_https_with_ca_file(pki: Pki) -> None:
    fake = await FakePlatform(ssl_context=_server_context(pki)).start()
    try:
        password = fake.add(PROJECT)
        assert fake.base_url.startswith("https://")
        outcomes = {}
        for name, ca_file in (("ours", pki.ca), ("system", None), ("other", pki.other_ca)):
            client = PlatformClient(HttpAuthConfig.model_validate(fake.emqx_config(ca_file=ca_file)))
            await client.start()
            outcomes[name] = (await client.authenticate(PROJECT, password.encode(), "c")).reason
            await client.close()
        assert outcomes == {"ours": "allow", "system": "error", "other": "error"}
        assert fake.auth.count == 1  # the untrusted handshakes never sent the password
    finally:
        await fake.stop()


# -- observability ---------------------------------------------------------------------------


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("mqtt_front_auth")
        for s in family.samples
    }


async def test_metrics_counters_move_exactly(platform: FakePlatform, make_client: Make) -> None:
    password = platform.add(PROJECT)
    client = await make_client(timeout=0.3)
    metrics = Metrics()
    metrics.watch_platform(client)
    before = _samples(metrics)
    assert before[("mqtt_front_auth_requests_total", (("backend", "http"), ("kind", "auth"), ("result", "allow")))] == 0
    assert before[("mqtt_front_auth_request_seconds_count", (("backend", "http"),))] == 0

    await client.authenticate(PROJECT, password.encode(), "c")  # auth allow
    await client.authenticate(PROJECT, b"nope", "c")  # auth deny
    await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/a")  # acl allow (miss)
    await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/a")  # hit
    client.cached(PROJECT, "c", "publish", "ff/v1/team1/c/a")  # hit
    await client.check(PROJECT, "c", "publish", "ff/v1/team2/c/a")  # acl deny (miss)
    platform.acl.fail = 500
    await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/b")  # acl error (miss)
    platform.acl.fail, platform.acl.delay = None, 1.0
    await client.check(PROJECT, "c", "publish", "ff/v1/team1/c/c")  # acl timeout (miss)

    after = _samples(metrics)
    http = (("backend", "http"),)

    def requests(kind: str, result: str) -> float:
        return after[("mqtt_front_auth_requests_total", (("backend", "http"), ("kind", kind), ("result", result)))]

    assert [requests("auth", r) for r in ("allow", "deny", "error", "timeout")] == [1, 1, 0, 0]
    assert [requests("acl", r) for r in ("allow", "deny", "error", "timeout")] == [1, 1, 1, 1]
    assert after[("mqtt_front_auth_cache_hits_total", http)] == 2
    assert after[("mqtt_front_auth_cache_misses_total", http)] == 4
    assert after[("mqtt_front_auth_coalesced_waits_total", http)] == 0
    assert after[("mqtt_front_auth_in_flight", http)] == 0
    assert after[("mqtt_front_auth_cache_entries", http)] == 2
    assert after[("mqtt_front_auth_request_seconds_count", http)] == 6
    assert after[("mqtt_front_auth_request_seconds_bucket", (("backend", "http"), ("le", "+Inf")))] == 6
    assert after[("mqtt_front_auth_request_seconds_bucket", (("backend", "http"), ("le", "0.25")))] == 5
    assert after[("mqtt_front_auth_request_seconds_sum", http)] >= 0.3


async def test_platform_errors_are_logged_at_most_once_a_second(
    platform: FakePlatform, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform_module, "LOG_INTERVAL", 0.3)
    url = platform.emqx_config()["auth_url"].replace("http://", "http://svc:hunter2@") + "?token=abc"
    client = PlatformClient(HttpAuthConfig.model_validate(platform.emqx_config(auth_url=url)))
    await client.start()
    platform.auth.fail = 503
    try:
        with caplog.at_level(logging.WARNING, logger="mqtt_front.auth.platform"):
            for _ in range(5):
                await client.authenticate("u", b"pw-secret", "c")
            await asyncio.sleep(0.35)
            await client.authenticate("u", b"pw-secret", "c")
    finally:
        await client.close()
    lines = [r for r in caplog.records if getattr(r, "event", None) == "platform_error"]
    assert len(lines) == 2
    first, second = (r.event_fields for r in lines)  # type: ignore[attr-defined]
    assert first["url"] == f"http://***@127.0.0.1:{platform.port}/api/comms/v2/auth"
    assert first["kind"] == "auth" and first["reason"] == "error" and "suppressed" not in first
    assert second["suppressed"] == 4
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in text and "pw-secret" not in text and "abc" not in text


@pytest.mark.parametrize(("style", "logged"), [("emqx", True), ("go-auth", False)])
async def test_a_4xx_is_a_deny_and_in_emqx_style_also_a_logged_platform_error(
    platform: FakePlatform, caplog: pytest.LogCaptureFixture, style: str, logged: bool
) -> None:
    """FlowFuse's v2 API always answers 200: a 401 there means our URL or header is wrong, which clients
    would only see as bad credentials. go-auth answers 401 for every deny: nothing to say then."""
    config = platform.emqx_config() if style == "emqx" else platform.go_auth_config()
    client = PlatformClient(HttpAuthConfig.model_validate(config))
    await client.start()
    (platform.auth if style == "emqx" else platform.go_auth).fail = 401
    try:
        with caplog.at_level(logging.WARNING, logger="mqtt_front.auth.platform"):
            assert await client.authenticate(PROJECT, b"pw-secret", "c") == PlatformVerdict(False, "deny")
    finally:
        await client.close()
    lines = [r.event_fields for r in caplog.records if getattr(r, "event", None) == "platform_error"]  # type: ignore[attr-defined]
    if logged:
        expected = [("auth", "status", "status 401, read as deny")]
        assert [(f["kind"], f["reason"], f["detail"]) for f in lines] == expected
    else:
        assert lines == []


async def test_4xx_lines_never_hide_an_outages_lines(platform: FakePlatform, caplog: pytest.LogCaptureFixture) -> None:
    """A backend that denies with 401 logs a platform_error per second of its own; a timeout or 5xx in the
    same second still gets its line."""
    client = PlatformClient(HttpAuthConfig.model_validate(platform.emqx_config()))
    await client.start()
    try:
        with caplog.at_level(logging.WARNING, logger="mqtt_front.auth.platform"):
            platform.auth.fail = 401
            await client.authenticate(PROJECT, b"pw", "c")
            await client.authenticate(PROJECT, b"pw", "c")
            platform.auth.fail = 503
            await client.authenticate(PROJECT, b"pw", "c")
    finally:
        await client.close()
    lines = [r.event_fields for r in caplog.records if getattr(r, "event", None) == "platform_error"]  # type: ignore[attr-defined]
    assert [f["reason"] for f in lines] == ["status", "error"]


def test_fake_platform_serves_from_a_thread_for_sync_tests() -> None:
    with FakePlatform().in_thread() as fake:
        password = fake.add("alice@team1")
        body = {"username": "alice@team1", "password": password, "clientId": "alice@team1"}
        answer = httpx.post(fake.emqx_config()["auth_url"], json=body, timeout=5).json()
        assert answer["result"] == "allow" and answer["client_attrs"] == {"team": "ff/v1/team1/c/"}
        assert httpx.post(fake.go_auth_config()["acl_url"], json={**body, "topic": "x", "acc": 2}).status_code == 200
        assert fake.auth.count == 1 and fake.go_acl.count == 1
