"""Protocol errors raised by the codec and the session logic.

Each carries the MQTT 5 reason code the front broker answers with (in a DISCONNECT
for v5 clients; v3.1.1 clients just see the connection closed).
"""


class ProtocolError(Exception):
    """Base class: the peer broke the protocol; the connection must be closed."""

    reason_code = 0x82

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code


class MalformedPacket(ProtocolError):
    reason_code = 0x81


class ProtocolViolation(ProtocolError):
    reason_code = 0x82


class PacketTooLarge(ProtocolError):
    reason_code = 0x95


class TopicAliasInvalid(ProtocolError):
    reason_code = 0x94
