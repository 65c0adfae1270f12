"""The client-id rule per identity form (acl/client_ids.py), and that no identity can use another's ids."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from acl import Identity, IdentityKind, parse_identity
from acl.client_ids import CLIENT_ID_RULES, EXACT, PREFIX, agent_client_id, client_id_allowed, client_id_rule
from acl.identity import FORM_HEADS
from broker.auth.users import username_problem

K = IdentityKind

# username, rule by default, rule with acl.client_id_suffix: true
RULES = [
    ("project:team1:p1", PREFIX, PREFIX),
    ("device:team1:d1", PREFIX, PREFIX),
    ("forge_platform", PREFIX, PREFIX),
    ("alice", PREFIX, PREFIX),
    ("alice@team1", EXACT, PREFIX),  # FlowFuse's Team Broker rule; FlowFuse issue 8163 asks for the suffix
    ("agent:team1@team1", EXACT, PREFIX),
    ("mq:hosted:team1:i1", PREFIX, PREFIX),  # <username>:<haId> in HA mode
    ("mq:remote:team1:d1", PREFIX, PREFIX),
    ("frontend:team1:d1", PREFIX, PREFIX),
    ("fe-team:u1:team1:s1", PREFIX, PREFIX),
    ("expert-client:u1:s1", PREFIX, PREFIX),
    ("expert-agent:api:v1", PREFIX, PREFIX),
    (None, PREFIX, PREFIX),  # unused: the session namespaces anonymous ids itself
]


@pytest.mark.parametrize(("username", "default", "with_suffix"), RULES)
def test_rule_table(username: str | None, default: str, with_suffix: str) -> None:
    ident = parse_identity(username)
    assert client_id_rule(ident, suffix_allowed=False) == default
    assert client_id_rule(ident, suffix_allowed=True) == with_suffix


@pytest.mark.parametrize("kind", list(IdentityKind))
@pytest.mark.parametrize("suffix", [False, True])
def test_every_kind_has_a_rule(kind: IdentityKind, suffix: bool) -> None:
    rule = client_id_rule(Identity(kind, "x"), suffix)
    assert rule in CLIENT_ID_RULES == {PREFIX, EXACT}
    assert (rule == EXACT) is (kind in (K.TEAMCLIENT, K.TEAMAGENT) and not suffix)


# FlowFuse's own client ids, each allowed for its identity under the identity's default rule.
FLOWFUSE_IDS = [
    ("project:team1:p1", "project:team1:p1:n"),
    ("project:team1:p1", "project:team1:p1:n:ab12"),
    ("forge_platform", "forge_platform:0123456789abcdef"),
    ("device:team1:d1", "device:team1:d1"),
    ("alice@team1", "alice@team1"),
    ("mq:hosted:team1:i1", "mq:hosted:team1:i1"),
    ("mq:hosted:team1:i1", "mq:hosted:team1:i1:ha1"),
    ("mq:remote:team1:d1", "mq:remote:team1:d1"),
    ("frontend:team1:d1", "frontend:team1:d1"),
    ("fe-team:u1:team1:s1", "fe-team:u1:team1:s1"),
    ("expert-client:u1:s1", "expert-client:u1:s1"),
    ("expert-agent:api:v1", "expert-agent:api:v1"),
    ("agent:team1@team1", "agent:team1@team1"),
]


@pytest.mark.parametrize(("username", "client_id"), FLOWFUSE_IDS)
def test_flowfuse_ids_are_allowed(username: str, client_id: str) -> None:
    rule = client_id_rule(parse_identity(username), suffix_allowed=False)
    assert client_id_allowed(rule, username, client_id)


@pytest.mark.parametrize(
    ("rule", "client_id", "ok"),
    [
        (PREFIX, "alice", True),
        (PREFIX, "alice:x", True),
        (PREFIX, "alice:x:y", True),
        (PREFIX, "alice:", False),  # empty suffix: decided against (docs/acl.md)
        (PREFIX, "alice::", True),  # the suffix is ":" here, not empty
        (PREFIX, "", False),  # the session assigns one
        (PREFIX, "alicex", False),
        (PREFIX, "xalice", False),
        (PREFIX, "bob:alice", False),
        (PREFIX, "Alice", False),
        (EXACT, "alice", True),
        (EXACT, "alice:x", False),
        (EXACT, "alice:", False),
        (EXACT, "", False),
        (EXACT, "alice ", False),
    ],
)
def test_client_id_allowed(rule: str, client_id: str, ok: bool) -> None:
    assert client_id_allowed(rule, "alice", client_id) is ok


def test_team_broker_client_suffix_opt_in() -> None:
    ident = parse_identity("alice@team1")
    assert not client_id_allowed(client_id_rule(ident, False), "alice@team1", "alice@team1:phone")
    assert client_id_allowed(client_id_rule(ident, True), "alice@team1", "alice@team1:phone")
    assert not client_id_allowed(client_id_rule(ident, True), "alice@team1", "alice@team1:")


def test_schema_agent_connects_with_the_client_id_flowfuse_gives_it() -> None:
    """FlowFuse hands its schema agent `agent:<team>@<team>` the client id `<team>-agent@<team>`: allowed
    (under both rules), and only for the agent of that very team (docs/acl.md)."""
    ident = parse_identity("agent:team1@team1")
    for suffix in (False, True):
        rule = client_id_rule(ident, suffix)
        assert client_id_allowed(rule, "agent:team1@team1", "team1-agent@team1")
        assert client_id_allowed(rule, "agent:team1@team1", "agent:team1@team1")
        assert not client_id_allowed(rule, "agent:team1@team1", "team2-agent@team2")
        assert not client_id_allowed(rule, "agent:team1@team1", "team1-agent@team2")
    # Nobody else gets the alias: not another team's agent, not a look-alike username.
    for username in ("agent:team2@team2", "agent:team1@team2", "team1-agent@team1", "xagent:team1@team1"):
        rule = client_id_rule(parse_identity(username), False)
        assert not client_id_allowed(rule, username, "team1-agent@team1") or username == "team1-agent@team1"
    assert agent_client_id("agent:t@t") == "t-agent@t" and agent_client_id("agent:t@u") is None


def test_empty_username_allows_nothing() -> None:
    assert not client_id_allowed(PREFIX, "", "")
    assert not client_id_allowed(PREFIX, "", "x")
    assert not client_id_allowed(EXACT, "", "")


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown client-id rule"):
        client_id_allowed("PREFIX", "alice", "alice")


OTHERS = [
    "project:team2:p1",
    "project:team1:p2",
    "device:team2:d1",
    "forge_platform",
    "bob@team1",
    "alice@team2",
    "agent:team2@team2",
    "mq:hosted:team2:i1",
    "mq:remote:team2:d1",
    "frontend:team2:d1",
    "fe-team:u2:team1:s1",
    "expert-client:u2:s1",
    "expert-agent:api:v1",
]


@pytest.mark.parametrize("owner", [u for u, _, _ in RULES if u is not None])
@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("suffix", [False, True])
def test_other_identities_ids_are_refused(owner: str, other: str, suffix: bool) -> None:
    if other == owner:
        return
    rule = client_id_rule(parse_identity(owner), suffix)
    for client_id in [other, f"{other}:n", f"{other}:n:ab12", f"{other}:auto-1"]:
        assert not client_id_allowed(rule, owner, client_id)


# -- the isolation property ----------------------------------------------------------------------------

# Tokens that build near misses of every form: heads, separators, the literal parts, team-like parts.
TOKENS = [
    *sorted(FORM_HEADS),
    "anonymous",
    "forge_platform",
    "hosted",
    "remote",
    "api",
    "v1",
    ":",
    ":",
    "@",
    "t1",
    "t2",
    "x",
    "",
]
names = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=9).map("".join)

# Usernames of every recognised form, built from a small alphabet so that forms overlap as much as they can.
part = st.text(alphabet="t1x-@", min_size=1, max_size=3)
recognised = st.one_of(
    st.just("forge_platform"),
    st.builds(lambda t, p: f"project:{t}:{p}", part, part),
    st.builds(lambda t, d: f"device:{t}:{d}", part, part),
    st.builds(lambda k, t, i: f"mq:{k}:{t}:{i}", st.sampled_from(["hosted", "remote"]), part, part),
    st.builds(lambda t, d: f"frontend:{t}:{d}", part, part),
    st.builds(lambda u, t, s: f"fe-team:{u}:{t}:{s}", part, part, part),
    st.builds(lambda u, s: f"expert-client:{u}:{s}", part, part),
    st.builds(lambda a, v: f"expert-agent:{a}:{v}", part, part),
    st.text(alphabet="t1x-", min_size=1, max_size=3).map(lambda t: f"agent:{t}@{t}"),
    st.builds(
        lambda n, t: f"{n}@{t}",
        st.text(alphabet="t1x-", min_size=1, max_size=3),
        st.text(alphabet="t1x-", min_size=1, max_size=3),
    ),
)
usernames = st.one_of(st.sampled_from([*TOKENS[:-1], "alice", "alice@", "a@b@c"]), names, recognised)


@st.composite
def username_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two usernames, often one inside the other's `<username>:` namespace: independent, B = A + ':' + a
    tail (maybe ending in `@<team>`), or A = B cut at one of its ':' (a head or a longer prefix)."""
    a = draw(usernames)
    mode = draw(st.integers(0, 3))
    if mode == 0:
        return a, draw(usernames)
    if mode == 1:
        return a, f"{a}:{draw(names)}"
    if mode == 2:
        return a, f"{a}:{draw(names)}@{draw(st.sampled_from(['t1', 't2', 'x']))}"
    b = draw(usernames)
    cuts = [i for i, c in enumerate(b) if c == ":"]
    if not cuts:
        return a, b
    return b[: draw(st.sampled_from(cuts))], b


