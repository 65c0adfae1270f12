"""Unit tests of broker.session.Session, driven with hand-encoded packets (no sockets, no event loop)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.mqtt.packets import (
    Connack,
    PacketType,
    Subscribe,
    Will,
    decode_ack,
    decode_connack,
    decode_connect,
    decode_disconnect,
    decode_publish,
    decode_suback,
    decode_subscribe,
    encode_ack,
    encode_connack,
    encode_disconnect,
    encode_suback,
    encode_subscribe,
)
from broker.mqtt.primitives import encode_varint
from broker.mqtt.properties import Prop
from broker.session import Authenticate, AuthResult, Close, OpenUpstream, SessionSettings, State
from tests.support import mqtt_bytes
from tests.support.mqtt_bytes import mstr, pkt, split_packets
from tests.support.session_driver import DrivenSession

UP_USER = "front-broker"
UP_PASS = "front-secret"


class FakePolicy:
    """Denies everything under the ``denied`` prefix (and, for retained publishes, ``noretain``)."""

    def __init__(self, deny: str = "denied") -> None:
        self.deny = deny
        self.calls: list[tuple[str, str]] = []

    def check_publish(self, topic: str, retain: bool = False) -> bool:
        self.calls.append(("publish", topic))
        if retain and topic.startswith("noretain"):
            return False
        return not topic.startswith(self.deny)

    def check_receive(self, topic: str) -> bool:
        self.calls.append(("receive", topic))
        return not topic.startswith(self.deny)

    def check_subscribe(self, topic_filter: str) -> bool:
        self.calls.append(("subscribe", topic_filter))
        return not topic_filter.startswith(self.deny)


# ---------------------------------------------------------------- helpers


def connect_bytes(
    v5: bool = True,
    client_id: str = "alice",
    username: str | None = "alice",
    password: bytes | None = b"client-pw",
    clean: bool = True,
    will: Will | None = None,
    props: dict[int, Any] | None = None,
) -> bytes:
    """This module's CONNECT: alice with her password unless told otherwise."""
    return mqtt_bytes.connect(client_id, username, password, v5=v5, clean=clean, will=will, props=props, keepalive=30)


def publish(
    topic: str,
    qos: int = 0,
    packet_id: int = 0,
    v5: bool = True,
    payload: bytes = b"data",
    props: dict[int, Any] | None = None,
    retain: bool = False,
) -> bytes:
    return mqtt_bytes.publish(topic, payload, v5=v5, qos=qos, packet_id=packet_id, retain=retain, props=props)


def new_session(**kwargs: Any) -> DrivenSession:
    settings = SessionSettings(upstream_username=UP_USER, upstream_password=UP_PASS, **kwargs)
    return DrivenSession(settings, peer="test")


def handshake(
    v5: bool = True,
    client_id: str = "alice",
    username: str | None = "alice",
    connack: bytes | None = None,
    policy: FakePolicy | None = None,
    extra: bytes = b"",
    **kwargs: Any,
) -> DrivenSession:
    """Run the whole handshake; the returned session is established with empty outputs."""
    s = new_session(**kwargs)
    s.receive_client(connect_bytes(v5=v5, client_id=client_id, username=username) + extra)
    assert s.actions == [Authenticate(username, b"client-pw", client_id)]
    s.actions.clear()
    s.auth_done(AuthResult(ok=True, username=username, policy=policy or FakePolicy(), team="team1"))
    assert s.actions == [OpenUpstream()]
    s.actions.clear()
    s.upstream_connected()
    assert len(s.out_upstream) == 1
    s.out_upstream.clear()
    s.receive_upstream(connack if connack is not None else encode_connack(v5, False, 0))
    assert s.state is State.ESTABLISHED
    assert len(s.out_client) == 1
    s.out_client.clear()
    return s


def closed(s: DrivenSession) -> bool:
    """Closed exactly once, and the Close is the last action asked for."""
    closes = [a for a in s.actions if isinstance(a, Close)]
    return s.state is State.CLOSED and len(closes) == 1 and s.actions[-1] is closes[0]


def assert_disconnect(s: DrivenSession, code: int) -> None:
    assert len(s.out_client) == 1
    data = s.out_client[0]
    assert data[0] == 0xE0
    assert decode_disconnect(data, 0, len(data), True).reason_code == code
    assert closed(s)


def connack_of(s: DrivenSession, v5: bool) -> Connack:
    assert len(s.out_client) == 1
    data = s.out_client[0]
    assert data[0] == 0x20
    return decode_connack(data, 0, len(data), v5)


# ---------------------------------------------------------------- CONNECT handling


@pytest.mark.parametrize("first", [publish("a"), pkt(0xC0, b""), encode_subscribe(Subscribe(1, [("a", 0)]), False)])
def test_first_packet_not_connect(first: bytes) -> None:
    s = new_session()
    s.receive_client(first)
    assert closed(s)
    assert s.out_client == [] and s.out_upstream == []


def test_second_connect_v5() -> None:
    s = handshake(v5=True)
    s.receive_client(connect_bytes(v5=True))
    assert_disconnect(s, 0x82)
    assert s.out_upstream == []


def test_second_connect_v311() -> None:
    s = handshake(v5=False)
    s.receive_client(connect_bytes(v5=False))
    assert closed(s)
    assert s.out_client == [] and s.out_upstream == []


