"""The Session: one client connection's protocol logic, Sans-I/O, and its hot relay paths.

A :class:`Session` sits between one client and its upstream connection. The I/O layer feeds
it bytes (:meth:`Session.receive_client`, :meth:`Session.receive_upstream`) and the results of
the slow steps it asked for (``auth_done``, ``upstream_connected``, ``upstream_failed``, the
timeouts); after each call it takes the output with ``data_to_upstream()``, ``data_to_client()``
and ``take_actions()`` (see :mod:`broker.session.base`). It never touches a socket, a thread or
the event loop.

Relayed packets are forwarded as their original bytes, in runs: a chunk of several allowed
packets is written as one slice. Each direction has one dispatch table naming every packet type
and its handler (:data:`FROM_CLIENT`, :data:`FROM_UPSTREAM`); a handler returns None to forward
the packet as is, ``b""`` to drop it, or other bytes to send in its place.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.mqtt.errors import MalformedPacket, ProtocolError, ProtocolViolation
from broker.mqtt.packets import (
    PacketType,
    Subscribe,
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
)
from broker.mqtt.peek import (
    ack_packet_id,
    peek_connect_level,
    plain_publish_topic,
    publish_packet_id,
    publish_topic_bytes,
)
from broker.mqtt.properties import Prop
from broker.mqtt.reasons import DisconnectReason, PubackReason, SubackReason
from broker.session.api import State
from broker.session.handshake import Handshake

_PUBLISH = PacketType.PUBLISH

# A packet handler: (session, chunk, start, end) -> None = forward as is, b"" = drop, bytes = send these instead.
Handler = Callable[["Session", bytes, int, int], "bytes | None"]


class Session(Handshake):
    __slots__ = ()

    # ------------------------------------------------------------------ client side

    def receive_client(self, data: bytes) -> None:
        """Bytes read from the client. Then hand over the outputs and run the actions."""
        state = self._state
        if state is State.ESTABLISHED:
            try:
                chunk, ends = self._client_framer.feed(data)
                if ends:
                    self._relay(chunk, ends, 0, self._out_upstream, FROM_CLIENT, self.stats.packets_in)
                    if self._client_framer.error is not None and self._state is not State.CLOSED:
                        raise self._client_framer.error
            except ProtocolError as exc:
                self._protocol_error(exc, "client")
            return
        if state is State.CLOSED:
            return
        if state is not State.WAIT_CONNECT:
            # MQTT lets a client send before CONNACK; keep its bytes, unparsed and in order,
            # until the session is established. The I/O layer stops reading meanwhile.
            self._early += data
            if len(self._early) > 2 * self.settings.max_packet_size:
                self._protocol_error(ProtocolViolation("too much data before CONNACK"), "client")
            return
        try:
            chunk, ends = self._client_framer.feed(data)
            if not ends:
                return
            self._on_connect(chunk, ends)
            if self._client_framer.error is not None and self._state is not State.CLOSED:
                raise self._client_framer.error
        except ProtocolError as exc:
            if self._state is State.WAIT_CONNECT and data[:1] == b"\x10":
                # A CONNECT refused from its fixed header (too large, bad length): a v5 client
                # still gets a CONNACK with the reason if its protocol level is in this read.
                self.v5 = peek_connect_level(data, len(data)) == 5
            self._protocol_error(exc, "client")

    def _relay(
        self, chunk: bytes, ends: list[int], start: int, out: list[bytes], table: tuple[Handler, ...], counts: list[int]
    ) -> None:
        """Forward ``chunk``'s packets to ``out`` as runs of the original bytes.

        Each packet goes to its handler in ``table`` (indexed by packet type) and is counted in
        ``counts``. Once the session closes nothing after the packet that closed it goes out
        (a forwarded DISCONNECT itself still does).
        """
        run = start
        try:
            for end in ends:
                ptype = chunk[start] >> 4
                counts[ptype] += 1
                replacement = table[ptype](self, chunk, start, end)
                if replacement is not None:
                    if run < start:
                        out.append(chunk[run:start])
                    if replacement:
                        out.append(replacement)
                    run = end
                start = end
                if self._state is State.CLOSED:
                    break
        except ProtocolError:
            # Packets before the bad one were valid: they still go out.
            if run < start:
                out.append(chunk[run:start])
            raise
        if run < start:
            out.append(chunk if run == 0 and start == len(chunk) else chunk[run:start])

    def _client_publish(self, chunk: bytes, start: int, end: int) -> bytes | None:
        stats = self.stats
        stats.msgs_in += 1
        stats.bytes_in += end - start
        # Fast path: a topic whose raw bytes were validated and allowed before needs no decoding
        # and no ACL walk (v5: only without properties). Everything else takes the full path below.
        v5 = self.v5
        topic = plain_publish_topic(chunk, start, end, v5)
        if topic is not None:
            first = chunk[start]
            if topic in (self._publish_ok_retained if first & 1 else self._publish_ok):
                if not first & 6:  # QoS 0
                    return None
                packet_id = publish_packet_id(chunk, start, len(topic))
                if packet_id:
                    acks = self._acks
                    acks.seq += 1
                    acks.inflight[packet_id] = acks.seq
                    return None
        return self._client_publish_checked(chunk, start, end, v5)

    def _client_publish_checked(self, chunk: bytes, start: int, end: int, v5: bool) -> bytes | None:
        """The full path: decode, resolve the topic alias, check the ACL."""
        pub = decode_publish(chunk, start, end, v5)
        topic = pub.topic
        rewritten = False
        props = pub.properties
        if props and Prop.SUBSCRIPTION_IDENTIFIER in props:
            raise ProtocolViolation("Subscription Identifier in a PUBLISH from the client")  # [MQTT-3.3.4-6]
        if props and Prop.TOPIC_ALIAS in props:
            topic = self._aliases.resolve(props[Prop.TOPIC_ALIAS], topic)
            rewritten = True
        policy = self.policy
        assert policy is not None
        if not policy.check_publish(topic, pub.retain):
            self.stats.denied_publish += 1
            self._deny("publish", topic)
            if self.settings.disconnect_on_deny:
                if v5:
                    refusal = encode_disconnect(DisconnectReason.NOT_AUTHORIZED, "publish not authorized")
                    self._out_client.append(refusal)
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
        if pub.qos:
            acks = self._acks
            acks.seq += 1
            acks.inflight[pub.packet_id] = acks.seq
        if not rewritten:
            (self._publish_ok_retained if pub.retain else self._publish_ok).remember(topic.encode(), True)
            return None
        assert props is not None
        props = dict(props)
        del props[Prop.TOPIC_ALIAS]
        return encode_publish(pub.qos, pub.retain, pub.dup, topic, pub.packet_id, props, chunk[pub.payload_start : end])

    def _client_ack(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """PUBACK, PUBREC, PUBCOMP for deliveries: checked, then forwarded."""
        check_fixed_flags(chunk[start], self.v5)
        decode_ack(chunk, start, end, self.v5)
        return None

    def _client_pubrel(self, chunk: bytes, start: int, end: int) -> bytes | None:
        v5 = self.v5
        check_fixed_flags(chunk[start], v5)
        ack = decode_ack(chunk, start, end, v5)
        if self._client_refused_qos2.complete(ack.packet_id):
            # Ends a QoS 2 flow the front broker refused: answer it here.
            self._out_client.append(encode_ack(PacketType.PUBCOMP, v5, ack.packet_id))
            return b""
        return None

    def _client_subscribe(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """Each filter checked on its own; refused ones are answered here, the others go upstream."""
        v5 = self.v5
        check_fixed_flags(chunk[start], v5)
        sub = decode_subscribe(chunk, start, end, v5)
        policy = self.policy
        assert policy is not None
        refused = SubackReason.NOT_AUTHORIZED if v5 else SubackReason.FAILURE
        codes: list[int | None] = []
        allowed: list[tuple[str, int]] = []
        for filt, options in sub.filters:
            if policy.check_subscribe(filt):
                codes.append(None)
                allowed.append((filt, options))
            else:
                codes.append(refused)
                self.stats.denied_subscribe += 1
                self._deny("subscribe", filt)
        if len(allowed) == len(sub.filters):
            return None
        if not allowed:
            self._out_client.append(encode_suback(v5, sub.packet_id, [c or 0 for c in codes]))
            return b""
        self._subacks.expect(sub.packet_id, codes)
        return encode_subscribe(Subscribe(sub.packet_id, allowed, sub.properties), v5)

    def _client_unsubscribe(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        decode_unsubscribe(chunk, start, end, self.v5)
        return None

    def _client_pingreq(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        if end - start != 2:
            raise MalformedPacket("PINGREQ with a body")
        return None

    def _client_disconnect(self, chunk: bytes, start: int, end: int) -> bytes | None:
        check_fixed_flags(chunk[start], self.v5)
        decode_disconnect(chunk, start, end, self.v5)
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

    # ------------------------------------------------------------------ upstream side

    def receive_upstream(self, data: bytes) -> None:
        """Bytes read from the upstream. Then hand over the outputs and run the actions."""
        state = self._state
        if state is State.CLOSED:
            return
        try:
            chunk, ends = self._upstream_framer.feed(data)
            if not ends:
                return
            if state is State.ESTABLISHED:
                self._relay(chunk, ends, 0, self._out_client, FROM_UPSTREAM, self.stats.packets_out)
            elif state is State.WAIT_CONNACK:
                self._on_connack(chunk, ends)
            else:
                raise ProtocolViolation("upstream sent data before CONNECT")
            if self._upstream_framer.error is not None and self._state is not State.CLOSED:
                raise self._upstream_framer.error
        except ProtocolError as exc:
            self._upstream_protocol_error(exc)

    def _on_connack(self, chunk: bytes, ends: list[int]) -> None:
        end = ends[0]
        if not self._accept_connack(chunk, end):
            return
        if len(ends) > 1:
            self._relay(chunk, ends[1:], end, self._out_client, FROM_UPSTREAM, self.stats.packets_out)
        early = self._early
        if early:
            self._early = b""
            self.receive_client(early)

    def _upstream_publish(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """A delivery: relayed only if the client may read its topic, else acked on its behalf."""
        # Fast path: a delivery topic (raw bytes) this client was allowed to read before.
        if publish_topic_bytes(chunk, start, end) in self._receive_ok:
            stats = self.stats
            stats.msgs_out += 1
            stats.bytes_out += end - start
            return None
        v5 = self.v5
        pub = decode_publish(chunk, start, end, v5)
        policy = self.policy
        if policy is not None and policy.check_receive(pub.topic):
            self._receive_ok.remember(pub.topic.encode(), True)
            stats = self.stats
            stats.msgs_out += 1
            stats.bytes_out += end - start
            return None
        self.stats.denied_deliver += 1
        self._deny("deliver", pub.topic)
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
        if not self._subacks.pending:
            return None
        return self._subacks.merge(decode_suback(chunk, start, end, self.v5), self.v5)

    def _upstream_disconnect(self, chunk: bytes, start: int, end: int) -> bytes | None:
        # Relayed to a v5 client (it carries the reason); a v3.1.1 client just sees the close.
        self._close("upstream sent DISCONNECT")
        return None if self.v5 else b""

    def _upstream_forward(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """PUBCOMP, UNSUBACK, PINGRESP, AUTH: relayed as they are."""
        return None

    def _upstream_client_only(self, chunk: bytes, start: int, end: int) -> bytes | None:
        raise ProtocolViolation(f"upstream sent {PacketType(chunk[start] >> 4).name}")


def _table(handlers: dict[int, Handler]) -> tuple[Handler, ...]:
    missing = set(range(16)) - set(handlers)
    assert not missing, f"no handler for packet types {sorted(missing)}"
    return tuple(handlers[t] for t in range(16))


FROM_CLIENT: tuple[Handler, ...] = _table(
    {
        0: Session._client_reserved,
        PacketType.CONNECT: Session._client_second_connect,
        PacketType.CONNACK: Session._client_server_only,
        PacketType.PUBLISH: Session._client_publish,
        PacketType.PUBACK: Session._client_ack,
        PacketType.PUBREC: Session._client_ack,
        PacketType.PUBREL: Session._client_pubrel,
        PacketType.PUBCOMP: Session._client_ack,
        PacketType.SUBSCRIBE: Session._client_subscribe,
        PacketType.SUBACK: Session._client_server_only,
        PacketType.UNSUBSCRIBE: Session._client_unsubscribe,
        PacketType.UNSUBACK: Session._client_server_only,
        PacketType.PINGREQ: Session._client_pingreq,
        PacketType.PINGRESP: Session._client_server_only,
        PacketType.DISCONNECT: Session._client_disconnect,
        PacketType.AUTH: Session._client_server_only,
    }
)
"""Packets from an established client, by type."""

FROM_UPSTREAM: tuple[Handler, ...] = _table(
    {
        0: Session._upstream_forward,  # the upstream is trusted with its own framing
        PacketType.CONNECT: Session._upstream_client_only,
        PacketType.CONNACK: Session._upstream_client_only,
        PacketType.PUBLISH: Session._upstream_publish,
        PacketType.PUBACK: Session._upstream_ack,
        PacketType.PUBREC: Session._upstream_ack,
        PacketType.PUBREL: Session._upstream_pubrel,
        PacketType.PUBCOMP: Session._upstream_forward,
        PacketType.SUBSCRIBE: Session._upstream_client_only,
        PacketType.SUBACK: Session._upstream_suback,
        PacketType.UNSUBSCRIBE: Session._upstream_client_only,
        PacketType.UNSUBACK: Session._upstream_forward,
        PacketType.PINGREQ: Session._upstream_client_only,
        PacketType.PINGRESP: Session._upstream_forward,
        PacketType.DISCONNECT: Session._upstream_disconnect,
        PacketType.AUTH: Session._upstream_forward,
    }
)
"""Packets from the upstream once established, by type."""
