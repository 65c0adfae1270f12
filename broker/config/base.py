"""What every part of the configuration shares: the error type, host:port parsing, URL redaction, the strict
model base."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r} is not host:port")
        host, port_text = value, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{value!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} out of range")
    return host, port


def redact_url(url: str, *, show_username: bool = True) -> str:
    """A URL fit for output and logs: ``mqtt://front:***@host:1884``. The password of the userinfo is starred
    (with ``show_username=False`` the whole userinfo: ``***@host``); the query and fragment, which may carry
    tokens, are left out. The one helper for every URL printed or logged."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # Up to the last "@" is userinfo, even when a password holds "/", "?" or "#" (which urlsplit would
        # take for the path, the query or the fragment, and leave unstarred).
        userinfo, _, after = rest.rpartition("@")
        username, colon, _ = userinfo.partition(":")
        shown = "***" if not show_username else (f"{username}:***" if colon else username)
        url = f"{scheme}://{shown}@{after}"
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        username, colon, _ = userinfo.partition(":")
        if not show_username:
            userinfo = "***"
        elif colon:
            userinfo = f"{username}:***"
        netloc = f"{userinfo}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
