"""Which client ids an identity may use: the client-id rule per username form (docs/acl.md, "Client ids").

Client ids are bound to identities so that no client can take over another identity's session (an
MQTT broker hands a session to whoever connects with its client id). Two rules:

- ``prefix``: the username, or ``<username>:<suffix>`` with a non-empty suffix;
- ``exact``: the username only (FlowFuse's Team Broker rule).

This is safe only together with ``broker.auth.users.username_problem``, which makes sure that no
username that can authenticate lies in another one's ``<username>:`` namespace.

Pure: the broker maps the rule names to ``broker.session.api.ClientIdRule``.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from acl.identity import Identity, IdentityKind

ClientIdRuleName = Literal["prefix", "exact"]
PREFIX: Final = "prefix"
EXACT: Final = "exact"
CLIENT_ID_RULES: frozenset[str] = frozenset({PREFIX, EXACT})

# FlowFuse requires client id == username for these (Team Broker clients, and the team's agent, which
# shares their `@<team>` form); `acl.client_id_suffix: true` relaxes them to prefix (FlowFuse issue 8163).
_EXACT_UNLESS_SUFFIX: frozenset[IdentityKind] = frozenset({IdentityKind.TEAMCLIENT, IdentityKind.TEAMAGENT})


def client_id_rule(identity: Identity, suffix_allowed: bool) -> ClientIdRuleName:
    """The client-id rule of an identity; ``suffix_allowed`` is ``acl.client_id_suffix``.

    Team Broker clients ``<name>@<team>`` and the team agent ``agent:<team>@<team>``: exact, or prefix
    when ``suffix_allowed``. Every other kind: prefix (projects ``<username>:n[:<hex>]``, the platform
    ``forge_platform:<hex>``, FlowFuse's MQTT nodes ``<username>:<haId>``, browsers and the assistant use
    their username). Anonymous clients get prefix too, but the session does not use it: their ids are
    namespaced upstream as ``anonymous:<id>`` instead.
    """
    if identity.kind in _EXACT_UNLESS_SUFFIX and not suffix_allowed:
        return EXACT
    return PREFIX


_AGENT = re.compile(r"agent:([^:@]+)@\1")


def agent_client_id(username: str) -> str | None:
    """The other client id of FlowFuse's team agent: ``agent:<team>@<team>`` connects as ``<team>-agent@<team>``.

    That id is also what a Team Broker client named ``<team>-agent`` of the same team would use, so the two
    can take over each other's session, as in FlowFuse (which checks no client ids); no other team's
    identity can use it (its ``@<team>`` is the agent's own team)."""
    match = _AGENT.fullmatch(username)
    return f"{match[1]}-agent@{match[1]}" if match else None


def client_id_allowed(rule: str, username: str, client_id: str) -> bool:
    """Whether an authenticated ``username`` may connect with ``client_id`` under ``rule``.

    False for an empty username (anonymous ids are namespaced by the session instead) and for an empty
    client id (the session assigns one). Under ``prefix`` the suffix after ``<username>:`` must not be
    empty: ``<username>:`` is no id FlowFuse uses, and FlowFuse itself refuses an empty HA id.
    Raises ValueError for an unknown rule name.
    """
    if rule not in CLIENT_ID_RULES:
        raise ValueError(f"unknown client-id rule {rule!r} (expected prefix or exact)")
    if not username or not client_id:
        return False
    if client_id == username or client_id == agent_client_id(username):
        return True
    if rule == EXACT:
        return False
    return len(client_id) > len(username) + 1 and client_id.startswith(username + ":")
