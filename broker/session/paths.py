"""The session's full and cold packet paths: everything the relay's fast paths hand on.

A PUBLISH whose topic is not in the allowed-topic caches (or that carries properties) is
decoded, its alias resolved, checked and, with a mountpoint, moved under it; a delivery likewise;
SUBSCRIBE filters are checked one by one; acks, PUBREL, PINGREQ, DISCONNECT and the packets a
side must never send are handled here. Every handler has the dispatch-table signature
``(chunk, start, end) -> None | b"" | bytes`` (forward as is, drop, send these instead) and may
return :data:`HOLD`: the access policy does not know yet, the packet waits for ``CheckAccess``.
No I/O here; the tables and the fast paths are in :mod:`broker.session.core`.
"""

from __future__ import annotations

from broker.mqtt.errors import MalformedPacket, ProtocolViolation
from broker.mqtt.packets import (
    PacketType,
    Publish,
    Subscribe,
    Unsubscribe,
    check_fixed_flags,
    decode_ack,
    decode_disconnect,
    decode_publish,
    decode_suback,
    decode_subscribe,
    decode_unsubscribe,
    encode_ack,
    encode_disconnect,
    encode_publish,
    encode_suback,
    encode_subscribe,
    encode_unsubscribe,
)
from broker.mqtt.peek import ack_packet_id, header_packet_id, replace_publish_topic
from broker.mqtt.properties import Prop
from broker.mqtt.reasons import DisconnectReason, PubackReason, SubackReason
from broker.mqtt.topics import validate_topic_name
from broker.session.base import Allowed
from broker.session.handshake import Handshake
from broker.session.mount import checked, mount_filter, unmount_topic

HOLD = bytes(bytearray(b"\x00"))
"""A handler's answer "wait for the access decision" (compared by identity, never sent)."""

YIELD = bytes(bytearray(b"\x00"))
"""A handler's answer "this read spent its work budget: go on next turn" (compared by identity, never sent)."""

RATE_STOP = bytes(bytearray(b"\x00"))
"""A publish handler's answer "the rate limiter must look first" (compared by identity, never sent)."""

# Work-budget costs in about bytes decoded (settings.work_budget): a packet on a full path costs its size plus
# PACKET_COST (decoding, a dataclass, the dispatch); each ACL decision (a filter) ITEM_COST more.
PACKET_COST, ITEM_COST = 256, 512

# A valid client topic or filter too long once mounted: the client is disconnected with these (v5).
_NAME_INVALID, _FILTER_INVALID = DisconnectReason.TOPIC_NAME_INVALID, DisconnectReason.TOPIC_FILTER_INVALID


