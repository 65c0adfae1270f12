"""What operators do to a running front broker: reload its configuration, re-evaluate the connected
sessions against the policy in force, kick a client, revoke an identity or a team, list the clients.

:class:`Control` works on the process's parts through :class:`ControlledFront` (the server is one); it
is also what the admin API serves (it has every method of :class:`broker.ops.admin.AdminBackend`).
Sessions are changed in place through their connections (``replace_policy``, ``disconnect``): nobody
reconnects unless their identity may no longer connect.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from acl.claims import ClaimPolicy
from acl.engine import AclEngine
from broker.admission import Admission, Grant
from broker.auth.jwt import JwtVerifier
from broker.auth.platform import PlatformClient, client_fingerprint
from broker.auth.platform_acl import PlatformPolicy
from broker.auth.users import Authenticator
from broker.config import AclConfig, Config, ConfigError
from broker.edge.tls import TlsContexts
from broker.limits import Limits, apply_budgets
from broker.logs import log_event
from broker.mqtt.reasons import DisconnectReason
from broker.ops.metrics import Metrics
from broker.relay import ClientConnection
from broker.reload import Prepared, apply_logging, prepare
from broker.session import AccessPolicy, Session, SessionSettings
from broker.session.inventory import Inventory
from broker.upstream.connector import UpstreamConnector

log = logging.getLogger("mqtt_front.control")


class ControlledFront(Protocol):
    """The parts of a running process a reload swaps or a revocation reads (the server's)."""

    config: Config
    config_path: str | None
    workers: int
    grants: dict[ClientConnection, Grant]
    authenticator: Authenticator
    admission: Admission
    tls: TlsContexts
    platform: PlatformClient | None
    acl: AclEngine
    jwt: JwtVerifier | None
    upstream: UpstreamConnector
    metrics: Metrics
    session_settings: SessionSettings
    limits: Limits
    inventory: Inventory | None

    def reload(self) -> bool:
        """Read again only the files the running configuration names (no config file to reload)."""
        ...


class Control:
    def __init__(self, front: ControlledFront, build_acl: Callable[[AclConfig], AclEngine]) -> None:
        self.front = front
        self._build_acl = build_acl
        self._reloading = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # replaced platform clients finishing their requests
        # Counts reloads and revocations: a login admitted across one is checked again (see admitted()).
        self._generation = 0
        self._revocations: deque[tuple[int, str | None, str | None]] = deque(maxlen=1024)  # (generation, user, team)

    @property
    def generation(self) -> int:
        return self._generation

    def admitted(self, grant: Grant, since: int, policy: AccessPolicy) -> AccessPolicy | str:
        """A login that began at generation ``since`` and was admitted now with ``policy``: the policy it goes
        on with, or why it may not stay. A reload or revoke that ran while its credentials were being checked
        missed it in the re-evaluation: it is judged here, and gets the rules now in force (a platform client
        a reload replaced is being closed)."""
        if since == self._generation:
            return policy
        for generation, username, team in self._revocations:
            if generation > since and (
                (username is not None and username == grant.username) or (team is not None and team == grant.team)
            ):
                return "credentials revoked"
        return self.front.admission.rebind(grant, policy)

    async def reload(self) -> dict[str, object]:
        """Reload the whole configuration file (SIGHUP, ``mqtt-front reload``, the admin API).

        The new file and everything it names are read and checked first (:func:`broker.reload.prepare`);
        an invalid one is refused with ``config_reload_failed`` naming the key, and nothing changes. Then
        the reloadable parts are swapped (auth, acl, limits, logging; listener TLS files are re-read) and
        every connected session is re-evaluated against the new policy (:meth:`reevaluate`). Without a
        config file (an embedded FrontBroker), only the files the config names are read again.
        """
        async with self._reloading:
            if self.front.config_path is None:
                ok = self.front.reload()
                self.front.metrics.reloaded(ok)
                return {"ok": ok, "changed": [], "restart_needed": [], "error": None if ok else "see the log"}
            try:
                prepared = prepare(
                    self.front.config_path, self.front.config, self.front.authenticator.users, self._build_acl
                )
                platform = await self._platform_for(prepared.config)
            except ConfigError as exc:
                log_event(log, logging.ERROR, "config_reload_failed", file=self.front.config_path, reason=str(exc))
                self.front.metrics.reloaded(False)
                return {"ok": False, "changed": [], "restart_needed": [], "error": str(exc)}
            changes = prepared.changes
            if platform is not self.front.platform and not any(c.startswith("auth.http") for c in changes):
                changes.append("auth.http (its header or CA files)")
            # Certificates are re-read in place: one that cannot be read keeps the old one (and logs it).
            tls_ok = self.front.tls.reload()
            self._swap(prepared, platform)
            self.front.metrics.reloaded(tls_ok, prepared.config.upstream if prepared.upstream_tls is not None else None)
            self._generation += 1
            outcome = self.reevaluate()
            if not changes and not any(outcome.values()):
                log_event(
                    log,
                    logging.INFO,
                    "config_unchanged",
                    file=self.front.config_path,
                    restart_needed=", ".join(prepared.restart_needed) or None,
                )
            else:
                log_event(
                    log,
                    logging.INFO,
                    "config_reloaded",
                    file=self.front.config_path,
                    changed="; ".join(changes) or "nothing",
                    restart_needed=", ".join(prepared.restart_needed) or None,
                    **outcome,
                )
            report: dict[str, object] = {
                "ok": True,
                "changed": changes,
                "restart_needed": prepared.restart_needed,
                **outcome,
            }
            if not tls_ok:
                report["warnings"] = ["a listener certificate could not be read again: the old one stays in use"]
            return report

    async def _platform_for(self, config: Config) -> PlatformClient | None:
        """The platform client the new config asks for: the running one when ``auth.http`` did not change."""
        http = config.auth.http
        running = self.front.platform
        if http is None:
            return None
        if running is not None and client_fingerprint(http) == running.fingerprint:
            return running
        platform = PlatformClient(http)
        await platform.start()  # resolves headers and the CA: a ConfigError here changes nothing
        return platform

    def _swap(self, prepared: Prepared, platform: PlatformClient | None) -> None:
        config = prepared.config
        auth = config.auth
        authenticator = self.front.authenticator
        authenticator.replace_users(prepared.users)
        authenticator.allow_anonymous = auth.allow_anonymous
        authenticator.cache_ttl = auth.cache_ttl
        authenticator.max_pending = auth.max_pending
        old_platform, self.front.platform = self.front.platform, platform
        if old_platform is not platform:
            if old_platform is not None:
                task = asyncio.get_running_loop().create_task(self._retire(old_platform))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            if platform is not None:
                self.front.metrics.watch_platform(platform)
        self.front.acl = prepared.acl
        self.front.jwt = prepared.jwt
        admission = self.front.admission
        admission.acl, admission.acl_config = prepared.acl, config.acl
        admission.platform, admission.http_config, admission.jwt = platform, auth.http, prepared.jwt
        admission.max_per_team = config.limits.max_connections_per_team
        if prepared.upstream_tls is not None:
            self.front.upstream.replace_context(prepared.upstream_tls)
        apply_budgets(self.front.session_settings, config.limits)  # new sessions
        self.front.limits.configure(config.limits)
        self.front.session_settings.disconnect_on_deny = config.acl.deny_action == "disconnect"
        self.front.config = config
        apply_logging(config)

    async def _retire(self, old: PlatformClient) -> None:
        """A platform client a reload replaced: what it is asked already still gets its answer (a login,
        a held delivery), then it closes. New questions go to the new client."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + old.config.timeout + 1.0
        while old.busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await old.close()

    def reevaluate(self, usernames: set[str] | None = None) -> dict[str, int]:
        """Check every admitted session (or those of ``usernames``) against the policy in force now.

        A session whose identity may no longer connect is disconnected (v5 DISCONNECT 0x87); the others
        get their rights rebuilt in place: what they remembered as allowed is dropped, and subscriptions no
        longer granted are unsubscribed upstream on their behalf.
        """
        checked = disconnected = revoked = 0
        for conn, grant in list(self.front.grants.items()):
            if usernames is not None and grant.username not in usernames:
                continue
            session = conn.session
            if session is None or session.closed:
                continue
            checked += 1
            verdict = self.front.admission.rebind(grant, session.policy)
            if isinstance(verdict, str):
                disconnected += 1
                log_event(
                    log,
                    logging.INFO,
                    "session_revoked",
                    peer=conn.peer,
                    user=grant.username,
                    client=grant.client_id,
                    team=session.team,
                    reason=verdict,
                )
                conn.disconnect(DisconnectReason.NOT_AUTHORIZED, verdict, discard_will=True)
            else:
                self.front.grants[conn] = self.front.admission.refreshed(grant)
                revoked += len(conn.replace_policy(verdict))
        return {"sessions_checked": checked, "sessions_disconnected": disconnected, "subscriptions_revoked": revoked}

    def clients(
        self, team: str | None = None, username: str | None = None, listener: str | None = None
    ) -> list[dict[str, object]]:
        """The admitted sessions (the admin API's client list), filtered; ordered by client id."""
        out = []
        for conn, grant in self.front.grants.items():
            session = conn.session
            if session is None or session.closed:
                continue
            if (team is not None and session.team != team) or (username is not None and grant.username != username):
                continue
            if listener is not None and conn.listener != listener:
                continue
            out.append(_client_info(conn, grant, session))
        return sorted(out, key=lambda c: str(c["client_id"]))

    def client(self, client_id: str) -> dict[str, object] | None:
        found = [c for c in self.clients() if c["client_id"] == client_id]
        return found[0] if found else None

    async def recheck_platform(self) -> int:
        """Ask the platform again about every subscription its sessions hold (``acl.source: http``).

        The platform's answers change (a Team Broker rule removed): a filter it now refuses is
        revoked in place, as a reload would. Cached answers are reused (no request until they expire);
        misses are coalesced and bounded by ``max_concurrency`` like every platform check. Returns the
        number of subscriptions revoked.
        """
        http = self.front.config.auth.http
        # A quarter of the platform's slots at most: logins and delivery checks keep the rest.
        slots = asyncio.Semaphore(max(1, (http.max_concurrency if http is not None else 4) // 4))

        async def still(platform: PlatformPolicy, filt: str) -> bool:
            async with slots:
                return await platform.still_subscribed(filt)

        checks: list[tuple[ClientConnection, object, str, Awaitable[bool]]] = []
        for conn in list(self.front.grants):
            session = conn.session
            policy = session.policy if session is not None and not session.closed else None
            platform = policy.fallback if isinstance(policy, ClaimPolicy) else policy
            if session is None or policy is None or not isinstance(platform, PlatformPolicy):
                continue
            for filt in session.subscriptions:
                known = policy.check_subscribe(filt)  # a token's claims first; the platform's cache
                if known is False:
                    checks.append((conn, policy, filt, _refused()))
                elif policy is platform or known is None:  # (a claim that grants it decides it)
                    checks.append((conn, policy, filt, still(platform, filt)))
        if not checks:
            return 0
        answers = await asyncio.gather(*(c for _, _, _, c in checks), return_exceptions=True)
        refused: dict[ClientConnection, list[str]] = {}
        for (conn, asked, filt, _), allowed in zip(checks, answers, strict=True):
            # An error is not a refusal (the deliveries are still checked one by one); a policy replaced
            # meanwhile (a reload) was re-evaluated already.
            if allowed is False and conn.session is not None and conn.session.policy is asked:
                refused.setdefault(conn, []).append(filt)
        return sum(len(conn.revoke_filters(filters)) for conn, filters in refused.items())

    def kick(self, client_id: str) -> bool:
        """An operator ends the session of ``client_id`` (v5 DISCONNECT 0x98 administrative action)."""
        found = False
        for conn, grant in list(self.front.grants.items()):
            session = conn.session
            if session is not None and not session.closed and (session.client_id or grant.client_id) == client_id:
                found = True
                conn.disconnect(DisconnectReason.ADMINISTRATIVE_ACTION, "disconnected by an operator")
        if found:
            log_event(log, logging.INFO, "client_kicked", client=client_id)
        return found

    def revoke(self, username: str | None = None, team: str | None = None) -> int:
        """What the platform calls when it deletes a project or suspends a team: every session of that
        identity (or team) is disconnected (0x98) and the platform's cached decisions for it are dropped."""
        count = 0
        forgotten: set[str] = set()
        for conn, grant in list(self.front.grants.items()):
            session = conn.session
            if session is None or session.closed:
                continue
            if (username is not None and grant.username == username) or (team is not None and session.team == team):
                count += 1
                if grant.username is not None:
                    forgotten.add(grant.username)
                conn.disconnect(DisconnectReason.ADMINISTRATIVE_ACTION, "credentials revoked", discard_will=True)
        if username is not None:
            forgotten.add(username)
        self._generation += 1
        self._revocations.append((self._generation, username, team))  # logins in flight are refused too
        if self.front.platform is not None:
            for name in forgotten:
                self.front.platform.forget(name)
        log_event(log, logging.INFO, "credentials_revoked", user=username, team=team, sessions=count)
        return count

    def topics(self, team: str) -> list[dict[str, object]] | None:
        """The team's topic inventory (None: the inventory is off)."""
        inventory = self.front.inventory
        return inventory.snapshot(team) if inventory is not None else None


async def _refused() -> bool:
    return False


def _client_info(conn: ClientConnection, grant: Grant, session: Session) -> dict[str, object]:
    return {
        "client_id": session.client_id or grant.client_id,  # the assigned one for an empty CONNECT id
        "username": grant.username,
        "team": session.team,
        "listener": conn.listener,
        "peer": conn.peer,
        "protocol": "5.0" if session.v5 else "3.1.1",
        "connected_at": datetime.fromtimestamp(conn.opened_at, UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "subscriptions": session.subscriptions,
        "mountpoint": session.mountpoint or None,
    }
