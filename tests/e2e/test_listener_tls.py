"""TLS termination on listeners: mqtts, client certificates, SNI, certificate reload (the pure parts and the
configuration: tests/unit/test_tls_config.py; `check` and SIGHUP in a process: tests/process/test_cli_tls.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import warnings
from typing import Any

import aiomqtt
import pytest

from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port
from tests.support.mqtt_bytes import connect
from tests.support.net import tls_peer_cert
from tests.support.pki import Pki
from tests.support.raw_client import read_packet

V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311


def tls_listener(pki: Pki, name: str = "mqtts", **tls: Any) -> dict[str, Any]:
    cert, key, _ = pki.server_files(name) if "cert" not in tls else (tls.pop("cert"), tls.pop("key"), b"")
    return {"name": name, "type": "tcp", "bind": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key), **tls}}


async def tls_front(make_front: FrontFactory, *listeners: dict[str, Any]) -> FrontBroker:
    front: FrontBroker = await make_front(listeners=list(listeners))
    return front


def client(port: int, context: ssl.SSLContext, cid: str, protocol: aiomqtt.ProtocolVersion = V5, **kw: Any) -> Any:
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=cid, protocol=protocol, tls_context=context, timeout=5, **kw
    )


async def roundtrip(c: aiomqtt.Client, topic: str, payload: bytes) -> None:
    await c.subscribe(topic, qos=1)
    await c.publish(topic, payload, qos=1)
    async with asyncio.timeout(5):
        async for message in c.messages:
            assert message.payload == payload
            return


async def assert_refused(port: int, context: ssl.SSLContext) -> None:
    """The TLS connection fails (TLS 1.3 clients learn it on their first read): never a CONNACK."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        writer.write(connect("project:team1:p1:n", "project:team1:p1", PASSWORD, keepalive=30))
        async with asyncio.timeout(5):
            data = await reader.read(4)
        writer.close()
    except (ssl.SSLError, ConnectionError):
        return
    assert data == b"", data


# ------------------------------------------------------------------ mqtts with real clients


@pytest.mark.parametrize("protocol", [V311, V5])
async def test_mqtts_aiomqtt_roundtrip(make_front: FrontFactory, pki: Pki, protocol: aiomqtt.ProtocolVersion) -> None:
    front = await tls_front(make_front, tls_listener(pki))
    port = front_port(front, "mqtts")
    user = "project:team1:p1"
    async with client(port, pki.client_context(), f"{user}:n", protocol, username=user, password=PASSWORD) as c:
        await roundtrip(c, "ff/v1/team1/p/p1/out/tls", b"over tls")
    # wrong password over TLS is still refused by the users file
    with pytest.raises(aiomqtt.MqttError):
        async with client(port, pki.client_context(), f"{user}:n", protocol, username=user, password="nope"):
            pass


async def test_mqtts_mosquitto_clients(make_front: FrontFactory, pki: Pki) -> None:
    front = await tls_front(make_front, tls_listener(pki))
    port = str(front_port(front, "mqtts"))
    common = ["-h", "127.0.0.1", "-p", port, "--cafile", str(pki.ca), "-u", "project:team1:p1", "-P", PASSWORD]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", *common, "-V", "5", "-i", "project:team1:p1:s", "-t", "ff/v1/team1/p/+/out/#",
        "-C", "1", "-W", "10", "-v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        while not [c for c in front.connections if c.session and c.session.client_id == "project:team1:p1:s"]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # let the SUBSCRIBE reach the upstream
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", *common, "-V", "311", "-i", "project:team1:p1:p", "-t", "ff/v1/team1/p/p1/out/m",
        "-m", "hello mqtts", "-q", "1", stderr=asyncio.subprocess.PIPE,
    )
    _, pub_err = await pub.communicate()
    assert pub.returncode == 0, pub_err
    out, err = await sub.communicate()
    assert sub.returncode == 0, err
    assert out.decode().strip() == "ff/v1/team1/p/p1/out/m hello mqtts"


