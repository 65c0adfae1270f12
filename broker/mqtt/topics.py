"""Topic names and filters as the wire format checks them: a problem is a protocol error. No I/O.

The grammar itself is :mod:`acl.topics` (shared with the ACL engine, so both agree on every
filter, ``$share`` included); this module only turns its answers into ``ProtocolViolation``.
"""

from __future__ import annotations

from acl.topics import filter_problem, is_shared, shared_problem
from broker.mqtt.errors import ProtocolViolation


def validate_topic_name(topic: str) -> None:
    """A PUBLISH or will topic (emptiness and U+0000 are checked where the string is read)."""
    if "+" in topic or "#" in topic:
        raise ProtocolViolation("wildcard in a PUBLISH topic")


def validate_topic_filter(filt: str) -> None:
    problem = filter_problem(filt)
    if problem is not None:
        raise ProtocolViolation(problem)


def split_shared(filt: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> (group, filter); other filters -> (None, filter)."""
    if not is_shared(filt):
        return None, filt
    problem = shared_problem(filt)
    if problem is not None:
        raise ProtocolViolation(problem)
    _, group, inner = filt.split("/", 2)
    return group, inner
