"""Back-off after failed logins, per source address and per username: a brute force or a flood of wrong
passwords is refused cheaply (before bcrypt or a platform request), so it cannot burn the CPU and the
platform slots that other logins need.

Three keys, each with its own allowance: a username from one address (``PAIR_FREE`` failures: one
misconfigured client slows only itself, not the others behind the same NAT or cluster egress), a
username from anywhere (``USER_FREE``: a guesser spread over many addresses), an address whatever the
username (``SOURCE_FREE``: a password sprayer). Once it is used up a key is blocked for ``FIRST``
seconds, doubling with each further failure up to ``LONGEST``; a success clears the pair and the
username, and a key left alone for ``FORGET`` seconds is forgotten. A blocked CONNECT is answered
"server busy" (v5 0x89, 3.1.1 0x03): the client may retry later, and nothing about the credentials is
revealed. Pure: the caller passes the clock.
"""

from __future__ import annotations

from typing import Final

from acl.cache import oldest

PAIR_FREE: Final = 5  # failures before any back-off (a user mistyping a password is not slowed)
USER_FREE: Final = 20
SOURCE_FREE: Final = 100
FIRST: Final = 1.0  # seconds of the first back-off
LONGEST: Final = 30.0
FORGET: Final = 300.0  # a key without failures for this long starts afresh
MAX_KEYS: Final = 100_000  # per table; the oldest go first


class LoginBackoff:
    """Failure counts by key; ``blocked`` before a check, ``failed``/``succeeded`` after it."""

    __slots__ = ("_pairs", "_sources", "_users")

    def __init__(self) -> None:
        # key -> (failures, blocked until, last failure)
        self._pairs: dict[str, tuple[int, float, float]] = {}
        self._users: dict[str, tuple[int, float, float]] = {}
        self._sources: dict[str, tuple[int, float, float]] = {}

    def blocked(self, source: str, username: str | None, now: float) -> bool:
        if _blocked(self._sources, source, now):
            return True
        name = username or ""
        return _blocked(self._pairs, f"{source}\0{name}", now) or (
            username is not None and _blocked(self._users, username, now)
        )

    def failed(self, source: str, username: str | None, now: float) -> None:
        _fail(self._sources, source, now, SOURCE_FREE)
        _fail(self._pairs, f"{source}\0{username or ''}", now, PAIR_FREE)
        if username is not None:
            _fail(self._users, username, now, USER_FREE)

    def succeeded(self, source: str, username: str | None) -> None:
        self._pairs.pop(f"{source}\0{username or ''}", None)
        if username is not None:
            self._users.pop(username, None)

    def __len__(self) -> int:
        return len(self._pairs) + len(self._users) + len(self._sources)


def _blocked(table: dict[str, tuple[int, float, float]], key: str, now: float) -> bool:
    entry = table.get(key)
    if entry is None:
        return False
    if now - entry[2] > FORGET:
        del table[key]
        return False
    return now < entry[1]


def _fail(table: dict[str, tuple[int, float, float]], key: str, now: float, free: int) -> None:
    entry = table.pop(key, None)  # re-inserted last: the table stays ordered by last failure
    failures = 1 if entry is None or now - entry[2] > FORGET else entry[0] + 1
    # (the exponent capped: a key failing thousands of times must not overflow the float)
    until = now + min(LONGEST, FIRST * 2 ** min(failures - free, 32)) if failures >= free else 0.0
    if len(table) >= MAX_KEYS:
        for old in oldest(table, max(1, MAX_KEYS // 16)):
            del table[old]
    table[key] = (failures, until, now)


def source_of(peer: str) -> str:
    """The address part of a ``host:port`` peer (``[v6]:port`` too)."""
    host, sep, _ = peer.rpartition(":")
    return host if sep else peer
