"""The front broker: listeners, the upstream, authentication and the ACL engine wired together."""

from __future__ import annotations

import asyncio
import logging

from acl.engine import AclEngine
from acl.identity import parse_identity
from acl.rules import Rule
from broker.auth import Authenticator, load_users, username_problem
from broker.config import AclConfig, Config, ConfigError
from broker.connection import ClientConnection
from broker.embedded import EmbeddedBroker
from broker.http import OpsServer, Readiness
from broker.listeners import start_listener
from broker.logs import log_event
from broker.metrics import Metrics
from broker.session import AuthResult, SessionSettings
from broker.tls import TlsContexts
from broker.upstream import UpstreamConnector

log = logging.getLogger("mqtt_front.server")


def build_acl(config: AclConfig) -> AclEngine:
    rules = []
    for i, spec in enumerate(config.rules):
        try:
            rules.append(Rule(spec.who, spec.effect, spec.action, spec.pattern, spec.retain))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"acl.rules.{i}: {exc}") from None
    try:
        return AclEngine(rules, config.preset, config.share_groups)
    except ValueError as exc:
        raise ConfigError(f"acl: {exc}") from None


class FrontBroker:
    def __init__(self, config: Config, reuse_port: bool = False, ops_socket: str | None = None) -> None:
        self.config = config
        self.reuse_port = reuse_port  # several worker processes share the listening sockets
        # A worker serves its metrics/health on this unix socket; the parent serves metrics.bind.
        self.ops_socket = ops_socket
        users = load_users(config.auth.users_file) if config.auth.users_file else {}
        self.authenticator = Authenticator(
            users, config.auth.allow_anonymous, config.auth.cache_ttl, max_pending=config.auth.max_pending
        )
        self.acl = build_acl(config.acl)
        # Loads every listener's certificate and key: a ConfigError here comes before anything listens.
        self.tls = TlsContexts(config.listeners)
        up = config.upstream
        self.session_settings = SessionSettings(
            max_packet_size=config.limits.max_packet_size,
            upstream_v5=up is not None,
            upstream_username=up.username if up else None,
            upstream_password=up.password if up else None,
            disconnect_on_deny=config.acl.deny_action == "disconnect",
        )
        self.connections: set[ClientConnection] = set()
        self.team_connections: dict[str, int] = {}  # authenticated connections per team, for the team cap
        self.embedded: EmbeddedBroker | None = None
        self.upstream: UpstreamConnector
        self.bound: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        ops = config.metrics
        self.metrics = Metrics(ops.max_teams if ops else 1000, [item.name for item in config.listeners])
        self.readiness = Readiness(self, ops.ready_window, ops.probe_interval) if ops else Readiness(self)
        self.ops: OpsServer | None = None  # the /metrics, /healthz, /readyz endpoint when metrics.bind is set

    async def start(self) -> None:
        up = self.config.upstream
        if up is None:
            self.embedded = EmbeddedBroker()
            await self.embedded.start()
            self.upstream = UpstreamConnector.single(self.embedded.host, self.embedded.port, 5.0, "embedded amqtt")
        else:
            # Loads upstream.tls files: a ConfigError here comes before anything listens.
            self.upstream = UpstreamConnector.from_config(up)
        self.metrics.watch(self.connections, self.upstream)
        try:
            for listener in self.config.listeners:
                name = listener.name
                server = await start_listener(self, listener)
                self._servers.append(server)
                sock = server.sockets[0].getsockname()
                self.bound[name] = (sock[0], sock[1])
                log.info("listening: %s (%s) on %s:%d", name, listener.type, sock[0], sock[1])
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen: {exc.strerror or exc}") from None
        log.info("forwarding to %s", self.upstream.label)
        self.tls.start()  # reload certificates when their files change
        await self._start_ops()

    async def _start_ops(self) -> None:
        ops = self.config.metrics
        address = ops.host_port if ops is not None else None
        if address is None:
            return
        self.ops = OpsServer(self, self.readiness)
        if self.ops_socket is not None:
            await self.ops.start_unix(self.ops_socket)
            return
        try:
            host, port = await self.ops.start(address[0], address[1], self.reuse_port)
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on metrics.bind: {exc.strerror or exc}") from None
        log.info("metrics, health and readiness on http://%s:%d (/metrics, /healthz, /readyz)", host, port)

    @property
    def listening(self) -> bool:
        """Every configured listener is bound and serving."""
        return len(self.bound) == len(self.config.listeners) and all(s.is_serving() for s in self._servers)

    def reload(self) -> bool:
        """SIGHUP: reload the users file and the listeners' TLS certificates; connections stay.

        A broken users file is refused with a log line and the users in use stay, as with
        certificates. Cached password checks are dropped so removed users and changed
        passwords take effect for the next CONNECT.
        """
        users_ok = True
        path = self.config.auth.users_file
        if path is not None:
            try:
                users = load_users(path)
            except ConfigError as exc:
                users_ok = False
                log_event(log, logging.ERROR, "config_reload_failed", file=str(path), reason=str(exc))
            else:
                self.authenticator.replace_users(users)
                log_event(log, logging.INFO, "config_reloaded", file=str(path), users=len(users))
        return self.tls.reload() and users_ok

    async def stop(self) -> None:
        await self.tls.stop()
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.server_shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.embedded is not None:
            await self.embedded.stop()
        self.authenticator.close()

    async def authorize_identity(self, username: str | None, client_id: str, peer: str) -> AuthResult:
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
        identity = parse_identity(username)
        self.metrics.teams.label(identity.team)
        policy = self.acl.for_client(identity, client_id)
        return AuthResult(True, username, policy, identity.team)

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
        identity = parse_identity(username)
        self.metrics.teams.label(identity.team)  # team labels go to teams in the order they first authenticate
        policy = self.acl.for_client(identity, client_id)
        return AuthResult(True, username, policy, identity.team)

    def admit_team(self, team: str) -> bool:
        """Count one more connection for ``team``, unless limits.max_connections_per_team is reached."""
        cap = self.config.limits.max_connections_per_team
        count = self.team_connections.get(team, 0)
        if cap is not None and count >= cap:
            return False
        self.team_connections[team] = count + 1
        return True

    def release_team(self, team: str) -> None:
        count = self.team_connections.get(team, 0) - 1
        if count > 0:
            self.team_connections[team] = count
        else:
            self.team_connections.pop(team, None)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.metrics.connection_opened(conn.listener)

    def connection_closed(self, conn: ClientConnection, reason: str, duration: float) -> None:
        self.connections.discard(conn)
        session = conn.session
        if session is not None:
            self.metrics.connection_closed(conn.listener, session.team, session.stats)
        log_event(
            log,
            logging.INFO,
            "disconnect",
            peer=conn.peer,
            user=session.username if session else None,
            client=session.client_id if session else None,
            team=session.team if session else None,
            listener=conn.listener,
            reason=reason,
            duration=round(duration, 3),
        )
