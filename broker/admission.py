"""Admission: who may connect, as whom, and whether their team still has room.

For each CONNECT the session asks about (an :class:`~broker.session.api.Authenticate`
action), :class:`Admission` decides the identity (the verified client certificate on a
``use_identity_as_username`` listener, else the username and password through the users
file), binds the ACL engine to it, and counts the connection against
``limits.max_connections_per_team``. Every refusal is an :class:`~broker.session.api.AuthResult`;
the session turns it into the CONNACK. Fails closed on any error in the auth path.
"""

from __future__ import annotations

import logging

from acl.engine import AclEngine
from acl.identity import parse_identity
from broker.auth.users import Authenticator, username_problem
from broker.edge.tls import TlsContexts, peer_identity
from broker.logs import log_event
from broker.ops.metrics import TeamLabels
from broker.relay import ClientTransport
from broker.session import Authenticate, AuthResult

log = logging.getLogger("mqtt_front.server")


class Admission:
    def __init__(
        self,
        authenticator: Authenticator,
        acl: AclEngine,
        tls: TlsContexts,
        teams: TeamLabels,
        max_per_team: int | None,
    ) -> None:
        self.authenticator = authenticator
        self.acl = acl
        self.tls = tls
        self.teams = teams  # metrics: team labels go to teams in the order they first authenticate
        self.max_per_team = max_per_team
        self.team_connections: dict[str, int] = {}  # authenticated connections per team, for the team cap

    async def admit(
        self, request: Authenticate, listener: str, transport: ClientTransport | None, peer: str
    ) -> AuthResult:
        """Authenticate the CONNECT and take a team slot; an admitted result must be released later."""
        if self.tls.identity_as_username(listener):
            # The verified client certificate is the identity: CONNECT's username/password are ignored.
            result = self.authorize_identity(peer_identity(transport), request.client_id, peer)
        else:
            result = await self.authorize(request.username, request.password, request.client_id, peer)
        if result.ok and result.team is not None and not self.take_team_slot(result.team):
            return AuthResult(False, quota_exceeded=True)
        return result

    def authorize_identity(self, username: str | None, client_id: str, peer: str) -> AuthResult:
        """A verified client certificate's identity as the username (``use_identity_as_username``).

        There is no password: the TLS handshake proved the identity. No certificate (a
        ``require_client_cert: false`` listener) or an unusable name is refused as not authorized.
        """
        problem = "no client certificate" if username is None else username_problem(username)
        if problem is not None:
            log_event(
                log,
                logging.INFO,
                "connect_refused",
                peer=peer,
                user=username,
                client=client_id,
                result="not_authorized",
                reason=f"certificate identity: {problem}",
            )
            return AuthResult(False)
        return self._bind(username, client_id)

    async def authorize(self, username: str | None, password: bytes | None, client_id: str, peer: str) -> AuthResult:
        if username is not None and (problem := username_problem(username)) is not None:
            # Fail closed even if a future auth backend accepts such a name: to the client
            # it is simply an unknown user.
            log.warning("unusable username from %s (%s): refused as bad credentials", peer, problem)
            return AuthResult(False, bad_credentials=True)
        try:
            verdict = await self.authenticator.check(username, password)
        except Exception:  # fail closed on any error in the auth path
            log.exception("authentication error for %s", peer)
            return AuthResult(False)
        if not verdict.ok:
            # The session logs the connect_refused event (one line per refusal).
            return AuthResult(False, bad_credentials=verdict.bad_credentials, busy=verdict.busy)
        return self._bind(username, client_id)

    def _bind(self, username: str | None, client_id: str) -> AuthResult:
        identity = parse_identity(username)
        self.teams.label(identity.team)
        policy = self.acl.for_client(identity, client_id)
        return AuthResult(True, username, policy, identity.team)

    def take_team_slot(self, team: str) -> bool:
        """Count one more connection for ``team``, unless limits.max_connections_per_team is reached."""
        count = self.team_connections.get(team, 0)
        if self.max_per_team is not None and count >= self.max_per_team:
            return False
        self.team_connections[team] = count + 1
        return True

    def release_team(self, team: str) -> None:
        count = self.team_connections.get(team, 0) - 1
        if count > 0:
            self.team_connections[team] = count
        else:
            self.team_connections.pop(team, None)
