"""Unit tests of the ACL engine: identities, matching, the flowfuse preset, subscribe decisions."""

from __future__ import annotations

import pytest

from acl import PRESETS, AclEngine, Action, ClientAcl, Effect, Identity, IdentityKind, Rule, parse_identity
from acl.engine import Decision

ALLOW, DENY = Effect.ALLOW, Effect.DENY
PUB, SUB, BOTH = Action.PUBLISH, Action.SUBSCRIBE, Action.BOTH


def client(
    username: str | None,
    rules: list[Rule] | None = None,
    preset: str = "flowfuse",
    client_id: str = "cid",
    share_groups: list[str] | None = None,
) -> ClientAcl:
    engine = AclEngine(rules or [], preset=preset, share_groups=share_groups)
    return engine.for_client(parse_identity(username), client_id)


PROJECT = "project:team1:p1"


# -- identities --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("project:team1:p1", Identity(IdentityKind.PROJECT, "project:team1:p1", team="team1", project="p1")),
        ("device:team1:d1", Identity(IdentityKind.DEVICE, "device:team1:d1", team="team1", device="d1")),
        ("forge_platform", Identity(IdentityKind.PLATFORM, "forge_platform")),
        ("alice@team1", Identity(IdentityKind.TEAMCLIENT, "alice@team1", team="team1")),
        ("alice", Identity(IdentityKind.USER, "alice")),
        (None, Identity(IdentityKind.ANONYMOUS, None)),
        ("", Identity(IdentityKind.ANONYMOUS, None)),
    ],
)
def test_parse_identity_forms(username: str | None, expected: Identity) -> None:
    assert parse_identity(username) == expected


@pytest.mark.parametrize(
    "username",
    [
        "project:a",
        "project:a:b:c",
        "project::b",
        "project:a:",
        "device:a",
        "device:a:b:c",
        "@team1",
        "alice@",
        "a@b@c",
        "forge_platform2",
        "Project:a:b",
    ],
)
def test_malformed_forms_are_plain_users(username: str) -> None:
    ident = parse_identity(username)
    assert ident.kind is IdentityKind.USER
    assert ident.team is None and ident.project is None and ident.device is None


# -- matching semantics ------------------------------------------------------------------------------