def _v5_connect_raw(flags: int, props: bytes, payload: bytes) -> bytes:
    return pkt(0x10, mstr("MQTT") + bytes((5, flags)) + b"\x00\x1e" + props + payload)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (_v5_connect_raw(0x03, b"\x00", mstr("c")), 0x81),  # reserved flag
        (_v5_connect_raw(0x02, b"\x00", mstr("c") + b"\x00"), 0x81),  # trailing byte
        (_v5_connect_raw(0x1E, b"\x00", mstr("c") + b"\x00" + mstr("t") + mstr("")), 0x81),  # will QoS 3
        (_v5_connect_raw(0x02, b"\x00", mstr(b"\xed\xa0\x80")), 0x81),  # surrogate in client id
        (_v5_connect_raw(0x02, b"\x03\x23\x00\x01", mstr("c")), 0x81),  # Topic Alias in CONNECT
        (_v5_connect_raw(0x02, b"\x06\x21\x00\x01\x21\x00\x01", mstr("c")), 0x82),  # property twice
        (_v5_connect_raw(0x02, b"\x03\x21\x00\x00", mstr("c")), 0x82),  # Receive Maximum 0
    ],
)
def test_malformed_v5_connect_gets_connack(data: bytes, code: int) -> None:
    s = new_session()
    s.receive_client(data)
    assert connack_of(s, True) == Connack(False, code, {})
    assert closed(s)
    assert s.out_upstream == []


def test_malformed_v311_connect_just_closes() -> None:
    s = new_session()
    s.receive_client(pkt(0x10, mstr("MQTT") + b"\x04\x03\x00\x1e" + mstr("c")))
    assert closed(s)
    assert s.out_client == []


@pytest.mark.parametrize("level", [4, 5])
def test_connect_too_large_refused_from_its_header(level: int) -> None:
    """Refused before the body arrives; v5 learns why (CONNACK 0x95) when its level is in the read."""
    s = new_session(max_packet_size=1024)
    head = b"\x10" + encode_varint(5000) + mstr("MQTT") + bytes((level, 0x02, 0x00, 0x1E))
    s.receive_client(head)
    assert closed(s)
    assert s.out_client == ([encode_connack(True, False, 0x95)] if level == 5 else [])


def test_mqisdp_level_3_gets_v3_connack() -> None:
    s = new_session()
    s.receive_client(pkt(0x10, mstr("MQIsdp") + b"\x03\x02\x00\x1e" + mstr("old-client")))
    assert s.out_client == [b"\x20\x02\x00\x01"]
    assert closed(s)


def test_bridge_bit_v5_gets_v5_connack_0x84() -> None:
    s = new_session()
    s.receive_client(pkt(0x10, mstr("MQTT") + b"\x85\x02\x00\x1e\x00" + mstr("bridge")))
    assert connack_of(s, True).reason_code == 0x84
    assert s.out_client[0][1] == 3  # v5 layout: flags, reason code, property length
    assert closed(s)


def test_bridge_bit_v311_gets_v3_connack() -> None:
    s = new_session()
    s.receive_client(pkt(0x10, mstr("MQTT") + b"\x84\x02\x00\x1e" + mstr("bridge")))
    assert s.out_client == [b"\x20\x02\x00\x01"]
    assert closed(s)


def test_v311_empty_client_id_without_clean_session() -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=False, client_id="", clean=False))
    assert s.out_client == [b"\x20\x02\x00\x02"]
    assert closed(s)
    assert not any(isinstance(a, Authenticate) for a in s.actions)


def test_enhanced_authentication_refused() -> None:
    s = new_session()
    s.receive_client(connect_bytes(props={Prop.AUTHENTICATION_METHOD: "SCRAM-SHA-1"}))
    assert connack_of(s, True).reason_code == 0x8C
    assert closed(s)


def test_v5_client_refused_by_v311_only_upstream() -> None:
    s = new_session(upstream_v5=False)
    s.receive_client(connect_bytes(v5=True))
    assert connack_of(s, True).reason_code == 0x84
    assert closed(s)


# ---------------------------------------------------------------- handshake


@pytest.mark.parametrize("v5", [True, False])
def test_happy_path(v5: bool) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5, client_id="alice:dev", password=b"client-pw"))
    assert s.actions == [Authenticate("alice", b"client-pw", "alice:dev")]
    assert s.out_upstream == [] and s.out_client == []
    assert not s.reading_client
    s.actions.clear()
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy(), team="team1"))
    assert s.actions == [OpenUpstream()]
    assert s.out_upstream == []
    s.upstream_connected()
    (up,) = s.out_upstream
    c = decode_connect(up, 0, len(up))
    assert c.v5 is v5
    assert c.client_id == "alice:dev"
    assert c.username == UP_USER
    assert c.password == UP_PASS.encode()
    assert b"client-pw" not in up
    assert c.keepalive == 30
    connack = encode_connack(v5, False, 0, {Prop.RECEIVE_MAXIMUM: 10} if v5 else None)
    s.receive_upstream(connack)
    assert s.state is State.ESTABLISHED and s.reading_client
    (out,) = s.out_client
    if v5:
        got = decode_connack(out, 0, len(out), True)
        assert got.reason_code == 0 and not got.session_present
        assert got.properties[Prop.RECEIVE_MAXIMUM] == 10
        assert got.properties[Prop.MAXIMUM_PACKET_SIZE] == s.settings.max_packet_size
    else:
        assert out == connack
    assert s.username == "alice" and s.team == "team1"
    assert s.stats.connects_ok == 1


