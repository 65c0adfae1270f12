"""Property tests: team isolation, carve-outs, subscribe soundness, and the trie against brute-force references."""

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


def as_deny(rule: Rule) -> Rule:
    return Rule(rule.who, Effect.DENY, rule.action, rule.pattern, rule.retain)


@st.composite
def with_denies(draw: st.DrawFn, rule_list: list[Rule]) -> list[Rule]:
    """`rule_list` with deny rules of any shape (not team-scoped) inserted anywhere."""
    out = list(rule_list)
    for deny in draw(st.lists(rules(team_scoped=False).map(as_deny), max_size=4)):
        out.insert(draw(st.integers(0, len(out))), deny)
    return out


@SETTINGS
@given(
    team_identities(),
    st.lists(rules(team_scoped=True), max_size=6).flatmap(with_denies),
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
    """Team-scoped rules and any deny rules on top of the preset: team X never reads or writes team Y."""
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


def linear_subscribe_detail(
    rule_list: list[Rule], identity: Identity, values: dict[str, str], topic_filter: str
) -> tuple[bool, list[int]]:
    """First match over the filter: (granted, indices of the earlier deny rules it carves out)."""
    if not topic_filter:  # an empty filter is invalid in MQTT
        return False, []
    flevels = topic_filter.split("/")
    reps = universe(rule_list, values, flevels)
    max_len = max([len(flevels), *(len(parse_pattern(r.pattern)) for r in rule_list)]) + 1
    fsets = {n: expand(flevels, n, reps, values) for n in range(1, max_len + 1)}
    carve_outs: list[int] = []
    for i, rule in enumerate(rule_list):
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
        if covers:
            return (True, carve_outs) if rule.allows else (False, [])
        if not rule.allows and intersects:
            carve_outs.append(i)
    return False, []


def linear_subscribe(rule_list: list[Rule], identity: Identity, values: dict[str, str], topic_filter: str) -> bool:
    return linear_subscribe_detail(rule_list, identity, values, topic_filter)[0]


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
    denies = [r for r in everything if applies(r, identity) and r.subscribes and not r.allows]
    topic_filters += [data.draw(derived_filters(readable, values)) for _ in range(4)]
    topic_filters += [data.draw(derived_filters(denies, values)) for _ in range(2)]
    topics += [
        (sample_topic(f, data.draw(st.lists(levels_st, max_size=6)), ["a"]), data.draw(st.booleans()))
        for f in topic_filters
    ]
    topics += [(data.draw(derived_topics(everything, values)), data.draw(st.booleans())) for _ in range(4)]
    for topic, retain in topics:
        assert acl.check_publish(topic, retain) is linear_topic(everything, identity, values, topic, True, retain)
        assert acl.check_receive(topic) is linear_topic(everything, identity, values, topic, False, False)
    for topic_filter in topic_filters:
        expected, carve_outs = linear_subscribe_detail(everything, identity, values, topic_filter)
        assert acl.check_subscribe(topic_filter) is expected, topic_filter
        decision = acl.explain_subscribe(topic_filter)
        assert decision.allowed is expected
        assert [engine.sources.index(c.source) for c in decision.carve_outs] == carve_outs, topic_filter


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
    paho = [Rule("any", Effect.DENY, Action.SUBSCRIBE, "test/nosubscribe"), Rule("any", Effect.ALLOW, Action.BOTH, "#")]
    for topic_filter, detail in [
        ("#", (True, [0])),
        ("+/+", (True, [0])),
        ("test/nosubscribe", (False, [])),
        ("test/x", (True, [])),
        ("test/nosubscribe/+", (True, [])),
    ]:
        assert linear_subscribe_detail(paho, ident, values, topic_filter) == detail, topic_filter


# -- carve-outs: what a granted filter delivers ---------------------------------------------------------


@st.composite
def narrower(draw: st.DrawFn, pattern: str, values: dict[str, str] | None) -> str:
    """A filter (`values` given: placeholders bound) or a pattern inside `pattern`, often strictly narrower."""
    wild = ["+", "#"] if values is not None else ["+", "#", "res-*", "${team}", "${project}"]
    out: list[str] = []
    for lv in parse_pattern(pattern):
        if lv.kind is LevelKind.LITERAL:
            out.append(lv.text)
        elif lv.kind is LevelKind.PLUS:
            # Kept often: a wildcard filter is where a narrower deny can carve out.
            out.append(draw(st.sampled_from([*LEVELS, *["+"] * 12, *wild[2:]])))
        elif lv.kind is LevelKind.PREFIX:
            out.append(draw(st.sampled_from([lv.text + "x", lv.text + "ab12"] + ([] if values else [lv.text + "*"]))))
        elif lv.kind is LevelKind.PLACEHOLDER:
            out.append((values.get(lv.text) or "v") if values is not None else "${" + lv.text + "}")
        else:
            out += draw(st.lists(st.sampled_from([*LEVELS[:8], "+", "+", "+", *wild[2:]]), max_size=3))
            if draw(st.booleans()) or not out:
                out.append("#")
    return "/".join(out) or "+"  # an empty filter is invalid: `+` is inside any pattern `+` too


@st.composite
def overlapping(draw: st.DrawFn, topic_filter: str) -> str:
    """A pattern sharing topics with the filter without either covering the other, often."""
    parts = topic_filter.split("/")
    literal = [i for i, part in enumerate(parts) if part not in ("+", "#")]
    if literal:
        parts[draw(st.sampled_from(literal))] = "+"
    return draw(narrower("/".join(parts), None))


@st.composite
def truncated(draw: st.DrawFn, topic_filter: str) -> str:
    """A deny ending in `#` before the filter does, with a literal where the filter has `+` (`a/b/#` for `a/+/c`):
    it shares topics with the filter through its `#` without covering it."""
    parts = topic_filter.split("/")
    last = len(parts) - (2 if parts[-1] == "#" else 1)  # a `+` before this level has a real level after it
    plus = [i for i, part in enumerate(parts[:last]) if part == "+"]
    if not plus:
        return draw(narrower(topic_filter, None))
    i = draw(st.sampled_from(plus))
    return "/".join([*parts[:i], draw(levels_st), "#"])


@st.composite
def carve_cases(draw: st.DrawFn, kind: str, values: dict[str, str]) -> tuple[list[Rule], str]:
    """A wide allow, deny rules narrower than, overlapping or covering a filter it covers (mostly before it,
    some after), and random rules: the shapes where carve-outs happen."""
    wide = draw(rules(team_scoped=False))
    who = draw(st.sampled_from(["any", kind]))
    pattern = wide.pattern if wide.pattern.endswith("#") or draw(st.integers(0, 3)) == 0 else wide.pattern + "/#"
    wide = Rule(who, Effect.ALLOW, draw(st.sampled_from([Action.SUBSCRIBE, Action.BOTH])), pattern)
    topic_filter = draw(narrower(wide.pattern, values))
    out = draw(st.lists(rules(team_scoped=False), max_size=3))
    for _ in range(draw(st.integers(1, 4))):
        pattern = draw(
            st.one_of(
                narrower(topic_filter, None),
                truncated(topic_filter),
                overlapping(topic_filter),
                narrower(wide.pattern, None),  # sometimes covers the filter
                rules(team_scoped=False).map(lambda r: r.pattern),
            )
        )
        action = draw(st.sampled_from([Action.SUBSCRIBE, Action.BOTH, Action.PUBLISH]))
        deny = Rule(draw(st.sampled_from(["any", kind, kind, "device"])), Effect.DENY, action, pattern)
        out.insert(draw(st.integers(0, len(out))), deny)
    out.insert(len(out) - draw(st.integers(0, 1)) if out else 0, wide)
    return out, topic_filter


@SETTINGS
@given(team_identities(), st.sampled_from(["flowfuse", "none"]), st.data())
def test_a_granted_filter_delivers_by_first_match_on_the_topic(
    ident: tuple[Identity, str], preset: str, data: st.DataObject
) -> None:
    """(2) a carved-out topic is never delivered; (3) nothing is delivered that no allow rule allows."""
    identity, client_id = ident
    values = placeholder_values(identity, client_id)
    rule_list, topic_filter = data.draw(carve_cases(identity.kind.value, values))
    engine = AclEngine(rule_list, preset=preset)
    acl = engine.for_client(identity, client_id, cache_size=0)
    everything = list(engine.rules)
    granted, expected = linear_subscribe_detail(everything, identity, values, topic_filter)
    decision = acl.explain_subscribe(topic_filter)
    assert acl.check_subscribe(topic_filter) is granted is decision.allowed, topic_filter
    assert [engine.sources.index(c.source) for c in decision.carve_outs] == expected, topic_filter
    if not granted:
        return
    carve_outs = [c.rule for c in decision.carve_outs if c.rule is not None]
    fill, tail = st.lists(levels_st, max_size=6), st.lists(levels_st, max_size=3)
    samples = [sample_topic(topic_filter, data.draw(fill), data.draw(tail)) for _ in range(2)]
    denies = carve_outs or [r for r in rule_list if not r.allows]  # topics inside them hit the carve-outs
    for topic in samples + [data.draw(derived_topics(denies, values)) for _ in range(3)]:
        if not filter_matches(topic_filter, topic):
            continue
        readers = [
            r
            for r in everything
            if applies(r, identity) and r.subscribes and (rx := pattern_regex(r, values)) and rx.fullmatch(topic)
        ]
        delivered = acl.check_receive(topic)
        # The session delivers iff check_receive: exactly first match on the concrete topic.
        assert delivered is linear_topic(everything, identity, values, topic, False, False), (topic_filter, topic)
        if delivered:
            assert any(r.allows for r in readers), (topic_filter, topic)
        else:
            # The filter's covering allow matches the topic, so an earlier deny did: one of the carve-outs.
            assert readers and not readers[0].allows and readers[0] in carve_outs, (topic_filter, topic)