def user_rules(*patterns: str, effect: Effect = ALLOW, action: Action = BOTH) -> ClientAcl:
    return client("alice", [Rule("any", effect, action, p) for p in patterns], preset="none")


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/+", "a/", True),
        ("a/+", "a", False),
        ("a/+/b", "a//b", True),
        ("+/+", "/", True),
        ("#", "x", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/${username}", "a/alice", True),
        ("${username}/x", "alice/x", True),
        ("a/${username}", "a/bob", False),
        ("a/res-*", "a/res-1", True),
        ("a/res-*", "a/res-", False),
        ("a/res-*", "a/res", False),
        ("a/res-*", "a/xres-1", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, matches: bool) -> None:
    acl = user_rules(pattern)
    assert acl.check_publish(topic) is matches
    assert acl.check_receive(topic) is matches


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b"])
def test_invalid_topic_names_are_denied(topic: str) -> None:
    acl = user_rules("#")
    assert not acl.check_publish(topic)
    assert not acl.check_receive(topic)
    assert acl.explain_publish(topic).source == "invalid topic name"


def test_default_deny() -> None:
    acl = user_rules("a/b")
    assert acl.explain_publish("x").source == "default deny"
    assert not acl.check_subscribe("x")


def test_first_match_wins_and_deny_overrides_later_allow() -> None:
    rules = [Rule("any", DENY, BOTH, "a/secret"), Rule("any", ALLOW, BOTH, "a/#")]
    acl = client("alice", rules, preset="none")
    assert not acl.check_publish("a/secret")
    assert acl.check_publish("a/other")
    d = acl.explain_publish("a/secret")
    assert d == acl.explain_publish("a/secret") and d.source == "rules[0]" and d.rule == rules[0]
    assert acl.explain_publish("a/x").source == "rules[1]"
    # A wider filter is granted: the deny carves its topic out of the deliveries; the topic itself is refused.
    assert acl.check_subscribe("a/#") and acl.check_subscribe("a/+") and acl.check_subscribe("a/x/#")
    assert not acl.check_receive("a/secret") and acl.check_receive("a/other")
    assert not acl.check_subscribe("a/secret")
    assert acl.explain_subscribe("a/secret").source == "rules[0]"
    assert acl.explain_subscribe("a/+").carve_outs == (acl.explain_receive("a/secret"),)


def test_allow_before_deny_wins() -> None:
    acl = client("alice", [Rule("any", ALLOW, BOTH, "a/#"), Rule("any", DENY, BOTH, "a/secret")], preset="none")
    assert acl.check_publish("a/secret") and acl.check_subscribe("a/#")


def test_who_restricts_rules() -> None:
    rules = [Rule("user", ALLOW, BOTH, "u/#"), Rule("anonymous", ALLOW, BOTH, "anon/#")]
    eng = AclEngine(rules)
    alice = eng.for_client(parse_identity("alice"), "c")
    anon = eng.for_client(parse_identity(None), "c")
    assert alice.check_publish("u/x") and not alice.check_publish("anon/x")
    assert anon.check_publish("anon/x") and not anon.check_publish("u/x")


def test_user_rules_checked_before_preset() -> None:
    acl = client(PROJECT, [Rule("project", DENY, BOTH, "ff/v1/${team}/c/private/#")])
    assert not acl.check_publish("ff/v1/team1/c/private/x")
    assert acl.check_publish("ff/v1/team1/c/public")
    assert acl.check_subscribe("ff/v1/team1/c/#") and not acl.check_receive("ff/v1/team1/c/private/x")
    assert not acl.check_subscribe("ff/v1/team1/c/private/#")
    assert acl.check_subscribe("ff/v1/team1/c/public/#")
    assert acl.explain_publish("ff/v1/team1/c/public").source == "preset flowfuse[8]"


def test_retain_false_allows_only_non_retained() -> None:
    acl = client("alice", [Rule("any", ALLOW, PUB, "a/#", retain=False)], preset="none")
    assert acl.check_publish("a/x")
    assert not acl.check_publish("a/x", retain=True)
    # The non-retained result is cached separately from the retained one.
    assert acl.check_publish("a/x")


def test_retain_falls_through_to_later_rule() -> None:
    rules = [
        Rule("any", ALLOW, PUB, "a/#", retain=False),
        Rule("any", DENY, PUB, "a/#"),
        Rule("any", ALLOW, PUB, "b/#", retain=True),
    ]
    acl = client("alice", rules, preset="none")
    assert acl.explain_publish("a/x", retain=True).source == "rules[1]"
    assert acl.check_publish("b/x", retain=True) and not acl.check_publish("b/x")


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#b", "a/#b", "", "a\x00", "te/am", "+", "#"])
def test_unusable_placeholder_values_never_match(bad: str) -> None:
    rules = [Rule("any", ALLOW, BOTH, "x/${clientid}/y"), Rule("any", ALLOW, BOTH, "z/${clientid}")]
    acl = AclEngine(rules).for_client(parse_identity("alice"), bad)
    for topic in ["x/a/b/y", "x/a+b/y", "x/a#b/y", "x//y", "x/a/y", "z/", "z/a", "z/a/b"]:
        assert not acl.check_publish(topic)
        assert not acl.check_receive(topic)
    for topic_filter in ["x/+/y", "x/#", "z/+", "#", "x/a/b/y"]:
        assert not acl.check_subscribe(topic_filter)


def test_team_with_slash_gets_nothing_from_preset() -> None:
    acl = client("project:te/am:p1")
    assert acl.identity.team == "te/am"
    assert not acl.check_publish("ff/v1/te/am/c/x")
    assert not acl.check_publish("ff/v1/te/c/x")
    assert not acl.check_subscribe("ff/v1/+/+/c/#")


def test_undefined_placeholder_does_not_apply() -> None:
    acl = client("device:team1:d1", [Rule("any", ALLOW, BOTH, "x/${project}/#")])
    assert not acl.check_publish("x/d1/a")
    assert not acl.check_subscribe("x/+/#")


def test_first_level_placeholder_never_matches_dollar() -> None:
    acl = client("$SYS", [Rule("any", ALLOW, BOTH, "${username}/#")], preset="none")
    assert not acl.check_publish("$SYS/broker")
    assert not acl.check_subscribe("$SYS/#")


def test_sys_topics_need_explicit_rules() -> None:
    acl = client("forge_platform")
    assert not acl.check_receive("$SYS/broker/uptime")
    assert not acl.check_subscribe("$SYS/#")
    assert not acl.check_subscribe("#")
    sysacl = client("alice", [Rule("user", ALLOW, SUB, "$SYS/#")], preset="none")
    assert sysacl.check_subscribe("$SYS/#") and sysacl.check_receive("$SYS/x")
    assert not sysacl.check_subscribe("#") and not sysacl.check_subscribe("+/x")


def test_hash_pattern_covers_wildcards_but_not_dollar() -> None:
    acl = user_rules("#")
    assert acl.check_subscribe("#") and acl.check_subscribe("+/+") and acl.check_subscribe("a/#")
    assert not acl.check_subscribe("$SYS/#")


def test_deny_rule_on_dollar_does_not_block_wildcards() -> None:
    acl = client("alice", [Rule("any", DENY, SUB, "$SYS/#"), Rule("any", ALLOW, SUB, "#")], preset="none")
    assert acl.check_subscribe("#") and acl.check_subscribe("+/x")
    assert not acl.check_subscribe("$SYS/x")


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "allowed"),
    [
        ("a/+", "a/#", False),
        ("a/+/#", "a/#", False),
        ("+/#", "#", True),
        ("+/+/#", "#", False),
        ("a/#", "a", True),
        ("a/#", "a/+/+", True),
        ("a/+", "a/+", True),
        ("a/+", "a/+/+", False),
        ("a/b", "a/+", False),
        ("+/b", "$x/b", False),
    ],
)
def test_cover_edges(pattern: str, topic_filter: str, allowed: bool) -> None:
    assert user_rules(pattern, action=SUB).check_subscribe(topic_filter) is allowed