def test_upstream_connect_without_upstream_credentials() -> None:
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(connect_bytes(password=b"client-pw"))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    (up,) = s.out_upstream
    c = decode_connect(up, 0, len(up))
    assert c.username is None and c.password is None
    assert b"client-pw" not in up


def test_upstream_connect_keeps_client_will_and_properties_but_no_topic_alias_maximum() -> None:
    will = Will("status/alice", b"bye", 1, True, {Prop.WILL_DELAY_INTERVAL: 5})
    s = new_session()
    s.receive_client(connect_bytes(will=will, props={Prop.SESSION_EXPIRY_INTERVAL: 60, Prop.TOPIC_ALIAS_MAXIMUM: 10}))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    c = decode_connect(s.out_upstream[0], 0, len(s.out_upstream[0]))
    assert c.will == will
    assert c.properties == {Prop.SESSION_EXPIRY_INTERVAL: 60}


def test_v5_connack_maximum_packet_size_is_the_smaller_limit() -> None:
    for upstream_limit, expected in [(None, 5000), (100_000, 5000), (1000, 1000)]:
        props: dict[int, Any] = {} if upstream_limit is None else {Prop.MAXIMUM_PACKET_SIZE: upstream_limit}
        sess = new_session(max_packet_size=5000)
        sess.receive_client(connect_bytes())
        sess.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
        sess.upstream_connected()
        sess.receive_upstream(encode_connack(True, True, 0, props))
        got = connack_of(sess, True)
        assert got.session_present
        assert got.properties[Prop.MAXIMUM_PACKET_SIZE] == expected


def test_assigned_client_id_for_empty_id_v5() -> None:
    s = new_session()
    s.receive_client(connect_bytes(client_id=""))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    up = decode_connect(s.out_upstream[0], 0, len(s.out_upstream[0]))
    assert up.client_id.startswith("alice:") and len(up.client_id) > len("alice:")
    s.receive_upstream(encode_connack(True, False, 0, {Prop.ASSIGNED_CLIENT_IDENTIFIER: "upstream-made"}))
    got = connack_of(s, True)
    assert got.properties[Prop.ASSIGNED_CLIENT_IDENTIFIER] == up.client_id
    assert s.client_id == up.client_id


def test_anonymous_client_ids_are_namespaced() -> None:
    s = new_session()
    s.receive_client(connect_bytes(client_id="sensor-1", username=None, password=None))
    s.auth_done(AuthResult(ok=True, username=None, policy=FakePolicy()))
    s.upstream_connected()
    up = decode_connect(s.out_upstream[0], 0, len(s.out_upstream[0]))
    assert up.client_id == "anonymous:sensor-1"
    assert s.client_id == "sensor-1"


def test_anonymous_empty_client_id_gets_assigned_id_without_prefix() -> None:
    s = new_session()
    s.receive_client(connect_bytes(client_id="", username=None, password=None))
    s.auth_done(AuthResult(ok=True, username=None, policy=FakePolicy()))
    s.upstream_connected()
    up = decode_connect(s.out_upstream[0], 0, len(s.out_upstream[0]))
    assert up.client_id.startswith("anonymous:")
    s.receive_upstream(encode_connack(True, False, 0))
    assigned = connack_of(s, True).properties[Prop.ASSIGNED_CLIENT_IDENTIFIER]
    assert up.client_id == "anonymous:" + assigned
    assert not assigned.startswith("anonymous:")


@pytest.mark.parametrize(
    ("client_id", "ok"),
    [
        ("alice", True),
        ("alice:x", True),
        ("alice:", False),  # an empty suffix is no id FlowFuse uses (acl.client_ids)
        ("bob", False),
        ("alicex", False),
        ("xalice", False),
        ("bob:alice", False),
    ],
)
@pytest.mark.parametrize("v5", [True, False])
def test_client_id_policy(client_id: str, ok: bool, v5: bool) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5, client_id=client_id))
    s.actions.clear()
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    if ok:
        assert s.actions == [OpenUpstream()]
    else:
        assert closed(s)
        if v5:
            assert connack_of(s, True).reason_code == 0x85
        else:
            assert s.out_client == [b"\x20\x02\x00\x02"]


@pytest.mark.parametrize(("bad_credentials", "v3_code", "v5_code"), [(True, 4, 0x86), (False, 5, 0x87)])
@pytest.mark.parametrize("v5", [True, False])
def test_auth_refused(bad_credentials: bool, v3_code: int, v5_code: int, v5: bool) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5))
    s.actions.clear()
    s.auth_done(AuthResult(ok=False, bad_credentials=bad_credentials))
    assert connack_of(s, v5).reason_code == (v5_code if v5 else v3_code)
    assert closed(s)
    assert s.stats.auth_failures == 1


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize(("topic", "retain"), [("denied/will", False), ("noretain/x", True)])
def test_will_topic_denied(v5: bool, topic: str, retain: bool) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5, will=Will(topic, b"bye", 0, retain, {})))
    s.actions.clear()
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    assert connack_of(s, v5).reason_code == (0x87 if v5 else 0x05)
    assert closed(s)
    assert s.stats.denied_will == 1


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("after_connect", [False, True])
def test_upstream_failed_before_connack(v5: bool, after_connect: bool) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5))
    s.actions.clear()
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.actions.clear()
    if after_connect:
        s.upstream_connected()
    s.upstream_failed("connection refused")
    assert connack_of(s, v5).reason_code == (0x88 if v5 else 0x03)
    assert closed(s)