# Most pairs are filtered (assume): the interesting ones are rare by design, so the filter check is off.
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(username_pairs(), st.sampled_from(["", "n", "x:y", "ha1", ":"]), st.sampled_from(sorted(CLIENT_ID_RULES)))
@example(("project:t1:p1", "fe-team:u:t1:s"), "n", PREFIX)
@example(("alice@t1", "agent:t1@t1"), "x", PREFIX)
def test_no_identity_can_use_another_identitys_ids(pair: tuple[str, str], tail: str, rule: str) -> None:
    """For two usernames that may both authenticate, no client id allowed for A under any rule is B's
    username or starts with B's username + ':' (so it is neither B's id under exact nor under prefix)."""
    a, b = pair
    assume(a != b and username_problem(a) is None and username_problem(b) is None)
    for owner, other in ((a, b), (b, a)):
        for client_id in [other, f"{other}:{tail}", f"{other}:n", owner, f"{owner}:{tail}"]:
            if client_id_allowed(rule, owner, client_id):
                assert client_id != other and not client_id.startswith(other + ":"), (owner, other, client_id)
                # Nor an id of the upstream namespace of anonymous clients (`anonymous:<their id>`).
                assert not client_id.startswith("anonymous:"), (owner, client_id)
    # The lemma behind it: neither username lies in the other's `<username>:` namespace.
    assert not b.startswith(a + ":") and not a.startswith(b + ":")


@pytest.mark.parametrize(
    ("owner", "inside"),
    [
        ("project:t1:p1", "project:t1:p1:n@t2"),  # a ':' in a Team Broker client name
        ("agent", "agent:t1@t1"),
        ("mq", "mq:hosted:t1:x"),
        ("alice@t1", "alice@t1:x"),
        ("anonymous", "anonymous:x"),
        ("expert-agent", "expert-agent:api:v1"),
        ("fe-team", "fe-team:u:t1:s"),
        ("a", "a:b"),
        ("forge_platform", "forge_platform:x"),
        ("mq:hosted:t1:x", "mq:hosted:t1:x:ha1"),
    ],
)
def test_a_name_inside_anothers_namespace_cannot_authenticate(owner: str, inside: str) -> None:
    """Each pair: `inside` lies in `owner`'s namespace, so one of them must be refused."""
    assert inside.startswith(owner + ":")
    assert username_problem(owner) is not None or username_problem(inside) is not None
