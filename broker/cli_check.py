"""``mqtt-front check``: load what ``run`` would load, print a summary line per part; ``--probe`` asks the platform.

Loads the users file, the ACL rules, every listener certificate, the upstream TLS files, the
``auth.http`` headers (``file:`` / ``env:`` values, with :func:`broker.auth.platform.resolve_headers`) and
CA file, the ``auth.jwt`` keys (:class:`broker.auth.jwt.JwtVerifier`), and checks the ``acl.mountpoints``
templates, resolves every bind's host (``getaddrinfo``, as ``run`` would) and refuses binds that overlap
(:mod:`broker.config.binds`); the first problem is printed naming its key, exit 1. Upstream URLs are shown
with their password starred, and the login line says where the password comes from, never what it is.

``--probe`` then sends one request to ``auth_url`` and one to ``acl_url``, as the broker would (same headers,
CA, timeout, no redirects, no proxy from the environment), for a harmless identity no platform knows
(:data:`PROBE_USER`, empty password), and reports for each: reachable or not, the HTTP status, the answer,
the latency. A probe that fails exits 2. Output never holds a header value, a password or a URL's
userinfo: URLs are shown through :func:`broker.auth.platform.redact_url`, and error texts have every
configured secret replaced by ``***``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx

from acl.identity import parse_identity
from acl.placeholders import PLACEHOLDER_NAMES, PLACEHOLDER_RE, placeholder_values
from broker import __version__
from broker.auth.jwt import JwtVerifier
from broker.auth.platform import redact_url, resolve_headers, ssl_context
from broker.auth.users import load_users
from broker.config import Config, ConfigError, HttpAuthConfig, JwtAuthConfig, ListenerConfig, UpstreamConfig
from broker.config.binds import Address, resolved_overlap
from broker.edge.tls import TlsContexts
from broker.server import build_acl
from broker.session.mount import mountpoint_problem
from broker.upstream.embedded import describe_embedded, embedded_problem, wants_embedded
from broker.upstream.tls_config import check_upstream

EXIT_OK, EXIT_INVALID, EXIT_PROBE_FAILED = 0, 1, 2
PROBE_USER = "mqtt-front-probe"  # no platform has it: the answer must be a deny, and nothing is consumed
PROBE_TOPIC = "mqtt-front/probe"

# One username of each form per kind, to see which placeholders a mountpoint template can fill.
_SAMPLES: dict[str, tuple[str, ...]] = {
    "project": ("project:t:p",),
    "device": ("device:t:d",),
    "platform": ("forge_platform",),
    "teamclient": ("c@t",),
    "teamnode": ("mq:hosted:t:i", "mq:remote:t:d"),
    "teamagent": ("agent:t@t",),
    "frontend": ("frontend:t:d",),
    "teamfrontend": ("fe-team:u:t:s",),
    "expertclient": ("expert-client:u:s",),
    "expertagent": ("expert-agent:api:v1",),
    "user": ("someone",),
}


def check(config: Config, path: str, probe: bool = False) -> int:
    """``check`` on a loaded configuration: print the summary (and the probe); return the exit code."""
    try:
        users = load_users(config.auth.users_file) if config.auth.users_file else {}
        engine = build_acl(config.acl)
        TlsContexts(config.listeners)  # loads every certificate and key as `run` would
        addresses = bind_addresses(config)
        if (problem := embedded_problem(config)) is not None:  # a non-loopback listener and no upstream
            raise ConfigError(problem)
        embedded = describe_embedded() if wants_embedded(config) else None  # which one `run` would start
        upstream_lines = check_upstream(config.upstream) if config.upstream is not None and not embedded else []
        auth_lines = auth_summary(config, len(users))
        acl_lines = acl_summary(config, len(engine.rules))
    except ConfigError as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"configuration {path} is valid")
    for i, listener in enumerate(config.listeners):
        where = listener.bind + _resolved(listener.host_port[0], addresses[f"listeners.{i}.bind"])
        print(f"  listener {listener.name}: {listener.type} on {where}{_listener_extras(listener)}")
    if embedded is not None:
        print(f"  {embedded}")
    if upstream_lines and config.upstream is not None:
        upstream_lines.insert(1, upstream_login(config.upstream))
    for line in [*upstream_lines, *auth_lines, *acl_lines]:
        print(f"  {line}")
    ops = config.metrics
    if ops is not None and ops.bind is not None:
        print(f"  metrics: http://{ops.bind}/metrics (also /healthz, /readyz), at most {ops.max_teams} team labels")
    else:
        print("  metrics: off (metrics.bind not set)")
    if not probe:
        return EXIT_OK
    if config.auth.http is None:
        print("  probe: nothing to probe (auth.http is not set)")
        return EXIT_OK
    return probe_platform(config.auth.http)


def bind_addresses(config: Config) -> dict[str, list[Address]]:
    """The addresses of every bind (listeners, metrics.bind, admin.bind) by key, names resolved as ``run``
    would; ConfigError for a name that does not resolve and for two binds that overlap (wildcard included)."""
    resolved, overlap = resolved_overlap(config.binds)
    if overlap is not None:
        raise ConfigError(overlap)
    return resolved


def _resolved(host: str, addresses: list[Address]) -> str:
    if [str(address) for address in addresses] == [host]:
        return ""  # an IP address already
    return f" ({host} is {', '.join(str(address) for address in addresses)})"


def upstream_login(up: UpstreamConfig) -> str:
    """Who the front broker is upstream, and where the password comes from (never the password)."""
    if up.username is None and up.password is None:
        return "upstream login: anonymous (no upstream.username)"
    if up.password_file is not None:
        source = f"password from {up.password_file}"
    elif up.password is None:
        source = "no password"
    elif any("@" in url for url in up.all_urls):
        source = "password from the URL"
    else:
        source = "password from upstream.password"
    return f"upstream login: {up.username or '(empty username)'}, {source}"


def _listener_extras(listener: ListenerConfig) -> str:
    extras = []
    tls = listener.tls
    if tls is not None:
        certs = "client certificates " + ("required" if tls.require_client_cert else "optional")
        extras.append(f"TLS (min {tls.min_version}, {certs if tls.client_ca else 'no client certificates'}")
        if tls.use_identity_as_username:
            extras[-1] += ", certificate identity as username"
        if tls.server_names:
            extras[-1] += f", SNI {', '.join(tls.server_names)}"
        extras[-1] += ")"
    if listener.proxy_protocol:
        extras.append("PROXY protocol v1/v2 header required")
    return "".join(f", {item}" for item in extras)


# -- auth -------------------------------------------------------------------------------------------------


def auth_summary(config: Config, users: int) -> list[str]:
    """The auth lines; loads the platform's headers and CA and the JWT keys (``ConfigError`` on a problem)."""
    auth = config.auth
    lines = [f"auth: {users} users, anonymous {'allowed' if auth.allow_anonymous else 'refused'}"]
    if auth.http is not None:
        lines.append(http_summary(auth.http, config.acl.source))
    if auth.jwt is not None:
        lines.append(jwt_summary(auth.jwt))
    chain = []
    certificate = [item.name for item in config.listeners if item.tls is not None and item.tls.use_identity_as_username]
    if certificate:
        chain.append(f"client certificate (listener {', '.join(certificate)})")
    if auth.users_file is not None:
        chain.append("users file")
    if auth.jwt is not None:
        chain.append("JWT")
    if auth.http is not None:
        chain.append("platform (one request per CONNECT, never retried)")
    chain.append(f"anonymous {'allowed' if auth.allow_anonymous else 'refused'}")
    lines.append("auth chain: " + " -> ".join(chain))
    return lines


