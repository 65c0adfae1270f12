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

from bisect import bisect_right
from collections.abc import Callable, Iterator

from broker.mqtt.errors import ProtocolError, ProtocolViolation
from broker.mqtt.packets import PacketType
from broker.mqtt.peek import (
    peek_connect_level,
    plain_publish_topic,
    publish_packet_id,
    publish_topic_bytes,
    replace_publish_topic,
)
from broker.session.api import CONTINUE, RATE_CHECK, CheckAccess, SessionSettings, State
from broker.session.base import Held
from broker.session.live import Live
from broker.session.paths import HOLD, RATE_STOP, YIELD
from broker.session.stats import Stats

# A packet handler: (session, chunk, start, end) -> None = forward as is, b"" = drop, bytes = send these instead.
Handler = Callable[["Session", bytes, int, int], "bytes | None"]

# Bytes a held direction may queue behind its check (the I/O layer stops reading it meanwhile).
_BACKLOG_MAX = 4 * 1_048_576


class Session(Live):
    __slots__ = ()

    def __init__(self, settings: SessionSettings, peer: str = "?", stats: Stats | None = None) -> None:
        super().__init__(settings, peer, stats)
        self._client_table = FROM_CLIENT
        self._upstream_table = FROM_UPSTREAM

    # ------------------------------------------------------------------ client side

    def receive_client(self, data: bytes) -> None:
        """Bytes read from the client. Then hand over the outputs and run the actions."""
        self._work = 0  # a new read: a new work budget
        self._feed_client(data)

    def _publish_checkpoint(self, size: int) -> bytes:
        """The client used what the rate limiter allowed: this PUBLISH and the rest wait for RateCheck."""
        stats = self.stats
        stats.msgs_in -= 1  # counted again when it goes on
        stats.bytes_in -= size
        self.rate_held_size = size
        return RATE_STOP

    def allow_publishes(self, messages: int, size: int) -> None:
        """The answer to RateCheck: ``messages`` more PUBLISH packets and ``size`` more bytes may go before the
        next check (the held one always goes: a bucket may run into debt, then the client waits). Then the
        client's held packets go on."""
        stats = self.stats
        self.publish_stop_msgs = stats.msgs_in + max(1, messages)
        self.publish_stop_bytes = stats.bytes_in + max(self.rate_held_size, size)
        self.rate_held_size = 0
        if self._yielded:  # the read's work budget goes on: a RateCheck answered at once is no new turn
            self._yielded = False
            self._resume_client()

    def continue_client(self) -> None:
        """The answer to Continue (next loop turn): the rest of the read goes on, with a new budget."""
        if self._yielded:
            self._yielded = False
            self._work = 0
            self._resume_client()

    def _feed_client(self, data: bytes) -> None:
        state = self._state
        if state is State.ESTABLISHED:
            if self._held_client is not None:
                self._queue_behind_check(self._backlog_client, data, "client")
                return
            try:
                chunk, ends = self._client_framer.feed(data)
                if ends:
                    self._relay(chunk, ends, 0, self._out_upstream, self._client_table, self.stats.packets_in)
                    if self._client_framer.error is not None and self._held_client is None and not self.closed:
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
        self,
        chunk: bytes,
        ends: list[int],
        start: int,
        out: list[bytes],
        table: tuple[Handler, ...],
        counts: list[int],
        first: int = 0,
    ) -> None:
        """Forward ``chunk``'s packets to ``out`` as runs of the original bytes.

        Each packet goes to its handler in ``table`` (indexed by packet type) and is counted in
        ``counts``. Once the session closes nothing after the packet that closed it goes out
        (a forwarded DISCONNECT itself still does). A handler answering HOLD stops the run there:
        that packet and the rest of the chunk wait for the access decision.
        """
        expired = self._fast_expired
        if expired is not None and expired():
            # An allow the fast paths remember is no longer reused by the policy (the platform's cache_ttl).
            self._publish_ok.clear()
            self._publish_ok_retained.clear()
            self._receive_ok.clear()
        run = start
        try:
            for end in _from(ends, first) if first else ends:
                ptype = chunk[start] >> 4
                counts[ptype] += 1
                replacement = table[ptype](self, chunk, start, end)
                if replacement is not None:
                    if run < start:
                        out.append(chunk[run:start])
                    if replacement is HOLD or replacement is YIELD or replacement is RATE_STOP:
                        counts[ptype] -= 1  # counted again when it is handled with the answer (or next turn)
                        # The read's own list and where to go on in it (ends is sorted): a slice per hold
                        # copied the rest of a read of hundreds of deliveries for each cold one, and each
                        # copy was a young object the next gen-0 collection had to walk (0.8 ms each).
                        self._hold(table, (chunk, ends, start, bisect_right(ends, start)))
                        if replacement is not HOLD:
                            self._yielded = True
                            self._actions.append(CONTINUE if replacement is YIELD else RATE_CHECK)
                        return
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
        if stats.msgs_in > self.publish_stop_msgs or stats.bytes_in > self.publish_stop_bytes:
            return self._publish_checkpoint(end - start)  # the rate limiter's turn (two compares per publish)
        # Fast path: a topic whose raw bytes were validated and allowed before needs no decoding
        # and no ACL walk (v5: only without properties). Everything else takes the full path.
        v5 = self.v5
        topic = plain_publish_topic(chunk, start, end, v5)
        if topic is not None:
            first = chunk[start]
            entry = (self._publish_ok_retained if first & 1 else self._publish_ok).get(topic)
            if entry is not None:
                if entry is not True:  # the topic inventory counts it (bench/inventory_cost.py)
                    entry.messages += 1
                    entry.bytes += end - start
                if not first & 6:  # QoS 0
                    return None
                packet_id = publish_packet_id(chunk, start, len(topic))
                if packet_id:
                    acks = self._acks
                    acks.seq += 1
                    acks.inflight[packet_id] = acks.seq
                    return None
        return self._client_publish_full(chunk, start, end, v5)

    def _client_publish_mounted(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """As _client_publish, for a session with a mountpoint: the topic goes upstream under it."""
        stats = self.stats
        stats.msgs_in += 1
        stats.bytes_in += end - start
        if stats.msgs_in > self.publish_stop_msgs or stats.bytes_in > self.publish_stop_bytes:
            return self._publish_checkpoint(end - start)
        v5 = self.v5
        topic = plain_publish_topic(chunk, start, end, v5)
        if topic is not None:
            first = chunk[start]
            entry = (self._publish_ok_retained if first & 1 else self._publish_ok).get(topic)
            if entry is not None:
                packet_id = publish_packet_id(chunk, start, len(topic)) if first & 6 else 0
                if packet_id or not first & 6:
                    if entry is not True:
                        entry.messages += 1
                        entry.bytes += end - start
                    if packet_id:
                        acks = self._acks
                        acks.seq += 1
                        acks.inflight[packet_id] = acks.seq
                    return replace_publish_topic(chunk, start, end, self._mount_raw + topic)
        return self._client_publish_full(chunk, start, end, v5)

    def _client_publish_full(self, chunk: bytes, start: int, end: int, v5: bool) -> bytes | None:
        answer = self._client_publish_checked(chunk, start, end, v5)
        if answer is HOLD or answer is YIELD:
            stats = self.stats  # counted again when it is handled with the answer
            stats.msgs_in -= 1
            stats.bytes_in -= end - start
        return answer

    # ------------------------------------------------------------------ upstream side

    def receive_upstream(self, data: bytes) -> None:
        """Bytes read from the upstream. Then hand over the outputs and run the actions."""
        state = self._state
        if state is State.CLOSED:
            return
        if self._held_upstream is not None:
            self._queue_behind_check(self._backlog_upstream, data, "upstream")
            return
        try:
            chunk, ends = self._upstream_framer.feed(data)
            if not ends:
                return
            if state is State.ESTABLISHED:
                self._relay(chunk, ends, 0, self._out_client, self._upstream_table, self.stats.packets_out)
            elif state is State.WAIT_CONNACK:
                self._on_connack(chunk, ends)
            else:
                raise ProtocolViolation("upstream sent data before CONNECT")
            if self._upstream_framer.error is not None and self._held_upstream is None and not self.closed:
                raise self._upstream_framer.error
        except ProtocolError as exc:
            self._upstream_protocol_error(exc)

    def _on_connack(self, chunk: bytes, ends: list[int]) -> None:
        end = ends[0]
        if not self._accept_connack(chunk, end):
            return
        if self._mount:
            self._client_table = FROM_CLIENT_MOUNTED
            self._upstream_table = FROM_UPSTREAM_MOUNTED
        if len(ends) > 1:
            self._relay(chunk, ends[1:], end, self._out_client, self._upstream_table, self.stats.packets_out)
        early = self._early
        if early:
            self._early = b""
            self._work = 0
            self._feed_client(early)

    def _upstream_publish(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """A delivery: relayed only if the client may read its topic, else acked on its behalf."""
        # Fast path: a delivery topic (raw bytes) this client was allowed to read before.
        if publish_topic_bytes(chunk, start, end) in self._receive_ok:
            stats = self.stats
            stats.msgs_out += 1
            stats.bytes_out += end - start
            return None
        return self._deliver_checked(chunk, start, end)

    def _upstream_publish_mounted(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """As _upstream_publish, for a session with a mountpoint: the topic arrives without it."""
        topic = plain_publish_topic(chunk, start, end, self.v5)
        if topic is not None and topic in self._receive_ok:
            stats = self.stats
            stats.msgs_out += 1
            stats.bytes_out += end - start
            return replace_publish_topic(chunk, start, end, topic[len(self._mount_raw) :])
        return self._deliver_checked(chunk, start, end)

    # ------------------------------------------------------------------ access decisions

    def access_decided(self, check: CheckAccess, allowed: bool | None) -> None:
        """The answer to a CheckAccess action: the packets held for it go on. Then hand over. None: the
        deciding backend did not answer (a deny; a will refused so gets "server unavailable")."""
        key = (check.action, check.topic, check.retain)
        (self._decided_down if check.action == "deliver" else self._decided)[key] = bool(allowed)
        if allowed is None and self._state is State.AUTHENTICATING:  # only the will's answer is read so
            self._unanswered.add(key)
        self._work = 0  # the answer comes in a loop turn of its own
        if self._state is State.AUTHENTICATING:
            self._resume_auth()
        elif check.action == "deliver":
            self._resume_upstream()
        else:
            self._resume_client()

    def _hold(self, table: tuple[Handler, ...], held: Held) -> None:
        if table is self._client_table:
            self._held_client = held
            self.reading_client = False
        else:
            self._held_upstream = held
            self.reading_upstream = False

    def _queue_behind_check(self, backlog: list[bytes], data: bytes, side: str) -> None:
        backlog.append(data)
        if sum(len(d) for d in backlog) > _BACKLOG_MAX:
            exc = ProtocolViolation("too much data while an access check is pending")
            if side == "client":
                self._protocol_error(exc, side)
            else:
                self._upstream_protocol_error(exc)

    def _resume_client(self) -> None:
        held, self._held_client = self._held_client, None
        if held is None or self._state is not State.ESTABLISHED:
            return
        self.reading_client = True
        chunk, ends, start, first = held
        try:
            self._relay(chunk, ends, start, self._out_upstream, self._client_table, self.stats.packets_in, first)
            if self._held_client is not None:
                return
            self._decided.clear()
            if self._client_framer.error is not None and not self.closed:
                raise self._client_framer.error
        except ProtocolError as exc:
            self._protocol_error(exc, "client")
            return
        backlog, self._backlog_client = self._backlog_client, []
        for data in backlog:  # a new hold queues the rest again, in order; the budget is the read's
            self._feed_client(data)

    def _resume_upstream(self) -> None:
        held, self._held_upstream = self._held_upstream, None
        if held is None or self._state is not State.ESTABLISHED:
            return
        self.reading_upstream = True
        chunk, ends, start, first = held
        try:
            self._relay(chunk, ends, start, self._out_client, self._upstream_table, self.stats.packets_out, first)
            if self._held_upstream is not None:
                return
            self._decided_down.clear()
            if self._upstream_framer.error is not None and not self.closed:
                raise self._upstream_framer.error
        except ProtocolError as exc:
            self._upstream_protocol_error(exc)
            return
        backlog, self._backlog_upstream = self._backlog_upstream, []
        for data in backlog:
            self.receive_upstream(data)


def _from(ends: list[int], first: int) -> Iterator[int]:
    """An iterator over ``ends`` that starts at index ``first`` at once (islice would step over the first ones:
    O(n) per resume of a read held packet by packet)."""
    it = iter(ends)
    it.__setstate__(first)  # type: ignore[attr-defined]  # list_iterator's index, as pickle restores it
    return it


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
        PacketType.UNSUBACK: Session._upstream_unsuback,
        PacketType.PINGREQ: Session._upstream_client_only,
        PacketType.PINGRESP: Session._upstream_forward,
        PacketType.DISCONNECT: Session._upstream_disconnect,
        PacketType.AUTH: Session._upstream_forward,
    }
)
"""Packets from the upstream once established, by type."""

FROM_CLIENT_MOUNTED: tuple[Handler, ...] = tuple(
    Session._client_publish_mounted if t == PacketType.PUBLISH else handler for t, handler in enumerate(FROM_CLIENT)
)
"""FROM_CLIENT for a session with a mountpoint (only PUBLISH differs)."""

FROM_UPSTREAM_MOUNTED: tuple[Handler, ...] = tuple(
    Session._upstream_publish_mounted if t == PacketType.PUBLISH else handler for t, handler in enumerate(FROM_UPSTREAM)
)
"""FROM_UPSTREAM for a session with a mountpoint (only PUBLISH differs)."""
