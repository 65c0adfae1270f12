"""/metrics for what happens before and around MQTT: refused handshakes (TLS, WebSocket, PROXY header) by
listener and reason, auth latency by backend, reload status, certificate expiry.

Real parts: real TLS handshakes (asyncio and a blocking ``ssl`` client, which sends its alerts), real
WebSocket clients (the websockets library), raw sockets for the broken headers, aiomqtt logins, the
module's Mosquitto upstream, trustme certificates with chosen expiry dates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import websockets
import yaml
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from broker.config import load_config
from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port, uid
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ops import Scrape, scrape
from tests.support.pki import Pki, write_leaf
from tests.support.platform import FakePlatform
from tests.support.platform_e2e import mqtt_client, platform_front
from tests.support.ports import free_port
from tests.support.raw_client import read_packet, read_until_closed

TIMEOUT = 10.0
DAY = 86400.0
TLS_REASONS = {
    "tls_server_name",
    "tls_client_certificate",
    "tls_certificate_rejected",
    "tls_version",
    "tls_not_tls",
    "tls_handshake",
}
WS_REASONS = {"ws_path", "ws_host", "ws_origin", "ws_subprotocol", "ws_bad_request", "ws_timeout"}
PROXY_REASONS = {"proxy_invalid", "proxy_timeout"}


async def wait_scrape(front: FrontBroker, ready: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``ready`` holds (a refused handshake is counted when the server side sees it fail)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            result = await scrape(front)
            if ready(result):
                return result
            await asyncio.sleep(0.05)


def failures(s: Scrape) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["listener"], dict(labels)["reason"]): value
        for labels, value in s.series("mqtt_front_handshake_failures_total").items()
    }


def leaf(pki: Pki, name: str, days: float, *hosts: str) -> tuple[Path, Path, float]:
    """A certificate of ``pki.authority`` expiring in ``days`` -> (cert, key, notAfter as a Unix time)."""
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=days)
    cert = pki.authority.issue_cert(*(hosts or ("localhost", "127.0.0.1")), not_after=not_after, key_type=pki.key_type)
    paths = pki.folder / f"{name}.pem", pki.folder / f"{name}.key"
    write_leaf(cert, *paths)
    return paths[0], paths[1], not_after.timestamp()


def expiry(s: Scrape, **labels: str) -> float:
    key = ("mqtt_front_certificate_expiry_seconds", frozenset(labels.items()))
    assert key in s.samples, f"no certificate expiry for {labels}"
    return s.samples[key]


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a plain TCP connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_until_closed(reader, TIMEOUT, reset_ok=True)
    finally:
        writer.close()


async def tls_fails(port: int, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
    """A TLS handshake the server refuses: the client sees the server's alert."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname), TIMEOUT
        )
    except (ssl.SSLError, ConnectionResetError):  # an alert, or a server that closes on a ClientHello it refuses
        return
    try:
        # TLS 1.3: a missing client certificate fails on the server after the client's side is done, and the
        # server closes (the counters, not this client, tell the handshake failed).
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()


async def mqtt_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A CONNECT that gets CONNACK 0 (so the handshake before it is over on both sides)."""
    writer.write(connect(f"project:team1:p1:{uid()}", "project:team1:p1", PASSWORD))
    assert await read_packet(reader) == b"\x20\x02\x00\x00"
    writer.close()


def blocking_tls_refuses(port: int, context: ssl.SSLContext) -> None:
    """A blocking ``ssl`` client that refuses the server's certificate: it sends the alert that says why."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(sock, server_hostname="localhost")


