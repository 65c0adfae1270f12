"""The amqtt fallback's only authentication plugin: the front broker's per-start credential, nothing else.

amqtt loads plugins by dotted name (``broker.upstream.amqtt_auth.CredentialAuthPlugin``) with their
``Config`` filled from the broker configuration. This module imports amqtt: only
:mod:`broker.upstream.embedded` imports it, and only when the fallback starts.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

PLUGIN = f"{__name__}.CredentialAuthPlugin"


class CredentialAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt has no type information
    """Refuses every CONNECT but the one with the configured username and password (anonymous ones too)."""

    @dataclass
    class Config:
        username: str = ""
        password: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        config = self.context.config
        expected = (getattr(config, "username", ""), getattr(config, "password", ""))
        if not expected[0] or not expected[1] or session.username is None or session.password is None:
            return False
        # Both compared, in constant time: the answer tells nothing about which one was wrong.
        user_ok = hmac.compare_digest(str(session.username).encode(), expected[0].encode())
        password_ok = hmac.compare_digest(str(session.password).encode(), expected[1].encode())
        return user_ok and password_ok
