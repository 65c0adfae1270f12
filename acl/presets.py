"""Built-in rule sets, appended after the operator's own rules."""

from __future__ import annotations

from acl.rules import Action, Effect, Rule

_A, _P, _S, _B = Effect.ALLOW, Action.PUBLISH, Action.SUBSCRIBE, Action.BOTH
_T = "ff/v1/${team}"

# FlowFuse's project-link ACL (see docs/acl.md). `res-*` is a prefix level: "res-" plus at least one
# character, i.e. the per-call reply topics `res-<8 hex>`.
_FLOWFUSE: list[Rule] = [
    Rule("project", _A, _S, f"{_T}/p/+/out/#"),
    Rule("project", _A, _S, f"{_T}/p/${{project}}/in/#"),
    Rule("project", _A, _S, f"{_T}/p/${{project}}/res/#"),
    Rule("project", _A, _S, f"{_T}/p/${{project}}/res-*/#"),
    Rule("project", _A, _P, f"{_T}/p/+/in/#"),
    Rule("project", _A, _P, f"{_T}/p/+/res/#"),
    Rule("project", _A, _P, f"{_T}/p/+/res-*/#"),
    Rule("project", _A, _P, f"{_T}/p/${{project}}/out/#"),
    Rule("project", _A, _B, f"{_T}/c/#"),
    Rule("teamclient", _A, _B, f"{_T}/c/#"),
    # A static rule cannot know which project a device is assigned to, so devices only get their own tree.
    Rule("device", _A, _B, f"{_T}/d/${{device}}/#"),
    # The platform is trusted by FlowFuse with every team's topics.
    Rule("platform", _A, _B, "ff/v1/#"),
    # FlowFuse's MQTT nodes share the Team Broker space like team clients; the team's agent only listens
    # there (FlowFuse answers every agent publish "deny"). Appended so earlier rule indices stay.
    Rule("teamnode", _A, _B, f"{_T}/c/#"),
    Rule("teamagent", _A, _S, f"{_T}/c/#"),
]

PRESETS: dict[str, list[Rule]] = {
    "flowfuse": _FLOWFUSE,
    "none": [],
}

# Allowed `$share` group names per preset; None means any group name (the filter is still checked).
PRESET_SHARE_GROUPS: dict[str, tuple[str, ...] | None] = {
    "flowfuse": ("platform", "browser", "${project}"),
    "none": None,
}
