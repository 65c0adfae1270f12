"""ACL rules and the validated, level-by-level form of their topic patterns."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from acl.identity import IdentityKind
from acl.placeholders import PLACEHOLDER_NAMES, PLACEHOLDER_RE


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    BOTH = "both"


WHO_ANY = "any"
WHO_VALUES: frozenset[str] = frozenset({k.value for k in IdentityKind} | {WHO_ANY})

# A level ending in this marks a prefix level: `res-*` = "res-" followed by at least one character.
PREFIX_MARK = "*"


class LevelKind(Enum):
    LITERAL = "literal"
    PLUS = "plus"
    HASH = "hash"
    PLACEHOLDER = "placeholder"
    PREFIX = "prefix"


@dataclass(frozen=True, slots=True)
class Level:
    kind: LevelKind
    # Literal text, placeholder name, or the prefix; empty for `+` and `#`.
    text: str = ""


def parse_level(level: str) -> Level:
    """Parse one pattern level; raise ValueError with a user-facing reason when it is malformed."""
    if level == "#":
        return Level(LevelKind.HASH)
    if level == "+":
        return Level(LevelKind.PLUS)
    if "#" in level or "+" in level:
        raise ValueError(f"'+' and '#' must occupy a whole level, got level {level!r}")
    if "${" in level:
        m = PLACEHOLDER_RE.fullmatch(level)
        if m is None:
            raise ValueError(f"a placeholder must occupy a whole level as '${{name}}', got level {level!r}")
        name = m.group(1)
        if name not in PLACEHOLDER_NAMES:
            known = ", ".join(f"${{{n}}}" for n in sorted(PLACEHOLDER_NAMES))
            raise ValueError(f"unknown placeholder ${{{name}}} (known: {known})")
        return Level(LevelKind.PLACEHOLDER, name)
    if PREFIX_MARK in level:
        prefix = level[: -len(PREFIX_MARK)]
        if not level.endswith(PREFIX_MARK) or PREFIX_MARK in prefix:
            raise ValueError(f"'*' is only allowed once, at the end of a level, got level {level!r}")
        if not prefix:
            raise ValueError("a prefix level needs a literal prefix before '*' (use '+' for any level)")
        return Level(LevelKind.PREFIX, prefix)
    return Level(LevelKind.LITERAL, level)


def parse_pattern(pattern: str) -> tuple[Level, ...]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("pattern must be a non-empty string")
    if "\x00" in pattern:
        raise ValueError("pattern must not contain U+0000")
    levels = tuple(parse_level(part) for part in pattern.split("/"))
    if any(lv.kind is LevelKind.HASH for lv in levels[:-1]):
        raise ValueError(f"'#' must be the last level of a pattern, got {pattern!r}")
    return levels


@dataclass(frozen=True)
class Rule:
    """One ACL rule. `retain` restricts which publishes it matches: None = any, False = only
    non-retained (so an allow rule with retain=False permits publishing but not retaining),
    True = only retained. It has no meaning for subscriptions."""

    who: str
    effect: Effect
    action: Action
    pattern: str
    retain: bool | None = None

    def __post_init__(self) -> None:
        if self.who not in WHO_VALUES:
            raise ValueError(f"unknown 'who' {self.who!r} (expected one of: {', '.join(sorted(WHO_VALUES))})")
        # Coerce plain strings from config; Enum() raises ValueError for unknown values.
        try:
            object.__setattr__(self, "effect", Effect(self.effect))
        except ValueError:
            raise ValueError(f"unknown effect {self.effect!r} (expected allow or deny)") from None
        try:
            object.__setattr__(self, "action", Action(self.action))
        except ValueError:
            raise ValueError(f"unknown action {self.action!r} (expected publish, subscribe or both)") from None
        if self.retain is not None and self.action is Action.SUBSCRIBE:
            raise ValueError("'retain' only applies to publish rules")
        parse_pattern(self.pattern)

    @property
    def levels(self) -> tuple[Level, ...]:
        return parse_pattern(self.pattern)

    @property
    def allows(self) -> bool:
        return self.effect is Effect.ALLOW

    @property
    def publishes(self) -> bool:
        return self.action is not Action.SUBSCRIBE

    @property
    def subscribes(self) -> bool:
        return self.action is not Action.PUBLISH