def test_prefix_level_cover() -> None:
    acl = user_rules("a/res-*/#", action=SUB)
    assert acl.check_subscribe("a/res-1/#")
    assert acl.check_subscribe("a/res-abcd1234/x")
    assert not acl.check_subscribe("a/+/#")
    assert not acl.check_subscribe("a/res-/x")
    deny = client("alice", [Rule("any", DENY, SUB, "a/res-*/x"), Rule("any", ALLOW, SUB, "a/#")], preset="none")
    # The deny covers neither filter: both are granted, with its topics carved out.
    assert deny.check_subscribe("a/+/x") and deny.check_subscribe("a/#")
    assert not deny.check_receive("a/res-1/x") and deny.check_receive("a/res-/x")
    assert not deny.check_subscribe("a/res-1/x") and deny.check_subscribe("a/res-1/+")
    assert deny.check_subscribe("a/res/x")
    assert deny.check_subscribe("a/resx/#")


def test_cache_bounded_and_disableable() -> None:
    eng = AclEngine([], preset="flowfuse")
    acl = eng.for_client(parse_identity(PROJECT), "c", cache_size=4)
    for i in range(20):
        assert acl.check_receive(f"ff/v1/team1/p/x{i}/out/t")
        assert len(acl._recv_cache) <= 4
    nocache = eng.for_client(parse_identity(PROJECT), "c", cache_size=0)
    assert nocache.check_receive("ff/v1/team1/p/x/out/t")
    assert not nocache._recv_cache


# -- deny rules that carve out (docs/acl.md) ----------------------------------------------------------


def carved(acl: ClientAcl, topic_filter: str) -> list[str] | None:
    """The sources of a granted filter's carve-outs; None when the filter is refused."""
    d = acl.explain_subscribe(topic_filter)
    assert d.allowed is acl.check_subscribe(topic_filter), topic_filter
    return [c.source for c in d.carve_outs] if d.allowed else None


PAHO = [Rule("any", DENY, SUB, "test/nosubscribe"), Rule("any", ALLOW, BOTH, "#")]


