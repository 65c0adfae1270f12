"""The admin API of a real ``mqtt-front run --workers 2`` in front of Mosquitto: the parent answers for both
workers (clients listed, kicked, revoked, a reload applied by each), with and without the token."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.mqtt.packets import PacketType, decode_disconnect
from tests.support.cli import running
from tests.support.mosquitto import Mosquitto
from tests.support.ports import free_port
from tests.support.raw_client import RawClient, connect_ok
from tests.support.workers import children

pytestmark = pytest.mark.timeout(60)
TOKEN = "admin-token-for-the-tests-0123456789"
SECRET_DENY = {"who": "project", "effect": "deny", "action": "subscribe", "pattern": "ff/v1/${team}/c/secret/#"}

Running = tuple[subprocess.Popen[bytes], int, str, Path, dict[str, Any]]


@pytest.fixture
def front(tmp_path: Path, mosquitto: Mosquitto, users_file: Path) -> Iterator[Running]:
    port, admin_port = free_port(), free_port()
    config: dict[str, Any] = {
        "listeners": [{"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users_file)},
        "acl": {"preset": "flowfuse"},
        "admin": {"bind": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "inventory": {},
    }
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    with running(path, tmp_path / "front.log", "--workers", "2", ports=(port, admin_port)) as proc:
        yield proc, port, f"http://127.0.0.1:{admin_port}/api/v1", path, config


async def api(method: str, url: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, url, headers=headers, **kw)


async def until_two_workers(proc: subprocess.Popen[bytes], base: str) -> None:
    """Both workers up and answering the parent (it says 503 while one has not opened its admin socket)."""
    async with asyncio.timeout(15):
        while len(children(proc.pid)) != 2 or (await api("GET", base + "/clients")).status_code != 200:
            await asyncio.sleep(0.1)


async def clients_on_both_workers(port: int, n: int = 12) -> list[RawClient]:
    return [
        await connect_ok(port, f"project:team{1 if i % 3 else 2}:p{1 if i % 3 else 3}", True,
                         client_id=f"project:team{1 if i % 3 else 2}:p{1 if i % 3 else 3}:c{i}")
        for i in range(n)
    ]


async def test_every_endpoint_needs_the_token(front: Running) -> None:
    proc, _, base, _, _ = front
    await until_two_workers(proc, base)
    for method, path, body in [
        ("GET", "/clients", None),
        ("GET", "/clients/x", None),
        ("DELETE", "/clients/x", None),
        ("POST", "/revoke", {"team": "team1"}),
        ("GET", "/teams/team1/topics", None),
        ("POST", "/reload", None),
    ]:
        for token in (None, "wrong-token-of-some-length", TOKEN[:-1] + "X"):
            r = await api(method, base + path, token=token, json=body)
            assert r.status_code == 401, (method, path, token, r.text)
            assert r.json() == {"error": "unauthorized"}


async def test_the_parent_answers_for_both_workers(front: Running) -> None:
    proc, port, base, path, config = front
    await until_two_workers(proc, base)
    clients = await clients_on_both_workers(port)
    listed = (await api("GET", base + "/clients")).json()
    ids = sorted(c["client_id"] for c in (listed["data"] if isinstance(listed, dict) else listed))
    assert ids == sorted(f"project:team{1 if i % 3 else 2}:p{1 if i % 3 else 3}:c{i}" for i in range(12))
    team2 = (await api("GET", base + "/clients", params={"team": "team2"})).json()
    team2 = team2["data"] if isinstance(team2, dict) else team2
    assert {c["team"] for c in team2} == {"team2"} and len(team2) == 4
    one = (await api("GET", base + "/clients/project:team1:p1:c1")).json()
    assert one["username"] == "project:team1:p1" and one["protocol"] == "5.0" and one["listener"] == "mqtt"
    assert (await api("GET", base + "/clients/nobody")).status_code == 404

    # Kick: DISCONNECT 0x98 to that client only, whichever worker holds it.
    assert (await api("DELETE", base + "/clients/project:team1:p1:c1")).status_code in (200, 204)
    packet = await clients[1].expect(PacketType.DISCONNECT)
    assert decode_disconnect(packet, 0, len(packet), True).reason_code == 0x98
    await clients[1].wait_closed()

    # Revoke a team: all four of its sessions, over both workers.
    revoked = (await api("POST", base + "/revoke", json={"team": "team2"})).json()
    assert revoked.get("disconnected", revoked.get("sessions")) == 4
    for i in (0, 3, 6, 9):
        await clients[i].wait_closed()

    # A reload reaches every worker: each re-evaluates its own sessions.
    sub = clients[2]
    assert await sub.subscribe("ff/v1/team1/c/secret/x", qos=1) == [1]
    path.write_text(yaml.safe_dump({**config, "acl": {"preset": "flowfuse", "rules": [SECRET_DENY]}}))
    report = (await api("POST", base + "/reload")).json()
    text = json.dumps(report)
    assert "rules 0 -> 1" in text
    assert await sub.subscribe("ff/v1/team1/c/secret/y", qos=1) == [0x87]
    for c in clients:
        await c.close()


async def test_the_topic_inventory_is_merged_over_the_workers(front: Running) -> None:
    proc, port, base, _, _ = front
    await until_two_workers(proc, base)
    clients = await clients_on_both_workers(port)
    team1 = [c for i, c in enumerate(clients) if i % 3]  # 8 team1 clients, spread over both workers
    for c in team1:
        for _ in range(5):
            assert await c.publish("ff/v1/team1/p/p1/out/shared", b"hello", qos=1) == 0
    assert await clients[0].publish("ff/v1/team2/p/p3/out/t2", b"x", qos=1) == 0
    body = (await api("GET", base + "/teams/team1/topics")).json()
    rows = body["data"] if isinstance(body, dict) else body
    assert [r["topic"] for r in rows] == ["ff/v1/team1/p/p1/out/shared"]
    assert rows[0]["messages"] == 40 and rows[0]["payload"] == {"kind": "text"}
    assert (await api("GET", base + "/teams/team2/topics")).json()["data"][0]["topic"] == "ff/v1/team2/p/p3/out/t2"
    for c in clients:
        await c.close()
