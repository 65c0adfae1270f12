"""CONNECT to CONNACK: the cold path of a session, from the client's first packet to ESTABLISHED.

The client's CONNECT is checked (protocol level, enhanced auth, empty ids), the I/O layer is
asked to authenticate it, the identity's client-id policy and will topic are checked, the
upstream is asked for a connection, and the CONNECT that goes upstream carries the front
broker's own identity. The upstream's CONNACK is adjusted for the client (assigned id,
maximum packet size) before it is relayed. Every refusal is a CONNACK with the reason.
No I/O here: the I/O layer runs the :class:`~broker.session.api.Authenticate` and
:class:`~broker.session.api.OpenUpstream` actions and calls back.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace

from acl.client_ids import client_id_allowed
from acl.identity import ANONYMOUS_CLIENT_PREFIX
from broker.logs import log_event
from broker.mqtt.errors import ProtocolError, ProtocolViolation, UnsupportedProtocol
from broker.mqtt.limits import LimitExceeded
from broker.mqtt.packets import (
    PacketType,
    check_fixed_flags,
    decode_connack,
    decode_connect,
    encode_connack,
    encode_connect,
    encode_disconnect,
)
from broker.mqtt.peek import peek_connect_level
from broker.mqtt.properties import Prop, Properties
from broker.mqtt.reasons import ConnackV3, ConnackV5, DisconnectReason
from broker.session.api import Authenticate, AuthResult, ClientIdRule, OpenUpstream, State
from broker.session.base import SessionBase, log
from broker.session.mount import fits, unmount_topic

ANONYMOUS_PREFIX = ANONYMOUS_CLIENT_PREFIX  # the namespace of anonymous clients' ids upstream

# CONNACK codes by which the upstream refuses the front broker's own credentials.
_CREDENTIALS_REFUSED = frozenset(
    {ConnackV3.BAD_CREDENTIALS, ConnackV3.NOT_AUTHORIZED, ConnackV5.BAD_CREDENTIALS, ConnackV5.NOT_AUTHORIZED}
)


class Handshake(SessionBase):
    __slots__ = ()

    def _on_connect(self, chunk: bytes, ends: list[int]) -> None:
        """The client's first packet(s): decode and check the CONNECT, then ask for authentication."""
        end = ends[0]
        if chunk[0] >> 4 != PacketType.CONNECT:
            raise ProtocolViolation("first packet is not CONNECT")
        self.stats.packets_in[PacketType.CONNECT] += 1
        # Peek at the level so that CONNECT errors can be answered in the right version.
        self.v5 = peek_connect_level(chunk, end) == 5
        try:
            connect = decode_connect(chunk, 0, end, self.settings.decode_limits)
        except UnsupportedProtocol as exc:
            self.bad_connect = True
            self.v5 = exc.v5_format
            self._refuse_connect(ConnackV3.UNACCEPTABLE_PROTOCOL, ConnackV5.UNSUPPORTED_PROTOCOL, str(exc))
            return
        except LimitExceeded as exc:
            self.bad_connect = True
            self.stats.limit_hit(exc.limit)
            log_event(log, logging.INFO, "limit_exceeded", peer=self.peer, limit=exc.limit, reason=str(exc))
            self._refuse_connect(ConnackV3.SERVER_UNAVAILABLE, exc.reason_code, str(exc), result="limit")
            return
        except ProtocolError as exc:
            self.bad_connect = True
            # Before CONNACK, a v5 client is answered with a CONNACK carrying the reason.
            if self.v5:
                self._refuse_connect(ConnackV3.UNACCEPTABLE_PROTOCOL, exc.reason_code, f"malformed CONNECT: {exc}")
            else:
                self._close(f"malformed CONNECT: {exc}")
                log.info("malformed CONNECT from %s: %s", self.peer, exc)
                self.stats.connect_result = "protocol_error"
            self.stats.protocol_errors += 1
            return
        self._connect = connect
        self.v5 = connect.v5
        self.keep_alive = connect.keepalive
        self.client_id = connect.client_id
        if connect.v5 and not self.settings.upstream_v5:
            log.warning(
                "MQTT 5 client %s refused: the embedded broker speaks MQTT 3.1.1 only; "
                "configure a v5 upstream (upstream.url pointing at Mosquitto or EMQX) for v5 clients "
                "such as the FlowFuse project-link nodes",
                self.peer,
            )
            self._refuse_connect(
                ConnackV3.UNACCEPTABLE_PROTOCOL, ConnackV5.UNSUPPORTED_PROTOCOL, "MQTT 5 needs a v5 upstream"
            )
            return
        if Prop.AUTHENTICATION_METHOD in connect.properties:
            self._refuse_connect(
                ConnackV3.NOT_AUTHORIZED, ConnackV5.BAD_AUTH_METHOD, "enhanced authentication is not supported"
            )
            return
        if not connect.v5 and not connect.client_id and not connect.clean_start:
            self._refuse_connect(
                ConnackV3.IDENTIFIER_REJECTED, ConnackV5.CLIENT_ID_INVALID, "empty client id needs clean session"
            )
            return
        self._set_state(State.AUTHENTICATING)
        # Bytes after CONNECT (the client did not wait for CONNACK) wait for the session.
        framer = self._client_framer
        self._early = chunk[end:] + framer.take_pending()
        framer.max_packet_size = self.settings.max_packet_size  # the CONNECT's own smaller limit is done
        self._actions.append(Authenticate(connect.username, connect.password, connect.client_id))

    def auth_done(self, result: AuthResult) -> None:
        """The answer to Authenticate: refuse the client, or ask for the upstream (OpenUpstream)."""
        if self._state is not State.AUTHENTICATING or self._connect is None:
            return
        connect = self._connect
        if not result.ok or result.policy is None:
            # Limits are not denials: the credentials were not judged (busy) or were fine (quota).
            if result.busy:
                self._refuse_connect(ConnackV3.SERVER_UNAVAILABLE, ConnackV5.SERVER_BUSY, "server busy", "limit")
                return
            if result.unavailable:
                # The deciding backend (the platform) did not answer: fail closed, but say it is us.
                self._refuse_connect(
                    ConnackV3.SERVER_UNAVAILABLE,
                    ConnackV5.SERVER_UNAVAILABLE,
                    "authentication backend unavailable",
                    "auth_unavailable",
                )
                return
            if result.quota_exceeded:
                self._refuse_connect(
                    ConnackV3.SERVER_UNAVAILABLE, ConnackV5.QUOTA_EXCEEDED, "connection quota exceeded", "limit"
                )
                return
            if result.client_id_rejected:
                self.stats.denied_connect += 1
                self._client_id_rule = result.client_id_rule
                self._refuse_client_id(connect.client_id)
                return
            self.stats.auth_failures += 1
            self.stats.denied_connect += 1
            if result.bad_credentials:
                self._refuse_connect(
                    ConnackV3.BAD_CREDENTIALS, ConnackV5.BAD_CREDENTIALS, "bad username or password", "bad_credentials"
                )
            else:
                self._refuse_connect(
                    ConnackV3.NOT_AUTHORIZED, ConnackV5.NOT_AUTHORIZED, "not authorized", "not_authorized"
                )
            return
        self.username = result.username
        self.policy = result.policy
        self._fast_expired = getattr(result.policy, "fast_paths_expired", None)
        self.team = result.team
        self._client_id_rule = result.client_id_rule
        self._mount = result.mountpoint
        self._mount_raw = result.mountpoint.encode()
        upstream_id = self._map_client_id(connect.client_id, result.username)
        if upstream_id is None:
            self.stats.denied_connect += 1
            self._refuse_client_id(connect.client_id)
            return
        will = connect.will
        mount = self._mount
        if will is not None and mount:
            # A will topic (or response topic) longer than an MQTT string once mounted cannot go upstream.
            response_topic = (will.properties or {}).get(Prop.RESPONSE_TOPIC, "")
            if not (fits(mount + will.topic) and fits(mount + response_topic)):
                self.stats.denied_will += 1
                self._refuse_connect(
                    ConnackV3.NOT_AUTHORIZED,
                    ConnackV5.TOPIC_NAME_INVALID,
                    "will topic too long under the mountpoint",
                    "not_authorized",
                )
                return
        if will is not None:
            key = ("publish", will.topic, will.retain)
            allowed = self._decided.pop(key, None)  # the answer it waited for
            if allowed is None:
                allowed = result.policy.check_publish(will.topic, will.retain)
            if allowed is None:
                # The platform decides the will too: wait for its answer (access_decided) in this state.
                self._auth_waiting = result
                self._ask("publish", will.topic, will.retain)
                return
            if not allowed:
                self.stats.denied_will += 1
                if key in self._unanswered:  # fail closed, and say why: the platform did not answer
                    self._unanswered.clear()
                    self._refuse_connect(
                        ConnackV3.SERVER_UNAVAILABLE,
                        ConnackV5.SERVER_UNAVAILABLE,
                        "will topic not checked: the authorization backend did not answer",
                        "auth_unavailable",
                    )
                    return
                self._deny("will", will.topic, will.retain)
                self._refuse_connect(
                    ConnackV3.NOT_AUTHORIZED, ConnackV5.NOT_AUTHORIZED, "will topic not allowed", "not_authorized"
                )
                return
        self.upstream_client_id = upstream_id
        self._set_state(State.CONNECTING_UPSTREAM)
        self._actions.append(OpenUpstream())

    def _refuse_client_id(self, client_id: str) -> None:
        exact = self._client_id_rule is ClientIdRule.EXACT
        must = "be the username" if exact else "be the username or start with '<username>:'"
        self._refuse_connect(
            ConnackV3.IDENTIFIER_REJECTED,
            ConnackV5.CLIENT_ID_INVALID,
            f"client id {client_id!r} must {must}",
            "not_authorized",
        )

    def _map_client_id(self, client_id: str, username: str | None) -> str | None:
        """Client-id policy: ids are bound to identities so no one can take over another's session.

        An authenticated client's id must be its username or ``<username>:<suffix>`` (only the
        username under :attr:`ClientIdRule.EXACT`; see :mod:`acl.client_ids`); an anonymous client's
        id is namespaced upstream. An empty id gets one assigned (the username itself under EXACT).
        """
        if username is None:
            if not client_id:
                client_id = self._assign(f"auto-{secrets.token_hex(8)}")
            return ANONYMOUS_PREFIX + client_id
        if not client_id:
            exact = self._client_id_rule is ClientIdRule.EXACT
            return self._assign(username if exact else f"{username}:auto-{secrets.token_hex(8)}")
        return client_id if client_id_allowed(self._client_id_rule.value, username, client_id) else None

    def _assign(self, client_id: str) -> str:
        self.assigned_client_id = client_id
        self.client_id = client_id
        return client_id

    def upstream_connected(self) -> None:
        """The upstream connection is open: the CONNECT goes upstream; start the CONNACK timer."""
        if self._state is not State.CONNECTING_UPSTREAM or self._connect is None:
            return
        connect = self._connect
        props = dict(connect.properties)
        # The front broker resolves the client's topic aliases itself, and it must see
        # every delivered topic to check it: no aliases in either direction upstream.
        props.pop(Prop.TOPIC_ALIAS_MAXIMUM, None)
        will = connect.will
        if will is not None and self._mount:
            will = replace(will, topic=self._mount + will.topic, properties=self._mount_response_topic(will.properties))
        upstream_connect = replace(
            connect,
            will=will,
            client_id=self.upstream_client_id,
            username=self.settings.upstream_username,
            password=(
                self.settings.upstream_password.encode() if self.settings.upstream_password is not None else None
            ),
            properties=props,
        )
        self._out_upstream.append(encode_connect(upstream_connect))
        self._set_state(State.WAIT_CONNACK)

    def upstream_failed(self, reason: str) -> None:
        """The upstream could not be reached, or its connection was lost: the client is told and closed."""
        if self._state in (State.CONNECTING_UPSTREAM, State.WAIT_CONNACK):
            self.stats.upstream_failures += 1
            self._refuse_connect(
                ConnackV3.SERVER_UNAVAILABLE,
                ConnackV5.SERVER_UNAVAILABLE,
                f"upstream unavailable: {reason}",
                "upstream_unavailable",
            )
        elif self._state is State.ESTABLISHED:
            if self.v5:
                self._out_client.append(encode_disconnect(DisconnectReason.UNSPECIFIED, "upstream connection lost"))
            self._close(f"upstream closed: {reason}")
        else:
            self._close(f"upstream closed: {reason}")

    def _resume_auth(self) -> None:
        """The will's access decision arrived (see access_decided): finish auth_done."""
        result, self._auth_waiting = self._auth_waiting, None
        if result is not None:
            self.auth_done(result)

    def _mount_response_topic(self, props: Properties) -> Properties:
        """A v5 Response Topic goes upstream under the mountpoint, so request/response works inside it."""
        if Prop.RESPONSE_TOPIC not in props:
            return props
        props = dict(props)
        props[Prop.RESPONSE_TOPIC] = self._mount + props[Prop.RESPONSE_TOPIC]
        return props

    def connack_timed_out(self, timeout: float) -> None:
        """The I/O layer's timer: an upstream that accepted the connection but sent no CONNACK."""
        if self._state is State.WAIT_CONNACK:
            self.upstream_failed(f"no CONNACK within {timeout:g}s")

    def _accept_connack(self, chunk: bytes, end: int) -> bool:
        """The upstream's CONNACK (``chunk[:end]``): relay it adjusted, or refuse; True once established."""
        if chunk[0] >> 4 != PacketType.CONNACK:
            raise ProtocolViolation("upstream did not answer CONNECT with CONNACK")
        self.stats.packets_out[PacketType.CONNACK] += 1
        check_fixed_flags(chunk[0], self.v5)
        connack = decode_connack(chunk, 0, end, self.v5)
        code = connack.reason_code
        if code in _CREDENTIALS_REFUSED:
            # The client already passed our checks: this is the front broker's own upstream
            # identity being refused, an operator problem the client cannot fix.
            log.error(
                "%s refused the front broker's credentials (code 0x%02x): check upstream.username/password",
                self.settings.upstream_label,
                code,
            )
            self.stats.upstream_failures += 1
            self._refuse_connect(
                ConnackV3.SERVER_UNAVAILABLE,
                ConnackV5.SERVER_UNAVAILABLE,
                "upstream refused credentials",
                "upstream_unavailable",
            )
            return False
        if code:
            self.stats.connect_result = "upstream_unavailable"
            self._out_client.append(chunk[:end])
            self._close(f"upstream refused connect with 0x{code:02x}")
            return False
        packet = chunk[:end]
        if self.v5:
            props = connack.properties
            self._aliases.maximum = props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
            self.keep_alive = props.get(Prop.SERVER_KEEP_ALIVE, self.keep_alive)  # the server's value wins
            if self.assigned_client_id is not None:
                props[Prop.ASSIGNED_CLIENT_IDENTIFIER] = self.assigned_client_id
            elif Prop.ASSIGNED_CLIENT_IDENTIFIER in props:
                # We always send an id upstream, so this should not happen; never leak a prefix.
                props.pop(Prop.ASSIGNED_CLIENT_IDENTIFIER)
            info = props.get(Prop.RESPONSE_INFORMATION)
            if self._mount and isinstance(info, str):
                # The basis of response topics the client builds (and sends mounted): shown as the client sees
                # topics; one outside the mount is no topic the client could use.
                seen = unmount_topic(self._mount, info)
                if seen is None:
                    props.pop(Prop.RESPONSE_INFORMATION)
                else:
                    props[Prop.RESPONSE_INFORMATION] = seen
            # Tell the client the smaller of our limit and the upstream's.
            limit = self.settings.max_packet_size
            props[Prop.MAXIMUM_PACKET_SIZE] = min(limit, props.get(Prop.MAXIMUM_PACKET_SIZE, limit))
            packet = encode_connack(True, connack.session_present, 0, props)
        self._out_client.append(packet)
        self._set_state(State.ESTABLISHED)
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
        return True
