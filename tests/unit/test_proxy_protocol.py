"""PROXY protocol v1/v2: the Sans-I/O parser and the encoders.

Listeners behind a (fake) load balancer: tests/e2e/test_proxy_listeners.py."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.edge.proxy_protocol import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_header,
)

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


def test_encoders_shape() -> None:
    v2 = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2))
    assert v2[:12] == V2_SIGNATURE and v2[12] == 0x21 and v2[13] == 0x11
    assert struct.unpack("!H", v2[14:16]) == (12,)
    assert encode_v1(("10.0.0.1", 1), ("10.0.0.2", 2)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
