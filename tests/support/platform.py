"""A real HTTP server playing FlowFuse's platform (``../shared/flowfuse-reference.md``) for the tests.

It serves both APIs the broker may be pointed at, with FlowFuse's semantics:

- EMQX style (v2): ``POST /api/comms/v2/auth`` ``{"username","password","clientId"}`` -> always HTTP 200,
  ``{"result":"allow","is_superuser":false,"client_attrs":{"team": <mount>}}`` or ``{"result":"deny"}``;
  ``POST /api/comms/v2/acls`` ``{"username","topic","action"}`` -> ``{"result":"allow"|"deny"}``.
- go-auth style (v1): ``POST /api/comms/auth/client`` ``{"username","password","clientid"}`` and
  ``POST /api/comms/auth/acl`` ``{"username","clientid","topic","acc"}`` -> 200 allow / 401 deny
  (acc 2 is publish; 1 (read), 3 and 4 (subscribe) are all checked as subscribe).

Identities (``add(username)`` derives everything from the username form, as the platform does):

- ``project:<team>:<project>``, ``device:<team>:<device>``, ``forge_platform``: tokens ``ffbp_``/``ffbd_``/
  ``ffbpl_``; mount ``""``; ACLs are FlowFuse's regexes over the literal (full ``ff/v1/...``) topic: the
  project-link table of the reference for projects; for devices their ``d/<own>/command`` (subscribe),
  ``d/<own>/{status,logs,response,resources}`` (publish) and the team's ``c/#``; anything under ``ff/v1/`` for
  the platform. A filter is matched as if it were a topic (``ff/v1/t/p/+/out/#`` matches ``p/[^/]+/out/.+``;
  ``ff/v1/+/...`` does not match team ``t``). ``$share/<group>/<filter>`` is checked on ``<filter>``; a
  project may use only the groups ``platform``, ``browser`` and its own project id.
- ``<name>@<team>`` (Team Broker client, plain password in the fake) and ``mq:hosted:<team>:<instance>`` /
  ``mq:remote:<team>:<device>``: mount ``ff/v1/<team>/c/``; ACLs are a rule list ``[(pattern, action)]``
  (action ``publish``, ``subscribe`` or ``both``) relative to the mount, first match allows, default deny,
  the requested topic or filter matched as a topic against the pattern (so ``foo/+`` allows ``foo/#``).
  Default rules ``[("#", "both")]``.
- ``frontend:<team>:<device>``, ``fe-team:<user>:<team>:<session>``, ``expert-client:<user>:<session>``:
  one-time credentials (``ffbf_``/``ffbtf_``/``ffbec_``), deleted after their first successful check (a
  second CONNECT with them is denied). Their ACLs are this fake's guess (the reference does not list them):
  frontend subscribes ``ff/v1/<team>/d/<device>/logs`` and publishes ``.../logs/heartbeat``; fe-team may
  use ``ff/v1/<team>/u/<user>/s/<session>/#``; expert-client ``ff/v1/expert/<user>/<session>/#``. Pass
  ``rules=`` (regex-free MQTT patterns on the topic the platform sees) to pin any identity's ACL.

API::

    platform = FakePlatform(ssl_context=None, team_client_id_rule=False)
    await platform.start(); ...; await platform.stop()        # in the test's event loop
    with platform.in_thread(): ...                            # or on a loop thread, for sync tests
    password = platform.add("project:team1:p1")               # also add(username, password, rules=, one_time=)
    platform.set_rules("alice@team1", [("sensors/#", "both")]); platform.remove("alice@team1")
    platform.emqx_config(timeout=1) / platform.go_auth_config()   # dicts for auth.http (HttpAuthConfig)
    platform.auth / .acl / .go_auth / .go_acl                 # the four Endpoints

Each :class:`Endpoint` has knobs ``delay`` (seconds before answering), ``fail`` (a status code to answer
with, the semantics skipped), ``garbage`` (bytes answered with HTTP 200 as text/plain), ``override`` (a
dict: the JSON answer to every request; or a callable ``f(body) -> answer | None``, None falling back to the
semantics, an answer being a dict (200 JSON), an int (that status, empty body) or ``(status, dict | bytes)``),
and logs: ``requests`` (parsed bodies), ``headers`` and ``peers`` (per request), ``count``, ``in_flight``, ``peak``
(most requests in flight at once) and ``reset()``. ``platform.consumed`` lists the one-time usernames
whose credential was used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

EMQX_AUTH = "/api/comms/v2/auth"
EMQX_ACL = "/api/comms/v2/acls"
GO_AUTH = "/api/comms/auth/client"
GO_ACL = "/api/comms/auth/acl"

Answer = dict[str, Any] | int | tuple[int, dict[str, Any] | bytes]
Override = dict[str, Any] | Callable[[dict[str, Any]], Answer | None]
TeamRule = tuple[str, str]  # (MQTT pattern, "publish" | "subscribe" | "both")
SHARE_GROUPS = ("platform", "browser")


@dataclass
class Endpoint:
    """One path of the fake: its knobs and what it was asked."""

    path: str
    delay: float = 0.0
    fail: int | None = None
    garbage: bytes | None = None
    override: Override | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)  # the client's (host, port) per request: one per connection
    in_flight: int = 0
    peak: int = 0

    @property
    def count(self) -> int:
        return len(self.requests)

    def reset(self) -> None:
        """Clear the knobs and the logs."""
        self.delay, self.fail, self.garbage, self.override = 0.0, None, None, None
        self.requests.clear()
        self.headers.clear()
        self.peers.clear()
        self.peak = 0


@dataclass(frozen=True)
class _RegexRule:
    """FlowFuse's aclManager style: a regex over the literal topic; groups must equal ``expect`` (None: any)."""

    action: str  # publish | subscribe | both
    regex: re.Pattern[str]
    expect: tuple[str | None, ...] = ()

    def allows(self, action: str, topic: str) -> bool:
        if self.action not in (action, "both"):
            return False
        match = self.regex.match(topic)
        if match is None:
            return False
        return all(want is None or got == want for got, want in zip(match.groups(), self.expect, strict=False))


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _project_rules(team: str, project: str) -> list[_RegexRule]:
    return [
        _RegexRule("subscribe", _rx(r"^ff/v1/([^/]+)/p/[^/]+/out/.+$"), (team,)),
        _RegexRule("subscribe", _rx(r"^ff/v1/([^/]+)/p/([^/]+)/in/.+$"), (team, project)),
        _RegexRule("subscribe", _rx(r"^ff/v1/([^/]+)/p/([^/]+)/res(?:-[^/]+)?/.+$"), (team, project)),
        _RegexRule("publish", _rx(r"^ff/v1/([^/]+)/p/[^/]+/in/.+$"), (team,)),
        _RegexRule("publish", _rx(r"^ff/v1/([^/]+)/p/[^/]+/res(?:-[^/]+)?/.+$"), (team,)),
        _RegexRule("publish", _rx(r"^ff/v1/([^/]+)/p/([^/]+)/out/.+$"), (team, project)),
        _RegexRule("both", _rx(r"^ff/v1/([^/]+)/c/.+$"), (team,)),
    ]


