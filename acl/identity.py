"""Who a client is, derived from its MQTT username alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class IdentityKind(StrEnum):
    PROJECT = "project"
    DEVICE = "device"
    PLATFORM = "platform"
    TEAMCLIENT = "teamclient"
    USER = "user"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    username: str | None
    team: str | None = None
    project: str | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class UsernameForm:
    """One recognised username shape: a full-match regex whose named groups become Identity fields."""

    kind: IdentityKind
    regex: re.Pattern[str]


# Order matters: the first full match wins. Parts exclude the separators so that an extra or empty
# part (`project:a:b:c`, `project::b`, `a@b@c`) matches no form and falls back to a plain user.
USERNAME_FORMS: tuple[UsernameForm, ...] = (
    UsernameForm(IdentityKind.PLATFORM, re.compile(r"forge_platform")),
    UsernameForm(IdentityKind.PROJECT, re.compile(r"project:(?P<team>[^:]+):(?P<project>[^:]+)")),
    UsernameForm(IdentityKind.DEVICE, re.compile(r"device:(?P<team>[^:]+):(?P<device>[^:]+)")),
    UsernameForm(IdentityKind.TEAMCLIENT, re.compile(r"[^@]+@(?P<team>[^@]+)")),
)


def parse_identity(username: str | None) -> Identity:
    if not username:
        return Identity(IdentityKind.ANONYMOUS, None)
    for form in USERNAME_FORMS:
        m = form.regex.fullmatch(username)
        if m is not None:
            fields = m.groupdict()
            return Identity(
                form.kind,
                username,
                team=fields.get("team"),
                project=fields.get("project"),
                device=fields.get("device"),
            )
    return Identity(IdentityKind.USER, username)
