"""PROXY protocol v1 and v2 headers (HAProxy's spec), Sans-I/O.

A load balancer that terminates nothing but TCP prepends one header to each connection
telling the real client address. :class:`ProxyHeaderParser` is fed bytes and answers
"need at least N more bytes", a parsed :class:`ProxyHeader`, or raises
:class:`ProxyProtocolError`. It never touches a socket; ``broker/proxy_transport.py`` is
the asyncio side.

Only the exact header bytes are ever asked for (:meth:`ProxyHeaderParser.wanted`), so a
reader that reads no more than that never takes bytes that belong to what follows (a TLS
ClientHello, an MQTT CONNECT).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the whole line, CRLF included (spec section 2.1)
V1_MIN = len(b"PROXY UNKNOWN\r\n")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
V2_MAX_LENGTH = 4096  # address block + TLVs; balancers send far less
V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM = 0x0, 0x1

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]  # v1 UNKNOWN is reported as LOCAL: use the real peer
    source: Address | None  # the client as the balancer saw it; None: use the connection's own peer
    destination: Address | None
    length: int  # header bytes consumed


class ProxyHeaderParser:
    """Incremental parser: ``feed`` bytes until it returns a header (or raises)."""

    __slots__ = ("_buf", "header")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once complete, else None. Raises ProxyProtocolError."""
        if self.header is not None:
            raise ProxyProtocolError("header already parsed")
        self._buf += data
        result = parse_header(bytes(self._buf))
        if isinstance(result, ProxyHeader):
            self.header = result
            return result
        return None

    @property
    def remainder(self) -> bytes:
        """Bytes fed after the end of the header (empty when reads follow :meth:`wanted`)."""
        if self.header is None:
            return b""
        return bytes(self._buf[self.header.length :])

    def wanted(self) -> int:
        """How many more bytes can be read without reading past the end of the header (>= 1)."""
        if self.header is not None:
            return 0
        result = parse_header(bytes(self._buf))
        assert isinstance(result, int)
        return result


