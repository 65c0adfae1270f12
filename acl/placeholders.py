"""Placeholder names and their per-client values."""

from __future__ import annotations

import re

from acl.identity import Identity

# team, project, device, user and session come from the username form (acl.identity); an identity whose
# form has no such part has no value for it, so rules using it do not apply to that identity.
PLACEHOLDER_NAMES: frozenset[str] = frozenset({"team", "project", "device", "user", "session", "username", "clientid"})

# A whole `${name}` token; names are validated against PLACEHOLDER_NAMES separately for a clear error.
PLACEHOLDER_RE = re.compile(r"\$\{([^}]*)\}")

# A value containing any of these could widen a pattern (level separator, wildcards) or is not a
# legal topic character, so such a value never matches anything.
_FORBIDDEN_IN_VALUE = ("/", "+", "#", "\x00")


def valid_value(value: str | None) -> bool:
    if not value:
        return False
    return not any(c in value for c in _FORBIDDEN_IN_VALUE)


def placeholder_values(identity: Identity, client_id: str) -> dict[str, str]:
    """The values a client's placeholders bind to; unusable values are left out so they never match."""
    raw: dict[str, str | None] = {
        "team": identity.team,
        "project": identity.project,
        "device": identity.device,
        "user": identity.user,
        "session": identity.session,
        "username": identity.username,
        "clientid": client_id,
    }
    return {name: value for name, value in raw.items() if value is not None and valid_value(value)}
