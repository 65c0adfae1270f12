"""The admin REST API (``admin.bind``): list and kick clients, revoke users and teams, topics, reload.

In the style of EMQX's REST API, on its own listener (aiohttp.web), off unless configured. Every
request needs ``Authorization: Bearer <admin token>``, compared in constant time; every answer,
errors included, is JSON. The server asks an :class:`AdminBackend` (the front broker process, see
:class:`broker.server.FrontBroker`) or, with ``--workers N``, an :class:`AsyncAdminBackend` that asks
every worker (:mod:`broker.ops.admin_workers`).

=========================================  ==========================================================
``GET /api/v1/clients``                    ``{"data": [client, ...], "meta": {"count": n}}``;
                                           filters ``?team=&username=&listener=``
``GET /api/v1/clients/{client_id}``        the client, or 404
``DELETE /api/v1/clients/{client_id}``     kick (DISCONNECT 0x98): 204, or 404
``POST /api/v1/revoke``                    ``{"username": u}`` or ``{"team": t}``: ``{"disconnected": n}``
``GET /api/v1/teams/{team}/topics``        ``{"data": [topic, ...], "meta": {"count": n}}``; 404 when
                                           the topic inventory is off
``POST /api/v1/reload``                    the reload report: 200 when ok, else 422
``POST /api/v1/drain``                     202: the process stops as on SIGTERM (the drain), then exits
=========================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from broker.logs import log_event
from broker.ops.admin_access import MIN_TOKEN_LENGTH

log = logging.getLogger("mqtt_front.admin")

API = "/api/v1"
MAX_BODY = 64 * 1024  # bytes of a request body
SHUTDOWN_TIMEOUT = 2.0  # seconds stop() waits for requests in progress
CLIENT_FILTERS = ("team", "username", "listener")

Json = dict[str, object]
Headers = dict[str, str] | None
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminBackend(Protocol):
    """What the front broker process answers; called on its event loop.

    A client is ``{"client_id", "username", "team", "listener", "peer", "protocol" ("3.1.1" | "5.0"),
    "connected_at" (ISO-8601 UTC), "subscriptions" (the client-visible filters), "mountpoint" (str |
    None)}``. A topic is a row of :meth:`broker.session.inventory.Inventory.snapshot` (``topic``,
    ``messages``, ``bytes``, ``last_seen`` (unix time), ``retained``, ``payload``); with ``--workers N``
    the workers' rows are merged by :func:`broker.session.inventory.merge_snapshots`.
    """

    def clients(self, team: str | None, username: str | None, listener: str | None) -> list[Json]: ...
    def client(self, client_id: str) -> Json | None: ...
    def kick(self, client_id: str) -> bool:
        """True if a session with that id was found and disconnected (DISCONNECT 0x98, administrative action)."""
        ...

    def revoke(self, username: str | None, team: str | None) -> int:
        """Disconnect every matching session and drop its cached decisions; the number disconnected."""
        ...

    def topics(self, team: str) -> list[Json] | None:
        """The team's topic inventory; None when the inventory is off."""
        ...

    async def reload(self) -> Json:
        """``{"ok": bool, "changed": [...], "restart_needed": [...], "error": str | None}``."""
        ...


class AsyncAdminBackend(Protocol):
    """:class:`AdminBackend` with every answer awaited (the parent of ``--workers N`` asks its workers)."""

    async def clients(self, team: str | None, username: str | None, listener: str | None) -> list[Json]: ...
    async def client(self, client_id: str) -> Json | None: ...
    async def kick(self, client_id: str) -> bool: ...
    async def revoke(self, username: str | None, team: str | None) -> int: ...
    async def topics(self, team: str) -> list[Json] | None: ...
    async def reload(self) -> Json: ...


