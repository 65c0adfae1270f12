"""Connections to the internal broker, one per accepted client.

An :class:`UpstreamConnector` knows one or more upstreams (``upstream.url`` / ``upstream.urls``),
tries them in order (``failover``) or in turn (``round_robin``) with a connect timeout each (one that
failed is tried last for ``RETRY_AFTER`` seconds, then retried by one connection at a time), and
speaks plain TCP (``mqtt://``) or TLS with session resumption (``mqtts://``, see
:mod:`broker.upstream.tls_client`). When none answers, the caller refuses the client with CONNACK
"server unavailable".

For metrics: ``open``, ``failures`` and ``last_ok`` on the connector (all upstreams) and on each
:class:`UpstreamTarget`; ``on_connect(target, seconds)`` and ``on_failure(target, reason)`` hooks
are called for every successful / failed attempt (TCP connect plus TLS handshake).

It must not know the client side: the caller's :data:`TargetProtocolFactory` makes the protocol
that reads the upstream, and the caller decides what a refusal tells the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence

from broker.config import UpstreamConfig
from broker.logs import log_event
from broker.upstream.protocol import UpstreamConnection, UpstreamSink
from broker.upstream.targets import UpstreamTarget, UpstreamUnavailable
from broker.upstream.tls_client import TlsClient, TlsStream
from broker.upstream.tls_config import build_context, describe_tls_error

log = logging.getLogger("mqtt_front.upstream")

TargetProtocolFactory = Callable[[UpstreamTarget], asyncio.BaseProtocol]
"""What :meth:`UpstreamConnector.open_connection` calls for the target it connects to (not asyncio's
zero-argument protocol factory, which is :data:`broker.relay.ProtocolFactory`)."""


class UpstreamConnector:
    def __init__(
        self,
        targets: Sequence[UpstreamTarget],
        connect_timeout: float,
        label: str,
        *,
        context: ssl.SSLContext | None = None,
        strategy: str = "failover",
        session_resumption: bool = True,
    ) -> None:
        if not targets:
            raise ValueError("no upstream")
        if any(t.tls for t in targets) and context is None:
            raise ValueError("TLS upstreams need an ssl.SSLContext")
        self.targets = list(targets)
        self.connect_timeout = connect_timeout
        self.label = label
        self.context = context
        self.strategy = strategy
        self.session_resumption = session_resumption
        self.open = 0
        self.last_ok: float | None = None
        self.failures = 0  # clients refused because no upstream answered
        self.on_connect: Callable[[UpstreamTarget, float], None] | None = None
        self.on_failure: Callable[[UpstreamTarget, str], None] | None = None
        self._next = 0
        self._last_failure_log = 0.0
        # Compatibility: the first upstream's address.
        self.host = self.targets[0].host
        self.port = self.targets[0].port

    @classmethod
    def single(cls, host: str, port: int, connect_timeout: float, label: str) -> UpstreamConnector:
        return cls([UpstreamTarget(label, host, port)], connect_timeout, label)

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> UpstreamConnector:
        """Raises ConfigError (naming the key) when the TLS files do not load."""
        tls = config.tls
        context = build_context(tls) if config.uses_tls else None
        if config.uses_tls and tls is not None and not tls.verify:
            log.warning(
                "SECURITY WARNING: upstream.tls.verify is false: the upstream's certificate is NOT verified; "
                "anyone on the network path can impersonate the internal broker and read all traffic"
            )
        targets = [
            UpstreamTarget(
                url,
                host,
                port,
                tls=config.uses_tls,
                server_hostname=(tls.server_hostname if tls and tls.server_hostname else host),
            )
            for url, host, port in config.endpoints
        ]
        label = ", ".join(config.all_urls)
        if len(targets) > 1:
            label += f" ({config.strategy})"
        return cls(
            targets,
            config.connect_timeout,
            label,
            context=context,
            strategy=config.strategy,
            session_resumption=tls.session_resumption if tls else True,
        )

    # ------------------------------------------------------------------ connecting

    def replace_context(self, context: ssl.SSLContext) -> None:
        """upstream.tls files read again (a reload): new connections use ``context``; open ones keep theirs.
        Saved TLS sessions belong to the old context (the ssl module refuses to resume them with another)."""
        self.context = context
        for target in self.targets:
            target.session = None

    def order(self) -> list[UpstreamTarget]:
        """The upstreams in the order to try for the next connection."""
        targets = self.targets
        if self.strategy == "round_robin" and len(targets) > 1:
            start = self._next
            self._next = (start + 1) % len(targets)
            targets = targets[start:] + targets[:start]
        now = time.monotonic()
        return sorted(targets, key=lambda t: t.recently_failed(now))  # stable: keeps the order otherwise

    async def connect(self, client: UpstreamSink) -> asyncio.Transport:
        """A transport to an upstream whose protocol feeds ``client``; UpstreamUnavailable if none."""
        transport, _ = await self.open_connection(lambda target: UpstreamConnection(client, self, target))
        return transport

    async def open_connection(self, factory: TargetProtocolFactory) -> tuple[asyncio.Transport, UpstreamTarget]:
        reasons: list[str] = []
        order = self.order()
        for i, target in enumerate(order):
            started = time.monotonic()
            retry = target.failing()  # while this attempt runs, other connections try the others first
            target.retrying += int(retry)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    transport = await self._attempt(target, factory)
            except Exception as exc:
                reason = self._describe(exc)
                reasons.append(f"{target.url}: {reason}")
                self._target_failed(target, reason, more=i + 1 < len(order))
                continue
            finally:
                target.retrying -= int(retry)
            now = time.monotonic()
            if target.silent:  # a hung node accepts connections: this one is its probe until it answers
                target.probing = True
            else:
                target.last_ok = self.last_ok = now  # (a connect to a hung node proves nothing: /readyz)
            target.last_latency = now - started
            if self.on_connect is not None:
                self.on_connect(target, now - started)
            return transport, target
        raise UpstreamUnavailable("; ".join(reasons))

    async def _attempt(self, target: UpstreamTarget, factory: TargetProtocolFactory) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        app = factory(target)
        if not target.tls:
            transport, _ = await loop.create_connection(lambda: app, target.host, target.port)
            return transport
        assert self.context is not None
        session = target.session if self.session_resumption else None
        tls = TlsClient(self.context, target.server_hostname, session)

        def keep_session(new: ssl.SSLSession) -> None:
            target.session = new

        def post_handshake_error(exc: BaseException) -> None:
            target.session = None
            self._target_failed(target, describe_tls_error(exc), more=False)

        stream = TlsStream(
            tls, app, on_session=keep_session if self.session_resumption else None, on_error=post_handshake_error
        )
        try:
            await loop.create_connection(lambda: stream, target.host, target.port)
            await stream.handshake
        except BaseException as exc:
            stream.abort()
            if isinstance(exc, Exception):
                target.session = None  # a failing upstream may have new keys or certificates
            raise
        target.handshakes += 1
        if tls.session_reused:
            target.resumed += 1
        return stream

    @staticmethod
    def _describe(exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return "timed out"
        if isinstance(exc, ssl.SSLError):
            return describe_tls_error(exc)
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno).lower()  # "connection refused", not asyncio's "Connect call failed"
        return str(exc) or type(exc).__name__

    def _target_failed(self, target: UpstreamTarget, reason: str, *, more: bool) -> None:
        now = time.monotonic()
        target.failures += 1
        target.last_failure = now
        if self.on_failure is not None:
            self.on_failure(target, reason)
        # One line per second and upstream at most: a down upstream must not flood the log.
        if now - target._last_log >= 1.0:
            target._last_log = now
            log_event(
                log,
                logging.ERROR,
                "upstream_error",
                upstream=target.url,
                reason=reason,
                failures=target.failures,
                next="trying the next upstream" if more else None,
            )

    def failed(self, exc: BaseException) -> None:
        """A client was refused because ``connect`` raised ``exc``."""
        self.failures += 1
        if isinstance(exc, UpstreamUnavailable):
            if len(self.targets) > 1:
                now = time.monotonic()
                if now - self._last_failure_log >= 1.0:
                    self._last_failure_log = now
                    log_event(
                        log, logging.ERROR, "upstream_error", reason="no upstream available", refused=self.failures
                    )
            return  # each upstream's reason is logged already
        now = time.monotonic()
        if now - self._last_failure_log >= 1.0:
            self._last_failure_log = now
            reason = self._describe(exc)
            log_event(log, logging.ERROR, "upstream_error", upstream=self.label, reason=reason, failures=self.failures)

    def opened(self, target: UpstreamTarget) -> None:
        target.open += 1
        self.open += 1

    def answered(self, target: UpstreamTarget) -> None:
        """The first byte from the upstream on a connection: a node marked hung works again."""
        if target.silent:
            target.silent = target.probing = False
            target.last_ok = self.last_ok = time.monotonic()

    def closed(self, target: UpstreamTarget, silent_for: float | None = None) -> None:
        target.open -= 1
        self.open -= 1
        if silent_for is not None:
            target.probing = False  # the probe ended without an answer (failed below, or its client left)
        # A broker that accepts connections but never answers CONNECT (hung) is as down as one that refuses
        # them: a connection that stayed silent for the whole CONNACK timeout counts as its failure, so the
        # next clients try the other upstreams first (and its metrics and log say so).
        if silent_for is not None and silent_for >= self.connect_timeout * 0.9:
            target.silent = True
            self._target_failed(target, f"no CONNACK within {self.connect_timeout:g}s", more=False)
