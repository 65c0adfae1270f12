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
from broker.listeners import start_listener
from broker.session import AuthResult, SessionSettings
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
    def __init__(self, config: Config) -> None:
        self.config = config
        users = load_users(config.auth.users_file) if config.auth.users_file else {}
        self.authenticator = Authenticator(users, config.auth.allow_anonymous, config.auth.cache_ttl)
        self.acl = build_acl(config.acl)
        up = config.upstream
        self.session_settings = SessionSettings(
            max_packet_size=config.limits.max_packet_size,
            upstream_v5=up is not None,
            upstream_username=up.username if up else None,
            upstream_password=up.password if up else None,
            disconnect_on_deny=config.acl.deny_action == "disconnect",
        )
        self.connections: set[ClientConnection] = set()
        self.embedded: EmbeddedBroker | None = None
        self.upstream: UpstreamConnector
        self.bound: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        up = self.config.upstream
        if up is None:
            self.embedded = EmbeddedBroker()
            await self.embedded.start()
            self.upstream = UpstreamConnector(self.embedded.host, self.embedded.port, 5.0, "embedded amqtt")
        else:
            host, port = up.host_port
            self.upstream = UpstreamConnector(host, port, up.connect_timeout, up.url)
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

    async def stop(self) -> None:
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

    async def authorize(self, username: str | None, password: bytes | None, client_id: str, peer: str) -> AuthResult:
        if username is not None and (problem := username_problem(username)) is not None:
            # Fail closed even if a future auth backend accepts such a name: to the client
            # it is simply an unknown user.
            log.warning("connect_refused peer=%s user=%r reason=unusable_username (%s)", peer, username, problem)
            return AuthResult(False, bad_credentials=True)
        try:
            verdict = await self.authenticator.check(username, password)
        except Exception:  # fail closed on any error in the auth path
            log.exception("authentication error for %s", peer)
            return AuthResult(False)
        if not verdict.ok:
            log.info(
                "connect_refused peer=%s user=%r client=%r reason=%s",
                peer,
                username,
                client_id,
                "bad_credentials" if verdict.bad_credentials else "not_authorized",
            )
            return AuthResult(False, bad_credentials=verdict.bad_credentials)
        identity = parse_identity(username)
        policy = self.acl.for_client(identity, client_id)
        return AuthResult(True, username, policy, identity.team)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn: ClientConnection, reason: str, duration: float) -> None:
        self.connections.discard(conn)
        session = conn.session
        log.info(
            "disconnect peer=%s client=%r reason=%s duration=%.1fs",
            conn.peer,
            session.client_id if session else None,
            reason,
            duration,
        )
