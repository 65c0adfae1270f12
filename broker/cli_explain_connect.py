"""The CONNECT half of ``acl explain``: what ``run`` would answer one CONNECT, check by check, in its order.

The checks and the functions are ``run``'s: the username (:func:`broker.auth.users.username_problem`), the
backend that would take it (the order of :class:`broker.admission.Admission`; the password is not needed:
explain says what it would have to be), the mountpoint Admission binds (``acl.mountpoints``, or the
platform's answer), the client id (the rule Admission binds with :func:`acl.client_ids.client_id_rule`,
checked with :func:`acl.client_ids.client_id_allowed` as the session does before it answers 0x85), and the
will (a topic name as ``decode_connect`` wants it, that fits under the mountpoint, that the access policy
lets the client publish). The first refusal is the CONNACK the client would get.

It describes; it does no I/O: the platform's answer about a will is asked by :mod:`broker.cli_explain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from acl.client_ids import EXACT, client_id_allowed, client_id_rule
from acl.identity import ONE_TIME_KINDS, TEAM_BROKER_KINDS, Identity, IdentityKind
from acl.placeholders import PLACEHOLDER_RE, placeholder_values
from broker.admission import looks_like_jwt
from broker.auth.users import RESERVED_USERNAMES, username_problem
from broker.config import Config
from broker.mqtt.errors import ProtocolError
from broker.mqtt.reasons import ConnackV3, ConnackV5
from broker.mqtt.topics import validate_topic_name
from broker.session.mount import fits, mountpoint_problem

_FIELDS = ("team", "project", "device", "user", "session")
# The FlowFuse form behind each reserved head (acl.identity.FORM_HEADS; a test keeps the two in step).
HEAD_FORMS = {
    "project": "project:<team>:<project>",
    "device": "device:<team>:<device>",
    "mq": "mq:hosted:<team>:<instance> and mq:remote:<team>:<device>",
    "frontend": "frontend:<team>:<device>",
    "fe-team": "fe-team:<user>:<team>:<session>",
    "expert-client": "expert-client:<user>:<session>",
    "expert-agent": "expert-agent:<name>:<version>",
    "agent": "agent:<team>@<team>",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """How ``run`` answers a CONNECT it refuses: MQTT 5 reason code, 3.1.1 return code (None: it closes), why."""

    v5: int
    v3: int | None
    why: str

    @property
    def connack(self) -> str:
        v3 = f"0x{self.v3:02X}" if self.v3 is not None else "3.1.1: closed without CONNACK"
        return f"CONNACK 0x{self.v5:02X} / {v3}"


@dataclass(frozen=True, slots=True)
class Check:
    """One step of the CONNECT: the line it prints, and a refusal or a condition (or neither)."""

    line: str
    refusal: Refusal | None = None
    condition: str = ""  # what must hold that explain cannot check (the password, the platform's answer)
    undecided: bool = False  # the platform decides and was not asked


@dataclass(frozen=True, slots=True)
class Mount:
    """The session's mountpoint: ``value`` None when unknown (the platform sets it) or unusable (``refusal``)."""

    value: str | None
    source: str
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True)
class PlatformWill:
    """With ``acl.source: http`` the platform decides the will: its answer (None: not asked) and the request."""

    outcome: str | None
    request: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Every check of one CONNECT, in run's order."""

    login: Check
    by_platform: bool  # the platform authenticates (its answer sets the mountpoint)
    mount: Mount
    client_id: Check
    will: Check

    @property
    def refusal(self) -> Refusal | None:
        """The first refusal: the CONNACK the client gets."""
        steps = (self.login.refusal, self.mount.refusal, self.client_id.refusal, self.will.refusal)
        return next((refusal for refusal in steps if refusal is not None), None)

    @property
    def undecided(self) -> bool:
        return self.will.undecided

    def summary(self) -> str:
        """The ``connect:`` line: REFUSE with the CONNACK, or ALLOW / UNDECIDED and what must still hold."""
        refusal = self.refusal
        if refusal is not None:
            return f"connect: REFUSE ({refusal.connack}): {refusal.why}"
        conditions = [c.condition for c in (self.login, self.client_id, self.will) if c.condition]
        verdict = "UNDECIDED" if self.undecided else "ALLOW"
        return f"connect: {verdict}" + (" " + "; ".join(conditions) if conditions else "")


def check_connect(
    config: Config,
    identity: Identity,
    client_id: str,
    users: dict[str, Any],
    policy: Any,
    given_mount: str | None,
    will: tuple[str, bool] | None,
    platform_will: PlatformWill | None,
) -> Connect:
    """The CONNECT of ``identity`` with ``client_id`` and ``will`` (topic, retain) under ``config``.

    ``policy`` is the local access policy Admission would bind (it decides the will unless ``platform_will``
    carries the platform's answer); ``given_mount`` is ``--mountpoint``."""
    login, by_platform = _login(config, identity, users)
    mount = _mount(config, identity, client_id, given_mount, by_platform)
    client = _client_id(config, identity, client_id)
    will_check = Check("will: none (--will TOPIC checks one)")
    if will is not None:
        will_check = _will(policy, will[0], will[1], mount, platform_will)
    return Connect(login, by_platform, mount, client, will_check)


