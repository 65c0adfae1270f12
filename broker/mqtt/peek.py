"""Hot-path views of a packet without decoding it: where a PUBLISH's topic and packet id lie, an ack's id.

The relay forwards most packets as their original bytes; for those it only needs a few fields,
read inline here (no dataclass, no validation) and used as keys into caches of what
:mod:`broker.mqtt.packets` already decoded and validated. Anything unusual returns None and goes
through the full decoders. No I/O.
"""

from __future__ import annotations

from broker.mqtt.errors import MalformedPacket
from broker.mqtt.framer import body_start
from broker.mqtt.packets import decode_ack
from broker.mqtt.primitives import encode_varint


def plain_publish_topic(buf: bytes, start: int, end: int, v5: bool) -> bytes | None:
    """The raw topic of a "plain" PUBLISH, or None when it is not plain.

    Plain: a valid QoS/DUP pair, the topic and packet identifier inside the packet and, in MQTT 5,
    no properties (an alias or a subscription id needs :func:`decode_publish`). Nothing is decoded
    or validated: the relay only uses the bytes as a key into its cache of topics already decoded,
    validated and allowed. The hot path of the front broker: fields are read inline.
    """
    first = buf[start]
    qos = (first >> 1) & 3
    pos = start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)
    if pos + 2 > end or qos == 3 or (not qos and first & 8):
        return None
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    after = stop + 2 if qos else stop
    if (after + 1 <= end and buf[after] == 0) if v5 else after <= end:
        return buf[pos + 2 : stop]
    return None


def publish_packet_id(buf: bytes, start: int, topic_length: int) -> int:
    """The packet identifier of a QoS 1/2 PUBLISH whose topic is ``topic_length`` bytes (0 if absent)."""
    at = (start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)) + 2 + topic_length
    return (buf[at] << 8) | buf[at + 1]


def publish_topic_bytes(buf: bytes, start: int, end: int) -> bytes | None:
    """The raw topic of a PUBLISH from the upstream (trusted framing), or None when it runs past ``end``."""
    pos = start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)
    if pos + 2 > end:
        return None
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    return buf[pos + 2 : stop] if stop <= end else None


def ack_packet_id(buf: bytes, start: int, end: int, v5: bool) -> int:
    """The packet identifier of a PUBACK/PUBREC/PUBREL/PUBCOMP (a plain ack is 4 bytes, id last)."""
    if end - start == 4:
        return (buf[end - 2] << 8) | buf[end - 1]
    return decode_ack(buf, start, end, v5).packet_id


def header_packet_id(buf: bytes, start: int, end: int) -> int:
    """The packet identifier right after the fixed header (SUBACK, UNSUBACK, SUBSCRIBE, UNSUBSCRIBE)."""
    pos = start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)
    if pos + 2 > end:
        raise MalformedPacket("packet too short for its packet identifier")
    return (buf[pos] << 8) | buf[pos + 1]


def peek_connect_level(buf: bytes, end: int) -> int:
    """The protocol level byte of a CONNECT at offset 0, or 0 if it is not in ``buf[:end]``.

    Read before the CONNECT is decoded, so that a refusal is answered in the client's version.
    """
    pos = 1
    while pos < end and buf[pos] & 0x80:
        pos += 1
    pos += 1
    if pos + 2 > end:
        return 0
    name_len = (buf[pos] << 8) | buf[pos + 1]
    level_at = pos + 2 + name_len
    return buf[level_at] if level_at < end else 0


def replace_publish_topic(buf: bytes, start: int, end: int, topic: bytes) -> bytes:
    """The PUBLISH at ``buf[start:end]`` with ``topic`` (raw UTF-8) in place of its own; the rest is copied.

    For a topic that only changes by a prefix (a mountpoint): the packet id, properties and payload
    are not decoded or re-encoded.
    """
    pos = start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    n = len(topic)
    remaining = 2 + n + end - stop
    if remaining < 128:  # the common case: a one-byte remaining length
        return bytes((buf[start], remaining, n >> 8, n & 0xFF)) + topic + buf[stop:end]
    head = bytes((buf[start],)) + encode_varint(remaining) + bytes((n >> 8, n & 0xFF))
    return b"".join((head, topic, buf[stop:end]))