def _device_rules(team: str, device: str) -> list[_RegexRule]:
    return [
        _RegexRule("subscribe", _rx(r"^ff/v1/([^/]+)/d/([^/]+)/command$"), (team, device)),
        _RegexRule("publish", _rx(r"^ff/v1/([^/]+)/d/([^/]+)/(?:status|logs|response|resources)$"), (team, device)),
        _RegexRule("both", _rx(r"^ff/v1/([^/]+)/c/.+$"), (team,)),
    ]


def mqtt_match(pattern: str, topic: str) -> bool:
    """Does ``topic`` (taken literally, even if it is a filter) match the MQTT ``pattern``?"""
    levels, parts = pattern.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return len(parts) >= i
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(levels) == len(parts)


@dataclass
class Identity:
    """One username the fake platform knows."""

    username: str
    mount: str = ""  # client_attrs.team
    regex_rules: list[_RegexRule] = field(default_factory=list)
    team_rules: list[TeamRule] | None = None  # relative to the mount (Team Broker style), when set
    share_groups: tuple[str, ...] | None = None  # None: any group
    one_time: bool = False

    def allows(self, action: str, topic: str) -> bool:
        if topic.startswith("$share/"):
            _, group, *rest = topic.split("/", 2)
            if not rest or (self.share_groups is not None and group not in self.share_groups):
                return False
            topic = rest[0]
        if self.team_rules is not None:
            return any(rule_action in (action, "both") and mqtt_match(pattern, topic)
                       for pattern, rule_action in self.team_rules)
        return any(rule.allows(action, topic) for rule in self.regex_rules)


