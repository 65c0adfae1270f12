"""One admin API for all worker processes (``--workers N``).

Each worker serves the admin API on a private unix socket; the parent serves ``admin.bind`` and asks
every worker, with the same bearer token:

- ``clients``: every worker's list, concatenated in worker order (the filters passed through);
- ``client``: the first worker that knows the id;
- ``kick``: true if any worker kicked a session with that id;
- ``revoke``: the sum of the sessions every worker disconnected;
- ``topics``: merged per topic by :func:`broker.session.inventory.merge_snapshots` (messages and bytes
  summed, ``last_seen`` the latest, ``retained`` or-ed, payload kinds united); None when every worker
  has the inventory off;
- ``reload``: every worker's report; ok only if all are.

A worker that does not answer makes a read (``clients``, ``topics``) fail with 503 rather than answer
for part of the process; a kick found on another worker still succeeds; a revoke reports 503 with the
count disconnected so far, so the caller knows to try again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.ops.admin import API, AdminUnavailable, Json
from broker.session.inventory import merge_snapshots

REQUEST_TIMEOUT = 10.0  # seconds for a worker to answer
RELOAD_TIMEOUT = 60.0  # a reload reads and compiles everything anew

Answer = tuple[int, Any]  # (HTTP status, JSON body); status 0: the worker did not answer


def merge_reloads(reports: Sequence[Json]) -> Json:
    """The process's reload report from every worker's: ok only if all are; changes and restarts united."""

    def union(key: str) -> list[str]:
        items = (str(item) for report in reports for item in _list(report.get(key)))
        return list(dict.fromkeys(items))

    errors = [f"worker {index}: {report['error']}" for index, report in enumerate(reports) if report.get("error")]
    return {
        "ok": bool(reports) and all(report.get("ok") is True for report in reports),
        "changed": union("changed"),
        "restart_needed": union("restart_needed"),
        "error": "; ".join(errors) or None,
        "workers": list(reports),
    }


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


class WorkersAdmin:
    """The :class:`~broker.ops.admin.AsyncAdminBackend` of the parent: asks every worker's admin socket."""

    def __init__(self, socket_paths: Sequence[str], token: str) -> None:
        self.socket_paths = list(socket_paths)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._sessions: list[aiohttp.ClientSession] = []

    def _session(self, index: int) -> aiohttp.ClientSession:
        if not self._sessions:  # made on the event loop that serves, at the first request
            self._sessions = [
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), headers=self._headers)
                for path in self.socket_paths
            ]
        return self._sessions[index]

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, []
        for session in sessions:
            await session.close()

    async def _ask(self, index: int, method: str, path: str, timeout: float, **kwargs: Any) -> Answer:
        try:
            async with asyncio.timeout(timeout):
                response = await self._session(index).request(method, f"http://worker{API}{path}", **kwargs)
                async with response:
                    body = await response.json(content_type=None) if response.status != 204 else None
                    return response.status, body
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return 0, None

    async def _all(self, method: str, path: str, timeout: float = REQUEST_TIMEOUT, **kwargs: Any) -> list[Answer]:
        asks = (self._ask(index, method, path, timeout, **kwargs) for index in range(len(self.socket_paths)))
        return list(await asyncio.gather(*asks))

    @staticmethod
    def _failed(answers: list[Answer], ok: tuple[int, ...]) -> list[int]:
        return [index for index, (status, _) in enumerate(answers) if status not in ok]

    def _unavailable(self, failed: list[int], **details: object) -> AdminUnavailable:
        return AdminUnavailable("workers not answering", {"workers": failed, **details})

    async def clients(self, team: str | None, username: str | None, listener: str | None) -> list[Json]:
        query = {k: v for k, v in (("team", team), ("username", username), ("listener", listener)) if v is not None}
        answers = await self._all("GET", "/clients", params=query)
        failed = self._failed(answers, (200,))
        if failed:
            raise self._unavailable(failed)
        return [client for _, body in answers for client in body["data"]]

    async def client(self, client_id: str) -> Json | None:
        answers = await self._all("GET", f"/clients/{quote(client_id, safe='')}")
        for status, body in answers:
            if status == 200:
                found: Json = body
                return found
        failed = self._failed(answers, (404,))
        if failed:
            raise self._unavailable(failed)
        return None

    async def kick(self, client_id: str) -> bool:
        answers = await self._all("DELETE", f"/clients/{quote(client_id, safe='')}")
        if any(status == 204 for status, _ in answers):
            return True
        failed = self._failed(answers, (404,))
        if failed:
            raise self._unavailable(failed)
        return False

    async def revoke(self, username: str | None, team: str | None) -> int:
        body = {"username": username} if username is not None else {"team": team}
        answers = await self._all("POST", "/revoke", json=body)
        count = sum(int(answer["disconnected"]) for status, answer in answers if status == 200)
        failed = self._failed(answers, (200,))
        if failed:
            raise self._unavailable(failed, disconnected=count)
        return count

    async def topics(self, team: str) -> list[Json] | None:
        answers = await self._all("GET", f"/teams/{quote(team, safe='')}/topics")
        failed = self._failed(answers, (200, 404))
        if failed:
            raise self._unavailable(failed)
        lists = [body["data"] for status, body in answers if status == 200]
        return merge_snapshots(lists) if lists else None

    async def reload(self) -> Json:
        answers = await self._all("POST", "/reload", timeout=RELOAD_TIMEOUT)
        reports: list[Json] = []
        for status, body in answers:
            if status in (200, 422) and isinstance(body, dict):
                reports.append(body)
            else:
                reports.append({"ok": False, "changed": [], "restart_needed": [], "error": "worker not answering"})
        return merge_reloads(reports)
