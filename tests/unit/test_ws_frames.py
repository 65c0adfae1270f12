"""The WebSocket frame splitter alone (broker/edge/ws_frames.py): whole, partial and many frames, what it
hands to websockets' ServerProtocol and in which order, and that splitter plus library behave exactly as
the library alone, checked against the pinned websockets (on the wire: tests/e2e/test_websocket.py)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, Frame
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.version import version as websockets_version

from broker.edge.ws_frames import FrameSplitter, Handover, binary_frame

LIMIT = 1000
KEY = b"\x11\x22\x33\x44"


def frame(payload: bytes, first: int = 0x82, *, masked: bool = True, key: bytes = KEY) -> bytes:
    """A client frame: ``first`` is FIN/RSV/opcode (0x82: final binary)."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ping(payload: bytes = b"p") -> bytes:
    return frame(payload, 0x89)


def split(splitter: FrameSplitter, data: bytes) -> tuple[list[bytes], list[Handover]]:
    payloads = splitter.feed(data)
    return list(payloads), list(splitter.take_handovers())


# ---------------------------------------------------------------- the split


def test_whole_frame_is_unmasked_here() -> None:
    splitter = FrameSplitter(LIMIT)
    assert split(splitter, frame(b"\x30\x03\x00\x01a")) == ([b"\x30\x03\x00\x01a"], [])
    assert splitter.buffered == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 999, 1000])
def test_every_length_form(size: int) -> None:
    payload = bytes(range(256)) * 4
    splitter = FrameSplitter(LIMIT)
    assert split(splitter, frame(payload[:size])) == ([payload[:size]], [])


def test_64_bit_length() -> None:
    splitter = FrameSplitter(70_000)
    payload = b"z" * 65_536
    assert split(splitter, frame(payload)) == ([payload], [])


def test_many_frames_in_one_read_come_out_in_order() -> None:
    payloads = [bytes([i]) * (i * 7) for i in range(40)]
    splitter = FrameSplitter(LIMIT)
    out, handovers = split(splitter, b"".join(frame(p) for p in payloads))
    assert out == payloads and not handovers


@pytest.mark.parametrize("size", [5, 200, 1000])
def test_partial_frame_at_every_cut(size: int) -> None:
    """Header, mask or payload cut anywhere: nothing until the frame is whole, then exactly it."""
    data = frame(b"x" * size) + frame(b"next")
    for cut in range(1, len(data) - 1):
        splitter = FrameSplitter(LIMIT)
        first, handovers = split(splitter, data[:cut])
        second, more = split(splitter, data[cut:])
        assert not handovers and not more
        assert [*first, *second] == [b"x" * size, b"next"], cut
        assert splitter.buffered == 0


def test_large_frame_trickled_in_small_reads() -> None:
    payload = bytes(range(250)) * 4
    data = frame(payload)
    reads = [data[i : i + 7] for i in range(0, len(data), 7)]
    splitter = FrameSplitter(LIMIT)
    for i, read in enumerate(reads[:-1]):
        assert split(splitter, read) == ([], []), i
        assert splitter.buffered == 7 * (i + 1)
    assert split(splitter, reads[-1]) == ([payload], [])
    assert splitter.buffered == 0


# ---------------------------------------------------------------- what the library gets


def test_control_frames_go_to_the_library_in_their_place() -> None:
    splitter = FrameSplitter(LIMIT)
    stream = frame(b"a") + ping(b"1") + frame(b"b") + frame(b"c") + ping(b"2") + frame(b"pong", 0x8A)
    out, handovers = split(splitter, stream)
    assert out == [b"a", b"b", b"c"]
    assert handovers == [(1, ping(b"1")), (3, ping(b"2")), (3, frame(b"pong", 0x8A))]


def test_text_and_close_frames_go_to_the_library() -> None:
    splitter = FrameSplitter(LIMIT)
    text, close = frame(b"hello", 0x81), frame(b"\x03\xe8", 0x88)
    out, handovers = split(splitter, frame(b"a") + text + close)
    assert out == [b"a"] and handovers == [(1, text), (1, close)]


def test_a_fragmented_message_is_the_library_s_until_its_last_fragment() -> None:
    splitter = FrameSplitter(LIMIT)
    start, middle, inside, end = frame(b"1", 0x02), frame(b"2", 0x00), frame(b"3"), frame(b"4", 0x80)
    out, handovers = split(splitter, start + ping() + middle)
    assert not out and [raw for _, raw in handovers] == [start, ping(), middle]
    assert splitter.in_fragmented_message
    # A final binary frame inside a fragmented message is a protocol error: the library must see it.
    out, handovers = split(splitter, inside + end)
    assert not out and [raw for _, raw in handovers] == [inside, end]
    assert not splitter.in_fragmented_message
    assert split(splitter, frame(b"5")) == ([b"5"], [])


@pytest.mark.parametrize("first", [0xC2, 0x92, 0xA2, 0x83, 0x8B, 0x02 | 0x40])
def test_reserved_bits_and_opcodes_go_to_the_library(first: int) -> None:
    splitter = FrameSplitter(LIMIT)
    odd = frame(b"x", first)
    assert split(splitter, frame(b"a") + odd) == ([b"a"], [(1, odd)])


@pytest.mark.parametrize(
    "bad",
    [frame(b"y" * (LIMIT + 1)), frame(b"y" * 70_000), frame(b"unmasked", masked=False)],
    ids=["oversized-16", "oversized-64", "unmasked"],
)
def test_a_header_the_library_fails_on_is_handed_over_with_everything_after_it(bad: bytes) -> None:
    splitter = FrameSplitter(LIMIT)
    head = bad[:10]  # the header alone is enough to decide: no wait for the payload
    out, handovers = split(splitter, frame(b"a") + head)
    assert out == [b"a"] and handovers == [(1, head)]
    assert split(splitter, b"later") == ([], [(0, b"later")])


