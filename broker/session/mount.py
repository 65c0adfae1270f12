"""Team mountpoints: the client sees topics relative to its team's space, the upstream sees them under it.

With a mountpoint ``M`` (``ff/v1/<team>/c/``, always ending in ``/``), a client topic ``t`` is
``M + t`` upstream, a filter ``f`` is ``M + f`` (``$share/<g>/<f>`` is ``$share/<g>/M + f``), and a
delivery on ``T`` reaches the client as ``T`` without ``M``, or not at all when ``T`` is not under
``M``. Pure functions; the session applies them on every path (publish, will, subscribe,
unsubscribe, response topic, delivery).
"""

from __future__ import annotations

from acl.topics import is_shared
from broker.mqtt.errors import ProtocolViolation

MAX_NAME = 65535  # bytes: an MQTT string, so the longest topic or filter the upstream can be sent


def mountpoint_problem(mount: str) -> str | None:
    """Why ``mount`` cannot be a mountpoint (it must be a topic prefix ending in "/"), or None."""
    if not mount.endswith("/"):
        return f"mountpoint {mount!r} must end with '/'"
    if "+" in mount or "#" in mount or "\x00" in mount or mount.startswith("$"):
        return f"mountpoint {mount!r} must be a plain topic prefix (no wildcards, not a $ topic)"
    return None


def mount_filter(mount: str, topic_filter: str) -> str:
    """The upstream filter of a client filter (its ``$share`` group stays in front)."""
    if is_shared(topic_filter):
        _, group, inner = topic_filter.split("/", 2)
        return f"$share/{group}/{mount}{inner}"
    return mount + topic_filter


def unmount_topic(mount: str, topic: str) -> str | None:
    """The client's view of an upstream topic: without the mountpoint; None when not strictly under it."""
    if len(topic) > len(mount) and topic.startswith(mount):
        return topic[len(mount) :]
    return None


def fits(name: str) -> bool:
    """Whether a mounted topic or filter is still an MQTT string (at most 65535 bytes of UTF-8)."""
    return len(name) <= MAX_NAME // 4 or len(name.encode()) <= MAX_NAME


def checked(name: str, reason: int) -> str:
    """A mounted topic or filter, unchanged; ``ProtocolViolation`` with ``reason`` when it does not fit.

    A client's name can be valid (up to 65535 bytes) and too long once the mountpoint is in front: it
    cannot be encoded upstream, and cutting it would change what it means.
    """
    if not fits(name):
        raise ProtocolViolation(f"topic or filter too long under the mountpoint ({len(name.encode())} bytes)", reason)
    return name
