"""A fake admin backend (broker.ops.admin.AdminBackend) for the admin API's tests, and the clients it holds."""

from __future__ import annotations

from typing import Any

TOKEN = "s3cret-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client_info(client_id: str, team: str | None = "team1", username: str = "project:team1:projectA") -> dict[str, Any]:
    return {
        "client_id": client_id,
        "username": username,
        "team": team,
        "listener": "mqtt",
        "peer": "127.0.0.1:50000",
        "protocol": "5.0",
        "connected_at": "2026-01-02T03:04:05Z",
        "subscriptions": ["ff/v1/team1/p/+/out/#"],
        "mountpoint": None,
    }


class FakeBackend:
    """An AdminBackend that answers from a list of clients and records every call."""

    def __init__(self, clients: list[dict[str, Any]] | None = None, topics: list[dict[str, Any]] | None = None) -> None:
        self.sessions = list(clients or [])
        self.inventory = topics
        self.calls: list[tuple[Any, ...]] = []
        self.reload_report: dict[str, object] = {"ok": True, "changed": ["acl"], "restart_needed": [], "error": None}
        self.fail: Exception | None = None

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def clients(self, team: str | None, username: str | None, listener: str | None) -> list[dict[str, object]]:
        self._call("clients", team, username, listener)
        return [
            c
            for c in self.sessions
            if (team is None or c["team"] == team)
            and (username is None or c["username"] == username)
            and (listener is None or c["listener"] == listener)
        ]

    def client(self, client_id: str) -> dict[str, object] | None:
        self._call("client", client_id)
        return next((c for c in self.sessions if c["client_id"] == client_id), None)

    def kick(self, client_id: str) -> bool:
        self._call("kick", client_id)
        before = len(self.sessions)
        self.sessions = [c for c in self.sessions if c["client_id"] != client_id]
        return len(self.sessions) < before

    def revoke(self, username: str | None, team: str | None) -> int:
        self._call("revoke", username, team)
        gone = [c for c in self.sessions if c["username"] == username or (team is not None and c["team"] == team)]
        self.sessions = [c for c in self.sessions if c not in gone]
        return len(gone)

    def topics(self, team: str) -> list[dict[str, object]] | None:
        self._call("topics", team)
        return self.inventory

    async def reload(self) -> dict[str, object]:
        self._call("reload")
        return self.reload_report
