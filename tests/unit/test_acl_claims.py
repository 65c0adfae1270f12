"""Unit tests of acl.claims: EMQX-style ACL claims, and the policy that checks them before the fallback."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acl import AclEngine, Action, Effect, Rule, parse_identity
from acl.claims import ClaimDecision, ClaimPolicy, ClaimRule, bind_topic, parse_acl_claim
from broker.session.audit import explain_rule

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Fixed:
    """A fallback that answers the same for everything and records what it was asked."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str]] = []

    def check_publish(self, topic: str, retain: bool = False) -> bool | None:
        self.asked.append(("publish", topic))
        return self.answer

    def check_receive(self, topic: str) -> bool | None:
        self.asked.append(("receive", topic))
        return self.answer

    def check_subscribe(self, topic_filter: str) -> bool | None:
        self.asked.append(("subscribe", topic_filter))
        return self.answer


def allow(topic: str, action: str = "all", **extra: Any) -> dict[str, Any]:
    return {"permission": "allow", "action": action, "topic": topic, **extra}


def deny(topic: str, action: str = "all", **extra: Any) -> dict[str, Any]:
    return {"permission": "deny", "action": action, "topic": topic, **extra}


def policy(
    claim: object, fallback: Any, username: str | None = "alice", client_id: str | None = "alice:n"
) -> ClaimPolicy:
    parsed = parse_acl_claim(claim)
    return ClaimPolicy(parsed.rules, fallback, username, client_id, exclusive=parsed.exclusive)


# -- parsing -----------------------------------------------------------------------------------------


def test_list_form_parses_in_order() -> None:
    parsed = parse_acl_claim(
        [allow("a/#", "publish"), deny("b/+", "subscribe"), allow("c", "all", retain=False, qos=[0, 1, 2])]
    )
    assert not parsed.exclusive
    assert parsed.rules == (
        ClaimRule(True, True, False, "a/#"),
        ClaimRule(False, False, True, "b/+"),
        ClaimRule(True, True, True, "c", retain=False),
    )


