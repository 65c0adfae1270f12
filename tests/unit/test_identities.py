"""Identities from FlowFuse's username forms (acl/identity.py), which names may authenticate
(broker.auth.users.username_problem), and what the new kinds get from placeholders, rules and the preset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acl import AclEngine, Action, Effect, Identity, IdentityKind, Rule, parse_identity
from acl.identity import FORM_HEADS, ONE_TIME_KINDS, TEAM_BROKER_KINDS, USERNAME_FORMS, is_recognised
from acl.placeholders import placeholder_values
from acl.rules import WHO_VALUES
from broker.auth.users import RESERVED_USERNAMES, username_problem

K = IdentityKind

# Every form FlowFuse uses today, with the fields it must yield.
FORMS: list[tuple[str, Identity]] = [
    ("forge_platform", Identity(K.PLATFORM, "forge_platform")),
    ("project:team1:p1", Identity(K.PROJECT, "project:team1:p1", team="team1", project="p1")),
    ("device:team1:d1", Identity(K.DEVICE, "device:team1:d1", team="team1", device="d1")),
    ("alice@team1", Identity(K.TEAMCLIENT, "alice@team1", team="team1")),
    ("mq:hosted:team1:inst1", Identity(K.TEAMNODE, "mq:hosted:team1:inst1", team="team1", project="inst1")),
    ("mq:remote:team1:dev1", Identity(K.TEAMNODE, "mq:remote:team1:dev1", team="team1", device="dev1")),
    ("frontend:team1:dev1", Identity(K.FRONTEND, "frontend:team1:dev1", team="team1", device="dev1")),
    (
        "fe-team:user1:team1:sess1",
        Identity(K.TEAMFRONTEND, "fe-team:user1:team1:sess1", team="team1", user="user1", session="sess1"),
    ),
    ("expert-client:user1:sess1", Identity(K.EXPERTCLIENT, "expert-client:user1:sess1", user="user1", session="sess1")),
    ("expert-agent:api:v1", Identity(K.EXPERTAGENT, "expert-agent:api:v1")),
    ("agent:team1@team1", Identity(K.TEAMAGENT, "agent:team1@team1", team="team1")),
    ("alice", Identity(K.USER, "alice")),
]
RECOGNISED = [name for name, ident in FORMS if ident.kind is not K.USER]


@pytest.mark.parametrize(("username", "expected"), FORMS, ids=[name for name, _ in FORMS])
def test_every_form(username: str, expected: Identity) -> None:
    assert parse_identity(username) == expected


@pytest.mark.parametrize("username", [None, ""])
def test_no_username_is_anonymous(username: str | None) -> None:
    assert parse_identity(username) == Identity(K.ANONYMOUS, None)


# Near misses of every form: wrong part count, empty parts, wrong literal, wrong case, ':' or '@' where
# the form has none. Each is a plain user, without any team.
MALFORMED = [
    "project:a",
    "project:a:b:c",
    "project::b",
    "project:a:",
    "device:a",
    "device:a:b:c",
    "mq:hosted:t",
    "mq:hosted:t:i:ha1",  # a client id of mq:hosted:t:i, not a username
    "mq:remote:t:d:x",
    "mq:other:t:i",
    "mq:hosted::i",
    "mq::t:i",
    "mq:t:i",
    "frontend:t",
    "frontend:t:d:x",
    "frontend::d",
    "fe-team:u:t",
    "fe-team:u:t:s:x",
    "fe-team:u::s",
    "expert-client:u",
    "expert-client:u:s:x",
    "expert-client::s",
    "expert-agent:api",
    "expert-agent:api:v1:x",
    "expert-agent::v1",
    "agent:team1@team2",  # not the platform's form: the team appears twice
    "agent:@team1",
    "agent:team1@",
    "agent:team1@team1@team1",
    "agent:a:team1@team1",
    "agent@team1:x",
    "Agent:team1@team1",
    "MQ:hosted:t:i",
    "FE-TEAM:u:t:s",
    "a:b@team1",  # a ':' in a Team Broker client name: not a Team Broker client
    "alice@team1:x",
    "project:t1:p1:n@t2",
    "@team1",
    "alice@",
    "a@b@c",
    "forge_platform2",
    "forge_platform:x",
    "Project:a:b",
]


@pytest.mark.parametrize("username", MALFORMED)
def test_malformed_forms_are_plain_users_without_team(username: str) -> None:
    ident = parse_identity(username)
    assert ident == Identity(K.USER, username)
    assert not is_recognised(username)


@pytest.mark.parametrize("username", [m for m in MALFORMED if ":" in m])
def test_malformed_forms_with_a_colon_cannot_authenticate(username: str) -> None:
    problem = username_problem(username)
    assert problem is not None and "contains ':'" in problem


@pytest.mark.parametrize("username", ["@team1", "alice@", "a@b@c", "forge_platform2"])
def test_malformed_forms_without_a_colon_are_ordinary_users(username: str) -> None:
    assert username_problem(username) is None


# -- team labels (metrics) -----------------------------------------------------------------------------


TEAM_LABELS = [
    ("project:team1:p1", "team1"),
    ("device:team1:d1", "team1"),
    ("alice@team1", "team1"),
    ("mq:hosted:team1:i", "team1"),
    ("mq:remote:team1:d", "team1"),
    ("frontend:team1:d", "team1"),
    ("fe-team:u:team1:s", "team1"),
    ("agent:team1@team1", "team1"),
    ("expert-client:u:s", None),  # the assistant's names carry no team
    ("expert-agent:api:v1", None),
    ("forge_platform", None),
    ("alice", None),
    ("agent:team1@team2", None),  # unknown forms: `_none`
    ("mq:hosted:team1", None),
    (None, None),
]


@pytest.mark.parametrize(("username", "team"), TEAM_LABELS)
def test_team_label_comes_from_the_form(username: str | None, team: str | None) -> None:
    assert parse_identity(username).team == team


# -- username_problem ----------------------------------------------------------------------------------


@pytest.mark.parametrize("username", [*RECOGNISED, "alice", "alice@team1"])
def test_every_recognised_form_may_authenticate(username: str) -> None:
    assert username_problem(username) is None


@pytest.mark.parametrize(
    "username",
    ["anonymous", "project", "device", "mq", "frontend", "fe-team", "expert-client", "expert-agent", "agent"],
)
def test_form_heads_are_reserved(username: str) -> None:
    """A plain user `mq` would own, under the prefix rule, every `mq:...` client id."""
    assert username in RESERVED_USERNAMES
    assert username_problem(username) == f"{username!r} is reserved"


def test_reserved_names_are_the_form_heads() -> None:
    assert set(RESERVED_USERNAMES) == FORM_HEADS | {"anonymous"}
    assert {form.head for form in USERNAME_FORMS} - {None} == FORM_HEADS


@pytest.mark.parametrize(
    "username",
    [
        "anonymous:x",  # the upstream namespace of anonymous clients
        "project:team1",  # a ':'-prefix of a form
        "mq:hosted",
        "mq:hosted:team1",
        "fe-team:u:team1",
        "expert-agent:api",
        "a:b",
        "alice:",
        ":",
        ":alice",
    ],
)
def test_unknown_colon_forms_are_refused(username: str) -> None:
    problem = username_problem(username)
    assert problem is not None and "contains ':'" in problem


def test_refusal_names_the_accepted_forms() -> None:
    problem = username_problem("a:b")
    assert problem is not None
    for shape in ["project:<team>:<project>", "mq:hosted:<team>:<instance>", "fe-team:<user>:<team>:<session>"]:
        assert shape in problem


# -- kinds, placeholders, rules, preset ----------------------------------------------------------------


def test_kind_groups() -> None:
    assert {K.FRONTEND, K.TEAMFRONTEND, K.EXPERTCLIENT} == ONE_TIME_KINDS
    assert {K.TEAMCLIENT, K.TEAMNODE, K.TEAMAGENT} == TEAM_BROKER_KINDS


def test_every_kind_is_a_rule_who() -> None:
    assert {k.value for k in IdentityKind} | {"any"} == WHO_VALUES
    for who in ["teamnode", "teamagent", "frontend", "teamfrontend", "expertclient", "expertagent"]:
        Rule(who, Effect.ALLOW, Action.BOTH, "x/#")


def test_placeholder_values_of_the_new_forms() -> None:
    assert placeholder_values(parse_identity("fe-team:u1:team1:s1"), "cid") == {
        "team": "team1",
        "user": "u1",
        "session": "s1",
        "username": "fe-team:u1:team1:s1",
        "clientid": "cid",
    }
    assert placeholder_values(parse_identity("mq:hosted:team1:i1"), "c")["project"] == "i1"
    assert placeholder_values(parse_identity("mq:remote:team1:d1"), "c")["device"] == "d1"
    assert "team" not in placeholder_values(parse_identity("expert-client:u1:s1"), "c")


def test_team_frontend_will_rule_with_user_and_session() -> None:
    """fe-team's will goes to ff/v1/<team>/u/<user>/s/<session>/disconnected: one rule serves every tab."""
    rule = Rule("teamfrontend", Effect.ALLOW, Action.PUBLISH, "ff/v1/${team}/u/${user}/s/${session}/disconnected")
    engine = AclEngine([rule])
    tab = engine.for_client(parse_identity("fe-team:u1:team1:s1"), "fe-team:u1:team1:s1")
    assert tab.check_publish("ff/v1/team1/u/u1/s/s1/disconnected")
    for other in [
        "ff/v1/team2/u/u1/s/s1/disconnected",
        "ff/v1/team1/u/u2/s/s1/disconnected",
        "ff/v1/team1/u/u1/s/s2/disconnected",
    ]:
        assert not tab.check_publish(other)
    # Identities without user/session: the rule does not apply.
    assert not engine.for_client(parse_identity("expert-client:u1:s1"), "c").check_publish(
        "ff/v1/team1/u/u1/s/s1/disconnected"
    )