def _header_sources(headers: dict[str, str]) -> str:
    def source(spec: str) -> str:
        if spec.startswith("file:"):
            return f"from file {spec[5:]}"
        if spec.startswith("env:"):
            return f"from ${spec[4:]}"
        return "literal"

    return ", ".join(f"{name} ({source(spec)})" for name, spec in headers.items()) or "none"


def http_summary(http: HttpAuthConfig, acl_source: str) -> str:
    resolve_headers(http.headers)  # raises ConfigError naming auth.http.headers.<name>
    ssl_context(http.ca_file)  # raises ConfigError naming auth.http.ca_file
    urls = [http.auth_url, *([http.acl_url] if http.acl_url else [])]
    https = all(urlsplit(url).scheme == "https" for url in urls)
    if http.acl_url is None:
        acl = "no acl_url"
    else:
        use = "every topic check" if acl_source == "http" else "unused: acl.source local"
        acl = f"acl_url {redact_url(http.acl_url)} ({use})"
    if not https:
        loopback = all(urlsplit(url).hostname in ("127.0.0.1", "::1", "localhost") for url in urls)
        trust = "plain http" + (" on loopback" if loopback else ": CONNECT passwords cross the network unencrypted")
    else:
        trust = f"CA file {http.ca_file}" if http.ca_file else "system CAs"
    superuser = "honored" if http.honor_superuser else "ignored"
    return (
        f"auth.http: style {http.style}, auth_url {redact_url(http.auth_url)}, {acl}, timeout {http.timeout:g}s, "
        f"cache {http.cache_ttl:g}s allow / {http.negative_cache_ttl:g}s deny, at most {http.max_concurrency} "
        f"requests in flight, headers: {_header_sources(http.headers)}, {trust}, is_superuser {superuser}, "
        f"mountpoint from client_attrs.{http.team_attr}"
    )