def test_old_object_form_is_an_exclusive_allow_list() -> None:
    parsed = parse_acl_claim({"pub": ["p/#"], "sub": ["s/+"], "all": ["x"]})
    assert parsed.exclusive
    assert parsed.rules == (
        ClaimRule(True, True, False, "p/#"),
        ClaimRule(True, False, True, "s/+"),
        ClaimRule(True, True, True, "x"),
    )


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        ("a/#", "must be a list"),
        (None, "must be a list"),
        ([["a"]], "must be an object"),
        ([{"permission": "maybe", "action": "all", "topic": "a"}], "permission"),
        ([{"permission": "allow", "action": "pub", "topic": "a"}], "action"),
        ([{"permission": "allow", "action": "all"}], "non-empty string"),
        ([allow("")], "non-empty string"),
        ([allow("a/#/b")], "'#' must be the whole last level"),
        ([allow("a+/b")], "'+' must be a whole level"),
        ([allow("a/\x00")], "U+0000"),
        ([allow("t/${team}")], "unknown placeholder"),
        ([allow("t/${clientid")], "unterminated placeholder"),
        ([allow("$share/g/a")], "shared subscription"),
        ([allow("eq t/#")], "'eq' topic prefix"),
        ([allow("t", qos=[1])], "qos restrictions"),
        ([allow("t", qos="all")], "qos must be"),
        ([allow("t", retain="yes")], "retain"),
        ([allow("t", clientid_re="^a")], "unsupported key"),
        ({"pub": ["a"], "pubsub": ["b"]}, "unsupported key"),
        ({"pub": "a"}, "must be a list"),
        ({"sub": ["a/#/b"]}, "acl.sub[0]"),
    ],
)
def test_malformed_claims_are_refused(claim: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_acl_claim(claim)


def test_retain_is_dropped_from_subscribe_rules() -> None:
    (rule,) = parse_acl_claim([allow("t", "subscribe", retain=True)]).rules
    assert rule.retain is None


def test_claim_rule_validates_when_built_directly() -> None:
    with pytest.raises(ValueError, match="publish, subscribe or both"):
        ClaimRule(True, False, False, "a")
    with pytest.raises(ValueError, match="non-empty"):
        ClaimRule(True, True, False, "")


def test_claim_rule_presents_itself_like_an_engine_rule() -> None:
    rule = ClaimRule(False, True, True, "a/${clientid}")
    assert (rule.effect, rule.action, rule.pattern) == (Effect.DENY, Action.BOTH, "a/${clientid}")
    assert ClaimRule(True, False, True, "a").action is Action.SUBSCRIBE


# -- order: claims first, then the fallback ---------------------------------------------------------------


def test_claim_allow_comes_before_a_fallback_deny() -> None:
    fallback = Fixed(False)
    p = policy([allow("web/#")], fallback)
    assert p.check_publish("web/a") is True
    assert p.check_subscribe("web/+/x") is True
    assert p.check_receive("web/a/b") is True
    assert fallback.asked == []


def test_deny_claim_overrides_a_fallback_allow() -> None:
    fallback = Fixed(True)
    p = policy([deny("secret/#")], fallback)
    assert p.check_publish("secret/x") is False
    assert p.check_receive("secret/x") is False
    assert p.check_subscribe("secret/x/#") is False
    assert p.check_subscribe("secret") is False
    assert fallback.asked == []
    assert p.check_publish("open/x") is True
    assert fallback.asked == [("publish", "open/x")]


def test_a_deny_claim_narrower_than_the_filter_carves_it_out() -> None:
    """A wider filter is not the deny claim's to refuse: the fallback decides it, the claim drops its topics."""
    fallback = Fixed(True)
    p = policy([deny("secret/#")], fallback)
    assert p.check_subscribe("#") is True
    assert p.check_subscribe("+/x") is True
    assert fallback.asked == [("subscribe", "#"), ("subscribe", "+/x")]
    assert p.check_receive("secret/x") is False and p.check_receive("secret") is False
    assert p.check_receive("open/x") is True


def test_a_deny_claim_before_a_covering_allow_claim_carves_out() -> None:
    rules = [deny("a/secret", "subscribe"), allow("a/#", "subscribe"), deny("a/late", "subscribe")]
    p = policy(rules, Fixed(False))
    assert p.check_subscribe("a/#") is True and p.check_subscribe("a/+") is True
    assert p.check_subscribe("a/secret") is False
    assert p.check_receive("a/secret") is False and p.check_receive("a/x") is True
    assert p.check_subscribe("a/late") is True and p.check_receive("a/late") is True  # after the allow
    parsed = parse_acl_claim(rules).rules
    granted = ClaimDecision(True, parsed[1], "jwt acl claim[1]", (ClaimDecision(False, parsed[0], "jwt acl claim[0]"),))
    assert p.explain_subscribe("a/#") == granted
    assert p.explain_subscribe("a/x/#") == ClaimDecision(True, parsed[1], "jwt acl claim[1]")
    assert p.explain_subscribe("a/secret") == ClaimDecision(False, parsed[0], "jwt acl claim[0]")


def test_paho_nosubscribe_claim_over_the_engine() -> None:
    engine = AclEngine([Rule("any", Effect.ALLOW, Action.BOTH, "#")], preset="none")
    acl = engine.for_client(parse_identity("alice"), "alice")
    p = policy([deny("test/nosubscribe", "subscribe")], acl)
    assert p.check_subscribe("#") is True and p.check_subscribe("+/+") is True
    assert p.check_subscribe("$share/g/#") is True
    assert p.check_subscribe("test/nosubscribe") is False
    assert p.check_subscribe("$share/g/test/nosubscribe") is False
    assert p.check_receive("test/nosubscribe") is False and p.check_receive("test/other") is True


def test_placeholder_deny_claims_carve_out() -> None:
    own = [deny("c/${clientid}/secret/#", "subscribe"), allow("c/${clientid}/#", "subscribe")]
    p = policy(own, Fixed(False), client_id="n1")
    assert p.check_subscribe("c/n1/#") is True and p.check_receive("c/n1/secret/x") is False
    assert p.check_subscribe("c/n1/secret/+") is False and p.check_receive("c/n1/open") is True
    assert p.check_subscribe("c/n2/#") is False  # no claim covers it: the fallback said no
    # An unusable client id widens the deny to `c/#`: it refuses what it covers and drops the rest.
    wide = policy([deny("c/${clientid}/x", "subscribe")], Fixed(True), client_id="a/b")
    assert wide.check_subscribe("c/#") is False and wide.check_subscribe("c/+/x") is False
    assert wide.check_subscribe("#") is True and wide.check_receive("c/q") is False


def test_first_matching_claim_wins() -> None:
    p = policy([deny("a/b"), allow("a/#")], Fixed(False))
    assert p.check_publish("a/b") is False
    assert p.check_publish("a/c") is True
    q = policy([allow("a/#"), deny("a/b")], Fixed(False))
    assert q.check_publish("a/b") is True


def test_unmatched_operations_get_the_fallback_answer_unchanged() -> None:
    for answer in (True, False, None):
        p = policy([allow("a/#")], Fixed(answer))
        assert p.check_publish("b", retain=True) is answer
        assert p.check_receive("b") is answer
        assert p.check_subscribe("b/#") is answer


def test_the_fallback_can_be_the_acl_engine() -> None:
    engine = AclEngine([Rule("any", Effect.ALLOW, Action.BOTH, "ff/v1/${team}/c/#")], preset="none")
    acl = engine.for_client(parse_identity("alice@team1"), "alice@team1")
    p = policy([deny("ff/v1/team1/c/readonly/#", "publish")], acl, username="alice@team1")
    assert p.check_publish("ff/v1/team1/c/x") is True
    assert p.check_publish("ff/v1/team1/c/readonly/x") is False
    assert p.check_receive("ff/v1/team1/c/readonly/x") is True  # a publish-only deny
    assert p.check_publish("ff/v1/team2/c/x") is False


def test_publish_only_and_subscribe_only_claims() -> None:
    p = policy([allow("up/#", "publish"), allow("down/#", "subscribe")], Fixed(False))
    assert p.check_publish("up/x") is True
    assert p.check_receive("up/x") is False
    assert p.check_subscribe("up/#") is False
    assert p.check_publish("down/x") is False
    assert p.check_receive("down/x") is True
    assert p.check_subscribe("down/x/+") is True


def test_retain_qualifies_publish_claims() -> None:
    p = policy([deny("t", "publish", retain=True), allow("t", "publish", retain=False)], Fixed(None))
    assert p.check_publish("t", retain=False) is True
    assert p.check_publish("t", retain=True) is False
    q = policy([allow("t", "all", retain=False)], Fixed(False))
    assert q.check_publish("t", retain=True) is False  # the fallback's answer
    assert q.check_receive("t") is True


# -- subscriptions -----------------------------------------------------------------------------------


def test_an_allow_claim_must_cover_the_whole_filter() -> None:
    fallback = Fixed(None)
    p = policy([allow("a/+/c", "subscribe")], fallback)
    assert p.check_subscribe("a/x/c") is True
    assert p.check_subscribe("a/+/c") is True
    assert p.check_subscribe("a/#") is None  # only partly covered: the fallback decides
    assert p.check_subscribe("a/+/+") is None
    assert fallback.asked == [("subscribe", "a/#"), ("subscribe", "a/+/+")]


def test_dollar_topics_are_not_reached_by_wildcard_claims() -> None:
    p = policy([deny("+/x"), allow("#")], Fixed(None))
    assert p.check_publish("$SYS/x") is None
    assert p.check_receive("$SYS/broker") is None
    assert p.check_subscribe("$SYS/#") is None
    assert p.check_publish("a/x") is False


def test_shared_subscriptions_are_denied_but_never_granted_by_claims() -> None:
    fallback = Fixed(False)
    p = policy([allow("a/#"), deny("a/secret")], fallback)
    assert p.check_subscribe("$share/g/a/b") is False  # the fallback said no
    assert fallback.asked == [("subscribe", "$share/g/a/b")]
    assert p.check_subscribe("$share/g/a/secret") is False  # covered by the deny claim: not asked
    assert len(fallback.asked) == 1
    assert p.check_subscribe("$share/g/a/#") is False  # the deny claim only carves out: the fallback decides
    assert fallback.asked[1:] == [("subscribe", "$share/g/a/#")]
    assert policy([allow("a/#")], Fixed(True)).check_subscribe("$share/g/a/b") is True
    assert policy([deny("a/secret")], Fixed(True)).check_subscribe("$share/g/a/#") is True
    assert p.check_subscribe("$share/g") is False
    assert p.check_subscribe("$share//a") is False


def test_invalid_topics_and_filters_are_denied_without_asking() -> None:
    fallback = Fixed(True)
    p = policy([allow("a/#")], fallback)
    assert p.check_publish("a/+") is False
    assert p.check_publish("") is False
    assert p.check_receive("a/#") is False
    assert p.check_subscribe("a/#/b") is False
    assert fallback.asked == []


def test_decisions_are_cached_per_topic_but_fallback_answers_are_not() -> None:
    fallback = Fixed(None)
    p = policy([allow("a/#")], fallback)
    for _ in range(3):
        assert p.check_publish("a/x") is True
        assert p.check_publish("b/x") is None
    fallback.answer = True
    assert p.check_publish("b/x") is True
    assert len(fallback.asked) == 4


# -- the old object form is exclusive --------------------------------------------------------------------


def test_old_form_denies_what_it_does_not_list() -> None:
    fallback = Fixed(True)
    p = policy({"pub": ["up/#"], "sub": ["down/#"]}, fallback)
    assert p.check_publish("up/a") is True
    assert p.check_receive("down/a") is True
    assert p.check_subscribe("down/a/#") is True
    assert p.check_publish("down/a") is False
    assert p.check_receive("elsewhere") is False
    assert p.check_subscribe("$share/g/down/a") is False
    assert p.check_publish("$SYS/x") is False
    assert fallback.asked == []


# -- placeholders ------------------------------------------------------------------------------------


def test_placeholders_bind_to_the_identity_and_the_client_id() -> None:
    p = policy([allow("u/${username}/#"), allow("c/${clientid}"), allow("d/dev-${clientid}-s")], Fixed(False))
    assert p.check_publish("u/alice/x") is True
    assert p.check_publish("u/bob/x") is False
    assert p.check_publish("c/alice:n") is True
    assert p.check_publish("d/dev-alice:n-s") is True
    assert p.check_subscribe("u/${username}/#") is False  # the literal text is nobody's topic


@pytest.mark.parametrize("client_id", ["a/b", "+", "#", "", None, "x\x00"])
def test_an_unusable_value_never_widens_an_allow_and_never_narrows_a_deny(client_id: str | None) -> None:
    allow_p = policy([allow("c/${clientid}/x")], Fixed(False), client_id=client_id)
    assert allow_p.check_publish("c/a/b/x") is False
    assert allow_p.check_subscribe("c/+/x") is False
    deny_p = policy([deny("c/${clientid}/x")], Fixed(True), client_id=client_id)
    assert deny_p.check_publish("c/a/b/x") is False  # what "a/b" would have made
    assert deny_p.check_publish("c//x") is False  # what "" would have made
    assert deny_p.check_publish("elsewhere") is True


def test_bind_topic() -> None:
    values = {"username": "alice", "clientid": "$c/1"}
    assert bind_topic("a/${username}", values, allow=True) == "a/alice"
    assert bind_topic("a/${clientid}/b", values, allow=True) is None
    assert bind_topic("a/${clientid}/b", values, allow=False) == "a/#"
    assert bind_topic("${clientid}/b", values, allow=False) == "$c/#"
    assert bind_topic("${clientid}/b", {}, allow=False) == "#"
    # A value is inserted once, never read again as a placeholder.
    assert bind_topic("a/${clientid}", {"clientid": "${username}"}, allow=True) == "a/${username}"


# -- explanations ------------------------------------------------------------------------------------


def test_explain_names_the_claim_that_decided() -> None:
    p = policy([allow("ok/#"), deny("no/#")], Fixed(True))
    decision = p.explain_publish("no/x")
    assert isinstance(decision, ClaimDecision)
    assert (decision.allowed, decision.source) == (False, "jwt acl claim[1]")
    assert decision.rule == ClaimRule(False, True, True, "no/#")
    assert p.explain_subscribe("ok/+").source == "jwt acl claim[0]"
    assert p.explain_receive("ok/a").allowed is True
    assert explain_rule(p, "publish", "no/x") == "jwt acl claim[1]: deny both no/#"
    assert explain_rule(p, "deliver", "no/x") == "jwt acl claim[1]: deny both no/#"


def test_explain_forwards_to_a_fallback_that_can_explain() -> None:
    engine = AclEngine([Rule("any", Effect.DENY, Action.BOTH, "x/#")], preset="none")
    acl = engine.for_client(parse_identity("alice"), "alice")
    p = policy([allow("ok/#")], acl)
    assert p.explain_publish("x/1").source == "rules[0]"
    assert p.explain_receive("y/1").source == "default deny"
    assert p.explain_subscribe("x/#").source.startswith("rules[0]")
    assert explain_rule(p, "publish", "x/1") == "rules[0]: deny both x/#"


def test_explain_without_a_fallback_explanation() -> None:
    p = policy([allow("ok/#")], Fixed(True))
    decision = p.explain_subscribe("other")
    assert (decision.allowed, decision.rule, decision.source) == (True, None, "no jwt acl claim matched")
    assert p.explain_publish("a/+").source == "invalid topic name"
    assert p.explain_subscribe("a/#/b").source == "invalid topic filter"
    exclusive = policy({"pub": ["ok"]}, Fixed(True))
    assert exclusive.explain_publish("other").source.startswith("jwt acl claim: no pub/sub/all entry")


# -- properties --------------------------------------------------------------------------------------

LEVELS = ["a", "b", "c", "", "$SYS", "x"]
level_st = st.sampled_from(LEVELS)


def covers(pattern: str, topic_filter: str) -> bool:
    """Reference: every topic of the filter matches the (placeholder-free) pattern, `$` rule included."""
    p, f = pattern.split("/"), topic_filter.split("/")
    for i, level in enumerate(f):
        if i >= len(p):
            return False
        if p[i] == "#":
            return not (i == 0 and level.startswith("$"))
        if level == "#":
            # `x/#` also matches `x`, so only a pattern `#` covers it; but at the root `#` means one level or more.
            return i == 0 and p[i] == "+" and p[i + 1 : i + 2] == ["#"]
        if p[i] == "+":
            if i == 0 and level.startswith("$"):
                return False
        elif level == "+" or p[i] != level:
            return False
    return len(p) == len(f) or (len(p) == len(f) + 1 and p[-1] == "#")


def matches(topic_filter: str, topic: str) -> bool:
    """Reference MQTT matching, `$` rule included."""
    f, t = topic_filter.split("/"), topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


@st.composite
def claim_filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(level_st, st.just("+")), min_size=0, max_size=4))
    if draw(st.booleans()) or parts in ([], [""]):
        parts.append("#")
    return "/".join(parts)