def test_user_placeholder_does_not_apply_without_a_user() -> None:
    engine = AclEngine([Rule("any", Effect.ALLOW, Action.BOTH, "x/${user}/#")])
    assert engine.for_client(parse_identity("expert-client:u1:s1"), "c").check_publish("x/u1/a")
    assert not engine.for_client(parse_identity("frontend:t:u1"), "c").check_publish("x/u1/a")


def test_flowfuse_preset_for_team_broker_nodes_and_agent() -> None:
    engine = AclEngine([], preset="flowfuse")
    node = engine.for_client(parse_identity("mq:hosted:team1:i1"), "mq:hosted:team1:i1")
    assert node.check_publish("ff/v1/team1/c/x") and node.check_subscribe("ff/v1/team1/c/#")
    assert not node.check_publish("ff/v1/team2/c/x") and not node.check_subscribe("ff/v1/+/c/#")
    agent = engine.for_client(parse_identity("agent:team1@team1"), "agent:team1@team1")
    assert agent.check_subscribe("ff/v1/team1/c/#") and agent.check_receive("ff/v1/team1/c/a/b")
    assert not agent.check_publish("ff/v1/team1/c/x")
    assert not agent.check_subscribe("ff/v1/team2/c/#")


@pytest.mark.parametrize(
    "username", ["frontend:team1:d1", "fe-team:u:team1:s", "expert-client:u:s", "expert-agent:api:v1"]
)
def test_flowfuse_preset_gives_browsers_and_assistant_nothing(username: str) -> None:
    """Their rights need the platform's database (acl.source: http) or operator rules."""
    acl = AclEngine([], preset="flowfuse").for_client(parse_identity(username), username)
    for topic in ["ff/v1/team1/c/x", "ff/v1/team1/d/d1/logs", "ff/v1/team1/u/u/s/s/disconnected", "x"]:
        assert not acl.check_publish(topic) and not acl.check_receive(topic)