def jwt_summary(jwt: JwtAuthConfig) -> str:
    verifier = JwtVerifier(jwt)  # loads and checks every key: ConfigError names the one that fails
    where = "password (the username is ignored)" if jwt.token_from == "password" else "username"
    keys = verifier.key_names
    return (
        f"auth.jwt: token in the {where}, algorithms {', '.join(jwt.algorithms)}, {len(keys)} keys "
        f"({', '.join(keys)}), iss {jwt.issuer or 'any'}, aud {jwt.audience or 'none'}, leeway {jwt.leeway:g}s, "
        f"identity claim {jwt.identity_claim!r}, acl claim {jwt.acl_claim or 'none'}, "
        f"mountpoint claim {jwt.mountpoint_claim or 'none'}"
    )


# -- acl --------------------------------------------------------------------------------------------------


def acl_summary(config: Config, rules: int) -> list[str]:
    """The acl lines; checks every ``acl.mountpoints`` template (``ConfigError`` on a problem)."""
    acl = config.acl
    lines = []
    if acl.source == "http":
        lines.append("acl: source http: the platform (auth.http.acl_url) decides every will, publish, subscribe and "
                     "delivery check, on the client-visible topic")
        if acl.rules:
            lines.append(f"warning: acl.rules ({len(acl.rules)}) and the preset are not used with acl.source: http")
    else:
        lines.append(f"acl: preset {acl.preset}, {rules} rules in all")
    if acl.client_id_suffix:
        lines.append("client ids: the username or '<username>:<suffix>' for every identity (acl.client_id_suffix)")
    else:
        lines.append("client ids: <name>@<team> and agent:<team>@<team>: the username only; other identities: "
                     "the username or '<username>:<suffix>' (acl.client_id_suffix: false)")
    for kind, template in acl.mountpoints.items():
        if not template:
            continue
        partial = _check_mount_template(kind, template)
        lines.append(f"acl.mountpoints.{kind}: {template!r}" + (f" ({partial})" if partial else ""))
        if acl.source == "local" and not any(rule.who in (kind, "any") for rule in acl.rules):
            lines.append(
                f"warning: acl.mountpoints.{kind}: no acl.rules for {kind}; the ACL checks the client-visible topic "
                "(without the mountpoint), which the preset's full ff/v1/... patterns do not match: add rules "
                f"relative to the mount, e.g. {{who: {kind}, effect: allow, action: both, pattern: '#'}}"
            )
    return lines


def _fill(template: str, values: dict[str, str]) -> str:
    return PLACEHOLDER_RE.sub(lambda match: values[match.group(1)], template)


def _check_mount_template(kind: str, template: str) -> str:
    """``ConfigError`` when no identity of ``kind`` gets a usable mountpoint; a note when only some do."""
    where = f"acl.mountpoints.{kind}"
    names = PLACEHOLDER_RE.findall(template)
    for name in names:
        if name not in PLACEHOLDER_NAMES:
            known = ", ".join(f"${{{n}}}" for n in sorted(PLACEHOLDER_NAMES))
            raise ConfigError(f"{where}: unknown placeholder ${{{name}}} (known: {known})")
    filled, refused = [], []
    for username in _SAMPLES[kind]:
        values = placeholder_values(parse_identity(username), username)
        if all(name in values for name in names):
            filled.append(_fill(template, values))
        else:
            refused.append(username)
    if not filled:
        raise ConfigError(f"{where}: {kind} identities have no value for {template!r}: every CONNECT would be refused")
    if "${" in filled[0]:
        raise ConfigError(f"{where}: an unterminated placeholder in {template!r}")
    problem = mountpoint_problem(filled[0])
    if problem is not None:
        raise ConfigError(f"{where}: {problem.replace(repr(filled[0]), repr(template))}")
    return f"refused for the form of {', '.join(refused)}: no value" if refused else ""


# -- the probe --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    line: str


def _secrets(http: HttpAuthConfig, headers: dict[str, str]) -> list[str]:
    """Every configured value that must never be printed: header values, URL userinfo."""
    found = list(headers.values())
    for url in (http.auth_url, http.acl_url):
        if url:
            parts = urlsplit(url)
            found += [p for p in (parts.username, parts.password) if p]
            found += [unquote(p) for p in (parts.username, parts.password) if p]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def probe_bodies(http: HttpAuthConfig) -> tuple[dict[str, object], dict[str, object]]:
    """The auth and acl request bodies of the probe identity, in the configured style."""
    if http.style == "go-auth":
        return (
            {"username": PROBE_USER, "password": "", "clientid": PROBE_USER},
            {"username": PROBE_USER, "clientid": PROBE_USER, "topic": PROBE_TOPIC, "acc": 4},
        )
    return (
        {"username": PROBE_USER, "password": "", "clientId": PROBE_USER},
        {"username": PROBE_USER, "topic": PROBE_TOPIC, "action": "subscribe"},
    )


