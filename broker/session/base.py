"""The session's state and its hand-over surface: outputs, the state machine, refusals and closes.

:class:`SessionBase` owns every field of a session and the decisions that do not depend on
a packet: what a timeout, a shutdown or a connection limit tells the client, how a protocol
error or a refused CONNECT is answered, and how outputs are handed to the I/O layer
(websockets' ``data_to_send()`` pattern: each call hands over and clears). The packet paths
build on it: :mod:`broker.session.handshake` (CONNECT to CONNACK) and
:mod:`broker.session.core` (the relay). No I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from acl.cache import BoundedCache
from broker.logs import log_event
from broker.mqtt.errors import PacketTooLarge, ProtocolError
from broker.mqtt.framer import Framer
from broker.mqtt.limits import LimitExceeded
from broker.mqtt.packets import Connect, encode_connack, encode_disconnect
from broker.mqtt.reasons import ConnackV3, ConnackV5, DisconnectReason
from broker.session.api import (
    READING_CLIENT,
    TRANSITIONS,
    AccessPolicy,
    Action,
    AuthResult,
    CheckAccess,
    ClientIdRule,
    Close,
    SessionSettings,
    State,
)
from broker.session.audit import DenyLog
from broker.session.drain import RELAYING, SETTLING, DrainState, relaying_tables, settling_table
from broker.session.flows import AckOrder, Qos2Refusals, SubackMerger, Subscriptions, TopicAliases
from broker.session.inventory import TopicEntry
from broker.session.stats import Stats

log = logging.getLogger("mqtt_front.session")

Allowed = TopicEntry | Literal[True]
"""What the publish fast path remembers of an allowed topic: its inventory entry to count, or True."""

NO_STOP = 1 << 62
"""A publish_stop_* value no counter reaches: no rate limit applies."""

NORMAL_DISCONNECT = b"\xe0\x00"
"""DISCONNECT, reason 0 (normal, the will is discarded): the same two bytes in MQTT 3.1.1 and 5."""

Held = tuple[bytes, list[int], int, int]
"""A direction's held packets: the chunk, the ends of the read's packets, the held packet's start, and the index in
those ends of the held packet's end (where the relay goes on; the list is never copied)."""