@pytest.mark.parametrize(
    ("topic_filter", "carve_outs"),
    [
        ("#", ["rules[0]"]),
        ("+/+", ["rules[0]"]),
        ("test/+", ["rules[0]"]),
        ("test/#", ["rules[0]"]),
        ("+/nosubscribe", ["rules[0]"]),
        ("$share/g/#", ["rules[0]"]),
        ("$share/g/+/+", ["rules[0]"]),
        ("test/other", []),
        ("+", []),
        ("test/nosubscribe/#", ["rules[0]"]),  # `#` matches the parent level too
        ("test/nosubscribe/+", []),
        ("test/nosubscribe", None),
        ("$share/g/test/nosubscribe", None),
        ("$SYS/#", None),
    ],
)
def test_paho_nosubscribe(topic_filter: str, carve_outs: list[str] | None) -> None:
    acl = client("alice", PAHO, preset="none")
    assert carved(acl, topic_filter) == carve_outs


def test_paho_nosubscribe_deliveries_and_explain() -> None:
    acl = client("alice", PAHO, preset="none")
    assert not acl.check_receive("test/nosubscribe")
    assert acl.check_receive("test/other") and acl.check_receive("test/nosubscribe/x")
    assert acl.check_publish("test/nosubscribe")  # a subscribe-only deny
    granted = acl.explain_subscribe("#")
    assert (granted.allowed, granted.rule, granted.source) == (True, PAHO[1], "rules[1]")
    assert granted.carve_outs == (Decision(False, PAHO[0], "rules[0]"),)
    refused = acl.explain_subscribe("test/nosubscribe")
    assert (refused.allowed, refused.rule, refused.source, refused.carve_outs) == (False, PAHO[0], "rules[0]", ())


@pytest.mark.parametrize("deny_first", [True, False])
def test_flowfuse_allow_foo_bar_deny_ben(deny_first: bool) -> None:
    allow, deny = Rule("any", ALLOW, BOTH, "foo/bar/#"), Rule("any", DENY, BOTH, "foo/bar/ben")
    acl = client("alice", [deny, allow] if deny_first else [allow, deny], preset="none")
    assert acl.check_receive("foo/bar/bob") and acl.check_receive("foo/bar/ben/x")
    if deny_first:
        assert carved(acl, "foo/bar/#") == carved(acl, "foo/bar/+") == ["rules[0]"]
        assert carved(acl, "+/+/ben") is None  # no allow rule covers it
        assert carved(acl, "foo/bar/ben") is None
        assert not acl.check_receive("foo/bar/ben") and not acl.check_publish("foo/bar/ben")
    else:
        # First match: the allow covers every topic of these filters, so the later deny never decides.
        assert carved(acl, "foo/bar/#") == carved(acl, "foo/bar/ben") == []
        assert acl.check_receive("foo/bar/ben")


@pytest.mark.parametrize(
    ("deny", "topic_filter", "carve_outs"),
    [
        ("a/#", "a/#", None),  # covered: refused
        ("a/#", "a", None),
        ("a/#", "a/b/+", None),
        ("a/#", "#", ["rules[0]"]),
        ("a/#", "+/b", ["rules[0]"]),
        ("a/+", "a/x", None),
        ("a/+", "a/+", None),
        ("a/+", "a/#", ["rules[0]"]),  # `a` and `a/x/y` stay deliverable
        ("a/+/c", "a/b/#", ["rules[0]"]),  # overlapping, neither covers the other
        ("a/+/c", "a/+/+", ["rules[0]"]),
        ("a/+/c", "a/b/d", []),
        ("+/#", "#", None),  # `+/#` covers `#`
        ("$SYS/#", "#", []),  # `#` never matches `$` topics
    ],
)
def test_deny_covering_the_filter_refuses_a_narrower_one_carves_out(
    deny: str, topic_filter: str, carve_outs: list[str] | None
) -> None:
    acl = client("alice", [Rule("any", DENY, SUB, deny), Rule("any", ALLOW, SUB, "#")], preset="none")
    assert carved(acl, topic_filter) == carve_outs


def test_overlapping_deny_drops_only_its_topics() -> None:
    acl = client("alice", [Rule("any", DENY, SUB, "a/+/c"), Rule("any", ALLOW, SUB, "#")], preset="none")
    assert acl.check_subscribe("a/b/#")
    assert not acl.check_receive("a/b/c")
    assert acl.check_receive("a/b") and acl.check_receive("a/b/d") and acl.check_receive("a/b/c/d")


