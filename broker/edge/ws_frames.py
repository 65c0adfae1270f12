"""The WebSocket frame fast path, Sans-I/O: split client bytes into frames, unmask the common ones.

Owns the partial-frame buffer of one connection after its opening handshake, and the one-frame
serializer :func:`binary_frame` (server to client, no extension). Nearly every client frame is a
complete, masked, unfragmented binary frame: :class:`FrameSplitter` unmasks those itself (~0.6 us a
frame instead of ~4 us through websockets' generator parser) and hands every other frame (control,
text, fragments, reserved bits or opcodes) over *whole and in order* to websockets'
``ServerProtocol``, which decides every protocol error and close. A header announcing more than
``max_frame_size``, or an unmasked frame, is handed over with everything after it: the library
fails the connection on that header (1009, 1002), and from then on every byte is the library's.

It must not do I/O, import asyncio or drive ``ServerProtocol`` (the caller does: see
:meth:`FrameSplitter.feed`), and it reads no private state of the library. Instead of websockets'
private ``ServerProtocol.cur_size`` ("inside a fragmented message", renamed ``current_size`` in
later websockets) it keeps that one bit itself from the headers of the frames it hands over: the
library changes that state only on the data frames it is given and accepts (a text or binary frame
without FIN starts a message, a continuation with FIN ends it), and the caller stops feeding both
as soon as the library refuses a frame, so the two never disagree while frames still flow.
tests/unit/test_ws_frames.py checks this against the pinned websockets.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension is part of the wheels
    from websockets.utils import apply_mask

Handover = tuple[int, bytes]
"""``(position, raw)``: give ``raw`` to ``ServerProtocol.receive_data`` after the first ``position``
payloads that the same :meth:`FrameSplitter.feed` returned."""

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_BINARY_FIN = 0x82  # FIN, no reserved bit, opcode 2: the only first byte the fast path takes
_FIN = 0x80
_OP_CONT = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2

_NOTHING: tuple[()] = ()
_LIBRARY_ONLY = -1


def binary_frame(data: bytes) -> bytes:
    """One unmasked final binary frame (server to client, no extensions)."""
    n = len(data)
    if n < 126:
        return bytes((_BINARY_FIN, n)) + data
    if n < 65536:
        return _HEAD16.pack(_BINARY_FIN, 126, n) + data
    return _HEAD64.pack(_BINARY_FIN, 127, n) + data


class FrameSplitter:
    """Client bytes in; binary payloads and, in order, the frames for the library out.

    One per connection, fed from the first byte after the opening handshake, and only when no
    extension was negotiated (with permessage-deflate every frame is the library's). A partial frame waits here,
    at most ``max_frame_size + 14`` bytes; a frame whose size is known collects its reads and joins
    them once, so a large frame trickled in small reads is not re-copied on every read.
    """

    __slots__ = ("_fragmented", "_have", "_need", "_parts", "_pending", "handovers", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._pending = b""  # an incomplete frame header
        self._parts: list[bytes] = []  # the reads of an incomplete frame whose size is known
        self._have = 0
        # > 0: the size of that incomplete frame; _LIBRARY_ONLY: a header the library fails on was
        # handed over, every later byte is the library's; 0: neither (one check on the hot path).
        self._need = 0
        self._fragmented = False  # the library is inside a fragmented message
        self.handovers: Sequence[Handover] = _NOTHING
        """Read-only: non-empty when the last :meth:`feed` found frames for the library."""

    @property
    def in_fragmented_message(self) -> bool:
        """The library has been handed a message's first fragment and not yet its last."""
        return self._fragmented

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for the reads that complete it."""
        return len(self._pending) + self._have

    def feed(self, data: bytes) -> Sequence[bytes]:
        """Take one read; return the unmasked payloads of its complete masked unfragmented binary frames.

        In the common case that is all, and the caller delivers them (joined: one read, one delivery).
        When :attr:`handovers` is non-empty after the call, the read also held other complete frames:
        the caller must :meth:`take_handovers` before the next ``feed`` and, in order, deliver the
        payloads before each handover, give its bytes to ``ServerProtocol.receive_data`` and act on the
        events (a fragment's payload is delivered in its place), then deliver the payloads after the
        last one. It stops there, dropping the rest, as soon as the library refuses a frame or the
        connection closes; the splitter must not be fed after that.
        """
        if self._need:
            if self._need == _LIBRARY_ONLY:
                self.handovers = ((0, data),)
                return _NOTHING
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return _NOTHING
            data = b"".join(self._parts)
            self._parts, self._have, self._need = [], 0, 0
        buf = self._pending + data if self._pending else data
        self._pending = b""
        limit = self.max_frame_size
        fragmented = self._fragmented
        payloads: list[bytes] = []
        handovers: list[Handover] | None = None
        need = 0
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            head2 = buf[pos + 1]
            length = head2 & 0x7F
            start = pos + 2
            if length == 126:
                if n - start < 2:
                    break
                (length,) = _LEN16.unpack_from(buf, start)
                start += 2
            elif length == 127:
                if n - start < 8:
                    break
                (length,) = _LEN64.unpack_from(buf, start)
                start += 8
            if length > limit or not head2 & 0x80:
                if handovers is None:
                    handovers = []
                handovers.append((len(payloads), buf[pos:]))  # the library fails the connection
                self._need = _LIBRARY_ONLY
                pos = n
                break
            end = start + 4 + length
            if end > n:
                need = end - pos
                break
            head1 = buf[pos]
            if head1 == _BINARY_FIN and not fragmented:
                payloads.append(apply_mask(buf[start + 4 : end], buf[start : start + 4]))
            else:
                opcode = head1 & 0x0F
                if opcode == _OP_CONT:
                    if head1 & _FIN:
                        fragmented = False
                elif opcode in (_OP_BINARY, _OP_TEXT) and not head1 & _FIN:
                    fragmented = True
                self._fragmented = fragmented
                if handovers is None:
                    handovers = []
                handovers.append((len(payloads), buf[pos:end]))
            pos = end
        if pos < n:
            if need:
                self._parts = [buf[pos:]]
                self._have = n - pos
                self._need = need
            else:
                self._pending = buf[pos:]
        if handovers is not None:
            self.handovers = handovers
        return payloads

    def take_handovers(self) -> Sequence[Handover]:
        """The frames for the library that the last :meth:`feed` found, each with its position among
        that feed's payloads; cleared here. The caller must handle them as :meth:`feed` says."""
        handovers, self.handovers = self.handovers, _NOTHING
        return handovers