# -- properties ----------------------------------------------------------------------------------------

PART = st.text(alphabet="at1:@-_/+#", min_size=0, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(PART, st.sampled_from([*sorted(FORM_HEADS), "hosted", "remote", ":", "@"])), max_size=6))
def test_parse_is_total_and_consistent(pieces: list[str]) -> None:
    """Any username parses; a recognised one has non-empty fields without ':', and can authenticate."""
    username = "".join(pieces)
    ident = parse_identity(username)
    if not username:
        assert ident.kind is K.ANONYMOUS
        return
    assert ident.username == username
    fields = [ident.team, ident.project, ident.device, ident.user, ident.session]
    if ident.kind is K.USER:
        assert fields == [None] * 5
        assert (username_problem(username) is None) == (":" not in username and username not in RESERVED_USERNAMES)
    else:
        assert all(f is None or (f and ":" not in f) for f in fields)
        assert username_problem(username) is None


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["project", "device", "mq:hosted", "mq:remote", "frontend", "fe-team", "expert-client"]),
    st.lists(st.text(alphabet="abc1-_@/", min_size=1, max_size=5), min_size=3, max_size=3),
)
def test_forms_round_trip(head: str, parts: list[str]) -> None:
    shape = {
        "project": ("team", "project"),
        "device": ("team", "device"),
        "mq:hosted": ("team", "project"),
        "mq:remote": ("team", "device"),
        "frontend": ("team", "device"),
        "fe-team": ("user", "team", "session"),
        "expert-client": ("user", "session"),
    }[head]
    values = dict(zip(shape, parts, strict=False))
    ident = parse_identity(":".join([head, *values.values()]))
    assert ident.kind is not K.USER
    for name, value in values.items():
        assert getattr(ident, name) == value
