"""Per-flow state of one session: ack ordering, QoS 2 refusals, SUBACK merging, topic aliases, subscriptions.

Each class keeps the state of one kind of packet flow and answers one question about it; the
session (``broker.session.core``) decides when to ask. None of them touches I/O or logs.
The allowed-topic caches are :class:`acl.cache.BoundedCache` instances, shared with the ACL engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.mqtt.errors import TopicAliasInvalid
from broker.mqtt.limits import LimitExceeded
from broker.mqtt.packets import SubAck, encode_suback
from broker.mqtt.reasons import SubackReason


class AckOrder:
    """Acks must reach the client in PUBLISH order [MQTT-4.6.0-2/3].

    The front broker answers refused publishes itself; such an ack must wait behind the
    upstream's acks of publishes forwarded before it. ``inflight`` maps the packet id of each
    forwarded QoS 1/2 publish to its sequence number (the relay hot path fills it inline:
    ``seq += 1; inflight[packet_id] = seq``); ``held`` keeps our own acks with the sequence
    number they wait for.
    """

    __slots__ = ("held", "inflight", "seq")

    def __init__(self) -> None:
        self.inflight: dict[int, int] = {}  # packet id -> sequence number, in forwarding order
        self.held: list[tuple[int, bytes]] = []  # (sequence number it waits for, ack)
        self.seq = 0

    def refused(self, ack: bytes) -> bytes | None:
        """Our ack for a refused publish: returned to send now, or held (None) behind earlier ones."""
        if self.inflight:
            self.held.append((self.seq, ack))
            return None
        return ack

    def release(self) -> bytes:
        """Our held acks whose earlier forwarded publishes are all acknowledged now (call after a pop)."""
        first_open = next(iter(self.inflight.values()), None)
        held = self.held
        i = 0
        while i < len(held) and (first_open is None or held[i][0] < first_open):
            i += 1
        released = b"".join(ack for _, ack in held[:i])
        del held[:i]
        return released


class Qos2Refusals:
    """Packet ids of QoS 2 flows the front broker ended itself, so it also answers their PUBREL.

    One per direction: publishes of the client it refused (v3.1.1: PUBREC sent, PUBREL to
    answer with PUBCOMP), and deliveries it dropped on the client's behalf (upstream side).
    """

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: set[int] = set()

    def refuse(self, packet_id: int) -> None:
        self.ids.add(packet_id)

    def complete(self, packet_id: int) -> bool:
        """True (and forgotten) if ``packet_id``'s flow was one of ours: answer its PUBREL here."""
        if packet_id in self.ids:
            self.ids.discard(packet_id)
            return True
        return False


class SubackMerger:
    """SUBSCRIBEs forwarded in part: our refusal codes to put back into the upstream's SUBACK."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        # Per original filter position: None = forwarded upstream, int = our own refusal code.
        self.pending: dict[int, list[int | None]] = {}

    def expect(self, packet_id: int, codes: list[int | None]) -> None:
        self.pending[packet_id] = codes

    def merge(self, suback: SubAck, v5: bool) -> bytes | None:
        """The SUBACK to send the client instead (None: not one of ours, forward it as is)."""
        codes = self.pending.pop(suback.packet_id, None)
        if codes is None:
            return None
        upstream_codes = iter(suback.reason_codes)
        merged = [next(upstream_codes, SubackReason.FAILURE) if c is None else c for c in codes]
        return encode_suback(v5, suback.packet_id, merged, suback.properties)




class Subscriptions:
    """The client's granted subscriptions and the packet ids of its SUBSCRIBE/UNSUBSCRIBE flows.

    A revoked right is taken away upstream with an UNSUBSCRIBE the front broker sends on the client's
    behalf; its packet id must not be one the client is using for a flow of its own, and its UNSUBACK
    is answered here (the client never asked).
    """

    __slots__ = ("_client_ids", "_own_ids", "filters", "maximum")

    def __init__(self, maximum: int = 10_000) -> None:
        # Filters one session may hold (limits.max_subscriptions): the front broker remembers each, to
        # revoke it when rights change.
        self.maximum = maximum
        self.filters: dict[str, str] = {}  # client-visible filter -> the filter sent upstream
        self._client_ids: set[int] = set()  # the client's SUBSCRIBE/UNSUBSCRIBE flows in progress
        self._own_ids: set[int] = set()  # our UNSUBSCRIBEs in progress

    def full(self, client_filters: list[str]) -> bool:
        """Would granting these filters (some perhaps held already) go over the maximum?"""
        filters = self.filters
        return len(filters) + sum(f not in filters for f in client_filters) > self.maximum

    def granted(self, packet_id: int, filters: list[tuple[str, str]]) -> None:
        """A SUBSCRIBE goes upstream with these (client filter, upstream filter) pairs."""
        self._client_ids.add(packet_id)
        for client_filter, upstream_filter in filters:
            self.filters[client_filter] = upstream_filter

    def unsubscribed(self, packet_id: int, filters: list[str]) -> None:
        self._client_ids.add(packet_id)
        for client_filter in filters:
            self.filters.pop(client_filter, None)

    def acked(self, packet_id: int) -> bool:
        """A SUBACK or UNSUBACK from upstream: True if it answers one of our own UNSUBSCRIBEs."""
        if packet_id in self._own_ids:
            self._own_ids.discard(packet_id)
            return True
        self._client_ids.discard(packet_id)
        return False

    def revoke(self, client_filters: list[str], in_use: Iterable[int] = ()) -> tuple[int, list[str]] | None:
        """Forget these filters; the packet id and upstream filters of the UNSUBSCRIBE that takes them away
        (None when no packet id is free: every id is in use by a flow). ``in_use``: the client's other
        flows in progress (its QoS 1/2 PUBLISHes): MQTT wants an id no flow of the client uses."""
        upstream = [self.filters.pop(f) for f in client_filters if f in self.filters]
        if not upstream:
            return None
        busy = self._client_ids | self._own_ids | set(in_use)
        for packet_id in range(65535, 0, -1):  # clients count up from 1: start at the other end
            if packet_id not in busy:
                self._own_ids.add(packet_id)
                return packet_id, upstream
        return None


class TopicAliases:
    """The client's topic-alias map (client to front broker); the upstream never sees aliases."""

    __slots__ = ("max_topic_length", "maximum", "topics")

    def __init__(self, max_topic_length: int = 1_024) -> None:
        self.maximum = 0  # what the upstream's CONNACK offered the client
        # Each alias-only PUBLISH is sent upstream with its full topic: a cap on what an alias may stand
        # for caps that amplification (8 bytes in, a 65 KB topic out) and keeps its topics cacheable.
        self.max_topic_length = max_topic_length
        self.topics: dict[int, str] = {}

    def resolve(self, alias: int, topic: str) -> str:
        """The full topic of a PUBLISH carrying ``alias`` (setting the alias when ``topic`` is given)."""
        if alias > self.maximum:
            raise TopicAliasInvalid(f"topic alias {alias} above the maximum {self.maximum}")
        if topic:
            if len(topic) > self.max_topic_length or len(topic.encode()) > self.max_topic_length:
                raise LimitExceeded(
                    "alias_topic_length", f"a topic alias for a topic longer than {self.max_topic_length} bytes"
                )
            self.topics[alias] = topic
            return topic
        known = self.topics.get(alias)
        if known is None:
            raise TopicAliasInvalid(f"topic alias {alias} was never set")
        return known