async def test_min_version_refuses_old_clients(make_front: FrontFactory, pki: Pki) -> None:
    front = await tls_front(
        make_front, tls_listener(pki, "v12"), tls_listener(pki, "v13", min_version="TLSv1.3")
    )
    old = pki.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated: that is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_peer_cert(front_port(front, "v12"), old)
    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await tls_peer_cert(front_port(front, "v12"), tls12)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_peer_cert(front_port(front, "v13"), tls12)


# ------------------------------------------------------------------ client certificates


async def test_required_client_cert(make_front: FrontFactory, pki: Pki) -> None:
    front = await tls_front(make_front, tls_listener(pki, client_ca=str(pki.client_ca), require_client_cert=True))
    port = front_port(front, "mqtts")
    # no certificate: refused in the handshake
    await assert_refused(port, pki.client_context())
    # a certificate from another CA: refused too
    cert, key = pki.client_files("project:team1:p1", authority=pki.other_authority, name="foreign")
    await assert_refused(port, pki.client_context(cert, key))
    # a good certificate + the password (use_identity_as_username is off): accepted
    cert, key = pki.client_files("whoever")
    async with client(port, pki.client_context(cert, key), "project:team1:p1:n", username="project:team1:p1",
                      password=PASSWORD) as c:
        await roundtrip(c, "ff/v1/team1/p/p1/out/cc", b"x")
    assert not front.connections or all(conn.session for conn in front.connections)


async def test_identity_as_username(make_front: FrontFactory, pki: Pki) -> None:
    front = await tls_front(
        make_front,
        tls_listener(pki, client_ca=str(pki.client_ca), require_client_cert=True, use_identity_as_username=True),
    )
    port = front_port(front, "mqtts")
    cert, key = pki.client_files("project:team1:p1")
    # no password, and a username in CONNECT is ignored: the certificate decides
    async with client(port, pki.client_context(cert, key), "project:team1:p1:n", username="forge_platform",
                      password="wrong") as c:
        conn = next(iter(front.connections))
        assert conn.session is not None and conn.session.username == "project:team1:p1"
        assert conn.session.team == "team1"
        await roundtrip(c, "ff/v1/team1/p/p1/out/id", b"by certificate")
        result = await c.subscribe("ff/v1/team2/p/+/out/#")  # another team's topics: refused
        codes: list[int] = [int(getattr(code, "value", code)) for code in (result or ())]
        assert codes and all(code >= 0x80 for code in codes)
    # the client id must belong to the certificate identity
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client(port, pki.client_context(cert, key), "project:team2:p3:n"):
            pass


async def test_identity_mosquitto_pub_cert(make_front: FrontFactory, pki: Pki) -> None:
    front = await tls_front(
        make_front,
        tls_listener(pki, client_ca=str(pki.client_ca), require_client_cert=True, use_identity_as_username=True),
    )
    cert, key = pki.client_files("project:team1:p2", name="mosq")
    base = ["-h", "127.0.0.1", "-p", str(front_port(front, "mqtts")), "--cafile", str(pki.ca)]
    ok = await asyncio.create_subprocess_exec(
        "mosquitto_pub", *base, "--cert", str(cert), "--key", str(key), "-i", "project:team1:p2:m",
        "-t", "ff/v1/team1/p/p2/out/m", "-m", "x", "-q", "1", "-V", "5", stderr=asyncio.subprocess.PIPE,
    )
    _, err = await ok.communicate()
    assert ok.returncode == 0, err


async def test_identity_optional_cert_missing_is_not_authorized(
    make_front: FrontFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    front = await tls_front(
        make_front, tls_listener(pki, client_ca=str(pki.client_ca), use_identity_as_username=True)
    )
    port = front_port(front, "mqtts")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost"
    )
    writer.write(connect("project:team1:p1:n", "project:team1:p1", PASSWORD, keepalive=30))
    assert await read_packet(reader) == b"\x20\x02\x00\x05"  # v3.1.1 not authorized
    writer.close()
    # v5 gets 0x87
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with client(port, pki.client_context(), "project:team1:p1:n", username="project:team1:p1",
                          password=PASSWORD):
            pass
    assert info.value.rc == 0x87
    assert "no client certificate" in caplog.text


# ------------------------------------------------------------------ SNI