@pytest.mark.parametrize(
    ("v5", "upstream_code", "client_code"),
    [(True, 0x87, 0x88), (True, 0x86, 0x88), (False, 0x05, 0x03), (False, 0x04, 0x03)],
)
def test_upstream_refuses_front_credentials(v5: bool, upstream_code: int, client_code: int) -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=v5))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    s.receive_upstream(encode_connack(v5, False, upstream_code))
    assert connack_of(s, v5).reason_code == client_code
    assert closed(s)


def test_upstream_other_refusal_relayed() -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=True))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    refusal = encode_connack(True, False, 0x89)  # server busy
    s.receive_upstream(refusal)
    assert s.out_client == [refusal]
    assert closed(s)


def test_upstream_connack_with_following_publish() -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=False))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    connack = encode_connack(False, True, 0)
    delivery = publish("a/b", qos=1, packet_id=4, v5=False)
    s.receive_upstream(connack + delivery)
    assert split_packets(s.out_client) == [connack, delivery]


def test_packets_sent_before_connack_are_kept_in_order() -> None:
    # MQTT 5 section 3.1.4: a client may send packets right after CONNECT, before CONNACK.
    p1 = publish("a/1", v5=True)
    p2 = publish("a/2", qos=1, packet_id=1, v5=True, payload=b"x" * 200)
    p3 = publish("a/3", v5=True)
    s = new_session()
    s.receive_client(connect_bytes() + p1 + p2[:7])  # CONNECT, a whole PUBLISH, a partial one
    assert s.actions == [Authenticate("alice", b"client-pw", "alice")]
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    s.out_upstream.clear()
    s.receive_upstream(encode_connack(True, False, 0))
    s.receive_client(p2[7:] + p3)
    assert split_packets(s.out_upstream) == [p1, p2, p3]
    assert s.state is State.ESTABLISHED


def test_packets_received_during_authentication_are_kept() -> None:
    p1 = publish("a/1", v5=True)
    p2 = publish("a/2", v5=True)
    s = new_session()
    s.receive_client(connect_bytes())
    s.receive_client(p1[:3])
    s.receive_client(p1[3:] + p2)
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    s.out_upstream.clear()
    s.receive_upstream(encode_connack(True, False, 0))
    assert split_packets(s.out_upstream) == [p1, p2]


# ---------------------------------------------------------------- relaying client packets


@pytest.mark.parametrize("v5", [True, False])
def test_several_publishes_forwarded_as_one_run(v5: bool) -> None:
    s = handshake(v5=v5)
    data = (
        publish("a/1", v5=v5)
        + publish("a/2", qos=1, packet_id=1, v5=v5)
        + publish("a/3", qos=2, packet_id=2, v5=v5, payload=b"p" * 300)
        + pkt(0xC0, b"")
    )
    s.receive_client(data)
    assert s.out_upstream == [data]
    assert s.out_client == [] and s.actions == []
    assert s.stats.msgs_in == 3


@pytest.mark.parametrize("v5", [True, False])
def test_packet_split_across_calls(v5: bool) -> None:
    s = handshake(v5=v5)
    p1 = publish("a/1", qos=1, packet_id=7, v5=v5, payload=b"z" * 500)
    p2 = publish("a/2", v5=v5)
    data = p1 + p2
    for i in range(0, len(data), 13):
        s.receive_client(data[i : i + 13])
    assert b"".join(s.out_upstream) == data
    assert split_packets(s.out_upstream) == [p1, p2]


def test_acks_and_ping_from_client_forwarded() -> None:
    s = handshake(v5=True)
    data = (
        encode_ack(PacketType.PUBACK, True, 1)
        + encode_ack(PacketType.PUBREC, True, 2, 0x10)
        + encode_ack(PacketType.PUBREL, True, 3)
        + encode_ack(PacketType.PUBCOMP, True, 4)
        + pkt(0xC0, b"")
        + pkt(0xA2, b"\x00\x05\x00" + mstr("a/#"))
    )
    s.receive_client(data)
    assert s.out_upstream == [data]