class AdminUnavailable(Exception):
    """The backend cannot answer for all of the process (a worker did not answer): 503 with ``details``."""

    def __init__(self, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class _Awaited:
    """An :class:`AdminBackend` as an :class:`AsyncAdminBackend`."""

    def __init__(self, backend: AdminBackend) -> None:
        self.backend = backend

    async def clients(self, team: str | None, username: str | None, listener: str | None) -> list[Json]:
        return self.backend.clients(team, username, listener)

    async def client(self, client_id: str) -> Json | None:
        return self.backend.client(client_id)

    async def kick(self, client_id: str) -> bool:
        return self.backend.kick(client_id)

    async def revoke(self, username: str | None, team: str | None) -> int:
        return self.backend.revoke(username, team)

    async def topics(self, team: str) -> list[Json] | None:
        return self.backend.topics(team)

    async def reload(self) -> Json:
        return await self.backend.reload()


class BadRequest(Exception):
    """A request the API refuses with 400 and this message."""


def json_response(status: int, data: object, headers: Headers = None) -> web.Response:
    body = json.dumps(data, default=str) + "\n"
    response = web.json_response(text=body, status=status, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def error(status: int, message: str, details: Json | None = None, headers: Headers = None) -> web.Response:
    return json_response(status, {"error": message, **(details or {})}, headers)


async def read_object(request: web.Request, allowed: tuple[str, ...]) -> dict[str, object]:
    """The request body as a JSON object with only ``allowed`` keys ({} for an empty body)."""
    raw = await request.read()  # over MAX_BODY: HTTPRequestEntityTooLarge, answered 413 by _errors
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field: {', '.join(unknown)}")
    return body


def _one_query_value(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    return values[0] if values else None


class AdminHttpServer:
    """The HTTP side of the admin API over an :class:`AsyncAdminBackend`; one listener per server."""

    def __init__(
        self,
        backend: AsyncAdminBackend,
        token: str,
        shutdown_timeout: float | None = None,
        drain: Callable[[], None] | None = None,
    ) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_LENGTH} characters")
        self.backend = backend
        self._token = token.encode("utf-8")
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors, self._auth])
        self.app.router.add_get(f"{API}/clients", self._clients)
        self.app.router.add_get(f"{API}/clients/{{client_id}}", self._client)
        self.app.router.add_delete(f"{API}/clients/{{client_id}}", self._kick)
        self.app.router.add_post(f"{API}/revoke", self._revoke)
        self.app.router.add_get(f"{API}/teams/{{team}}/topics", self._topics)
        self.app.router.add_post(f"{API}/reload", self._reload)
        self.app.router.add_post(f"{API}/drain", self._drain)
        self.shutdown_timeout = shutdown_timeout  # told to the caller of /drain
        self._start_drain = drain if drain is not None else _sigterm_self
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None  # the TCP address bound by start()

    # ------------------------------------------------------------------ lifecycle

    async def _site(self, make: Callable[[web.AppRunner], web.BaseSite]) -> web.AppRunner:
        if self._runner is not None:
            raise RuntimeError("the admin server is already started")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await make(runner).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return runner

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (``admin.bind``); the address bound. OSError when it cannot."""
        runner = await self._site(lambda r: web.TCPSite(r, host, port, reuse_address=True))
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        shown = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        log_event(log, logging.INFO, "admin_listening", url=f"http://{shown}:{self.address[1]}{API}")
        return self.address

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket (a worker of ``--workers N``, asked by the parent)."""
        await self._site(lambda r: web.UnixSite(r, path))

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as JSON: the router's 404 and 405, 413 for a large body, 503, 500."""
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except AdminUnavailable as exc:
            return error(503, str(exc), exc.details)
        except web.HTTPRequestEntityTooLarge:
            return error(413, "body too large", {"limit": MAX_BODY})
        except web.HTTPMethodNotAllowed as exc:
            allowed = sorted(exc.allowed_methods)
            return error(405, "method not allowed", {"allowed": allowed}, {"Allow": ", ".join(allowed)})
        except web.HTTPNotFound:
            return error(404, "not found")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(exc.status, (exc.reason or "error").lower())
        except Exception:  # one failed request never takes the listener down
            log.exception("error serving an admin API request")
            return error(500, "internal error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        offered = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self._token):
            peer, method, path = request.remote, request.method, request.path
            log_event(log, logging.WARNING, "admin_unauthorized", peer=peer, method=method, path=path)
            return error(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="mqtt-front"'})
        return await handler(request)

    # ------------------------------------------------------------------ endpoints

    async def _clients(self, request: web.Request) -> web.Response:
        unknown = sorted(set(request.query) - set(CLIENT_FILTERS))
        if unknown:
            raise BadRequest(f"unknown query parameter: {', '.join(unknown)} (filters: {', '.join(CLIENT_FILTERS)})")
        team, username, listener = (_one_query_value(request, name) for name in CLIENT_FILTERS)
        data = await self.backend.clients(team, username, listener)
        return json_response(200, {"data": data, "meta": {"count": len(data)}})

    async def _client(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        found = await self.backend.client(client_id)
        return json_response(200, found) if found is not None else error(404, "not found", {"client_id": client_id})

    async def _kick(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        try:
            kicked = await self.backend.kick(client_id)
        except AdminUnavailable as exc:
            _log_call(request, "kick", client=client_id, error=str(exc))
            raise
        _log_call(request, "kick", client=client_id, found=kicked)
        return web.Response(status=204) if kicked else error(404, "not found", {"client_id": client_id})

    async def _revoke(self, request: web.Request) -> web.Response:
        body = await read_object(request, ("username", "team"))
        given = {key: value for key, value in body.items() if value is not None}
        if len(given) != 1:
            raise BadRequest('give exactly one of "username" and "team"')
        (key, value), *_ = given.items()
        if not isinstance(value, str) or not value:
            raise BadRequest(f'"{key}" must be a non-empty string')
        username, team = (value, None) if key == "username" else (None, value)
        try:
            count = await self.backend.revoke(username, team)
        except AdminUnavailable as exc:
            _log_call(request, "revoke", username=username, team=team, error=str(exc))
            raise
        _log_call(request, "revoke", username=username, team=team, disconnected=count)
        return json_response(200, {"disconnected": count})

    async def _topics(self, request: web.Request) -> web.Response:
        data = await self.backend.topics(request.match_info["team"])
        if data is None:
            return error(404, "topic inventory off")
        return json_response(200, {"data": data, "meta": {"count": len(data)}})

    async def _reload(self, request: web.Request) -> web.Response:
        await read_object(request, ())
        report = await self.backend.reload()
        ok = report.get("ok") is True
        _log_call(
            request,
            "reload",
            ok=ok,
            changed=_joined(report.get("changed")),
            restart_needed=_joined(report.get("restart_needed")),
            error=report.get("error") or None,
        )
        return json_response(200 if ok else 422, report)


    async def _drain(self, request: web.Request) -> web.Response:
        """The drain, as on SIGTERM (by default the signal itself, see _sigterm_self). The answer goes out first."""
        await read_object(request, ())
        _log_call(request, "drain")
        asyncio.get_running_loop().call_soon(self._start_drain)
        return json_response(202, {"draining": True, "shutdown_timeout": self.shutdown_timeout})


class AdminServer(AdminHttpServer):
    """The admin API of one front broker process: ``AdminServer(backend, token)``, then ``start`` or
    ``start_unix``, and ``stop``."""

    def __init__(
        self,
        backend: AdminBackend,
        token: str,
        shutdown_timeout: float | None = None,
        drain: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(_Awaited(backend), token, shutdown_timeout, drain)


def _sigterm_self() -> None:
    """SIGTERM to this process (with --workers N the parent, which drains every worker): one code path for
    both ways of stopping."""
    os.kill(os.getpid(), signal.SIGTERM)


def _joined(value: object) -> str | None:
    return ",".join(str(item) for item in value) if isinstance(value, list) and value else None


def _log_call(request: web.Request, op: str, **fields: object) -> None:
    """One ``admin`` event per mutating call: the operation, its target and outcome (never the token)."""
    log_event(log, logging.INFO, "admin", op=op, **fields, peer=request.remote)