def rule_text(decision: Any) -> str:
    """A decision's rule as ``allow both 'public/#' for anonymous``, or "" (a default)."""
    rule = decision.rule
    return f"{rule.effect.value} {rule.action.value} {rule.pattern!r} for {rule.who}" if rule else ""


def decided(decision: Any) -> str:
    """``rules[0]: allow both 'public/#' for anonymous``, or the source alone (``default deny``)."""
    rule = rule_text(decision)
    return f"{decision.source}: {rule}" if rule else str(decision.source)


def _login(config: Config, identity: Identity, users: dict[str, Any]) -> tuple[Check, bool]:
    """Which backend would decide the login (Admission's order), and whether it is the platform."""
    auth = config.auth
    username = identity.username
    if username is None:
        if auth.allow_anonymous:
            return Check("authenticated by: nobody (anonymous: allowed, auth.allow_anonymous)",
                         condition="(anonymous, auth.allow_anonymous: true)"), False
        return Check("authenticated by: nobody (anonymous: refused, auth.allow_anonymous)",
                     Refusal(ConnackV5.NOT_AUTHORIZED, ConnackV3.NOT_AUTHORIZED,
                             "anonymous clients are refused (auth.allow_anonymous: false)")), False
    jwt = auth.jwt
    if jwt is not None and jwt.token_from == "username" and looks_like_jwt(username):
        return Check("authenticated by: the JWT in the username (auth.jwt); its claim names the identity",
                     condition="if the token verifies (auth.jwt)"), False
    problem = username_problem(username)
    if problem is not None:
        return Check(f"authenticated by: nobody: this username cannot log in ({problem})",
                     Refusal(ConnackV5.BAD_CREDENTIALS, ConnackV3.BAD_CREDENTIALS,
                             f"{problem}: the broker refuses this username whatever the password")), False
    if username in users:
        return Check("authenticated by: the users file (auth.users_file; a user known to it is decided by it)",
                     condition="with the right password (auth.users_file; not checked here)"), False
    if auth.http is not None:
        line = f"the platform (auth.http auth_url, style {auth.http.style}), one request per CONNECT, never retried"
        if jwt is not None:
            line += f"; a JWT in the {jwt.token_from} is verified locally instead (auth.jwt)"
        return Check(f"authenticated by: {line}",
                     condition="if the platform accepts the password (explain never logs in: a login could "
                     "use up a one-time credential)"), True
    if jwt is not None:
        return Check(f"authenticated by: a JWT in the {jwt.token_from} whose claim names it (auth.jwt)",
                     condition="with a valid JWT (auth.jwt)"), False
    by_cert = [item.name for item in config.listeners if item.tls is not None and item.tls.use_identity_as_username]
    line = "authenticated by: nobody: not in the users file, so refused as bad credentials"
    if by_cert:
        names = ", ".join(by_cert)
        return Check(f"{line} (except on listener {names}, where a client certificate naming it is the login)",
                     condition=f"only on listener {names} with a client certificate naming it "
                     "(use_identity_as_username)"), False
    return Check(line, Refusal(ConnackV5.BAD_CREDENTIALS, ConnackV3.BAD_CREDENTIALS,
                               f"unknown user {username!r}: not in the users file, and no auth.http or auth.jwt "
                               "could vouch for it")), False


def _client_id(config: Config, identity: Identity, client_id: str) -> Check:
    """The session's client-id check (Handshake._map_client_id): the rule Admission binds, client_id_allowed."""
    if identity.username is None:
        return Check("client id: any; namespaced upstream as 'anonymous:<id>'")
    suffix = config.acl.client_id_suffix
    rule = client_id_rule(identity, suffix)
    if rule == EXACT:
        text = f"rule exact: the username only (acl.client_id_suffix: {str(suffix).lower()})"
    elif identity.kind in (IdentityKind.TEAMCLIENT, IdentityKind.TEAMAGENT):
        text = "rule prefix: the username or '<username>:<suffix>' (acl.client_id_suffix: true)"
    else:
        text = "rule prefix: the username or '<username>:<suffix>'"
    if not client_id:
        assigned = "the username" if rule == EXACT else f"'{identity.username}:auto-<hex>'"
        return Check(f"client id: empty: the broker assigns {assigned} (MQTT 3.1.1: only with a clean session, "
                     f"else CONNACK 0x02); {text}")
    if client_id_allowed(rule, identity.username, client_id):
        return Check(f"client id: {client_id!r} allowed; {text}")
    must = "be the username" if rule == EXACT else "be the username or start with '<username>:'"
    refusal = Refusal(ConnackV5.CLIENT_ID_INVALID, ConnackV3.IDENTIFIER_REJECTED,
                      f"client id {client_id!r} must {must}")
    return Check(f"client id: {client_id!r} refused ({refusal.connack}); {text}", refusal)