@pytest.mark.parametrize("v5", [False, True])
def test_refusal_acks_keep_publish_order(v5: bool) -> None:
    """[MQTT-4.6.0-2/3]: acks go out in PUBLISH order, so our own ack for a refused publish waits
    behind the upstream's ack for an earlier forwarded one."""
    s = handshake(v5=v5)
    allowed1 = publish("a/1", qos=1, packet_id=1, v5=v5)
    allowed2 = publish("a/2", qos=2, packet_id=3, v5=v5)
    s.receive_client(allowed1 + publish("denied/x", qos=1, packet_id=2, v5=v5) + allowed2)
    s.receive_client(publish("denied/y", qos=2, packet_id=4, v5=v5))
    assert b"".join(s.out_upstream) == allowed1 + allowed2
    assert s.out_client == []  # nothing may overtake the ack of packet 1
    code = 0x87 if v5 else 0
    up_ack1 = encode_ack(PacketType.PUBACK, v5, 1)
    s.receive_upstream(up_ack1)
    assert b"".join(s.out_client) == up_ack1 + encode_ack(PacketType.PUBACK, v5, 2, code)
    s.out_client.clear()
    up_rec3 = encode_ack(PacketType.PUBREC, v5, 3)
    s.receive_upstream(up_rec3)
    assert b"".join(s.out_client) == up_rec3 + encode_ack(PacketType.PUBREC, v5, 4, code)
    s.out_client.clear()
    # With nothing in flight, a refusal is acknowledged at once.
    s.receive_client(publish("denied/z", qos=1, packet_id=5, v5=v5))
    assert s.out_client == [encode_ack(PacketType.PUBACK, v5, 5, code)]


@pytest.mark.parametrize("v5", [True, False])
def test_denied_publish(v5: bool) -> None:
    s = handshake(v5=v5)
    ok1 = publish("a/1", v5=v5)
    ok2 = publish("a/2", v5=v5)
    ok3 = publish("a/3", v5=v5)
    data = (
        ok1
        + publish("denied/0", v5=v5)
        + ok2
        + publish("denied/1", qos=1, packet_id=11, v5=v5)
        + publish("denied/2", qos=2, packet_id=12, v5=v5)
        + ok3
    )
    s.receive_client(data)
    assert s.out_upstream == [ok1, ok2, ok3]
    puback, pubrec = s.out_client
    code = 0x87 if v5 else 0
    assert puback[0] == 0x40 and decode_ack(puback, 0, len(puback), v5) == decode_ack(
        encode_ack(PacketType.PUBACK, v5, 11, code), 0, len(puback), v5
    )
    assert pubrec[0] == 0x50 and decode_ack(pubrec, 0, len(pubrec), v5).packet_id == 12
    assert decode_ack(pubrec, 0, len(pubrec), v5).reason_code == code
    if not v5:
        assert puback == b"\x40\x02\x00\x0b" and pubrec == b"\x50\x02\x00\x0c"
    assert s.stats.denied_publish == 3
    assert s.actions == []


def test_v311_denied_qos2_pubrel_answered_locally() -> None:
    s = handshake(v5=False)
    s.receive_client(publish("denied/x", qos=2, packet_id=12, v5=False))
    assert s.out_client == [b"\x50\x02\x00\x0c"]
    s.out_client.clear()
    other = encode_ack(PacketType.PUBREL, False, 13)
    s.receive_client(encode_ack(PacketType.PUBREL, False, 12) + other)
    assert s.out_client == [b"\x70\x02\x00\x0c"]  # PUBCOMP
    assert s.out_upstream == [other]  # only the unrelated PUBREL goes upstream
    s.out_client.clear()
    s.out_upstream.clear()
    # The id is free again: a second PUBREL for it is the upstream's business.
    s.receive_client(encode_ack(PacketType.PUBREL, False, 12))
    assert s.out_client == [] and s.out_upstream == [encode_ack(PacketType.PUBREL, False, 12)]


def test_retained_publish_checked_with_retain_flag() -> None:
    s = handshake(v5=True)
    allowed = publish("noretain/x", retain=False)
    s.receive_client(allowed + publish("noretain/x", retain=True, qos=1, packet_id=3))
    assert s.out_upstream == [allowed]
    assert len(s.out_client) == 1 and s.out_client[0][0] == 0x40


@pytest.mark.parametrize("v5", [True, False])
def test_disconnect_on_deny(v5: bool) -> None:
    s = handshake(v5=v5, disconnect_on_deny=True)
    ok = publish("a/1", v5=v5)
    s.receive_client(ok + publish("denied/x", qos=1, packet_id=1, v5=v5) + publish("a/2", v5=v5))
    # Nothing the client sent after the refused PUBLISH may reach the upstream broker.
    assert s.out_upstream == [ok]
    if v5:
        assert_disconnect(s, 0x87)
    else:
        assert s.out_client == [] and closed(s)


# ---------------------------------------------------------------- topic aliases


def _alias_session(maximum: int | None = 10) -> DrivenSession:
    props: dict[int, Any] = {} if maximum is None else {Prop.TOPIC_ALIAS_MAXIMUM: maximum}
    return handshake(v5=True, connack=encode_connack(True, False, 0, props))


def test_topic_alias_resolved() -> None:
    s = _alias_session(10)
    s.out_client.clear()
    first = publish(
        "a/b", qos=1, packet_id=1, props={Prop.TOPIC_ALIAS: 3, Prop.USER_PROPERTY: [("k", "v")]}, payload=b"one"
    )
    again = publish("", qos=0, props={Prop.TOPIC_ALIAS: 3}, payload=b"two")
    plain = publish("c/d", payload=b"three")
    s.receive_client(first + again + plain)
    out = split_packets(s.out_upstream)
    assert len(out) == 3
    p1 = decode_publish(out[0], 0, len(out[0]), True)
    assert (p1.topic, p1.qos, p1.packet_id) == ("a/b", 1, 1)
    assert p1.properties == {Prop.USER_PROPERTY: [("k", "v")]}
    assert out[0][p1.payload_start :] == b"one"
    p2 = decode_publish(out[1], 0, len(out[1]), True)
    assert p2.topic == "a/b" and p2.properties == {} and out[1][p2.payload_start :] == b"two"
    assert out[2] == plain
    assert s.actions == []


