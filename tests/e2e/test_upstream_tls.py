"""TLS from the front broker to a real Mosquitto: verification, client certificates, refusals with a
clear log line, bytes on the wire, session resumption (`mqtt-front check` on the TLS files:
tests/process/test_cli_tls.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main as cli_main
from broker.config import ConfigError, parse_config
from broker.mqtt.packets import PacketType
from broker.server import FrontBroker
from broker.upstream.connector import UpstreamConnector
from broker.upstream.targets import UpstreamTarget
from tests.support.cli import ROOT
from tests.support.front import VERSIONS, connack_code, front_port, uid, write_config
from tests.support.mosquitto import Mosquitto, mosquitto_binary, mosquitto_log, mqtts, start_tls_mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.net import Relay
from tests.support.pki import FRONT_CN, Pki
from tests.support.ports import free_port, wait_port
from tests.support.raw_client import RawClient, connect_ok


@pytest.fixture(scope="module")
def tls_mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    broker = start_tls_mosquitto(tmp_path_factory.mktemp("mosq-tls"), pki)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mtls_mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    broker = start_tls_mosquitto(tmp_path_factory.mktemp("mosq-mtls"), pki, require_cert=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def expired_mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    broker = start_tls_mosquitto(tmp_path_factory.mktemp("mosq-expired"), pki, expired=True)
    yield broker
    broker.stop()


def tls_upstream(broker: Mosquitto | int, pki: Pki, **tls: Any) -> dict[str, Any]:
    port = broker if isinstance(broker, int) else broker.port
    return {"url": f"mqtts://127.0.0.1:{port}", "connect_timeout": 3, "tls": {"ca": str(pki.ca), **tls}}


def client_cert(pki: Pki) -> dict[str, str]:
    return {"cert": str(pki.front_cert), "key": str(pki.front_key)}


async def round_trip(port: int, v5: bool) -> None:
    """Messages from one project to another through the front broker: a small one, and one larger
    than a TLS record (16 KiB) in both directions."""
    sub = await connect_ok(port, "project:team1:p1", v5)
    pub = await connect_ok(port, "project:team1:p2", v5)
    topic = f"ff/v1/team1/p/p1/in/{uid()}"
    assert await sub.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
    big = bytes(range(256)) * 200
    for payload in (b"over-tls", big):
        assert await pub.publish(topic, payload, qos=1) == 0
        msg = await sub.next_message()
        assert (msg.topic, msg.payload) == (topic, payload)
    await pub.disconnect()
    await sub.disconnect()


def upstream_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mqtt_front.upstream"]


# -- working TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_tls_upstream_forwards(make_front: Any, tls_mosquitto: Mosquitto, pki: Pki, v5: bool) -> None:
    front: FrontBroker = await make_front(upstream=tls_upstream(tls_mosquitto, pki))
    await round_trip(front_port(front), v5)
    target = front.upstream.targets[0]
    assert target.tls and target.handshakes >= 2 and target.failures == 0


async def test_client_certificate_is_the_upstream_identity(
    make_front: Any, mtls_mosquitto: Mosquitto, pki: Pki
) -> None:
    front: FrontBroker = await make_front(upstream=tls_upstream(mtls_mosquitto, pki, **client_cert(pki)))
    await round_trip(front_port(front), True)
    # use_identity_as_username: Mosquitto knows the front broker by its certificate's CN.
    assert f"u'{FRONT_CN}'" in mosquitto_log(mtls_mosquitto)
    # Resumption works with a required client certificate too (the second client resumed).
    assert front.upstream.targets[0].resumed >= 1


# -- refusals: the client gets "server unavailable", the log says which upstream and why ------------


REFUSALS = [
    pytest.param("wrong_ca", "self-signed certificate in certificate chain (not issued by a CA in upstream.tls.ca)",
                 id="wrong-ca"),
    pytest.param("expired", "certificate verify failed: certificate has expired", id="expired"),
    pytest.param("hostname", "certificate verify failed: Hostname mismatch", id="hostname-mismatch"),
    # The alert, or the reset racing it: either way the line names the client certificate.
    pytest.param("no_client_cert", "client certificate", id="client-cert-missing"),
    pytest.param("rogue_client_cert", "client certificate", id="client-cert-untrusted"),
]


async def test_tls_refusals_are_server_unavailable(
    make_front: Any,
    pki: Pki,
    tls_mosquitto: Mosquitto,
    mtls_mosquitto: Mosquitto,
    expired_mosquitto: Mosquitto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cases: dict[str, dict[str, Any]] = {
        "wrong_ca": {**tls_upstream(tls_mosquitto, pki), "tls": {"ca": str(pki.other_ca)}},
        "expired": tls_upstream(expired_mosquitto, pki),
        "hostname": tls_upstream(tls_mosquitto, pki, server_hostname="mqtt.internal.example"),
        "no_client_cert": tls_upstream(mtls_mosquitto, pki),
        "rogue_client_cert": tls_upstream(mtls_mosquitto, pki, cert=str(pki.rogue_cert), key=str(pki.rogue_key)),
    }
    for param in REFUSALS:
        case, reason = param.values
        assert isinstance(case, str) and isinstance(reason, str)
        caplog.clear()
        upstream = cases[case]
        front: FrontBroker = await make_front(upstream=upstream)
        port = front_port(front)
        with caplog.at_level(logging.INFO):
            for v5 in (True, False):
                client, code, _ = await RawClient.open(port, "project:team1:p1", v5=v5)
                assert code == connack_code(v5, v5_code=0x88, v3_code=0x03), case
                await client.wait_closed()
        lines = [m for m in upstream_errors(caplog) if m.startswith(f"upstream_error upstream={upstream['url']} ")]
        assert lines and reason in lines[0], (case, upstream_errors(caplog))
        assert front.upstream.targets[0].session is None, case  # nothing to resume from a failed upstream
        await front.stop()


# -- what is on the wire ------------------------------------------------------------------------------


async def test_upstream_bytes_are_tls(make_front: Any, tls_mosquitto: Mosquitto, pki: Pki) -> None:
    relay = await Relay(tls_mosquitto.port).start()
    try:
        front: FrontBroker = await make_front(upstream=tls_upstream(relay.port, pki))
        port = front_port(front)
        marker = f"SeCrEt-{uid()}"
        sub = await connect_ok(port, "project:team1:p1", True)
        pub = await connect_ok(port, "project:team1:p2", True)
        topic = f"ff/v1/team1/p/p1/in/{marker}"
        assert await sub.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
        assert await pub.publish(topic, f"payload-{marker}".encode(), qos=1) == 0
        msg = await sub.next_message()
        assert msg.topic == topic and msg.payload == f"payload-{marker}".encode()
        await pub.disconnect()
        await sub.disconnect()
        sent, received = bytes(relay.upstream_bytes), bytes(relay.downstream_bytes)
        assert len(sent) > 500 and len(received) > 500
        for data in (sent, received):
            assert marker.encode() not in data
            assert b"MQTT" not in data and b"project:team1" not in data
            assert data[0] == 0x16  # a TLS handshake record, not an MQTT CONNECT (0x10)
    finally:
        await relay.stop()


async def test_tls_listener_refuses_plain_mqtt(make_front: Any, tls_mosquitto: Mosquitto) -> None:
    # A plain MQTT CONNECT straight to Mosquitto's TLS port: no CONNACK, the connection is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_mosquitto.port)
    writer.write(connect(f"plain-{uid()}"))
    try:
        async with asyncio.timeout(5):
            data = await reader.read(1024)
    except ConnectionResetError:
        data = b""
    assert not data.startswith(bytes((PacketType.CONNACK << 4,)))
    writer.close()
    # Through the front broker with mqtt:// to that port: server unavailable, not a hang.
    front: FrontBroker = await make_front(upstream={"url": tls_mosquitto.url, "connect_timeout": 2})
    async with asyncio.timeout(10):
        client, code, _ = await RawClient.open(front_port(front), "project:team1:p1", v5=True)
    assert code == 0x88
    await client.close()


# -- session resumption (white box, against Mosquitto) -------------------------------------------------


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _connect_twice(connector: UpstreamConnector) -> list[bool]:
    reused = []
    target: UpstreamTarget = connector.targets[0]
    for _ in range(2):
        sink = _Sink()
        transport, got = await connector.open_connection(lambda _t, sink=sink: sink)  # type: ignore[misc]
        assert got is target
        ssl_object = transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject) and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        reused.append(bool(transport.get_extra_info("session_reused")))
        if connector.session_resumption:
            async with asyncio.timeout(5):  # TLS 1.3: the ticket comes after the handshake
                while target.session is None or not target.session.has_ticket:
                    await asyncio.sleep(0.01)
        transport.close()
        async with asyncio.timeout(5):
            await sink.lost
    return reused


@pytest.mark.parametrize("min_version", ["TLSv1.2", "TLSv1.3"])
async def test_second_connection_resumes_the_session(
    mtls_mosquitto: Mosquitto, pki: Pki, min_version: str
) -> None:
    upstream = tls_upstream(mtls_mosquitto, pki, **client_cert(pki), min_version=min_version)
    config = parse_config({"listeners": [{"name": "x", "bind": "127.0.0.1:0"}], "upstream": upstream})
    assert config.upstream is not None
    connector = UpstreamConnector.from_config(config.upstream)
    assert await _connect_twice(connector) == [False, True]
    target = connector.targets[0]
    assert (target.handshakes, target.resumed, target.open) == (2, 1, 0)


async def test_resumption_can_be_turned_off(tls_mosquitto: Mosquitto, pki: Pki) -> None:
    upstream = tls_upstream(tls_mosquitto, pki, session_resumption=False)
    config = parse_config({"listeners": [{"name": "x", "bind": "127.0.0.1:0"}], "upstream": upstream})
    assert config.upstream is not None
    connector = UpstreamConnector.from_config(config.upstream)
    assert await _connect_twice(connector) == [False, False]
    assert connector.targets[0].session is None


async def test_latency_and_failure_hooks(tls_mosquitto: Mosquitto, pki: Pki) -> None:
    config = parse_config({"listeners": [{"name": "x", "bind": "127.0.0.1:0"}],
                           "upstream": tls_upstream(tls_mosquitto, pki)})
    assert config.upstream is not None
    connector = UpstreamConnector.from_config(config.upstream)
    seen: list[tuple[str, float]] = []
    failures: list[tuple[str, str]] = []
    connector.on_connect = lambda target, seconds: seen.append((target.url, seconds))
    connector.on_failure = lambda target, reason: failures.append((target.url, reason))
    sink = _Sink()
    transport, _ = await connector.open_connection(lambda _t: sink)
    transport.close()
    assert len(seen) == 1 and seen[0][0] == mqtts(tls_mosquitto) and 0 < seen[0][1] < 3
    assert connector.last_ok is not None and connector.targets[0].last_latency == seen[0][1]
    assert failures == []


# -- configuration --------------------------------------------------------------------------------------


async def test_bad_tls_files_stop_the_start_before_listening(pki: Pki, users_file: Path) -> None:
    config = parse_config({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "upstream": {"url": "mqtts://127.0.0.1:8883",
                     "tls": {"ca": str(pki.ca), "cert": str(pki.front_cert), "key": str(pki.server_key)}},
        "auth": {"users_file": str(users_file)},
    })
    front = FrontBroker(config)
    with pytest.raises(ConfigError, match=r"upstream\.tls\.key"):
        await front.start()
    assert front.bound == {}


async def test_verify_false_warns_loudly(
    make_front: Any, tls_mosquitto: Mosquitto, pki: Pki, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    upstream = {**tls_upstream(tls_mosquitto, pki), "tls": {"ca": str(pki.other_ca), "verify": False}}
    with caplog.at_level(logging.WARNING):
        front: FrontBroker = await make_front(upstream=upstream)
    assert any("upstream.tls.verify is false" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    await round_trip(front_port(front), True)  # works, unverified
    assert cli_main(["check", "-c", str(write_config(tmp_path, upstream=upstream))]) == 0
    assert "WARNING: upstream.tls.verify is false" in capsys.readouterr().out


# -- the documented internal broker ------------------------------------------------------------------


def _internal_conf(pki: Pki, port: int, acl: Path) -> str:
    """config/mosquitto-internal.conf with this test's address, certificates and no persistence."""
    text = (ROOT / "config" / "mosquitto-internal.conf").read_text()
    replacements = {
        "listener 8883 10.0.0.5": f"listener {port} 127.0.0.1",
        "/etc/mosquitto/certs/internal-ca.pem": str(pki.ca),
        "/etc/mosquitto/certs/broker.pem": str(pki.server_cert),
        "/etc/mosquitto/certs/broker.key": str(pki.server_key),
        "/etc/mosquitto/front.acl": str(acl),
        "persistence true": "persistence false",
        "log_dest syslog": "log_dest stderr",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


async def test_documented_internal_broker_config(make_front: Any, pki: Pki) -> None:
    acl = pki.folder / "front.acl"
    acl.write_text(f"user {FRONT_CN}\ntopic readwrite #\n")
    os.chmod(acl, 0o644)
    port = free_port()
    conf = pki.folder / "internal.conf"
    conf.write_text(_internal_conf(pki, port, acl))
    os.chmod(conf, 0o644)
    log_path = pki.folder / "internal.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        broker = Mosquitto(port, proc, conf)
        front: FrontBroker = await make_front(upstream=tls_upstream(broker, pki, **client_cert(pki)))
        await round_trip(front_port(front), True)
        assert f"u'{FRONT_CN}'" in log_path.read_text()
        # Without the client certificate, or over plain MQTT: refused.
        for upstream in (tls_upstream(broker, pki), {"url": broker.url, "connect_timeout": 2}):
            other: FrontBroker = await make_front(upstream=upstream)
            client, code, _ = await RawClient.open(front_port(other), "project:team1:p1", v5=True)
            assert code == 0x88, upstream
            await client.close()
    finally:
        proc.terminate()
        proc.wait(5)