def parse_header(data: bytes) -> ProxyHeader | int:
    """A complete header at the start of ``data``, or the number of bytes still needed at least.

    Raises ProxyProtocolError as soon as the bytes cannot begin a valid header.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return V1_MIN  # the shortest header of either version is at least this long
    raise ProxyProtocolError("no PROXY protocol header (connection does not start with 'PROXY ' or the v2 signature)")


# ---------------------------------------------------------------------------------- v1


def _parse_v1(data: bytes) -> ProxyHeader | int:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyProtocolError("v1: header does not start with 'PROXY '")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        line = data[:V1_MAX]
        bad = line.find(b"\n")
        cr = line.find(b"\r")
        if bad >= 0 or 0 <= cr < len(line) - 1:
            raise ProxyProtocolError("v1: stray CR or LF in the header line")
        if len(line) >= V1_MAX:
            raise ProxyProtocolError(f"v1: no CRLF within {V1_MAX} bytes")
        if any(b < 0x20 or b > 0x7E for b in line.rstrip(b"\r")):
            raise ProxyProtocolError("v1: non-printable byte in the header line")
        return _v1_wanted(line)
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("v1: stray CR or LF in the header line")
    length = end + 2
    if length < V1_MIN:
        raise ProxyProtocolError("v1: header line too short")
    fields = line.split(b" ")
    family = fields[1]
    if family == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "LOCAL", None, None, length)
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError("v1: expected 'PROXY TCPx src dst sport dport'")
    version = 4 if family == b"TCP4" else 6
    src = _v1_address(fields[2], version)
    dst = _v1_address(fields[3], version)
    sport = _v1_port(fields[4])
    dport = _v1_port(fields[5])
    return ProxyHeader(1, "PROXY", (src, sport), (dst, dport), length)


def _v1_wanted(line: bytes) -> int:
    """Fewest bytes that can complete a v1 header that starts with ``line`` (no CRLF yet)."""
    if line.endswith(b"\r"):
        return 1
    need = max(2, V1_MIN - len(line))
    parts = line.split(b" ")
    if len(parts) >= 3 and parts[1] in (b"TCP4", b"TCP6"):
        started = len(parts) - 2  # address/port fields begun so far (the last may be empty)
        if started > 4:
            raise ProxyProtocolError("v1: too many fields")
        current_empty = parts[-1] == b""
        # the current field needs >= 1 more byte if empty; each later field a space and >= 1 byte; then CRLF
        need = max(need, (1 if current_empty else 0) + (4 - started) * 2 + 2)
    elif len(parts) >= 2 and parts[1] and not any(f.startswith(parts[1]) for f in (b"UNKNOWN", b"TCP4", b"TCP6")):
        raise ProxyProtocolError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    return min(need, V1_MAX - len(line))


def _v1_address(text: bytes, version: int) -> str:
    if b"%" in text:  # ipaddress accepts IPv6 scope ids; the spec does not
        raise ProxyProtocolError("v1: invalid address")
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyProtocolError("v1: invalid address") from None
    if address.version != version:
        raise ProxyProtocolError(f"v1: address is not IPv{version}")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0:1] == b"0"):
        raise ProxyProtocolError("v1: invalid port")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("v1: port out of range")
    return port


# ---------------------------------------------------------------------------------- v2


def _parse_v2(data: bytes) -> ProxyHeader | int:
    sig = data[: len(V2_SIGNATURE)]
    if sig != V2_SIGNATURE[: len(sig)]:
        raise ProxyProtocolError("v2: bad signature")
    if len(data) < V2_FIXED:
        if len(data) > 12:
            _v2_check_fixed(data)
        return V2_FIXED - len(data)
    command, family, _proto, length = _v2_check_fixed(data)
    total = V2_FIXED + length
    if len(data) < total:
        return total - len(data)
    if command == _V2_LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        # LOCAL: a health check by the balancer itself; UNSPEC/UNIX: no usable address.
        # Either way the connection's own addresses are the ones to use; TLVs are skipped.
        return ProxyHeader(2, "LOCAL" if command == _V2_LOCAL else "PROXY", None, None, total)
    block = data[V2_FIXED:total]
    if family == _AF_INET:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", block)
        src = str(ipaddress.IPv4Address(src4))
        dst = str(ipaddress.IPv4Address(dst4))
    else:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", block)
        src = str(ipaddress.IPv6Address(src6))
        dst = str(ipaddress.IPv6Address(dst6))
    return ProxyHeader(2, "PROXY", (src, sport), (dst, dport), total)


def _v2_check_fixed(data: bytes) -> tuple[int, int, int, int]:
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("v2: version is not 2")
    command = ver_cmd & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError("v2: unknown command")
    if len(data) < 14:
        return command, -1, -1, -1
    family, proto = data[13] >> 4, data[13] & 0x0F
    if family > _AF_UNIX or proto > 0x2:
        raise ProxyProtocolError("v2: unknown address family or protocol")
    if command == _V2_PROXY and family in (_AF_INET, _AF_INET6) and proto != _PROTO_STREAM:
        raise ProxyProtocolError("v2: only TCP (STREAM) connections can be proxied here")
    if len(data) < V2_FIXED:
        return command, family, proto, -1
    (length,) = struct.unpack_from("!H", data, 14)
    if length > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"v2: header length {length} above {V2_MAX_LENGTH}")
    if command == _V2_PROXY and length < V2_ADDRESS_LENGTH.get(family, 0):
        raise ProxyProtocolError("v2: header length too short for its address family")
    return command, family, proto, length


# ---------------------------------------------------------------------------------- encoders


def encode_v1(source: Address | None, destination: Address | None = None) -> bytes:
    """A v1 header (``PROXY UNKNOWN`` when ``source`` is None)."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0]) if destination else ("0.0.0.0" if src.version == 4 else "::")
    dport = destination[1] if destination else 0
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {dport}\r\n".encode("ascii")


def encode_v2(source: Address | None, destination: Address | None = None, *, tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY with the addresses, or LOCAL when ``source`` is None."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20 | _V2_LOCAL, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    if src.version == 4:
        dst4 = ipaddress.IPv4Address(destination[0] if destination else "0.0.0.0")
        block = struct.pack("!4s4sHH", src.packed, dst4.packed, source[1], destination[1] if destination else 0)
        fam = (_AF_INET << 4) | _PROTO_STREAM
    else:
        dst6 = ipaddress.IPv6Address(destination[0] if destination else "::")
        block = struct.pack("!16s16sHH", src.packed, dst6.packed, source[1], destination[1] if destination else 0)
        fam = (_AF_INET6 << 4) | _PROTO_STREAM
    block += tlvs
    return V2_SIGNATURE + bytes([0x20 | _V2_PROXY, fam]) + struct.pack("!H", len(block)) + block
