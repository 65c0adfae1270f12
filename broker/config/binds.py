"""The addresses the configuration listens on (every listener, ``metrics.bind``, ``admin.bind``) and which of
them overlap.

Two binds overlap on the same port (not 0: a free port each) when they share an address, or when one is the
wildcard of the other's family: ``0.0.0.0`` takes every IPv4 address, ``::`` every IPv6 one (asyncio binds
IPv6 sockets IPv6-only, so ``::`` and ``0.0.0.0`` do not overlap). One of the two would fail to bind at
start, or with ``--workers`` (SO_REUSEPORT) both would bind and the kernel would split the connections
between them.

:func:`literal_overlap` needs no name service (IP literals; names compared as written): the configuration
validator refuses what it finds. :func:`resolved_overlap` resolves names first (``getaddrinfo``), for
``mqtt-front check``, and says which names do not resolve.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.config.base import ConfigError, parse_hostport
from broker.config.network import ListenerConfig

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Bind:
    key: str  # listeners.0.bind, metrics.bind, admin.bind
    value: str  # as written
    host: str
    port: int


def config_binds(listeners: Sequence[ListenerConfig], metrics: str | None, admin: str | None) -> list[Bind]:
    """Every bind of the configuration, in the order of the file, with its key."""
    named = [(f"listeners.{i}.bind", item.bind) for i, item in enumerate(listeners)]
    named += [(key, value) for key, value in (("metrics.bind", metrics), ("admin.bind", admin)) if value is not None]
    return [Bind(key, value, *parse_hostport(value)) for key, value in named]


def _literal(host: str) -> list[Address] | None:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return None  # a name: only the name service knows


def resolve(host: str, port: int) -> list[Address]:
    """The addresses ``host`` binds (as asyncio's ``create_server`` would); OSError (``socket.gaierror``) when
    the name does not resolve."""
    found = _literal(host)
    if found is not None:
        return found
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return sorted({ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}, key=str)


def _why(a: Address, b: Address) -> str | None:
    if a.version != b.version:
        return None
    if a == b:
        return "the same address"
    for address in (a, b):
        if address.is_unspecified:
            return f"{address} is every IPv{address.version} address"
    return None


def _overlap(binds: Sequence[Bind], addresses: Callable[[Bind], list[Address] | None]) -> str | None:
    known = [(bind, addresses(bind)) for bind in binds]
    for i, (later, later_addresses) in enumerate(known):
        for earlier, earlier_addresses in known[:i]:
            if later.port == 0 or later.port != earlier.port:
                continue
            why: str | None = None
            if later_addresses is None or earlier_addresses is None:
                if later.host.lower() == earlier.host.lower():
                    why = "the same address"
            else:
                why = next(
                    (w for a in later_addresses for b in earlier_addresses if (w := _why(a, b)) is not None), None
                )
            if why is not None:
                return f"{later.key} {later.value} overlaps {earlier.key} {earlier.value} ({why})"
    return None


def literal_overlap(binds: Sequence[Bind]) -> str | None:
    """The first overlap between ``binds`` that shows without resolving names, or None."""
    return _overlap(binds, lambda bind: _literal(bind.host))


def resolved_overlap(binds: Sequence[Bind]) -> tuple[dict[str, list[Address]], str | None]:
    """(the addresses of each bind by key, the first overlap or None), resolving names; a name that does not
    resolve is a ConfigError naming its key."""
    resolved: dict[str, list[Address]] = {}
    for bind in binds:
        try:
            resolved[bind.key] = resolve(bind.host, bind.port)
        except OSError as exc:
            raise ConfigError(f"{bind.key}: cannot resolve {bind.host!r}: {exc.strerror or exc}") from None
    return resolved, _overlap(binds, lambda bind: resolved[bind.key])
