"""Placeholder names and their per-client values."""

from __future__ import annotations

import re

from acl.identity import ANONYMOUS_CLIENT_PREFIX, Identity, IdentityKind

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
    """The values a client's placeholders bind to; unusable values are left out so they never match.

    An anonymous client's ``${clientid}`` is its id as it is namespaced upstream (``anonymous:<id>``):
    bound to the raw id, an anonymous client calling itself ``alice`` would share the ``${clientid}``
    topics of the user whose client id is ``alice``. An empty id (one the front broker assigns later)
    has no value.
    """
    clientid: str | None = client_id or None
    if identity.kind is IdentityKind.ANONYMOUS and clientid is not None:
        clientid = ANONYMOUS_CLIENT_PREFIX + clientid
    raw: dict[str, str | None] = {
        "team": identity.team,
        "project": identity.project,
        "device": identity.device,
        "user": identity.user,
        "session": identity.session,
        "username": identity.username,
        "clientid": clientid,
    }
    return {name: value for name, value in raw.items() if value is not None and valid_value(value)}
