"""``mqtt-front acl explain``: what the broker would decide for one identity and one topic, and why.

The first three lines are stable (scripts and tests read them): the identity, the verdict and what
decided it. More lines follow: the identity's form, which backend would authenticate it, the client-id
rule, and with a mountpoint the upstream topic or filter the client-visible one maps to.

With ``acl.source: local`` the ACL engine decides, as the session would (no I/O). With
``acl.source: http`` the platform decides: the command shows the request it would send, and with
``--ask-platform`` sends it once through :class:`broker.auth.platform.PlatformClient` (the broker's own
client, so the same headers, CA, timeout and reading of the answer) and prints the outcome. It never
calls ``auth_url``: a login could consume a one-time credential, so the mountpoint a platform login would
set is given by hand (``--mountpoint``).

Exit codes: 0 allow, 2 deny (a platform that does not answer is a deny: the broker fails closed),
3 the platform decides and was not asked, 1 an error (configuration, arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from acl.client_ids import EXACT, client_id_allowed, client_id_rule
from acl.identity import ONE_TIME_KINDS, TEAM_BROKER_KINDS, Identity, IdentityKind, parse_identity
from acl.placeholders import PLACEHOLDER_RE, placeholder_values
from acl.topics import filter_problem, is_shared, shared_problem, topic_levels
from broker.auth.platform import PlatformClient, redact_url
from broker.auth.users import load_users, username_problem
from broker.config import Config, ConfigError, HttpAuthConfig
from broker.server import build_acl
from broker.session.mount import mount_filter, mountpoint_problem

EXIT_ALLOW, EXIT_ERROR, EXIT_DENY, EXIT_NOT_ASKED = 0, 1, 2, 3

_FIELDS = ("team", "project", "device", "user", "session")
_GO_AUTH_ACC = {"publish": 2, "subscribe": 4, "deliver": 1}  # as broker.auth.platform sends them
_EMQX_ACTION = {"publish": "publish", "subscribe": "subscribe", "deliver": "subscribe"}


@dataclass(frozen=True, slots=True)
class Question:
    """One check: ``action`` publish, subscribe or deliver, on the client-visible ``topic``."""

    action: str
    topic: str
    retain: bool = False

    @property
    def what(self) -> str:
        if self.action == "publish":
            return f"publish {self.topic!r}" + (" (retained)" if self.retain else "")
        if self.action == "subscribe":
            return f"subscribe {self.topic!r}"
        return f"receive {self.topic!r}"

    def problem(self) -> str | None:
        """Why the topic can never be allowed (the session refuses it before any ACL), or None."""
        if self.action != "subscribe":
            return None if topic_levels(self.topic) is not None else "invalid topic name"
        if is_shared(self.topic):
            problem = shared_problem(self.topic)
            if problem is not None:
                return problem
            return filter_problem(self.topic.split("/", 2)[2])
        return filter_problem(self.topic)


def _error(message: str) -> int:
    print(f"mqtt-front: {message}", file=sys.stderr)
    return EXIT_ERROR


def _question(args: argparse.Namespace) -> Question:
    if args.publish is not None:
        return Question("publish", args.publish, bool(args.retain))
    if args.subscribe is not None:
        return Question("subscribe", args.subscribe)
    return Question("deliver", args.receive)


def explain(config: Config, args: argparse.Namespace) -> int:
    """``acl explain`` on a loaded configuration; prints the report, returns the exit code."""
    try:
        engine = build_acl(config.acl)
        users = load_users(config.auth.users_file) if config.auth.users_file else {}
    except ConfigError as exc:
        return _error(str(exc))
    question = _question(args)
    if args.retain and question.action != "publish":
        return _error("--retain goes with --publish")
    http = config.auth.http
    platform_decides = config.acl.source == "http" and http is not None
    if args.ask_platform and not platform_decides:
        return _error("--ask-platform: acl.source is local, the platform is not asked about topics")
    if args.mountpoint is not None and (problem := mountpoint_problem(args.mountpoint)) is not None:
        return _error(f"--mountpoint: {problem}")
    identity = parse_identity(args.user or None)
    client_id = args.client_id if args.client_id is not None else (args.user or "")

    print(f"identity: {identity.kind.value} user={identity.username!r} team={identity.team!r}")
    if platform_decides:
        assert http is not None
        code = _platform_verdict(http, identity, client_id, question, args.ask_platform)
        if code == EXIT_ERROR:
            return code
    else:
        code = _local_verdict(engine.for_client(identity, client_id, cache_size=0), question)
    print(f"form: {_form(identity)}")
    by_platform = _authentication(config, identity, users)
    _client_id_line(config, identity, client_id)
    _mount_lines(config, identity, client_id, question, args.mountpoint, by_platform)
    return code


def _local_verdict(acl: Any, question: Question) -> int:
    if question.action == "publish":
        decision = acl.explain_publish(question.topic, question.retain)
    elif question.action == "subscribe":
        decision = acl.explain_subscribe(question.topic)
    else:
        decision = acl.explain_receive(question.topic)
    print(f"{'ALLOW' if decision.allowed else 'DENY'} {question.what}")
    rule = decision.rule
    detail = f": {rule.effect.value} {rule.action.value} {rule.pattern!r} for {rule.who}" if rule else ""
    print(f"decided by {decision.source}{detail}")
    for carve in getattr(decision, "carve_outs", ()):  # a granted filter's deny rules, applied per delivery
        deny = carve.rule
        print(f"carve-out: deliveries on topics matched by {carve.source} "
              f"({deny.effect.value} {deny.action.value} {deny.pattern!r} for {deny.who}) are dropped")
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


# -- the platform -----------------------------------------------------------------------------------------


def acl_request(http: HttpAuthConfig, username: str | None, client_id: str, question: Question) -> dict[str, object]:
    """The JSON body the broker sends to ``acl_url`` for this check (broker.auth.platform's, for showing)."""
    if http.style == "go-auth":
        return {
            "username": username or "",
            "clientid": client_id,
            "topic": question.topic,
            "acc": _GO_AUTH_ACC[question.action],
        }
    return {"username": username or "", "topic": question.topic, "action": _EMQX_ACTION[question.action]}


def _platform_verdict(
    http: HttpAuthConfig, identity: Identity, client_id: str, question: Question, ask: bool
) -> int:
    problem = question.problem()
    if problem is not None:
        print(f"DENY {question.what}")
        print(f"decided by {problem} (refused before the platform is asked)")
        return EXIT_DENY
    body = json.dumps(acl_request(http, identity.username, client_id, question), separators=(",", ":"))
    request = f"POST {redact_url(http.acl_url or '')} {body}"
    if not ask:
        print(f"UNDECIDED {question.what}")
        print(f"decided by the platform (acl.source: http, style {http.style}): not asked; "
              f"--ask-platform sends {request}")
        return EXIT_NOT_ASKED
    try:
        outcome, seconds = asyncio.run(_ask(http, identity.username, client_id, question))
    except ConfigError as exc:
        return _error(str(exc))
    allowed = outcome == "allow"
    print(f"{'ALLOW' if allowed else 'DENY'} {question.what}")
    answer = {
        "allow": "allow",
        "deny": "deny",
        "error": "no usable answer (error): refused, the broker fails closed",
        "timeout": f"no answer within {http.timeout:g}s (timeout): refused, the broker fails closed",
    }[outcome]
    print(f"decided by the platform (acl.source: http, style {http.style}): {request} -> {answer} "
          f"in {seconds * 1000:.1f} ms")
    return EXIT_ALLOW if allowed else EXIT_DENY


async def _ask(http: HttpAuthConfig, username: str | None, client_id: str, question: Question) -> tuple[str, float]:
    """One ACL request through the broker's own client: (allow | deny | error | timeout, seconds)."""
    # The client logs why a request failed (platform_error, URL redacted): show it to the operator.
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("mqtt_front.auth.platform")
    logger.addHandler(handler)
    client = PlatformClient(http)
    try:
        await client.start()
        before = dict(client.stats.requests)
        started = time.perf_counter()
        allowed = await client.check(username, client_id, question.action, question.topic)
        seconds = time.perf_counter() - started
    finally:
        await client.close()
        logger.removeHandler(handler)
    outcomes = [r for (kind, r), n in client.stats.requests.items() if kind == "acl" and n > before.get((kind, r), 0)]
    return (outcomes[0] if outcomes else "allow" if allowed else "deny"), seconds


# -- the identity -----------------------------------------------------------------------------------------


def _form(identity: Identity) -> str:
    """The identity kind, its fields and what FlowFuse does with the form."""
    fields = [f"{name}={value!r}" for name in _FIELDS if (value := getattr(identity, name)) is not None]
    notes = []
    if identity.kind in ONE_TIME_KINDS:
        notes.append("a one-time credential (the platform deletes it after its first successful check)")
    if identity.kind in TEAM_BROKER_KINDS:
        notes.append("a Team Broker form (FlowFuse mounts it at ff/v1/<team>/c/)")
    if identity.kind is IdentityKind.USER:
        notes.append("no FlowFuse form: a plain user without a team")
    text = identity.kind.value + (" " + " ".join(fields) if fields else "")
    return text + "".join(f"; {note}" for note in notes)


def _authentication(config: Config, identity: Identity, users: dict[str, Any]) -> bool:
    """Print which backend would decide the login; True when it is the platform (its answer sets the mount)."""
    auth = config.auth
    username = identity.username
    if username is None:
        print(f"authenticated by: nobody (anonymous: {'allowed' if auth.allow_anonymous else 'refused'}, "
              "auth.allow_anonymous)")
        return False
    problem = username_problem(username)
    if problem is not None:
        print(f"authenticated by: nobody: this username cannot log in ({problem})")
        return False
    if username in users:
        print("authenticated by: the users file (auth.users_file; a user known to it is decided by it)")
        return False
    if auth.http is not None:
        line = f"the platform (auth.http auth_url, style {auth.http.style}), one request per CONNECT, never retried"
        if auth.jwt is not None:
            line += f"; a JWT in the {auth.jwt.token_from} is verified locally instead (auth.jwt)"
        print(f"authenticated by: {line}")
        return True
    if auth.jwt is not None:
        print(f"authenticated by: a JWT in the {auth.jwt.token_from} whose claim names it (auth.jwt)")
        return False
    print("authenticated by: nobody: not in the users file, so refused as bad credentials "
          "(unless a use_identity_as_username listener's client certificate names it)")
    return False


def _client_id_line(config: Config, identity: Identity, client_id: str) -> None:
    if identity.username is None:
        print("client id: any; namespaced upstream as 'anonymous:<id>'")
        return
    suffix = config.acl.client_id_suffix
    rule = client_id_rule(identity, suffix)
    if rule == EXACT:
        text = f"rule exact: the username only (acl.client_id_suffix: {str(suffix).lower()})"
    elif identity.kind in (IdentityKind.TEAMCLIENT, IdentityKind.TEAMAGENT):
        text = "rule prefix: the username or '<username>:<suffix>' (acl.client_id_suffix: true)"
    else:
        text = "rule prefix: the username or '<username>:<suffix>'"
    if not client_id:
        verdict = "empty: the broker assigns " + (
            "the username" if rule == EXACT else f"'{identity.username}:auto-<hex>'"
        )
    elif client_id_allowed(rule, identity.username, client_id):
        verdict = f"{client_id!r} allowed"
    else:
        verdict = f"{client_id!r} refused (CONNACK 0x85 / 0x02)"
    print(f"client id: {verdict}; {text}")


def _local_mount(config: Config, identity: Identity, client_id: str) -> tuple[str | None, str]:
    """``acl.mountpoints`` for the identity (None: the template has no value for it) and where it came from."""
    template = config.acl.mountpoints.get(identity.kind.value)  # type: ignore[call-overload]
    if not template:
        return "", ""
    values = placeholder_values(identity, client_id)
    names = PLACEHOLDER_RE.findall(template)
    if any(name not in values for name in names):
        return None, f"acl.mountpoints.{identity.kind.value} {template!r}"
    mount = PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
    return mount, f"acl.mountpoints.{identity.kind.value} {template!r}"


def _mount_lines(
    config: Config,
    identity: Identity,
    client_id: str,
    question: Question,
    given: str | None,
    by_platform: bool,
) -> None:
    if given is not None:
        mount, source = given, "--mountpoint"
    elif by_platform:
        attr = config.auth.http.team_attr if config.auth.http is not None else "team"
        print(f"mountpoint: set by the platform's answer at login (client_attrs.{attr}; FlowFuse: ff/v1/<team>/c/ "
              "for Team Broker forms, none for platform identities): pass --mountpoint M to see the mapping")
        return
    else:
        found, source = _local_mount(config, identity, client_id)
        if found is None:
            print(f"mountpoint: {source} needs a value this identity does not have: its CONNECT is refused "
                  "(not authorized)")
            return
        mount = found
        if not mount:
            print("mountpoint: none (acl.mountpoints has no entry for this kind): the topic goes upstream as is")
            return
        problem = mountpoint_problem(mount)
        if problem is not None:
            print(f"mountpoint: {source} gives {mount!r}: {problem}; its CONNECT is refused")
            return
    print(f"mountpoint: {mount!r} ({source}); the ACL checks the client-visible topic {question.topic!r}")
    if question.action == "subscribe":
        print(f"upstream: subscribe {mount_filter(mount, question.topic)!r}; deliveries arrive with "
              f"{mount!r} stripped, and any outside it are dropped")
    elif question.action == "publish":
        print(f"upstream: publish {mount + question.topic!r}")
    else:
        print(f"upstream: a message on {mount + question.topic!r} reaches the client as {question.topic!r}")
