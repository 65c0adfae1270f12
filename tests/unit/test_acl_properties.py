"""Property tests: team isolation, subscribe soundness, and the trie against brute-force references."""

from __future__ import annotations

import re
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acl import AclEngine, Action, Effect, Identity, Rule, parse_identity
from acl.placeholders import placeholder_values
from acl.rules import Level, LevelKind, parse_pattern

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The brute-force subscribe reference is slow; fewer examples keep the test well inside the 60 s timeout.
SLOW_SETTINGS = settings(SETTINGS, max_examples=150)

TEAMS = ["team1", "team10", "team2", "team", "t", "a", "p1", "c", "$SYS", "te/am", "+", "#", "x\x00"]
IDS = ["p1", "p2", "p10", "d1", "team1", "team2", "out", "a", "$x", "p/1", "+"]
# Adversarial topic levels: empty, `$`, other teams, prefixes of each other, the preset's keywords.
LEVELS = [
    "ff",
    "v1",
    "team1",
    "team10",
    "team2",
    "team",
    "t",
    "p",
    "p1",
    "p2",
    "p10",
    "d",
    "d1",
    "c",
    "in",
    "out",
    "res",
    "res-",
    "res-ab12",
    "res-x",
    "",
    "$SYS",
    "$x",
    "a",
    "alice",
]

levels_st = st.sampled_from(LEVELS)
topic_st = st.lists(levels_st, min_size=1, max_size=8).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(levels_st, st.just("+")), min_size=0, max_size=7))
    if draw(st.booleans()) or not parts:
        parts.append("#")
    return "/".join(parts)


@st.composite
def team_identities(draw: st.DrawFn) -> tuple[Identity, str]:
    team = draw(st.sampled_from(TEAMS))
    other = draw(st.sampled_from(IDS))
    username = draw(st.sampled_from([f"project:{team}:{other}", f"device:{team}:{other}", f"{other}@{team}"]))
    identity = parse_identity(username)
    client_id = draw(st.sampled_from([username, f"{username}:n", "ff/v1/team2", "p1", ""]))
    return identity, client_id


PATTERN_LEVELS = [
    *LEVELS[:20],
    "+",
    "res-*",
    "p*",
    "${project}",
    "${device}",
    "${username}",
    "${clientid}",
    "${team}",
]


@st.composite
def rules(draw: st.DrawFn, team_scoped: bool) -> Rule:
    """A random valid rule; team-scoped ones keep `${team}` in the team position of `ff/v1/...`."""
    rest = draw(st.lists(st.sampled_from(PATTERN_LEVELS), min_size=0, max_size=4))
    if team_scoped:
        rest = ["ff", "v1", "${team}", *rest]
    elif not rest or draw(st.booleans()):
        rest = [draw(st.sampled_from(PATTERN_LEVELS)), *rest]
    if draw(st.booleans()):
        rest.append("#")
    action = draw(st.sampled_from(list(Action)))
    retain = None if action is Action.SUBSCRIBE else draw(st.sampled_from([None, False, True]))
    # Biased towards rules that apply, so that decisions are not mostly default deny.
    who = draw(st.sampled_from(["any", "any", "any", "project", "device", "teamclient", "user"]))
    effect = draw(st.sampled_from([Effect.ALLOW, Effect.ALLOW, Effect.DENY]))
    return Rule(who, effect, action, "/".join(rest), retain)


def can_touch_foreign_team(topic_filter: str, team: str | None) -> bool:
    """Whether a filter matches some topic `ff/v1/<Y>/...` with Y != team."""
    parts = topic_filter.split("/")
    for i, want in enumerate(["ff", "v1", None]):
        if i >= len(parts):
            return False
        f = parts[i]
        if f == "#":
            return True
        if want is None:
            return f == "+" or f != team
        if f not in ("+", want):
            return False
    return False