class Paths(Handshake):
    __slots__ = ()

    # ------------------------------------------------------------------ from the client

    def _over_budget(self, cost: int) -> bool:
        """Charge ``cost`` to the current read; True (nothing charged) once the read has spent its budget.

        Only the full paths charge: the fast paths cost a dict lookup. The first packet of a read always
        goes, so every read makes progress.
        """
        work = self._work
        if work >= self.settings.work_budget:
            self.stats.limit_hit("work_budget")
            return True
        self._work = work + cost
        return False

    def _client_publish_checked(self, chunk: bytes, start: int, end: int, v5: bool) -> bytes | None:
        """The full path: decode, resolve the topic alias, check the ACL, move under the mountpoint."""
        if self._over_budget(end - start + PACKET_COST):
            return YIELD
        pub = decode_publish(chunk, start, end, v5, self.settings.decode_limits)
        topic = pub.topic
        rewritten = False
        props = pub.properties
        if props and Prop.SUBSCRIPTION_IDENTIFIER in props:
            raise ProtocolViolation("Subscription Identifier in a PUBLISH from the client")  # [MQTT-3.3.4-6]
        if props and Prop.RESPONSE_TOPIC in props:
            validate_topic_name(props[Prop.RESPONSE_TOPIC])  # a topic name: no wildcards [MQTT-3.3.2-14]
        if props and Prop.TOPIC_ALIAS in props:
            topic = self._aliases.resolve(props[Prop.TOPIC_ALIAS], topic)
            rewritten = True
        policy = self.policy
        assert policy is not None
        # The answer a held packet waited for first: asking the policy again would count it twice.
        allowed = self._decided.get(("publish", topic, pub.retain)) if self._decided else None
        if allowed is None:
            allowed = policy.check_publish(topic, pub.retain)
            if allowed is None:
                self._ask("publish", topic, pub.retain)
                return HOLD
        if not allowed:
            return self._refuse_publish(pub, topic, v5)
        if pub.qos:
            acks = self._acks
            acks.seq += 1
            acks.inflight[pub.packet_id] = acks.seq
        mount = self._mount
        response_topic = props is not None and Prop.RESPONSE_TOPIC in props
        mark: Allowed = True
        inventory = self.settings.inventory
        if inventory is not None and self.team is not None:
            entry = inventory.entry(self.team, mount + topic if mount else topic, pub.retain)  # as it goes upstream
            entry.messages += 1
            entry.bytes += end - start
            if entry.samples_left:
                entry.sample(chunk, pub.payload_start, end)
            mark = entry
        if not rewritten:
            # Remembered for the fast path (which counts it) once its payload samples are taken.
            if mark is True or not mark.samples_left:
                (self._publish_ok_retained if pub.retain else self._publish_ok).remember(topic.encode(), mark)
            if not mount:
                return None
            if not response_topic:
                return replace_publish_topic(chunk, start, end, checked(mount + topic, _NAME_INVALID).encode())
        # Encoded anew: the alias was resolved, or the response topic moves under the mountpoint too.
        assert props is not None
        props = dict(props)
        props.pop(Prop.TOPIC_ALIAS, None)
        if mount and response_topic:
            props[Prop.RESPONSE_TOPIC] = checked(mount + props[Prop.RESPONSE_TOPIC], _NAME_INVALID)
        payload = chunk[pub.payload_start : end]
        topic = checked(mount + topic, _NAME_INVALID)
        return encode_publish(pub.qos, pub.retain, pub.dup, topic, pub.packet_id, props, payload)

    def _refuse_publish(self, pub: Publish, topic: str, v5: bool) -> bytes:
        self.stats.denied_publish += 1
        self._deny("publish", topic)
        if self.settings.disconnect_on_deny:
            if v5:
                self._out_client.append(encode_disconnect(DisconnectReason.NOT_AUTHORIZED, "publish not authorized"))
            self._close("publish not authorized")
            return b""
        # Acknowledge so the client does not retry forever; v5 learns why.
        if pub.qos:
            code = PubackReason.NOT_AUTHORIZED if v5 else PubackReason.SUCCESS
            ack = encode_ack(PacketType.PUBACK if pub.qos == 1 else PacketType.PUBREC, v5, pub.packet_id, code)
            if pub.qos == 2 and not v5:
                self._client_refused_qos2.refuse(pub.packet_id)
            ack_now = self._acks.refused(ack)
            if ack_now is not None:
                self._out_client.append(ack_now)
        return b""

    def _client_ack(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """PUBACK, PUBREC, PUBCOMP for deliveries: checked, then forwarded."""
        check_fixed_flags(chunk[start], self.v5)
        if end - start > 6 and self._over_budget(end - start + PACKET_COST):  # v5, with properties
            return YIELD
        decode_ack(chunk, start, end, self.v5, self.settings.decode_limits)
        return None

    def _client_pubrel(self, chunk: bytes, start: int, end: int) -> bytes | None:
        v5 = self.v5
        check_fixed_flags(chunk[start], v5)
        if end - start > 6 and self._over_budget(end - start + PACKET_COST):
            return YIELD
        ack = decode_ack(chunk, start, end, v5, self.settings.decode_limits)
        if self._client_refused_qos2.complete(ack.packet_id):
            # Ends a QoS 2 flow the front broker refused: answer it here.
            self._out_client.append(encode_ack(PacketType.PUBCOMP, v5, ack.packet_id))
            return b""
        return None

    def _client_subscribe(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """Each filter checked on its own; refused ones are answered here, the others go upstream."""
        v5 = self.v5
        check_fixed_flags(chunk[start], v5)
        if self._over_budget(end - start + PACKET_COST):
            return YIELD
        sub = decode_subscribe(chunk, start, end, v5, self.settings.decode_limits)
        self._work += ITEM_COST * len(sub.filters)
        policy = self.policy
        assert policy is not None
        # Decide every filter first: a filter the policy must ask about holds the whole packet,
        # and nothing is counted or logged twice when it is handled again with the answer.
        verdicts: list[bool] = []
        for filt, _ in sub.filters:
            allowed = self._decided.get(("subscribe", filt, False)) if self._decided else None
            if allowed is None:
                allowed = policy.check_subscribe(filt)
                if allowed is None:
                    self._ask("subscribe", filt, False)
                    return HOLD
            verdicts.append(allowed)
        refused = SubackReason.NOT_AUTHORIZED if v5 else SubackReason.FAILURE
        if self._subs.full([f for (f, _), ok in zip(sub.filters, verdicts, strict=True) if ok]):
            refused_quota = SubackReason.QUOTA_EXCEEDED if v5 else SubackReason.FAILURE
            self._out_client.append(encode_suback(v5, sub.packet_id, [refused_quota] * len(sub.filters)))
            return b""
        codes: list[int | None] = []
        forwarded: list[tuple[str, int]] = []
        granted: list[tuple[str, str]] = []
        mount = self._mount
        for (filt, options), allowed in zip(sub.filters, verdicts, strict=True):
            if allowed:
                codes.append(None)
                upstream_filter = checked(mount_filter(mount, filt), _FILTER_INVALID) if mount else filt
                forwarded.append((upstream_filter, options))
                granted.append((filt, upstream_filter))
            else:
                codes.append(refused)
                self.stats.denied_subscribe += 1
                self._deny("subscribe", filt)
        if granted:
            self._subs.granted(sub.packet_id, granted)  # remembered: a later change of rights may revoke them
        if len(forwarded) == len(sub.filters) and not mount:
            return None
        if not forwarded:
            self._out_client.append(encode_suback(v5, sub.packet_id, [c or 0 for c in codes]))
            return b""
        if len(forwarded) < len(sub.filters):
            self._subacks.expect(sub.packet_id, codes)
        return encode_subscribe(Subscribe(sub.packet_id, forwarded, sub.properties), v5)

    def _client_unsubscribe(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        if self._over_budget(end - start + PACKET_COST):
            return YIELD
        unsub = decode_unsubscribe(chunk, start, end, self.v5, self.settings.decode_limits)
        self._subs.unsubscribed(unsub.packet_id, unsub.filters)
        mount = self._mount
        if not mount:
            return None
        filters = [checked(mount_filter(mount, filt), _FILTER_INVALID) for filt in unsub.filters]
        return encode_unsubscribe(Unsubscribe(unsub.packet_id, filters, unsub.properties), self.v5)

    def _client_pingreq(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        if end - start != 2:
            raise MalformedPacket("PINGREQ with a body")
        return None

    def _client_disconnect(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        decode_disconnect(chunk, start, end, self.v5, self.settings.decode_limits)
        # Forwarded as is (a v5 reason 0x04 asks the broker to publish the will), then close.
        self._close("client disconnected")
        return None

    def _client_second_connect(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        raise ProtocolViolation("second CONNECT")

    def _client_server_only(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """CONNACK, SUBACK, UNSUBACK, PINGRESP and AUTH (no enhanced authentication): never from a client."""
        ptype = check_fixed_flags(chunk[start], self.v5)
        raise ProtocolViolation(f"{PacketType(ptype).name} is not sent by clients")

    def _client_reserved(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)  # raises: reserved packet type 0
        raise MalformedPacket("reserved packet type 0")

    # ------------------------------------------------------------------ from the upstream

    def _deliver_checked(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """The full path of a delivery: decode, leave the mountpoint, check the client may read it."""
        v5 = self.v5
        pub = decode_publish(chunk, start, end, v5)
        mount = self._mount
        topic = unmount_topic(mount, pub.topic) if mount else pub.topic
        policy = self.policy
        allowed: bool | None = False
        if topic is not None and policy is not None:
            allowed = self._decided_down.get(("deliver", topic, False)) if self._decided_down else None
            if allowed is None:
                allowed = policy.check_receive(topic)
                if allowed is None:
                    self._ask("deliver", topic, False)
                    return HOLD
        if not allowed:
            return self._drop_delivery(pub, topic, v5)
        assert topic is not None
        stats = self.stats
        stats.msgs_out += 1
        stats.bytes_out += end - start
        props = pub.properties
        if mount and props and Prop.RESPONSE_TOPIC in props:
            # A response topic inside the mount is shown without it; one outside is not shown at all.
            props = dict(props)
            inner = unmount_topic(mount, props.pop(Prop.RESPONSE_TOPIC))
            if inner is not None:
                props[Prop.RESPONSE_TOPIC] = inner
            payload = chunk[pub.payload_start : end]
            return encode_publish(pub.qos, pub.retain, pub.dup, topic, pub.packet_id, props, payload)
        self._receive_ok.remember(pub.topic.encode(), True)
        if not mount:
            return None
        return replace_publish_topic(chunk, start, end, topic.encode())

    def _drop_delivery(self, pub: Publish, topic: str | None, v5: bool) -> bytes:
        self.stats.denied_deliver += 1
        if topic is not None:  # outside the mountpoint: nothing the client's rules could explain
            self._deny("deliver", topic)
        # Acknowledge on the client's behalf so the upstream flow completes; the client
        # never sees this packet id, so its ids stay consistent.
        if pub.qos == 1:
            self._out_upstream.append(encode_ack(PacketType.PUBACK, v5, pub.packet_id))
        elif pub.qos == 2:
            self._out_upstream.append(encode_ack(PacketType.PUBREC, v5, pub.packet_id))
            self._upstream_dropped_qos2.refuse(pub.packet_id)
        return b""

    def _upstream_ack(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """PUBACK / PUBREC of a forwarded publish: our held acks may follow it now."""
        acks = self._acks
        if acks.inflight:
            acks.inflight.pop(ack_packet_id(chunk, start, end, self.v5), None)
            if acks.held:
                # This ack, then our own acks that were waiting behind it.
                return chunk[start:end] + acks.release()
        return None

    def _upstream_pubrel(self, chunk: bytes, start: int, end: int) -> bytes | None:
        dropped = self._upstream_dropped_qos2
        if dropped.ids:
            ack = decode_ack(chunk, start, end, self.v5)
            if dropped.complete(ack.packet_id):
                self._out_upstream.append(encode_ack(PacketType.PUBCOMP, self.v5, ack.packet_id))
                return b""
        return None

    def _upstream_suback(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """Put our refusals back into a SUBACK for a SUBSCRIBE we forwarded in part."""
        self._subs.acked(header_packet_id(chunk, start, end))
        if not self._subacks.pending:
            return None
        return self._subacks.merge(decode_suback(chunk, start, end, self.v5), self.v5)

    def _upstream_unsuback(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """The answer to one of our own UNSUBSCRIBEs (a revoked subscription) stays here."""
        return b"" if self._subs.acked(header_packet_id(chunk, start, end)) else None

    def _upstream_disconnect(self, chunk: bytes, start: int, end: int) -> bytes | None:
        # Relayed to a v5 client (it carries the reason); a v3.1.1 client just sees the close.
        self._close("upstream sent DISCONNECT")
        return None if self.v5 else b""

    def _upstream_forward(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """PUBCOMP, UNSUBACK, PINGRESP, AUTH: relayed as they are."""
        return None

    def _upstream_client_only(self, chunk: bytes, start: int, end: int) -> bytes | None:
        raise ProtocolViolation(f"upstream sent {PacketType(chunk[start] >> 4).name}")
