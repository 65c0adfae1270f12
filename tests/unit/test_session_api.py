"""The Session's surface as the I/O layer sees it: hand-over methods, the state table, the dispatch tables,
and the protocol decisions that used to live in the connection pump (timeouts, shutdown, limits)."""

from __future__ import annotations

import pytest

from broker.mqtt.packets import Connect, PacketType, decode_connack, decode_disconnect, encode_connack, encode_connect
from broker.mqtt.reasons import ConnackV3, ConnackV5, DisconnectReason
from broker.session import Authenticate, AuthResult, Close, OpenUpstream, Session, SessionSettings, State
from broker.session.api import TRANSITIONS
from broker.session.core import FROM_CLIENT, FROM_UPSTREAM


class AllowAll:
    def check_publish(self, topic: str, retain: bool = False) -> bool:
        return True

    def check_receive(self, topic: str) -> bool:
        return True

    def check_subscribe(self, topic_filter: str) -> bool:
        return True


def connect(v5: bool) -> bytes:
    return encode_connect(Connect(5 if v5 else 4, True, 60, "alice", username="alice", password=b"pw"))


def established(v5: bool) -> Session:
    s = Session(SessionSettings(), peer="test")
    s.receive_client(connect(v5))
    assert s.take_actions() == [Authenticate("alice", b"pw", "alice")]
    s.auth_done(AuthResult(True, "alice", AllowAll(), "team1"))
    assert s.take_actions() == [OpenUpstream()]
    s.upstream_connected()
    assert len(s.data_to_upstream()) == 1
    s.receive_upstream(encode_connack(v5, False, 0))
    assert s.state is State.ESTABLISHED
    assert len(s.data_to_client()) == 1
    return s


def test_hand_over_methods_give_each_output_once() -> None:
    s = Session(SessionSettings(), peer="test")
    assert s.data_to_client() == [] and s.data_to_upstream() == [] and s.take_actions() == []
    s.receive_client(connect(True))
    actions = s.take_actions()
    assert actions == [Authenticate("alice", b"pw", "alice")]
    assert s.take_actions() == []  # handed over: a second call gets nothing
    s.auth_done(AuthResult(True, "alice", AllowAll(), "team1"))
    s.take_actions()
    s.upstream_connected()
    (up,) = s.data_to_upstream()
    assert up[0] == PacketType.CONNECT << 4
    assert s.data_to_upstream() == []


def test_every_state_can_close_and_closed_is_final() -> None:
    for state, targets in TRANSITIONS.items():
        assert state is State.CLOSED or State.CLOSED in targets
    assert TRANSITIONS[State.CLOSED] == frozenset()
    # The forward path is the only way to ESTABLISHED.
    assert [s for s, t in TRANSITIONS.items() if State.ESTABLISHED in t] == [State.WAIT_CONNACK]


def test_a_transition_outside_the_table_is_a_bug() -> None:
    s = Session(SessionSettings(), peer="test")
    with pytest.raises(AssertionError, match="WAIT_CONNECT -> ESTABLISHED"):
        s._set_state(State.ESTABLISHED)


def test_dispatch_tables_name_every_packet_type() -> None:
    assert len(FROM_CLIENT) == len(FROM_UPSTREAM) == 16
    names = {t: (FROM_CLIENT[t].__name__, FROM_UPSTREAM[t].__name__) for t in PacketType}
    assert names[PacketType.UNSUBACK] == ("_client_server_only", "_upstream_unsuback")  # ours stay here
    assert names[PacketType.PUBCOMP] == ("_client_ack", "_upstream_forward")
    assert names[PacketType.PINGRESP] == ("_client_server_only", "_upstream_forward")
    assert names[PacketType.PUBLISH] == ("_client_publish", "_upstream_publish")


def test_connect_timeout_closes_only_while_waiting_for_connect() -> None:
    s = Session(SessionSettings(), peer="test")
    s.connect_timed_out(10)
    assert s.closed and s.stats.connect_result == "limit"
    assert s.take_actions() == [Close("connect timeout")]
    assert s.data_to_client() == []  # nothing was said: the client never spoke MQTT
    later = established(True)
    later.connect_timed_out(10)
    assert later.state is State.ESTABLISHED and later.take_actions() == []


@pytest.mark.parametrize("v5", [True, False])
def test_connack_timeout_refuses_with_server_unavailable(v5: bool) -> None:
    s = Session(SessionSettings(), peer="test")
    s.receive_client(connect(v5))
    s.auth_done(AuthResult(True, "alice", AllowAll(), "team1"))
    s.upstream_connected()
    s.take_actions()
    s.data_to_upstream()
    s.connack_timed_out(5)
    (out,) = s.data_to_client()
    code = decode_connack(out, 0, len(out), v5).reason_code
    assert code == (ConnackV5.SERVER_UNAVAILABLE if v5 else ConnackV3.SERVER_UNAVAILABLE)
    assert s.stats.connect_result == "upstream_unavailable"
    assert isinstance(s.take_actions()[-1], Close)


def test_connack_timeout_after_established_does_nothing() -> None:
    s = established(True)
    s.connack_timed_out(5)
    assert s.state is State.ESTABLISHED and s.data_to_client() == [] and s.take_actions() == []


@pytest.mark.parametrize("v5", [True, False])
def test_server_shutdown_tells_v5_clients_why(v5: bool) -> None:
    s = established(v5)
    s.server_shutdown()
    out = s.data_to_client()
    if v5:
        (packet,) = out
        assert decode_disconnect(packet, 0, len(packet), True).reason_code == DisconnectReason.SERVER_SHUTTING_DOWN
    else:
        assert out == []  # a v3.1.1 server never sends DISCONNECT
    assert s.take_actions() == [Close("server shutting down")]


def test_refuse_at_accept_is_a_limit() -> None:
    s = Session(SessionSettings(), peer="test")
    s.refuse_at_accept("max_connections (1) reached")
    assert s.stats.connect_result == "limit"
    assert s.take_actions() == [Close("max_connections (1) reached")]


def test_connection_closed_by_the_io_layer_asks_for_nothing() -> None:
    s = established(True)
    s.connection_closed()
    assert s.closed and s.take_actions() == []
    s.receive_client(b"\xc0\x00")
    assert s.data_to_upstream() == []