@SETTINGS
@given(
    team_identities(),
    st.lists(rules(team_scoped=True), max_size=6),
    st.sampled_from(TEAMS),
    st.lists(levels_st, min_size=0, max_size=5),
    filters(),
    st.booleans(),
)
def test_team_isolation(
    ident: tuple[Identity, str],
    extra: list[Rule],
    foreign: str,
    rest: list[str],
    topic_filter: str,
    retain: bool,
) -> None:
    identity, client_id = ident
    acl = AclEngine(extra, preset="flowfuse").for_client(identity, client_id, cache_size=0)
    team = identity.team
    topic = "/".join(["ff", "v1", foreign, *rest])
    # A team id containing '/' shifts the levels; what matters is the level after ff/v1.
    if topic.split("/")[2] != team:
        assert not acl.check_publish(topic, retain)
        assert not acl.check_receive(topic)
    for candidate in (
        topic_filter,
        "ff/v1/" + topic_filter,
        f"$share/{identity.project}/ff/v1/{topic_filter}",
    ):
        inner = candidate.split("/", 2)[2] if candidate.startswith("$share/") else candidate
        if can_touch_foreign_team(inner, team):
            assert not acl.check_subscribe(candidate), candidate


def sample_topic(topic_filter: str, fill: list[str], tail: list[str]) -> str:
    out: list[str] = []
    it = iter(fill)
    for part in topic_filter.split("/"):
        if part == "+":
            out.append(next(it, "a"))
        elif part == "#":
            out.extend(tail)
        else:
            out.append(part)
    return "/".join(out) if out else "a"


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Reference MQTT filter match via regex."""
    parts = topic_filter.split("/")
    if parts[0] in ("+", "#") and topic.startswith("$"):
        return False
    rx = ""
    for i, part in enumerate(parts):
        sep = "/" if i else ""
        if part == "#":
            rx += "(?:/.*)?" if i else ".*"
        elif part == "+":
            rx += sep + "[^/]*"
        else:
            rx += sep + re.escape(part)
    return re.fullmatch(rx, topic, re.DOTALL) is not None


@SETTINGS
@given(
    st.lists(rules(team_scoped=False), max_size=8),
    st.sampled_from(["flowfuse", "none"]),
    team_identities(),
    filters(),
    st.lists(levels_st, max_size=6),
    st.lists(levels_st, max_size=3),
)
def test_subscribe_implies_receive(
    rule_list: list[Rule],
    preset: str,
    ident: tuple[Identity, str],
    topic_filter: str,
    fill: list[str],
    tail: list[str],
) -> None:
    identity, client_id = ident
    acl = AclEngine(rule_list, preset=preset).for_client(identity, client_id, cache_size=0)
    topic = sample_topic(topic_filter, fill, tail)
    if acl.check_subscribe(topic_filter) and filter_matches(topic_filter, topic):
        assert acl.check_receive(topic), (topic_filter, topic)


@st.composite
def derived_filters(draw: st.DrawFn, rule_list: list[Rule], values: dict[str, str]) -> str:
    """A filter close to one of the rules' patterns, so that near-miss cover/intersect cases get hit."""
    if not rule_list:
        return draw(filters())
    levels = list(parse_pattern(draw(st.sampled_from(rule_list)).pattern))
    out: list[str] = []
    for lv in levels:
        choices = ["+", "#", draw(levels_st)]
        if lv.kind is LevelKind.LITERAL:
            choices += [lv.text] * 4
        elif lv.kind is LevelKind.PREFIX:
            choices += [lv.text + "x", lv.text + "x", lv.text]
        elif lv.kind is LevelKind.PLACEHOLDER:
            choices += [values.get(lv.text, "v")] * 3
        else:
            choices += ["+", "#"] if lv.kind is LevelKind.HASH else ["+", "+"]
        out.append(draw(st.sampled_from(choices)))
        if out[-1] == "#":
            break
    if len(out) > 1 and draw(st.integers(0, 3)) == 0:
        out = out[: draw(st.integers(min_value=1, max_value=len(out) - 1))]
    if out[-1] != "#" and draw(st.integers(0, 3)) == 0:
        out.append(draw(st.sampled_from(["#", "+", "x"])))
    return "/".join(out)