def test_topic_alias_remapped() -> None:
    s = _alias_session(10)
    s.receive_client(publish("a/b", props={Prop.TOPIC_ALIAS: 1}) + publish("x/y", props={Prop.TOPIC_ALIAS: 1}))
    s.out_upstream.clear()
    s.receive_client(publish("", props={Prop.TOPIC_ALIAS: 1}))
    (out,) = s.out_upstream
    assert decode_publish(out, 0, len(out), True).topic == "x/y"


def test_topic_alias_resolving_to_denied_topic() -> None:
    s = _alias_session(10)
    s.receive_client(publish("denied/t", props={Prop.TOPIC_ALIAS: 2}))
    s.receive_client(publish("", qos=1, packet_id=5, props={Prop.TOPIC_ALIAS: 2}))
    assert s.out_upstream == []
    assert len(s.out_client) == 1
    assert decode_ack(s.out_client[0], 0, len(s.out_client[0]), True).reason_code == 0x87


@pytest.mark.parametrize(
    ("maximum", "packet"),
    [
        (10, publish("", props={Prop.TOPIC_ALIAS: 2})),  # never set
        (10, publish("a", props={Prop.TOPIC_ALIAS: 11})),  # above the maximum from CONNACK
        (None, publish("a", props={Prop.TOPIC_ALIAS: 1})),  # no aliases allowed at all
        (10, pkt(0x30, mstr("a") + b"\x03\x23\x00\x00")),  # alias 0
    ],
)
def test_topic_alias_invalid(maximum: int | None, packet: bytes) -> None:
    s = _alias_session(maximum)
    ok = publish("ok")
    s.receive_client(ok + packet)
    assert s.out_upstream == [ok]
    assert_disconnect(s, 0x94)


# ---------------------------------------------------------------- SUBSCRIBE


@pytest.mark.parametrize("v5", [True, False])
def test_subscribe_partly_denied(v5: bool) -> None:
    s = handshake(v5=v5)
    props: dict[int, Any] | None = {Prop.SUBSCRIPTION_IDENTIFIER: [5]} if v5 else None
    sub = encode_subscribe(Subscribe(9, [("a/#", 1), ("denied/x", 0), ("b/+", 2), ("denied/y", 1)], props), v5)
    s.receive_client(sub)
    (up,) = s.out_upstream
    reduced = decode_subscribe(up, 0, len(up), v5)
    assert reduced.packet_id == 9
    assert reduced.filters == [("a/#", 1), ("b/+", 2)]
    assert reduced.properties == props
    assert s.out_client == []
    s.receive_upstream(encode_suback(v5, 9, [1, 2] if v5 else [1, 0x80]))
    (merged,) = s.out_client
    refused = 0x87 if v5 else 0x80
    assert decode_suback(merged, 0, len(merged), v5).reason_codes == (
        [1, refused, 2, refused] if v5 else [1, refused, 0x80, refused]
    )
    assert s.stats.denied_subscribe == 2


@pytest.mark.parametrize("v5", [True, False])
def test_subscribe_fully_denied(v5: bool) -> None:
    s = handshake(v5=v5)
    s.receive_client(encode_subscribe(Subscribe(4, [("denied/a", 1), ("denied/b", 0)], {} if v5 else None), v5))
    assert s.out_upstream == []
    (suback,) = s.out_client
    assert suback[0] == 0x90
    got = decode_suback(suback, 0, len(suback), v5)
    assert got.packet_id == 4
    assert got.reason_codes == ([0x87, 0x87] if v5 else [0x80, 0x80])


def test_subscribe_allowed_forwarded_unchanged_and_suback_relayed() -> None:
    s = handshake(v5=True)
    sub = encode_subscribe(Subscribe(4, [("a/b", 1)], {}), True)
    s.receive_client(sub)
    assert s.out_upstream == [sub]
    suback = encode_suback(True, 4, [1])
    s.receive_upstream(suback)
    assert s.out_client == [suback]


# ---------------------------------------------------------------- deliveries


@pytest.mark.parametrize("v5", [True, False])
def test_delivery_allowed_forwarded_byte_identical(v5: bool) -> None:
    s = handshake(v5=v5)
    data = publish("a/1", v5=v5) + publish("a/2", qos=1, packet_id=3, v5=v5) + encode_ack(PacketType.PUBACK, v5, 9)
    s.receive_upstream(data)
    assert s.out_client == [data]


