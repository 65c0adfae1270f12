"""A Session that collects what it hands over, for unit tests that inspect outputs packet by packet.

The I/O layer takes a session's outputs with ``data_to_client()``, ``data_to_upstream()`` and
``take_actions()`` after every call. :class:`DrivenSession` does the same after each event it
is given and keeps the results in ``out_client``, ``out_upstream`` and ``actions``: lists the
test may read and clear, exactly what a real pump would have written or run, in order.
"""

from __future__ import annotations

from broker.mqtt.reasons import DisconnectReason
from broker.session import AccessPolicy, Action, AuthResult, CheckAccess, Session, SessionSettings
from broker.session.stats import Stats


class DrivenSession(Session):
    __slots__ = ("actions", "out_client", "out_upstream")

    def __init__(self, settings: SessionSettings, peer: str = "?", stats: Stats | None = None) -> None:
        super().__init__(settings, peer, stats)
        self.out_client: list[bytes] = []
        self.out_upstream: list[bytes] = []
        self.actions: list[Action] = []

    def _collect(self) -> None:
        self.out_upstream += self.data_to_upstream()
        self.out_client += self.data_to_client()
        self.actions += self.take_actions()

    def receive_client(self, data: bytes) -> None:
        super().receive_client(data)
        self._collect()

    def receive_upstream(self, data: bytes) -> None:
        super().receive_upstream(data)
        self._collect()

    def auth_done(self, result: AuthResult) -> None:
        super().auth_done(result)
        self._collect()

    def upstream_connected(self) -> None:
        super().upstream_connected()
        self._collect()

    def upstream_failed(self, reason: str) -> None:
        super().upstream_failed(reason)
        self._collect()

    def connect_timed_out(self, timeout: float) -> None:
        super().connect_timed_out(timeout)
        self._collect()

    def connack_timed_out(self, timeout: float) -> None:
        super().connack_timed_out(timeout)
        self._collect()

    def server_shutdown(self) -> None:
        super().server_shutdown()
        self._collect()

    def refuse_at_accept(self, reason: str) -> None:
        super().refuse_at_accept(reason)
        self._collect()

    def access_decided(self, check: CheckAccess, allowed: bool | None) -> None:
        super().access_decided(check, allowed)
        self._collect()

    def credentials_expired(self) -> None:
        super().credentials_expired()
        self._collect()

    def replace_policy(self, policy: AccessPolicy) -> list[str]:
        revoked = super().replace_policy(policy)
        self._collect()
        return revoked

    def disconnect(self, reason: DisconnectReason, why: str, discard_will: bool = False) -> None:
        super().disconnect(reason, why, discard_will)
        self._collect()

    def revoke_filters(self, filters: list[str]) -> list[str]:
        revoked = super().revoke_filters(filters)
        self._collect()
        return revoked

    def continue_client(self) -> None:
        super().continue_client()
        self._collect()

    def allow_publishes(self, messages: int, size: int) -> None:
        super().allow_publishes(messages, size)
        self._collect()