def test_carve_outs_list_every_earlier_deny_and_only_those() -> None:
    rules = [
        Rule("any", DENY, SUB, "a/x"),
        Rule("device", DENY, SUB, "a/y"),  # not this client's kind
        Rule("any", DENY, PUB, "a/z"),  # publish only
        Rule("any", ALLOW, SUB, "a/p"),  # a partial allow before the covering one: grants a/p only
        Rule("any", DENY, SUB, "a/+/w"),
        Rule("any", ALLOW, SUB, "a/#"),
        Rule("any", DENY, SUB, "a/v"),  # after the covering allow: never applies
    ]
    acl = client("alice", rules, preset="none")
    assert carved(acl, "a/#") == ["rules[0]", "rules[4]"]
    assert carved(acl, "a/+") == ["rules[0]"]
    assert acl.check_receive("a/y") and acl.check_receive("a/z") and acl.check_receive("a/v")
    assert not acl.check_receive("a/x") and not acl.check_receive("a/q/w")
    assert carved(acl, "a/p") == []
    # No allow covers the filter: refused whatever the denies are.
    assert acl.explain_subscribe("+/x").source == "default deny (no rule allows every topic of the filter)"


SECRET = Rule("project", DENY, SUB, "ff/v1/${team}/c/secret/#")


def test_placeholder_deny_carves_out_of_the_flowfuse_preset() -> None:
    acl = client(PROJECT, [SECRET])
    assert carved(acl, "ff/v1/team1/c/#") == ["rules[0]"]
    assert carved(acl, "ff/v1/team1/c/+/x") == ["rules[0]"]
    assert carved(acl, "$share/p1/ff/v1/team1/c/#") == ["rules[0]"]
    assert carved(acl, "ff/v1/team1/c/open/#") == []
    for refused in ("ff/v1/team1/c/secret/#", "ff/v1/team1/c/secret", "$share/p1/ff/v1/team1/c/secret/+"):
        assert carved(acl, refused) is None, refused
    assert not acl.check_receive("ff/v1/team1/c/secret") and not acl.check_receive("ff/v1/team1/c/secret/x")
    assert acl.check_receive("ff/v1/team1/c/open") and acl.check_publish("ff/v1/team1/c/secret/x")
    # The carve-out never widens anything: other teams stay refused, and team2's deny is its own secret.
    assert carved(acl, "ff/v1/team2/c/#") is None and carved(acl, "ff/v1/+/c/#") is None
    other = client("project:team2:p3", [SECRET])
    assert not other.check_receive("ff/v1/team2/c/secret/x") and other.check_subscribe("ff/v1/team2/c/#")
    # Other kinds are not concerned by a project-only deny.
    assert carved(client("alice@team1", [SECRET]), "ff/v1/team1/c/#") == []


def test_placeholder_deny_without_a_value_does_not_apply() -> None:
    rules = [Rule("any", DENY, SUB, "x/${project}/#"), Rule("any", ALLOW, SUB, "x/#")]
    assert carved(client("device:team1:d1", rules, preset="none"), "x/#") == []
    project = client(PROJECT, rules, preset="none")
    assert carved(project, "x/#") == ["rules[0]"] and carved(project, "x/p1/+") is None
    assert not project.check_receive("x/p1") and project.check_receive("x/p2")


