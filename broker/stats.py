"""Per-session counters: plain integers on the hot path, read by metrics at scrape time."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Stats:
    msgs_in: int = 0  # PUBLISH client -> upstream (before ACL)
    bytes_in: int = 0
    msgs_out: int = 0  # PUBLISH upstream -> client (delivered)
    bytes_out: int = 0
    connects_ok: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    upstream_failures: int = 0
    denied_publish: int = 0
    denied_subscribe: int = 0
    denied_deliver: int = 0
    denied_will: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
