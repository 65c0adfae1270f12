"""What the front broker knows about each internal broker it may connect to."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

# An upstream that failed this recently (and has not worked since) is tried after the others.
RETRY_AFTER = 5.0


@dataclass(eq=False)
class UpstreamTarget:
    """One internal broker address and what is known about it."""

    url: str
    host: str
    port: int
    tls: bool = False
    server_hostname: str | None = None  # TLS: the name verified and sent as SNI
    open: int = 0
    failures: int = 0
    last_ok: float | None = None  # time.monotonic() of the last successful connect
    last_failure: float | None = None
    last_latency: float | None = None  # seconds, TCP connect + TLS handshake
    handshakes: int = 0  # TLS handshakes completed ...
    resumed: int = 0  # ... of which resumed a previous session
    session: ssl.SSLSession | None = field(default=None, repr=False)  # the last good one, to resume
    retrying: int = 0  # attempts under way while it is failing (see recently_failed)
    # It accepted connections but did not answer CONNECT (hung): a TCP connect proves nothing then; only
    # a byte from it does (UpstreamConnector.answered). probing: one connection is finding out.
    silent: bool = False
    probing: bool = False
    _last_log: float = field(default=0.0, repr=False)

    def failing(self) -> bool:
        """Its last attempt failed (it has not worked since)."""
        return self.last_failure is not None and (self.last_ok is None or self.last_ok < self.last_failure)

    def recently_failed(self, now: float) -> bool:
        """Tried after the others: it failed within RETRY_AFTER, or it is failing and an attempt to retry it is
        under way. One connection at a time finds out whether it is back: an upstream that does not answer
        at all (a vanished host) costs that one connection the connect timeout, not every concurrent one."""
        if self.last_failure is None or not self.failing():
            return False
        return now - self.last_failure <= RETRY_AFTER or self.retrying > 0 or self.probing


class UpstreamUnavailable(ConnectionError):
    """No upstream could be reached; the message has one reason per upstream tried."""
