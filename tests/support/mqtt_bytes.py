"""The one set of MQTT byte builders of the tests.

Two kinds: ``*_raw`` builders put every byte where the caller says, to make packets that are
wrong on purpose (reserved flags, invalid UTF-8, lengths that lie); the others go through
``broker.mqtt.packets`` and make valid packets with the fields a test cares about. Plus the
framing of a byte stream into packets, and a masked client-to-server WebSocket frame.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Any

from broker.mqtt.framer import Framer
from broker.mqtt.packets import (
    Connect,
    Subscribe,
    Will,
    encode_connect,
    encode_disconnect,
    encode_publish,
    encode_subscribe,
)
from broker.mqtt.primitives import encode_varint

# ---------------------------------------------------------------- fields and framing


def pkt(first: int, body: bytes) -> bytes:
    """A packet: the first byte, the remaining length, the body."""
    return bytes((first,)) + encode_varint(len(body)) + body


def mstr(text: str | bytes) -> bytes:
    """A length-prefixed field; ``bytes`` may be invalid UTF-8 on purpose."""
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def no_props(v5: bool) -> bytes:
    """An empty property block for MQTT 5, nothing for 3.1.1."""
    return b"\x00" if v5 else b""


def split_packets(data: bytes | Iterable[bytes], framer: Framer | None = None) -> list[bytes]:
    """The whole packets in ``data`` (or in the chunks joined); fails if it ends in a partial packet."""
    if not isinstance(data, bytes | bytearray):
        data = b"".join(data)
    chunk, ends = (framer or Framer()).feed(bytes(data))
    out, prev = [], 0
    for end in ends:
        out.append(chunk[prev:end])
        prev = end
    assert prev == len(chunk), "output ends in a partial packet"
    return out


# ---------------------------------------------------------------- CONNECT


def connect_raw(
    level: int = 4,
    flags: int = 0x02,
    keepalive: int = 60,
    props: bytes = b"\x00",
    payload: bytes = b"\x00\x03cid",
    name: bytes = b"MQTT",
    first: int = 0x10,
) -> bytes:
    """A CONNECT from its parts; ``props`` is only written for level 5."""
    body = mstr(name) + bytes((level, flags)) + keepalive.to_bytes(2, "big")
    if level == 5:
        body += props
    return pkt(first, body + payload)


def connect(
    client_id: str,
    username: str | None = None,
    password: str | bytes | None = None,
    *,
    v5: bool = False,
    clean: bool = True,
    will: Will | None = None,
    props: dict[int, Any] | None = None,
    keepalive: int = 60,
) -> bytes:
    """A valid CONNECT (the flags follow from what is given)."""
    return encode_connect(
        Connect(
            level=5 if v5 else 4,
            clean_start=clean,
            keepalive=keepalive,
            client_id=client_id,
            properties=props or {},
            will=will,
            username=username,
            password=password.encode() if isinstance(password, str) else password,
        )
    )


# ---------------------------------------------------------------- PUBLISH, SUBSCRIBE, DISCONNECT


def publish_raw(topic: bytes, *, v5: bool, first: int = 0x30, packet_id: int | None = None,
                payload: bytes = b"payload") -> bytes:
    """A PUBLISH with any first byte and topic bytes; a packet identifier only when given."""
    pid = b"" if packet_id is None else packet_id.to_bytes(2, "big")
    return pkt(first, mstr(topic) + pid + no_props(v5) + payload)


def publish(
    topic: str,
    payload: bytes = b"",
    *,
    v5: bool,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    props: dict[int, Any] | None = None,
) -> bytes:
    """A valid PUBLISH (the packet identifier is written for QoS 1 and 2 only)."""
    return encode_publish(qos, retain, False, topic, packet_id, (props or {}) if v5 else None, payload)


def subscribe_raw(
    filters: list[tuple[str | bytes, int]], v5: bool, packet_id: int = 1, props: bytes = b"\x00", first: int = 0x82
) -> bytes:
    """A SUBSCRIBE from (filter bytes, options byte) pairs; ``props`` is only written for v5."""
    body = packet_id.to_bytes(2, "big") + (props if v5 else b"")
    for filt, options in filters:
        body += mstr(filt) + bytes((options,))
    return pkt(first, body)


def subscribe(filters: list[tuple[str, int]], *, v5: bool, packet_id: int = 1) -> bytes:
    """A valid SUBSCRIBE of (filter, options) pairs, without properties."""
    return encode_subscribe(Subscribe(packet_id, filters, {} if v5 else None), v5)


def disconnect(v5: bool, reason: int = 0) -> bytes:
    """A DISCONNECT: with the reason code and an empty property block for v5, the bare 2 bytes for 3.1.1."""
    return encode_disconnect(reason) if v5 else b"\xe0\x00"


# ---------------------------------------------------------------- WebSocket


def ws_client_frame(payload: bytes, opcode: int = 0x2, fin: bool = True) -> bytes:
    """A masked client-to-server WebSocket frame (binary by default)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += struct.pack("!BH", 0x80 | 126, n)
    else:
        head += struct.pack("!BQ", 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked
