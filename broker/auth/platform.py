"""The platform decides (``auth.http``): one keep-alive HTTP client that asks FlowFuse (or any service
speaking EMQX 5's HTTP authn/authz protocol, or mosquitto-go-auth's HTTP backend) who may connect and
which topics a client may use.

Owns: the requests and how their answers are read (fail closed: anything but a clear allow refuses),
the ACL decision cache (TTLs, a bound on entries, coalescing of concurrent misses), the concurrency
bound, and plain-integer counters (:class:`PlatformStats`) that ``broker.ops`` reads at scrape time.

Must not: retry or cache an authentication (one-time credentials are deleted by the platform after their
first successful check, so each CONNECT's password is sent exactly once), log a password, token or
payload, or import prometheus_client (the hot path counts integers).

The two styles, as the platform serves them (``../shared/flowfuse-reference.md``):

- ``emqx``: ``POST auth_url`` ``{"username","password","clientId"}``; allowed only on HTTP 200 with
  ``{"result": "allow"}`` (its ``is_superuser`` and string ``client_attrs`` are kept).
  ``POST acl_url`` ``{"username","topic","action"}`` with action ``publish`` or ``subscribe`` (a delivery
  check is a ``subscribe`` of the literal topic); allowed on ``{"result": "allow"}`` or HTTP 204.
- ``go-auth``: ``POST auth_url`` ``{"username","password","clientid"}`` and ``POST acl_url``
  ``{"username","clientid","topic","acc"}`` (acc 2 publish, 4 subscribe, 1 delivery); any 2xx allows.

Outcomes (:class:`PlatformVerdict` ``reason`` and the ``result`` counter label): ``allow``; ``deny`` for an
explicit deny/ignore or a 4xx; ``error`` for a 5xx, any other status, a body that is not the expected JSON,
or a connection/TLS failure; ``timeout`` when ``timeout`` seconds pass (waiting for a free request slot
included). Errors and timeouts are logged as ``platform_error`` at most once a second.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from acl.cache import oldest
from broker import __version__
from broker.auth.answers import Answer, read_emqx, read_go_auth
from broker.auth.http_client import PACE, HttpClient, HttpError, Response, SlotTimeout, Target
from broker.config import ConfigError, HttpAuthConfig
from broker.config import redact_url as _redact_url
from broker.logs import log_event

log = logging.getLogger("mqtt_front.auth.platform")

ACTIONS: Final = ("publish", "subscribe", "deliver")
KINDS: Final = ("auth", "acl")
RESULTS: Final = ("allow", "deny", "error", "timeout")
# Request latency buckets (seconds): a platform on the same host answers in a millisecond, one across
# a zone in tens, a struggling one in seconds (the default timeout is 5 s).
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_CACHE_ENTRIES: Final = 100_000
LOG_INTERVAL: Final = 1.0

_GO_AUTH_ACC: Final = {"publish": 2, "subscribe": 4, "deliver": 1}
_EMQX_ACTION: Final = {"publish": "publish", "subscribe": "subscribe", "deliver": "subscribe"}

CacheKey = tuple[str, str, str, str]  # (username or "", client id (go-auth) or "", wire action, topic)


@dataclass(frozen=True, slots=True)
class PlatformVerdict:
    """The platform's answer to one CONNECT."""

    ok: bool
    reason: str  # "allow" | "deny" | "error" | "timeout"
    superuser: bool = False
    client_attrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class PlatformStats:
    """Plain integers, read by the metrics collector at scrape time; never reset.

    ``requests[(kind, result)]``: outcomes of requests (a timeout while waiting for a free slot
    included). ``cache_hits``/``cache_misses``: ACL cache lookups (a coalesced wait is a miss and
    also counts in ``coalesced``). ``latency_counts[i]``: requests sent whose latency was at most
    ``LATENCY_BUCKETS[i]`` and above the previous bound; the last slot is above every bound.
    ``in_flight``: requests on the wire now.
    """

    requests: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(kind, result): 0 for kind in KINDS for result in RESULTS}
    )
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0
    in_flight: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1


