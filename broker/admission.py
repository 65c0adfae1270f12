"""Admission: who may connect, as whom, under which mountpoint, and whether their team still has room.

For each CONNECT the session asks about (an :class:`~broker.session.api.Authenticate` action),
:class:`Admission` decides the identity through the backends in order:

1. the verified client certificate, on a ``use_identity_as_username`` listener;
2. the users file (``auth.users_file``): a user known to it is decided by it;
3. a JWT (``auth.jwt``) when the token field holds one;
4. the platform (``auth.http``): one request per CONNECT, never retried (one-time credentials);
5. otherwise the users file's verdict (unknown user, anonymous).

It then binds the access policy (the local ACL engine, or the platform with ``acl.source: http``,
with a JWT's ACL claim in front), the mountpoint (the platform's ``client_attrs``, a JWT claim, or
``acl.mountpoints`` for local identities), the client-id rule of the identity's form, and counts
the connection against ``limits.max_connections_per_team``. Every refusal is an
:class:`~broker.session.api.AuthResult`; the session turns it into the CONNACK. Fails closed on any
error in the auth path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from acl.claims import ClaimPolicy
from acl.client_ids import client_id_allowed, client_id_rule
from acl.engine import AclEngine
from acl.identity import Identity, parse_identity
from acl.placeholders import PLACEHOLDER_RE, placeholder_values
from broker.auth.backoff import LoginBackoff, source_of
from broker.auth.jwt import JwtVerdict, JwtVerifier
from broker.auth.platform import PlatformClient
from broker.auth.platform_acl import PlatformPolicy
from broker.auth.users import Authenticator, username_problem
from broker.cluster_store import ClusterCounts
from broker.config import AclConfig, HttpAuthConfig
from broker.edge.tls import TlsContexts, peer_identity
from broker.logs import log_event
from broker.ops.auth_metrics import AuthLatency
from broker.ops.metrics import TeamLabels
from broker.relay import ClientTransport
from broker.session import AccessPolicy, Authenticate, AuthResult, CheckAccess
from broker.session.api import ClientIdRule
from broker.session.mount import mountpoint_problem
from broker.shared_counts import Counts, LocalCounts

log = logging.getLogger("mqtt_front.server")

_TEAM = "team:"  # a team's key in the connection counts


def looks_like_jwt(token: str | bytes | None) -> bool:
    """Three base64url segments: worth a signature check (anything else goes to the other backends)."""
    if not token:
        return False
    text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
    parts = text.split(".")
    return len(parts) == 3 and all(parts[:2]) and all(c.isalnum() or c in "-_" for c in "".join(parts))


@dataclass(frozen=True, slots=True)
class Grant:
    """How an admitted session was let in: what a change of configuration re-checks (see :meth:`Admission.rebind`)."""

    source: str  # "certificate" | "users_file" | "jwt" | "platform" | "anonymous"
    username: str | None
    client_id: str
    mountpoint: str
    superuser: bool = False
    team: str | None = None  # the platform said so and auth.http.honor_superuser allows it
    # A JWT session: the CONNECT's (username, password), checked again when the keys change (never shown),
    # what verified it (JwtVerifier.fingerprint), and whether its mountpoint came from the token's claim.
    token: tuple[str | None, bytes | None] | None = field(default=None, repr=False, compare=False)
    jwt_fingerprint: bytes | None = None
    claim_mount: bool = False


@dataclass(frozen=True, slots=True)
class JwtRecheck:
    """What a JWT login leaves for a reload: which verifier accepted the token, and whether the session's
    mountpoint is the token's claim (else acl.mountpoints', checked like a local identity's)."""

    fingerprint: bytes
    claim_mount: bool