def _token(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def identity_for(username: str, rules: Sequence[TeamRule] | None = None) -> tuple[Identity, str]:
    """The identity a username form stands for, and a password in FlowFuse's shape for it."""
    parts = username.split(":")
    ident = Identity(username)
    prefix = "pw-"
    if username == "forge_platform":
        ident.regex_rules, prefix = [_RegexRule("both", _rx(r"^ff/v1/.+$"))], "ffbpl_"
    elif parts[0] == "project" and len(parts) == 3:
        ident.regex_rules, prefix = _project_rules(parts[1], parts[2]), "ffbp_"
        ident.share_groups = (*SHARE_GROUPS, parts[2])
    elif parts[0] == "device" and len(parts) == 3:
        ident.regex_rules, prefix = _device_rules(parts[1], parts[2]), "ffbd_"
    elif parts[0] == "frontend" and len(parts) == 3:
        ident.one_time, prefix = True, "ffbf_"
        ident.regex_rules = [
            _RegexRule("subscribe", _rx(r"^ff/v1/([^/]+)/d/([^/]+)/logs$"), (parts[1], parts[2])),
            _RegexRule("publish", _rx(r"^ff/v1/([^/]+)/d/([^/]+)/logs/heartbeat$"), (parts[1], parts[2])),
        ]
    elif parts[0] == "fe-team" and len(parts) == 4:
        ident.one_time, prefix = True, "ffbtf_"
        user, team, session = parts[1:]
        ident.regex_rules = [_RegexRule("both", _rx(r"^ff/v1/([^/]+)/u/([^/]+)/s/([^/]+)/.+$"), (team, user, session))]
    elif parts[0] == "expert-client" and len(parts) == 3:
        ident.one_time, prefix = True, "ffbec_"
        ident.regex_rules = [_RegexRule("both", _rx(r"^ff/v1/expert/([^/]+)/([^/]+)/.+$"), (parts[1], parts[2]))]
    elif parts[0] == "mq" and len(parts) == 4 and parts[1] in ("hosted", "remote"):
        ident.mount, ident.team_rules = f"ff/v1/{parts[2]}/c/", [("#", "both")]
    elif "@" in username and ":" not in username:
        ident.mount, ident.team_rules = f"ff/v1/{username.rpartition('@')[2]}/c/", [("#", "both")]
    password = _token(prefix) if prefix != "pw-" else prefix + secrets.token_hex(8)
    if rules is not None:
        ident.team_rules, ident.regex_rules = list(rules), []
    return ident, password


class FakePlatform:
    """FlowFuse's platform over real HTTP, on a free loopback port (see the module docstring)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, team_client_id_rule: bool = False) -> None:
        self.ssl_context = ssl_context
        self.team_client_id_rule = team_client_id_rule  # Team Broker clients: client id must equal the username
        self.identities: dict[str, Identity] = {}
        self.passwords: dict[str, str] = {}
        self.consumed: list[str] = []
        self.auth, self.acl = Endpoint(EMQX_AUTH), Endpoint(EMQX_ACL)
        self.go_auth, self.go_acl = Endpoint(GO_AUTH), Endpoint(GO_ACL)
        self.port = 0
        self._runner: web.AppRunner | None = None

    # -- identities -----------------------------------------------------------------------

    def add(
        self,
        username: str,
        password: str | None = None,
        *,
        rules: Sequence[TeamRule] | None = None,
        one_time: bool | None = None,
    ) -> str:
        """Register (or replace) an identity; returns its password."""
        ident, generated = identity_for(username, rules)
        if one_time is not None:
            ident.one_time = one_time
        self.identities[username] = ident
        self.passwords[username] = password if password is not None else generated
        return self.passwords[username]

    def set_rules(self, username: str, rules: Sequence[TeamRule]) -> None:
        """Change an identity's rule list (Team Broker style) while clients are connected."""
        ident = self.identities[username]
        ident.team_rules, ident.regex_rules = list(rules), []

    def remove(self, username: str) -> None:
        """Delete the identity: later logins and ACL checks are denied."""
        self.identities.pop(username, None)
        self.passwords.pop(username, None)

    # -- the endpoints --------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def emqx_config(self, **extra: Any) -> dict[str, Any]:
        """``auth.http`` for the v2 (EMQX-style) API of this fake."""
        return {"style": "emqx", "auth_url": self.base_url + EMQX_AUTH, "acl_url": self.base_url + EMQX_ACL, **extra}

    def go_auth_config(self, **extra: Any) -> dict[str, Any]:
        """``auth.http`` for the v1 (mosquitto-go-auth) API of this fake."""
        return {"style": "go-auth", "auth_url": self.base_url + GO_AUTH, "acl_url": self.base_url + GO_ACL, **extra}

    def login(self, username: str, password: str, client_id: str) -> bool:
        ident = self.identities.get(username)
        if ident is None or not secrets.compare_digest(self.passwords.get(username, "").encode(), password.encode()):
            return False
        if self.team_client_id_rule and ident.team_rules is not None and client_id != username:
            return False
        if ident.one_time:
            del self.passwords[username]  # deleted after its first successful check
            self.consumed.append(username)
        return True

    def allows(self, username: str, action: str, topic: str) -> bool:
        ident = self.identities.get(username)
        return ident is not None and ident.allows(action, topic)

    def _emqx_auth(self, body: dict[str, Any]) -> Answer:
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        if not self.login(username, password, str(body.get("clientId", ""))):
            return {"result": "deny"}
        mount = self.identities[username].mount
        return {"result": "allow", "is_superuser": False, "client_attrs": {"team": mount}}

    def _emqx_acl(self, body: dict[str, Any]) -> Answer:
        action = body.get("action")
        if action not in ("publish", "subscribe"):
            return {"result": "deny"}
        allowed = self.allows(str(body.get("username", "")), action, str(body.get("topic", "")))
        return {"result": "allow" if allowed else "deny"}

    def _go_auth(self, body: dict[str, Any]) -> Answer:
        ok = self.login(str(body.get("username", "")), str(body.get("password", "")), str(body.get("clientid", "")))
        return 200 if ok else 401

    def _go_acl(self, body: dict[str, Any]) -> Answer:
        acc = body.get("acc")
        action = "publish" if acc == 2 else "subscribe" if acc in (1, 3, 4) else None
        if action is None:
            return 401
        return 200 if self.allows(str(body.get("username", "")), action, str(body.get("topic", ""))) else 401

    def _handler(self, endpoint: Endpoint, semantics: Callable[[dict[str, Any]], Answer]) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            endpoint.in_flight += 1
            endpoint.peak = max(endpoint.peak, endpoint.in_flight)
            try:
                raw = await request.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                endpoint.requests.append(body if isinstance(body, dict) else {"_json": body})
                endpoint.headers.append(dict(request.headers))
                endpoint.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
                if endpoint.delay:
                    await asyncio.sleep(endpoint.delay)
                if endpoint.fail is not None:
                    return web.json_response({"error": "failing on purpose"}, status=endpoint.fail)
                if endpoint.garbage is not None:
                    return web.Response(body=endpoint.garbage, content_type="text/plain")
                answer: Answer | None = None
                if isinstance(endpoint.override, dict):
                    answer = endpoint.override
                elif endpoint.override is not None:
                    answer = endpoint.override(body)
                if answer is None:
                    answer = semantics(body if isinstance(body, dict) else {})
                return _response(answer)
            finally:
                endpoint.in_flight -= 1

        return handle

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakePlatform:
        app = web.Application()
        for endpoint, semantics in (
            (self.auth, self._emqx_auth),
            (self.acl, self._emqx_acl),
            (self.go_auth, self._go_auth),
            (self.go_acl, self._go_acl),
        ):
            app.router.add_post(endpoint.path, self._handler(endpoint, semantics))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=self.ssl_context).start()
        self._runner = runner
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[FakePlatform]:
        """Serve from an event loop of its own on a thread (for synchronous tests)."""
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def _response(answer: Answer) -> web.Response:
    if isinstance(answer, int):
        return web.Response(status=answer)
    if isinstance(answer, tuple):
        status, body = answer
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response(body, status=status)
    return web.json_response(answer)