topic_st = st.lists(level_st, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def filter_over(draw: st.DrawFn, topic: str) -> str:
    """A filter that matches ``topic``: some levels become `+`, maybe the tail becomes `#`."""
    levels = topic.split("/")
    out = [("+" if draw(st.booleans()) and not (i == 0 and lv.startswith("$")) else lv) for i, lv in enumerate(levels)]
    cut = draw(st.integers(0, len(out)))
    if draw(st.booleans()) and not (cut == 0 and levels[0].startswith("$")):
        out = [*out[:cut], "#"]
    return "/".join(out)


@SETTINGS
@given(
    claim_filters(),
    st.sampled_from(["publish", "subscribe", "all"]),
    st.lists(st.tuples(claim_filters(), st.sampled_from(["publish", "subscribe", "all"])), max_size=4),
    topic_st,
    st.data(),
)
def test_a_deny_claim_is_never_overridden_by_the_fallback(
    denied: str, action: str, later: list[tuple[str, str]], topic: str, data: st.DataObject
) -> None:
    claim = [deny(denied, action), *(allow(f, a) for f, a in later)]
    p = policy(claim, Fixed(True))
    if not matches(denied, topic):
        return
    if action != "subscribe":
        assert p.check_publish(topic) is False
        assert p.check_publish(topic, retain=True) is False
    if action != "publish":
        assert p.check_receive(topic) is False
        assert p.check_subscribe(topic) is False
        # A wider filter may be granted (the fallback says yes), but never delivers the topic (above).
        topic_filter = data.draw(filter_over(topic))
        if covers(denied, topic_filter):
            assert p.check_subscribe(topic_filter) is False


@SETTINGS
@given(st.lists(st.tuples(claim_filters(), st.booleans()), min_size=1, max_size=5), st.data())
def test_an_allowed_subscription_only_delivers_allowed_topics(
    claims: list[tuple[str, bool]], data: st.DataObject
) -> None:
    p = policy([allow(f, "subscribe") if ok else deny(f, "subscribe") for f, ok in claims], Fixed(False))
    topic = data.draw(topic_st)
    topic_filter = data.draw(filter_over(topic))
    if p.check_subscribe(topic_filter):
        # Delivered by first match on the topic; a topic a deny claim takes is one of the grant's carve-outs.
        first = next(((f, ok) for f, ok in claims if matches(f, topic)), None)
        assert first is not None  # the covering allow claim matches it at least
        assert p.check_receive(topic) is first[1]
        if not first[1]:
            carve_outs = p.explain_subscribe(topic_filter).carve_outs  # type: ignore[attr-defined]
            assert first[0] in [c.rule.topic_filter for c in carve_outs]


def test_covers_reference() -> None:
    for pattern, topic_filter, expected in [
        ("#", "#", True),
        ("#", "$SYS/#", False),
        ("+/#", "#", True),
        ("a/#", "a", True),
        ("a/#", "a/+/b", True),
        ("a/+/#", "a/#", False),
        ("a/+", "a/#", False),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("+/x", "$SYS/x", False),
        ("a", "a/#", False),
    ]:
        assert covers(pattern, topic_filter) is expected, (pattern, topic_filter)
