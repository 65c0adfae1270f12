"""The dispatch tables of a draining session (a SIGTERM, ``ctl drain``): what changes while the process stops.

A drain has two phases, decided by :class:`broker.session.base.SessionBase` (``start_drain``,
``drain_tick``): first everything is relayed as before, so what the client wrote before the signal still
goes upstream; then the client's new PUBLISH, SUBSCRIBE and UNSUBSCRIBE packets are dropped (never
acknowledged: the client still holds its QoS 1/2 messages and sends them again on its next connection)
while acks keep flowing both ways, until every message forwarded is acknowledged. Throughout, the QoS 2
flows of the client's publishes are followed to their PUBCOMP, so the drain does not end between the
PUBREC and the PUBREL that makes the upstream deliver the message.

The tables are built from the session's own (mounted or not) when the drain starts; the hot paths of a
session that is not draining are untouched. No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.mqtt.packets import PacketType, decode_ack
from broker.mqtt.peek import ack_packet_id

Handler = Callable[[Any, bytes, int, int], "bytes | None"]
Table = tuple[Handler, ...]

RELAYING = 1  # phase one: everything relayed as before
SETTLING = 2  # phase two: new work dropped, waiting for the acks of what was forwarded


class DrainState:
    """One session's drain: its phase, the QoS 2 flows still open, the packets dropped in phase two."""

    __slots__ = ("dropped", "flows", "phase")

    def __init__(self) -> None:
        self.phase = RELAYING
        self.flows: set[int] = set()  # packet ids of the client's QoS 2 publishes between PUBREC and PUBCOMP
        self.dropped = 0


def _ack_failed(chunk: bytes, start: int, end: int, v5: bool) -> bool:
    """A v5 ack with a failure reason code (0x80 or above) ends its flow (no PUBREL follows a failed PUBREC)."""
    return v5 and end - start > 4 and decode_ack(chunk, start, end, v5).reason_code >= 0x80


def _upstream_pubrec(original: Handler, flows: set[int]) -> Handler:
    def pubrec(session: Any, chunk: bytes, start: int, end: int) -> bytes | None:
        if not _ack_failed(chunk, start, end, session.v5):
            flows.add(ack_packet_id(chunk, start, end, session.v5))  # open until its PUBCOMP
        return original(session, chunk, start, end)

    return pubrec


def _upstream_pubcomp(original: Handler, flows: set[int]) -> Handler:
    def pubcomp(session: Any, chunk: bytes, start: int, end: int) -> bytes | None:
        flows.discard(ack_packet_id(chunk, start, end, session.v5))
        return original(session, chunk, start, end)

    return pubcomp


def _client_pubrel(original: Handler, flows: set[int]) -> Handler:
    def pubrel(session: Any, chunk: bytes, start: int, end: int) -> bytes | None:
        answer = original(session, chunk, start, end)
        if answer is None:  # forwarded (not a flow the front broker refused and answers itself)
            flows.add(ack_packet_id(chunk, start, end, session.v5))
        return answer

    return pubrel


def _dropped(session: Any, chunk: bytes, start: int, end: int) -> bytes:
    """A packet the client sent after the drain stopped taking new work: not forwarded, not answered."""
    session._drain.dropped += 1
    return b""


def relaying_tables(client: Table, upstream: Table, flows: set[int]) -> tuple[Table, Table]:
    """Phase one: ``client`` and ``upstream`` as they are, QoS 2 flows followed in ``flows``."""
    client_table = list(client)
    client_table[PacketType.PUBREL] = _client_pubrel(client[PacketType.PUBREL], flows)
    upstream_table = list(upstream)
    upstream_table[PacketType.PUBREC] = _upstream_pubrec(upstream[PacketType.PUBREC], flows)
    upstream_table[PacketType.PUBCOMP] = _upstream_pubcomp(upstream[PacketType.PUBCOMP], flows)
    return tuple(client_table), tuple(upstream_table)


def settling_table(client: Table) -> Table:
    """Phase two: the client's new work (PUBLISH, SUBSCRIBE, UNSUBSCRIBE) dropped, its acks still relayed."""
    dropped = (PacketType.PUBLISH, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE)
    return tuple(_dropped if ptype in dropped else handler for ptype, handler in enumerate(client))
