"""A configuration reload, prepared in full before anything changes (SIGHUP, ``mqtt-front reload``, the admin API).

:func:`prepare` reads and validates the new file and everything it names (the users file, the ACL rules,
the JWT keys, the platform client's headers and CA) into a :class:`Prepared` reload, or raises
:class:`~broker.config.ConfigError` naming the key: then nothing is swapped and the old configuration keeps
serving. :func:`describe` says what changed, in words for the log line (``users +2 -1``, ``rules 14 -> 15``),
and which changed keys need a restart (listener binds, upstream URLs, the metrics and admin endpoints).
Applying it (swapping the parts, re-evaluating the connected sessions) is the server's job.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from acl.engine import AclEngine
from broker.auth.jwt import JwtVerifier
from broker.auth.users import load_users
from broker.config import AclConfig, Config, ListenerConfig, load_config
from broker.upstream.tls_config import build_context

# Keys a running process applies; every other top-level key that changed needs a restart.
RELOADABLE = ("auth", "acl", "limits", "logging")


@dataclass(slots=True)
class Prepared:
    config: Config  # the new file, with the keys that need a restart kept as they run now
    users: dict[str, bytes]
    acl: AclEngine
    jwt: JwtVerifier | None
    upstream_tls: ssl.SSLContext | None  # upstream.tls files read again (same paths), for new upstream connections
    changes: list[str] = field(default_factory=list)  # what changed, in words
    restart_needed: list[str] = field(default_factory=list)  # changed keys that apply only after a restart


def prepare(
    path: str | Path,
    running: Config,
    users: dict[str, bytes],
    build_acl_engine: Callable[[AclConfig], AclEngine],
    workers: int = 1,
) -> Prepared:
    """Read and check everything the new file names; raises ConfigError (naming the key) when anything fails.
    ``workers``: the process's worker count (each worker holds its share of the shared bounds)."""
    new = worker_share(load_config(path), workers)
    new_users = load_users(new.auth.users_file) if new.auth.users_file else {}
    engine = build_acl_engine(new.acl)
    jwt = JwtVerifier(new.auth.jwt) if new.auth.jwt is not None else None
    up = running.upstream
    upstream_tls = build_context(up.tls) if up is not None and up.uses_tls else None
    restart = restart_keys(running, new)
    # What cannot change while running stays as it is, so that the process never half-applies it.
    kept = new.model_copy(
        # listeners: the running ones (their TLS files are re-read, same paths, by the TLS reload)
        update={"listeners": list(running.listeners), "upstream": running.upstream, "metrics": running.metrics}
    )
    for key in ("admin", "inventory"):
        if key in type(new).model_fields:
            kept = kept.model_copy(update={key: getattr(running, key)})
    kept = kept.model_copy(update={"limits": kept.limits.model_copy(update={"store": running.limits.store})})
    changes = describe(running, new, users, new_users)
    return Prepared(kept, new_users, engine, jwt, upstream_tls, changes, restart)


def worker_share(config: Config, workers: int) -> Config:
    """Each worker's copy of the config: ``auth.http.max_concurrency`` is the whole process's bound on
    requests to the platform, so each of ``workers`` gets its share (rounded up)."""
    http = config.auth.http
    if http is None or workers <= 1:
        return config
    share = http.model_copy(update={"max_concurrency": -(-http.max_concurrency // workers)})
    return config.model_copy(update={"auth": config.auth.model_copy(update={"http": share})})


def restart_keys(running: Config, new: Config) -> list[str]:
    keys: list[str] = []
    if _without_tls(running.listeners) != _without_tls(new.listeners):
        keys.append("listeners")
    elif [item.tls for item in running.listeners] != [item.tls for item in new.listeners]:
        keys.append("listeners.tls (certificate paths; the files themselves are re-read)")
    if running.upstream != new.upstream:
        keys.append("upstream")
    if running.limits.store != new.limits.store:  # the store's connection and registration live from the start
        keys.append("limits.store")
    if running.logging.format != new.logging.format:
        keys.append("logging.format")
    for name in type(new).model_fields:
        if name in ("listeners", "upstream", *RELOADABLE):
            continue
        if getattr(running, name) != getattr(new, name):
            keys.append(name)
    return keys


def _without_tls(listeners: list[ListenerConfig]) -> list[ListenerConfig]:
    return [item.model_copy(update={"tls": None}) for item in listeners]


def describe(running: Config, new: Config, users: dict[str, bytes], new_users: dict[str, bytes]) -> list[str]:
    """What a reload of ``new`` over ``running`` changes, one short phrase per part (empty: nothing)."""
    changes: list[str] = []
    added = len(new_users.keys() - users.keys())
    removed = len(users.keys() - new_users.keys())
    changed = sum(1 for name in users.keys() & new_users.keys() if users[name] != new_users[name])
    if added or removed or changed:
        changes.append(f"users +{added} -{removed}" + (f" ~{changed}" if changed else ""))
    old_auth = running.auth.model_copy(update={"users_file": None})
    new_auth = new.auth.model_copy(update={"users_file": None})
    if running.auth.users_file != new.auth.users_file:
        changes.append("auth.users_file")
    for key in type(new_auth).model_fields:
        if getattr(old_auth, key) != getattr(new_auth, key) and key != "users_file":
            changes.append(f"auth.{key}")
    old_acl, new_acl = running.acl, new.acl
    if len(old_acl.rules) != len(new_acl.rules) or old_acl.rules != new_acl.rules:
        changes.append(f"rules {len(old_acl.rules)} -> {len(new_acl.rules)}")
    for key in type(new_acl).model_fields:
        if key != "rules" and getattr(old_acl, key) != getattr(new_acl, key):
            changes.append(f"acl.{key}")
    for section in ("limits", "logging"):
        old_part, new_part = getattr(running, section), getattr(new, section)
        for key in type(new_part).model_fields:
            if getattr(old_part, key) != getattr(new_part, key):
                changes.append(f"{section}.{key} {getattr(old_part, key)} -> {getattr(new_part, key)}")
    return changes


def apply_logging(config: Config) -> None:
    """logging.level takes effect at once (the format needs a restart: the handler is set up at start)."""
    logging.getLogger().setLevel(config.logging.level.upper())