@st.composite
def derived_topics(draw: st.DrawFn, rule_list: list[Rule], values: dict[str, str]) -> str:
    """A topic built to match (or nearly match) one of the rules' patterns."""
    if not rule_list:
        return draw(topic_st)
    out: list[str] = []
    for lv in parse_pattern(draw(st.sampled_from(rule_list)).pattern):
        if lv.kind is LevelKind.HASH:
            out += draw(st.lists(levels_st, max_size=2))
        elif lv.kind is LevelKind.PLUS:
            out.append(draw(levels_st))
        elif lv.kind is LevelKind.PREFIX:
            out.append(draw(st.sampled_from([lv.text + "x", lv.text])))
        elif lv.kind is LevelKind.PLACEHOLDER:
            out.append(draw(st.sampled_from([values.get(lv.text, "v"), values.get(lv.text, "v"), "v"])))
        else:
            out.append(lv.text)
    return "/".join(out) or "a"


# -- brute-force references --------------------------------------------------------------------------


def pattern_regex(rule: Rule, values: dict[str, str]) -> re.Pattern[str] | None:
    """Independent translation of a bound pattern to a regex; None when a placeholder is unusable."""
    rx = ""
    levels = rule.pattern.split("/")
    for i, part in enumerate(levels):
        sep = "/" if i else ""
        if part == "#":
            rx += "(?:/.*)?" if i else ".*"
        elif part == "+":
            rx += sep + "[^/]*"
        elif part.startswith("${"):
            value = values.get(part[2:-1])
            if value is None:
                return None
            rx += sep + re.escape(value)
        elif part.endswith("*"):
            rx += sep + re.escape(part[:-1]) + "[^/]+"
        else:
            rx += sep + re.escape(part)
    if levels[0] in ("+", "#") or levels[0].startswith("${"):
        rx = "(?!\\$)" + rx
    return re.compile(rx, re.DOTALL)


def applies(rule: Rule, identity: Identity) -> bool:
    return rule.who in ("any", identity.kind.value)


def linear_topic(
    rule_list: list[Rule], identity: Identity, values: dict[str, str], topic: str, publish: bool, retain: bool
) -> bool:
    if not topic:  # an empty topic name is invalid in MQTT
        return False
    for rule in rule_list:
        if not applies(rule, identity) or (rule.publishes if publish else rule.subscribes) is False:
            continue
        if publish and rule.retain is not None and rule.retain is not retain:
            continue
        rx = pattern_regex(rule, values)
        if rx is not None and rx.fullmatch(topic):
            return rule.allows
    return False


FRESH = "~fresh~"


def universe(rule_list: list[Rule], values: dict[str, str], flevels: list[str]) -> list[str]:
    """One representative level for every way a level can relate to the literals and prefixes in play."""
    reps = {"", FRESH, "$" + FRESH, *values.values(), *(f for f in flevels if f not in ("+", "#"))}
    for rule in rule_list:
        for lv in parse_pattern(rule.pattern):
            if lv.kind is LevelKind.LITERAL:
                reps.add(lv.text)
            elif lv.kind is LevelKind.PREFIX:
                reps.update({lv.text, lv.text + FRESH})
    return sorted(reps)


def level_set(level: Level | str, pos: int, reps: list[str], values: dict[str, str]) -> frozenset[str]:
    def ok(r: str) -> bool:
        if isinstance(level, str):  # filter level
            return (pos > 0 or not r.startswith("$")) if level in ("+", "#") else r == level
        if level.kind is LevelKind.LITERAL:
            return r == level.text
        if level.kind is LevelKind.PREFIX:
            return r.startswith(level.text) and len(r) > len(level.text)
        if level.kind is LevelKind.PLACEHOLDER:
            return values.get(level.text) == r and (pos > 0 or not r.startswith("$"))
        return pos > 0 or not r.startswith("$")  # + or #

    return frozenset(r for r in reps if ok(r))


