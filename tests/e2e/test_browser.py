"""A real browser, as FlowFuse's web frontend connects: headless Chromium (Debian's ``chromium``, installed by
``make test``) opens a page served by this test on loopback; the page loads MQTT.js's browser bundle (the npm
``mqtt`` package pinned by tests/js/package-lock.json) and connects over wss, MQTT 5, through the front broker
to a real Mosquitto.

- An allowed Origin, a short-lived JWT as the password, a mountpoint from the token: the page publishes and
  receives inside its mount; a client directly on Mosquitto sees the message under the mount and answers.
- The same page from an Origin not in ``allowed_origins``: the handshake is refused (403), the page cannot
  connect, and the front logs ``websocket_refused``.
- A one-time credential of the platform (``frontend:<team>:<device>``, ``auth.http``): the first page load
  connects and reads the device's logs, a reload with the same password is refused.

Chromium is driven by playwright-core (tests/js/browser/drive.mjs) with ``executablePath`` /usr/bin/chromium;
it trusts the test's trustme certificate by its SPKI pin (``--ignore-certificate-errors-spki-list``) and
nothing else. The page (tests/js/browser/page.js) gets its settings in the URL fragment and reports in
``window.mqttResult``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.server import FrontBroker
from tests.support.cli import ROOT
from tests.support.front import FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.pki import Pki
from tests.support.platform import FakePlatform

pytestmark = pytest.mark.timeout(60)

JS_DIR = ROOT / "tests" / "js"
PAGE_DIR = JS_DIR / "browser"
MQTT_BUNDLE = JS_DIR / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"  # the UMD build: a global `mqtt`
CHROMIUM = "/usr/bin/chromium"
SECRET = "browser-test-hs256-secret-" + "x" * 16  # HS256 needs at least 32 bytes
ISSUER, AUDIENCE = "https://forge.example.test", "mqtt-front"
MOUNT = "ff/v1/team1/c/"
DRIVER_TIMEOUT = 45.0  # seconds for the whole browser run (it normally takes 2-4)


# ---------------------------------------------------------------- the page server


@dataclass
class PageServer:
    """The page, its script and MQTT.js's bundle, served over HTTP on two loopback ports: two Origins."""

    allowed: str  # http://127.0.0.1:<port>, the Origin listed in the wss listener's allowed_origins
    foreign: str  # the same files on another port: another Origin, not listed
    requests: list[tuple[str, str]]  # (Host, path) of every request

    def url(self, origin: str, **settings: Any) -> str:
        """The page at ``origin`` with its settings in the fragment (a browser never sends it to the server)."""
        return f"{origin}/#{urllib.parse.quote(json.dumps(settings))}"


@pytest.fixture
async def pages() -> AsyncIterator[PageServer]:
    if not MQTT_BUNDLE.is_file():
        raise RuntimeError(f"{MQTT_BUNDLE} is missing: run `make test` (it runs npm ci in tests/js)")
    files = {
        "/": (PAGE_DIR / "index.html", "text/html"),
        "/page.js": (PAGE_DIR / "page.js", "text/javascript"),
        "/mqtt.min.js": (MQTT_BUNDLE, "text/javascript"),
    }
    requests: list[tuple[str, str]] = []

    async def serve(request: web.Request) -> web.Response:
        requests.append((request.host, request.path))
        path, content_type = files[request.path]
        return web.Response(body=path.read_bytes(), content_type=content_type, headers={"Cache-Control": "no-store"})

    app = web.Application()
    for route in files:
        app.router.add_get(route, serve)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    origins = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        origins.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        yield PageServer(origins[0], origins[1], requests)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- the browser


def spki_pin(cert: Path) -> str:
    """Chromium's SPKI pin of a certificate: base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())  # the first certificate of the chain file
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def node_binary() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed: `make test` needs Node.js for the browser tests")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        raise RuntimeError("tests/js/node_modules/playwright-core is missing: run `make test` (npm ci in tests/js)")
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium with apt-get")
    return found


async def browse(pki: Pki, *urls: str) -> list[dict[str, Any]]:
    """Open each URL in turn in one headless Chromium; what each page reported (with console and sockets)."""
    config = {"chromium": CHROMIUM, "spki": spki_pin(pki.server_cert), "visits": list(urls), "timeout": 15000}
    proc = await asyncio.create_subprocess_exec(
        node_binary(),
        str(PAGE_DIR / "drive.mjs"),
        json.dumps(config),
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), DRIVER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = stdout.decode().strip().splitlines()
    assert lines, f"no output from the browser driver (exit {proc.returncode}): {stderr.decode()}"
    report: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in report, (report, stderr.decode())
    visits: list[dict[str, Any]] = report["visits"]
    for visit in visits:
        assert "error" not in visit and visit["result"] is not None, visit
        assert json.loads(visit["dom"]) == visit["result"]  # the page wrote the same report into its DOM
        assert not visit["pageErrors"], visit
    return visits


# ---------------------------------------------------------------- the front broker, tokens, Mosquitto


async def wss_front(make_front: FrontFactory, pki: Pki, pages: PageServer, **sections: Any) -> FrontBroker:
    """A front broker whose wss listener (the trustme certificate) allows the page server's first Origin only."""
    wss = {
        "name": "wss",
        "type": "ws",
        "bind": "127.0.0.1:0",
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
        "allowed_origins": [pages.allowed],
    }
    front: FrontBroker = await make_front(
        listeners=[{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}, wss], **sections
    )
    return front