def resolve_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``auth.http.headers`` with their values read: ``file:/path`` (its first line, stripped),
    ``env:NAME`` (that variable), anything else literal. A value that cannot be read, is empty,
    or holds a line break is a :class:`ConfigError` naming ``auth.http.headers.<name>``."""
    resolved: dict[str, str] = {}
    for name, spec in headers.items():
        where = f"auth.http.headers.{name}"
        if spec.startswith("file:"):
            path = Path(spec[5:])
            try:
                with path.open(encoding="utf-8") as f:
                    value = f.readline().strip()
            except (OSError, UnicodeDecodeError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"{where}: cannot read {path}: {detail}") from None
        elif spec.startswith("env:"):
            variable = spec[4:]
            if variable not in os.environ:
                raise ConfigError(f"{where}: environment variable {variable} is not set")
            value = os.environ[variable].strip()
        else:
            value = spec
        if not value:
            raise ConfigError(f"{where}: the value is empty")
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{where}: the value holds a line break")
        resolved[name] = value
    return resolved


def client_fingerprint(config: HttpAuthConfig, headers: Mapping[str, str] | None = None) -> tuple[object, ...]:
    """What a client built from ``config`` would send and trust: the config, the header values read from
    their files and variables, the CA file's bytes. A reload keeps the running client only when this is
    unchanged (a rotated token file must reach the platform). Raises ConfigError like :meth:`PlatformClient.start`."""
    resolved = resolve_headers(config.headers) if headers is None else headers
    ca = b""
    if config.ca_file is not None:
        try:
            ca = Path(config.ca_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"auth.http.ca_file: cannot read {config.ca_file}: {exc.strerror or exc}") from None
    return (config, tuple(sorted(resolved.items())), ca)


def redact_url(url: str) -> str:
    """A platform URL fit for logs: userinfo replaced by ``***``, query and fragment left out (they may carry
    tokens); :func:`broker.config.redact_url`, the helper every printed URL goes through."""
    return _redact_url(url, show_username=False)


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trust store, or only ``ca_file`` when set (a private platform CA)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"auth.http.ca_file: cannot load {ca_file}: {detail}") from None


class PlatformClient:
    """Asks the platform (``auth.http``). Call :meth:`start` before the first question, :meth:`close` at the end.

    ``clock`` (monotonic seconds) is for tests of the cache TTLs.
    """

    def __init__(
        self,
        config: HttpAuthConfig,
        *,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = PlatformStats()
        self._go_auth = config.style == "go-auth"
        self._max_entries = max(1, max_cache_entries)
        self._clock = clock
        self._client: HttpClient | None = None
        self.fingerprint: tuple[object, ...] = ()  # set by start(): see client_fingerprint
        self._targets = {"auth": Target.parse(config.auth_url)}
        if config.acl_url:
            self._targets["acl"] = Target.parse(config.acl_url)
        # Insertion-ordered: the first entry is the oldest (evicted first when full).
        self._cache: dict[CacheKey, tuple[float, bool]] = {}
        self._by_user: dict[str, set[CacheKey]] = {}
        self._pending: dict[CacheKey, asyncio.Future[str]] = {}  # the answer a miss of this key waits for
        self._urls = {"auth": redact_url(config.auth_url), "acl": redact_url(config.acl_url or "")}
        # platform_error lines: when the last was logged and how many were left out since, per channel
        # (a 4xx read as a deny has its own, so that a backend denying with 401 cannot hide an outage's lines).
        self._last_log = {False: -LOG_INTERVAL, True: -LOG_INTERVAL}
        self._suppressed = {False: 0, True: 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the headers, load the CA, open the connection pool. Raises :class:`ConfigError`."""
        if self._client is not None:
            return
        cfg = self.config
        defaults = {
            "content-type": "application/json",
            "accept": "application/json",
            "user-agent": f"mqtt-front/{__version__}",
        }
        configured = resolve_headers(cfg.headers)
        self.fingerprint = client_fingerprint(cfg, configured)
        names = {name.lower() for name in configured}  # a configured header replaces a default, any case
        headers = [(k, v) for k, v in defaults.items() if k not in names] + list(configured.items())
        needs_tls = cfg.ca_file is not None or any(t.origin[0] == "https" for t in self._targets.values())
        # No proxy or CA bundle from the environment: the config says where and whom to trust.
        try:
            self._client = HttpClient(
                max_in_flight=cfg.max_concurrency,
                timeout=cfg.timeout,
                ssl_context=ssl_context(cfg.ca_file) if needs_tls else None,
                headers=headers,
                meter=self.stats,
            )
        except ValueError as exc:
            raise ConfigError(f"auth.http.headers: {exc}") from None

    async def close(self) -> None:
        """Refuse the ACL checks waiting for an answer and close the pool. Later questions are refused ("error")."""
        pending = list(self._pending.values())
        self._pending.clear()
        for shared in pending:
            if not shared.done():
                shared.set_result("error")
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- authentication -------------------------------------------------------------------

    async def authenticate(self, username: str | None, password: bytes | None, client_id: str) -> PlatformVerdict:
        """Ask the platform once whether this CONNECT may log in.

        Exactly one request per call, never retried and never cached: the password may be a one-time
        credential, which the platform deletes after its first successful check. A missing username or
        password is sent as ``""``, as EMQX renders an undefined placeholder. A password that is not valid
        UTF-8 cannot be carried in a JSON string (EMQX cannot send it either): it is refused as
        ``deny`` without a request.
        """
        try:
            secret = (password or b"").decode("utf-8")
        except UnicodeDecodeError:
            return PlatformVerdict(False, "deny")
        body: dict[str, object] = {"username": username or "", "password": secret}
        body["clientid" if self._go_auth else "clientId"] = client_id
        answer = await self._request("auth", body)
        if answer.result != "allow":
            return PlatformVerdict(False, answer.result)
        if self._go_auth:
            return PlatformVerdict(True, "allow")
        data = answer.body
        attrs = data.get("client_attrs")
        client_attrs = (
            {k: v for k, v in attrs.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(attrs, dict)
            else {}
        )
        return PlatformVerdict(True, "allow", superuser=data.get("is_superuser") is True, client_attrs=client_attrs)

    # -- authorization --------------------------------------------------------------------

    def _key(self, username: str | None, client_id: str, action: str, topic: str) -> CacheKey:
        if action not in _GO_AUTH_ACC:
            raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
        if self._go_auth:
            return (username or "", client_id, str(_GO_AUTH_ACC[action]), topic)
        # A delivery check sends the same request as a subscribe of that literal topic: one entry for both.
        return (username or "", "", _EMQX_ACTION[action], topic)

    def cached(self, username: str | None, client_id: str, action: str, topic: str) -> bool | None:
        """The cached decision for this check, or None when unknown or expired (then call :meth:`check`).

        A decision counts as a cache hit; None counts nothing (the :meth:`check` that follows counts the miss).
        ``action`` is ``publish``, ``subscribe`` or ``deliver``.
        """
        decision = self._lookup(self._key(username, client_id, action, topic))
        if decision is not None:
            self.stats.cache_hits += 1
        return decision

    def expires(self, username: str | None, client_id: str, action: str, topic: str) -> float:
        """When the cached decision for this check stops being reused (on :meth:`now`'s clock); now when none is.

        Counts nothing. A session that keeps allowed topics of its own (its fast paths) must drop them then.
        """
        entry = self._cache.get(self._key(username, client_id, action, topic))
        return entry[0] if entry is not None else self._clock()

    def now(self) -> float:
        """The clock the cache's expiry times are on."""
        return self._clock()

    async def check(self, username: str | None, client_id: str, action: str, topic: str) -> bool:
        """May this client ``action`` (publish, subscribe, deliver) ``topic``? Cached decisions first.

        Concurrent misses of one key share one request. An allow is cached ``cache_ttl`` seconds, a deny
        ``negative_cache_ttl``; an error or timeout refuses and is not cached (the next check asks again).
        Cancelling a caller does not cancel the shared request.
        """
        return await self.answer(username, client_id, action, topic) == "allow"

    async def answer(self, username: str | None, client_id: str, action: str, topic: str) -> str:
        """As :meth:`check`, but the outcome itself: ``allow``, ``deny``, ``error`` or ``timeout`` (a caller that
        must tell a refusal from a platform that did not answer, such as the periodic re-check)."""
        answer = self.answer_soon(username, client_id, action, topic)
        if isinstance(answer, str):
            return answer
        return await asyncio.shield(answer)  # a caller cancelled leaves the shared answer to the others

    def answer_soon(self, username: str | None, client_id: str, action: str, topic: str) -> str | asyncio.Future[str]:
        """As :meth:`answer` without a coroutine: the cached outcome, or the future of the request every waiter
        of this key shares (never cancel it; add a done callback). A cold delivery check takes this path."""
        key = self._key(username, client_id, action, topic)
        stats = self.stats
        decision = self._lookup(key)
        if decision is not None:
            stats.cache_hits += 1
            return "allow" if decision else "deny"
        stats.cache_misses += 1
        shared = self._pending.get(key)
        if shared is None:
            shared = self._ask(key, username, client_id, action, topic)
        else:
            stats.coalesced += 1
        return shared

    def forget(self, username: str) -> None:
        """Drop every cached decision of this identity; a request in flight for it is answered but not cached."""
        for key in self._by_user.pop(username, ()):
            self._cache.pop(key, None)
        for key in [key for key in self._pending if key[0] == username]:
            del self._pending[key]

    def busy(self) -> bool:
        """Requests on the wire or ACL checks waiting for an answer."""
        return bool(self._pending) or self.stats.in_flight > 0

    def cache_size(self) -> int:
        return len(self._cache)

    def _lookup(self, key: CacheKey) -> bool | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, decision = entry
        if self._clock() < expires:
            return decision
        self._drop(key)
        return None

    def _store(self, key: CacheKey, decision: bool) -> None:
        ttl = self.config.cache_ttl if decision else self.config.negative_cache_ttl
        if ttl <= 0:
            return
        cache = self._cache
        if key in cache:
            self._drop(key)
        elif len(cache) >= self._max_entries:
            for old in oldest(cache, max(1, self._max_entries // 16)):
                self._drop(old)
        cache[key] = (self._clock() + ttl, decision)
        self._by_user.setdefault(key[0], set()).add(key)

    def _drop(self, key: CacheKey) -> None:
        del self._cache[key]
        keys = self._by_user.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[key[0]]

    def _ask(self, key: CacheKey, username: str | None, client_id: str, action: str, topic: str) -> asyncio.Future[str]:
        """Send the ACL request for ``key``; the future every waiter of this key shares. Callbacks, no task:
        a cold delivery check is on the hot path of a busy subscriber."""
        shared: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[key] = shared
        body: dict[str, object]
        if self._go_auth:
            body = {"username": username or "", "clientid": client_id, "topic": topic, "acc": _GO_AUTH_ACC[action]}
        else:
            body = {"username": username or "", "topic": topic, "action": _EMQX_ACTION[action]}
        client, target = self._client, self._targets.get("acl")
        if client is None or target is None:
            self._failed("acl", "error", "not started" if client is None else "no acl_url")
            self._acl_answered(key, shared, Answer("error"))
            return shared
        # Its waiters resume held deliveries (a write each, then the next check): a loop turn of their own.
        posted = client.post(target, json.dumps(body, separators=(",", ":")).encode("ascii"), cost=PACE)
        posted.add_done_callback(lambda done: self._acl_answered(key, shared, self._outcome("acl", done)))
        return shared

    def _acl_answered(self, key: CacheKey, shared: asyncio.Future[str], answer: Answer) -> None:
        self.stats.requests[("acl", answer.result)] += 1
        decision = answer.result == "allow"
        # Not cached when forget() ran meanwhile (this is no longer the pending request) or on error/timeout.
        if self._pending.get(key) is shared:
            del self._pending[key]
            if answer.result in ("allow", "deny"):
                self._store(key, decision)
        if not shared.done():
            shared.set_result(answer.result)

    # -- one request ----------------------------------------------------------------------

    async def _request(self, kind: str, body: dict[str, object]) -> Answer:
        """Send one request (never retried) and read its answer; every failure is an answer, never raised."""
        client = self._client
        target = self._targets.get(kind)
        if client is None or target is None:
            answer = Answer("error")
            self._failed(kind, "error", "not started" if client is None else f"no {kind}_url")
        else:
            posted = client.post(target, json.dumps(body, separators=(",", ":")).encode("ascii"))
            # A cancelled login cancels only this future: sent, the request still finishes (and is timed);
            # still waiting for a slot, it is never sent (HttpClient._next).
            with contextlib.suppress(Exception):
                await posted
            answer = self._outcome(kind, posted) if posted.done() else Answer("error")
        self.stats.requests[(kind, answer.result)] += 1
        return answer

    def _outcome(self, kind: str, posted: asyncio.Future[Response]) -> Answer:
        """What a finished request says; failures are logged (rate-limited) and refuse."""
        exc = posted.exception() if not posted.cancelled() else HttpError("cancelled")
        if isinstance(exc, TimeoutError):
            self._failed(kind, "timeout", "no free request slot" if isinstance(exc, SlotTimeout) else str(exc))
            return Answer("timeout")
        if exc is not None:
            self._failed(kind, "error", str(exc) or type(exc).__name__)
            return Answer("error")
        response = posted.result()
        status = response.status
        answer = read_go_auth(status) if self._go_auth else read_emqx(kind, status, response.body)
        if answer.result == "error":
            self._failed(kind, "error", f"status {status}, unexpected answer")
        elif not self._go_auth and 400 <= status < 500:
            # EMQX's "ignore" (a deny here), but FlowFuse's v2 API always answers 200: a 4xx says that the
            # URL or its headers are wrong, which every client would otherwise only see as bad credentials.
            self._failed(kind, "status", f"status {status}, read as deny")
        return answer

    def _failed(self, kind: str, reason: str, detail: str) -> None:
        """Log a platform failure, at most once per LOG_INTERVAL; the lines left out are counted in the next."""
        now = time.monotonic()
        channel = reason == "status"
        if now - self._last_log[channel] < LOG_INTERVAL:
            self._suppressed[channel] += 1
            return
        self._last_log[channel] = now
        suppressed, self._suppressed[channel] = self._suppressed[channel], 0
        log_event(
            log,
            logging.WARNING,
            "platform_error",
            url=self._urls[kind],
            kind=kind,
            reason=reason,
            detail=detail,
            suppressed=suppressed or None,
        )
