"""MQTT topic-name and topic-filter grammar: the one place it is written down.

Both the wire format (``broker.mqtt.topics``, which turns a problem into a protocol error)
and the ACL engine (which treats an invalid topic as denied) use these functions, so they can
never disagree on what a filter or a shared subscription is. Pure functions, no I/O.

A shared subscription is ``$share/<group>/<filter>`` (MQTT 5 section 4.8.2: it starts with
``$share/``); a bare ``$share`` is an ordinary filter.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARE_PREFIX = "$share"


def topic_levels(topic: str) -> list[str] | None:
    """Levels of a valid topic name, or None when it is not one (empty, wildcards, U+0000)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return None
    return topic.split("/")


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` (not shared) is not a valid topic filter, or None when it is one."""
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "U+0000 in a topic filter"
    if "+" in topic_filter or "#" in topic_filter:
        levels = topic_filter.split("/")
        last = len(levels) - 1
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != last):
                return "'#' must be the whole last level of a filter"
            if "+" in level and level != "+":
                return "'+' must be a whole level of a filter"
    return None


def filter_levels(topic_filter: str) -> list[str] | None:
    """Levels of a valid (non-shared) topic filter, or None when it is malformed."""
    if filter_problem(topic_filter) is not None:
        return None
    return topic_filter.split("/")


@dataclass(frozen=True, slots=True)
class SharedFilter:
    group: str
    topic_filter: str


def is_shared(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARE_PREFIX + "/")


def shared_problem(topic_filter: str) -> str | None:
    """Why a ``$share/...`` filter is malformed (missing group or filter, wildcard in the group), or None."""
    parts = topic_filter.split("/", 2)
    if len(parts) != 3 or parts[0] != SHARE_PREFIX or not parts[1] or not parts[2]:
        return "malformed shared subscription"
    group = parts[1]
    if "+" in group or "#" in group or "\x00" in group:
        return "wildcard in a shared subscription group"
    return None


def parse_shared(topic_filter: str) -> SharedFilter | None:
    """Split `$share/<group>/<filter>`; None when malformed (missing group or filter, wildcard in group)."""
    if shared_problem(topic_filter) is not None:
        return None
    _, group, inner = topic_filter.split("/", 2)
    return SharedFilter(group, inner)