def _will(policy: Any, topic: str, retain: bool, mount: Mount, platform: PlatformWill | None) -> Check:
    """The session's will checks: a topic name, that fits under the mountpoint, that may be published."""
    what = f"will: publish {topic!r}" + (" (retained)" if retain else "")
    try:
        if not topic:
            raise ProtocolError("empty will topic")
        validate_topic_name(topic)
    except ProtocolError as exc:
        refusal = Refusal(ConnackV5.PROTOCOL_ERROR, None, f"malformed CONNECT: {exc}")
        return Check(f"{what}: not a topic name ({refusal.connack})", refusal)
    upstream = ""
    if mount.value:
        if not fits(mount.value + topic):
            refusal = Refusal(ConnackV5.TOPIC_NAME_INVALID, ConnackV3.NOT_AUTHORIZED,
                              "will topic too long under the mountpoint")
            return Check(f"{what}: too long under the mountpoint {mount.value!r} ({refusal.connack})", refusal)
        upstream = f"; goes upstream as {mount.value + topic!r}"
    refused = Refusal(ConnackV5.NOT_AUTHORIZED, ConnackV3.NOT_AUTHORIZED, f"will topic {topic!r} not allowed")
    if platform is None:
        allowed = policy.check_publish(topic, retain)  # the session's own call; explain_publish names the rule
        rule = decided(policy.explain_publish(topic, retain))
        if not allowed:
            return Check(f"{what}: refused ({refused.connack}), decided by {rule}", refused)
        return Check(f"{what}: allowed, decided by {rule}{upstream}")
    if platform.outcome is None:
        return Check(f"{what}: the platform decides (acl.source: http): not asked; --ask-platform sends "
                     f"{platform.request}{upstream}", condition="if the platform allows the will", undecided=True)
    if platform.outcome != "allow":
        return Check(f"{what}: refused ({refused.connack}), the platform answered {platform.outcome}", refused)
    return Check(f"{what}: allowed by the platform{upstream}")


def identity_line(identity: Identity) -> str:
    kind = "reserved" if identity.username in RESERVED_USERNAMES else identity.kind.value
    return f"identity: {kind} user={identity.username!r} team={identity.team!r}"


def form(identity: Identity) -> str:
    """The identity kind, its fields and what FlowFuse does with the form; reserved and broken forms as such."""
    username = identity.username
    if username == "anonymous":
        return ("reserved: 'anonymous' stands for clients without a username (their client ids live upstream "
                "under 'anonymous:'), so no client may log in with it; leave out --user to explain an anonymous "
                "client")
    if username in HEAD_FORMS:
        return (f"reserved: {username!r} is the head of FlowFuse's {HEAD_FORMS[username]}; as a plain username "
                f"it would own every such identity's client ids ('{username}:...' under the prefix rule), so no "
                "client may log in with it")
    fields = [f"{name}={value!r}" for name in _FIELDS if (value := getattr(identity, name)) is not None]
    notes = []
    if identity.kind in ONE_TIME_KINDS:
        notes.append("a one-time credential (the platform deletes it after its first successful check)")
    if identity.kind in TEAM_BROKER_KINDS:
        notes.append("a Team Broker form (FlowFuse mounts it at ff/v1/<team>/c/)")
    if identity.kind is IdentityKind.USER:
        head = username.split(":", 1)[0] if username and ":" in username else None
        if head in HEAD_FORMS:
            notes.append(f"no FlowFuse form: it starts with {head + ':'!r} but is not {HEAD_FORMS[head]}")
        else:
            notes.append("no FlowFuse form: a plain user without a team")
    text = identity.kind.value + (" " + " ".join(fields) if fields else "")
    return text + "".join(f"; {note}" for note in notes)


def _mount(config: Config, identity: Identity, client_id: str, given: str | None, by_platform: bool) -> Mount:
    """The mountpoint the session would get: given, set by the platform's login answer, or acl.mountpoints."""
    if given is not None:
        return Mount(given, "--mountpoint")
    if by_platform:
        return Mount(None, "platform")
    template = config.acl.mountpoints.get(identity.kind.value)  # type: ignore[call-overload]
    if not template:
        return Mount("", "")
    source = f"acl.mountpoints.{identity.kind.value} {template!r}"
    values = placeholder_values(identity, client_id)
    if any(name not in values for name in PLACEHOLDER_RE.findall(template)):
        why = f"{source} needs a value this identity does not have"
        return Mount(None, source, Refusal(ConnackV5.NOT_AUTHORIZED, ConnackV3.NOT_AUTHORIZED, why))
    mount = PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
    problem = mountpoint_problem(mount)
    if problem is not None:
        why = f"{source} gives {mount!r}: {problem}"
        return Mount(None, source, Refusal(ConnackV5.SERVER_UNAVAILABLE, ConnackV3.SERVER_UNAVAILABLE, why))
    return Mount(mount, source)