async def test_each_refused_handshake_counts_by_listener_and_reason(make_front: FrontFactory, pki: Pki) -> None:
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    front = await make_front(
        metrics={"bind": "127.0.0.1:0"},
        listeners=[
            {"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"},
            {
                "name": "mqtts",
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "tls": {**tls, "min_version": "TLSv1.3", "server_names": ["localhost"]},
            },
            {
                "name": "mtls",
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "tls": {**tls, "client_ca": str(pki.client_ca), "require_client_cert": True},
            },
            {
                "name": "ws",
                "type": "ws",
                "bind": "127.0.0.1:0",
                "path": "/mqtt",
                "allowed_origins": ["https://app.example.com"],
            },
            {"name": "lb", "type": "tcp", "bind": "127.0.0.1:0", "proxy_protocol": True, "handshake_timeout": 0.5},
        ],
    )
    before = await scrape(front)
    # Every reason a listener can have starts at 0; a plain listener has none.
    assert {r for (name, r) in failures(before) if name == "mqtts"} == TLS_REASONS
    assert {r for (name, r) in failures(before) if name == "ws"} == WS_REASONS
    assert {r for (name, r) in failures(before) if name == "lb"} == PROXY_REASONS
    assert not any(name == "mqtt" for name, _ in failures(before))
    assert set(failures(before).values()) == {0}

    mqtts, mtls, ws, lb = (front_port(front, name) for name in ("mqtts", "mtls", "ws", "lb"))
    trusting = pki.client_context()
    # Accepted handshakes count nothing.
    await mqtt_login(*await asyncio.open_connection("127.0.0.1", mqtts, ssl=trusting, server_hostname="localhost"))
    reader, writer = await asyncio.open_connection("127.0.0.1", lb)
    writer.write(b"PROXY TCP4 192.0.2.7 192.0.2.1 4000 1883\r\n")
    await mqtt_login(reader, writer)
    origin = Origin("https://app.example.com")
    async with ws_connect(f"ws://127.0.0.1:{ws}/mqtt", origin=origin, subprotocols=[websockets.Subprotocol("mqtt")]):
        pass
    assert (await raw_exchange(ws, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")

    # TLS: plain MQTT on the TLS port, TLS 1.2 only, another server name, a client refusing the certificate,
    # no client certificate where one is required.
    await raw_exchange(mqtts, connect(f"x:{uid()}", None, None))
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    await tls_fails(mqtts, old)
    await tls_fails(mqtts, trusting, server_hostname="other.example")
    await asyncio.to_thread(blocking_tls_refuses, mqtts, ssl.create_default_context(cafile=str(pki.other_ca)))
    await tls_fails(mtls, trusting)
    # WebSocket: a refused origin, another path, no subprotocol, not HTTP at all.
    mqtt = [websockets.Subprotocol("mqtt")]
    for uri, subprotocols, from_origin in (
        (f"ws://127.0.0.1:{ws}/mqtt", mqtt, Origin("https://evil.example")),
        (f"ws://127.0.0.1:{ws}/other", mqtt, None),
        (f"ws://127.0.0.1:{ws}/mqtt", None, None),
    ):
        with pytest.raises(InvalidStatus):
            async with ws_connect(uri, subprotocols=subprotocols, origin=from_origin):
                pass
    assert (await raw_exchange(ws, b"\x16\x03\x01 not http\r\n\r\n")).startswith(b"HTTP/1.1 400")
    # PROXY protocol: a bad header, and none at all within handshake_timeout.
    await raw_exchange(lb, b"PROXY GARBAGE\r\n")
    await raw_exchange(lb, b"")  # nothing sent: the 0.5 s timeout closes it

    expected = {
        ("mqtts", "tls_not_tls"): 1,
        ("mqtts", "tls_version"): 1,
        ("mqtts", "tls_server_name"): 1,
        ("mqtts", "tls_certificate_rejected"): 1,
        ("mtls", "tls_client_certificate"): 1,
        ("ws", "ws_origin"): 1,
        ("ws", "ws_path"): 1,
        ("ws", "ws_subprotocol"): 1,
        ("ws", "ws_bad_request"): 1,
        ("lb", "proxy_invalid"): 1,
        ("lb", "proxy_timeout"): 1,
    }
    s = await wait_scrape(front, lambda r: sum(failures(r).values()) >= len(expected))
    await asyncio.sleep(0.2)  # nothing more arrives late
    s = await scrape(front)
    got = {key: n for key, n in failures(s).items() if n}
    assert got == expected


async def test_auth_latency_has_samples_for_the_backend_used(make_front: FrontFactory, users_file: Path) -> None:
    auth = {"users_file": str(users_file), "allow_anonymous": True}
    front = await make_front(metrics={"bind": "127.0.0.1:0"}, auth=auth)
    s = await scrape(front)
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="users_file") == 0
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="anonymous") == 0
    assert not s.series("mqtt_front_auth_duration_seconds_count").keys() - {
        frozenset({("backend", "users_file")}),
        frozenset({("backend", "anonymous")}),
    }, "only the configured backends have series"

    port = front_port(front)
    async with aiomqtt.Client("127.0.0.1", port, username="project:team1:p1", password=PASSWORD, timeout=TIMEOUT):
        pass
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, username="project:team1:p1", password="wrong", timeout=TIMEOUT):
            pass
    async with aiomqtt.Client("127.0.0.1", port, timeout=TIMEOUT):  # anonymous
        pass
    s = await scrape(front)
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="users_file") == 2
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="anonymous") == 1
    assert s.get("mqtt_front_auth_duration_seconds_bucket", backend="users_file", le="+Inf") == 2
    # bcrypt ran (cost 4: about a millisecond): the sum is a real duration, not zero.
    assert 0 < s.get("mqtt_front_auth_duration_seconds_sum", backend="users_file") < 5
    buckets = sorted(
        (float(dict(labels)["le"]), n)
        for labels, n in s.series("mqtt_front_auth_duration_seconds_bucket").items()
        if dict(labels)["backend"] == "users_file"
    )
    assert [n for _, n in buckets] == sorted(n for _, n in buckets), "buckets are cumulative"


async def test_auth_latency_of_the_platform(make_front: FrontFactory, platform: FakePlatform) -> None:
    user = "project:team1:pa"
    password = platform.add(user)
    front = await platform_front(make_front, platform, "emqx")
    async with mqtt_client(front, user, password, True):
        pass
    s = await scrape(front)
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="http") == 1
    assert s.get("mqtt_front_auth_duration_seconds_sum", backend="http") > 0
    assert s.get("mqtt_front_auth_duration_seconds_count", backend="users_file") == 0