class SessionBase:
    __slots__ = (
        "_acks",
        "_actions",
        "_aliases",
        "_auth_waiting",
        "_backlog_client",
        "_backlog_upstream",
        "_client_framer",
        "_client_id_rule",
        "_client_refused_qos2",
        "_client_table",
        "_connect",
        "_decided",
        "_decided_down",
        "_deny_log",
        "_drain",
        "_early",
        "_fast_expired",
        "_held_client",
        "_held_upstream",
        "_mount",
        "_mount_raw",
        "_out_client",
        "_out_upstream",
        "_publish_ok",
        "_publish_ok_retained",
        "_receive_ok",
        "_state",
        "_subacks",
        "_subs",
        "_unanswered",
        "_upstream_dropped_qos2",
        "_upstream_framer",
        "_upstream_table",
        "_work",
        "_yielded",
        "assigned_client_id",
        "bad_connect",
        "client_id",
        "keep_alive",
        "peer",
        "policy",
        "publish_stop_bytes",
        "publish_stop_msgs",
        "rate_held_size",
        "reading_client",
        "reading_upstream",
        "settings",
        "stats",
        "team",
        "upstream_client_id",
        "username",
        "v5",
    )

    def __init__(self, settings: SessionSettings, peer: str = "?", stats: Stats | None = None) -> None:
        self.settings = settings
        self.peer = peer
        self.stats = stats if stats is not None else Stats()
        self._state = State.WAIT_CONNECT
        self.v5 = False
        self.keep_alive = 0  # seconds the client may stay silent (CONNECT, or the server's CONNACK); 0: no limit
        self._out_client: list[bytes] = []
        self._out_upstream: list[bytes] = []
        self._actions: list[Action] = []
        # The CONNECT is read before authentication: it gets the smaller limit (raised once it is read).
        self._client_framer = Framer(min(settings.max_connect_size, settings.max_packet_size))
        self._work = 0  # cost units the current client read has spent (settings.work_budget)
        self._yielded = False  # the client's held packets wait for the next turn (Continue), not a check
        # The CONNECT itself was refused (malformed, over a cap, unknown protocol): the I/O layer holds
        # such a connection for a while before closing it (broker.linger.Tarpit).
        self.bad_connect = False
        # The publish rate limiter looks again once stats.msgs_in or stats.bytes_in pass these (RateCheck);
        # without a limiter, never. ``rate_held_size``: the size of the PUBLISH held for that check.
        self.publish_stop_msgs = self.publish_stop_bytes = NO_STOP
        self.rate_held_size = 0
        self._upstream_framer = Framer()
        self._connect: Connect | None = None
        self.client_id = ""
        self.upstream_client_id = ""
        self.assigned_client_id: str | None = None
        self.username: str | None = None
        self.team: str | None = None
        self.policy: AccessPolicy | None = None
        self._aliases = TopicAliases(settings.max_alias_topic_length)
        self._acks = AckOrder()
        self._client_refused_qos2 = Qos2Refusals()
        self._upstream_dropped_qos2 = Qos2Refusals()
        self._subacks = SubackMerger()
        self._subs = Subscriptions(settings.max_subscriptions)
        # Raw topic bytes already validated and allowed: the hot paths skip decoding and ACL walks. A
        # publish topic maps to its topic-inventory entry (counted on every publish), or True without one.
        self._publish_ok: BoundedCache[bytes, Allowed] = BoundedCache()
        self._publish_ok_retained: BoundedCache[bytes, Allowed] = BoundedCache()
        self._receive_ok: BoundedCache[bytes, bool] = BoundedCache()
        # A policy whose allows expire (the platform's cache) says when those topics must be asked about again.
        self._fast_expired: Callable[[], bool] | None = None
        self._deny_log: DenyLog | None = None  # created on the first denial
        self._drain: DrainState | None = None  # the process is stopping (start_drain)
        self._early = b""
        self._client_id_rule = ClientIdRule.PREFIX
        self._mount = ""  # the client's mountpoint ("" = none) and its UTF-8 bytes
        self._mount_raw = b""
        # Dispatch tables of the established session (see broker.session.core), by mountpoint.
        self._client_table: tuple[Any, ...] = ()
        self._upstream_table: tuple[Any, ...] = ()
        # A direction waiting for an access decision (CheckAccess): the chunk, the ends of its packets
        # still to process (the held one first) and where the held one starts; later reads wait behind.
        self._held_client: Held | None = None
        self._held_upstream: Held | None = None
        self._backlog_client: list[bytes] = []
        self._backlog_upstream: list[bytes] = []
        # Answers of CheckAccess for the packet being held: (action, topic, retain) -> allowed; one table per
        # direction (the client's publish, subscribe and will checks; deliveries), so that a read that ends
        # in one direction never drops the answers a packet held in the other one still needs.
        self._decided: dict[tuple[str, str, bool], bool] = {}
        self._decided_down: dict[tuple[str, str, bool], bool] = {}
        # Checks the deciding backend did not answer (an error or timeout: a deny, but the will says 0x88).
        self._unanswered: set[tuple[str, str, bool]] = set()
        self._auth_waiting: AuthResult | None = None  # auth_done waits for the will's decision
        # Whether the I/O layer should keep reading each side (read by it after every hand-over; kept as
        # plain attributes because the pump looks at them on every read): the client not while the
        # handshake runs or a check holds its packets, the upstream not while a delivery waits.
        self.reading_client = True
        self.reading_upstream = True

    # ------------------------------------------------------------------ hand-over (the I/O layer calls these)

    def data_to_client(self) -> list[bytes]:
        """Bytes to write to the client, in order; handed over once (the caller writes them, joined)."""
        out = self._out_client
        if out:
            self._out_client = []
        return out

    def data_to_upstream(self) -> list[bytes]:
        """Bytes to write to the upstream, in order; handed over once. Write them before the client's."""
        out = self._out_upstream
        if out:
            self._out_upstream = []
        return out

    def take_actions(self) -> list[Action]:
        """Slow steps the session asks for, in order; handed over once. After a Close, run nothing else."""
        actions = self._actions
        if actions:
            self._actions = []
        return actions

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def mountpoint(self) -> str:
        return self._mount

    # ------------------------------------------------------------------ events without a packet

    def refuse_at_accept(self, reason: str) -> None:
        """A connection limit refuses the client before any CONNECT is read: close at once."""
        self.stats.connect_result = "limit"
        self._close(reason)

    def connect_timed_out(self, timeout: float) -> None:
        """The I/O layer's timer: no CONNECT within ``timeout`` seconds closes the connection."""
        if self._state is State.WAIT_CONNECT:
            log.info("no CONNECT from %s within %.0fs", self.peer, timeout)
            self.stats.connect_result = "limit"
            self._close("connect timeout")

    def server_shutdown(self) -> None:
        """The process is stopping: v5 clients are told so (DISCONNECT 0x8B) before the close."""
        if self.v5 and self._state is State.ESTABLISHED:
            self._out_client.append(encode_disconnect(DisconnectReason.SERVER_SHUTTING_DOWN, "server shutting down"))
        self._close("server shutting down")

    # ------------------------------------------------------------------ the drain (SIGTERM, ctl drain)

    @property
    def draining(self) -> bool:
        return self._drain is not None

    def start_drain(self) -> None:
        """The process stops (SIGTERM): an established session finishes what the client sent (see
        :mod:`broker.session.drain`); then the I/O layer calls ``drain_tick`` until the session closes. A
        session still in its handshake closes now (a v5 client in WAIT_CONNACK gets nothing: no CONNACK yet)."""
        if self._state is not State.ESTABLISHED:
            if self._state is not State.CLOSED:
                self.server_shutdown()
            return
        if self._drain is None:
            drain = self._drain = DrainState()
            self._client_table, self._upstream_table = relaying_tables(
                self._client_table, self._upstream_table, drain.flows
            )

    def drain_tick(self, quiet: bool, reading_over: bool) -> None:
        """The I/O layer's drain timer. ``quiet``: nothing was read from the client since the last tick;
        ``reading_over``: the drain's read window has passed.

        The client's new work is taken until it has been quiet, or everything forwarded so far is
        acknowledged, or the window passed (a client that streams on); once every message forwarded is
        acknowledged upstream and its ack handed over for the client, the session ends: v5 DISCONNECT 0x8B
        to the client, then the close (see ``_finish_drain``)."""
        drain = self._drain
        if drain is None or self._state is not State.ESTABLISHED:
            return
        acks = self._acks
        if drain.phase == RELAYING:
            mid_packet = self._held_client is not None or self._yielded or self._client_framer.buffered > 0
            if reading_over or (not mid_packet and (quiet or not acks.inflight)):
                drain.phase = SETTLING
                self._client_table = settling_table(self._client_table)
        if drain.phase == SETTLING and not acks.inflight and not drain.flows and self._held_upstream is None:
            self._finish_drain()

    def drain_expired(self) -> None:
        """The drain's time (``limits.shutdown_timeout``) is nearly up: end now, acknowledged or not (what
        was not acknowledged the client still holds and sends again)."""
        if self._state is State.ESTABLISHED:
            self._finish_drain()
        elif self._state is not State.CLOSED:
            self.server_shutdown()

    def _finish_drain(self) -> None:
        # The will: MQTT 5 (3.1.2.5) publishes it when the server closes the connection without a DISCONNECT
        # 0x00 from the client, so it is published as before the drain: a v5 session's upstream gets DISCONNECT
        # 0x04 (disconnect with will message), a v3.1.1 one just the close (a DISCONNECT would discard the will).
        if self.v5:
            self._out_client.append(encode_disconnect(DisconnectReason.SERVER_SHUTTING_DOWN, "server shutting down"))
            self._out_upstream.append(encode_disconnect(DisconnectReason.WITH_WILL))
        self._close("server shutting down")

    def credentials_expired(self) -> None:
        """The I/O layer's timer at the credentials' expiry (a JWT's exp): v5 DISCONNECT 0xA0, then close."""
        self.disconnect(DisconnectReason.MAXIMUM_CONNECT_TIME, "credentials expired")

    def keep_alive_expired(self) -> None:
        """The I/O layer saw nothing from the client for 1.5 x keep_alive [MQTT-3.1.2-24]: v5 DISCONNECT
        0x8D, then close (the broker publishes the will: the client is gone, not leaving)."""
        self.disconnect(DisconnectReason.KEEP_ALIVE_TIMEOUT, "keep alive timeout")

    def disconnect(self, reason: DisconnectReason, why: str, discard_will: bool = False) -> None:
        """The front broker ends the session (rights revoked, an operator's kick): a v5 client is sent
        DISCONNECT with ``reason`` and ``why`` as its reason string; then the connection closes.

        ``discard_will``: the upstream is sent a normal DISCONNECT first, so that it drops the client's will
        (an identity whose rights were revoked must not publish one more message).
        """
        if self._state is State.CLOSED:
            return
        if self._state is State.ESTABLISHED:
            if self.v5:
                self._out_client.append(encode_disconnect(reason, why))
            if discard_will:
                self._out_upstream.append(NORMAL_DISCONNECT)
        self._close(why)

    def connection_closed(self) -> None:
        """The I/O layer closed the connection: no more bytes are read or produced (no Close action)."""
        self._set_state(State.CLOSED)

    # ------------------------------------------------------------------ state and closing

    def _set_state(self, new: State) -> None:
        """The one place the state changes, checked against :data:`broker.session.api.TRANSITIONS`."""
        old = self._state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise AssertionError(f"session state {old.name} -> {new.name} is not a transition")
        self._state = new
        self.reading_client = new in READING_CLIENT and self._held_client is None

    def _close(self, reason: str) -> None:
        if self._state is not State.CLOSED:
            self._set_state(State.CLOSED)
            self._actions.append(Close(reason))

    def _protocol_error(self, exc: ProtocolError, side: str) -> None:
        limit = exc.limit if isinstance(exc, LimitExceeded) else None
        if isinstance(exc, PacketTooLarge):
            limit = "connect_size" if self._state is State.WAIT_CONNECT else "packet_size"
        if limit is not None:
            self.stats.limit_hit(limit)
            user = self.username
            log_event(log, logging.INFO, "limit_exceeded", peer=self.peer, user=user, limit=limit, reason=str(exc))
        else:
            log.info("protocol error from %s %s: %s", side, self.peer, exc)
        self.stats.protocol_errors += 1
        if self._state is not State.ESTABLISHED and not self.stats.connect_result:
            self.stats.connect_result = "limit" if limit is not None else "protocol_error"
        self.bad_connect = self._state is State.WAIT_CONNECT
        if self.v5 and self._state is State.ESTABLISHED:
            self._out_client.append(encode_disconnect(exc.reason_code))
        elif self.v5 and self._state is State.WAIT_CONNECT:
            self._out_client.append(encode_connack(True, False, exc.reason_code))
        self._close(f"protocol error ({side}): {exc}")

    def _upstream_protocol_error(self, exc: ProtocolError) -> None:
        log.warning("protocol error from upstream for %s: %s", self.peer, exc)
        if self._state is State.ESTABLISHED and self.v5:
            self._out_client.append(encode_disconnect(DisconnectReason.UNSPECIFIED))
        elif self._state is State.WAIT_CONNACK:
            self.stats.connect_result = "upstream_unavailable"
            code = ConnackV5.SERVER_UNAVAILABLE if self.v5 else ConnackV3.SERVER_UNAVAILABLE
            self._out_client.append(encode_connack(self.v5, False, code))
        self._close(f"upstream protocol error: {exc}")

    def _refuse_connect(self, v3_code: int, v5_code: int, reason: str, result: str = "protocol_error") -> None:
        if not self.stats.connect_result:
            self.stats.connect_result = result
        log_event(
            log,
            logging.INFO,
            "connect_refused",
            peer=self.peer,
            user=self.username if self.username is not None else (self._connect.username if self._connect else None),
            client=self.client_id,
            result=result,
            reason=reason,
        )
        code = v5_code if self.v5 else v3_code
        self._out_client.append(encode_connack(self.v5, False, code))
        self._close(f"connect refused: {reason}")

    def _ask(self, action: str, topic: str, retain: bool) -> None:
        """Ask the I/O layer for a decision the policy does not know yet (see CheckAccess)."""
        if action == "deliver":
            if len(self._decided_down) > 64:
                self._decided_down.clear()  # answers of packets long gone: a cheap bound
        elif len(self._decided) > 64 + self.settings.decode_limits.filters:
            # The bound is above what one SUBSCRIBE may ask (its filters are all decided before it goes on):
            # cleared below that, a large one would lose its answers and ask again without end.
            self._decided.clear()
            self._unanswered.clear()
        self._actions.append(CheckAccess(action, topic, retain))

    def _deny(self, action: str, topic: str, retain: bool = False) -> None:
        """Log a denial (rate-limited per session); the caller counts it in stats."""
        deny_log = self._deny_log
        if deny_log is None:
            deny_log = self._deny_log = DenyLog(self.policy, self.username, self.client_id, self.team, self.peer)
        deny_log.deny(action, topic, retain)
