"""The incremental MQTT framer: cuts a byte stream into whole packets without copying them. No I/O.

It hands back one ``bytes`` chunk plus the end offset of each complete packet in it, so a
caller that only relays can forward whole runs of the original bytes.
"""

from __future__ import annotations

from broker.mqtt.errors import MalformedPacket, PacketTooLarge, ProtocolError

MQTT_MAX_PACKET = 268_435_455 + 5  # largest remaining length plus the fixed header


class Framer:
    """Cuts a byte stream into whole MQTT packets.

    ``feed`` returns ``(chunk, ends)``: ``chunk`` holds complete packets only and
    packet *i* spans ``chunk[ends[i-1]:ends[i]]`` (the first starts at 0). A packet over
    ``max_packet_size`` is refused from its fixed header, before its body is buffered.
    """

    __slots__ = ("_have", "_need", "_pending", "_rest", "error", "max_packet_size")

    def __init__(self, max_packet_size: int = MQTT_MAX_PACKET) -> None:
        self.max_packet_size = max_packet_size
        # An incomplete packet: its bytes so far, and (once its header is known) its full size.
        # Reads are collected in a list until it is complete, so a large packet trickled in
        # small reads is joined once, not copied again on every read.
        self._pending: list[bytes] = []
        self._have = 0
        self._need = 0
        self.error: ProtocolError | None = None
        self._rest = b""  # the bytes from the packet that raised ``error`` on (see take_pending)

    @property
    def buffered(self) -> int:
        return self._have

    def take_pending(self) -> bytes:
        """Hand back the bytes not yet cut into packets, leaving the framer empty.

        That includes a packet refused after good ones (``error``, then cleared): a CONNECT is framed with a
        smaller limit than the packets behind it, which are framed again once the limit is raised.
        """
        if self.error is not None:
            rest, self._rest, self.error = self._rest, b"", None
            return rest
        pending = b"".join(self._pending)
        self._pending, self._have, self._need = [], 0, 0
        return pending

    def feed(self, data: bytes) -> tuple[bytes, list[int]]:
        if self._pending:
            self._pending.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", []
            data = b"".join(self._pending)
            self._pending, self._have, self._need = [], 0, 0
        n = len(data)
        ends: list[int] = []
        pos = 0
        limit = self.max_packet_size
        try:
            while n - pos >= 2:
                b = data[pos + 1]
                if b < 0x80:
                    total = 2 + b
                else:
                    length = b & 0x7F
                    i = pos + 2
                    shift = 7
                    while True:
                        if i >= n:
                            total = -1  # length bytes still incomplete
                            break
                        b = data[i]
                        i += 1
                        length |= (b & 0x7F) << shift
                        if b < 0x80:
                            if b == 0:
                                # MQTT 5 section 1.5.5: the minimum number of bytes [MQTT-1.5.5-1].
                                raise MalformedPacket("remaining length not minimally encoded")
                            total = i - pos + length
                            break
                        if i - pos > 4:
                            raise MalformedPacket("remaining length longer than 4 bytes")
                        shift += 7
                    if total < 0:
                        break
                if total > limit:
                    raise PacketTooLarge(f"packet of {total} bytes exceeds the maximum of {limit}")
                if pos + total > n:
                    self._need = total
                    break
                pos += total
                ends.append(pos)
        except ProtocolError as exc:
            if not ends:
                raise
            # Hand out the good packets before the bad one; the caller raises `error` after them.
            self.error = exc
            self._rest = data[pos:]
            return data[:pos], ends
        if pos < n:
            rest = data[pos:]
            self._pending = [rest]
            self._have = len(rest)
            data = data[:pos]
        return data, ends


def body_start(buf: bytes, start: int) -> int:
    """Offset of the variable header of the packet that begins at ``start``."""
    i = start + 1
    while buf[i] & 0x80:
        i += 1
    return i + 1


