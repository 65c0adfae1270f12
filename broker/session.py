"""Per-connection session logic, Sans-I/O.

A :class:`Session` sits between one client and its upstream connection. The I/O layer
feeds it bytes (``receive_client`` / ``receive_upstream``) and results of the slow
steps it asked for (``auth_done``, ``upstream_connected``, ``upstream_failed``); the
session answers with bytes to write (``out_client`` / ``out_upstream``) and actions
(``actions``). It never touches a socket, a thread or the event loop.

Relayed packets are forwarded as their original bytes, in runs: a chunk of several
allowed packets is written with a single slice.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

from broker.codec import (
    Connect,
    Framer,
    PacketType,
    Subscribe,
    UnsupportedProtocol,
    body_start,
    check_fixed_flags,
    decode_ack,
    decode_connack,
    decode_connect,
    decode_disconnect,
    decode_publish,
    decode_suback,
    decode_subscribe,
    decode_unsubscribe,
    encode_ack,
    encode_connack,
    encode_connect,
    encode_disconnect,
    encode_publish,
    encode_suback,
    encode_subscribe,
)
from broker.errors import MalformedPacket, PacketTooLarge, ProtocolError, ProtocolViolation, TopicAliasInvalid
from broker.logs import DenyLogLimiter, explain_rule, log_event
from broker.properties import Prop
from broker.stats import Stats

log = logging.getLogger("mqtt_front.session")

_PUBLISH = PacketType.PUBLISH
_PUBACK = PacketType.PUBACK
_PUBREC = PacketType.PUBREC
_PUBREL = PacketType.PUBREL
_PUBCOMP = PacketType.PUBCOMP

# v3.1.1 CONNACK return codes and their v5 counterparts.
V3_UNACCEPTABLE_PROTOCOL = 0x01
V3_IDENTIFIER_REJECTED = 0x02
V3_SERVER_UNAVAILABLE = 0x03
V3_BAD_CREDENTIALS = 0x04
V3_NOT_AUTHORIZED = 0x05
V5_UNSPECIFIED = 0x80
V5_UNSUPPORTED_PROTOCOL = 0x84
V5_CLIENT_ID_INVALID = 0x85
V5_BAD_CREDENTIALS = 0x86
V5_NOT_AUTHORIZED = 0x87
V5_SERVER_UNAVAILABLE = 0x88
V5_BAD_AUTH_METHOD = 0x8C
V5_QUOTA_EXCEEDED = 0x97
V5_SERVER_BUSY = 0x89
V5_SUBACK_NOT_AUTHORIZED = 0x87
V3_SUBACK_FAILURE = 0x80

# Anonymous clients share one client-id namespace upstream, apart from every user's.
ANONYMOUS_PREFIX = "anonymous:"


class AccessPolicy(Protocol):
    """What the session needs from the ACL engine for one client."""

    def check_publish(self, topic: str, retain: bool = False) -> bool: ...
    def check_receive(self, topic: str) -> bool: ...
    def check_subscribe(self, topic_filter: str) -> bool: ...


# Decides one packet of a chunk: None = forward as is, b"" = drop, bytes = send these instead.
_Route = Callable[[bytes, int, int], "bytes | None"]

_CLIENT_ONLY = frozenset(
    {PacketType.CONNECT, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE, PacketType.PINGREQ, PacketType.CONNACK}
)


class State(Enum):
    WAIT_CONNECT = 1
    AUTHENTICATING = 2
    CONNECTING_UPSTREAM = 3
    WAIT_CONNACK = 4
    ESTABLISHED = 5
    CLOSED = 6


@dataclass(slots=True)
class Authenticate:
    """Ask the I/O layer to check credentials, then call ``auth_done``."""

    username: str | None
    password: bytes | None
    client_id: str


@dataclass(slots=True)
class OpenUpstream:
    """Ask the I/O layer to connect upstream, then call ``upstream_connected``/``upstream_failed``."""


@dataclass(slots=True)
class Close:
    """Flush what is queued for the client, then close both sides."""

    reason: str


Action = Authenticate | OpenUpstream | Close


@dataclass(slots=True)
class AuthResult:
    """Outcome of authentication: an access policy bound to the identity, or a refusal."""

    ok: bool
    username: str | None = None  # the authenticated identity (None = anonymous)
    policy: AccessPolicy | None = None
    team: str | None = None
    bad_credentials: bool = False  # refusal reason: wrong credentials vs. not allowed at all
    quota_exceeded: bool = False  # refusal reason: the team has all the connections it may have
    busy: bool = False  # refusal reason: too many password checks queued (try again later)


@dataclass(slots=True)
class SessionSettings:
    max_packet_size: int = 1_048_576
    upstream_v5: bool = True  # False for the embedded MQTT 3.1.1-only broker
    upstream_username: str | None = None
    upstream_password: str | None = None
    disconnect_on_deny: bool = False
    upstream_label: str = "upstream"


@dataclass(slots=True)
class _PendingSuback:
    # Per original filter position: None = forwarded upstream, int = our own refusal code.
    codes: list[int | None] = field(default_factory=list)


class Session:
    __slots__ = (
        "_alias_max",
        "_client_alias",
        "_client_denied_qos2",
        "_client_framer",
        "_connect",
        "_deny_log",
        "_early",
        "_held_acks",
        "_inflight",
        "_pending_subacks",
        "_publish_ok",
        "_publish_ok_retained",
        "_receive_ok",
        "_seq",
        "_upstream_dropped_qos2",
        "_upstream_framer",
        "actions",
        "assigned_client_id",
        "client_id",
        "out_client",
        "out_upstream",
        "peer",
        "policy",
        "settings",
        "state",
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
        self.state = State.WAIT_CONNECT
        self.v5 = False
        self.out_client: list[bytes] = []
        self.out_upstream: list[bytes] = []
        self.actions: list[Action] = []
        self._client_framer = Framer(settings.max_packet_size)
        self._upstream_framer = Framer()
        self._connect: Connect | None = None
        self.client_id = ""
        self.upstream_client_id = ""
        self.assigned_client_id: str | None = None
        self.username: str | None = None
        self.team: str | None = None
        self.policy: AccessPolicy | None = None
        self._client_alias: dict[int, str] = {}
        self._alias_max = 0
        self._client_denied_qos2: set[int] = set()
        # Acks must reach the client in PUBLISH order [MQTT-4.6.0-2/3]: our own acks for refused
        # publishes wait behind the upstream's acks for earlier forwarded ones.
        self._inflight: dict[int, int] = {}  # packet id -> sequence number, in forwarding order
        self._held_acks: list[tuple[int, bytes]] = []  # (sequence number it waits for, ack)
        self._seq = 0
        self._upstream_dropped_qos2: set[int] = set()
        self._pending_subacks: dict[int, _PendingSuback] = {}
        # Raw topic bytes already validated and allowed: the hot paths skip decoding and ACL walks.
        self._publish_ok: set[bytes] = set()
        self._publish_ok_retained: set[bytes] = set()
        self._receive_ok: set[bytes] = set()
        self._deny_log: DenyLogLimiter | None = None  # created on the first denial
        self._early = b""

    # ------------------------------------------------------------------ helpers

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def reading_client(self) -> bool:
        """Whether the I/O layer should keep reading the client (not while the handshake runs)."""
        return self.state in (State.WAIT_CONNECT, State.ESTABLISHED)

    def _close(self, reason: str) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.actions.append(Close(reason))

    def _protocol_error(self, exc: ProtocolError, side: str) -> None:
        log.info("protocol error from %s %s: %s", side, self.peer, exc)
        self.stats.protocol_errors += 1
        if self.state is not State.ESTABLISHED and not self.stats.connect_result:
            self.stats.connect_result = "limit" if isinstance(exc, PacketTooLarge) else "protocol_error"
        if self.v5 and self.state is State.ESTABLISHED:
            self.out_client.append(encode_disconnect(exc.reason_code))
        elif self.v5 and self.state is State.WAIT_CONNECT:
            self.out_client.append(encode_connack(True, False, exc.reason_code))
        self._close(f"protocol error ({side}): {exc}")

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
        self.out_client.append(encode_connack(self.v5, False, code))
        self._close(f"connect refused: {reason}")

    def _log_deny(self, what: str, topic: str, retain: bool = False) -> None:
        # Rate-limited per session so one abusive client cannot flood the log; the next
        # line that goes out tells how many were suppressed.
        limiter = self._deny_log
        if limiter is None:
            limiter = self._deny_log = DenyLogLimiter()
        if not limiter.allow() or not log.isEnabledFor(logging.INFO):
            return
        suppressed = limiter.take_suppressed()
        log_event(
            log,
            logging.INFO,
            "deny",
            action=what,
            topic=topic,
            rule=explain_rule(self.policy, what, topic, retain) if self.policy is not None else None,
            user=self.username,
            client=self.client_id,
            team=self.team,
            peer=self.peer,
            suppressed=suppressed or None,
        )

    # ------------------------------------------------------------------ client side

    def receive_client(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is not State.ESTABLISHED and self.state is not State.WAIT_CONNECT:
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
            if self.state is State.ESTABLISHED:
                self._client_packets(chunk, ends, 0)
            else:
                self._on_connect(chunk, ends)
            if self._client_framer.error is not None and not self.closed:
                raise self._client_framer.error
        except ProtocolError as exc:
            if self.state is State.WAIT_CONNECT and data[:1] == b"\x10":
                # A CONNECT refused from its fixed header (too large, bad length): a v5 client
                # still gets a CONNACK with the reason if its protocol level is in this read.
                self.v5 = _peek_level(data, len(data)) == 5
            self._protocol_error(exc, "client")

    def _on_connect(self, chunk: bytes, ends: list[int]) -> None:
        end = ends[0]
        if chunk[0] >> 4 != PacketType.CONNECT:
            raise ProtocolViolation("first packet is not CONNECT")
        self.stats.packets_in[PacketType.CONNECT] += 1
        # Peek at the level so that CONNECT errors can be answered in the right version.
        self.v5 = _peek_level(chunk, end) == 5
        try:
            connect = decode_connect(chunk, 0, end)
        except UnsupportedProtocol as exc:
            self.v5 = exc.v5_format
            self._refuse_connect(V3_UNACCEPTABLE_PROTOCOL, V5_UNSUPPORTED_PROTOCOL, str(exc))
            return
        except ProtocolError as exc:
            # Before CONNACK, a v5 client is answered with a CONNACK carrying the reason.
            if self.v5:
                self._refuse_connect(0, exc.reason_code, f"malformed CONNECT: {exc}")
            else:
                self._close(f"malformed CONNECT: {exc}")
                log.info("malformed CONNECT from %s: %s", self.peer, exc)
                self.stats.connect_result = "protocol_error"
            self.stats.protocol_errors += 1
            return
        self._connect = connect
        self.v5 = connect.v5
        self.client_id = connect.client_id
        if connect.v5 and not self.settings.upstream_v5:
            log.warning(
                "MQTT 5 client %s refused: the embedded broker speaks MQTT 3.1.1 only; "
                "configure a v5 upstream (upstream.url pointing at Mosquitto or EMQX) for v5 clients "
                "such as the FlowFuse project-link nodes",
                self.peer,
            )
            self._refuse_connect(0, V5_UNSUPPORTED_PROTOCOL, "MQTT 5 needs a v5 upstream")
            return
        if Prop.AUTHENTICATION_METHOD in connect.properties:
            self._refuse_connect(0, V5_BAD_AUTH_METHOD, "enhanced authentication is not supported")
            return
        if not connect.v5 and not connect.client_id and not connect.clean_start:
            self._refuse_connect(V3_IDENTIFIER_REJECTED, 0, "empty client id needs clean session")
            return
        self.state = State.AUTHENTICATING
        # Bytes after CONNECT (the client did not wait for CONNACK) wait for the session.
        self._early = chunk[end:] + self._client_framer.take_pending()
        self.actions.append(Authenticate(connect.username, connect.password, connect.client_id))

    def auth_done(self, result: AuthResult) -> None:
        if self.state is not State.AUTHENTICATING or self._connect is None:
            return
        connect = self._connect
        if not result.ok or result.policy is None:
            # Limits are not denials: the credentials were not judged (busy) or were fine (quota).
            if result.busy:
                self._refuse_connect(V3_SERVER_UNAVAILABLE, V5_SERVER_BUSY, "server busy", "limit")
                return
            if result.quota_exceeded:
                self._refuse_connect(V3_SERVER_UNAVAILABLE, V5_QUOTA_EXCEEDED, "connection quota exceeded", "limit")
                return
            self.stats.auth_failures += 1
            self.stats.denied_connect += 1
            if result.bad_credentials:
                self._refuse_connect(
                    V3_BAD_CREDENTIALS, V5_BAD_CREDENTIALS, "bad username or password", "bad_credentials"
                )
            else:
                self._refuse_connect(V3_NOT_AUTHORIZED, V5_NOT_AUTHORIZED, "not authorized", "not_authorized")
            return
        self.username = result.username
        self.policy = result.policy
        self.team = result.team
        upstream_id = self._map_client_id(connect.client_id, result.username)
        if upstream_id is None:
            self.stats.denied_connect += 1
            self._refuse_connect(
                V3_IDENTIFIER_REJECTED,
                V5_CLIENT_ID_INVALID,
                f"client id {connect.client_id!r} must be the username or start with '<username>:'",
                "not_authorized",
            )
            return
        if connect.will is not None and not result.policy.check_publish(connect.will.topic, connect.will.retain):
            self.stats.denied_will += 1
            self._log_deny("will", connect.will.topic, connect.will.retain)
            self._refuse_connect(V3_NOT_AUTHORIZED, V5_NOT_AUTHORIZED, "will topic not allowed", "not_authorized")
            return
        self.upstream_client_id = upstream_id
        self.state = State.CONNECTING_UPSTREAM
        self.actions.append(OpenUpstream())

    def _map_client_id(self, client_id: str, username: str | None) -> str | None:
        """Client-id policy: ids are bound to identities so no one can take over another's session.

        An authenticated client's id must be its username or start with ``<username>:``;
        an anonymous client's id is namespaced upstream. An empty id gets one assigned.
        """
        if username is None:
            if not client_id:
                client_id = self._assign(f"auto-{secrets.token_hex(8)}")
            return ANONYMOUS_PREFIX + client_id
        if not client_id:
            return self._assign(f"{username}:auto-{secrets.token_hex(8)}")
        if client_id == username or client_id.startswith(username + ":"):
            return client_id
        return None

    def _assign(self, client_id: str) -> str:
        self.assigned_client_id = client_id
        self.client_id = client_id
        return client_id

    def upstream_connected(self) -> None:
        if self.state is not State.CONNECTING_UPSTREAM or self._connect is None:
            return
        connect = self._connect
        props = dict(connect.properties)
        # The front broker resolves the client's topic aliases itself, and it must see
        # every delivered topic to check it: no aliases in either direction upstream.
        props.pop(Prop.TOPIC_ALIAS_MAXIMUM, None)
        upstream_connect = replace(
            connect,
            client_id=self.upstream_client_id,
            username=self.settings.upstream_username,
            password=(
                self.settings.upstream_password.encode() if self.settings.upstream_password is not None else None
            ),
            properties=props,
        )
        self.out_upstream.append(encode_connect(upstream_connect))
        self.state = State.WAIT_CONNACK

    def upstream_failed(self, reason: str) -> None:
        if self.state in (State.CONNECTING_UPSTREAM, State.WAIT_CONNACK):
            self.stats.upstream_failures += 1
            self._refuse_connect(
                V3_SERVER_UNAVAILABLE, V5_SERVER_UNAVAILABLE, f"upstream unavailable: {reason}", "upstream_unavailable"
            )
        elif self.state is State.ESTABLISHED:
            if self.v5:
                self.out_client.append(encode_disconnect(V5_UNSPECIFIED, "upstream connection lost"))
            self._close(f"upstream closed: {reason}")
        else:
            self._close(f"upstream closed: {reason}")

    def _client_packets(self, chunk: bytes, ends: list[int], start: int) -> None:
        """Route client packets; allowed ones are forwarded as runs of original bytes."""
        self._relay(chunk, ends, start, self.out_upstream, self._route_client)

    def _relay(self, chunk: bytes, ends: list[int], start: int, out: list[bytes], route: _Route) -> None:
        """Forward ``chunk``'s packets to ``out`` as runs of the original bytes.

        ``route`` decides each packet: None = forward it as is, b"" = drop it, other bytes =
        send these in its place. Once the session closes nothing after the packet that closed
        it goes out (a forwarded DISCONNECT itself still does).
        """
        run = start
        try:
            for end in ends:
                replacement = route(chunk, start, end)
                if replacement is not None:
                    if run < start:
                        out.append(chunk[run:start])
                    if replacement:
                        out.append(replacement)
                    run = end
                start = end
                if self.state is State.CLOSED:
                    break
        except ProtocolError:
            # Packets before the bad one were valid: they still go out.
            if run < start:
                out.append(chunk[run:start])
            raise
        if run < start:
            out.append(chunk if run == 0 and start == len(chunk) else chunk[run:start])

    def _route_client(self, chunk: bytes, start: int, end: int) -> bytes | None:
        first = chunk[start]
        ptype = first >> 4
        stats = self.stats
        stats.packets_in[ptype] += 1
        v5 = self.v5
        if ptype == _PUBLISH:
            stats.msgs_in += 1
            stats.bytes_in += end - start
            return self._client_publish(chunk, start, end, v5)
        if ptype in (_PUBACK, _PUBCOMP, _PUBREC):
            check_fixed_flags(first, v5)
            decode_ack(chunk, start, end, v5)
            return None
        if ptype == _PUBREL:
            check_fixed_flags(first, v5)
            ack = decode_ack(chunk, start, end, v5)
            if ack.packet_id in self._client_denied_qos2:
                # Ends a QoS 2 flow the front broker refused: answer it here.
                self._client_denied_qos2.discard(ack.packet_id)
                self.out_client.append(encode_ack(PacketType.PUBCOMP, v5, ack.packet_id))
                return b""
            return None
        return self._client_control(chunk, start, end, ptype)

    def _client_publish(self, chunk: bytes, start: int, end: int, v5: bool) -> bytes | None:
        """None = forward the original bytes; b"" = drop; other bytes = forward these instead."""
        # Fast path: a topic whose raw bytes were validated and allowed before needs no decoding
        # and no ACL walk (v5: only without properties). Everything else takes the full path below.
        first = chunk[start]
        qos = (first >> 1) & 3
        pos = start + 2 if chunk[start + 1] < 0x80 else body_start(chunk, start)
        if pos + 2 <= end and qos != 3 and (qos or not first & 8):
            stop = pos + 2 + ((chunk[pos] << 8) | chunk[pos + 1])
            after = stop + 2 if qos else stop
            if (after + 1 <= end and chunk[after] == 0) if v5 else after <= end:
                cache = self._publish_ok_retained if first & 1 else self._publish_ok
                if chunk[pos + 2 : stop] in cache:
                    if not qos:
                        return None
                    packet_id = (chunk[stop] << 8) | chunk[stop + 1]
                    if packet_id:
                        self._seq += 1
                        self._inflight[packet_id] = self._seq
                        return None
        pub = decode_publish(chunk, start, end, v5)
        topic = pub.topic
        rewritten = False
        props = pub.properties
        if props and Prop.SUBSCRIPTION_IDENTIFIER in props:
            raise ProtocolViolation("Subscription Identifier in a PUBLISH from the client")  # [MQTT-3.3.4-6]
        if props and Prop.TOPIC_ALIAS in props:
            alias = props[Prop.TOPIC_ALIAS]
            if alias > self._alias_max:
                raise TopicAliasInvalid(f"topic alias {alias} above the maximum {self._alias_max}")
            if topic:
                self._client_alias[alias] = topic
            else:
                known = self._client_alias.get(alias)
                if known is None:
                    raise TopicAliasInvalid(f"topic alias {alias} was never set")
                topic = known
            rewritten = True
        policy = self.policy
        assert policy is not None
        if not policy.check_publish(topic, pub.retain):
            self.stats.denied_publish += 1
            self._log_deny("publish", topic)
            if self.settings.disconnect_on_deny:
                if v5:
                    self.out_client.append(encode_disconnect(V5_NOT_AUTHORIZED, "publish not authorized"))
                self._close("publish not authorized")
                return b""
            # Acknowledge so the client does not retry forever; v5 learns why.
            if pub.qos:
                code = V5_NOT_AUTHORIZED if v5 else 0
                ack = encode_ack(PacketType.PUBACK if pub.qos == 1 else PacketType.PUBREC, v5, pub.packet_id, code)
                if pub.qos == 2 and not v5:
                    self._client_denied_qos2.add(pub.packet_id)
                if self._inflight:
                    self._held_acks.append((self._seq, ack))
                else:
                    self.out_client.append(ack)
            return b""
        if pub.qos:
            self._seq += 1
            self._inflight[pub.packet_id] = self._seq
        if not rewritten:
            _remember(self._publish_ok_retained if pub.retain else self._publish_ok, topic.encode())
            return None
        assert props is not None
        props = dict(props)
        del props[Prop.TOPIC_ALIAS]
        return encode_publish(pub.qos, pub.retain, pub.dup, topic, pub.packet_id, props, chunk[pub.payload_start : end])

    def _client_control(self, chunk: bytes, start: int, end: int, ptype: int) -> bytes | None:
        v5 = self.v5
        check_fixed_flags(chunk[start], v5)
        if ptype == PacketType.SUBSCRIBE:
            return self._client_subscribe(decode_subscribe(chunk, start, end, v5))
        if ptype == PacketType.UNSUBSCRIBE:
            decode_unsubscribe(chunk, start, end, v5)
            return None
        if ptype == PacketType.PINGREQ:
            if end - start != 2:
                raise MalformedPacket("PINGREQ with a body")
            return None
        if ptype == PacketType.DISCONNECT:
            decode_disconnect(chunk, start, end, v5)
            # Forwarded as is (a v5 reason 0x04 asks the broker to publish the will), then close.
            self._close("client disconnected")
            return None
        if ptype == PacketType.CONNECT:
            raise ProtocolViolation("second CONNECT")
        raise ProtocolViolation(f"{PacketType(ptype).name} is not sent by clients")

    def _client_subscribe(self, sub: Subscribe) -> bytes | None:
        policy = self.policy
        assert policy is not None
        refused = V5_SUBACK_NOT_AUTHORIZED if self.v5 else V3_SUBACK_FAILURE
        codes: list[int | None] = []
        allowed: list[tuple[str, int]] = []
        for filt, options in sub.filters:
            if policy.check_subscribe(filt):
                codes.append(None)
                allowed.append((filt, options))
            else:
                codes.append(refused)
                self.stats.denied_subscribe += 1
                self._log_deny("subscribe", filt)
        if len(allowed) == len(sub.filters):
            return None
        if not allowed:
            self.out_client.append(encode_suback(self.v5, sub.packet_id, [c or 0 for c in codes]))
            return b""
        self._pending_subacks[sub.packet_id] = _PendingSuback(codes)
        return encode_subscribe(Subscribe(sub.packet_id, allowed, sub.properties), self.v5)

    # ------------------------------------------------------------------ upstream side

    def receive_upstream(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        try:
            chunk, ends = self._upstream_framer.feed(data)
            if not ends:
                return
            if self.state is State.ESTABLISHED:
                self._upstream_packets(chunk, ends, 0)
            elif self.state is State.WAIT_CONNACK:
                self._on_connack(chunk, ends)
            else:
                raise ProtocolViolation("upstream sent data before CONNECT")
            if self._upstream_framer.error is not None and not self.closed:
                raise self._upstream_framer.error
        except ProtocolError as exc:
            log.warning("protocol error from upstream for %s: %s", self.peer, exc)
            if self.state is State.ESTABLISHED and self.v5:
                self.out_client.append(encode_disconnect(V5_UNSPECIFIED))
            elif self.state is State.WAIT_CONNACK:
                self.stats.connect_result = "upstream_unavailable"
                self.out_client.append(
                    encode_connack(self.v5, False, V5_SERVER_UNAVAILABLE if self.v5 else V3_SERVER_UNAVAILABLE)
                )
            self._close(f"upstream protocol error: {exc}")

    def _on_connack(self, chunk: bytes, ends: list[int]) -> None:
        end = ends[0]
        if chunk[0] >> 4 != PacketType.CONNACK:
            raise ProtocolViolation("upstream did not answer CONNECT with CONNACK")
        self.stats.packets_out[PacketType.CONNACK] += 1
        check_fixed_flags(chunk[0], self.v5)
        connack = decode_connack(chunk, 0, end, self.v5)
        code = connack.reason_code
        if code in (V3_BAD_CREDENTIALS, V3_NOT_AUTHORIZED, V5_BAD_CREDENTIALS, V5_NOT_AUTHORIZED):
            # The client already passed our checks: this is the front broker's own upstream
            # identity being refused, an operator problem the client cannot fix.
            log.error(
                "%s refused the front broker's credentials (code 0x%02x): check upstream.username/password",
                self.settings.upstream_label,
                code,
            )
            self.stats.upstream_failures += 1
            self._refuse_connect(
                V3_SERVER_UNAVAILABLE, V5_SERVER_UNAVAILABLE, "upstream refused credentials", "upstream_unavailable"
            )
            return
        if code:
            self.stats.connect_result = "upstream_unavailable"
            self.out_client.append(chunk[:end])
            self._close(f"upstream refused connect with 0x{code:02x}")
            return
        packet = chunk[:end]
        if self.v5:
            props = connack.properties
            self._alias_max = props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
            if self.assigned_client_id is not None:
                props[Prop.ASSIGNED_CLIENT_IDENTIFIER] = self.assigned_client_id
            elif Prop.ASSIGNED_CLIENT_IDENTIFIER in props:
                # We always send an id upstream, so this should not happen; never leak a prefix.
                props.pop(Prop.ASSIGNED_CLIENT_IDENTIFIER)
            # Tell the client the smaller of our limit and the upstream's.
            limit = self.settings.max_packet_size
            props[Prop.MAXIMUM_PACKET_SIZE] = min(limit, props.get(Prop.MAXIMUM_PACKET_SIZE, limit))
            packet = encode_connack(True, connack.session_present, 0, props)
        self.out_client.append(packet)
        self.state = State.ESTABLISHED
        self.stats.connects_ok += 1
        self.stats.connect_result = "ok"
        log_event(
            log,
            logging.INFO,
            "connect",
            peer=self.peer,
            user=self.username,
            client=self.client_id,
            team=self.team,
            protocol="5" if self.v5 else "3.1.1",
        )
        if len(ends) > 1:
            self._upstream_packets(chunk, ends[1:], end)
        early = self._early
        if early:
            self._early = b""
            self.receive_client(early)

    def _upstream_packets(self, chunk: bytes, ends: list[int], start: int) -> None:
        """Route upstream packets; deliveries the client may not read are dropped here."""
        self._relay(chunk, ends, start, self.out_client, self._route_upstream)

    def _route_upstream(self, chunk: bytes, start: int, end: int) -> bytes | None:
        ptype = chunk[start] >> 4
        self.stats.packets_out[ptype] += 1
        v5 = self.v5
        if ptype == _PUBLISH:
            return self._upstream_publish(chunk, start, end, v5)
        if ptype in (_PUBACK, _PUBREC):
            if self._inflight:
                # A plain ack is 4 bytes with the packet id last; others need decoding.
                if end - start == 4:
                    packet_id = (chunk[end - 2] << 8) | chunk[end - 1]
                else:
                    packet_id = decode_ack(chunk, start, end, v5).packet_id
                self._inflight.pop(packet_id, None)
                if self._held_acks:
                    # This ack, then our own acks that were waiting behind it.
                    return chunk[start:end] + self._release_acks()
            return None
        if ptype == _PUBREL:
            if self._upstream_dropped_qos2:
                ack = decode_ack(chunk, start, end, v5)
                if ack.packet_id in self._upstream_dropped_qos2:
                    self._upstream_dropped_qos2.discard(ack.packet_id)
                    self.out_upstream.append(encode_ack(PacketType.PUBCOMP, v5, ack.packet_id))
                    return b""
            return None
        if ptype == PacketType.SUBACK:
            return self._merge_suback(chunk, start, end) if self._pending_subacks else None
        if ptype == PacketType.DISCONNECT:
            # Relayed to a v5 client (it carries the reason); a v3.1.1 client just sees the close.
            self._close("upstream sent DISCONNECT")
            return None if v5 else b""
        if ptype in _CLIENT_ONLY:
            raise ProtocolViolation(f"upstream sent {PacketType(ptype).name}")
        return None

    def _release_acks(self) -> bytes:
        """Our held acks whose earlier forwarded publishes are all acknowledged now."""
        first_open = next(iter(self._inflight.values()), None)
        held = self._held_acks
        i = 0
        while i < len(held) and (first_open is None or held[i][0] < first_open):
            i += 1
        released = b"".join(ack for _, ack in held[:i])
        del held[:i]
        return released

    def _upstream_publish(self, chunk: bytes, start: int, end: int, v5: bool) -> bytes | None:
        # Fast path: a delivery topic (raw bytes) this client was allowed to read before.
        pos = start + 2 if chunk[start + 1] < 0x80 else body_start(chunk, start)
        if pos + 2 <= end:
            stop = pos + 2 + ((chunk[pos] << 8) | chunk[pos + 1])
            if stop <= end and chunk[pos + 2 : stop] in self._receive_ok:
                stats = self.stats
                stats.msgs_out += 1
                stats.bytes_out += end - start
                return None
        pub = decode_publish(chunk, start, end, v5)
        policy = self.policy
        if policy is not None and policy.check_receive(pub.topic):
            _remember(self._receive_ok, pub.topic.encode())
            stats = self.stats
            stats.msgs_out += 1
            stats.bytes_out += end - start
            return None
        self.stats.denied_deliver += 1
        self._log_deny("deliver", pub.topic)
        # Acknowledge on the client's behalf so the upstream flow completes; the client
        # never sees this packet id, so its ids stay consistent.
        if pub.qos == 1:
            self.out_upstream.append(encode_ack(PacketType.PUBACK, v5, pub.packet_id))
        elif pub.qos == 2:
            self.out_upstream.append(encode_ack(PacketType.PUBREC, v5, pub.packet_id))
            self._upstream_dropped_qos2.add(pub.packet_id)
        return b""

    def _merge_suback(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """Put our refusals back into a SUBACK for a SUBSCRIBE we forwarded in part."""
        suback = decode_suback(chunk, start, end, self.v5)
        pending = self._pending_subacks.pop(suback.packet_id, None)
        if pending is None:
            return None
        upstream_codes = iter(suback.reason_codes)
        codes = [next(upstream_codes, V5_UNSPECIFIED) if c is None else c for c in pending.codes]
        return encode_suback(self.v5, suback.packet_id, codes, suback.properties)


_ALLOWED_CACHE_SIZE = 1024
# Longer topics are not cached: 1024 topics of 64 KB would hold 64 MB per cache and session.
_CACHED_TOPIC_MAX = 256


def _remember(allowed: set[bytes], raw_topic: bytes) -> None:
    if len(raw_topic) > _CACHED_TOPIC_MAX:
        return
    if len(allowed) >= _ALLOWED_CACHE_SIZE:
        allowed.clear()  # a cheap bound: a hot working set refills at once
    allowed.add(raw_topic)


def _peek_level(buf: bytes, end: int) -> int:
    """Protocol level byte of a CONNECT, or 0 if it cannot be found."""
    pos = 1
    while pos < end and buf[pos] & 0x80:
        pos += 1
    pos += 1
    if pos + 2 > end:
        return 0
    name_len = (buf[pos] << 8) | buf[pos + 1]
    level_at = pos + 2 + name_len
    return buf[level_at] if level_at < end else 0
