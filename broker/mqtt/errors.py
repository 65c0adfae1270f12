"""Protocol errors raised by the wire format and the session logic.

Each carries the MQTT 5 reason code the front broker answers with (in a DISCONNECT
for v5 clients, or a CONNACK while the CONNECT is being handled; v3.1.1 clients just
see the connection closed).
"""

from __future__ import annotations

from broker.mqtt.reasons import ConnackV5, DisconnectReason


class ProtocolError(Exception):
    """Base class: the peer broke the protocol; the connection must be closed."""

    reason_code: int = DisconnectReason.PROTOCOL_ERROR

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code


class MalformedPacket(ProtocolError):
    reason_code = DisconnectReason.MALFORMED_PACKET


class ProtocolViolation(ProtocolError):
    reason_code = DisconnectReason.PROTOCOL_ERROR


class PacketTooLarge(ProtocolError):
    reason_code = DisconnectReason.PACKET_TOO_LARGE


class TopicAliasInvalid(ProtocolError):
    reason_code = DisconnectReason.TOPIC_ALIAS_INVALID


class UnsupportedProtocol(ProtocolError):
    """CONNECT with a protocol name/level the front broker does not serve.

    ``v5_format`` tells whether the refusal CONNACK uses the v5 layout (reason 0x84)
    or the v3 layout (return code 0x01).
    """

    def __init__(self, message: str, v5_format: bool) -> None:
        super().__init__(message, ConnackV5.UNSUPPORTED_PROTOCOL)
        self.v5_format = v5_format
