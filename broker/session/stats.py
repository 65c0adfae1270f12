"""Per-session counters: plain integers on the hot path, read by metrics at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field

# Connect results (``Stats.connect_result``), also the label values of mqtt_front_connect_attempts_total.
CONNECT_RESULTS = (
    "ok",
    "bad_credentials",
    "not_authorized",
    "protocol_error",
    "upstream_unavailable",
    "auth_unavailable",
    "limit",
)


# Limits that can bite (``Stats.limit_hits`` keys, the label values of mqtt_front_limit_hits_total).
LIMIT_NAMES = (
    "connect_size",
    "packet_size",
    "user_properties",
    "user_property_bytes",
    "filters",
    "topic_length",
    "topic_levels",
    "alias_topic_length",
    "work_budget",
    "publish_rate",
    "connect_rate",
    "max_connections",
)


def _per_type() -> list[int]:
    return [0] * 16  # indexed by MQTT packet type (first byte >> 4)


@dataclass(slots=True)
class Stats:
    msgs_in: int = 0  # PUBLISH client -> upstream (before ACL)
    bytes_in: int = 0
    msgs_out: int = 0  # PUBLISH upstream -> client (delivered)
    bytes_out: int = 0  # bytes of the delivered PUBLISH packets
    connects_ok: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    upstream_failures: int = 0
    denied_connect: int = 0  # credentials refused, or an id the identity may not use
    denied_publish: int = 0
    denied_subscribe: int = 0
    denied_deliver: int = 0
    denied_will: int = 0
    # Packets by type, each direction, counted as they are parsed (list element increments).
    packets_in: list[int] = field(default_factory=_per_type)  # from the client
    packets_out: list[int] = field(default_factory=_per_type)  # from the upstream
    # How the CONNECT ended, set once: one of CONNECT_RESULTS, "" while undecided.
    connect_result: str = ""
    # Times a limit bit (mqtt_front_limit_hits_total), by limit name: see broker.mqtt.limits and limits.* keys.
    limit_hits: dict[str, int] = field(default_factory=dict)

    def limit_hit(self, limit: str) -> None:
        hits = self.limit_hits
        hits[limit] = hits.get(limit, 0) + 1
