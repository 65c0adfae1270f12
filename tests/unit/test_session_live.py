"""Rights that change while the client stays connected (Session.replace_policy, Session.disconnect)."""

from __future__ import annotations

import pytest

from broker.mqtt.packets import (
    Connect,
    PacketType,
    decode_disconnect,
    decode_suback,
    decode_unsubscribe,
    encode_connack,
    encode_connect,
    encode_suback,
    encode_unsuback,
)
from broker.mqtt.reasons import DisconnectReason
from broker.session import AuthResult, Close, SessionSettings
from tests.support.mqtt_bytes import publish, split_packets, subscribe
from tests.support.session_driver import DrivenSession


class Readable:
    """A policy that grants the filters and topics under the given prefixes (publish and read alike)."""

    def __init__(self, *prefixes: str) -> None:
        self.prefixes = prefixes

    def _ok(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.prefixes)

    def check_publish(self, topic: str, retain: bool = False) -> bool:
        return self._ok(topic)

    def check_receive(self, topic: str) -> bool:
        return self._ok(topic)

    def check_subscribe(self, topic_filter: str) -> bool:
        return self._ok(topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter)


def established(v5: bool, policy: Readable, mount: str = "", settings: SessionSettings | None = None) -> DrivenSession:
    s = DrivenSession(settings or SessionSettings(), peer="test")
    s.receive_client(encode_connect(Connect(5 if v5 else 4, True, 60, "alice", username="alice", password=b"pw")))
    s.auth_done(AuthResult(True, "alice", policy, "team1", mountpoint=mount))
    s.upstream_connected()
    s.receive_upstream(encode_connack(v5, False, 0))
    s.out_client.clear()
    s.out_upstream.clear()
    s.actions.clear()
    return s


def packets(out: list[bytes]) -> list[bytes]:
    got = split_packets(b"".join(out))
    out.clear()
    return got


def subscribed(s: DrivenSession, v5: bool, filters: list[str], packet_id: int = 1) -> None:
    s.receive_client(subscribe([(f, 1) for f in filters], v5=v5, packet_id=packet_id))
    assert [p[0] >> 4 for p in packets(s.out_upstream)] == [PacketType.SUBSCRIBE]
    s.receive_upstream(encode_suback(v5, packet_id, [1] * len(filters)))
    assert [decode_suback(p, 0, len(p), v5).reason_codes for p in packets(s.out_client)] == [[1] * len(filters)]


@pytest.mark.parametrize("v5", [True, False])
def test_a_revoked_subscription_is_unsubscribed_upstream_and_its_answer_kept(v5: bool) -> None:
    s = established(v5, Readable("a/", "b/", "$share/g/b/"))
    subscribed(s, v5, ["a/#", "b/#", "$share/g/b/x"])
    assert s.subscriptions == ["a/#", "b/#", "$share/g/b/x"]
    assert s.replace_policy(Readable("a/")) == ["b/#", "$share/g/b/x"]
    (unsub,) = packets(s.out_upstream)
    decoded = decode_unsubscribe(unsub, 0, len(unsub), v5)
    assert (decoded.packet_id, decoded.filters) == (65535, ["b/#", "$share/g/b/x"])
    assert s.subscriptions == ["a/#"]
    s.receive_upstream(encode_unsuback(v5, 65535, [0, 0]))
    assert s.out_client == []  # the client never asked: the UNSUBACK stays here
    # Deliveries still on their way on the revoked filter are checked against the new rights.
    s.receive_upstream(publish("b/x", b"late", v5=v5) + publish("a/x", b"ok", v5=v5))
    assert [p for p in packets(s.out_client)] == [publish("a/x", b"ok", v5=v5)]
    assert not s.closed