@pytest.mark.parametrize("v5", [True, False])
def test_delivery_denied(v5: bool) -> None:
    s = handshake(v5=v5)
    ok = publish("a/1", v5=v5)
    s.receive_upstream(
        publish("denied/0", v5=v5)
        + ok
        + publish("denied/1", qos=1, packet_id=21, v5=v5)
        + publish("denied/2", qos=2, packet_id=22, v5=v5)
    )
    assert s.out_client == [ok]
    assert s.out_upstream == [encode_ack(PacketType.PUBACK, v5, 21), encode_ack(PacketType.PUBREC, v5, 22)]
    s.out_upstream.clear()
    s.out_client.clear()
    unrelated = encode_ack(PacketType.PUBREL, v5, 23)
    s.receive_upstream(encode_ack(PacketType.PUBREL, v5, 22) + unrelated)
    assert s.out_upstream == [encode_ack(PacketType.PUBCOMP, v5, 22)]
    assert s.out_client == [unrelated]
    assert s.stats.denied_deliver == 3


# ---------------------------------------------------------------- DISCONNECT and upstream loss


@pytest.mark.parametrize("v5", [True, False])
def test_client_disconnect_forwarded_after_preceding_packets(v5: bool) -> None:
    s = handshake(v5=v5)
    p1 = publish("a/1", v5=v5)
    p2 = publish("a/2", qos=1, packet_id=1, v5=v5)
    disconnect = pkt(0xE0, b"\x04\x00") if v5 else pkt(0xE0, b"")
    s.receive_client(p1 + publish("denied/x", v5=v5) + p2 + disconnect + publish("a/after", v5=v5))
    assert b"".join(s.out_upstream) == p1 + p2 + disconnect
    assert closed(s)
    assert s.out_client == []
    s.receive_client(publish("a/later", v5=v5))
    assert b"".join(s.out_upstream) == p1 + p2 + disconnect


@pytest.mark.parametrize("v5", [True, False])
def test_upstream_disconnect(v5: bool) -> None:
    s = handshake(v5=v5)
    ok = publish("a/1", v5=v5)
    s.receive_upstream(ok + encode_disconnect(0x8B) if v5 else ok + pkt(0xE0, b""))
    if v5:
        assert b"".join(s.out_client) == ok + encode_disconnect(0x8B)
    else:
        assert s.out_client == [ok]
    assert closed(s)


@pytest.mark.parametrize("v5", [True, False])
def test_upstream_lost_after_establishment(v5: bool) -> None:
    s = handshake(v5=v5)
    s.upstream_failed("reset")
    if v5:
        assert_disconnect(s, 0x80)  # 0x88 is a CONNACK code, not a DISCONNECT one
    else:
        assert s.out_client == [] and closed(s)


# ---------------------------------------------------------------- protocol errors after establishment

MALFORMED_AFTER_CONNECT: list[tuple[str, bytes, int]] = [
    ("publish qos 3", pkt(0x36, mstr("a") + b"\x00\x01\x00"), 0x81),
    ("publish dup on qos 0", pkt(0x38, mstr("a") + b"\x00"), 0x81),
    ("subscribe reserved flags", pkt(0x80, b"\x00\x01\x00" + mstr("a") + b"\x00"), 0x81),
    ("unsubscribe reserved flags", pkt(0xA0, b"\x00\x01\x00" + mstr("a")), 0x81),
    ("pubrel reserved flags", pkt(0x60, b"\x00\x01"), 0x81),
    ("puback reserved flags", pkt(0x42, b"\x00\x01"), 0x81),
    ("pingreq reserved flags", pkt(0xC1, b""), 0x81),
    ("pingreq with a body", pkt(0xC0, b"\x00"), 0x81),
    ("disconnect reserved flags", pkt(0xE1, b""), 0x81),
    ("wildcard topic +", pkt(0x30, mstr("a/+") + b"\x00"), 0x82),
    ("wildcard topic #", pkt(0x30, mstr("#") + b"\x00"), 0x82),
    ("invalid utf-8 surrogate", pkt(0x30, mstr(b"a\xed\xa0\x80") + b"\x00"), 0x81),
    ("invalid utf-8 overlong", pkt(0x30, mstr(b"a\xc0\x80") + b"\x00"), 0x81),
    ("U+0000 in topic", pkt(0x30, mstr(b"a\x00") + b"\x00"), 0x81),
    ("publish packet id 0", pkt(0x32, mstr("a") + b"\x00\x00\x00"), 0x82),
    ("empty topic", pkt(0x30, mstr("") + b"\x00"), 0x82),
    ("publish truncated", pkt(0x30, b"\x00\x09ab"), 0x81),
    ("packet type 0", pkt(0x00, b""), 0x81),
    ("connack from client", pkt(0x20, b"\x00\x00\x00"), 0x82),
    ("suback from client", pkt(0x90, b"\x00\x01\x00\x00"), 0x82),
    ("unsuback from client", pkt(0xB0, b"\x00\x01\x00\x00"), 0x82),
    ("pingresp from client", pkt(0xD0, b""), 0x82),
    ("subscribe without filters", pkt(0x82, b"\x00\x01\x00"), 0x82),
    ("subscribe qos 3", pkt(0x82, b"\x00\x01\x00" + mstr("a") + b"\x03"), 0x82),
    ("subscribe retain handling 3", pkt(0x82, b"\x00\x01\x00" + mstr("a") + b"\x30"), 0x82),
    ("subscribe reserved option bits", pkt(0x82, b"\x00\x01\x00" + mstr("a") + b"\xc0"), 0x81),
    ("subscribe bad filter", pkt(0x82, b"\x00\x01\x00" + mstr("a/#/b") + b"\x00"), 0x82),
    ("puback trailing bytes", pkt(0x40, b"\x00\x01\x00\x00\x00"), 0x81),
    ("publish property not allowed", pkt(0x30, mstr("a") + b"\x03\x21\x00\x01"), 0x81),
    ("publish property twice", pkt(0x30, mstr("a") + b"\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x01"), 0x82),
    # MQTT 5 section 3.3.4 [MQTT-3.3.4-6]: a client's PUBLISH MUST NOT carry a Subscription Identifier.
    ("publish with subscription identifier", pkt(0x30, mstr("a") + b"\x02\x0b\x01"), 0x82),
    ("auth without authentication method", pkt(0xF0, b"\x00\x00"), 0x82),
]