# -- flowfuse preset ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "publish", "receive"),
    [
        ("ff/v1/team1/p/p2/out/x", False, True),
        ("ff/v1/team1/p/p1/out/x", True, True),
        ("ff/v1/team1/p/p1/out", True, True),
        ("ff/v1/team1/p/p1/in/x", True, True),
        ("ff/v1/team1/p/p2/in/x", True, False),
        ("ff/v1/team1/p/p1/res/x", True, True),
        ("ff/v1/team1/p/p2/res/x", True, False),
        ("ff/v1/team1/p/p1/res-ab12cd34/x", True, True),
        ("ff/v1/team1/p/p2/res-ab12cd34/x", True, False),
        ("ff/v1/team1/p/p1/res-/x", False, False),
        ("ff/v1/team1/p/p1/resx/x", False, False),
        ("ff/v1/team1/c/anything/deep", True, True),
        ("ff/v1/team1/c", True, True),
        ("ff/v1/team1/d/d1/status", False, False),
        ("ff/v1/team1/l/p1/command", False, False),
        ("ff/v1/team1/p/p1/other/x", False, False),
        ("ff/v1/team10/c/x", False, False),
        ("ff/v1/team2/p/p1/in/x", False, False),
        ("ff/v1/team2/p/p2/out/x", False, False),
        ("ff/v1/team2/c/x", False, False),
        ("ff/v2/team1/c/x", False, False),
        ("$SYS/broker/uptime", False, False),
    ],
)
def test_flowfuse_project(topic: str, publish: bool, receive: bool) -> None:
    acl = client(PROJECT)
    assert acl.check_publish(topic) is publish
    assert acl.check_receive(topic) is receive


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("ff/v1/team1/p/+/out/#", True),
        ("ff/v1/team1/p/p2/out/x", True),
        ("ff/v1/team1/p/p1/in/#", True),
        ("ff/v1/team1/p/p1/res/#", True),
        ("ff/v1/team1/p/p1/res-abcd1234/#", True),
        ("ff/v1/team1/c/#", True),
        ("ff/v1/team1/p/p1/+/#", False),
        ("ff/v1/team1/p/+/in/#", False),
        ("ff/v1/team1/p/p2/in/#", False),
        ("ff/v1/team1/p/p2/res-abcd1234/#", False),
        ("ff/v1/team1/#", False),
        ("ff/v1/team1/+/#", False),
        ("#", False),
        ("+/#", False),
        ("ff/v1/#", False),
        ("ff/v1/+/p/+/out/#", False),
        ("ff/+/team2/#", False),
        ("ff/v1/team2/c/#", False),
        ("ff/v1/team2/p/+/out/#", False),
        ("$SYS/#", False),
        ("ff/v1/team1/c/#/x", False),
        ("ff/v1/team1/c/a+", False),
        ("", False),
    ],
)
def test_flowfuse_project_subscribe(topic_filter: str, allowed: bool) -> None:
    assert client(PROJECT).check_subscribe(topic_filter) is allowed


def test_flowfuse_teamclient() -> None:
    acl = client("alice@team1")
    assert acl.check_publish("ff/v1/team1/c/x") and acl.check_receive("ff/v1/team1/c/x")
    assert acl.check_subscribe("ff/v1/team1/c/#")
    assert not acl.check_publish("ff/v1/team1/p/p1/in/x")
    assert not acl.check_receive("ff/v1/team1/p/p1/out/x")
    assert not acl.check_publish("ff/v1/team2/c/x")
    assert not acl.check_subscribe("ff/v1/+/c/#")


def test_flowfuse_device() -> None:
    acl = client("device:team1:d1")
    assert acl.check_publish("ff/v1/team1/d/d1/status") and acl.check_receive("ff/v1/team1/d/d1/command")
    assert acl.check_subscribe("ff/v1/team1/d/d1/#")
    assert not acl.check_publish("ff/v1/team1/d/d2/status")
    assert not acl.check_subscribe("ff/v1/team1/d/+/#")
    assert not acl.check_publish("ff/v1/team1/c/x")
    assert not acl.check_publish("ff/v1/team2/d/d1/status")


def test_flowfuse_platform() -> None:
    acl = client("forge_platform")
    assert acl.check_publish("ff/v1/team2/p/p1/in/x") and acl.check_subscribe("ff/v1/#")
    assert acl.check_subscribe("ff/v1/+/d/+/status")
    assert not acl.check_publish("other/x")
    assert not acl.check_subscribe("#")


@pytest.mark.parametrize("username", ["alice", None, "project:a", "team1"])
def test_flowfuse_users_and_anonymous_get_nothing(username: str | None) -> None:
    acl = client(username)
    for topic in ["ff/v1/team1/c/x", "ff/v1/a/c/x", "ff/v1/team1/p/p1/in/x", "x"]:
        assert not acl.check_publish(topic) and not acl.check_receive(topic)
    assert not acl.check_subscribe("#")


def test_preset_is_exactly_the_reference_rules() -> None:
    patterns = {(r.who, r.action.value, r.pattern) for r in PRESETS["flowfuse"]}
    assert ("project", "subscribe", "ff/v1/${team}/p/+/out/#") in patterns
    assert ("platform", "both", "ff/v1/#") in patterns
    assert all(r.effect is ALLOW for r in PRESETS["flowfuse"])
    assert PRESETS["none"] == []


