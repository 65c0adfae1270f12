"""How to reach the admin API of a configuration: its bearer token and its URL.

Kept apart from :mod:`broker.ops.admin` (the server, on aiohttp) so that ``mqtt-front ctl`` and
``mqtt-front reload`` read the token without importing the server side.
"""

from __future__ import annotations

from broker.config import AdminConfig, ConfigError, parse_hostport

MIN_TOKEN_LENGTH = 16  # as admin.token's own check in broker.config


def admin_token(admin: AdminConfig) -> str:
    """``admin.token``, or the first line of ``admin.token_file`` (stripped).

    Raises ConfigError naming the key when the file cannot be read, is empty, or holds a token
    shorter than :data:`MIN_TOKEN_LENGTH` characters.
    """
    if admin.token is not None:
        return admin.token
    path = admin.token_file
    assert path is not None  # AdminConfig: exactly one of token and token_file
    try:
        with path.open(encoding="utf-8") as file:
            token = file.readline().strip()
    except OSError as exc:
        raise ConfigError(f"admin.token_file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"admin.token_file: {path} is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"admin.token_file: {path} is empty (the token is its first line)")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"admin.token_file: the token in {path} is shorter than {MIN_TOKEN_LENGTH} characters")
    return token


def admin_url(admin: AdminConfig) -> str:
    """The base URL a local client uses for ``admin.bind`` (a wildcard bind is reached on loopback)."""
    host, port = parse_hostport(admin.bind)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
