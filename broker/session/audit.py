"""Deny audit: one ``deny`` log event per refusal, rate-limited per session, with the rule that decided.

Every denial is either logged or counted as suppressed (and always counted in the session's
stats by the caller); one abusive client cannot flood the log. Payloads are never logged.
"""

from __future__ import annotations

import logging
import time

from broker.logs import log_event
from broker.session.api import AccessPolicy

log = logging.getLogger("mqtt_front.session")


class DenyLogLimiter:
    """Token bucket for deny log lines of one session, counting what it suppressed.

    ``burst`` lines may go out at once, then ``rate`` per second; the next line that goes
    out reports how many were suppressed since the previous one.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate", "suppressed", "total")

    def __init__(self, burst: float = 10.0, rate: float = 1.0) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = burst
        self._last = time.monotonic()
        self.suppressed = 0
        self.total = 0

    def allow(self) -> bool:
        self.total += 1
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n = self.suppressed
        self.suppressed = 0
        return n


def explain_rule(policy: object, action: str, topic: str, retain: bool = False) -> str | None:
    """The rule that denied ``action`` on ``topic``, if the policy can explain (the ACL engine can)."""
    try:
        if action in ("publish", "will"):
            decision = policy.explain_publish(topic, retain)  # type: ignore[attr-defined]
        elif action == "subscribe":
            decision = policy.explain_subscribe(topic)  # type: ignore[attr-defined]
        elif action == "deliver":
            decision = policy.explain_receive(topic)  # type: ignore[attr-defined]
        else:
            return None
    except AttributeError:
        return None
    rule = decision.rule
    if rule is None:
        return str(decision.source)
    return f"{decision.source}: {rule.effect.value} {rule.action.value} {rule.pattern}"


class DenyLog:
    """The deny events of one authenticated session (created on its first denial)."""

    __slots__ = ("_fields", "_limiter", "_policy")

    def __init__(self, policy: AccessPolicy | None, user: str | None, client: str, team: str | None, peer: str) -> None:
        self._policy = policy
        self._fields: dict[str, object] = {"user": user, "client": client, "team": team, "peer": peer}
        self._limiter = DenyLogLimiter()

    def deny(self, action: str, topic: str, retain: bool = False) -> None:
        """Log one denial of ``action`` on ``topic`` (a filter for subscribe), unless rate-limited."""
        limiter = self._limiter
        if not limiter.allow() or not log.isEnabledFor(logging.INFO):
            return
        suppressed = limiter.take_suppressed()
        policy = self._policy
        log_event(
            log,
            logging.INFO,
            "deny",
            action=action,
            topic=topic,
            rule=explain_rule(policy, action, topic, retain) if policy is not None else None,
            **self._fields,
            suppressed=suppressed or None,
        )
