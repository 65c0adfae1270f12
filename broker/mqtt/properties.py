"""MQTT 5 properties: decoding, validation and encoding (no I/O).

Properties are kept as a ``dict[int, object]`` keyed by property identifier; the two
repeatable properties (User Property, Subscription Identifier) hold lists.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from broker.mqtt.errors import MalformedPacket, ProtocolViolation, TopicAliasInvalid
from broker.mqtt.limits import UNLIMITED, DecodeLimits, LimitExceeded
from broker.mqtt.primitives import decode_varint, encode_str, encode_varint, read_binary, read_str, read_u16, read_u32


class Prop(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


# Where each property may appear; "will" is the will-properties block of CONNECT.
class Ctx(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    WILL = 4
    ACK = 5  # PUBACK, PUBREC, PUBREL, PUBCOMP
    SUBSCRIBE = 6
    SUBACK = 7
    UNSUBSCRIBE = 8
    UNSUBACK = 9
    DISCONNECT = 10
    AUTH = 11


_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)

_C = Ctx
_ALL_REASON = {_C.CONNACK, _C.ACK, _C.SUBACK, _C.UNSUBACK, _C.DISCONNECT, _C.AUTH}
_MSG = {_C.PUBLISH, _C.WILL}

# identifier -> (wire type, contexts where it is allowed)
SPEC: dict[int, tuple[int, frozenset[Ctx]]] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: (_BYTE, frozenset(_MSG)),
    Prop.MESSAGE_EXPIRY_INTERVAL: (_U32, frozenset(_MSG)),
    Prop.CONTENT_TYPE: (_STR, frozenset(_MSG)),
    Prop.RESPONSE_TOPIC: (_STR, frozenset(_MSG)),
    Prop.CORRELATION_DATA: (_BIN, frozenset(_MSG)),
    Prop.SUBSCRIPTION_IDENTIFIER: (_VARINT, frozenset({_C.PUBLISH, _C.SUBSCRIBE})),
    Prop.SESSION_EXPIRY_INTERVAL: (_U32, frozenset({_C.CONNECT, _C.CONNACK, _C.DISCONNECT})),
    Prop.ASSIGNED_CLIENT_IDENTIFIER: (_STR, frozenset({_C.CONNACK})),
    Prop.SERVER_KEEP_ALIVE: (_U16, frozenset({_C.CONNACK})),
    Prop.AUTHENTICATION_METHOD: (_STR, frozenset({_C.CONNECT, _C.CONNACK, _C.AUTH})),
    Prop.AUTHENTICATION_DATA: (_BIN, frozenset({_C.CONNECT, _C.CONNACK, _C.AUTH})),
    Prop.REQUEST_PROBLEM_INFORMATION: (_BYTE, frozenset({_C.CONNECT})),
    Prop.WILL_DELAY_INTERVAL: (_U32, frozenset({_C.WILL})),
    Prop.REQUEST_RESPONSE_INFORMATION: (_BYTE, frozenset({_C.CONNECT})),
    Prop.RESPONSE_INFORMATION: (_STR, frozenset({_C.CONNACK})),
    Prop.SERVER_REFERENCE: (_STR, frozenset({_C.CONNACK, _C.DISCONNECT})),
    Prop.REASON_STRING: (_STR, frozenset(_ALL_REASON)),
    Prop.RECEIVE_MAXIMUM: (_U16, frozenset({_C.CONNECT, _C.CONNACK})),
    Prop.TOPIC_ALIAS_MAXIMUM: (_U16, frozenset({_C.CONNECT, _C.CONNACK})),
    Prop.TOPIC_ALIAS: (_U16, frozenset({_C.PUBLISH})),
    Prop.MAXIMUM_QOS: (_BYTE, frozenset({_C.CONNACK})),
    Prop.RETAIN_AVAILABLE: (_BYTE, frozenset({_C.CONNACK})),
    Prop.USER_PROPERTY: (_PAIR, frozenset(Ctx)),
    Prop.MAXIMUM_PACKET_SIZE: (_U32, frozenset({_C.CONNECT, _C.CONNACK})),
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_C.CONNACK})),
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (_BYTE, frozenset({_C.CONNACK})),
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_C.CONNACK})),
}

REPEATABLE = frozenset({Prop.USER_PROPERTY, Prop.SUBSCRIPTION_IDENTIFIER})
# Byte-valued properties that may only be 0 or 1.
_BOOLEAN = frozenset(
    {
        Prop.PAYLOAD_FORMAT_INDICATOR,
        Prop.REQUEST_PROBLEM_INFORMATION,
        Prop.REQUEST_RESPONSE_INFORMATION,
        Prop.RETAIN_AVAILABLE,
        Prop.WILDCARD_SUBSCRIPTION_AVAILABLE,
        Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        Prop.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)
# Properties for which 0 is a protocol error.
_NONZERO = frozenset({Prop.RECEIVE_MAXIMUM, Prop.MAXIMUM_PACKET_SIZE, Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER})

Properties = dict[int, Any]


def decode_properties(
    buf: bytes, pos: int, end: int, ctx: Ctx, limits: DecodeLimits = UNLIMITED
) -> tuple[Properties, int]:
    """Property block at ``pos`` (length prefix included); returns (properties, new position).

    User Properties beyond ``limits`` raise LimitExceeded at the first one over, before more are built.
    """
    length, pos = decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the packet")
    props: Properties = {}
    pairs = pair_bytes = 0
    while pos < stop:
        ident, pos = decode_varint(buf, pos, stop)
        spec = SPEC.get(ident)
        if spec is None:
            raise MalformedPacket(f"unknown property 0x{ident:02x}")
        kind, allowed = spec
        if ctx not in allowed:
            # MQTT 5 section 2.2.2.2: an identifier not valid for the packet type is a Malformed Packet.
            raise MalformedPacket(f"property 0x{ident:02x} not allowed here")
        value: Any
        if kind == _BYTE:
            if pos >= stop:
                raise MalformedPacket("property runs past its block")
            value = buf[pos]
            pos += 1
        elif kind == _U16:
            value, pos = read_u16(buf, pos, stop)
        elif kind == _U32:
            value, pos = read_u32(buf, pos, stop)
        elif kind == _VARINT:
            value, pos = decode_varint(buf, pos, stop)
        elif kind == _STR:
            value, pos = read_str(buf, pos, stop)
        elif kind == _BIN:
            value, pos = read_binary(buf, pos, stop)
        else:
            pairs += 1
            if pairs > limits.user_properties:
                raise LimitExceeded("user_properties", f"more than {limits.user_properties} User Properties")
            begin = pos
            key, pos = read_str(buf, pos, stop)
            val, pos = read_str(buf, pos, stop)
            pair_bytes += pos - begin - 4
            if pair_bytes > limits.user_property_bytes:
                raise LimitExceeded(
                    "user_property_bytes", f"User Properties over {limits.user_property_bytes} bytes"
                )
            value = (key, val)
        if ident in _BOOLEAN and value > 1:
            raise ProtocolViolation(f"property 0x{ident:02x} must be 0 or 1")
        if ident == Prop.TOPIC_ALIAS and value == 0:
            # MQTT 5 section 3.3.2.3.4: Topic Alias 0 is answered with 0x94 (Topic Alias invalid).
            raise TopicAliasInvalid("topic alias 0")
        if ident in _NONZERO and value == 0:
            raise ProtocolViolation(f"property 0x{ident:02x} must not be 0")
        if ident in REPEATABLE:
            values = props.setdefault(ident, [])
            if values and ident == Prop.SUBSCRIPTION_IDENTIFIER and limits is not UNLIMITED:
                # Only the upstream may send several (a delivery matching several subscriptions): from a
                # client a second one is an error anyway, refused before half a million are built.
                raise ProtocolViolation("Subscription Identifier more than once")
            values.append(value)
        elif ident in props:
            raise ProtocolViolation(f"property 0x{ident:02x} appears twice")
        else:
            props[ident] = value
    return props, stop


def _encode_one(ident: int, kind: int, value: Any) -> bytes:
    head = encode_varint(ident)
    if kind == _BYTE:
        return head + bytes((value,))
    if kind == _U16:
        return head + int(value).to_bytes(2, "big")
    if kind == _U32:
        return head + int(value).to_bytes(4, "big")
    if kind == _VARINT:
        return head + encode_varint(value)
    if kind == _STR:
        return head + encode_str(value)
    if kind == _BIN:
        return head + len(value).to_bytes(2, "big") + bytes(value)
    return head + encode_str(value[0]) + encode_str(value[1])


def encode_properties(props: Properties | None) -> bytes:
    """Property block with its length prefix; ``None`` or empty gives a single 0 byte."""
    if not props:
        return b"\x00"
    parts: list[bytes] = []
    for ident, value in props.items():
        kind = SPEC[ident][0]
        if ident in REPEATABLE:
            parts.extend(_encode_one(ident, kind, v) for v in value)
        else:
            parts.append(_encode_one(ident, kind, value))
    body = b"".join(parts)
    return encode_varint(len(body)) + body
