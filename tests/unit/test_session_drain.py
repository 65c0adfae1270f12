"""The drain's decisions in the Session (Sans-I/O): what is still relayed, what is dropped, when it ends, and what
each side is told. The I/O side (lingering, the deadline) is in tests/e2e/test_drain.py."""

from __future__ import annotations

import pytest

from broker.mqtt.packets import PacketType, decode_disconnect, encode_ack
from broker.mqtt.reasons import DisconnectReason
from broker.session import Close, State
from tests.support.mqtt_bytes import publish, split_packets, subscribe
from tests.support.session_driver import DrivenSession
from tests.unit.test_session import handshake, new_session


class Draining(DrivenSession):
    """DrivenSession that also collects the outputs of the drain's entry points."""

    __slots__ = ()

    def start_drain(self) -> None:
        super().start_drain()
        self._collect()

    def drain_tick(self, quiet: bool, reading_over: bool) -> None:
        super().drain_tick(quiet, reading_over)
        self._collect()

    def drain_expired(self) -> None:
        super().drain_expired()
        self._collect()


def established(v5: bool) -> Draining:
    s = handshake(v5=v5)
    s.__class__ = Draining  # same slots: the handshake helper builds a DrivenSession
    return s  # type: ignore[return-value]


def take(out: list[bytes]) -> list[bytes]:
    packets = split_packets(out)
    out.clear()
    return packets


def disconnect_code(packet: bytes) -> int:
    assert packet[0] == 0xE0, packet
    return decode_disconnect(packet, 0, len(packet), True).reason_code


def closed_once(s: DrivenSession) -> bool:
    return s.state is State.CLOSED and [a for a in s.actions if isinstance(a, Close)] == [Close("server shutting down")]


def test_handshake_in_progress_closes_at_once() -> None:
    s = new_session()
    s.__class__ = Draining
    s.receive_client(b"\x10")  # half a CONNECT
    s.start_drain()
    assert s.state is State.CLOSED and not s.draining
    assert s.out_client == [] and s.out_upstream == []


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_relays_until_acknowledged_then_says_goodbye(v5: bool) -> None:
    s = established(v5)
    s.start_drain()
    assert s.draining and s.state is State.ESTABLISHED and s.actions == []
    first = publish("t/a", b"1", v5=v5, qos=1, packet_id=1)
    s.receive_client(first)
    assert take(s.out_upstream) == [first]
    s.drain_tick(quiet=False, reading_over=False)  # the client still sends, a message is in flight
    second = publish("t/a", b"2", v5=v5, qos=1, packet_id=2)
    s.receive_client(second)
    assert take(s.out_upstream) == [second]  # still taken: written before the drain stopped reading
    s.drain_tick(quiet=True, reading_over=False)  # quiet: no new work from now on, two acks awaited
    third = publish("t/a", b"3", v5=v5, qos=1, packet_id=3)
    s.receive_client(third)
    assert s.out_upstream == [] and s.out_client == []  # dropped, not acknowledged: the client keeps it
    acks = [encode_ack(PacketType.PUBACK, v5, 1), encode_ack(PacketType.PUBACK, v5, 2)]
    s.receive_upstream(acks[0])
    s.drain_tick(quiet=True, reading_over=False)
    assert s.state is State.ESTABLISHED  # one still in flight
    s.receive_upstream(acks[1])
    assert take(s.out_client) == acks
    s.drain_tick(quiet=True, reading_over=False)
    assert closed_once(s)
    if v5:
        assert [disconnect_code(p) for p in take(s.out_client)] == [DisconnectReason.SERVER_SHUTTING_DOWN]
        # The will is published as on any close the client did not ask for (MQTT 5 3.1.2.5): 0x04 upstream.
        assert [disconnect_code(p) for p in take(s.out_upstream)] == [DisconnectReason.WITH_WILL]
    else:
        assert s.out_client == [] and s.out_upstream == []  # 3.1.1: the close says it (a DISCONNECT drops the will)


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_nothing_in_flight_ends_at_the_first_tick(v5: bool) -> None:
    s = established(v5)
    s.start_drain()
    s.receive_client(publish("t/a", b"0", v5=v5))  # QoS 0: nothing to wait for
    assert len(take(s.out_upstream)) == 1
    s.drain_tick(quiet=False, reading_over=False)
    assert closed_once(s)


