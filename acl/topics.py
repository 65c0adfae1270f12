"""MQTT topic-name and topic-filter syntax: validation, splitting, `$share` parsing."""

from __future__ import annotations

from dataclasses import dataclass

SHARE_PREFIX = "$share"


def topic_levels(topic: str) -> list[str] | None:
    """Levels of a valid topic name, or None when it is not one (empty, wildcards, U+0000)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return None
    return topic.split("/")


def filter_levels(topic_filter: str) -> list[str] | None:
    """Levels of a valid (non-shared) topic filter, or None when it is malformed."""
    if not topic_filter or "\x00" in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            if level == "#" and i != last:
                return None
        elif "+" in level or "#" in level:
            return None
    return levels


@dataclass(frozen=True, slots=True)
class SharedFilter:
    group: str
    topic_filter: str


def is_shared(topic_filter: str) -> bool:
    return topic_filter == SHARE_PREFIX or topic_filter.startswith(SHARE_PREFIX + "/")


def parse_shared(topic_filter: str) -> SharedFilter | None:
    """Split `$share/<group>/<filter>`; None when malformed (missing group or filter, wildcard in group)."""
    parts = topic_filter.split("/", 2)
    if len(parts) != 3 or parts[0] != SHARE_PREFIX:
        return None
    _, group, inner = parts
    if not group or not inner or "+" in group or "#" in group or "\x00" in group:
        return None
    return SharedFilter(group, inner)
