"""Access decisions the policy does not know yet (the platform decides): the session holds, asks, resumes.

A policy answering None makes the session hold that packet and everything after it in the same
direction, ask with a CheckAccess action and go on, in order, when access_decided brings the answer.
"""

from __future__ import annotations

import pytest

from broker.mqtt.packets import (
    Connect,
    PacketType,
    Will,
    decode_ack,
    decode_connack,
    decode_publish,
    decode_suback,
    decode_subscribe,
    encode_connack,
    encode_connect,
    encode_suback,
)
from broker.session import AuthResult, CheckAccess, Close, OpenUpstream, SessionSettings, State
from tests.support.mqtt_bytes import publish, split_packets, subscribe
from tests.support.session_driver import DrivenSession


class AskingPolicy:
    """Knows nothing until told: every unknown check answers None (as the platform policy does)."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], bool] = {}

    def check_publish(self, topic: str, retain: bool = False) -> bool | None:
        return self.known.get(("publish", topic))

    def check_subscribe(self, topic_filter: str) -> bool | None:
        return self.known.get(("subscribe", topic_filter))

    def check_receive(self, topic: str) -> bool | None:
        return self.known.get(("deliver", topic))


def established(v5: bool = True, policy: AskingPolicy | None = None, will: Will | None = None) -> DrivenSession:
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(
        encode_connect(Connect(5 if v5 else 4, True, 60, "alice", will=will, username="alice", password=b"pw"))
    )
    s.actions.clear()
    s.auth_done(AuthResult(True, "alice", policy or AskingPolicy(), "team1"))
    if will is not None:
        return s
    assert s.actions == [OpenUpstream()]
    s.actions.clear()
    s.upstream_connected()
    s.out_upstream.clear()
    s.receive_upstream(encode_connack(v5, False, 0))
    s.out_client.clear()
    assert s.state is State.ESTABLISHED
    return s


def topics(packets: list[bytes], v5: bool = True) -> list[str]:
    return [decode_publish(p, 0, len(p), v5).topic for p in packets if p[0] >> 4 == PacketType.PUBLISH]


@pytest.mark.parametrize("v5", [True, False])
def test_publish_waits_for_the_decision_and_keeps_order(v5: bool) -> None:
    s = established(v5)
    s.receive_client(publish("a", b"1", v5=v5) + publish("b", b"2", v5=v5) + publish("a", b"3", v5=v5))
    assert s.actions == [CheckAccess("publish", "a", False)]
    assert s.out_upstream == [] and not s.reading_client
    s.receive_client(publish("c", b"4", v5=v5))  # read before the I/O layer paused: waits behind
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "a", False), True)
    assert topics(split_packets(s.out_upstream), v5) == ["a"]
    assert s.actions == [CheckAccess("publish", "b", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "b", False), False)
    assert s.actions == [CheckAccess("publish", "c", False)]  # the third "a" used the answer already given
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "c", False), True)
    assert topics(split_packets(s.out_upstream), v5) == ["a", "a", "c"]
    assert s.reading_client and s.stats.msgs_in == 4 and s.stats.denied_publish == 1
    assert s.stats.packets_in[PacketType.PUBLISH] == 4  # each counted once, holds or not


def test_refused_qos1_publish_after_a_decision_is_acked_in_order() -> None:
    s = established(True)
    s.receive_client(publish("x", b"", v5=True, qos=1, packet_id=7))
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "x", False), False)
    (ack,) = s.out_client
    assert decode_ack(ack, 0, len(ack), True).reason_code == 0x87
    assert s.out_upstream == []


def test_subscribe_asks_filter_by_filter_and_merges() -> None:
    policy = AskingPolicy()
    s = established(True, policy)
    s.receive_client(subscribe([("a/#", 1), ("b/#", 1)], v5=True))
    assert s.actions == [CheckAccess("subscribe", "a/#", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("subscribe", "a/#", False), True)
    assert s.actions == [CheckAccess("subscribe", "b/#", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("subscribe", "b/#", False), False)
    (up,) = s.out_upstream
    assert decode_subscribe(up, 0, len(up), True).filters == [("a/#", 1)]
    s.receive_upstream(encode_suback(True, 1, [1]))
    (down,) = s.out_client
    assert decode_suback(down, 0, len(down), True).reason_codes == [1, 0x87]
    assert s.stats.denied_subscribe == 1  # counted once, not once per round trip


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("answer", [None, False, True])
def test_a_subscribe_of_the_most_filters_asks_each_once_and_is_answered(v5: bool, answer: bool | None) -> None:
    """A platform that does not answer (None: an outage; nothing is cached) or caches nothing: every filter
    of a SUBSCRIBE of max_filters_per_packet is asked once, then it is answered. Before, the answers were
    dropped after 64 of them and the SUBSCRIBE asked again from its first filter without end."""
    s = established(v5)
    count = s.settings.decode_limits.filters
    filters = [(f"f/{i}", 1) for i in range(count)]
    s.receive_client(subscribe(filters, v5=v5))
    asked: list[str] = []
    while s.actions and len(asked) <= 2 * count:
        (check,) = s.actions
        assert isinstance(check, CheckAccess)
        s.actions.clear()
        asked.append(check.topic)
        s.access_decided(check, answer)
    assert asked == [f for f, _ in filters]
    if answer:
        (up,) = s.out_upstream
        assert len(decode_subscribe(up, 0, len(up), v5).filters) == count
    else:
        (down,) = s.out_client
        assert decode_suback(down, 0, len(down), v5).reason_codes == [0x87 if v5 else 0x80] * count
        assert s.stats.denied_subscribe == count


def test_a_delivery_decided_meanwhile_keeps_the_answers_a_held_subscribe_needs() -> None:
    s = established(True)
    s.receive_client(subscribe([("a/#", 1), ("b/#", 1)], v5=True))
    s.access_decided(CheckAccess("subscribe", "a/#", False), None)
    s.actions.clear()
    s.receive_upstream(publish("d/1", b"1", v5=True))  # a delivery asked and answered: its read ends
    assert s.actions == [CheckAccess("deliver", "d/1", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("deliver", "d/1", False), True)
    assert topics(split_packets(s.out_client)) == ["d/1"]
    s.access_decided(CheckAccess("subscribe", "b/#", False), None)
    assert s.actions == []  # a/# was not asked again
    (down,) = s.out_client[1:]
    assert decode_suback(down, 0, len(down), True).reason_codes == [0x87, 0x87]


def test_delivery_waits_in_order_and_pauses_the_upstream() -> None:
    s = established(True)
    s.receive_upstream(publish("d/1", b"1", v5=True) + publish("d/2", b"2", v5=True))
    assert s.actions == [CheckAccess("deliver", "d/1", False)] and not s.reading_upstream
    s.receive_upstream(publish("d/1", b"3", v5=True))
    s.actions.clear()
    s.access_decided(CheckAccess("deliver", "d/1", False), True)
    assert s.actions == [CheckAccess("deliver", "d/2", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("deliver", "d/2", False), False)
    assert topics(split_packets(s.out_client)) == ["d/1", "d/1"]
    assert s.reading_upstream and s.stats.denied_deliver == 1


@pytest.mark.parametrize("side", ["upstream", "client"])
def test_a_read_of_many_packets_held_one_by_one_goes_on_in_its_own_list(side: str) -> None:
    # One read, 600 packets, each on a topic of its own (a cold delivery check each, or a publish check): every
    # packet is held in turn, in order, and resumed where it stopped in the read's own list of packet ends. A
    # copy of the rest per hold cost O(n) each, and the copies were young objects the next gen-0 collection
    # walked (64 subscribers with 400 held each: 0.8 ms per collection, a stall of every session).
    s = established(True)
    action = "deliver" if side == "upstream" else "publish"
    names = [f"t/{i}" for i in range(600)]
    data = b"".join(publish(t, b"x", v5=True) for t in names)
    (s.receive_upstream if side == "upstream" else s.receive_client)(data)
    lists = set()
    for t in names:
        assert s.actions == [CheckAccess(action, t, False)]
        s.actions.clear()
        held = s._held_upstream if side == "upstream" else s._held_client
        assert held is not None
        lists.add(id(held[1]))
        s.access_decided(CheckAccess(action, t, False), True)
    assert len(lists) == 1  # the same list all along, never a copy
    out = s.out_client if side == "upstream" else s.out_upstream
    assert topics(split_packets(out)) == names
    assert (s.reading_upstream if side == "upstream" else s.reading_client) and not s.actions


def test_denied_qos2_delivery_after_a_decision_is_completed_upstream() -> None:
    s = established(True)
    s.receive_upstream(publish("d", b"", v5=True, qos=2, packet_id=5))
    s.actions.clear()
    s.access_decided(CheckAccess("deliver", "d", False), False)
    (rec,) = s.out_upstream
    assert rec[0] >> 4 == PacketType.PUBREC and s.out_client == []


@pytest.mark.parametrize(("allowed", "code"), [(True, 0), (False, 0x87)])
def test_will_waits_for_the_decision(allowed: bool, code: int) -> None:
    s = established(True, will=Will("wills/alice", b"gone", 1, False))
    assert s.state is State.AUTHENTICATING
    assert s.actions == [CheckAccess("publish", "wills/alice", False)]
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "wills/alice", False), allowed)
    if allowed:
        assert s.actions == [OpenUpstream()]
    else:
        (connack,) = s.out_client
        assert decode_connack(connack, 0, len(connack), True).reason_code == code
        assert isinstance(s.actions[-1], Close)


def test_a_protocol_error_after_a_held_packet_comes_after_it() -> None:
    s = established(True)
    s.receive_client(publish("a", b"1", v5=True) + b"\x00\x00")  # reserved type 0 after it
    assert s.state is State.ESTABLISHED
    s.actions.clear()
    s.access_decided(CheckAccess("publish", "a", False), True)
    assert topics(split_packets(s.out_upstream)) == ["a"]
    assert s.closed


def test_too_much_data_behind_a_check_is_a_protocol_error() -> None:
    s = established(True)
    s.receive_client(publish("a", b"", v5=True))
    for _ in range(5):
        s.receive_client(publish("b", b"x" * 1_000_000, v5=True))
    assert s.closed


def test_an_answer_after_the_close_does_nothing() -> None:
    s = established(True)
    s.receive_client(publish("a", b"", v5=True))
    s.connection_closed()
    s.access_decided(CheckAccess("publish", "a", False), True)
    assert s.out_upstream == []