def write_front_config(path: Path, mosquitto: Mosquitto, users: Path, cert: Path, key: Path, **extra: Any) -> None:
    data: dict[str, Any] = {
        "listeners": [
            {"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"},
            {"name": "mqtts", "type": "tcp", "bind": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key)}},
        ],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users)},
        "acl": {"preset": "flowfuse"},
        "metrics": {"bind": "127.0.0.1:0"},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))


async def test_reload_status_and_certificate_expiry_follow_reloads(
    tmp_path: Path, pki: Pki, mosquitto: Mosquitto, users_file: Path
) -> None:
    cert, key, not_after = leaf(pki, "reload-listener", 10)
    path = tmp_path / "front.yaml"
    write_front_config(path, mosquitto, users_file, cert, key)
    started = time.time()
    front = FrontBroker(load_config(path), config_path=str(path))
    await front.start()
    try:
        s = await scrape(front)
        assert s.get("mqtt_front_config_reload_success") == 1  # the start counts as a good load
        loaded = s.get("mqtt_front_config_last_reload_timestamp_seconds")
        assert started - 1 <= loaded <= time.time()
        # The certificate in use expires in 10 days: the gauge is notAfter - now, to the second.
        assert abs(expiry(s, listener="mqtts") - (not_after - time.time())) < 5
        assert not any("upstream" in dict(labels) for labels in s.series("mqtt_front_certificate_expiry_seconds"))

        # A good reload with a renewed certificate: success, a later timestamp, the new expiry.
        _, _, renewed = leaf(pki, "reload-listener", 40)
        await asyncio.sleep(0.05)
        assert (await front.control.reload())["ok"] is True
        s = await scrape(front)
        assert s.get("mqtt_front_config_reload_success") == 1
        assert s.get("mqtt_front_config_last_reload_timestamp_seconds") > loaded
        loaded = s.get("mqtt_front_config_last_reload_timestamp_seconds")
        assert abs(expiry(s, listener="mqtts") - (renewed - time.time())) < 5

        # A refused reload (the file no longer validates): 0, a later timestamp, the certificate unchanged.
        path.write_text("listeners: [{name: mqtt, bind: 1883}]\n")
        await asyncio.sleep(0.05)
        assert (await front.control.reload())["ok"] is False
        s = await scrape(front)
        assert s.get("mqtt_front_config_reload_success") == 0
        assert s.get("mqtt_front_config_last_reload_timestamp_seconds") > loaded
        assert abs(expiry(s, listener="mqtts") - (renewed - time.time())) < 5

        # Good again: 1.
        write_front_config(path, mosquitto, users_file, cert, key)
        assert (await front.control.reload())["ok"] is True
        assert (await scrape(front)).get("mqtt_front_config_reload_success") == 1

        # A certificate that cannot be loaded keeps the old one: the reload is not a success.
        cert.write_text("not a certificate\n")
        report = await front.control.reload()
        assert report["warnings"]
        s = await scrape(front)
        assert s.get("mqtt_front_config_reload_success") == 0
        assert abs(expiry(s, listener="mqtts") - (renewed - time.time())) < 5
    finally:
        await front.stop()


async def test_upstream_client_certificate_expiry_is_read_at_start_and_reload(
    tmp_path: Path, pki: Pki, users_file: Path
) -> None:
    cert, key, not_after = leaf(pki, "front-client", 20, "front.internal.example")
    port = free_port()  # no upstream needed: the certificate is read from its file, not from a connection
    path = tmp_path / "front.yaml"
    upstream = {"url": f"mqtts://127.0.0.1:{port}", "tls": {"ca": str(pki.ca), "cert": str(cert), "key": str(key)}}
    path.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}],
                "upstream": upstream,
                "auth": {"users_file": str(users_file)},
                "metrics": {"bind": "127.0.0.1:0"},
            }
        )
    )
    front = FrontBroker(load_config(path), config_path=str(path))
    await front.start()
    try:
        s = await scrape(front)
        assert abs(expiry(s, upstream=f"127.0.0.1:{port}") - (not_after - time.time())) < 5
        assert not any(dict(labels).get("listener") for labels in s.series("mqtt_front_certificate_expiry_seconds"))
        _, _, renewed = leaf(pki, "front-client", 60, "front.internal.example")
        assert (await front.control.reload())["ok"] is True
        s = await scrape(front)
        assert abs(expiry(s, upstream=f"127.0.0.1:{port}") - (renewed - time.time())) < 5
    finally:
        await front.stop()


async def test_an_expired_certificate_is_negative(make_front: FrontFactory, pki: Pki) -> None:
    front = await make_front(
        metrics={"bind": "127.0.0.1:0"},
        listeners=[
            {
                "name": "old",
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "tls": {"cert": str(pki.expired_cert), "key": str(pki.expired_key)},
            }
        ],
    )
    value = expiry(await scrape(front), listener="old")
    assert -2 * DAY < value < -DAY + 60  # expired yesterday (make_pki's expired certificate)
