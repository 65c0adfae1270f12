"""Access-control engine: identities, rules, compiled topic index. Pure, no I/O."""

from acl.engine import AclEngine, ClientAcl, Decision
from acl.identity import Identity, IdentityKind, parse_identity
from acl.presets import PRESET_SHARE_GROUPS, PRESETS
from acl.rules import Action, Effect, Rule

__all__ = [
    "PRESETS",
    "PRESET_SHARE_GROUPS",
    "AclEngine",
    "Action",
    "ClientAcl",
    "Decision",
    "Effect",
    "Identity",
    "IdentityKind",
    "Rule",
    "parse_identity",
]