async def test_sni(make_front: FrontFactory, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cert, key, _ = pki.server_files("sni", "mqtt.example.com", "other.example.com")
    front = await tls_front(
        make_front, tls_listener(pki, "sni", cert=cert, key=key, server_names=["mqtt.example.com"])
    )
    port = front_port(front, "sni")
    assert await tls_peer_cert(port, pki.client_context(), "mqtt.example.com")
    # asyncio's server side aborts a failed handshake without flushing OpenSSL's alert, so the
    # client sees a reset rather than unrecognized_name; either way there is no session
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_peer_cert(port, pki.client_context(), "other.example.com")
    assert "unrecognized_server_name" in caplog.text and "other.example.com" in caplog.text
    caplog.clear()
    # no SNI at all: refused too (FlowFuse clients always send it)
    no_sni = pki.client_context()
    no_sni.check_hostname = False
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with asyncio.timeout(5):
            await writer.start_tls(no_sni, server_hostname=None)
    writer.close()
    assert "unrecognized_server_name sni=None" in caplog.text


# ------------------------------------------------------------------ certificate reload


async def _eventually_serves(port: int, pki: Pki, expected: bytes, timeout: float = 8.0) -> None:
    async with asyncio.timeout(timeout):
        while await tls_peer_cert(port, pki.client_context()) != expected:
            await asyncio.sleep(0.1)


async def test_reload_keeps_connections(make_front: FrontFactory, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cert, key, der1 = pki.server_files("reload")
    front = await tls_front(make_front, tls_listener(pki, "reload", cert=cert, key=key))
    port = front_port(front, "reload")
    assert await tls_peer_cert(port, pki.client_context()) == der1
    user = "project:team1:p1"
    async with client(port, pki.client_context(), f"{user}:old", username=user, password=PASSWORD) as old:
        await roundtrip(old, "ff/v1/team1/p/p1/out/before", b"1")
        _, _, der2 = pki.server_files("reload")  # a new certificate (new serial, new key) at the same paths
        assert der2 != der1
        assert front.reload() is True
        assert "config_reloaded" in caplog.text
        assert await tls_peer_cert(port, pki.client_context()) == der2
        # the established client never noticed
        await old.publish("ff/v1/team1/p/p1/out/before", b"2", qos=1)
        async with asyncio.timeout(5):
            async for message in old.messages:
                assert message.payload in (b"1", b"2")
                if message.payload == b"2":
                    break
        # a broken replacement: garbage certificate -> rejected, logged with the file, old one stays
        cert.write_bytes(b"this is not a certificate\n")
        assert front.reload() is False
        assert "config_reload_failed" in caplog.text and str(cert) in caplog.text
        assert await tls_peer_cert(port, pki.client_context()) == der2
        # a certificate with someone else's key: rejected too
        other_cert, _, der3 = pki.server_files("unrelated")
        cert.write_bytes(other_cert.read_bytes())
        caplog.clear()
        assert front.reload() is False
        assert "does not match" in caplog.text
        assert await tls_peer_cert(port, pki.client_context()) == der2
        await roundtrip(old, "ff/v1/team1/p/p1/out/after", b"3")
        assert der3 != der2


async def test_reload_on_file_change(
    make_front: FrontFactory, pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("broker.edge.tls.POLL_INTERVAL", 0.2)
    cert, key, der1 = pki.server_files("watched")
    front = await tls_front(make_front, tls_listener(pki, "watched", cert=cert, key=key))
    port = front_port(front, "watched")
    user = "project:team1:p2"
    async with client(port, pki.client_context(), f"{user}:old", username=user, password=PASSWORD) as old:
        _, _, der2 = pki.server_files("watched")
        await _eventually_serves(port, pki, der2)
        assert "config_reloaded" in caplog.text
        # garbage on disk: logged once, the certificate in use stays
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        async with asyncio.timeout(5):
            while "config_reload_failed" not in caplog.text:
                await asyncio.sleep(0.05)
        assert await tls_peer_cert(port, pki.client_context()) == der2
        # a good pair again: picked up
        _, _, der3 = pki.server_files("watched")
        await _eventually_serves(port, pki, der3)
        await roundtrip(old, "ff/v1/team1/p/p2/out/x", b"still here")
    assert der1 != der2
