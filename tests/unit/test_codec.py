"""Unit tests of broker.codec: the framer, every decoder and encoder, round trips, paho cross-checks, fuzzing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.mqtt.errors import (
    MalformedPacket,
    PacketTooLarge,
    ProtocolError,
    ProtocolViolation,
    TopicAliasInvalid,
    UnsupportedProtocol,
)
from broker.mqtt.framer import MQTT_MAX_PACKET, Framer
from broker.mqtt.packets import (
    PINGRESP,
    Ack,
    Connack,
    Connect,
    Disconnect,
    PacketType,
    Subscribe,
    Will,
    check_fixed_flags,
    decode_ack,
    decode_connack,
    decode_connect,
    decode_disconnect,
    decode_publish,
    decode_suback,
    decode_subscribe,
    decode_unsubscribe,
    encode_ack,
    encode_connack,
    encode_connect,
    encode_disconnect,
    encode_publish,
    encode_suback,
    encode_subscribe,
    encode_unsuback,
)
from broker.mqtt.primitives import encode_varint
from broker.mqtt.properties import Prop
from broker.mqtt.topics import split_shared, validate_topic_filter, validate_topic_name
from tests.support.mqtt_bytes import connect_raw, mstr, pkt, split_packets, subscribe_raw

# paho's Properties is untyped: go through Any so that typed tests may call it.
PahoProperties: Any = _PahoProperties

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def dec_connect(data: bytes) -> Connect:
    return decode_connect(data, 0, len(data))


def dec_publish(data: bytes, v5: bool) -> Any:
    return decode_publish(data, 0, len(data), v5)


def dec_subscribe(data: bytes, v5: bool) -> Subscribe:
    return decode_subscribe(data, 0, len(data), v5)


# ---------------------------------------------------------------- Framer

SAMPLE = [
    pkt(0x30, mstr("a/b") + b"hello"),
    pkt(0xC0, b""),
    pkt(0x32, mstr("t") + b"\x00\x01" + bytes(300)),  # two-byte remaining length
    pkt(0x82, b"\x00\x02" + mstr("x/#") + b"\x01"),
    pkt(0xE0, b""),
]


def test_framer_many_packets_in_one_feed() -> None:
    data = b"".join(SAMPLE)
    framer = Framer()
    chunk, ends = framer.feed(data)
    assert chunk == data
    expected, total = [], 0
    for p in SAMPLE:
        total += len(p)
        expected.append(total)
    assert ends == expected
    assert framer.buffered == 0


def test_framer_byte_by_byte() -> None:
    data = b"".join(SAMPLE)
    framer = Framer()
    got: list[bytes] = []
    for i in range(len(data)):
        got.extend(split_packets(data[i : i + 1], framer))
    assert got == SAMPLE
    assert framer.buffered == 0


def test_framer_keeps_partial_packet() -> None:
    framer = Framer()
    data = SAMPLE[0] + SAMPLE[2][:10]
    chunk, ends = framer.feed(data)
    assert chunk == SAMPLE[0]
    assert ends == [len(SAMPLE[0])]
    assert framer.buffered == 10
    chunk, ends = framer.feed(SAMPLE[2][10:])
    assert chunk == SAMPLE[2]
    assert ends == [len(SAMPLE[2])]


def test_framer_empty_and_single_byte_feeds() -> None:
    framer = Framer()
    assert framer.feed(b"") == (b"", [])
    assert framer.feed(b"\x30") == (b"", [])
    assert framer.buffered == 1
    assert framer.feed(b"\x00") == (b"\x30\x00", [2])


@st.composite
def packet_bytes(draw: st.DrawFn) -> bytes:
    first = draw(st.integers(0, 255))
    size = draw(st.one_of(st.integers(0, 130), st.integers(16_380, 16_390)))
    head = draw(st.binary(max_size=min(size, 16)))
    return pkt(first, head + bytes((draw(st.integers(0, 255)),)) * (size - len(head)))


@FAST
@given(st.lists(packet_bytes(), max_size=8), st.data())
def test_framer_random_chunking(packets: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    framer = Framer()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got.extend(split_packets(stream[prev:cut], framer))
        prev = cut
    assert got == packets
    assert framer.buffered == 0


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_framer_remaining_length_over_four_bytes(byte_by_byte: bool) -> None:
    data = b"\x30\xff\xff\xff\xff\x01" + bytes(10)
    framer = Framer()
    with pytest.raises(MalformedPacket):
        if byte_by_byte:
            for i in range(len(data)):
                framer.feed(data[i : i + 1])
        else:
            framer.feed(data)


def test_framer_remaining_length_not_minimal() -> None:
    # MQTT 5 section 1.5.5 [MQTT-1.5.5-1]: the minimum number of bytes.
    with pytest.raises(MalformedPacket):
        Framer().feed(b"\xc0\x80\x00")


def test_framer_largest_remaining_length_is_framed() -> None:
    framer = Framer()
    with pytest.raises(PacketTooLarge):
        Framer(1000).feed(b"\x30\xff\xff\xff\x7f")
    assert framer.feed(b"\x30\xff\xff\xff\x7f") == (b"", [])  # waits for 268435455 bytes
    assert MQTT_MAX_PACKET == 268_435_455 + 5


def test_framer_too_large_from_fixed_header_only() -> None:
    framer = Framer(max_packet_size=100)
    with pytest.raises(PacketTooLarge) as info:
        framer.feed(b"\x30" + encode_varint(200))  # no body byte fed at all
    assert info.value.reason_code == 0x95


def test_framer_too_large_header_fed_byte_by_byte() -> None:
    framer = Framer(max_packet_size=100)
    assert framer.feed(b"\x30") == (b"", [])
    assert framer.feed(b"\xc8") == (b"", [])  # remaining length still incomplete
    with pytest.raises(PacketTooLarge):
        framer.feed(b"\x01")


def test_framer_too_large_after_a_good_packet() -> None:
    """The good packet before the bad header is handed out; the error waits in `framer.error`."""
    framer = Framer(max_packet_size=100)
    good = pkt(0xC0, b"")
    chunk, ends = framer.feed(good + b"\x30\x7f")
    assert (chunk, ends) == (good, [len(good)])
    assert isinstance(framer.error, PacketTooLarge)


def test_framer_max_size_boundary() -> None:
    limit = 100
    at_limit = pkt(0x30, mstr("t") + bytes(limit - 2 - 3))
    assert len(at_limit) == limit
    assert split_packets(at_limit, Framer(limit)) == [at_limit]
    over = pkt(0x30, mstr("t") + bytes(limit - 2 - 3 + 1))
    with pytest.raises(PacketTooLarge):
        Framer(limit).feed(over[:2])
    # The limit counts the fixed header: a 3-byte header moves the boundary.
    big = 200
    at_big = pkt(0x30, mstr("t") + bytes(big - 3 - 3))
    assert len(at_big) == big
    assert split_packets(at_big, Framer(big)) == [at_big]
    with pytest.raises(PacketTooLarge):
        Framer(big - 1).feed(at_big[:3])


# ---------------------------------------------------------------- fixed header flags


@pytest.mark.parametrize("ptype", [t for t in PacketType if t != PacketType.PUBLISH])
def test_check_fixed_flags(ptype: PacketType) -> None:
    required = 2 if ptype in (PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE) else 0
    assert check_fixed_flags((ptype << 4) | required, True) == ptype
    for flags in range(16):
        if flags != required:
            with pytest.raises(MalformedPacket):
                check_fixed_flags((ptype << 4) | flags, True)


def test_check_fixed_flags_type_zero_and_auth() -> None:
    with pytest.raises(MalformedPacket):
        check_fixed_flags(0x00, True)
    with pytest.raises(MalformedPacket):
        check_fixed_flags(0x00, False)
    with pytest.raises(MalformedPacket):
        check_fixed_flags(0xF0, False)
    assert check_fixed_flags(0xF0, True) == PacketType.AUTH


# ---------------------------------------------------------------- CONNECT


def test_connect_v311_minimal() -> None:
    c = dec_connect(connect_raw())
    assert c == Connect(level=4, clean_start=True, keepalive=60, client_id="cid")
    assert not c.v5
    assert c.will is None and c.username is None and c.password is None


def test_connect_v311_every_flag() -> None:
    flags = 0x80 | 0x40 | 0x20 | 0x10 | 0x04 | 0x02  # user, password, will retain, will QoS 2, will, clean
    payload = mstr("cid") + mstr("will/t") + mstr(b"\x00bye") + mstr("user") + mstr(b"\xffpw")
    c = dec_connect(connect_raw(flags=flags, keepalive=0xFFFF, payload=payload))
    assert c.clean_start and c.keepalive == 0xFFFF
    assert c.will == Will("will/t", b"\x00bye", 2, True, {})
    assert c.username == "user"
    assert c.password == b"\xffpw"


@pytest.mark.parametrize("will_qos", [0, 1, 2])
def test_connect_will_qos(will_qos: int) -> None:
    c = dec_connect(connect_raw(flags=0x04 | (will_qos << 3), payload=mstr("c") + mstr("t") + mstr("")))
    assert c.will is not None and c.will.qos == will_qos and not c.will.retain
    assert not c.clean_start


def test_connect_v5_with_properties_and_will_properties() -> None:
    props = b"\x05\x11\x00\x00\x01\x00"  # session expiry 256
    will_props = b"\x0c\x18\x00\x00\x00\x05\x03\x00\x04text"  # will delay 5, content type
    payload = mstr("cid") + will_props + mstr("w") + mstr(b"payload") + mstr("u") + mstr(b"p")
    c = dec_connect(connect_raw(level=5, flags=0xC4 | 0x08, props=props, payload=payload))
    assert c.v5
    assert c.properties == {Prop.SESSION_EXPIRY_INTERVAL: 256}
    assert c.will == Will("w", b"payload", 1, False, {Prop.WILL_DELAY_INTERVAL: 5, Prop.CONTENT_TYPE: "text"})
    assert (c.username, c.password) == ("u", b"p")


def test_connect_password_without_username() -> None:
    payload = mstr("cid") + mstr(b"secret")
    with pytest.raises(MalformedPacket):
        dec_connect(connect_raw(level=4, flags=0x42, payload=payload))
    c = dec_connect(connect_raw(level=5, flags=0x42, payload=payload))
    assert c.username is None and c.password == b"secret"


def test_connect_username_without_password() -> None:
    c = dec_connect(connect_raw(flags=0x82, payload=mstr("cid") + mstr("user")))
    assert c.username == "user" and c.password is None


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(
    ("flags", "payload"),
    [
        (0x03, mstr("cid")),  # reserved flag bit
        (0x1E, mstr("cid") + mstr("t") + mstr("")),  # will QoS 3
        (0x08, mstr("cid")),  # will QoS without the will flag
        (0x10, mstr("cid")),
        (0x20, mstr("cid")),  # will retain without the will flag
        (0x02, mstr("cid") + b"\x00"),  # trailing byte
        (0x82, mstr("cid") + mstr("user") + b"xx"),  # trailing bytes after username
        (0x02, mstr(b"c\xed\xa0\x80")),  # surrogate in client id
        (0x02, mstr(b"c\x00")),  # U+0000 in client id
        (0x82, mstr("cid") + mstr(b"\xc0\x80")),  # overlong NUL in username
        (0x06, mstr("cid") + mstr(b"\xff") + mstr("")),  # invalid UTF-8 will topic
        (0xC2, mstr("cid") + mstr("u")),  # password flag, password missing
    ],
)
def test_connect_malformed(level: int, flags: int, payload: bytes) -> None:
    props = b"\x00"
    if level == 5 and flags & 0x04:
        payload = payload[:5] + b"\x00" + payload[5:]  # will properties after "cid"
    with pytest.raises(MalformedPacket) as info:
        dec_connect(connect_raw(level=level, flags=flags, props=props, payload=payload))
    assert info.value.reason_code == 0x81


def test_connect_reserved_fixed_header_flags() -> None:
    with pytest.raises(MalformedPacket):
        dec_connect(connect_raw(first=0x12))


@pytest.mark.parametrize("will_topic", ["", "a/+", "a/#"])
def test_connect_invalid_will_topic(will_topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        dec_connect(connect_raw(flags=0x06, payload=mstr("cid") + mstr(will_topic) + mstr("")))
    assert info.value.reason_code in (0x81, 0x82)


@pytest.mark.parametrize(
    ("props", "error"),
    [
        (b"\x03\x23\x00\x01", MalformedPacket),  # Topic Alias is not a CONNECT property
        (b"\x06\x21\x00\x01\x21\x00\x02", ProtocolViolation),  # Receive Maximum twice
        (b"\x03\x21\x00\x00", ProtocolViolation),  # Receive Maximum 0
        (b"\x05\x11\x00\x00", MalformedPacket),  # property length runs past the packet
    ],
)
def test_connect_v5_bad_properties(props: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        dec_connect(connect_raw(level=5, props=props))


def _full_connect(level: int) -> bytes:
    will_props: dict[int, Any] = {Prop.WILL_DELAY_INTERVAL: 3} if level == 5 else {}
    return encode_connect(
        Connect(
            level=level,
            clean_start=True,
            keepalive=30,
            client_id="client-1",
            properties={Prop.SESSION_EXPIRY_INTERVAL: 60, Prop.USER_PROPERTY: [("k", "v")]} if level == 5 else {},
            will=Will("will/topic", b"gone", 1, True, will_props),
            username="user",
            password=b"pass",
        )
    )


@pytest.mark.parametrize("level", [4, 5])
def test_connect_truncated_at_every_length(level: int) -> None:
    full = _full_connect(level)
    body = full[2:]  # remaining length < 128
    assert full[1] == len(body)
    assert dec_connect(full).username == "user"
    for cut in range(len(body)):
        truncated = pkt(0x10, body[:cut])
        with pytest.raises(MalformedPacket):
            dec_connect(truncated)
        # Same thing when the decoder is given a shorter end inside a longer buffer.
        with pytest.raises(MalformedPacket):
            decode_connect(truncated + b"\x00" * 8, 0, len(truncated))


@pytest.mark.parametrize(
    ("name", "level", "v5_format"),
    [
        (b"MQIsdp", 3, False),
        (b"MQTT", 0x84, False),  # bridge bit on 3.1.1
        (b"MQTT", 0x85, True),  # bridge bit on 5.0
        (b"MQTT", 6, False),
        (b"MQTT", 3, False),
        (b"MQTT", 0, False),
        (b"MQTX", 4, False),
        (b"MQTX", 5, True),
        (b"mqtt", 4, False),
        (b"\xff\xfe", 4, False),
    ],
)
def test_connect_unsupported_protocol(name: bytes, level: int, v5_format: bool) -> None:
    data = connect_raw(name=name, level=level)
    with pytest.raises(UnsupportedProtocol) as info:
        dec_connect(data)
    assert info.value.v5_format is v5_format
    assert info.value.reason_code == 0x84
    assert isinstance(info.value, ProtocolError)


def test_connect_level_3_mqisdp_real_packet() -> None:
    # What an MQTT 3.1 client sends: MQIsdp, level 3.
    data = pkt(0x10, mstr("MQIsdp") + b"\x03\x02\x00\x3c" + mstr("old"))
    with pytest.raises(UnsupportedProtocol) as info:
        dec_connect(data)
    assert info.value.v5_format is False


@FAST
@given(
    st.builds(
        lambda level, clean, keepalive, cid, props, will, username, password: Connect(
            level=level,
            clean_start=clean,
            keepalive=keepalive,
            client_id=cid,
            properties=props if level == 5 else {},
            will=None if will is None else Will(will[0], will[1], will[2], will[3], will[4] if level == 5 else {}),
            username=username,
            password=password if (username is not None or level == 5) else None,
        ),
        st.sampled_from([4, 5]),
        st.booleans(),
        st.integers(0, 0xFFFF),
        st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=23),
        st.fixed_dictionaries(
            {},
            optional={
                Prop.SESSION_EXPIRY_INTERVAL: st.integers(0, 2**32 - 1),
                Prop.RECEIVE_MAXIMUM: st.integers(1, 0xFFFF),
                Prop.MAXIMUM_PACKET_SIZE: st.integers(1, 2**32 - 1),
                Prop.TOPIC_ALIAS_MAXIMUM: st.integers(0, 0xFFFF),
                Prop.REQUEST_PROBLEM_INFORMATION: st.integers(0, 1),
                Prop.USER_PROPERTY: st.lists(st.tuples(st.just("k"), st.text("abc")), min_size=1, max_size=3),
            },
        ),
        st.none()
        | st.tuples(
            st.text("ab/$ ", min_size=1, max_size=10),
            st.binary(max_size=20),
            st.integers(0, 2),
            st.booleans(),
            st.fixed_dictionaries({}, optional={Prop.WILL_DELAY_INTERVAL: st.integers(0, 100)}),
        ),
        st.none() | st.text("abc:@", max_size=10),
        st.none() | st.binary(max_size=10),
    )
)
def test_connect_round_trip(c: Connect) -> None:
    data = encode_connect(c)
    assert dec_connect(data) == c
    assert split_packets(data) == [data]


# ---------------------------------------------------------------- CONNACK


def test_connack_v311() -> None:
    assert decode_connack(b"\x20\x02\x01\x00", 0, 4, False) == Connack(True, 0, {})
    assert decode_connack(b"\x20\x02\x00\x05", 0, 4, False) == Connack(False, 5, {})


def test_connack_v5() -> None:
    data = b"\x20\x08\x00\x00\x05\x22\x00\x0a\x25\x01"
    assert decode_connack(data, 0, len(data), True) == Connack(
        False, 0, {Prop.TOPIC_ALIAS_MAXIMUM: 10, Prop.RETAIN_AVAILABLE: 1}
    )
    # Tolerated: a v5 CONNACK without its property length.
    assert decode_connack(b"\x20\x02\x00\x00", 0, 4, True) == Connack(False, 0, {})


@pytest.mark.parametrize(
    ("data", "v5"),
    [
        (b"\x20\x01\x00", False),  # truncated
        (b"\x20\x00", True),
        (b"\x20\x02\x02\x00", False),  # reserved acknowledge flags
        (b"\x20\x02\x80\x00", True),
        (b"\x20\x03\x00\x00\x00", False),  # trailing byte in 3.1.1
        (b"\x20\x04\x00\x00\x00\x00", True),  # trailing byte after v5 properties
        (b"\x20\x04\x00\x00\x05\x00", True),  # property length past the packet
        (b"\x20\x06\x00\x00\x03\x23\x00\x01", True),  # Topic Alias not allowed in CONNACK
    ],
)
def test_connack_malformed(data: bytes, v5: bool) -> None:
    with pytest.raises(MalformedPacket):
        decode_connack(data, 0, len(data), v5)


@FAST
@given(
    st.booleans(),
    st.booleans(),
    st.integers(0, 255),
    st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            Prop.MAXIMUM_PACKET_SIZE: st.integers(1, 2**32 - 1),
            Prop.ASSIGNED_CLIENT_IDENTIFIER: st.text("abc-:", max_size=20),
            Prop.TOPIC_ALIAS_MAXIMUM: st.integers(0, 0xFFFF),
            Prop.REASON_STRING: st.text("xyz ", max_size=20),
            Prop.MAXIMUM_QOS: st.integers(0, 1),
        },
    ),
)
def test_connack_round_trip(v5: bool, session_present: bool, code: int, props: dict[int, Any] | None) -> None:
    data = encode_connack(v5, session_present, code, props)
    expected = Connack(session_present, code, (props or {}) if v5 else {})
    assert decode_connack(data, 0, len(data), v5) == expected


# ---------------------------------------------------------------- PUBLISH


def test_publish_v311_qos0() -> None:
    data = pkt(0x30, mstr("a/b") + b"payload")
    pub = dec_publish(data, False)
    assert (pub.qos, pub.retain, pub.dup, pub.topic, pub.packet_id, pub.properties) == (0, False, False, "a/b", 0, None)
    assert data[pub.payload_start :] == b"payload"


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("retain", [False, True])
def test_publish_flags(qos: int, dup: bool, retain: bool) -> None:
    first = 0x30 | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    data = pkt(first, mstr("t/\u00e9") + b"\x12\x34" + b"")
    pub = dec_publish(data, False)
    assert (pub.qos, pub.dup, pub.retain, pub.packet_id, pub.topic) == (qos, dup, retain, 0x1234, "t/\u00e9")
    assert pub.payload_start == len(data)


def test_publish_v5_properties_and_topic_alias() -> None:
    props = b"\x0c\x23\x00\x05\x02\x00\x00\x00\x3c\x01\x01\x0b\x05"
    data = pkt(0x33, mstr("a/b") + b"\x00\x07" + props + b"data")
    pub = dec_publish(data, True)
    assert pub.qos == 1 and pub.retain and pub.packet_id == 7
    assert pub.properties == {
        Prop.TOPIC_ALIAS: 5,
        Prop.MESSAGE_EXPIRY_INTERVAL: 60,
        Prop.PAYLOAD_FORMAT_INDICATOR: 1,
        Prop.SUBSCRIPTION_IDENTIFIER: [5],
    }
    assert data[pub.payload_start :] == b"data"
    # An empty topic is fine when a Topic Alias stands for it.
    aliased = pkt(0x30, mstr("") + b"\x03\x23\x00\x05" + b"x")
    pub = dec_publish(aliased, True)
    assert pub.topic == "" and pub.properties == {Prop.TOPIC_ALIAS: 5}


def test_publish_v5_empty_properties() -> None:
    pub = dec_publish(pkt(0x30, mstr("t") + b"\x00"), True)
    assert pub.properties == {}
    assert pub.payload_start == 6


def test_publish_decoded_at_an_offset() -> None:
    first = pkt(0xC0, b"")
    second = pkt(0x32, mstr("x") + b"\x00\x09" + b"pl")
    buf = first + second + pkt(0xE0, b"")
    pub = decode_publish(buf, len(first), len(first) + len(second), False)
    assert pub.topic == "x" and pub.packet_id == 9
    assert buf[pub.payload_start : len(first) + len(second)] == b"pl"


def test_publish_with_long_remaining_length() -> None:
    data = pkt(0x30, mstr("big") + bytes(70_000))
    pub = dec_publish(data, False)
    assert pub.topic == "big" and len(data) - pub.payload_start == 70_000


@pytest.mark.parametrize(
    ("data", "v5", "error", "code"),
    [
        (pkt(0x36, mstr("t") + b"\x00\x01"), False, MalformedPacket, 0x81),  # QoS 3
        (pkt(0x37, mstr("t") + b"\x00\x01\x00"), True, MalformedPacket, 0x81),
        (pkt(0x38, mstr("t")), False, MalformedPacket, 0x81),  # DUP on QoS 0
        (pkt(0x30, mstr("a/+")), False, ProtocolError, None),  # wildcards
        (pkt(0x30, mstr("a/#") + b"\x00"), True, ProtocolError, None),
        (pkt(0x30, mstr("#")), False, ProtocolError, None),
        (pkt(0x30, mstr(b"a\xed\xa0\x80")), False, MalformedPacket, 0x81),  # encoded surrogate
        (pkt(0x30, mstr(b"a\xc0\x80")), False, MalformedPacket, 0x81),  # overlong NUL
        (pkt(0x30, mstr(b"\xff")), True, MalformedPacket, 0x81),
        (pkt(0x30, mstr(b"a\x00b")), False, MalformedPacket, 0x81),  # U+0000
        (pkt(0x32, mstr("t") + b"\x00\x00"), False, ProtocolViolation, 0x82),  # packet id 0
        (pkt(0x34, mstr("t") + b"\x00\x00\x00"), True, ProtocolViolation, 0x82),
        (pkt(0x30, mstr("")), False, ProtocolViolation, 0x82),  # empty topic
        (pkt(0x30, mstr("") + b"\x00"), True, ProtocolViolation, 0x82),  # empty topic, no alias
        (pkt(0x30, b""), False, MalformedPacket, 0x81),  # no topic at all
        (pkt(0x30, b"\x00"), False, MalformedPacket, 0x81),
        (pkt(0x30, b"\x00\x05ab"), False, MalformedPacket, 0x81),  # topic past the packet
        (pkt(0x32, mstr("t") + b"\x00"), False, MalformedPacket, 0x81),  # packet id cut
        (pkt(0x30, mstr("t")), True, MalformedPacket, 0x81),  # property length missing
        (pkt(0x30, mstr("t") + b"\x05\x02"), True, MalformedPacket, 0x81),  # properties past the packet
        (pkt(0x30, mstr("t") + b"\x03\x11\x00\x01"), True, MalformedPacket, 0x81),  # CONNECT property
        (pkt(0x30, mstr("t") + b"\x03\x23\x00\x00"), True, TopicAliasInvalid, 0x94),  # topic alias 0
    ],
)
def test_publish_invalid(data: bytes, v5: bool, error: type[ProtocolError], code: int | None) -> None:
    with pytest.raises(error) as info:
        dec_publish(data, v5)
    if code is not None:
        assert info.value.reason_code == code
    else:
        assert info.value.reason_code in (0x81, 0x82)


_any_text = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=5)
_topic_text = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00+#"), min_size=1, max_size=30)
_publish_props = st.fixed_dictionaries(
    {},
    optional={
        Prop.PAYLOAD_FORMAT_INDICATOR: st.integers(0, 1),
        Prop.MESSAGE_EXPIRY_INTERVAL: st.integers(0, 2**32 - 1),
        Prop.CONTENT_TYPE: st.text("abc/", max_size=10),
        Prop.RESPONSE_TOPIC: st.text("ab/", min_size=1, max_size=10),
        Prop.CORRELATION_DATA: st.binary(max_size=16),
        Prop.TOPIC_ALIAS: st.integers(1, 0xFFFF),
        Prop.SUBSCRIPTION_IDENTIFIER: st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
        Prop.USER_PROPERTY: st.lists(st.tuples(_any_text, _any_text), min_size=1, max_size=3),
    },
)


@FAST
@given(
    st.booleans(),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    _topic_text,
    st.integers(1, 0xFFFF),
    _publish_props,
    st.binary(max_size=300),
)
def test_publish_round_trip(
    v5: bool, qos: int, retain: bool, dup: bool, topic: str, packet_id: int, props: dict[int, Any], payload: bytes
) -> None:
    dup = dup and qos > 0
    packet_id = packet_id if qos else 0
    data = encode_publish(qos, retain, dup, topic, packet_id, props if v5 else None, payload)
    pub = dec_publish(data, v5)
    assert (pub.qos, pub.retain, pub.dup, pub.topic, pub.packet_id) == (qos, retain, dup, topic, packet_id)
    assert pub.properties == (props if v5 else None)
    assert data[pub.payload_start :] == payload
    assert split_packets(data) == [data]


# ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE


def test_subscribe_v311() -> None:
    data = subscribe_raw([("a/b", 0), ("a/+/c", 1), ("#", 2), ("$share/g/x/#", 1)], v5=False, packet_id=10)
    sub = dec_subscribe(data, False)
    assert sub == Subscribe(10, [("a/b", 0), ("a/+/c", 1), ("#", 2), ("$share/g/x/#", 1)], None)


def test_subscribe_v5_options_and_properties() -> None:
    options = 0x02 | 0x04 | 0x08 | 0x20  # QoS 2, no local, retain as published, retain handling 2
    data = subscribe_raw([("a/b", options), ("c", 0x10)], v5=True, props=b"\x02\x0b\x2a")
    sub = dec_subscribe(data, True)
    assert sub.filters == [("a/b", options), ("c", 0x10)]
    assert sub.properties == {Prop.SUBSCRIPTION_IDENTIFIER: [42]}


@pytest.mark.parametrize("filt", ["+", "#", "a/+/b", "+/+", "/", "a//b", "a/#", "/#", "+/#", "$SYS/#", "\u00e9/+"])
def test_subscribe_valid_filters(filt: str) -> None:
    assert dec_subscribe(subscribe_raw([(filt, 1)], v5=True), True).filters == [(filt, 1)]
    validate_topic_filter(filt)


@pytest.mark.parametrize(
    "filt",
    [
        "",
        "a/#/b",
        "#/a",
        "a+",
        "a#",
        "+a",
        "a/b#",
        "a/+b/c",
        "##",
        "++",
        "$share/g",
        "$share//a",
        "$share/g/",
        "$share/g+/a",
        "$share/g#/a",
        "$share/g/a#",
        "$share/g/#/a",
    ],
)
@pytest.mark.parametrize("v5", [False, True])
def test_subscribe_invalid_filters(filt: str, v5: bool) -> None:
    with pytest.raises(ProtocolViolation):
        dec_subscribe(subscribe_raw([("ok", 0), (filt, 0)], v5=v5), v5)


@pytest.mark.parametrize(
    ("options", "v5", "error"),
    [
        (0x04, False, MalformedPacket),  # reserved bits in 3.1.1
        (0x80, False, MalformedPacket),
        (0x40, True, MalformedPacket),  # reserved bits in 5.0
        (0x80, True, MalformedPacket),
        (0x03, False, MalformedPacket),  # QoS 3: malformed in 3.1.1 ...
        (0x03, True, ProtocolViolation),  # ... a Protocol Error in 5.0 (section 3.8.3.1)
        (0x30, True, ProtocolViolation),  # retain handling 3
    ],
)
def test_subscribe_bad_options(options: int, v5: bool, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        dec_subscribe(subscribe_raw([("a", options)], v5=v5), v5)


def test_subscribe_no_local_on_shared() -> None:
    with pytest.raises(ProtocolViolation):
        dec_subscribe(subscribe_raw([("$share/g/a", 0x04)], v5=True), True)
    # Without no-local it is fine, and "$sharex" is not a shared subscription.
    assert dec_subscribe(subscribe_raw([("$share/g/a", 0x01)], v5=True), True).filters == [("$share/g/a", 1)]
    assert dec_subscribe(subscribe_raw([("$sharex/a", 0x04)], v5=True), True).filters == [("$sharex/a", 4)]


@pytest.mark.parametrize("v5", [False, True])
def test_subscribe_structural_errors(v5: bool) -> None:
    with pytest.raises(ProtocolViolation):  # no filters
        dec_subscribe(subscribe_raw([], v5=v5), v5)
    with pytest.raises(ProtocolViolation):  # packet id 0
        dec_subscribe(subscribe_raw([("a", 0)], v5=v5, packet_id=0), v5)
    with pytest.raises(MalformedPacket):  # options byte missing
        dec_subscribe(pkt(0x82, b"\x00\x01" + (b"\x00" if v5 else b"") + mstr("a")), v5)
    with pytest.raises(MalformedPacket):  # filter runs past the packet
        dec_subscribe(pkt(0x82, b"\x00\x01" + (b"\x00" if v5 else b"") + b"\x00\x09ab"), v5)
    with pytest.raises(MalformedPacket):  # invalid UTF-8 in a filter
        dec_subscribe(subscribe_raw([(b"\xed\xa0\x80", 0)], v5=v5), v5)
    with pytest.raises(MalformedPacket):  # truncated packet id
        dec_subscribe(pkt(0x82, b"\x00"), v5)


def test_subscribe_v5_property_errors() -> None:
    with pytest.raises(ProtocolViolation):  # Subscription Identifier 0
        dec_subscribe(subscribe_raw([("a", 0)], v5=True, props=b"\x02\x0b\x00"), True)
    with pytest.raises(ProtocolViolation):  # twice (MQTT 5 section 3.8.2.1.2)
        dec_subscribe(subscribe_raw([("a", 0)], v5=True, props=b"\x04\x0b\x01\x0b\x02"), True)
    with pytest.raises(MalformedPacket):  # a PUBLISH-only property
        dec_subscribe(subscribe_raw([("a", 0)], v5=True, props=b"\x03\x23\x00\x01"), True)


_filter_text = (
    st.lists(st.one_of(st.just("+"), st.text("abc$", max_size=4)), min_size=1, max_size=4).map("/".join).filter(bool)
)


@FAST
@given(
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.lists(
        st.tuples(
            st.one_of(_filter_text, _filter_text.map(lambda f: f + "/#"), st.just("#")),
            st.integers(0, 2),
            st.integers(0, 7),
        ),
        min_size=1,
        max_size=5,
    ),
    st.none() | st.fixed_dictionaries({}, optional={Prop.SUBSCRIPTION_IDENTIFIER: st.integers(1, 268_435_455)}),
)
def test_subscribe_round_trip(
    v5: bool, packet_id: int, raw: list[tuple[str, int, int]], props: dict[int, Any] | None
) -> None:
    filters = [(f, qos | ((extra << 2) if v5 else 0)) for f, qos, extra in raw]
    filters = [(f, o) for f, o in filters if (o >> 4) & 3 != 3]
    if not filters:
        return
    sub_props = None
    if v5:
        sub_props = {k: [v] for k, v in (props or {}).items()}
    sub = Subscribe(packet_id, filters, sub_props)
    data = encode_subscribe(sub, v5)
    assert dec_subscribe(data, v5) == Subscribe(packet_id, filters, sub_props if v5 else None)
    assert split_packets(data) == [data]


def test_unsubscribe() -> None:
    data = pkt(0xA2, b"\x00\x05" + mstr("a/+") + mstr("$share/g/#"))
    assert decode_unsubscribe(data, 0, len(data), False).filters == ["a/+", "$share/g/#"]
    data5 = pkt(0xA2, b"\x00\x05" + b"\x05\x26\x00\x00\x00\x00" + mstr("a"))
    unsub = decode_unsubscribe(data5, 0, len(data5), True)
    assert unsub.packet_id == 5 and unsub.filters == ["a"] and unsub.properties == {Prop.USER_PROPERTY: [("", "")]}


@pytest.mark.parametrize(
    ("body", "v5", "error"),
    [
        (b"\x00\x05", False, ProtocolViolation),  # no filters
        (b"\x00\x05\x00", True, ProtocolViolation),
        (b"\x00\x00" + mstr("a"), False, ProtocolViolation),  # packet id 0
        (b"\x00\x05" + mstr(""), False, ProtocolViolation),  # empty filter
        (b"\x00\x05" + mstr("a/#/b"), False, ProtocolViolation),
        (b"\x00\x05" + mstr(b"\xc0\x80"), False, MalformedPacket),
        (b"\x00\x05" + b"\x00\x04ab", False, MalformedPacket),
        (b"\x00", False, MalformedPacket),
        (b"\x00\x05\x03\x0b\x01", True, MalformedPacket),  # Subscription Identifier not allowed; runs past
        (b"\x00\x05\x02\x0b\x01" + mstr("a"), True, MalformedPacket),  # Subscription Identifier not allowed
    ],
)
def test_unsubscribe_invalid(body: bytes, v5: bool, error: type[ProtocolError]) -> None:
    data = pkt(0xA2, body)
    with pytest.raises(error):
        decode_unsubscribe(data, 0, len(data), v5)


# ---------------------------------------------------------------- SUBACK / UNSUBACK


def test_suback_and_unsuback() -> None:
    assert decode_suback(b"\x90\x04\x00\x07\x00\x80", 0, 6, False) == decode_suback(
        encode_suback(False, 7, [0, 0x80]), 0, 6, False
    )
    data = encode_unsuback(True, 9, [0x00, 0x11], {Prop.REASON_STRING: "r"})
    assert data[0] == 0xB0
    assert decode_suback(data, 0, len(data), True).reason_codes == [0x00, 0x11]
    assert decode_suback(data, 0, len(data), True).properties == {Prop.REASON_STRING: "r"}
    v3 = encode_unsuback(False, 9, [0x00])
    assert v3 == b"\xb0\x02\x00\x09"
    assert decode_suback(v3, 0, len(v3), False).reason_codes == []


@FAST
@given(
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.lists(st.sampled_from([0, 1, 2, 0x80, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]), min_size=1, max_size=10),
    st.none() | st.fixed_dictionaries({}, optional={Prop.REASON_STRING: st.text("ab", max_size=5)}),
)
def test_suback_round_trip(v5: bool, packet_id: int, codes: list[int], props: dict[int, Any] | None) -> None:
    data = encode_suback(v5, packet_id, codes, props)
    suback = decode_suback(data, 0, len(data), v5)
    assert suback.packet_id == packet_id and suback.reason_codes == codes
    assert suback.properties == ((props or {}) if v5 else None)


# ---------------------------------------------------------------- PUBACK / PUBREC / PUBREL / PUBCOMP

ACK_TYPES = [PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP]


def test_ack_forms() -> None:
    assert decode_ack(b"\x40\x02\x00\x07", 0, 4, False) == Ack(7)
    assert decode_ack(b"\x40\x02\x00\x07", 0, 4, True) == Ack(7, 0, None)
    assert decode_ack(b"\x40\x03\x00\x07\x87", 0, 5, True) == Ack(7, 0x87, None)
    assert decode_ack(b"\x40\x04\x00\x07\x10\x00", 0, 6, True) == Ack(7, 0x10, {})
    data = b"\x40\x08\x00\x07\x87\x04\x1f\x00\x01x"
    assert decode_ack(data, 0, len(data), True) == Ack(7, 0x87, {Prop.REASON_STRING: "x"})
    assert encode_ack(PacketType.PUBREL, False, 3) == b"\x62\x02\x00\x03"
    assert encode_ack(PacketType.PUBACK, True, 3, 0x87) == b"\x40\x03\x00\x03\x87"


@pytest.mark.parametrize(
    ("data", "v5", "error"),
    [
        (b"\x40\x03\x00\x07\x00", False, MalformedPacket),  # v3.1.1 acks are exactly 2 bytes
        (b"\x40\x01\x00", False, MalformedPacket),
        (b"\x40\x01\x00", True, MalformedPacket),
        (b"\x40\x00", True, MalformedPacket),
        (b"\x40\x02\x00\x00", False, ProtocolViolation),  # packet id 0
        (b"\x40\x02\x00\x00", True, ProtocolViolation),
        (b"\x40\x05\x00\x07\x00\x00\x00", True, MalformedPacket),  # trailing byte after properties
        (b"\x40\x05\x00\x07\x00\x05\x1f", True, MalformedPacket),  # properties past the packet
        (b"\x40\x07\x00\x07\x00\x03\x23\x00\x01", True, MalformedPacket),  # Topic Alias in an ack
    ],
)
def test_ack_invalid(data: bytes, v5: bool, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        decode_ack(data, 0, len(data), v5)


@FAST
@given(
    st.sampled_from(ACK_TYPES),
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.sampled_from([0, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x92, 0x97, 0x99]),
    st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            Prop.REASON_STRING: st.text("abc", max_size=8),
            Prop.USER_PROPERTY: st.lists(
                st.tuples(st.text("k", max_size=2), st.text("v", max_size=2)), min_size=1, max_size=2
            ),
        },
    ),
)
def test_ack_round_trip(ptype: PacketType, v5: bool, packet_id: int, code: int, props: dict[int, Any] | None) -> None:
    if not v5:
        code, props = 0, None
    data = encode_ack(ptype, v5, packet_id, code, props)
    assert data[0] >> 4 == ptype
    assert check_fixed_flags(data[0], v5) == ptype
    ack = decode_ack(data, 0, len(data), v5)
    assert ack.packet_id == packet_id and ack.reason_code == code
    assert (ack.properties or None) == (props or None)


# ---------------------------------------------------------------- DISCONNECT, PINGRESP


def test_disconnect() -> None:
    assert decode_disconnect(b"\xe0\x00", 0, 2, False) == Disconnect()
    assert decode_disconnect(b"\xe0\x00", 0, 2, True) == Disconnect(0, None)
    assert decode_disconnect(b"\xe0\x01\x04", 0, 3, True) == Disconnect(4, None)
    data = b"\xe0\x07\x00\x05\x11\x00\x00\x00\x0a"
    assert decode_disconnect(data, 0, len(data), True) == Disconnect(0, {Prop.SESSION_EXPIRY_INTERVAL: 10})
    out = encode_disconnect(0x94, "alias")
    assert decode_disconnect(out, 0, len(out), True) == Disconnect(0x94, {Prop.REASON_STRING: "alias"})
    assert encode_disconnect(0x81) == b"\xe0\x02\x81\x00"
    assert PINGRESP == b"\xd0\x00"


@pytest.mark.parametrize(
    ("data", "v5"),
    [
        (b"\xe0\x01\x00", False),
        (b"\xe0\x04\x00\x00\x00\x00", True),  # trailing after properties
        (b"\xe0\x03\x00\x05\x11", True),  # properties past the packet
        (b"\xe0\x05\x00\x03\x23\x00\x01", True),  # Topic Alias in DISCONNECT
    ],
)
def test_disconnect_invalid(data: bytes, v5: bool) -> None:
    with pytest.raises(MalformedPacket):
        decode_disconnect(data, 0, len(data), v5)


# ---------------------------------------------------------------- topic helpers


def test_validate_topic_name() -> None:
    validate_topic_name("a/b/c")
    validate_topic_name("$SYS/x")
    for bad in ("+", "a/+", "#", "a/#", "a#b"):
        with pytest.raises(ProtocolError):
            validate_topic_name(bad)


def test_split_shared() -> None:
    assert split_shared("a/b") == (None, "a/b")
    assert split_shared("$share/g/a/b") == ("g", "a/b")
    assert split_shared("$share/g/#") == ("g", "#")
    assert split_shared("$sharegroup/a") == (None, "$sharegroup/a")
    for bad in ("$share/", "$share/g", "$share//a", "$share/g/", "$share/+/a", "$share/#/a"):
        with pytest.raises(ProtocolViolation):
            split_shared(bad)


# ---------------------------------------------------------------- cross-checks against paho-mqtt


class _FakeSock:
    def close(self) -> None:
        pass


@contextmanager
def paho_client(
    protocol: MQTTProtocolVersion, client_id: str = "cid", **kwargs: Any
) -> Iterator[tuple[mqtt.Client, list[bytes]]]:
    """A paho client whose outgoing packets are captured instead of written to a socket."""
    captured: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)

    def queue(command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None) -> int:
        captured.append(bytes(packet))
        return 0

    vars(client)["_packet_queue"] = queue
    vars(client)["_sock"] = _FakeSock()
    try:
        yield client, captured
    finally:
        vars(client)["_sock"] = None


def test_paho_connect_v311() -> None:
    with paho_client(MQTTProtocolVersion.MQTTv311, client_id="dev-1", clean_session=False) as (client, out):
        client.will_set("status/dev-1", b"offline", qos=1, retain=True)
        client.username_pw_set("alice", "pw")
        client._send_connect(45)
    c = dec_connect(out[0])
    assert c == Connect(
        level=4,
        clean_start=False,
        keepalive=45,
        client_id="dev-1",
        will=Will("status/dev-1", b"offline", 1, True, {}),
        username="alice",
        password=b"pw",
    )
    assert encode_connect(c) == out[0]


def test_paho_connect_v5() -> None:
    with paho_client(MQTTProtocolVersion.MQTTv5, client_id="") as (client, out):
        will_props = PahoProperties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = 10
        will_props.UserProperty = ("w", "1")
        client.will_set("w/t", b"bye", qos=2, retain=False, properties=will_props)
        client.username_pw_set("u", None)
        props = PahoProperties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        props.ReceiveMaximum = 20
        props.TopicAliasMaximum = 5
        client._connect_properties = props
        client._send_connect(60)
    c = dec_connect(out[0])
    assert c.v5 and c.clean_start and c.client_id == "" and c.keepalive == 60
    assert c.properties == {
        Prop.SESSION_EXPIRY_INTERVAL: 300,
        Prop.RECEIVE_MAXIMUM: 20,
        Prop.TOPIC_ALIAS_MAXIMUM: 5,
    }
    assert c.will == Will("w/t", b"bye", 2, False, {Prop.WILL_DELAY_INTERVAL: 10, Prop.USER_PROPERTY: [("w", "1")]})
    assert (c.username, c.password) == ("u", None)
    assert encode_connect(c) == out[0]


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5]),
    _topic_text,
    st.binary(max_size=200),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.fixed_dictionaries(
        {},
        optional={
            "MessageExpiryInterval": st.integers(0, 2**32 - 1),
            "ContentType": st.text("abc/", max_size=8),
            "CorrelationData": st.binary(max_size=8),
            "TopicAlias": st.integers(1, 0xFFFF),
            "ResponseTopic": st.text("rt/", min_size=1, max_size=6),
        },
    ),
)
def test_paho_publish(
    protocol: MQTTProtocolVersion,
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    mid: int,
    props: dict[str, Any],
) -> None:
    v5 = protocol == MQTTProtocolVersion.MQTTv5
    dup = dup and qos > 0
    paho_props = None
    if v5:
        paho_props = PahoProperties(PacketTypes.PUBLISH)
        for name, value in props.items():
            setattr(paho_props, name, value)
    with paho_client(protocol) as (client, out):
        client._send_publish(mid, topic.encode(), payload, qos, retain, dup, None, paho_props)
    data = out[0]
    pub = dec_publish(data, v5)
    assert (pub.topic, pub.qos, pub.retain, pub.dup) == (topic, qos, retain, dup)
    assert pub.packet_id == (mid if qos else 0)
    assert data[pub.payload_start :] == payload
    if v5:
        assert paho_props is not None
        ours = {PahoProperties(PacketTypes.PUBLISH).names[n]: v for n, v in _paho_items(paho_props)}
        assert pub.properties == ours
        # paho writes properties in identifier order; ours follow dict order, so compare decodings.
        again = encode_publish(qos, retain, dup, topic, pub.packet_id, pub.properties, payload)
        assert dec_publish(again, True).properties == pub.properties
    else:
        assert encode_publish(qos, retain, dup, topic, pub.packet_id, None, payload) == data


def _paho_items(p: Any) -> Iterator[tuple[str, Any]]:
    for name in p.names:
        compressed = name.replace(" ", "")
        if hasattr(p, compressed):
            yield name, getattr(p, compressed)


def test_paho_subscribe_and_unsubscribe_v5() -> None:
    opts = SubscribeOptions(qos=2, noLocal=True, retainAsPublished=True, retainHandling=1)
    props = PahoProperties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 77
    with paho_client(MQTTProtocolVersion.MQTTv5) as (client, out):
        _, mid = client._send_subscribe(False, [(b"a/+", opts), (b"$share/g/b/#", SubscribeOptions(qos=1))], props)
        _, unsub_mid = client._send_unsubscribe(False, [b"a/+", b"$share/g/b/#"], None)
    sub = dec_subscribe(out[0], True)
    assert sub == Subscribe(
        mid, [("a/+", 0x02 | 0x04 | 0x08 | 0x10), ("$share/g/b/#", 0x01)], {Prop.SUBSCRIPTION_IDENTIFIER: [77]}
    )
    assert encode_subscribe(sub, True) == out[0]
    unsub = decode_unsubscribe(out[1], 0, len(out[1]), True)
    assert (unsub.packet_id, unsub.filters, unsub.properties) == (unsub_mid, ["a/+", "$share/g/b/#"], {})


def test_paho_subscribe_v311() -> None:
    with paho_client(MQTTProtocolVersion.MQTTv311) as (client, out):
        _, mid = client._send_subscribe(False, [(b"x/#", 1), (b"y", 0)])
    sub = dec_subscribe(out[0], False)
    assert sub == Subscribe(mid, [("x/#", 1), ("y", 0)], None)
    assert encode_subscribe(sub, False) == out[0]


def test_mqtt5_spec_style_wire_bytes() -> None:
    # Hand-assembled MQTT 5 CONNECT as a conforming client sends it (MQTT 5 section 3.1).
    data = bytes.fromhex(
        "10 1c 0004 4d515454 05 c2 000a"  # MQTT, level 5, user+password+clean, keepalive 10
        " 05 11 0000000a"  # session expiry 10
        " 0003 636964"  # client id "cid"
        " 0001 75"  # username "u"
        " 0002 7077"  # password "pw"
    )
    c = dec_connect(data)
    assert c == Connect(5, True, 10, "cid", {Prop.SESSION_EXPIRY_INTERVAL: 10}, None, "u", b"pw")
    assert encode_connect(c) == data


# ---------------------------------------------------------------- fuzzing

DECODERS: list[Callable[[bytes, int, int, bool], object]] = [
    lambda b, s, e, v5: decode_connect(b, s, e),
    decode_connack,
    decode_publish,
    decode_subscribe,
    decode_unsubscribe,
    decode_suback,
    decode_ack,
    decode_disconnect,
    lambda b, s, e, v5: check_fixed_flags(b[s], v5),
]


def _run_all_decoders(data: bytes, max_size: int) -> None:
    framer = Framer(max_size)
    try:
        chunk, ends = framer.feed(data)
    except ProtocolError:
        return
    start = 0
    for end in ends:
        for v5 in (False, True):
            for decoder in DECODERS:
                with suppress(ProtocolError):
                    decoder(chunk, start, end, v5)
        start = end


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([MQTT_MAX_PACKET, 64, 16]))
def test_fuzz_random_bytes(data: bytes, max_size: int) -> None:
    _run_all_decoders(data, max_size)


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    """Valid packets with a few bytes flipped, inserted or removed, body length fixed up."""
    base = draw(
        st.sampled_from(
            [
                _full_connect(4),
                _full_connect(5),
                connect_raw(level=5, flags=0x42, payload=mstr("c") + mstr(b"p")),
                encode_publish(1, True, False, "a/b", 5, {Prop.TOPIC_ALIAS: 2, Prop.USER_PROPERTY: [("k", "v")]}, b"x"),
                encode_publish(0, False, False, "a/b", 0, None, b"payload"),
                encode_subscribe(Subscribe(3, [("a/+", 1), ("$share/g/#", 2)], {0x0B: [9]}), True),
                encode_subscribe(Subscribe(3, [("a/+", 1)]), False),
                encode_suback(True, 3, [0, 0x87], {Prop.REASON_STRING: "r"}),
                encode_ack(PacketType.PUBREL, True, 9, 0x92, {Prop.REASON_STRING: "x"}),
                encode_connack(True, False, 0, {Prop.TOPIC_ALIAS_MAXIMUM: 3}),
                encode_disconnect(0x04, "bye"),
                pkt(0xA2, b"\x00\x05\x00" + mstr("a/#")),
            ]
        )
    )
    body = bytearray(base[2:] if base[1] < 0x80 else base[3:])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(body)))
        if op == 0 and pos < len(body):
            body[pos] = draw(st.integers(0, 255))
        elif op == 1:
            body.insert(pos, draw(st.integers(0, 255)))
        elif pos < len(body):
            del body[pos]
    first = draw(st.sampled_from([base[0], base[0] ^ draw(st.integers(0, 15))]))
    return pkt(first, bytes(body))


@settings(max_examples=400, deadline=None)
@given(mutated_packets())
def test_fuzz_mutated_packets(data: bytes) -> None:
    assert split_packets(data) == [data]
    _run_all_decoders(data, MQTT_MAX_PACKET)


def test_framer_collects_a_trickled_large_packet_without_recopying() -> None:
    """A 1 MB packet fed in 100-byte reads: reads are kept as they come (white box: a list) and
    joined once, so the cost is linear; before, every read re-copied everything buffered."""
    packet = encode_publish(0, False, False, "a/b", 0, None, b"x" * 1_000_000)
    framer = Framer(2_000_000)
    reads = [packet[i : i + 100] for i in range(0, len(packet), 100)]
    for data in reads[:-1]:
        assert framer.feed(data) == (b"", [])
    assert framer.buffered == len(packet) - len(reads[-1])
    assert len(framer._pending) == len(reads) - 1  # white box: nothing joined yet
    assert framer.feed(reads[-1]) == (packet, [len(packet)])
    assert framer.buffered == 0