# -- shared subscriptions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("$share/platform/ff/v1/team1/c/#", True),
        ("$share/browser/ff/v1/team1/p/+/out/#", True),
        ("$share/p1/ff/v1/team1/p/p1/in/#", True),
        ("$share/p2/ff/v1/team1/p/p1/in/#", False),
        ("$share/other/ff/v1/team1/c/#", False),
        ("$share/p1/ff/v1/team2/c/#", False),
        ("$share/p1/#", False),
        ("$share/g", False),
        ("$share/p1", False),
        ("$share/p1/", False),
        ("$share//ff/v1/team1/c/#", False),
        ("$share", False),
        ("$share/p+/ff/v1/team1/c/#", False),
    ],
)
def test_share_groups_flowfuse(topic_filter: str, allowed: bool) -> None:
    assert client(PROJECT).check_subscribe(topic_filter) is allowed


def test_share_group_explain() -> None:
    acl = client(PROJECT)
    assert acl.explain_subscribe("$share/x/ff/v1/team1/c/#").source == "share group 'x' not allowed"
    assert acl.explain_subscribe("$share/g").source == "malformed shared subscription"


def test_share_project_group_needs_project_identity() -> None:
    acl = client("alice@team1")
    assert not acl.check_subscribe("$share/${project}/ff/v1/team1/c/#")
    assert acl.check_subscribe("$share/browser/ff/v1/team1/c/#")


def test_share_groups_override_and_none_preset() -> None:
    acl = client("alice", [Rule("any", ALLOW, SUB, "a/#")], preset="none")
    assert acl.check_subscribe("$share/anything/a/#")
    assert not acl.check_subscribe("$share/anything/b/#")
    own = client("alice", [Rule("any", ALLOW, SUB, "a/#")], preset="none", share_groups=["${username}", "w"])
    assert own.check_subscribe("$share/alice/a/#") and own.check_subscribe("$share/w/a/#")
    assert not own.check_subscribe("$share/bob/a/#")


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"who": "admin"}, "unknown 'who'"),
        ({"effect": "maybe"}, "unknown effect"),
        ({"action": "read"}, "unknown action"),
        ({"pattern": "a/#/b"}, "'#' must be the last level"),
        ({"pattern": "a/b#"}, "whole level"),
        ({"pattern": "a/b+/c"}, "whole level"),
        ({"pattern": ""}, "non-empty"),
        ({"pattern": "a/${tenant}"}, "unknown placeholder"),
        ({"pattern": "a/x${team}"}, "whole level"),
        ({"pattern": "a/${team"}, "whole level"),
        ({"pattern": "a/*"}, "prefix"),
        ({"pattern": "a/b*c"}, "end of a level"),
        ({"pattern": "a\x00"}, "U\\+0000"),
        ({"action": "subscribe", "retain": False}, "retain"),
    ],
)
def test_rule_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"who": "any", "effect": "allow", "action": "both", "pattern": "a/b"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Rule(**args)  # type: ignore[arg-type]


def test_rule_coerces_strings() -> None:
    rule = Rule("any", "deny", "publish", "a")  # type: ignore[arg-type]
    assert rule.effect is DENY and rule.action is PUB


def test_engine_validation() -> None:
    with pytest.raises(ValueError, match="unknown ACL preset"):
        AclEngine([], preset="emqx")
    for bad in ["a/b", "g+", "x${team}", "${nope}", ""]:
        with pytest.raises(ValueError):
            AclEngine([], share_groups=[bad])


def test_the_bounded_cache_also_bounds_the_bytes_it_holds() -> None:
    from acl.cache import BYTES_MAX, KEY_MAX, BoundedCache

    cache: BoundedCache[bytes, bool] = BoundedCache(100_000)
    for i in range(5 * BYTES_MAX // KEY_MAX):  # long (but cacheable) topics, many of them
        cache.remember(b"t" * (KEY_MAX - 8) + f"{i:08d}".encode(), True)
        assert sum(len(k) for k in cache) <= BYTES_MAX  # never more than the byte bound
    assert 0 < len(cache) <= BYTES_MAX // KEY_MAX
    cache.clear()
    assert cache.held == 0 and not cache
    cache.remember(b"x" * (KEY_MAX + 1), True)
    assert not cache  # too long: never cached