@pytest.mark.parametrize(("name", "bad", "code"), MALFORMED_AFTER_CONNECT, ids=[c[0] for c in MALFORMED_AFTER_CONNECT])
def test_protocol_error_after_establishment_v5(name: str, bad: bytes, code: int) -> None:
    s = handshake(v5=True)
    ok = publish("ok/1")
    s.receive_client(ok + bad + publish("ok/2"))
    assert s.out_upstream == [ok], "packets before the bad one still go out, nothing after it"
    assert_disconnect(s, code)
    assert s.stats.protocol_errors == 1


MALFORMED_V311: list[tuple[str, bytes]] = [
    ("publish qos 3", pkt(0x36, mstr("a") + b"\x00\x01")),
    ("subscribe reserved flags", pkt(0x80, b"\x00\x01" + mstr("a") + b"\x00")),
    ("pubrel reserved flags", pkt(0x60, b"\x00\x01")),
    ("pingreq reserved flags", pkt(0xC1, b"")),
    ("wildcard topic", pkt(0x30, mstr("a/#"))),
    ("invalid utf-8", pkt(0x30, mstr(b"\xed\xa0\x80"))),
    ("packet type 0", pkt(0x00, b"")),
    ("auth in 3.1.1", pkt(0xF0, b"")),
    ("connack from client", pkt(0x20, b"\x00\x00")),
    ("suback from client", pkt(0x90, b"\x00\x01\x00")),
    ("subscribe qos 3", pkt(0x82, b"\x00\x01" + mstr("a") + b"\x03")),
    ("subscribe no-local bit (reserved in 3.1.1)", pkt(0x82, b"\x00\x01" + mstr("a") + b"\x04")),
    ("disconnect with a body", pkt(0xE0, b"\x00")),
    ("puback with a reason code", pkt(0x40, b"\x00\x01\x00")),
]


@pytest.mark.parametrize(("name", "bad"), MALFORMED_V311, ids=[c[0] for c in MALFORMED_V311])
def test_protocol_error_after_establishment_v311(name: str, bad: bytes) -> None:
    s = handshake(v5=False)
    ok = publish("ok/1", v5=False)
    s.receive_client(ok + bad + publish("ok/2", v5=False))
    assert s.out_upstream == [ok]
    assert s.out_client == []
    assert closed(s)


@pytest.mark.parametrize("v5", [True, False])
def test_publish_too_large(v5: bool) -> None:
    s = handshake(v5=v5, max_packet_size=1000)
    fits = publish("a", v5=v5, payload=b"x" * (1000 - 3 - 3 - (1 if v5 else 0)))
    assert len(fits) == 1000
    s.receive_client(fits)
    assert s.out_upstream == [fits]
    s.out_upstream.clear()
    too_big = publish("a", v5=v5, payload=b"x" * 2000)
    s.receive_client(too_big[:3])  # the fixed header is enough to refuse it
    if v5:
        assert_disconnect(s, 0x95)
    else:
        assert s.out_client == [] and closed(s)
    assert s.out_upstream == []


def test_remaining_length_over_four_bytes() -> None:
    s = handshake(v5=True)
    s.receive_client(b"\x30\xff\xff\xff\xff\x01")
    assert_disconnect(s, 0x81)


def test_nothing_processed_after_close() -> None:
    s = handshake(v5=True)
    s.receive_client(pkt(0x00, b""))
    s.out_client.clear()
    s.receive_client(publish("a"))
    s.receive_upstream(publish("a"))
    assert s.out_client == [] and s.out_upstream == []
    assert len(s.actions) == 1


@pytest.mark.parametrize(
    "bad",
    [
        encode_connack(True, False, 0),  # a second CONNACK
        encode_subscribe(Subscribe(1, [("a", 0)]), True),  # client-only packets
        pkt(0xC0, b""),
        pkt(0x30, mstr("a/+") + b"\x00"),  # invalid PUBLISH
    ],
)
def test_upstream_protocol_error_v5(bad: bytes) -> None:
    s = handshake(v5=True)
    ok = publish("a/1")
    s.receive_upstream(ok + bad)
    assert s.out_client[0] == ok
    data = s.out_client[-1]
    assert decode_disconnect(data, 0, len(data), True).reason_code == 0x80
    assert closed(s)


def test_upstream_answers_connect_without_connack() -> None:
    s = new_session()
    s.receive_client(connect_bytes(v5=True))
    s.auth_done(AuthResult(ok=True, username="alice", policy=FakePolicy()))
    s.upstream_connected()
    s.receive_upstream(publish("a"))
    assert connack_of(s, True).reason_code == 0x88
    assert closed(s)
