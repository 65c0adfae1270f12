"""The front broker process: wiring only.

:class:`FrontBroker` builds the parts from the configuration (admission with the users file and
the ACL engine, listener TLS, the upstream connector or the embedded broker, metrics, the ops
endpoint), starts the listeners, and is the :class:`broker.relay.ConnectionHost` of every client
connection: it passes each question on to the part that decides it. Protocol decisions live in
``broker.session``, admission decisions in ``broker.admission``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable

from acl.engine import AclEngine
from acl.rules import Rule
from broker.admission import Admission, Grant
from broker.auth.jwt import JwtVerifier
from broker.auth.platform import PlatformClient
from broker.auth.users import Authenticator, load_users
from broker.cluster_store import ClusterCounts
from broker.config import AclConfig, Config, ConfigError, parse_hostport
from broker.control import Control
from broker.edge.listeners import bind_failure, bind_reason, start_listener
from broker.edge.tls import TlsContexts
from broker.limits import Limits, apply_budgets
from broker.logs import log_event
from broker.ops.admin import AdminServer
from broker.ops.admin_access import admin_token
from broker.ops.http import OpsServer, Readiness
from broker.ops.metrics import Metrics
from broker.relay import ClientConnection
from broker.session import Authenticate, AuthResult, CheckAccess, SessionSettings
from broker.session.inventory import Inventory
from broker.session.ratelimit import PublishLimiter
from broker.shared_counts import CONNECTIONS, Counts, LocalCounts, WorkerCounts
from broker.upstream.connector import UpstreamConnector
from broker.upstream.embedded import EmbeddedBroker, embedded_broker, embedded_problem, start_embedded, wants_embedded

log = logging.getLogger("mqtt_front.server")
KEEP_ALIVE_SWEEP = 0.5  # seconds between two keep-alive sweeps: a silent client goes within 1.5 x + 0.5 s
RECHECK_MIN = 10.0  # seconds between two re-checks of the subscriptions with the platform, at least
# The drain (SIGTERM): every DRAIN_TICK each session is asked whether it is done; a client's new publishes are
# taken for at most DRAIN_READ of limits.shutdown_timeout (at most DRAIN_READ_MAX s), every session is ended at
# DRAIN_FORCE of it, acknowledged or not, and what still lingers is dropped at the timeout itself.
DRAIN_TICK = 0.05
DRAIN_READ, DRAIN_READ_MAX = 0.1, 0.5  # long enough for what was on its way at the signal
DRAIN_FORCE = 0.8


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
    def __init__(
        self,
        config: Config,
        reuse_port: bool = False,
        ops_socket: str | None = None,
        config_path: str | None = None,
        admin_socket: str | None = None,
        workers: int = 1,
        counts: WorkerCounts | None = None,
    ) -> None:
        self.config = config
        # The caps' counts: this process's, or (--workers N) the ones all workers share.
        self.counts: Counts = counts if counts is not None else LocalCounts()
        self.workers = workers  # of the process: a reload gives this worker its share of the shared bounds
        self.config_path = config_path  # what a reload reads again (None: only the files the config names)
        # A worker of --workers N serves its admin API on this unix socket; the parent serves admin.bind.
        self.admin_socket = admin_socket
        self.admin: AdminServer | None = None
        # Read now: an unreadable admin.token_file is a ConfigError before anything listens.
        self._admin_token = admin_token(config.admin) if config.admin is not None else None
        self.reuse_port = reuse_port  # several worker processes share the listening sockets
        # A worker serves its metrics/health on this unix socket; the parent serves metrics.bind.
        self.ops_socket = ops_socket
        users = load_users(config.auth.users_file) if config.auth.users_file else {}
        self.authenticator = Authenticator(
            users,
            config.auth.allow_anonymous,
            config.auth.cache_ttl,
            max_pending=config.auth.max_pending,
            counts=self.counts,
        )
        self.acl = build_acl(config.acl)
        # Loads every listener's certificate and key: a ConfigError here comes before anything listens.
        self.tls = TlsContexts(config.listeners)
        up = config.upstream
        inv = config.inventory
        self.inventory = (
            Inventory(
                inv.max_topics_per_team,
                inv.ttl,
                inv.max_teams,
                inv.samples,
                monotonic=time.monotonic(),
                wall=time.time(),
            )
            if inv is not None
            else None
        )
        self._inventory_timer: asyncio.TimerHandle | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        self.session_settings = SessionSettings(
            max_packet_size=config.limits.max_packet_size,
            upstream_v5=up is not None,
            upstream_username=up.username if up else None,
            upstream_password=up.password if up else None,
            disconnect_on_deny=config.acl.deny_action == "disconnect",
            inventory=self.inventory,
        )
        apply_budgets(self.session_settings, config.limits)
        self.limits = Limits(config.limits, counts)  # publish and connect rates
        self.connections: set[ClientConnection] = set()
        self.grants: dict[ClientConnection, Grant] = {}  # how each admitted session got in, for reloads
        # No upstream: the embedded broker (demo only), Mosquitto or amqtt, chosen now and started by start().
        # The front broker logs in to it with the per-start credential that only it knows.
        self.embedded: EmbeddedBroker | None = None
        if wants_embedded(config):
            problem = embedded_problem(config)  # a non-loopback listener without upstream: {embedded: true}
            if problem is not None:
                raise ConfigError(problem)
            self.embedded = embedded_broker()
            self.session_settings.upstream_v5 = self.embedded.v5
            self.session_settings.upstream_username = self.embedded.credential.username
            self.session_settings.upstream_password = self.embedded.credential.password
        self.upstream: UpstreamConnector
        self.bound: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        ops = config.metrics
        self.metrics = Metrics(ops.max_teams if ops else 1000, [item.name for item in config.listeners])
        self.metrics.watch_edge(self.tls, config)  # refused handshakes, certificate expiry
        http = config.auth.http
        # The platform client (auth.http) and the JWT keys load here: a ConfigError comes before anything listens.
        self.platform = PlatformClient(http) if http is not None else None
        self.jwt = JwtVerifier(config.auth.jwt) if config.auth.jwt is not None else None
        self.admission = Admission(
            self.authenticator,
            self.acl,
            config.acl,
            self.tls,
            self.metrics.teams,
            config.limits.max_connections_per_team,
            platform=self.platform,
            http_config=http,
            jwt=self.jwt,
            latency=self.metrics.auth_latency,
            counts=self.counts,
        )
        store = config.limits.store
        if store is not None:  # one registration per process (each worker its own), host:pid
            self.admission.store = ClusterCounts(store, f"{socket.gethostname()}:{os.getpid()}")
        self.control = Control(self, build_acl)  # reload, revoke, kick, list: what operators do while it runs
        self.readiness = Readiness(self, ops.ready_window, ops.probe_interval) if ops else Readiness(self)
        self.ops: OpsServer | None = None  # the /metrics, /healthz, /readyz endpoint when metrics.bind is set
        self.draining = False  # SIGTERM (drain): no new connections, /readyz 503
        self._hurry = asyncio.Event()  # a second SIGTERM: end the drain now
        self._stopped = False

    async def start(self) -> None:
        up = self.config.upstream
        if self.embedded is not None:
            self.upstream = await start_embedded(self.embedded, up.connect_timeout if up is not None else 5.0)
        else:
            assert up is not None
            # Loads upstream.tls files: a ConfigError here comes before anything listens.
            self.upstream = UpstreamConnector.from_config(up)
        self.metrics.watch(self.connections, self.upstream)
        if self.platform is not None:
            await self.platform.start()
            self.metrics.watch_platform(self.platform)
        if self.admission.store is not None:
            await self.admission.store.start()  # never raises: an unreachable store is retried by its heartbeat
            self.metrics.watch_store(self.admission.store)
        try:
            for listener in self.config.listeners:
                server = await start_listener(self, listener, self.tls, reuse_port=self.reuse_port)
                self._servers.append(server)
                host, port = server.sockets[0].getsockname()[:2]
                self.bound[listener.name] = (host, port)
                log_event(
                    log, logging.INFO, "listening", listener=listener.name, type=listener.type, host=host, port=port
                )
        except OSError as exc:
            await self.stop()
            raise ConfigError(bind_failure(self.config.listeners, listener, exc)) from None
        log_event(log, logging.INFO, "forwarding", upstream=self.upstream.label)
        self.tls.start()  # reload certificates when their files change
        await self._start_ops()
        await self._start_admin()
        if self.inventory is not None:
            self._tick_inventory()
        self._recheck = asyncio.get_running_loop().create_task(self._recheck_platform())
        self._sweep_keep_alive()

    def _sweep_keep_alive(self) -> None:
        """Every KEEP_ALIVE_SWEEP seconds: clients silent for 1.5 x their keep-alive are ended (0x8D). A
        sweep over the connections rather than a timer per connection reset on every read."""
        now = time.monotonic()
        for conn in list(self.connections):
            conn.sweep_keep_alive(now)
        self._keep_alive_timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_SWEEP, self._sweep_keep_alive)

    async def _recheck_platform(self) -> None:
        """With ``acl.source: http``, ask the platform again about the subscriptions held, every
        ``cache_ttl`` (at least RECHECK_MIN seconds): a changed answer revokes in place."""
        while True:
            http = self.config.auth.http
            await asyncio.sleep(max(RECHECK_MIN, http.cache_ttl if http is not None else RECHECK_MIN))
            if self.config.acl.source == "http" and self.platform is not None:
                try:
                    await self.control.recheck_platform()
                except Exception:  # never let the loop die: the next round tries again
                    log.exception("re-checking subscriptions with the platform failed")

    def _tick_inventory(self) -> None:
        """Once a second: the inventory's clock (no clock is read per message) and its bounds."""
        assert self.inventory is not None
        self.inventory.tick(time.monotonic(), time.time())
        self._inventory_timer = asyncio.get_running_loop().call_later(1.0, self._tick_inventory)

    async def _start_admin(self) -> None:
        admin = self.config.admin
        if admin is None or self._admin_token is None:
            return
        self.admin = AdminServer(self.control, self._admin_token, self.config.limits.shutdown_timeout)
        if self.admin_socket is not None:
            await self.admin.start_unix(self.admin_socket)
            return
        host, port = parse_hostport(admin.bind)
        try:
            await self.admin.start(host, port)
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on admin.bind {admin.bind}: {bind_reason(exc)}") from None

    async def _start_ops(self) -> None:
        ops = self.config.metrics
        address = ops.host_port if ops is not None else None
        if ops is None or address is None:
            return
        self.ops = OpsServer(self.metrics.registry, self.readiness)
        if self.ops_socket is not None:
            await self.ops.start_unix(self.ops_socket)
            return
        try:
            host, port = await self.ops.start(address[0], address[1], self.reuse_port)
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on metrics.bind {ops.bind}: {bind_reason(exc)}") from None
        log_event(log, logging.INFO, "ops_listening", url=f"http://{host}:{port}", paths="/metrics /healthz /readyz")

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
        jwt_ok = True
        if self.jwt is not None:
            try:
                self.jwt.reload()
            except ConfigError as exc:
                jwt_ok = False
                log_event(log, logging.ERROR, "config_reload_failed", file="auth.jwt", reason=str(exc))
            else:
                log_event(log, logging.INFO, "config_reloaded", file="auth.jwt")
        return self.tls.reload() and users_ok and jwt_ok

    async def drain(self, timeout: float | None = None) -> None:
        """SIGTERM, ``ctl drain``: stop accepting, /readyz 503, let every session finish what its client sent
        (see :mod:`broker.session.drain`), all within ``timeout`` (``limits.shutdown_timeout``); then stop."""
        if self.draining:
            return
        self.draining = True
        timeout = self.config.limits.shutdown_timeout if timeout is None else timeout
        for server in self._servers:
            server.close()  # new connections are refused from now on
        started = time.monotonic()
        log_event(log, logging.INFO, "draining", connections=len(self.connections), timeout=timeout)
        read_window = min(DRAIN_READ_MAX, DRAIN_READ * timeout)
        for conn in list(self.connections):
            conn.drain("start")
        while self.connections and not self._hurry.is_set() and time.monotonic() - started < DRAIN_FORCE * timeout:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), DRAIN_TICK)
            reading_over = time.monotonic() - started >= read_window
            for conn in list(self.connections):  # none joins: connection_opened refuses while draining
                conn.drain("tick", reading_over)
        unfinished = [conn for conn in self.connections if conn.session is not None and not conn.session.closed]
        for conn in unfinished:
            conn.drain("expire")
        while self.connections and not self._hurry.is_set() and time.monotonic() - started < timeout:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), DRAIN_TICK)
        aborted = len(self.connections)
        for conn in list(self.connections):
            conn.abort()
        took = round(time.monotonic() - started, 3)
        log_event(log, logging.INFO, "drained", seconds=took, forced=len(unfinished), aborted=aborted)
        await self.stop()

    def hurry_drain(self) -> None:
        """A second SIGTERM/SIGINT during the drain: end every session now."""
        self._hurry.set()

    async def stop(self) -> None:
        if self._stopped:  # after a drain, or twice
            return
        self._stopped = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        if self._inventory_timer is not None:
            self._inventory_timer.cancel()
            self._inventory_timer = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
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
        if self.platform is not None:
            await self.platform.close()
        if self.admission.store is not None:
            await self.admission.store.close()  # this process's slots are free at once
        self.authenticator.close()

    # ------------------------------------------------------------------ ConnectionHost

    @property
    def connect_timeout(self) -> float:
        return self.config.limits.connect_timeout

    @property
    def upstream_connect_timeout(self) -> float:
        return self.upstream.connect_timeout

    def connection_opened(self, conn: ClientConnection) -> str | None:
        self.connections.add(conn)
        total = self.counts.add(CONNECTIONS, 1)  # of all workers when shared
        self.metrics.connection_opened(conn.listener)
        if self.draining:  # accepted just before the listeners closed
            return "server shutting down"
        limit = self.config.limits.max_connections
        if limit is not None and total > limit:
            refusal: str | None = f"max_connections ({limit}) reached"
            hit = "max_connections"
        else:
            refusal = self.limits.connection_refused(conn.peer)
            hit = "connect_rate"
        if refusal is not None and conn.session is not None:
            conn.session.stats.limit_hit(hit)
        return refusal

    def publish_limiter(self, team: str | None) -> PublishLimiter | None:
        return self.limits.publish_limiter(team)

    async def admit(self, request: Authenticate, conn: ClientConnection) -> AuthResult:
        since = self.control.generation
        result = await self.admission.admit(request, conn.listener, conn.transport, conn.peer)
        if result.ok and result.policy is not None and conn in self.connections:
            grant = self.admission.grant(result, request.client_id, conn.listener, (request.username, request.password))
            verdict = self.control.admitted(grant, since, result.policy)  # a reload or revoke ran while it was checked
            if isinstance(verdict, str):
                if result.team is not None:
                    self.admission.release_team(result.team)
                log_event(
                    log,
                    logging.INFO,
                    "connect_refused",
                    peer=conn.peer,
                    user=result.username,
                    client=request.client_id,
                    result="not_authorized",
                    reason=verdict,
                )
                return AuthResult(False)
            if verdict is not result.policy:
                result = dataclasses.replace(result, policy=verdict)
            self.grants[conn] = self.admission.refreshed(grant)
        return result

    def release_team(self, team: str) -> None:
        self.admission.release_team(team)

    def decide_access(self, conn: ClientConnection, check: CheckAccess, done: Callable[[bool | None], None]) -> None:
        self.admission.decide_soon(conn.session.policy if conn.session else None, check, done)

    async def open_upstream(self, conn: ClientConnection) -> asyncio.Transport:
        return await self.upstream.connect(conn)

    def upstream_failed(self, exc: BaseException) -> None:
        self.upstream.failed(exc)

    def upstream_dropped(self) -> None:
        self.readiness.upstream_dropped()  # /readyz probes again: is the upstream still there?

    def connection_closed(self, conn: ClientConnection, reason: str, duration: float) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.counts.add(CONNECTIONS, -1)
        self.grants.pop(conn, None)
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
