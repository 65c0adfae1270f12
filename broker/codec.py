"""MQTT 3.1.1 / 5.0 codec: an incremental framer, decoders, encoders. No I/O.

The framer never copies a packet it does not have to: it hands back one ``bytes`` chunk
plus the end offset of each complete packet in it, so a caller that only relays can
forward whole runs of the original bytes. Decoders take ``(buf, start, end)`` for the
same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from broker.errors import MalformedPacket, PacketTooLarge, ProtocolError, ProtocolViolation
from broker.properties import (
    Ctx,
    Properties,
    decode_properties,
    encode_properties,
    encode_varint,
    read_binary,
    read_str,
    read_u16,
)

MQTT_MAX_PACKET = 268_435_455 + 5  # largest remaining length plus the fixed header


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


class UnsupportedProtocol(ProtocolError):
    """CONNECT with a protocol name/level the front broker does not serve.

    ``v5_format`` tells whether the refusal CONNACK uses the v5 layout (reason 0x84)
    or the v3 layout (return code 0x01).
    """

    def __init__(self, message: str, v5_format: bool) -> None:
        super().__init__(message, 0x84)
        self.v5_format = v5_format


class Framer:
    """Cuts a byte stream into whole MQTT packets.

    ``feed`` returns ``(chunk, ends)``: ``chunk`` holds complete packets only and
    packet *i* spans ``chunk[ends[i-1]:ends[i]]`` (the first starts at 0). A packet over
    ``max_packet_size`` is refused from its fixed header, before its body is buffered.
    """

    __slots__ = ("_have", "_need", "_pending", "error", "max_packet_size")

    def __init__(self, max_packet_size: int = MQTT_MAX_PACKET) -> None:
        self.max_packet_size = max_packet_size
        # An incomplete packet: its bytes so far, and (once its header is known) its full size.
        # Reads are collected in a list until it is complete, so a large packet trickled in
        # small reads is joined once, not copied again on every read.
        self._pending: list[bytes] = []
        self._have = 0
        self._need = 0
        self.error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return self._have

    def take_pending(self) -> bytes:
        """Hand back the bytes of an incomplete packet, leaving the framer empty."""
        pending = b"".join(self._pending)
        self._pending, self._have, self._need = [], 0, 0
        return pending

    def feed(self, data: bytes) -> tuple[bytes, list[int]]:
        if self._pending:
            self._pending.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", []
            data = b"".join(self._pending)
            self._pending, self._have, self._need = [], 0, 0
        n = len(data)
        ends: list[int] = []
        pos = 0
        limit = self.max_packet_size
        try:
            while n - pos >= 2:
                b = data[pos + 1]
                if b < 0x80:
                    total = 2 + b
                else:
                    length = b & 0x7F
                    i = pos + 2
                    shift = 7
                    while True:
                        if i >= n:
                            total = -1  # length bytes still incomplete
                            break
                        b = data[i]
                        i += 1
                        length |= (b & 0x7F) << shift
                        if b < 0x80:
                            if b == 0:
                                # MQTT 5 section 1.5.5: the minimum number of bytes [MQTT-1.5.5-1].
                                raise MalformedPacket("remaining length not minimally encoded")
                            total = i - pos + length
                            break
                        if i - pos > 4:
                            raise MalformedPacket("remaining length longer than 4 bytes")
                        shift += 7
                    if total < 0:
                        break
                if total > limit:
                    raise PacketTooLarge(f"packet of {total} bytes exceeds the maximum of {limit}")
                if pos + total > n:
                    self._need = total
                    break
                pos += total
                ends.append(pos)
        except ProtocolError as exc:
            if not ends:
                raise
            # Hand out the good packets before the bad one; the caller raises `error` after them.
            self.error = exc
            return data[:pos], ends
        if pos < n:
            rest = data[pos:]
            self._pending = [rest]
            self._have = len(rest)
            data = data[:pos]
        return data, ends


def body_start(buf: bytes, start: int) -> int:
    """Offset of the variable header of the packet that begins at ``start``."""
    i = start + 1
    while buf[i] & 0x80:
        i += 1
    return i + 1


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


# ---------------------------------------------------------------- topics and filters


def validate_topic_name(topic: str) -> None:
    if "+" in topic or "#" in topic:
        raise ProtocolViolation("wildcard in a PUBLISH topic")


def validate_topic_filter(filt: str) -> None:
    if not filt:
        raise ProtocolViolation("empty topic filter")
    if "+" in filt or "#" in filt:
        levels = filt.split("/")
        last = len(levels) - 1
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != last):
                raise ProtocolViolation("'#' must be the whole last level of a filter")
            if "+" in level and level != "+":
                raise ProtocolViolation("'+' must be a whole level of a filter")


def split_shared(filt: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> (group, filter); other filters -> (None, filter)."""
    if not filt.startswith("$share/"):
        return None, filt
    parts = filt.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ProtocolViolation("malformed shared subscription")
    group = parts[1]
    if "+" in group or "#" in group:
        raise ProtocolViolation("wildcard in a shared subscription group")
    return group, parts[2]


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