def probe_platform(http: HttpAuthConfig) -> int:
    """One request to each configured URL; prints a line per request and returns the exit code."""
    headers = httpx.Headers({"Content-Type": "application/json", "Accept": "application/json"})
    headers["User-Agent"] = f"mqtt-front/{__version__}"
    try:
        resolved = resolve_headers(http.headers)
        verify = ssl_context(http.ca_file)
    except ConfigError as exc:  # checked before; the environment may have changed since
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return EXIT_INVALID
    headers.update(resolved)
    secrets = _secrets(http, resolved)
    auth_body, acl_body = probe_bodies(http)
    targets = [("auth", http.auth_url, auth_body), *([("acl", http.acl_url, acl_body)] if http.acl_url else [])]
    results = []
    with httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(http.timeout),
        verify=verify,
        follow_redirects=False,
        trust_env=False,
    ) as client:
        for kind, url, body in targets:
            results.append(_probe_one(client, http, kind, url, body, secrets))
    for result in results:
        print(f"  {result.line}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(
            f"mqtt-front: the platform probe failed ({len(failed)} of {len(results)} requests): the broker would "
            "refuse logins (CONNACK 0x88 server unavailable / 0x03) and unchecked topics",
            file=sys.stderr,
        )
        return EXIT_PROBE_FAILED
    return EXIT_OK


def _probe_one(
    client: httpx.Client, http: HttpAuthConfig, kind: str, url: str, body: dict[str, object], secrets: list[str]
) -> ProbeResult:
    label = f"probe {kind}_url {redact_url(url)}:"
    started = time.perf_counter()
    try:
        response = client.post(url, content=json.dumps(body, separators=(",", ":")).encode())
    except httpx.TimeoutException:
        return ProbeResult(False, f"{label} FAILED: no answer within {http.timeout:g}s (timeout)")
    except (httpx.HTTPError, OSError) as exc:
        reason = _scrub(str(exc) or type(exc).__name__, secrets)
        return ProbeResult(False, f"{label} FAILED: unreachable ({type(exc).__name__}: {reason})")
    took = f"{(time.perf_counter() - started) * 1000:.1f} ms"
    status = response.status_code
    verdict, problem = (_read_go_auth if http.style == "go-auth" else _read_emqx)(kind, response)
    if problem is not None:
        return ProbeResult(False, f"{label} FAILED: HTTP {status} in {took}: {problem}")
    note = ""
    if verdict == "allow":
        note = f"; warning: it allows the unknown identity {PROBE_USER!r}" + (
            " with an empty password" if kind == "auth" else ""
        )
    return ProbeResult(True, f"{label} reachable, HTTP {status}, answer {verdict}, in {took}{note}")


def _read_emqx(kind: str, response: httpx.Response) -> tuple[str, str | None]:
    """(the answer, why the broker could not use it or None), as broker.auth.platform reads EMQX answers."""
    status = response.status_code
    if kind == "acl" and status == 204:
        return "allow", None
    if 300 <= status < 400:
        return "", "a redirect (the broker does not follow redirects): fix the URL"
    if status != 200:
        kind_of = "deny" if 400 <= status < 500 else "error"
        return "", (
            f"not EMQX's HTTP protocol (the broker reads it as {kind_of}: every request refused); "
            "check the URL and headers"
        )
    try:
        data = json.loads(response.content)
    except ValueError:
        return "", "the body is not JSON (the broker reads it as an error)"
    result = data.get("result") if isinstance(data, dict) else None
    if result not in ("allow", "deny", "ignore"):
        return "", "no \"result\" of allow, deny or ignore in the JSON (the broker reads it as an error)"
    return str(result), None


def _read_go_auth(kind: str, response: httpx.Response) -> tuple[str, str | None]:
    """As _read_emqx for mosquitto-go-auth's protocol: 2xx allow, 401/403 deny; anything else is suspicious."""
    status = response.status_code
    if 200 <= status < 300:
        return "allow", None
    if status in (401, 403):
        return "deny", None
    if 300 <= status < 400:
        return "", "a redirect (the broker does not follow redirects): fix the URL"
    if 400 <= status < 500:
        return "", "not a go-auth answer (the broker reads it as a deny: every request refused); check the URL"
    return "", "a server error (the broker reads it as an error: every request refused)"
