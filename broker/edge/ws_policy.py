"""The WebSocket listener's handshake policy, as pure functions over websockets' Request/Response.

Owns what a ``type: ws`` listener accepts before any MQTT byte flows: the path, the Host and
Origin allow-lists, the ``mqtt`` subprotocol, the ``/healthz`` answer, and the client address
behind trusted proxies (X-Forwarded-For). :class:`WsPolicy` is computed once per listener.

It must not do I/O, hold per-connection state or log: :mod:`broker.edge.websocket` asks these
functions and acts on their answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from broker.config import ListenerConfig

SUBPROTOCOLS: tuple[Subprotocol, ...] = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))
HEALTH_PATH = "/healthz"

# The answer to an HTTP request the library cannot parse (it would close without a word).
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\n\r\nBad Request\n"
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class WsPolicy:
    """What a ws listener accepts, normalised once per listener."""

    path: str = "/"
    allowed_origins: frozenset[str] | None = None
    allowed_hosts: frozenset[str] | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_frame_size: int = 1_048_576
    require_subprotocol: bool = True
    handshake_timeout: float = 10.0
    compression: bool = False

    @classmethod
    def from_listener(cls, listener: ListenerConfig) -> WsPolicy:
        return cls(
            path=listener.path,
            allowed_origins=None
            if listener.allowed_origins is None
            else frozenset(normalize_origin(o) for o in listener.allowed_origins),
            allowed_hosts=None
            if listener.allowed_hosts is None
            else frozenset(h.strip().lower() for h in listener.allowed_hosts),
            trusted_proxies=tuple(ipaddress.ip_network(n, strict=False) for n in listener.trusted_proxies),
            max_frame_size=listener.max_frame_size,
            require_subprotocol=listener.require_subprotocol,
            handshake_timeout=listener.handshake_timeout,
            compression=listener.compression,
        )


def normalize_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


def request_path(request: Request) -> str:
    """The request target without its query string."""
    return request.path.split("?", 1)[0]


def _single(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once (raises MultipleValuesError otherwise)."""
    return headers.get(name)


def _host_matches(host: str, allowed: frozenset[str]) -> bool:
    host = host.strip().lower()
    if host in allowed:
        return True
    # Compare without the port too: "mqtt.example.com:443" matches "mqtt.example.com".
    if host.startswith("["):  # [v6]:port
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in allowed


def screen_request(request: Request, policy: WsPolicy) -> tuple[int, str] | None:
    """Path, Host and Origin checks before the WebSocket handshake proper.

    Returns ``(status, reason)`` to refuse the request, ``None`` to go on with
    ``ServerProtocol.accept`` (which checks the upgrade headers and the subprotocol).
    """
    if request_path(request) != policy.path:
        return 404, "no WebSocket endpoint at this path"
    headers = request.headers
    try:
        host = _single(headers, "Host")
        origin = _single(headers, "Origin")
    except MultipleValuesError as exc:
        return 400, f"duplicate {exc} header"
    if policy.allowed_hosts is not None:
        if host is None:
            return 400, "missing Host header"
        if not _host_matches(host, policy.allowed_hosts):
            return 403, "host not allowed"
    # No Origin header: not a browser (browsers always send one on WebSocket requests).
    if (
        origin is not None
        and policy.allowed_origins is not None
        and normalize_origin(origin) not in policy.allowed_origins
    ):
        return 403, "origin not allowed"
    return None


def select_subprotocol(offered: Sequence[str], required: bool) -> Subprotocol | None:
    """``mqtt`` (or ``mqttv3.1``); none only when the listener does not require one.

    Raises NegotiationError (HTTP 400) when the client offers only other subprotocols,
    or none while one is required.
    """
    for candidate in SUBPROTOCOLS:
        if candidate in offered:
            return candidate
    if not offered and not required:
        return None
    raise NegotiationError("missing subprotocol" if not offered else "unsupported subprotocol; expected mqtt")


def _parse_ip(text: str) -> IPAddress | None:
    """An address from X-Forwarded-For: ``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:5678``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def forwarded_peer(peer: Any, forwarded_for: Sequence[str], trusted: tuple[IPNetwork, ...]) -> Any:
    """The client address: the TCP peer, or, when the TCP peer is a trusted proxy, the
    right-most address of X-Forwarded-For that is not itself a trusted proxy.

    Only hops appended by trusted proxies are believed; a client can put anything in the
    left part of the header. An unparsable hop stops the walk at the last trusted hop.
    """
    if not trusted or not forwarded_for or not isinstance(peer, tuple) or not peer:
        return peer
    current = _parse_ip(str(peer[0]))
    if current is None or not _trusted(current, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _parse_ip(hop)
        if address is None:
            break
        current = address
        if not _trusted(address, trusted):
            break
    if str(current) == str(peer[0]):
        return peer
    return (str(current), 0)


def health_response() -> Response:
    """The ``/healthz`` answer: 200 ``ok``; the caller sends it and lets the library close."""
    body = b"ok\n"
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(200, "OK", headers, body)