def expand(
    levels: Sequence[Level | str], length: int, reps: list[str], values: dict[str, str]
) -> list[frozenset[str]] | None:
    """Level sets of the topics of exactly `length` levels matched (None if none have that length)."""

    def is_hash(lv: Level | str) -> bool:
        return lv == "#" if isinstance(lv, str) else lv.kind is LevelKind.HASH

    if levels and is_hash(levels[-1]):
        fixed = levels[:-1]
        if length < max(len(fixed), 1):
            return None
        sets = [level_set(lv, i, reps, values) for i, lv in enumerate(fixed)]
        return sets + [level_set(levels[-1], i, reps, values) for i in range(len(fixed), length)]
    if length != len(levels):
        return None
    return [level_set(lv, i, reps, values) for i, lv in enumerate(levels)]


def linear_subscribe(
    rule_list: list[Rule], identity: Identity, values: dict[str, str], topic_filter: str
) -> bool:
    if not topic_filter:  # an empty filter is invalid in MQTT
        return False
    flevels = topic_filter.split("/")
    reps = universe(rule_list, values, flevels)
    max_len = max([len(flevels), *(len(parse_pattern(r.pattern)) for r in rule_list)]) + 1
    fsets = {n: expand(flevels, n, reps, values) for n in range(1, max_len + 1)}
    for rule in rule_list:
        if not applies(rule, identity) or not rule.subscribes:
            continue
        plevels = list(parse_pattern(rule.pattern))
        intersects, covers = False, True
        for n, fs in fsets.items():
            ps = expand(plevels, n, reps, values)
            if fs is None or not all(fs):
                continue
            if ps is not None and all(a & b for a, b in zip(fs, ps, strict=True)):
                intersects = True
            if ps is None or not all(a <= b for a, b in zip(fs, ps, strict=True)):
                covers = False
        if not rule.allows and intersects:
            return False
        if rule.allows and covers:
            return True
    return False


@SLOW_SETTINGS
@given(
    st.lists(rules(team_scoped=False), max_size=10),
    st.sampled_from(["flowfuse", "none"]),
    team_identities(),
    st.lists(st.tuples(topic_st, st.booleans()), min_size=1, max_size=5),
    st.lists(filters(), min_size=1, max_size=3),
    st.data(),
)
def test_trie_equals_linear_first_match(
    rule_list: list[Rule],
    preset: str,
    ident: tuple[Identity, str],
    topics: list[tuple[str, bool]],
    topic_filters: list[str],
    data: st.DataObject,
) -> None:
    identity, client_id = ident
    engine = AclEngine(rule_list, preset=preset)
    acl = engine.for_client(identity, client_id, cache_size=0)
    values = placeholder_values(identity, client_id)
    everything = list(engine.rules)
    readable = [r for r in everything if applies(r, identity) and r.subscribes and r.allows]
    topic_filters += [data.draw(derived_filters(readable, values)) for _ in range(4)]
    topics += [
        (sample_topic(f, data.draw(st.lists(levels_st, max_size=6)), ["a"]), data.draw(st.booleans()))
        for f in topic_filters
    ]
    topics += [(data.draw(derived_topics(everything, values)), data.draw(st.booleans())) for _ in range(4)]
    for topic, retain in topics:
        assert acl.check_publish(topic, retain) is linear_topic(
            everything, identity, values, topic, True, retain
        )
        assert acl.check_receive(topic) is linear_topic(everything, identity, values, topic, False, False)
    for topic_filter in topic_filters:
        expected = linear_subscribe(everything, identity, values, topic_filter)
        assert acl.check_subscribe(topic_filter) is expected, topic_filter
        assert acl.explain_subscribe(topic_filter).allowed is expected


def test_reference_self_check() -> None:
    """The brute-force subscribe reference agrees with hand-checked cases."""
    ident = parse_identity("project:team1:p1")
    values = placeholder_values(ident, "c")
    preset_rules = list(AclEngine([], preset="flowfuse").rules)
    for topic_filter, expected in [
        ("ff/v1/team1/p/+/out/#", True),
        ("#", False),
        ("ff/v1/team1/p/p1/res-a/#", True),
        ("ff/v1/team1/p/p1/+/#", False),
    ]:
        assert linear_subscribe(preset_rules, ident, values, topic_filter) is expected