def decode_connect(buf: bytes, start: int, end: int) -> Connect:
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
        props, pos = decode_properties(buf, pos, end, Ctx.CONNECT)
    client_id, pos = read_str(buf, pos, end)
    will = None
    if will_flag:
        will_props: Properties = {}
        if v5:
            will_props, pos = decode_properties(buf, pos, end, Ctx.WILL)
        will_topic, pos = read_str(buf, pos, end)
        if not will_topic:
            raise ProtocolViolation("empty will topic")
        validate_topic_name(will_topic)
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


def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _bin(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


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
    parts = [_str("MQTT"), bytes((c.level, flags)), c.keepalive.to_bytes(2, "big")]
    if c.v5:
        parts.append(encode_properties(c.properties))
    parts.append(_str(c.client_id))
    if c.will is not None:
        if c.v5:
            parts.append(encode_properties(c.will.properties))
        parts.append(_str(c.will.topic))
        parts.append(_bin(c.will.payload))
    if c.username is not None:
        parts.append(_str(c.username))
    if c.password is not None:
        parts.append(_bin(c.password))
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


def decode_publish(buf: bytes, start: int, end: int, v5: bool) -> Publish:
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
        props, pos = decode_properties(buf, pos, end, Ctx.PUBLISH)
    if not topic and (props is None or 0x23 not in props):
        raise ProtocolViolation("empty PUBLISH topic without a topic alias")
    return Publish(qos, bool(first & 1), dup, topic, packet_id, props, pos)


def encode_publish(
    qos: int, retain: bool, dup: bool, topic: str, packet_id: int, props: Properties | None, payload: bytes
) -> bytes:
    first = (PacketType.PUBLISH << 4) | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    parts = [_str(topic)]
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


def decode_subscribe(buf: bytes, start: int, end: int, v5: bool) -> Subscribe:
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolViolation("SUBSCRIBE with packet identifier 0")
    props = None
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.SUBSCRIBE)
        if len(props.get(0x0B, ())) > 1:
            # MQTT 5 section 3.8.2.1.2: a Protocol Error to include it more than once.
            raise ProtocolViolation("Subscription Identifier more than once in SUBSCRIBE")
    filters: list[tuple[str, int]] = []
    while pos < end:
        filt, pos = read_str(buf, pos, end)
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
        parts.append(_str(filt))
        parts.append(bytes((options,)))
    return _packet((PacketType.SUBSCRIBE << 4) | 2, b"".join(parts))


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Properties | None = None


def decode_unsubscribe(buf: bytes, start: int, end: int, v5: bool) -> Unsubscribe:
    pos = body_start(buf, start)
    packet_id, pos = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolViolation("UNSUBSCRIBE with packet identifier 0")
    props = None
    if v5:
        props, pos = decode_properties(buf, pos, end, Ctx.UNSUBSCRIBE)
    filters: list[str] = []
    while pos < end:
        filt, pos = read_str(buf, pos, end)
        _, inner = split_shared(filt)
        validate_topic_filter(inner)
        filters.append(filt)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE without filters")
    return Unsubscribe(packet_id, filters, props)


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


def decode_ack(buf: bytes, start: int, end: int, v5: bool) -> Ack:
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
            props, pos = decode_properties(buf, pos, end, Ctx.ACK)
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


def decode_disconnect(buf: bytes, start: int, end: int, v5: bool) -> Disconnect:
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
            props, pos = decode_properties(buf, pos, end, Ctx.DISCONNECT)
    if pos != end:
        raise MalformedPacket("trailing bytes after DISCONNECT")
    return Disconnect(code, props)


def encode_disconnect(reason_code: int = 0, reason_string: str | None = None) -> bytes:
    """v5 only: a v3.1.1 server never sends DISCONNECT, it closes the connection."""
    props: Properties = {0x1F: reason_string} if reason_string else {}
    return _packet(PacketType.DISCONNECT << 4, bytes((reason_code,)) + encode_properties(props))


PINGRESP = bytes((PacketType.PINGRESP << 4, 0))
