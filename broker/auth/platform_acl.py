"""The platform as a session's access policy (``acl.source: http``).

The session's checks are synchronous: :class:`PlatformPolicy` answers them from the platform
client's cache and says None when it does not know; the session then holds the packet and the
I/O layer calls :meth:`PlatformPolicy.decide`, which asks the platform (coalesced, bounded,
cached, fail closed). Topics are the client-visible ones; a mounted session's rules are relative
to its mountpoint, as FlowFuse's are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PlatformAcl(Protocol):
    """The part of :class:`broker.auth.platform.PlatformClient` the policy uses."""

    def cached(self, username: str | None, client_id: str, action: str, topic: str) -> bool | None: ...
    async def check(self, username: str | None, client_id: str, action: str, topic: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class PlatformDecision:
    """What a deny log line says about a platform refusal (see broker.session.audit.explain_rule)."""

    allowed: bool
    rule: None = None
    source: str = "platform"


_ACTIONS = {"publish": "publish", "will": "publish", "subscribe": "subscribe", "deliver": "deliver"}


class PlatformPolicy:
    __slots__ = ("_client", "_client_id", "_superuser", "_username")

    def __init__(self, client: PlatformAcl, username: str | None, client_id: str, superuser: bool = False) -> None:
        self._client = client
        self._username = username
        self._client_id = client_id
        self._superuser = superuser  # only when auth.http.honor_superuser: every check allowed

    def check_publish(self, topic: str, retain: bool = False) -> bool | None:
        return True if self._superuser else self._client.cached(self._username, self._client_id, "publish", topic)

    def check_subscribe(self, topic_filter: str) -> bool | None:
        if self._superuser:
            return True
        return self._client.cached(self._username, self._client_id, "subscribe", topic_filter)

    def check_receive(self, topic: str) -> bool | None:
        return True if self._superuser else self._client.cached(self._username, self._client_id, "deliver", topic)

    async def decide(self, action: str, topic: str, retain: bool = False) -> bool:
        """Ask the platform (the session asked with CheckAccess); False on any failure or timeout."""
        if self._superuser:
            return True
        return await self._client.check(self._username, self._client_id, _ACTIONS.get(action, action), topic)

    def explain_publish(self, topic: str, retain: bool = False) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")

    def explain_subscribe(self, topic_filter: str) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")

    def explain_receive(self, topic: str) -> PlatformDecision:
        return PlatformDecision(False, source="platform (auth.http.acl_url)")
