"""Unit tests of broker.properties: varints, strings, MQTT 5 property blocks, checked against paho-mqtt."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _PahoProperties
from paho.mqtt.properties import VariableByteIntegers as _VariableByteIntegers

from broker.mqtt.errors import MalformedPacket, ProtocolError, ProtocolViolation, TopicAliasInvalid
from broker.mqtt.primitives import decode_varint, encode_varint, read_binary, read_str, read_u16, read_u32
from broker.mqtt.properties import REPEATABLE, SPEC, Ctx, Prop, decode_properties, encode_properties

# paho's properties module is untyped: go through Any so that typed tests may call it.
PahoProperties: Any = _PahoProperties
VariableByteIntegers: Any = _VariableByteIntegers

FAST = settings(max_examples=60, deadline=None)

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)

# Contexts mapped to paho's packet types (paho calls the will-properties block WILLMESSAGE).
PAHO_TYPE = {
    Ctx.CONNECT: PacketTypes.CONNECT,
    Ctx.CONNACK: PacketTypes.CONNACK,
    Ctx.PUBLISH: PacketTypes.PUBLISH,
    Ctx.WILL: PacketTypes.WILLMESSAGE,
    Ctx.ACK: PacketTypes.PUBACK,
    Ctx.SUBSCRIBE: PacketTypes.SUBSCRIBE,
    Ctx.SUBACK: PacketTypes.SUBACK,
    Ctx.UNSUBSCRIBE: PacketTypes.UNSUBSCRIBE,
    Ctx.UNSUBACK: PacketTypes.UNSUBACK,
    Ctx.DISCONNECT: PacketTypes.DISCONNECT,
    Ctx.AUTH: PacketTypes.AUTH,
}

_BOOLEANS = {
    Prop.PAYLOAD_FORMAT_INDICATOR,
    Prop.REQUEST_PROBLEM_INFORMATION,
    Prop.REQUEST_RESPONSE_INFORMATION,
    Prop.RETAIN_AVAILABLE,
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE,
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    Prop.SHARED_SUBSCRIPTION_AVAILABLE,
}

# MQTT strings: any Unicode scalar value except U+0000 (surrogates cannot be encoded anyway).
# U+FEFF is legal MQTT but paho's reader rejects it, so the oracle tests leave it out.
mqtt_text = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00\ufeff"), max_size=20)


def value_strategy(ident: int) -> st.SearchStrategy[Any]:
    kind = SPEC[ident][0]
    if ident in _BOOLEANS:
        return st.integers(0, 1)
    if ident == Prop.MAXIMUM_QOS:
        return st.integers(0, 1)
    if kind == _BYTE:
        return st.integers(0, 255)
    if kind == _U16:
        low = 0 if ident in (Prop.TOPIC_ALIAS_MAXIMUM, Prop.SERVER_KEEP_ALIVE) else 1
        return st.integers(low, 0xFFFF)
    if kind == _U32:
        if ident == Prop.MAXIMUM_PACKET_SIZE:
            return st.integers(1, 268_435_455)  # paho refuses larger values
        return st.integers(0, 0xFFFFFFFF)
    if kind == _VARINT:
        return st.integers(1, 268_435_455)
    if kind == _STR:
        return mqtt_text
    if kind == _BIN:
        return st.binary(max_size=40)
    return st.tuples(mqtt_text, mqtt_text)


@st.composite
def property_sets(draw: st.DrawFn, ctx: Ctx | None = None) -> tuple[Ctx, dict[int, Any]]:
    if ctx is None:
        ctx = draw(st.sampled_from(list(Ctx)))
    allowed = sorted(ident for ident, (_, ctxs) in SPEC.items() if ctx in ctxs)
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=len(allowed)))
    props: dict[int, Any] = {}
    for ident in sorted(chosen):
        if ident in REPEATABLE:
            # SUBSCRIBE carries at most one Subscription Identifier.
            most = 1 if ident == Prop.SUBSCRIPTION_IDENTIFIER and ctx == Ctx.SUBSCRIBE else 4
            props[ident] = draw(st.lists(value_strategy(ident), min_size=1, max_size=most))
        else:
            props[ident] = draw(value_strategy(ident))
    return ctx, props


def to_paho(ctx: Ctx, props: dict[int, Any]) -> Any:
    p = PahoProperties(PAHO_TYPE[ctx])
    for ident, value in props.items():
        name = p.getNameFromIdent(ident)
        assert name is not None
        setattr(p, name.replace(" ", ""), value)
    return p


def from_paho(p: Any) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for name, ident in p.names.items():
        compressed = name.replace(" ", "")
        if hasattr(p, compressed):
            value = getattr(p, compressed)
            if isinstance(value, bytearray):
                value = bytes(value)
            out[ident] = value
    return out


def decode_block(block: bytes, ctx: Ctx) -> dict[int, Any]:
    props, pos = decode_properties(block, 0, len(block), ctx)
    assert pos == len(block)
    return props


# ---------------------------------------------------------------- variable byte integers


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_boundaries(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire
    assert decode_varint(wire, 0, len(wire)) == (value, len(wire))
    # Decoding respects the start offset and leaves the following byte alone.
    buf = b"\xaa" + wire + b"\xbb"
    assert decode_varint(buf, 1, len(buf)) == (value, 1 + len(wire))


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_encode_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x80",
        b"\xff\xff\xff",
        b"\xff\xff\xff\xff\x01",  # five bytes
        b"\x80\x00",  # not minimal
        b"\x80\x80\x00",
    ],
)
def test_decode_varint_malformed(wire: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_varint(wire, 0, len(wire))


def test_decode_varint_respects_end() -> None:
    with pytest.raises(MalformedPacket):
        decode_varint(b"\x80\x01", 0, 1)


@FAST
@given(st.integers(0, 268_435_455))
def test_varint_round_trip_matches_paho(value: int) -> None:
    wire = encode_varint(value)
    assert wire == VariableByteIntegers.encode(value)
    assert decode_varint(wire, 0, len(wire)) == (value, len(wire))


# ---------------------------------------------------------------- fixed-size fields and strings


def test_read_fixed_integers() -> None:
    assert read_u16(b"\x01\x02", 0, 2) == (0x0102, 2)
    assert read_u32(b"\x00\x01\x02\x03\x04", 1, 5) == (0x01020304, 5)
    with pytest.raises(MalformedPacket):
        read_u16(b"\x01\x02", 0, 1)
    with pytest.raises(MalformedPacket):
        read_u32(b"\x01\x02\x03\x04", 0, 3)


def test_read_binary() -> None:
    assert read_binary(b"\x00\x03abcX", 0, 6) == (b"abc", 5)
    assert read_binary(b"\x00\x00", 0, 2) == (b"", 2)
    with pytest.raises(MalformedPacket):
        read_binary(b"\x00\x04abc", 0, 5)
    with pytest.raises(MalformedPacket):  # the limit is ``end``, not the buffer
        read_binary(b"\x00\x03abc", 0, 4)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xed\xa0\x80",  # encoded surrogate U+D800
        b"\xed\xbf\xbf",  # encoded surrogate U+DFFF
        b"\xc0\x80",  # overlong U+0000
        b"\xc1\xbf",  # overlong
        b"\xe0\x80\xaf",  # overlong '/'
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xff",
        b"\x80",
        b"abc\xc3",  # truncated sequence
        b"a\x00b",  # U+0000
    ],
)
def test_read_str_rejects_invalid_utf8_and_nul(raw: bytes) -> None:
    buf = len(raw).to_bytes(2, "big") + raw
    with pytest.raises(MalformedPacket):
        read_str(buf, 0, len(buf))


def test_read_str_accepts_valid_text() -> None:
    text = "caf\u00e9/\U0001f600/\ufeff/\uffff"
    raw = text.encode()
    buf = len(raw).to_bytes(2, "big") + raw
    assert read_str(buf, 0, len(buf)) == (text, len(buf))


# ---------------------------------------------------------------- property blocks


def test_empty_properties() -> None:
    assert encode_properties(None) == b"\x00"
    assert encode_properties({}) == b"\x00"
    assert decode_properties(b"\x00", 0, 1, Ctx.PUBLISH) == ({}, 1)


def test_known_encoding() -> None:
    props: dict[int, Any] = {
        Prop.MESSAGE_EXPIRY_INTERVAL: 10,
        Prop.TOPIC_ALIAS: 3,
        Prop.USER_PROPERTY: [("k", "v"), ("k", "w")],
        Prop.SUBSCRIPTION_IDENTIFIER: [200],
    }
    body = (
        b"\x02\x00\x00\x00\x0a"
        + b"\x23\x00\x03"
        + b"\x26\x00\x01k\x00\x01v"
        + b"\x26\x00\x01k\x00\x01w"
        + b"\x0b\xc8\x01"
    )
    assert encode_properties(props) == bytes((len(body),)) + body
    assert decode_block(bytes((len(body),)) + body, Ctx.PUBLISH) == props


def test_decode_stops_at_block_end() -> None:
    block = b"\x03\x23\x00\x07" + b"payload"
    props, pos = decode_properties(block, 0, len(block), Ctx.PUBLISH)
    assert props == {Prop.TOPIC_ALIAS: 7}
    assert pos == 4


@pytest.mark.parametrize(
    ("block", "ctx"),
    [
        (b"\x05\x02\x00\x00\x00", Ctx.PUBLISH),  # length runs past the packet
        (b"\x02\x02\x00", Ctx.PUBLISH),  # u32 truncated by the block length
        (b"\x01\x23", Ctx.PUBLISH),  # u16 with no bytes
        (b"\x01\x01", Ctx.PUBLISH),  # byte with no value
        (b"\x02\x0b\x80", Ctx.PUBLISH),  # varint runs past the block
        (b"\x01\x00", Ctx.PUBLISH),  # identifier 0 does not exist
        (b"\x01\x7f", Ctx.PUBLISH),  # unknown identifier
        (b"\x02\x80\x01", Ctx.PUBLISH),  # unknown multi-byte identifier
        (b"\x03\x03\x00\x05", Ctx.PUBLISH),  # string runs past the block
        (b"\x06\x03\x00\x03\xed\xa0\x80", Ctx.PUBLISH),  # surrogate in Content Type
        (b"\x05\x03\x00\x02\xc0\x80", Ctx.PUBLISH),  # overlong NUL
        (b"\x04\x03\x00\x01\x00", Ctx.PUBLISH),  # U+0000
        (b"\x05\x26\x00\x01k\x00", Ctx.PUBLISH),  # user property pair cut in the middle
        (b"\x04\x09\x00\x05a", Ctx.PUBLISH),  # binary runs past the block
        (b"\x80\x00", Ctx.PUBLISH),  # property length not minimal
        # An identifier not valid for the packet type is a Malformed Packet (MQTT 5 section 2.2.2.2).
        (b"\x03\x23\x00\x01", Ctx.CONNECT),
        (b"\x05\x11\x00\x00\x00\x01", Ctx.PUBLISH),
        (b"\x03\x22\x00\x01", Ctx.WILL),
        (b"\x05\x18\x00\x00\x00\x01", Ctx.CONNECT),
        (b"\x02\x0b\x01", Ctx.UNSUBSCRIBE),
        (b"\x02\x24\x01", Ctx.CONNECT),
    ],
)
def test_malformed_property_blocks(block: bytes, ctx: Ctx) -> None:
    with pytest.raises(MalformedPacket):
        decode_properties(block, 0, len(block), ctx)


@pytest.mark.parametrize(
    ("block", "ctx"),
    [
        (b"\x06\x23\x00\x01\x23\x00\x02", Ctx.PUBLISH),  # repeated non-repeatable property
        (b"\x02\x01\x02", Ctx.PUBLISH),  # payload format indicator 2
        (b"\x02\x17\x02", Ctx.CONNECT),  # request problem information 2
        (b"\x02\x19\x05", Ctx.CONNECT),  # request response information 5
        (b"\x02\x25\x02", Ctx.CONNACK),  # retain available 2
        (b"\x03\x21\x00\x00", Ctx.CONNECT),  # receive maximum 0
        (b"\x05\x27\x00\x00\x00\x00", Ctx.CONNECT),  # maximum packet size 0
        (b"\x02\x0b\x00", Ctx.SUBSCRIBE),  # subscription identifier 0
        (b"\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02", Ctx.CONNECT),  # session expiry twice
    ],
)
def test_protocol_errors_in_property_blocks(block: bytes, ctx: Ctx) -> None:
    with pytest.raises(ProtocolViolation):
        decode_properties(block, 0, len(block), ctx)


def test_topic_alias_zero_is_topic_alias_invalid() -> None:
    # MQTT 5 section 3.3.2.3.4: Topic Alias 0 -> DISCONNECT 0x94 (Topic Alias invalid).
    with pytest.raises(TopicAliasInvalid) as info:
        decode_properties(b"\x03\x23\x00\x00", 0, 4, Ctx.PUBLISH)
    assert info.value.reason_code == 0x94


def test_repeatable_properties_keep_order() -> None:
    block = encode_properties({Prop.USER_PROPERTY: [("b", "1"), ("a", "2"), ("b", "3")]})
    assert decode_block(block, Ctx.CONNECT)[Prop.USER_PROPERTY] == [("b", "1"), ("a", "2"), ("b", "3")]


@pytest.mark.parametrize("ctx", list(Ctx))
def test_user_property_allowed_everywhere(ctx: Ctx) -> None:
    block = encode_properties({Prop.USER_PROPERTY: [("", "")]})
    assert decode_block(block, ctx) == {Prop.USER_PROPERTY: [("", "")]}


def test_large_property_block_uses_multibyte_length() -> None:
    props: dict[int, Any] = {Prop.CORRELATION_DATA: bytes(range(256)) * 2}
    block = encode_properties(props)
    assert block[0] & 0x80
    assert decode_block(block, Ctx.PUBLISH) == props


# ---------------------------------------------------------------- round trips and the paho oracle


@FAST
@given(property_sets())
def test_properties_round_trip(case: tuple[Ctx, dict[int, Any]]) -> None:
    ctx, props = case
    block = encode_properties(props)
    assert decode_block(block, ctx) == props


@FAST
@given(property_sets())
def test_encoding_matches_paho(case: tuple[Ctx, dict[int, Any]]) -> None:
    ctx, props = case
    # paho writes properties in ascending identifier order, as property_sets() builds them.
    assert encode_properties(props) == to_paho(ctx, props).pack()


@FAST
@given(property_sets())
def test_paho_decodes_our_encoding(case: tuple[Ctx, dict[int, Any]]) -> None:
    ctx, props = case
    block = encode_properties(props)
    p = PahoProperties(PAHO_TYPE[ctx])
    _, used = p.unpack(block)
    assert used == len(block)
    assert from_paho(p) == props


@FAST
@given(property_sets())
def test_we_decode_paho_encoding(case: tuple[Ctx, dict[int, Any]]) -> None:
    ctx, props = case
    assert decode_block(to_paho(ctx, props).pack(), ctx) == props


@FAST
@given(property_sets(), st.randoms(use_true_random=False))
def test_property_order_does_not_matter(case: tuple[Ctx, dict[int, Any]], rnd: Any) -> None:
    ctx, props = case
    items = list(props.items())
    rnd.shuffle(items)
    assert decode_block(encode_properties(dict(items)), ctx) == props


def test_paho_example_publish_properties() -> None:
    p = PahoProperties(PacketTypes.PUBLISH)
    p.MessageExpiryInterval = 30
    p.ContentType = "application/json"
    p.ResponseTopic = "reply/to"
    p.CorrelationData = b"\x00\x01corr"
    p.UserProperty = [("a", "1"), ("b", "2")]
    p.SubscriptionIdentifier = 268_435_455
    p.PayloadFormatIndicator = 1
    p.TopicAlias = 65535
    props = decode_block(p.pack(), Ctx.PUBLISH)
    assert props == {
        Prop.PAYLOAD_FORMAT_INDICATOR: 1,
        Prop.MESSAGE_EXPIRY_INTERVAL: 30,
        Prop.CONTENT_TYPE: "application/json",
        Prop.RESPONSE_TOPIC: "reply/to",
        Prop.CORRELATION_DATA: b"\x00\x01corr",
        Prop.SUBSCRIPTION_IDENTIFIER: [268_435_455],
        Prop.TOPIC_ALIAS: 65535,
        Prop.USER_PROPERTY: [("a", "1"), ("b", "2")],
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.sampled_from(list(Ctx)))
def test_fuzz_property_blocks_only_raise_protocol_errors(data: bytes, ctx: Ctx) -> None:
    try:
        props, pos = decode_properties(data, 0, len(data), ctx)
    except ProtocolError:
        return
    assert pos <= len(data)
    # Whatever decodes must re-encode to an equivalent block.
    assert decode_block(encode_properties(props), ctx) == props