def test_binary_frame_round_trip() -> None:
    for size in (0, 125, 126, 65_535, 65_536):
        data = binary_frame(b"q" * size)
        reference = ServerProtocol(state=OPEN, max_size=None)
        client_side = bytearray(data)
        client_side[1] |= 0x80  # the same frame as a client would mask it (all-zero key)
        header = 2 + (0 if size < 126 else 2 if size < 65536 else 8)
        reference.receive_data(bytes(client_side[:header]) + b"\0\0\0\0" + bytes(client_side[header:]))
        [event] = _frames_received(reference)
        assert event.opcode is OP_BINARY and event.data == b"q" * size


# ---------------------------------------------------------------- the pinned websockets


def library_in_fragmented_message(ws: ServerProtocol) -> bool:
    """websockets' private parser state that the splitter keeps itself (read here, never in broker/)."""
    if not hasattr(ws, "cur_size"):
        pytest.fail(
            f"websockets {websockets_version}: ServerProtocol has no `cur_size` any more (later releases "
            "rename it `current_size`). broker/edge/ws_frames.py keeps this 'inside a fragmented message' bit "
            "itself and claims to agree with the library: re-read the new protocol.py (recv_frame, parse) and "
            "check that claim before updating this test and the pin in pyproject.toml."
        )
    return ws.cur_size is not None


def test_pinned_websockets_still_has_the_fragment_state_the_splitter_mirrors() -> None:
    ws = ServerProtocol(state=OPEN, max_size=LIMIT)
    assert not library_in_fragmented_message(ws)
    ws.receive_data(frame(b"1", 0x02))
    assert library_in_fragmented_message(ws)
    ws.receive_data(frame(b"2", 0x80))
    assert not library_in_fragmented_message(ws)


def test_the_guard_says_what_to_do_when_the_attribute_is_gone() -> None:
    renamed = ServerProtocol(state=OPEN, max_size=LIMIT)
    del renamed.cur_size  # what a websockets release with `current_size` looks like to the guard
    with pytest.raises(pytest.fail.Exception, match=r"no `cur_size` any more.*current_size"):
        library_in_fragmented_message(renamed)


def _frames_received(ws: ServerProtocol) -> list[Frame]:
    return [event for event in ws.events_received() if isinstance(event, Frame)]


def _library_alone(frames: Sequence[bytes]) -> tuple[bytes, bytes]:
    """What the library alone makes of the frames, given one by one: the binary bytes delivered (up to a
    text frame, a close frame or an error) and everything it sends back."""
    ws = ServerProtocol(state=OPEN, max_size=LIMIT)
    delivered = bytearray()
    for raw in frames:
        ws.receive_data(raw)
        for event in _frames_received(ws):
            if event.opcode is OP_TEXT or event.opcode is OP_CLOSE:
                return bytes(delivered), b"".join(ws.data_to_send())
            if event.opcode is OP_BINARY or event.opcode is OP_CONT:
                delivered += event.data
        if ws.state is not OPEN:
            break
    return bytes(delivered), b"".join(ws.data_to_send())


def _splitter_and_library(reads: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The same, the way broker/edge/websocket.py drives the two: payloads in place, the first refusal stops."""
    ws = ServerProtocol(state=OPEN, max_size=LIMIT)
    splitter = FrameSplitter(LIMIT)
    delivered = bytearray()
    for read in reads:
        payloads, handovers = split(splitter, read)
        done = 0
        for position, raw in handovers:
            delivered += b"".join(payloads[done:position])
            done = position
            ws.receive_data(raw)
            for event in _frames_received(ws):
                if event.opcode is OP_TEXT or event.opcode is OP_CLOSE:
                    return bytes(delivered), b"".join(ws.data_to_send())
                if event.opcode is OP_BINARY or event.opcode is OP_CONT:
                    delivered += event.data
            if ws.state is not OPEN:
                return bytes(delivered), b"".join(ws.data_to_send())
        delivered += b"".join(payloads[done:])
        assert splitter.in_fragmented_message == library_in_fragmented_message(ws)
    return bytes(delivered), b"".join(ws.data_to_send())


FRAMES = st.one_of(
    st.binary(max_size=300).map(frame),  # the fast path
    st.binary(max_size=3).map(lambda p: frame(p, 0x02)),  # a fragmented message starts
    st.binary(max_size=3).map(lambda p: frame(p, 0x00)),  # ... goes on
    st.binary(max_size=3).map(lambda p: frame(p, 0x80)),  # ... ends
    st.binary(max_size=5).map(ping),
    st.binary(max_size=5).map(lambda p: frame(p, 0x8A)),  # pong
    st.sampled_from(
        [
            frame(b"t", 0x81),  # text
            frame(b"t", 0x01),  # text fragment
            frame(b"\x03\xe8", 0x88),  # close
            frame(b"r", 0xC2),  # reserved bit
            frame(b"o", 0x83),  # reserved opcode
            frame(b"p" * 126, 0x89),  # control frame too long
            frame(b"p", 0x09),  # fragmented control frame
            frame(b"u", masked=False),
            frame(b"o" * (LIMIT + 1)),
            frame(b"f" * (LIMIT - 2), 0x00),  # a fragment within the frame limit, over the message limit
        ]
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(FRAMES, max_size=12), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_splitter_and_library_behave_as_the_library_alone(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    reads = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert _splitter_and_library(reads) == _library_alone(frames)
