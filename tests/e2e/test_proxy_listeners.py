"""PROXY protocol v1/v2 listeners behind a (fake) load balancer, plain and with TLS.

The parser and the encoders alone: tests/unit/test_proxy_protocol.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiomqtt
import pytest

from broker.edge.proxy_protocol import V2_SIGNATURE, encode_v1, encode_v2
from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port
from tests.support.mqtt_bytes import connect
from tests.support.net import balancer, tls_peer_cert
from tests.support.pki import Pki
from tests.support.raw_client import read_packet

CONNACK_OK = b"\x20\x02\x00\x00"
CONNECT_P1 = connect("project:team1:p1:n", "project:team1:p1", PASSWORD, keepalive=30)  # MQTT 3.1.1


# ------------------------------------------------------------------ listeners behind a balancer


def proxy_listener(name: str = "lb", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "tcp", "bind": "127.0.0.1:0", "proxy_protocol": True, "handshake_timeout": 0.5,
            **extra}


async def proxied_front(make_front: FrontFactory, **extra: Any) -> FrontBroker:
    front: FrontBroker = await make_front(listeners=[proxy_listener(**extra)])
    return front


def peers(front: FrontBroker) -> list[str]:
    return [conn.peer for conn in front.connections]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (encode_v1(("203.0.113.7", 4242), ("198.51.100.1", 1883)), "203.0.113.7:4242"),
        (encode_v1(("2001:db8::7", 4343), ("2001:db8::1", 1883)), "2001:db8::7:4343"),
        (encode_v2(("203.0.113.8", 4444), ("198.51.100.1", 1883), tlvs=b"\x05\x00\x02id"), "203.0.113.8:4444"),
        (encode_v2(("2001:db8::9", 4545)), "2001:db8::9:4545"),
    ],
)
async def test_valid_headers_set_the_peer(
    make_front: FrontFactory, caplog: pytest.LogCaptureFixture, header: bytes, expected: str
) -> None:
    caplog.set_level(logging.INFO)
    front = await proxied_front(make_front)
    reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front, "lb"))
    writer.write(header + CONNECT_P1)
    assert await read_packet(reader) == CONNACK_OK
    assert peers(front) == [expected]
    writer.close()
    async with asyncio.timeout(5):
        while front.connections:
            await asyncio.sleep(0.02)
    assert f"peer={expected}" in caplog.text


async def test_v2_local_and_v1_unknown_use_the_real_peer(make_front: FrontFactory) -> None:
    front = await proxied_front(make_front)
    for header in (encode_v2(None), encode_v1(None)):
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front, "lb"))
        writer.write(header + CONNECT_P1)
        assert await read_packet(reader) == CONNACK_OK
        local = writer.get_extra_info("sockname")
        assert peers(front) == [f"{local[0]}:{local[1]}"]
        writer.close()
        async with asyncio.timeout(5):
            while front.connections:
                await asyncio.sleep(0.02)


async def test_header_split_byte_by_byte(make_front: FrontFactory) -> None:
    front = await proxied_front(make_front)
    reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front, "lb"))
    for byte in encode_v1(("192.0.2.55", 5555), ("192.0.2.1", 1883)):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.002)
    writer.write(CONNECT_P1)
    assert await read_packet(reader) == CONNACK_OK
    assert peers(front) == ["192.0.2.55:5555"]
    writer.close()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (CONNECT_P1, "no PROXY protocol header"),  # header missing
        (b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n", "invalid address"),  # garbage
        (V2_SIGNATURE + b"\x21\x11\x00\x0c" + b"\x00" * 5, "within 0.5s"),  # truncated: waits, then timeout
        (b"PROXY TCP4 1.2.3", "within 0.5s"),
        (b"", "within 0.5s"),  # nothing at all
    ],
)
async def test_bad_or_missing_header_closes(
    make_front: FrontFactory, caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    caplog.set_level(logging.INFO)
    front = await proxied_front(make_front)
    reader, writer = await asyncio.open_connection("127.0.0.1", front_port(front, "lb"))
    writer.write(data)
    async with asyncio.timeout(4):
        try:
            rest = await reader.read()
        except ConnectionError:
            rest = b""
    assert rest == b""
    assert not front.connections
    assert "proxy_header_refused" in caplog.text and reason in caplog.text
    writer.close()


async def test_real_clients_through_a_balancer(make_front: FrontFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    front = await proxied_front(make_front)

    def header(client: tuple[str, int]) -> bytes:
        return encode_v2(("198.18.0.1", client[1]), ("198.51.100.1", 1883))

    async with balancer(front_port(front, "lb"), header) as port:
        user = "project:team1:p1"
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"{user}:n", username=user, password=PASSWORD,
                                  protocol=aiomqtt.ProtocolVersion.V5, timeout=5) as c:
            assert all(peer.startswith("198.18.0.1:") for peer in peers(front))
            await c.subscribe("ff/v1/team1/p/p1/out/#", qos=1)
            await c.publish("ff/v1/team1/p/p1/out/lb", b"via lb", qos=1)
            async with asyncio.timeout(5):
                async for message in c.messages:
                    assert message.payload == b"via lb"
                    break
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", PASSWORD, "-i", f"{user}:m",
            "-t", "ff/v1/team1/p/p1/out/x", "-m", "x", "-q", "1", stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err


# ------------------------------------------------------------------ PROXY + TLS


async def test_proxy_then_tls(make_front: FrontFactory, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cert, key, der = pki.server_files("lb-tls")
    front = await proxied_front(make_front, tls={"cert": str(cert), "key": str(key)})
    port = front_port(front, "lb")
    # the header first, then the TLS handshake on the same connection
    assert await tls_peer_cert(port, pki.client_context(), prefix=encode_v1(("192.0.2.77", 7777))) == der

    def header(client: tuple[str, int]) -> bytes:
        return encode_v1(("192.0.2.78", client[1]), ("192.0.2.1", 8883))

    user = "project:team1:p2"
    async with balancer(port, header) as lb_port:
        for protocol in (aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5):
            async with aiomqtt.Client("127.0.0.1", lb_port, identifier=f"{user}:t", username=user,
                                      password=PASSWORD, protocol=protocol, tls_context=pki.client_context(),
                                      timeout=5) as c:
                assert [p.split(":")[0] for p in peers(front)] == ["192.0.2.78"]
                await c.subscribe("ff/v1/team1/p/p2/out/#", qos=1)
                await c.publish("ff/v1/team1/p/p2/out/tls", b"proxy+tls", qos=1)
                async with asyncio.timeout(5):
                    async for message in c.messages:
                        assert message.payload == b"proxy+tls"
                        break
            async with asyncio.timeout(5):
                while front.connections:
                    await asyncio.sleep(0.02)
    # a plain-text CONNECT after a valid header on a TLS listener: the handshake fails, logged
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_v1(("192.0.2.79", 1)) + CONNECT_P1)
    async with asyncio.timeout(4):
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""
    writer.close()
    async with asyncio.timeout(4):
        while "tls_handshake_failed" not in caplog.text:
            await asyncio.sleep(0.02)
    assert "peer=192.0.2.79:1" in caplog.text


