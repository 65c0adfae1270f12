"""The data types of the MQTT wire format: integers, variable byte integers, strings, binary data.

One place for each: the packet sections and the property codec both build on these. No I/O.
"""

from __future__ import annotations

from broker.mqtt.errors import MalformedPacket


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Variable Byte Integer at ``pos``; returns (value, new position)."""
    value = 0
    shift = 0
    for i in range(4):
        if pos >= end:
            raise MalformedPacket("variable byte integer runs past the packet")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if i and b == 0:
                raise MalformedPacket("variable byte integer not minimally encoded")
            return value, pos
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_u16(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("two-byte integer runs past the packet")
    return (buf[pos] << 8) | buf[pos + 1], pos + 2


def read_u32(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise MalformedPacket("four-byte integer runs past the packet")
    return int.from_bytes(buf[pos : pos + 4], "big"), pos + 4


def read_binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    n, pos = read_u16(buf, pos, end)
    if pos + n > end:
        raise MalformedPacket("length-prefixed field runs past the packet")
    return bytes(buf[pos : pos + n]), pos + n


def read_str(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """UTF-8 string; invalid UTF-8 (surrogates included) or U+0000 is malformed."""
    raw, pos = read_binary(buf, pos, end)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("invalid UTF-8 in string") from None
    if "\x00" in text:
        raise MalformedPacket("U+0000 in string")
    return text, pos



def encode_str(text: str) -> bytes:
    """A UTF-8 string with its two-byte length prefix."""
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_binary(data: bytes) -> bytes:
    """Binary data with its two-byte length prefix."""
    return len(data).to_bytes(2, "big") + data