@pytest.mark.parametrize("v5", [True, False])
def test_allowed_topics_remembered_before_are_checked_again(v5: bool) -> None:
    s = established(v5, Readable("a/", "b/"))
    s.receive_client(publish("b/t", b"1", v5=v5))
    s.receive_upstream(publish("b/t", b"1", v5=v5))
    assert len(packets(s.out_upstream)) == 1 and len(packets(s.out_client)) == 1  # both cached as allowed now
    s.replace_policy(Readable("a/"))
    s.receive_client(publish("b/t", b"2", v5=v5, qos=1, packet_id=7))
    assert packets(s.out_upstream) == []
    s.receive_upstream(publish("b/t", b"2", v5=v5))
    acks = packets(s.out_client)
    assert [p[0] >> 4 for p in acks] == [PacketType.PUBACK]  # our refusal of the publish; no delivery
    assert s.stats.denied_publish == 1 and s.stats.denied_deliver == 1


def test_our_packet_id_avoids_the_clients_flows_in_progress() -> None:
    s = established(True, Readable("a/", "b/"))
    subscribed(s, True, ["b/#"], packet_id=65535)  # answered: 65535 is free again
    s.receive_client(subscribe([("a/1", 0)], v5=True, packet_id=65535))  # its SUBACK has not come yet
    packets(s.out_upstream)
    s.replace_policy(Readable("a/"))
    (unsub,) = packets(s.out_upstream)
    assert decode_unsubscribe(unsub, 0, len(unsub), True).packet_id == 65534
    # The client's own SUBACK still reaches it; ours does not.
    s.receive_upstream(encode_suback(True, 65535, [0]) + encode_unsuback(True, 65534, [0]))
    assert len(packets(s.out_client)) == 1


def test_a_mounted_session_unsubscribes_the_mounted_filter() -> None:
    s = established(True, Readable("a/", "b/"), mount="ff/v1/team1/c/")
    subscribed(s, True, ["b/#", "a/#"])
    s.replace_policy(Readable("a/"))
    (unsub,) = packets(s.out_upstream)
    assert decode_unsubscribe(unsub, 0, len(unsub), True).filters == ["ff/v1/team1/c/b/#"]


def test_unsubscribed_filters_are_not_revoked_again() -> None:
    s = established(True, Readable("a/", "b/"))
    subscribed(s, True, ["b/#"])
    s.receive_client(encode_unsubscribe_packet(["b/#"], 2))
    packets(s.out_upstream)
    assert s.subscriptions == []
    assert s.replace_policy(Readable("a/")) == [] and s.out_upstream == []


def encode_unsubscribe_packet(filters: list[str], packet_id: int) -> bytes:
    from broker.mqtt.packets import Unsubscribe, encode_unsubscribe

    return encode_unsubscribe(Unsubscribe(packet_id, filters, {}), True)


@pytest.mark.parametrize("v5", [True, False])
def test_disconnect_tells_a_v5_client_why(v5: bool) -> None:
    s = established(v5, Readable("a/"))
    s.disconnect(DisconnectReason.ADMINISTRATIVE_ACTION, "kicked by an operator")
    assert s.closed and s.actions == [Close("kicked by an operator")]
    if v5:
        (pkt,) = packets(s.out_client)
        d = decode_disconnect(pkt, 0, len(pkt), True)
        assert d.reason_code == 0x98
    else:
        assert s.out_client == []  # MQTT 3.1.1 has no DISCONNECT from the server: just the close
    s.disconnect(DisconnectReason.NOT_AUTHORIZED, "again")  # closed is final
    assert s.actions == [Close("kicked by an operator")]


@pytest.mark.parametrize("v5", [True, False])
def test_subscriptions_over_the_bound_are_refused(v5: bool) -> None:
    s = established(v5, Readable("a/"), settings=SessionSettings(max_subscriptions=2))
    subscribed(s, v5, ["a/1", "a/2"])
    s.receive_client(subscribe([("a/3", 0)], v5=v5, packet_id=2))
    assert s.out_upstream == []
    (ack,) = packets(s.out_client)
    assert decode_suback(ack, 0, len(ack), v5).reason_codes == [0x97 if v5 else 0x80]
    subscribed(s, v5, ["a/1"], packet_id=3)  # one already held does not count twice


def test_replace_policy_on_a_closed_session_does_nothing() -> None:
    s = established(True, Readable("a/"))
    s.disconnect(DisconnectReason.NOT_AUTHORIZED, "gone")
    assert s.replace_policy(Readable()) == []
