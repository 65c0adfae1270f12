"""Work budgets of the decoder: how many items one packet may make it build. No I/O.

Every item a packet carries (a User Property, a SUBSCRIBE filter) costs Python objects and a few
microseconds to decode; a 1 MiB packet of 200,000 empty User Properties costs half a second of
event-loop time. The decoder stops at the first item over these caps and raises
:class:`LimitExceeded`, so the cost of any packet is bounded by its caps, not by its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.mqtt.errors import ProtocolError
from broker.mqtt.reasons import DisconnectReason


class LimitExceeded(ProtocolError):
    """A packet went over one of the front broker's work budgets (v5: Quota exceeded, 0x97, unless said).

    ``limit`` names the limit (the ``limits.*`` key without ``max_``), for the log and the metric.
    """

    reason_code = DisconnectReason.QUOTA_EXCEEDED

    def __init__(self, limit: str, message: str, reason_code: int | None = None) -> None:
        super().__init__(message, reason_code)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    user_properties: int = 64  # User Properties in one packet (will properties count on their own)
    user_property_bytes: int = 16_384  # their keys and values together, in bytes
    filters: int = 100  # topic filters in one SUBSCRIBE or UNSUBSCRIBE
    topic_length: int = 4_096  # bytes of a topic name or filter
    topic_levels: int = 64  # levels of a topic name or filter ("a/b/c" has 3)

    def check_topic(self, topic: str, what: str, reason_code: int) -> None:
        """Raise LimitExceeded (with ``reason_code``) when ``topic`` is longer or deeper than allowed."""
        n = len(topic)  # characters: at most the bytes, and at least a quarter of them
        if n > self.topic_length or (n * 4 > self.topic_length and len(topic.encode()) > self.topic_length):
            raise LimitExceeded("topic_length", f"{what} longer than {self.topic_length} bytes", reason_code)
        if topic.count("/") >= self.topic_levels:
            raise LimitExceeded("topic_levels", f"{what} deeper than {self.topic_levels} levels", reason_code)


UNLIMITED = DecodeLimits(1 << 30, 1 << 30, 1 << 30, 1 << 30, 1 << 30)
"""No caps beyond the protocol's own: for what the upstream sends (it is trusted with its framing)."""
