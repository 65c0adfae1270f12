"""The platform as a session's access policy (``acl.source: http``).

The session's checks are synchronous: :class:`PlatformPolicy` answers them from the platform
client's cache and says None when it does not know; the session then holds the packet and the
I/O layer calls :meth:`PlatformPolicy.decide_soon`, which asks the platform (coalesced, bounded,
cached, fail closed). Topics are the client-visible ones; a mounted session's rules are relative
to its mountpoint, as FlowFuse's are.

The session also keeps the topics it was allowed to publish and read (its fast paths, which skip the
policy). A platform allow is reused only for ``cache_ttl``: the policy remembers when the earliest allow it
gave expires, and :meth:`PlatformPolicy.fast_paths_expired` tells the session to drop those topics then.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Decided = Callable[[bool | None], None]
"""Called with an access decision: True, False, or None when the backend did not answer."""


class PlatformAcl(Protocol):
    """The part of :class:`broker.auth.platform.PlatformClient` the policy uses."""

    def cached(self, username: str | None, client_id: str, action: str, topic: str) -> bool | None: ...
    async def check(self, username: str | None, client_id: str, action: str, topic: str) -> bool: ...
    async def answer(self, username: str | None, client_id: str, action: str, topic: str) -> str: ...
    def answer_soon(
        self, username: str | None, client_id: str, action: str, topic: str
    ) -> str | asyncio.Future[str]: ...
    def expires(self, username: str | None, client_id: str, action: str, topic: str) -> float: ...
    def now(self) -> float: ...


@dataclass(frozen=True, slots=True)
class PlatformDecision:
    """What a deny log line says about a platform refusal (see broker.session.audit.explain_rule)."""

    allowed: bool
    rule: None = None
    source: str = "platform"


_ACTIONS = {"publish": "publish", "will": "publish", "subscribe": "subscribe", "deliver": "deliver"}


class PlatformPolicy:
    __slots__ = ("_allowed_until", "_client", "_client_id", "_superuser", "_username")

    def __init__(self, client: PlatformAcl, username: str | None, client_id: str, superuser: bool = False) -> None:
        self._client = client
        self._username = username
        self._client_id = client_id
        self._superuser = superuser  # only when auth.http.honor_superuser: every check allowed
        # The earliest expiry of a publish/deliver allow given since the session last dropped its fast paths.
        self._allowed_until = math.inf

    def _allowed(self, action: str, topic: str) -> None:
        """A publish or deliver allow the session may remember: it must forget it when the platform's does."""
        until = self._client.expires(self._username, self._client_id, action, topic)
        if until < self._allowed_until:
            self._allowed_until = until

    @property
    def superuser(self) -> bool:
        return self._superuser

    def fast_paths_expired(self) -> bool:
        """True once an allow the session may have remembered has expired (then the session forgets them all)."""
        if self._allowed_until == math.inf or self._client.now() < self._allowed_until:
            return False
        self._allowed_until = math.inf
        return True

    def check_publish(self, topic: str, retain: bool = False) -> bool | None:
        if self._superuser:
            return True
        decision = self._client.cached(self._username, self._client_id, "publish", topic)
        if decision:
            self._allowed("publish", topic)
        return decision

    def check_subscribe(self, topic_filter: str) -> bool | None:
        if self._superuser:
            return True
        return self._client.cached(self._username, self._client_id, "subscribe", topic_filter)

    def check_receive(self, topic: str) -> bool | None:
        if self._superuser:
            return True
        decision = self._client.cached(self._username, self._client_id, "deliver", topic)
        if decision:
            self._allowed("deliver", topic)
        return decision

    def decide_soon(self, action: str, topic: str, retain: bool, done: Decided) -> None:
        """Ask the platform (the session asked with CheckAccess); ``done`` gets True, False, or None when it did not
        answer (an error or a timeout: the session refuses, and can say the platform was unavailable). A callback,
        not a coroutine: no task and no shield per cold delivery. Called inside this call when the answer is
        known (cached), else from the event loop."""
        if self._superuser:
            done(True)
            return
        action = _ACTIONS.get(action, action)
        answer = self._client.answer_soon(self._username, self._client_id, action, topic)
        if isinstance(answer, str):
            done(self._decided(action, topic, answer))
            return

        def answered(shared: asyncio.Future[str]) -> None:
            outcome = None if shared.cancelled() or shared.exception() is not None else shared.result()
            try:
                decision = self._decided(action, topic, outcome)
            except Exception:  # fail closed, and the held packet is still answered
                decision = None
            done(decision)

        answer.add_done_callback(answered)

    def _decided(self, action: str, topic: str, answer: str | None) -> bool | None:
        if answer == "allow" and action in ("publish", "deliver"):
            self._allowed(action, topic)
        return True if answer == "allow" else False if answer == "deny" else None

    async def still_subscribed(self, topic_filter: str) -> bool:
        """The periodic re-check of a subscription held: False only when the platform now says deny (a
        platform that does not answer keeps the subscription: its deliveries are still checked one by one)."""
        if self._superuser:
            return True
        return await self._client.answer(self._username, self._client_id, "subscribe", topic_filter) != "deny"

    def explain_publish(self, topic: str, retain: bool = False) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")

    def explain_subscribe(self, topic_filter: str) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")

    def explain_receive(self, topic: str) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")
