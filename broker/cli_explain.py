"""``mqtt-front acl explain``: what the broker would decide for one identity, one CONNECT and one topic, and why.

The first four lines are stable (scripts and tests read them): the identity; the CONNECT's verdict
(``connect: ALLOW ...``, or ``connect: REFUSE (CONNACK 0x85 / 0x02): <why>``: see
:mod:`broker.cli_explain_connect`, which makes run's checks in run's order); the topic's verdict; what
decided it. A refused CONNECT decides everything: the topic verdict is then DENY, and its line says what
the topic check alone would have said. More lines follow: the identity's form (reserved names and broken
FlowFuse forms named as such), which backend would authenticate it, the client-id rule, the will
(``--will``), and with a mountpoint the upstream topic or filter the client-visible one maps to.

With ``acl.source: local`` the ACL engine decides, as the session would (no I/O). With
``acl.source: http`` the platform decides: the command shows the request it would send, and with
``--ask-platform`` sends it once through :class:`broker.auth.platform.PlatformClient` (the broker's own
client, so the same headers, CA, timeout and reading of the answer) and prints the outcome; a will is
asked about the same way. It never calls ``auth_url``: a login could consume a one-time credential, so
the mountpoint a platform login would set is given by hand (``--mountpoint``).

Exit codes: 0 allow, 2 deny (a refused CONNECT, or a platform that does not answer: the broker fails
closed), 3 the platform decides and was not asked, 1 an error (configuration, arguments).
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

from acl.identity import Identity, parse_identity
from acl.topics import filter_problem, is_shared, shared_problem, topic_levels
from broker.auth.platform import PlatformClient, redact_url
from broker.auth.users import load_users
from broker.cli_explain_connect import Mount, PlatformWill, check_connect, decided, form, identity_line, rule_text
from broker.config import Config, ConfigError, HttpAuthConfig
from broker.server import build_acl
from broker.session.mount import mount_filter, mountpoint_problem

EXIT_ALLOW, EXIT_ERROR, EXIT_DENY, EXIT_NOT_ASKED = 0, 1, 2, 3

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
    will: tuple[str, bool] | None = (args.will, bool(args.will_retain)) if args.will is not None else None
    if args.will_retain and will is None:
        return _error("--will-retain goes with --will")
    http = config.auth.http
    platform_decides = config.acl.source == "http" and http is not None
    if args.ask_platform and not platform_decides:
        return _error("--ask-platform: acl.source is local, the platform is not asked about topics")
    if args.mountpoint is not None and (problem := mountpoint_problem(args.mountpoint)) is not None:
        return _error(f"--mountpoint: {problem}")
    identity = parse_identity(args.user or None)
    client_id = args.client_id if args.client_id is not None else (args.user or "")
    policy = engine.for_client(identity, client_id, cache_size=0)  # the policy Admission binds (acl.source local)
    platform_will = None
    if will is not None and http is not None and platform_decides:
        will_question = Question("publish", will[0], will[1])
        body = json.dumps(acl_request(http, identity.username, client_id, will_question), separators=(",", ":"))
        outcome = None
        if args.ask_platform and will_question.problem() is None:
            try:
                outcome, _ = asyncio.run(_ask(http, identity.username, client_id, will_question))
            except ConfigError as exc:
                return _error(str(exc))
        platform_will = PlatformWill(outcome, f"POST {redact_url(http.acl_url or '')} {body}")
    connect = check_connect(config, identity, client_id, users, policy, args.mountpoint, will, platform_will)

    print(identity_line(identity))
    print(connect.summary())
    if platform_decides:
        assert http is not None
        topic = _platform_verdict(http, identity, client_id, question, args.ask_platform)
        if topic is None:
            return EXIT_ERROR
    else:
        topic = _local_verdict(policy, question)
    code, lines = topic
    refusal = connect.refusal
    if refusal is not None:  # the client never gets this far: say so, and what the topic check alone says
        lines = [
            f"DENY {question.what}",
            f"decided by the refused CONNECT ({refusal.connack}); the topic check alone: {lines[0]}, {lines[1]}",
            *lines[2:],
        ]
        code = EXIT_DENY
    elif connect.undecided and code == EXIT_ALLOW:
        code = EXIT_NOT_ASKED
    for line in (*lines, f"form: {form(identity)}", connect.login.line, connect.client_id.line, connect.will.line):
        print(line)
    _mount_lines(connect.mount, question, http.team_attr if http is not None else "team")
    return code


def _local_verdict(acl: Any, question: Question) -> tuple[int, list[str]]:
    """The ACL engine's decision: the exit code, the verdict line, the decided-by line, any carve-out lines."""
    if question.action == "publish":
        decision = acl.explain_publish(question.topic, question.retain)
    elif question.action == "subscribe":
        decision = acl.explain_subscribe(question.topic)
    else:
        decision = acl.explain_receive(question.topic)
    lines = [f"{'ALLOW' if decision.allowed else 'DENY'} {question.what}", f"decided by {decided(decision)}"]
    for carve in getattr(decision, "carve_outs", ()):  # a granted filter's deny rules, applied per delivery
        lines.append(f"carve-out: deliveries on topics matched by {carve.source} ({rule_text(carve)}) are dropped")
    return (EXIT_ALLOW if decision.allowed else EXIT_DENY), lines


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
) -> tuple[int, list[str]] | None:
    """The platform's decision as (exit code, verdict line, decided-by line); None after an error was printed."""
    problem = question.problem()
    if problem is not None:
        return EXIT_DENY, [f"DENY {question.what}", f"decided by {problem} (refused before the platform is asked)"]
    body = json.dumps(acl_request(http, identity.username, client_id, question), separators=(",", ":"))
    request = f"POST {redact_url(http.acl_url or '')} {body}"
    if not ask:
        return EXIT_NOT_ASKED, [
            f"UNDECIDED {question.what}",
            f"decided by the platform (acl.source: http, style {http.style}): not asked; "
            f"--ask-platform sends {request}",
        ]
    try:
        outcome, seconds = asyncio.run(_ask(http, identity.username, client_id, question))
    except ConfigError as exc:
        _error(str(exc))
        return None
    allowed = outcome == "allow"
    answer = {
        "allow": "allow",
        "deny": "deny",
        "error": "no usable answer (error): refused, the broker fails closed",
        "timeout": f"no answer within {http.timeout:g}s (timeout): refused, the broker fails closed",
    }[outcome]
    return (EXIT_ALLOW if allowed else EXIT_DENY), [
        f"{'ALLOW' if allowed else 'DENY'} {question.what}",
        f"decided by the platform (acl.source: http, style {http.style}): {request} -> {answer} "
        f"in {seconds * 1000:.1f} ms",
    ]


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


# -- the mountpoint ---------------------------------------------------------------------------------------


def _mount_lines(mount: Mount, question: Question, team_attr: str) -> None:
    if mount.refusal is not None:
        print(f"mountpoint: {mount.refusal.why}: its CONNECT is refused ({mount.refusal.connack})")
        return
    if mount.source == "platform":
        print(f"mountpoint: set by the platform's answer at login (client_attrs.{team_attr}; FlowFuse: ff/v1/<team>/c/ "
              "for Team Broker forms, none for platform identities): pass --mountpoint M to see the mapping")
        return
    value = mount.value or ""
    if not value:
        print("mountpoint: none (acl.mountpoints has no entry for this kind): the topic goes upstream as is")
        return
    print(f"mountpoint: {value!r} ({mount.source}); the ACL checks the client-visible topic {question.topic!r}")
    if question.action == "subscribe":
        print(f"upstream: subscribe {mount_filter(value, question.topic)!r}; deliveries arrive with "
              f"{value!r} stripped, and any outside it are dropped")
    elif question.action == "publish":
        print(f"upstream: publish {value + question.topic!r}")
    else:
        print(f"upstream: a message on {value + question.topic!r} reaches the client as {question.topic!r}")
