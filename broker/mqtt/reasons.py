"""Reason codes: the one place each CONNACK, SUBACK, PUBACK and DISCONNECT code is named. No I/O.

MQTT 3.1.1 CONNACK return codes are their own small table; MQTT 5 reason codes share one
numbering (MQTT 5 section 2.4) but each packet allows only some of them, so each packet gets its
own enum with the codes the front broker sends or reads.
"""

from __future__ import annotations

from enum import IntEnum


class ConnackV3(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_CREDENTIALS = 0x04
    NOT_AUTHORIZED = 0x05


class ConnackV5(IntEnum):
    """MQTT 5 CONNACK reason codes (section 3.2.2.2) the front broker sends or reads."""

    SUCCESS = 0x00
    UNSPECIFIED = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    UNSUPPORTED_PROTOCOL = 0x84
    CLIENT_ID_INVALID = 0x85
    BAD_CREDENTIALS = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BAD_AUTH_METHOD = 0x8C
    TOPIC_NAME_INVALID = 0x90
    PACKET_TOO_LARGE = 0x95
    QUOTA_EXCEEDED = 0x97


class DisconnectReason(IntEnum):
    """MQTT 5 DISCONNECT reason codes (section 3.14.2.1) the front broker sends or reads."""

    NORMAL = 0x00
    WITH_WILL = 0x04
    UNSPECIFIED = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    NOT_AUTHORIZED = 0x87
    SERVER_SHUTTING_DOWN = 0x8B
    KEEP_ALIVE_TIMEOUT = 0x8D
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    MAXIMUM_CONNECT_TIME = 0xA0


class SubackReason(IntEnum):
    """SUBACK codes: granted QoS 0-2; 0x80 is MQTT 3.1.1's only failure code and MQTT 5's unspecified error."""

    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    FAILURE = 0x80
    NOT_AUTHORIZED = 0x87
    QUOTA_EXCEEDED = 0x97


class PubackReason(IntEnum):
    """MQTT 5 PUBACK / PUBREC reason codes the front broker sends."""

    SUCCESS = 0x00
    NOT_AUTHORIZED = 0x87