class Admission:
    def __init__(
        self,
        authenticator: Authenticator,
        acl: AclEngine,
        acl_config: AclConfig,
        tls: TlsContexts,
        teams: TeamLabels,
        max_per_team: int | None,
        platform: PlatformClient | None = None,
        http_config: HttpAuthConfig | None = None,
        jwt: JwtVerifier | None = None,
        latency: AuthLatency | None = None,
        counts: Counts | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.acl = acl
        self.acl_config = acl_config
        self.tls = tls
        self.teams = teams  # metrics: team labels go to teams in the order they first authenticate
        self.max_per_team = max_per_team
        self.platform = platform
        self.http_config = http_config
        self.jwt = jwt
        # Authenticated connections per team, for the team cap: this process's, or all workers' (shared).
        self.counts: Counts = counts if counts is not None else LocalCounts()
        self.store: ClusterCounts | None = None  # limits.store: the team cap over all replicas (the server sets it)
        self.backoff = LoginBackoff()  # failed logins per source address and username
        self.latency = latency if latency is not None else AuthLatency()  # per backend, for the metrics

    async def admit(
        self, request: Authenticate, listener: str, transport: ClientTransport | None, peer: str
    ) -> AuthResult:
        """Authenticate the CONNECT and take a team slot; an admitted result must be released later."""
        if self.tls.identity_as_username(listener):
            # The verified client certificate is the identity: CONNECT's username/password are ignored.
            result = self.authorize_identity(peer_identity(transport), request.client_id, peer)
        else:
            result = await self.authorize(request.username, request.password, request.client_id, peer)
        if result.ok and result.team is not None:
            if not self.take_team_slot(result.team):
                return AuthResult(False, quota_exceeded=True)
            try:
                refusal = await self._take_cluster_slot(result.team, peer, request)
            except BaseException:  # the client left while the store was asked: its local slot goes back
                self.counts.release(_TEAM + result.team)
                raise
            if refusal is not None:
                self.counts.release(_TEAM + result.team)
                return refusal
        return result

    async def _take_cluster_slot(self, team: str, peer: str, request: Authenticate) -> AuthResult | None:
        """limits.store: the team's cap over all replicas (None: admitted). Fails as limits.store.on_error says."""
        store, cap = self.store, self.max_per_team
        if store is None:
            return None
        if cap is None:
            # No cap now, but a reload may set one: the store counts the team's connections meanwhile, so
            # that the connections admitted before the cap count against it on every replica.
            store.add(team)
            return None
        taken = await store.take(team, cap)
        if taken:
            return None
        if taken is None and store.config.on_error == "open":
            store.add(team)  # counted here, reported to the store once it answers again
            return None
        why = "max_connections_per_team over all replicas" if taken is False else "limits.store unavailable"
        result = "limit" if taken is False else "auth_unavailable"
        fields = {"peer": peer, "user": request.username, "client": request.client_id, "team": team}
        log_event(log, logging.INFO, "connect_refused", result=result, reason=why, **fields)
        return AuthResult(False, quota_exceeded=True) if taken is False else AuthResult(False, unavailable=True)

    def authorize_identity(self, username: str | None, client_id: str, peer: str) -> AuthResult:
        """A verified client certificate's identity as the username (``use_identity_as_username``).

        There is no password: the TLS handshake proved the identity. No certificate (a
        ``require_client_cert: false`` listener) or an unusable name is refused as not authorized.
        """
        problem = "no client certificate" if username is None else username_problem(username)
        if problem is not None:
            self._refused(peer, username, client_id, f"certificate identity: {problem}")
            return AuthResult(False)
        return self._bind(username, client_id, peer)

    async def authorize(self, username: str | None, password: bytes | None, client_id: str, peer: str) -> AuthResult:
        source = source_of(peer)
        now = time.monotonic()
        if self.backoff.blocked(source, username, now):
            # Refused before bcrypt or the platform: a guesser or a flood pays nothing others need.
            log_event(
                log,
                logging.INFO,
                "connect_refused",
                peer=peer,
                user=username,
                client=client_id,
                result="limit",
                reason="too many failed logins: backing off",
            )
            return AuthResult(False, busy=True)
        try:
            result = await self._authorize(username, password, client_id, peer)
        except Exception:  # fail closed on any error in the auth path
            log.exception("authentication error for %s", peer)
            return AuthResult(False)
        if result.bad_credentials:
            self.backoff.failed(source, username, time.monotonic())
        elif result.ok:
            self.backoff.succeeded(source, username)
        return result

    async def _authorize(self, username: str | None, password: bytes | None, client_id: str, peer: str) -> AuthResult:
        known_locally = username is not None and username in self.authenticator.users
        jwt_token = self.jwt is not None and looks_like_jwt(password if self.jwt.token_from == "password" else username)
        if username is not None and not jwt_token and (problem := username_problem(username)) is not None:
            # Fail closed even if a backend would accept such a name: its client ids could lie in another
            # identity's namespace. To the client it is an unknown user.
            log.warning("unusable username from %s (%s): refused as bad credentials", peer, problem)
            return AuthResult(False, bad_credentials=True)
        started = time.perf_counter()
        if not known_locally and self.jwt is not None and jwt_token:
            jwt_verdict = self.jwt.verify(username, password)
            self.latency.observe("jwt", time.perf_counter() - started)
            return self._bind_jwt(jwt_verdict, client_id, peer)
        if not known_locally and self.platform is not None and username is not None:
            rule = client_id_rule(parse_identity(username), self.acl_config.client_id_suffix)
            if client_id and not client_id_allowed(rule, username, client_id):
                # Refused before the platform is asked: a one-time credential (FlowFuse deletes it once checked)
                # is not used up by a CONNECT the client-id rule refuses anyway.
                return AuthResult(False, client_id_rejected=True, client_id_rule=ClientIdRule(rule))
            verdict = await self.platform.authenticate(username, password, client_id)
            self.latency.observe("http", time.perf_counter() - started)
            if not verdict.ok:
                # The session logs the connect_refused event; a platform that did not answer is "unavailable".
                return AuthResult(False, bad_credentials=verdict.reason == "deny", unavailable=verdict.reason != "deny")
            mount = verdict.client_attrs.get(self.http_config.team_attr, "") if self.http_config else ""
            superuser = verdict.superuser and self.http_config is not None and self.http_config.honor_superuser
            return self._bind(username, client_id, peer, mount=mount, superuser=superuser)
        verdict_local = await self.authenticator.check(username, password, source_of(peer))
        self.latency.observe("users_file" if username is not None else "anonymous", time.perf_counter() - started)
        if not verdict_local.ok:
            return AuthResult(False, bad_credentials=verdict_local.bad_credentials, busy=verdict_local.busy)
        return self._bind(username, client_id, peer)

    def _bind_jwt(self, verdict: JwtVerdict, client_id: str, peer: str) -> AuthResult:
        if not verdict.ok or verdict.identity is None:
            self._refused(peer, verdict.identity, client_id, f"jwt: {verdict.reason}")
            return AuthResult(False, bad_credentials=True)
        problem = username_problem(verdict.identity)
        if problem is not None:
            self._refused(peer, verdict.identity, client_id, f"jwt identity: {problem}")
            return AuthResult(False, bad_credentials=True)
        return self._bind(verdict.identity, client_id, peer, mount=verdict.mountpoint or None, jwt=verdict)

    def _bind(
        self,
        username: str | None,
        client_id: str,
        peer: str,
        *,
        mount: str | None = None,
        superuser: bool = False,
        jwt: JwtVerdict | None = None,
    ) -> AuthResult:
        identity = parse_identity(username)
        if mount is None:
            mount = self._local_mountpoint(identity, client_id)
            if mount is None:
                self._refused(peer, username, client_id, "acl.mountpoints: the identity has no value for the template")
                return AuthResult(False)
        if mount and (problem := mountpoint_problem(mount)) is not None:
            self._refused(peer, username, client_id, problem)
            return AuthResult(False, unavailable=True)
        policy: AccessPolicy
        if self.acl_config.source == "http" and self.platform is not None:
            policy = PlatformPolicy(self.platform, username, client_id, superuser)
        else:
            policy = self.acl.for_client(identity, client_id)
        if jwt is not None:
            policy = jwt.access_policy(policy, client_id)  # the token's ACL claim comes first
        self.teams.label(identity.team)
        rule = client_id_rule(identity, self.acl_config.client_id_suffix)
        return AuthResult(
            True,
            username,
            policy,
            identity.team,
            client_id_rule=ClientIdRule(rule),
            mountpoint=mount,
            expires_at=jwt.expires_at if jwt is not None else None,
            recheck=JwtRecheck(jwt.fingerprint, bool(jwt.mountpoint)) if jwt is not None else None,
        )

    def _local_mountpoint(self, identity: Identity, client_id: str) -> str | None:
        """``acl.mountpoints`` for the identity's kind, placeholders filled in ("" = none, None = unusable)."""
        template = self.acl_config.mountpoints.get(identity.kind.value)  # type: ignore[call-overload]
        if not template:
            return ""
        values = placeholder_values(identity, client_id)
        missing = False

        def fill(match: Any) -> str:
            nonlocal missing
            value = values.get(match.group(1))
            if value is None:
                missing = True
                return ""
            return value

        mount = PLACEHOLDER_RE.sub(fill, template)
        return None if missing else mount

    def grant(
        self,
        result: AuthResult,
        client_id: str,
        listener: str,
        credentials: tuple[str | None, bytes | None] | None = None,
    ) -> Grant:
        """The record of an admitted CONNECT (``result.ok``), kept by the server for :meth:`rebind`;
        ``credentials`` are the CONNECT's (username, password), kept only for a JWT session."""
        username = result.username
        policy = result.policy
        base = policy.fallback if isinstance(policy, ClaimPolicy) else policy
        if self.tls.identity_as_username(listener):
            source = "certificate"
        elif result.expires_at is not None or isinstance(policy, ClaimPolicy):
            source = "jwt"  # before the users file: a token's identity may also be a name in it
        elif username is not None and username in self.authenticator.users:
            source = "users_file"
        elif username is not None and self.platform is not None:
            source = "platform"
        else:
            source = "anonymous"
        superuser = isinstance(base, PlatformPolicy) and base.superuser
        if source != "jwt":
            return Grant(source, username, client_id, result.mountpoint, superuser, result.team)
        recheck = result.recheck if isinstance(result.recheck, JwtRecheck) else None
        return Grant(
            source,
            username,
            client_id,
            result.mountpoint,
            superuser,
            result.team,
            token=credentials,
            jwt_fingerprint=recheck.fingerprint if recheck is not None else None,
            claim_mount=recheck.claim_mount if recheck is not None else False,
        )

    def refreshed(self, grant: Grant) -> Grant:
        """``grant`` once :meth:`rebind` kept it: a JWT session's token now counts as checked by the verifier
        in force (so later reloads do not check it again)."""
        if grant.source != "jwt" or self.jwt is None or grant.jwt_fingerprint == self.jwt.fingerprint:
            return grant
        return replace(grant, jwt_fingerprint=self.jwt.fingerprint)

    def rebind(self, grant: Grant, current: AccessPolicy | None) -> AccessPolicy | str:
        """The access policy a connected session gets under the configuration now in force, or why it must go.

        A users-file identity that was removed, and an anonymous session once
        anonymous access is off, must go; so must a local identity whose ``acl.mountpoints`` changed (its
        topics would move under it). The platform's identities stay (a one-time credential cannot be
        checked again); a JWT's stay while the auth.jwt in force still accepts their token (checked again
        only when its keys or checks changed). The rules of those that stay are rebuilt.
        """
        username, client_id = grant.username, grant.client_id
        if grant.source == "users_file":
            if username is None or username not in self.authenticator.users:
                return "user removed"
        elif grant.source == "anonymous" and not self.authenticator.allow_anonymous:
            return "anonymous access turned off"
        identity = parse_identity(username)
        if grant.source == "jwt" and (why := self._token_problem(grant)) is not None:
            return why
        local = grant.source in ("users_file", "anonymous", "certificate") or (
            grant.source == "jwt" and not grant.claim_mount
        )
        if local and self._local_mountpoint(identity, client_id) != grant.mountpoint:
            return "mountpoint changed"
        policy: AccessPolicy
        if self.acl_config.source == "http" and self.platform is not None:
            policy = PlatformPolicy(self.platform, username, client_id, grant.superuser)
        else:
            policy = self.acl.for_client(identity, client_id)
        if isinstance(current, ClaimPolicy):
            current.fallback = policy  # the token's rules stay in front (they cache only their own matches)
            return current
        return policy

    def _token_problem(self, grant: Grant) -> str | None:
        """Why a JWT session may not stay under the auth.jwt now in force, or None: its token is checked
        again when what verifies tokens changed (a key dropped, the issuer, the audience)."""
        if self.jwt is None:
            return "auth.jwt removed"
        if grant.token is None or grant.jwt_fingerprint == self.jwt.fingerprint:
            return None
        verdict = self.jwt.verify(*grant.token)
        if not verdict.ok:
            return f"token no longer accepted: {verdict.reason}"
        if verdict.identity != grant.username:
            return "token identity changed"
        if grant.claim_mount and verdict.mountpoint != grant.mountpoint:
            return "mountpoint changed"
        return None

    def decide_soon(self, policy: AccessPolicy | None, check: CheckAccess, done: Callable[[bool | None], None]) -> None:
        """A CheckAccess of a session: ``done`` gets the policy's own asynchronous decision (None: its backend
        did not answer), or a deny. Always called later from the event loop, never inside this call (the
        caller is in the middle of its pump)."""
        loop = asyncio.get_running_loop()
        decide_soon = getattr(policy, "decide_soon", None)
        if decide_soon is None:
            loop.call_soon(done, False)
            return
        inside = True

        def decided(allowed: bool | None) -> None:
            allowed = None if allowed is None else bool(allowed)
            if inside:
                loop.call_soon(done, allowed)
            else:
                done(allowed)

        decide_soon(check.action, check.topic, check.retain, decided)
        inside = False

    def _refused(self, peer: str, user: str | None, client: str, reason: str) -> None:
        log_event(
            log,
            logging.INFO,
            "connect_refused",
            peer=peer,
            user=user,
            client=client,
            result="not_authorized",
            reason=reason,
        )

    def take_team_slot(self, team: str) -> bool:
        """Count one more connection for ``team``, unless limits.max_connections_per_team is reached
        (counted over all workers of the process when the counts are shared)."""
        return self.counts.take(_TEAM + team, self.max_per_team)

    def release_team(self, team: str) -> None:
        self.counts.release(_TEAM + team)
        if self.store is not None:
            self.store.release(team)  # never waits for Redis

    def team_connections(self, team: str) -> int:
        return self.counts.total(_TEAM + team)