def test_settling_drops_new_work_but_relays_acks_both_ways() -> None:
    s = established(True)
    s.receive_client(subscribe([("t/#", 1)], v5=True, packet_id=7))
    s.out_upstream.clear()
    s.receive_client(publish("t/a", b"1", v5=True, qos=1, packet_id=1))
    s.out_upstream.clear()
    s.start_drain()
    s.drain_tick(quiet=True, reading_over=False)
    s.receive_client(subscribe([("u/#", 1)], v5=True, packet_id=8))
    s.receive_client(publish("t/b", b"2", v5=True, qos=2, packet_id=2))
    assert s.out_upstream == [] and s.out_client == []
    delivery = publish("t/x", b"d", v5=True, qos=1, packet_id=40)
    s.receive_upstream(delivery)
    assert take(s.out_client) == [delivery]  # deliveries still reach the client
    ack = encode_ack(PacketType.PUBACK, True, 40)
    s.receive_client(ack)
    assert take(s.out_upstream) == [ack]  # and its acks the upstream
    s.receive_upstream(encode_ack(PacketType.PUBACK, True, 1))
    s.drain_tick(quiet=True, reading_over=False)
    assert closed_once(s)
    assert s._drain is not None and s._drain.dropped == 2


def test_qos2_flow_is_followed_to_its_pubcomp() -> None:
    v5 = True
    s = established(v5)
    s.start_drain()
    s.receive_client(publish("t/a", b"1", v5=v5, qos=2, packet_id=5))
    s.out_upstream.clear()
    s.receive_upstream(encode_ack(PacketType.PUBREC, v5, 5))
    s.drain_tick(quiet=True, reading_over=False)
    assert s.state is State.ESTABLISHED  # the upstream delivers a QoS 2 message on PUBREL: wait for it
    pubrel = encode_ack(PacketType.PUBREL, v5, 5)
    s.receive_client(pubrel)
    assert take(s.out_upstream) == [pubrel]
    s.drain_tick(quiet=True, reading_over=False)
    assert s.state is State.ESTABLISHED
    s.receive_upstream(encode_ack(PacketType.PUBCOMP, v5, 5))
    s.drain_tick(quiet=True, reading_over=False)
    assert closed_once(s)


def test_a_packet_half_read_keeps_the_client_read_until_the_window_passes() -> None:
    s = established(True)
    s.start_drain()
    whole = publish("t/a", b"x" * 100, v5=True, qos=1, packet_id=1)
    s.receive_client(whole[:10])
    s.drain_tick(quiet=True, reading_over=False)
    s.receive_client(whole[10:])
    assert take(s.out_upstream) == [whole]  # its rest still taken: it was on its way before the signal
    s.receive_client(whole[:10])
    s.drain_tick(quiet=True, reading_over=True)  # the window passed: no more
    s.receive_client(whole[10:])
    assert s.out_upstream == []


def test_expired_ends_with_messages_in_flight() -> None:
    s = established(True)
    s.start_drain()
    s.receive_client(publish("t/a", b"1", v5=True, qos=1, packet_id=1))
    s.out_upstream.clear()
    for _ in range(3):
        s.drain_tick(quiet=True, reading_over=True)
    assert s.state is State.ESTABLISHED  # the upstream never acknowledged
    s.drain_expired()
    assert closed_once(s)
    assert [disconnect_code(p) for p in take(s.out_client)] == [DisconnectReason.SERVER_SHUTTING_DOWN]