def jwt_auth() -> dict[str, Any]:
    return {
        "allow_anonymous": False,
        "jwt": {
            "secret": SECRET,
            "algorithms": ["HS256"],
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "leeway": 5,
            "mountpoint_claim": "mountpoint",
        },
    }


def browser_token(identity: str, lifetime: float = 60) -> str:
    """A short-lived token as the platform would hand it to the web frontend: its mount and its rights in it."""
    now = int(time.time())
    claims = {
        "sub": identity,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + int(lifetime),
        "mountpoint": MOUNT,
        "acl": [{"permission": "allow", "action": "all", "topic": "browser/#"}],
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def responder(
    mosquitto: Mosquitto, topic_filter: str, answers: dict[str, tuple[str, str]]
) -> AsyncIterator[list[tuple[str, str]]]:
    """A client directly on Mosquitto: records what arrives on ``topic_filter`` and answers a topic in
    ``answers`` with (topic, payload), as a device or a flow would."""
    seen: list[tuple[str, str]] = []
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"direct-{uid()}") as client:
        await client.subscribe(topic_filter, qos=1)

        async def loop() -> None:
            async for message in client.messages:
                topic, payload = str(message.topic), bytes(message.payload).decode()
                seen.append((topic, payload))
                if topic in answers:
                    await client.publish(*answers[topic], qos=1)

        task = asyncio.create_task(loop())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(r.event_fields) for r in caplog.records if getattr(r, "event", None) == name]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the cases


async def test_browser_publishes_and_receives_inside_its_mount(
    make_front: FrontFactory, mosquitto: Mosquitto, pki: Pki, pages: PageServer, caplog: pytest.LogCaptureFixture
) -> None:
    front = await wss_front(make_front, pki, pages, auth=jwt_auth(), acl={"preset": "flowfuse"})
    run, identity = uid(), "alice@team1"
    hello, reply = f"browser/{run}/hello", f"browser/{run}/reply"
    url = pages.url(
        pages.allowed,
        url=f"wss://127.0.0.1:{front_port(front, 'wss')}/",
        username="web",  # ignored: the identity is the token's sub
        password=browser_token(identity),
        clientId=identity,  # a Team Broker identity: client id == username
        subscribe=f"browser/{run}/#",
        publish={"topic": hello, "payload": f"hello from the browser {run}"},
        expect=2,
    )
    with caplog.at_level(logging.INFO):
        async with responder(mosquitto, f"{MOUNT}browser/{run}/#", {MOUNT + hello: (MOUNT + reply, "pong")}) as seen:
            (visit,) = await browse(pki, url)
            await asyncio.sleep(0.2)  # the responder's own copy of its answer

    page = visit["result"]
    assert page["origin"] == pages.allowed
    assert page["finish"] == "ok", visit
    assert page["connected"] and page["connack"]["reasonCode"] == 0
    assert page["granted"] == [1]
    assert page["published"] == {"reasonCode": 0}
    # the page sees topics relative to its mount: its own message back, and the answer from Mosquitto's side
    assert sorted((m["topic"], m["payload"]) for m in page["messages"]) == [
        (hello, f"hello from the browser {run}"),
        (reply, "pong"),
    ]
    assert all(m["qos"] == 1 for m in page["messages"])
    # Mosquitto saw the browser's message under the mount
    assert (MOUNT + hello, f"hello from the browser {run}") in seen
    assert (MOUNT + reply, "pong") in seen
    (ws,) = visit["websockets"]
    assert ws["url"].startswith("wss://127.0.0.1:") and not ws["errors"]
    assert not events(caplog, "websocket_refused")
    host = pages.allowed.removeprefix("http://")
    assert {path for h, path in pages.requests if h == host} == {"/", "/page.js", "/mqtt.min.js"}


