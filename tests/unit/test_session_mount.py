"""Team mountpoints in the session: every path moves topics under the mount and back, nothing escapes it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acl.topics import filter_levels, topic_levels
from broker.mqtt.packets import (
    Connect,
    PacketType,
    Will,
    decode_connack,
    decode_connect,
    decode_publish,
    decode_subscribe,
    decode_unsubscribe,
    encode_connack,
    encode_connect,
    encode_publish,
)
from broker.mqtt.properties import Prop
from broker.session import AuthResult, SessionSettings, State
from broker.session.mount import mount_filter, mountpoint_problem, unmount_topic
from tests.support.mqtt_bytes import mstr, pkt, publish, split_packets, subscribe
from tests.support.session_driver import DrivenSession

M = "ff/v1/team1/c/"


class AllowAll:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def check_publish(self, topic: str, retain: bool = False) -> bool:
        self.seen.append(("publish", topic))
        return not topic.startswith("denied")

    def check_subscribe(self, topic_filter: str) -> bool:
        self.seen.append(("subscribe", topic_filter))
        return not topic_filter.startswith("denied")

    def check_receive(self, topic: str) -> bool:
        self.seen.append(("deliver", topic))
        return not topic.startswith("denied")


def mounted(
    v5: bool = True, will: Will | None = None, topic_alias_max: int = 0
) -> tuple[DrivenSession, AllowAll, Connect]:
    policy = AllowAll()
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(encode_connect(Connect(5 if v5 else 4, True, 60, "c1@team1", will=will, username="c1@team1")))
    s.auth_done(AuthResult(True, "c1@team1", policy, "team1", mountpoint=M))
    s.upstream_connected()
    (up,) = s.out_upstream
    s.out_upstream.clear()
    upstream_connect = decode_connect(up, 0, len(up))
    props: dict[int, object] = {Prop.TOPIC_ALIAS_MAXIMUM: topic_alias_max} if v5 and topic_alias_max else {}
    s.receive_upstream(encode_connack(v5, False, 0, props))
    s.out_client.clear()
    assert s.state is State.ESTABLISHED
    return s, policy, upstream_connect


def one(packets: list[bytes], v5: bool = True) -> tuple[str, dict[int, object] | None, bytes]:
    (p,) = split_packets(packets)
    pub = decode_publish(p, 0, len(p), v5)
    return pub.topic, pub.properties, p[pub.payload_start :]


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_goes_under_the_mount_on_the_full_and_the_fast_path(v5: bool, qos: int) -> None:
    s, policy, _ = mounted(v5)
    for i in range(3):  # the first decodes and checks, the others take the fast path
        s.receive_client(publish("sensors/t", f"p{i}".encode(), v5=v5, qos=qos, packet_id=i + 1, retain=True))
        topic, _, payload = one(s.out_upstream, v5)
        s.out_upstream.clear()
        assert topic == M + "sensors/t" and payload == f"p{i}".encode()
    assert policy.seen == [("publish", "sensors/t")]  # the ACL sees the client-visible topic


def test_denied_publish_is_not_forwarded() -> None:
    s, _, _ = mounted()
    s.receive_client(publish("denied/x", b"", v5=True))
    assert s.out_upstream == [] and s.stats.denied_publish == 1


def test_topic_alias_is_resolved_then_mounted() -> None:
    s, _, _ = mounted(topic_alias_max=5)
    s.receive_client(publish("a/b", b"1", v5=True, props={Prop.TOPIC_ALIAS: 3}))
    s.receive_client(publish("", b"2", v5=True, props={Prop.TOPIC_ALIAS: 3}))
    first, second = split_packets(s.out_upstream)
    for packet in (first, second):
        pub = decode_publish(packet, 0, len(packet), True)
        assert pub.topic == M + "a/b" and pub.properties is not None and Prop.TOPIC_ALIAS not in pub.properties


def test_response_topic_is_mounted_up_and_stripped_down() -> None:
    s, _, _ = mounted()
    s.receive_client(publish("req", b"?", v5=True, props={Prop.RESPONSE_TOPIC: "res/1", Prop.CORRELATION_DATA: b"c"}))
    topic, props, _ = one(s.out_upstream)
    assert topic == M + "req" and props == {Prop.RESPONSE_TOPIC: M + "res/1", Prop.CORRELATION_DATA: b"c"}
    s.receive_upstream(publish(M + "req", b"?", v5=True, props={Prop.RESPONSE_TOPIC: M + "res/1"}))
    topic, props, _ = one(s.out_client)
    assert topic == "req" and props == {Prop.RESPONSE_TOPIC: "res/1"}
    s.out_client.clear()
    s.receive_upstream(publish(M + "req", b"?", v5=True, props={Prop.RESPONSE_TOPIC: "ff/v1/team2/c/x"}))
    topic, props, _ = one(s.out_client)
    assert topic == "req" and props == {}  # a response topic outside the mount is never shown


def test_will_is_mounted() -> None:
    _, _, upstream_connect = mounted(will=Will("status/gone", b"bye", 1, True, {Prop.RESPONSE_TOPIC: "r"}))
    will = upstream_connect.will
    assert will is not None
    assert will.topic == M + "status/gone" and will.properties[Prop.RESPONSE_TOPIC] == M + "r"


@pytest.mark.parametrize("v5", [True, False])
def test_subscribe_and_unsubscribe_filters_are_mounted(v5: bool) -> None:
    s, policy, _ = mounted(v5)
    filters = [("#", 1), ("+/t", 0), ("$share/g/x/#", 1)] if v5 else [("#", 1), ("+/t", 0)]
    s.receive_client(subscribe(filters, v5=v5))
    (up,) = s.out_upstream
    mapped = [f for f, _ in decode_subscribe(up, 0, len(up), v5).filters]
    assert mapped[:2] == [M + "#", M + "+/t"]
    if v5:
        assert mapped[2] == f"$share/g/{M}x/#"
    assert [t for a, t in policy.seen if a == "subscribe"] == [f for f, _ in filters]
    s.out_upstream.clear()
    props = b"\x00" if v5 else b""
    s.receive_client(pkt(0xA2, b"\x00\x02" + props + mstr("#") + mstr("$share/g/x/#")))
    (up,) = s.out_upstream
    assert decode_unsubscribe(up, 0, len(up), v5).filters == [M + "#", f"$share/g/{M}x/#"]


@pytest.mark.parametrize("v5", [True, False])
def test_deliveries_are_stripped_and_outside_ones_dropped(v5: bool) -> None:
    s, policy, _ = mounted(v5)
    for i in range(2):  # full path, then fast path
        s.receive_upstream(publish(M + "a/b", f"m{i}".encode(), v5=v5))
        topic, _, payload = one(s.out_client, v5)
        s.out_client.clear()
        assert topic == "a/b" and payload == f"m{i}".encode()
    assert [t for a, t in policy.seen if a == "deliver"] == ["a/b"]
    for outside in ("ff/v1/team1/c", "ff/v1/team2/c/a/b", "ff/v1/team1/cx/a", M):
        s.receive_upstream(publish(outside, b"", v5=v5, qos=1, packet_id=9))
        assert s.out_client == []
        (ack,) = s.out_upstream  # acknowledged on the client's behalf
        s.out_upstream.clear()
        assert ack[0] >> 4 == PacketType.PUBACK
    assert s.stats.denied_deliver == 4


def test_subscription_identifiers_survive_the_strip() -> None:
    s, _, _ = mounted()
    s.receive_upstream(publish(M + "x", b"", v5=True, props={Prop.SUBSCRIPTION_IDENTIFIER: [2]}))
    topic, props, _ = one(s.out_client)
    assert topic == "x" and props == {Prop.SUBSCRIPTION_IDENTIFIER: [2]}


def test_large_packets_keep_their_length_right() -> None:
    s, _, _ = mounted()
    big = b"x" * 300_000
    s.receive_client(publish("t", big, v5=True))
    s.receive_client(publish("t", big, v5=True))
    packets = split_packets(s.out_upstream)  # fails unless every remaining length is right
    assert len(packets) == 2
    for packet in packets:
        pub = decode_publish(packet, 0, len(packet), True)
        assert pub.topic == M + "t" and packet[pub.payload_start :] == big


def test_mountpoint_problems() -> None:
    assert mountpoint_problem(M) is None
    assert mountpoint_problem("ff/v1/team1/c") is not None
    assert mountpoint_problem("ff/+/c/") is not None
    assert mountpoint_problem("$SYS/") is not None


level = st.text(alphabet=st.sampled_from("ab/+#$c01 "), max_size=12)


@given(level)
def test_no_client_topic_maps_outside_the_mount(topic: str) -> None:
    if topic_levels(topic) is None:
        return
    upstream = encode_publish(0, False, False, M + topic, 0, None, b"")
    assert decode_publish(upstream, 0, len(upstream), False).topic.startswith(M)
    assert unmount_topic(M, M + topic) == topic


@given(level, st.sampled_from(["", "$share/g/"]))
def test_no_client_filter_reaches_outside_the_mount(inner: str, share: str) -> None:
    if filter_levels(inner) is None:
        return
    mapped = mount_filter(M, share + inner)
    body = mapped.split("/", 2)[2] if share else mapped
    assert body.startswith(M)
    # Whatever the filter matches upstream is under the mount or is the mount's own parent level
    # (matched by a trailing "#"), which unmount_topic refuses.
    assert unmount_topic(M, M.rstrip("/")) is None


@pytest.mark.parametrize(
    ("upstream_info", "client_info"),
    [(f"{M}responses/", "responses/"), ("ff/v1/team2/c/responses/", None), (M, None), (None, None)],
)
def test_connack_response_information_is_shown_inside_the_mount(
    upstream_info: str | None, client_info: str | None
) -> None:
    """The basis of response topics the client builds: stripped like a delivered topic, dropped when it is
    not under the mount (the client could not use it)."""
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(encode_connect(Connect(5, True, 60, "c1@team1", username="c1@team1")))
    s.auth_done(AuthResult(True, "c1@team1", AllowAll(), "team1", mountpoint=M))
    s.upstream_connected()
    props: dict[int, object] = {} if upstream_info is None else {Prop.RESPONSE_INFORMATION: upstream_info}
    s.receive_upstream(encode_connack(True, False, 0, props))
    (down,) = s.out_client
    connack = decode_connack(down, 0, len(down), True)
    assert connack.properties.get(Prop.RESPONSE_INFORMATION) == client_info
