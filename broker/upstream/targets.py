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
    _last_log: float = field(default=0.0, repr=False)

    def recently_failed(self, now: float) -> bool:
        if self.last_failure is None or now - self.last_failure > RETRY_AFTER:
            return False
        return self.last_ok is None or self.last_ok < self.last_failure


class UpstreamUnavailable(ConnectionError):
    """No upstream could be reached; the message has one reason per upstream tried."""