async def test_browser_from_a_foreign_origin_cannot_connect(
    make_front: FrontFactory, mosquitto: Mosquitto, pki: Pki, pages: PageServer, caplog: pytest.LogCaptureFixture
) -> None:
    front = await wss_front(make_front, pki, pages, auth=jwt_auth(), acl={"preset": "flowfuse"})
    run, identity = uid(), "alice@team1"
    settings = {
        "url": f"wss://127.0.0.1:{front_port(front, 'wss')}/",
        "username": "web",
        "password": browser_token(identity),
        "clientId": identity,
        "subscribe": f"browser/{run}/#",
        "publish": {"topic": f"browser/{run}/hello", "payload": "from a foreign origin"},
        "expect": 1,
    }
    with caplog.at_level(logging.INFO):
        async with responder(mosquitto, f"{MOUNT}browser/{run}/#", {}) as seen:
            # the same page, token, certificate pin and browser; only the Origin differs (then the allowed one)
            visits = await browse(pki, pages.url(pages.foreign, **settings), pages.url(pages.allowed, **settings))
            foreign, allowed = visits
            await asyncio.sleep(0.2)

    page = foreign["result"]
    assert page["origin"] == pages.foreign
    assert page["finish"] == "closed before connect", foreign
    assert not page["connected"] and page["connack"] is None and page["messages"] == []
    # a browser gives a page no reason for a failed WebSocket (MQTT.js just closes); Chromium itself says why
    (ws,) = foreign["websockets"]
    assert ws["errors"] == ["Error during WebSocket handshake: Unexpected response code: 403"], ws
    assert ws["framesReceived"] == 0
    refused = events(caplog, "websocket_refused")
    assert len(refused) == 1, refused
    assert refused[0]["status"] == 403 and refused[0]["listener"] == "wss"
    assert "origin" in refused[0]["reason"].lower(), refused
    # the control: from the allowed Origin the same page connects and round-trips
    assert allowed["result"]["finish"] == "ok", allowed
    assert [m["payload"] for m in allowed["result"]["messages"]] == ["from a foreign origin"]
    assert seen == [(f"{MOUNT}browser/{run}/hello", "from a foreign origin")]  # once: the allowed page's


async def test_browser_reused_one_time_credential_is_refused(
    make_front: FrontFactory, mosquitto: Mosquitto, pki: Pki, pages: PageServer, caplog: pytest.LogCaptureFixture
) -> None:
    platform = await FakePlatform().start()
    try:
        front = await wss_front(
            make_front, pki, pages, auth={"allow_anonymous": False, "http": platform.emqx_config(timeout=3)},
            acl={"source": "http"},
        )  # fmt: skip
        username = "frontend:team1:d1"  # the browser viewing device d1's logs; its ffbf_ token is one-time
        password = platform.add(username)
        logs, heartbeat = "ff/v1/team1/d/d1/logs", "ff/v1/team1/d/d1/logs/heartbeat"
        url = pages.url(
            pages.allowed,
            url=f"wss://127.0.0.1:{front_port(front, 'wss')}/",
            username=username,
            password=password,
            clientId=username,
            subscribe=logs,
            publish={"topic": heartbeat, "payload": "viewing"},
            expect=1,
        )
        with caplog.at_level(logging.INFO):
            async with responder(mosquitto, "ff/v1/team1/d/d1/#", {heartbeat: (logs, "a log line")}) as seen:
                first, reload = await browse(pki, url, url)  # a page reload with the same credential
                await asyncio.sleep(0.2)
    finally:
        await platform.stop()

    page = first["result"]
    assert page["finish"] == "ok", first
    assert page["connack"]["reasonCode"] == 0 and page["granted"] == [1] and page["published"] == {"reasonCode": 0}
    assert [(m["topic"], m["payload"]) for m in page["messages"]] == [(logs, "a log line")]
    assert (heartbeat, "viewing") in seen

    again = reload["result"]
    assert not again["connected"] and again["messages"] == [], reload
    assert again["finish"] == "closed before connect"
    assert [e["code"] for e in again["errors"]] == [0x86], again  # v5 CONNACK: bad user name or password
    # each CONNECT's password went to the platform exactly once; the second was the reuse, and was denied
    logins = [r for r in platform.auth.requests if r.get("username") == username]
    assert [r["password"] for r in logins] == [password, password]
    assert platform.consumed == [username]
    assert [e["user"] for e in events(caplog, "connect")] == [username]
    (refused,) = events(caplog, "connect_refused")
    assert refused["user"] == username and refused["result"] == "bad_credentials"
    assert not events(caplog, "websocket_refused")
