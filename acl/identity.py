"""Who a client is, derived from its MQTT username alone.

The username forms are FlowFuse's (see docs/acl.md, "Identities"). Each form is a full-match regex over
the whole username whose named groups become :class:`Identity` fields; a username matching no form is a
plain ``user`` (no team, no team rights). Which client ids an identity may use is decided from its
kind in :mod:`acl.client_ids`; which usernames may authenticate at all in ``broker.auth.users``
(``username_problem``), whose safety argument relies on the shapes below: every form but ``<name>@<team>``
starts with a fixed head followed by ``:``, has a fixed number of ``:``-separated, non-empty parts, and
no part contains ``:``; ``<name>@<team>`` contains no ``:`` at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

ANONYMOUS_CLIENT_PREFIX = "anonymous:"
"""Anonymous clients share one client-id namespace upstream (``anonymous:<id>``), apart from every user's."""


class IdentityKind(StrEnum):
    PROJECT = "project"  # project:<team>:<project>, a Node-RED instance's project-link nodes
    DEVICE = "device"  # device:<team>:<device>, a remote device agent
    PLATFORM = "platform"  # forge_platform
    TEAMCLIENT = "teamclient"  # <name>@<team>, a Team Broker client created by a user
    TEAMNODE = "teamnode"  # mq:hosted:<team>:<instance> / mq:remote:<team>:<device>, FlowFuse's MQTT nodes
    TEAMAGENT = "teamagent"  # agent:<team>@<team>, the team's Team Broker (topic schema) agent
    FRONTEND = "frontend"  # frontend:<team>:<device>, the browser viewing a device's logs (one-time)
    TEAMFRONTEND = "teamfrontend"  # fe-team:<user>:<team>:<session>, the browser's team channel (one-time)
    EXPERTCLIENT = "expertclient"  # expert-client:<user>:<session>, the assistant's browser client (one-time)
    EXPERTAGENT = "expertagent"  # expert-agent:<name>:<version> (expert-agent:api:v1), the assistant's agent
    USER = "user"  # any other non-empty username
    ANONYMOUS = "anonymous"  # no username


# The platform deletes these credentials after their first successful check (FlowFuse's one-time tokens).
ONE_TIME_KINDS: frozenset[IdentityKind] = frozenset(
    {IdentityKind.FRONTEND, IdentityKind.TEAMFRONTEND, IdentityKind.EXPERTCLIENT}
)
# Identities FlowFuse serves on the Team Broker, mounted at ff/v1/<team>/c/ (EMQX's client_attrs.team).
TEAM_BROKER_KINDS: frozenset[IdentityKind] = frozenset(
    {IdentityKind.TEAMCLIENT, IdentityKind.TEAMNODE, IdentityKind.TEAMAGENT}
)


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    username: str | None
    team: str | None = None
    project: str | None = None  # project:...'s project; mq:hosted:...'s instance (a FlowFuse project id)
    device: str | None = None  # device:..., frontend:... and mq:remote:...'s device
    user: str | None = None  # the FlowFuse user of fe-team:... and expert-client:...
    session: str | None = None  # the browser session of fe-team:... and expert-client:...


@dataclass(frozen=True, slots=True)
class UsernameForm:
    """One recognised username shape: a full-match regex whose named groups become Identity fields.

    ``head`` is the text before the form's first ``:`` (None for forms without a fixed head). A plain
    username equal to a head would own, under the client-id prefix rule, the ids of every identity of
    that form, so heads are reserved (``broker.auth.users.username_problem``)."""

    kind: IdentityKind
    regex: re.Pattern[str]
    head: str | None = None


_PART = r"[^:]+"  # one part of a ':'-separated form: non-empty, no ':'
_TEAM_PART = r"[^:@]+"  # a part of an '@' form: non-empty, neither ':' nor '@'


def _form(kind: IdentityKind, head: str, *parts: str) -> UsernameForm:
    """``head:<part>:<part>...`` where each part is a named group, or a literal when it starts with '='."""
    pieces = [re.escape(head)]
    for part in parts:
        pieces.append(re.escape(part[1:]) if part.startswith("=") else f"(?P<{part}>{_PART})")
    return UsernameForm(kind, re.compile(":".join(pieces)), head)


# Order matters only where two forms could match the same username; with the shapes below none can (the
# heads differ and '<name>@<team>' has no ':'). Parts exclude the separators so that an extra or empty
# part (`project:a:b:c`, `project::b`, `a@b@c`, `a:b@c`) matches no form and falls back to a plain user.
USERNAME_FORMS: tuple[UsernameForm, ...] = (
    UsernameForm(IdentityKind.PLATFORM, re.compile(r"forge_platform")),
    _form(IdentityKind.PROJECT, "project", "team", "project"),
    _form(IdentityKind.DEVICE, "device", "team", "device"),
    _form(IdentityKind.TEAMNODE, "mq", "=hosted", "team", "project"),
    _form(IdentityKind.TEAMNODE, "mq", "=remote", "team", "device"),
    _form(IdentityKind.FRONTEND, "frontend", "team", "device"),
    _form(IdentityKind.TEAMFRONTEND, "fe-team", "user", "team", "session"),
    _form(IdentityKind.EXPERTCLIENT, "expert-client", "user", "session"),
    # FlowFuse issues exactly `expert-agent:api:v1`; its ACL code documents `expert-agent:<id>:<apiversion>`.
    UsernameForm(IdentityKind.EXPERTAGENT, re.compile(rf"expert-agent:{_PART}:{_PART}"), "expert-agent"),
    # The platform issues `agent:<team>@<team>` (the same team twice); any other combination is not it.
    UsernameForm(IdentityKind.TEAMAGENT, re.compile(rf"agent:(?P<team>{_TEAM_PART})@(?P=team)"), "agent"),
    UsernameForm(IdentityKind.TEAMCLIENT, re.compile(rf"{_TEAM_PART}@(?P<team>{_TEAM_PART})")),
)

# Every fixed head, e.g. "project", "mq", "fe-team": reserved as plain usernames (see UsernameForm).
FORM_HEADS: frozenset[str] = frozenset(form.head for form in USERNAME_FORMS if form.head is not None)


def match_form(username: str) -> tuple[UsernameForm, dict[str, str]] | None:
    """The first form matching the whole username and its named parts, or None."""
    for form in USERNAME_FORMS:
        m = form.regex.fullmatch(username)
        if m is not None:
            return form, {k: v for k, v in m.groupdict().items() if v is not None}
    return None


def parse_identity(username: str | None) -> Identity:
    if not username:
        return Identity(IdentityKind.ANONYMOUS, None)
    found = match_form(username)
    if found is None:
        return Identity(IdentityKind.USER, username)
    form, fields = found
    return Identity(
        form.kind,
        username,
        team=fields.get("team"),
        project=fields.get("project"),
        device=fields.get("device"),
        user=fields.get("user"),
        session=fields.get("session"),
    )


def is_recognised(username: str) -> bool:
    """True when the username is one of the structured forms (not a plain user, not anonymous)."""
    return bool(username) and match_form(username) is not None
