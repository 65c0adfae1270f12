"""PROXY protocol v1/v2: the Sans-I/O parser, and listeners behind a (fake) load balancer."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.proxy_protocol import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_header,
)
from broker.server import FrontBroker
from tests.conftest import PASSWORD, FrontFactory, front_port
from tests.edge_helpers import Pki, balancer, connect_v311, make_pki, read_connack, tls_peer_cert

CONNACK_OK = b"\x20\x02\x00\x00"

# ------------------------------------------------------------------ parser


def test_v1_examples() -> None:
    header = parse_header(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 1883\r\n\x10")
    assert header == ProxyHeader(1, "PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 1883), 46)
    header = parse_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
    assert isinstance(header, ProxyHeader) and header.source == ("2001:db8::1", 1)
    header = parse_header(b"PROXY UNKNOWN ffff::1 whatever\r\n")
    assert isinstance(header, ProxyHeader) and header.command == "LOCAL" and header.source is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\x1a\x00\x04MQTT",  # a plain CONNECT: no header
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
        b"PROXY TCP4 1.2.3.4\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n",
        b"PROXY " + b"A" * (V1_MAX + 10),
        V2_SIGNATURE + b"\x11",  # version 1 in a v2 header
        V2_SIGNATURE + b"\x23",  # unknown command
        V2_SIGNATURE + b"\x21\x12",  # PROXY over UDP
        V2_SIGNATURE + b"\x21\x11\x00\x04",  # AF_INET with a 4-byte address block
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than the bound
        b"\r\n\r\n\x00\r\nQUITX",
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_header(data)


def test_v2_examples() -> None:
    tlv = b"\x04\x00\x03abc"  # a NOOP TLV, skipped
    header = parse_header(encode_v2(("192.0.2.1", 40000), ("10.0.0.1", 8883), tlvs=tlv) + b"\x16\x03")
    assert header == ProxyHeader(2, "PROXY", ("192.0.2.1", 40000), ("10.0.0.1", 8883), 16 + 12 + len(tlv))
    local = parse_header(encode_v2(None))
    assert local == ProxyHeader(2, "LOCAL", None, None, 16)
    unspec = parse_header(V2_SIGNATURE + b"\x21\x00\x00\x00")
    assert isinstance(unspec, ProxyHeader) and unspec.source is None
    assert parse_header(encode_v2(("::1", 1))[:20]) == 52 - 20  # needs the rest of the block


ports = st.integers(0, 65535)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
addresses = st.one_of(
    st.tuples(ipv4, ports, ipv4, ports),
    st.tuples(ipv6, ports, ipv6, ports),
)


def _encode(version: int, addr: tuple[str, int, str, int], tlvs: bytes) -> bytes:
    src, sport, dst, dport = addr
    return encode_v1((src, sport), (dst, dport)) if version == 1 else encode_v2((src, sport), (dst, dport), tlvs=tlvs)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), addresses, st.binary(max_size=40), st.binary(max_size=64))
def test_roundtrip_and_exact_reads(version: int, addr: tuple[str, int, str, int], tlvs: bytes, tail: bytes) -> None:
    encoded = _encode(version, addr, tlvs)
    header = parse_header(encoded + tail)
    assert isinstance(header, ProxyHeader)
    assert header.source == (addr[0], addr[1]) and header.destination == (addr[2], addr[3])
    assert header.length == len(encoded)
    # fed exactly what it asks for, the parser never takes a byte after the header
    parser, data, pos = ProxyHeaderParser(), encoded + tail, 0
    while True:
        wanted = parser.wanted()
        assert wanted >= 1
        result = parser.feed(data[pos : pos + wanted])
        pos += wanted
        if result is not None:
            break
    assert pos == len(encoded) and parser.remainder == b""


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2]), addresses, st.data())
def test_split_anywhere(version: int, addr: tuple[str, int, str, int], data: st.DataObject) -> None:
    encoded = _encode(version, addr, b"")
    cut = data.draw(st.integers(0, len(encoded)))
    parser = ProxyHeaderParser()
    assert parser.feed(encoded[:cut]) is None or cut == len(encoded)
    if parser.header is None:
        assert parser.feed(encoded[cut:]) is not None


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=80).map(lambda b: V2_SIGNATURE + b)), st.lists(st.integers(1, 30), max_size=20))
def test_random_bytes_only_raise_the_parser_error(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(ProxyProtocolError):
        parse_header(data)
    parser, pos = ProxyHeaderParser(), 0
    try:
        for size in [*cuts, len(data)]:
            if parser.feed(data[pos : pos + size]) is not None:
                break
            parser.wanted()
            pos += size
    except ProxyProtocolError:
        pass


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
    writer.write(header + connect_v311("project:team1:p1:n", "project:team1:p1"))
    assert await read_connack(reader) == CONNACK_OK
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
        writer.write(header + connect_v311("project:team1:p1:n", "project:team1:p1"))
        assert await read_connack(reader) == CONNACK_OK
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
    writer.write(connect_v311("project:team1:p1:n", "project:team1:p1"))
    assert await read_connack(reader) == CONNACK_OK
    assert peers(front) == ["192.0.2.55:5555"]
    writer.close()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (connect_v311("project:team1:p1:n", "project:team1:p1"), "no PROXY protocol header"),  # header missing
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-proxy"))


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
    writer.write(encode_v1(("192.0.2.79", 1)) + connect_v311("project:team1:p1:n", "project:team1:p1"))
    async with asyncio.timeout(4):
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""
    writer.close()
    async with asyncio.timeout(4):
        while "tls_handshake_failed" not in caplog.text:
            await asyncio.sleep(0.02)
    assert "peer=192.0.2.79:1" in caplog.text


def test_encoders_shape() -> None:
    v2 = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2))
    assert v2[:12] == V2_SIGNATURE and v2[12] == 0x21 and v2[13] == 0x11
    assert struct.unpack("!H", v2[14:16]) == (12,)
    assert encode_v1(("10.0.0.1", 1), ("10.0.0.2", 2)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
