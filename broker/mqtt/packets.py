"""MQTT 3.1.1 / 5.0 packets: the packet types and one section per type, decode and encode. No I/O.

Decoders take ``(buf, start, end)`` so that a caller that only relays never copies a packet;
only packets the front broker must read or change are decoded into these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from broker.mqtt.errors import MalformedPacket, ProtocolViolation, UnsupportedProtocol
from broker.mqtt.framer import body_start
from broker.mqtt.limits import UNLIMITED, DecodeLimits, LimitExceeded
from broker.mqtt.primitives import encode_binary, encode_str, encode_varint, read_binary, read_str, read_u16
from broker.mqtt.properties import Ctx, Prop, Properties, decode_properties, encode_properties
from broker.mqtt.topics import split_shared, validate_topic_filter, validate_topic_name


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# Required low nibble of the first byte for every type except PUBLISH.
_FIXED_FLAGS = {t: 0 for t in PacketType}
_FIXED_FLAGS[PacketType.PUBREL] = 2
_FIXED_FLAGS[PacketType.SUBSCRIBE] = 2
_FIXED_FLAGS[PacketType.UNSUBSCRIBE] = 2


def check_fixed_flags(first: int, v5: bool) -> int:
    """Validate the first byte of a non-PUBLISH packet; returns the packet type."""
    ptype = first >> 4
    if ptype == 0:
        raise MalformedPacket("reserved packet type 0")
    if ptype == PacketType.AUTH and not v5:
        raise MalformedPacket("AUTH packet in MQTT 3.1.1")
    if ptype != PacketType.PUBLISH and (first & 0x0F) != _FIXED_FLAGS[PacketType(ptype)]:
        raise MalformedPacket(f"reserved flag bits set in {PacketType(ptype).name}")
    return ptype


# ---------------------------------------------------------------- CONNECT


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    level: int  # 4 = MQTT 3.1.1, 5 = MQTT 5.0
    clean_start: bool
    keepalive: int
    client_id: str
    properties: Properties = field(default_factory=dict)
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None

    @property
    def v5(self) -> bool:
        return self.level == 5


def decode_connect(buf: bytes, start: int, end: int, limits: DecodeLimits = UNLIMITED) -> Connect:
    if buf[start] != PacketType.CONNECT << 4:
        raise MalformedPacket("reserved flag bits set in CONNECT")
    pos = body_start(buf, start)
    name_raw, pos = read_binary(buf, pos, end)
    if pos >= end:
        raise MalformedPacket("CONNECT truncated before protocol level")
    level = buf[pos]
    pos += 1
    v5_format = (level & 0x7F) == 5
    if name_raw != b"MQTT" or level not in (4, 5):
        shown = name_raw[:16].decode("utf-8", "replace")
        raise UnsupportedProtocol(f"unsupported protocol {shown!r} level {level}", v5_format)
    v5 = level == 5
    if pos + 3 > end:
        raise MalformedPacket("CONNECT truncated in its variable header")
    flags = buf[pos]
    keepalive = (buf[pos + 1] << 8) | buf[pos + 2]
    pos += 3
    if flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS/retain set without the will flag")
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if has_password and not has_username and not v5:
        raise MalformedPacket("password without username in MQTT 3.1.1")
    props: Properties = {}
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.CONNECT, limits)
    client_id, pos = read_str(buf, pos, end)
    will = None
    if will_flag:
        will_props: Properties = {}
        if v5:
            will_props, pos = decode_properties(buf, pos, end, Ctx.WILL, limits)
        will_topic, pos = read_str(buf, pos, end)
        if not will_topic:
            raise ProtocolViolation("empty will topic")
        validate_topic_name(will_topic)
        limits.check_topic(will_topic, "will topic", 0x90)  # CONNACK: Topic Name invalid
        if Prop.RESPONSE_TOPIC in will_props:
            validate_topic_name(will_props[Prop.RESPONSE_TOPIC])  # a topic name: no wildcards [MQTT-3.3.2-14]
        will_payload, pos = read_binary(buf, pos, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = password = None
    if has_username:
        username, pos = read_str(buf, pos, end)
    if has_password:
        password, pos = read_binary(buf, pos, end)
    if pos != end:
        raise MalformedPacket("trailing bytes after CONNECT payload")
    return Connect(
        level=level,
        clean_start=bool(flags & 0x02),
        keepalive=keepalive,
        client_id=client_id,
        properties=props,
        will=will,
        username=username,
        password=password,
    )


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_connect(c: Connect) -> bytes:
    flags = 0x02 if c.clean_start else 0
    if c.will is not None:
        flags |= 0x04 | (c.will.qos << 3) | (0x20 if c.will.retain else 0)
    if c.username is not None:
        flags |= 0x80
    if c.password is not None:
        flags |= 0x40
    parts = [encode_str("MQTT"), bytes((c.level, flags)), c.keepalive.to_bytes(2, "big")]
    if c.v5:
        parts.append(encode_properties(c.properties))
    parts.append(encode_str(c.client_id))
    if c.will is not None:
        if c.v5:
            parts.append(encode_properties(c.will.properties))
        parts.append(encode_str(c.will.topic))
        parts.append(encode_binary(c.will.payload))
    if c.username is not None:
        parts.append(encode_str(c.username))
    if c.password is not None:
        parts.append(encode_binary(c.password))
    return _packet(PacketType.CONNECT << 4, b"".join(parts))


# ---------------------------------------------------------------- CONNACK


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason_code: int
    properties: Properties = field(default_factory=dict)


def decode_connack(buf: bytes, start: int, end: int, v5: bool) -> Connack:
    pos = body_start(buf, start)
    if pos + 2 > end:
        raise MalformedPacket("CONNACK truncated")
    if buf[pos] & 0xFE:
        raise MalformedPacket("reserved CONNACK flags set")
    session_present = bool(buf[pos] & 1)
    code = buf[pos + 1]
    pos += 2
    props: Properties = {}
    if v5 and pos < end:
        props, pos = decode_properties(buf, pos, end, Ctx.CONNACK)
    if pos != end:
        raise MalformedPacket("trailing bytes after CONNACK")
    return Connack(session_present, code, props)


def encode_connack(v5: bool, session_present: bool, reason_code: int, props: Properties | None = None) -> bytes:
    body = bytes((1 if session_present else 0, reason_code))
    if v5:
        body += encode_properties(props)
    return _packet(PacketType.CONNACK << 4, body)


# ---------------------------------------------------------------- PUBLISH


@dataclass(slots=True)
class Publish:
    qos: int
    retain: bool
    dup: bool
    topic: str
    packet_id: int
    properties: Properties | None
    payload_start: int  # absolute offset of the payload in the buffer


def decode_publish(buf: bytes, start: int, end: int, v5: bool, limits: DecodeLimits = UNLIMITED) -> Publish:
    first = buf[start]
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(first & 0x08)
    if dup and qos == 0:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
    # The hot path of the whole front broker: fields are read inline, not via helpers.
    pos = start + 2 if buf[start + 1] < 0x80 else body_start(buf, start)
    if pos + 2 > end:
        raise MalformedPacket("PUBLISH truncated before its topic")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise MalformedPacket("PUBLISH topic runs past the packet")
    try:
        topic = buf[pos + 2 : stop].decode()
    except UnicodeDecodeError:
        raise MalformedPacket("invalid UTF-8 in PUBLISH topic") from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise MalformedPacket("U+0000 in PUBLISH topic")
        raise ProtocolViolation("wildcard in a PUBLISH topic")
    if limits is not UNLIMITED:
        limits.check_topic(topic, "topic name", 0x90)  # Topic Name invalid
    pos = stop
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("PUBLISH truncated before its packet identifier")
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
        if packet_id == 0:
            raise ProtocolViolation("PUBLISH with packet identifier 0")
    props = None
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.PUBLISH, limits)
    if not topic and (props is None or 0x23 not in props):
        raise ProtocolViolation("empty PUBLISH topic without a topic alias")
    return Publish(qos, bool(first & 1), dup, topic, packet_id, props, pos)


def encode_publish(
    qos: int, retain: bool, dup: bool, topic: str, packet_id: int, props: Properties | None, payload: bytes
) -> bytes:
    first = (PacketType.PUBLISH << 4) | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    parts = [encode_str(topic)]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    if props is not None:
        parts.append(encode_properties(props))
    parts.append(payload)
    return _packet(first, b"".join(parts))


# ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    filters: list[tuple[str, int]]  # (filter, options byte)
    properties: Properties | None = None


def decode_subscribe(buf: bytes, start: int, end: int, v5: bool, limits: DecodeLimits = UNLIMITED) -> Subscribe:
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolViolation("SUBSCRIBE with packet identifier 0")
    props = None
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.SUBSCRIBE, limits)
        if len(props.get(0x0B, ())) > 1:
            # MQTT 5 section 3.8.2.1.2: a Protocol Error to include it more than once.
            raise ProtocolViolation("Subscription Identifier more than once in SUBSCRIBE")
    filters: list[tuple[str, int]] = []
    while pos < end:
        if len(filters) >= limits.filters:
            raise LimitExceeded("filters", f"more than {limits.filters} topic filters in one SUBSCRIBE")
        filt, pos = read_str(buf, pos, end)
        limits.check_topic(filt, "topic filter", 0x8F)  # Topic Filter invalid
        if pos >= end:
            raise MalformedPacket("SUBSCRIBE filter without options")
        options = buf[pos]
        pos += 1
        if options & (0xC0 if v5 else 0xFC):
            raise MalformedPacket("reserved subscription option bits set")
        if options & 3 == 3:
            # MQTT 5 section 3.8.3.1: a Protocol Error (MQTT 3.1.1: malformed).
            raise ProtocolViolation("subscription with QoS 3") if v5 else MalformedPacket("subscription with QoS 3")
        if v5 and (options >> 4) & 3 == 3:
            raise ProtocolViolation("retain handling 3")
        group, inner = split_shared(filt)
        validate_topic_filter(inner)
        if group is not None and v5 and options & 0x04:
            raise ProtocolViolation("no-local on a shared subscription")
        filters.append((filt, options))
    if not filters:
        raise ProtocolViolation("SUBSCRIBE without filters")
    return Subscribe(packet_id, filters, props)


def encode_subscribe(sub: Subscribe, v5: bool) -> bytes:
    parts = [sub.packet_id.to_bytes(2, "big")]
    if v5:
        parts.append(encode_properties(sub.properties))
    for filt, options in sub.filters:
        parts.append(encode_str(filt))
        parts.append(bytes((options,)))
    return _packet((PacketType.SUBSCRIBE << 4) | 2, b"".join(parts))


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Properties | None = None


def decode_unsubscribe(buf: bytes, start: int, end: int, v5: bool, limits: DecodeLimits = UNLIMITED) -> Unsubscribe:
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolViolation("UNSUBSCRIBE with packet identifier 0")
    props = None
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.UNSUBSCRIBE, limits)
    filters: list[str] = []
    while pos < end:
        if len(filters) >= limits.filters:
            raise LimitExceeded("filters", f"more than {limits.filters} topic filters in one UNSUBSCRIBE")
        filt, pos = read_str(buf, pos, end)
        limits.check_topic(filt, "topic filter", 0x8F)  # Topic Filter invalid
        _, inner = split_shared(filt)
        validate_topic_filter(inner)
        filters.append(filt)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE without filters")
    return Unsubscribe(packet_id, filters, props)


def encode_unsubscribe(unsub: Unsubscribe, v5: bool) -> bytes:
    parts = [unsub.packet_id.to_bytes(2, "big")]
    if v5:
        parts.append(encode_properties(unsub.properties))
    parts.extend(encode_str(filt) for filt in unsub.filters)
    return _packet((PacketType.UNSUBSCRIBE << 4) | 2, b"".join(parts))


@dataclass(slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None = None


def decode_suback(buf: bytes, start: int, end: int, v5: bool) -> SubAck:
    """SUBACK and UNSUBACK share this layout (v3.1.1 UNSUBACK simply has no codes)."""
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    props = None
    if v5:
        ctx = Ctx.SUBACK if buf[start] >> 4 == PacketType.SUBACK else Ctx.UNSUBACK
        props, pos = decode_properties(buf, pos, end, ctx)
    return SubAck(packet_id, list(buf[pos:end]), props)


def encode_suback(v5: bool, packet_id: int, codes: list[int], props: Properties | None = None) -> bytes:
    body = packet_id.to_bytes(2, "big") + (encode_properties(props) if v5 else b"") + bytes(codes)
    return _packet(PacketType.SUBACK << 4, body)


def encode_unsuback(v5: bool, packet_id: int, codes: list[int], props: Properties | None = None) -> bytes:
    body = packet_id.to_bytes(2, "big")
    if v5:
        body += encode_properties(props) + bytes(codes)
    return _packet(PacketType.UNSUBACK << 4, body)


# ---------------------------------------------------------------- PUBACK / PUBREC / PUBREL / PUBCOMP


@dataclass(slots=True)
class Ack:
    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


def decode_ack(buf: bytes, start: int, end: int, v5: bool, limits: DecodeLimits = UNLIMITED) -> Ack:
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolViolation("acknowledgement with packet identifier 0")
    if not v5:
        if pos != end:
            raise MalformedPacket("acknowledgement longer than 2 bytes in MQTT 3.1.1")
        return Ack(packet_id)
    code = 0
    props = None
    if pos < end:
        code = buf[pos]
        pos += 1
        if pos < end:
            props, pos = decode_properties(buf, pos, end, Ctx.ACK, limits)
    if pos != end:
        raise MalformedPacket("trailing bytes after acknowledgement")
    return Ack(packet_id, code, props)


def encode_ack(
    ptype: PacketType, v5: bool, packet_id: int, reason_code: int = 0, props: Properties | None = None
) -> bytes:
    first = (ptype << 4) | (2 if ptype == PacketType.PUBREL else 0)
    body = packet_id.to_bytes(2, "big")
    if v5 and (reason_code or props):
        body += bytes((reason_code,)) + (encode_properties(props) if props else b"")
    return _packet(first, body)


# ---------------------------------------------------------------- DISCONNECT, PINGRESP


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties | None = None


def decode_disconnect(buf: bytes, start: int, end: int, v5: bool, limits: DecodeLimits = UNLIMITED) -> Disconnect:
    pos = body_start(buf, start)
    if not v5:
        if pos != end:
            raise MalformedPacket("DISCONNECT with a body in MQTT 3.1.1")
        return Disconnect()
    code = 0
    props = None
    if pos < end:
        code = buf[pos]
        pos += 1
        if pos < end:
            props, pos = decode_properties(buf, pos, end, Ctx.DISCONNECT, limits)
    if pos != end:
        raise MalformedPacket("trailing bytes after DISCONNECT")
    return Disconnect(code, props)


def encode_disconnect(reason_code: int = 0, reason_string: str | None = None) -> bytes:
    """v5 only: a v3.1.1 server never sends DISCONNECT, it closes the connection."""
    props: Properties = {0x1F: reason_string} if reason_string else {}
    return _packet(PacketType.DISCONNECT << 4, bytes((reason_code,)) + encode_properties(props))


PINGRESP = bytes((PacketType.PINGRESP << 4, 0))
