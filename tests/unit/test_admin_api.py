"""The admin REST API (broker/ops/admin.py) over real HTTP on loopback, against a fake backend; its
``admin`` configuration section; and the ``--workers N`` parent's fan-out to two fake workers on unix
sockets (broker/ops/admin_workers.py)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from broker.config import ConfigError, load_config, parse_config
from broker.ops.admin import MAX_BODY, AdminHttpServer, AdminServer, AdminUnavailable
from broker.ops.admin_access import admin_token, admin_url
from broker.ops.admin_workers import WorkersAdmin, merge_reloads
from tests.support.admin import AUTH, TOKEN, FakeBackend, client_info
from tests.support.ports import free_port

LISTENER = [{"name": "mqtt", "bind": "127.0.0.1:1883"}]


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(
        [client_info("project:team1:projectA:n"), client_info("a@team2", team="team2", username="alice@team2")],
        [{"topic": "ff/v1/team1/p/projectA/out/status", "messages": 3, "bytes": 120, "retained": True}],
    )


@pytest.fixture
async def api(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    server = AdminServer(backend, TOKEN)
    host, port = await server.start("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}/api/v1", timeout=10) as client:
        yield client
    await server.stop()


# ---------------------------------------------------------------- the token

REQUESTS = [
    ("GET", "/clients", None),
    ("GET", "/clients/project%3Ateam1%3AprojectA%3An", None),
    ("DELETE", "/clients/project%3Ateam1%3AprojectA%3An", None),
    ("POST", "/revoke", {"team": "team1"}),
    ("GET", "/teams/team1/topics", None),
    ("POST", "/reload", None),
    ("GET", "/no/such/path", None),
]
BAD_AUTH = {
    "none": {},
    "wrong, same length": {"Authorization": "Bearer " + "x" * len(TOKEN)},
    "a prefix of it": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "longer": {"Authorization": f"Bearer {TOKEN}x"},
    "empty": {"Authorization": "Bearer"},
    "another scheme": {"Authorization": f"Basic {TOKEN}"},
    "no scheme": {"Authorization": TOKEN},
}


@pytest.mark.parametrize("method,path,body", REQUESTS)
@pytest.mark.parametrize("headers", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
async def test_every_endpoint_needs_the_token(
    api: httpx.AsyncClient, backend: FakeBackend, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    response = await api.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert backend.calls == []  # nothing was asked, nothing was done


async def test_the_token_opens_every_endpoint(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    for method, path, body in REQUESTS[:-1]:
        response = await api.request(method, path, json=body, headers=AUTH)
        assert response.status_code in (200, 204), (method, path, response.text)
    # The scheme is case-insensitive (RFC 7235).
    response = await api.get("/clients", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        AdminServer(FakeBackend(), "too-short")


async def test_unauthorized_attempts_are_logged_without_the_token(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mqtt_front.admin")
    await api.delete("/clients/x", headers={"Authorization": f"Bearer {TOKEN}x"})
    await api.delete("/clients/x", headers=AUTH)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("admin_unauthorized ") and "method=DELETE" in line for line in lines), lines
    assert all(TOKEN not in line for line in lines)


# ---------------------------------------------------------------- reading clients


async def test_clients_lists_every_client(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    response = await api.get("/clients", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body == {"data": backend.sessions, "meta": {"count": 2}}
    assert backend.calls == [("clients", None, None, None)]


async def test_clients_filters_are_passed_through(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    response = await api.get("/clients", params={"team": "team2", "listener": "mqtt"}, headers=AUTH)
    assert [c["client_id"] for c in response.json()["data"]] == ["a@team2"]
    response = await api.get("/clients", params={"username": "project:team1:projectA"}, headers=AUTH)
    assert response.json()["meta"] == {"count": 1}
    assert backend.calls == [("clients", "team2", None, "mqtt"), ("clients", None, "project:team1:projectA", None)]


@pytest.mark.parametrize("query", ["teams=team1", "team=a&team=b", "client_id=x"])
async def test_clients_refuses_unknown_or_repeated_filters(
    api: httpx.AsyncClient, backend: FakeBackend, query: str
) -> None:
    response = await api.get(f"/clients?{query}", headers=AUTH)
    assert response.status_code == 400
    assert "error" in response.json()
    assert backend.calls == []


@pytest.mark.parametrize("client_id", ["project:team1:projectB:n", "bob@team1", "a/b", "café ☕", "100%", "a?b#c"])
async def test_client_ids_in_the_path_are_url_decoded(
    api: httpx.AsyncClient, backend: FakeBackend, client_id: str
) -> None:
    backend.sessions.append(client_info(client_id))
    response = await api.get(f"/clients/{quote(client_id, safe='')}", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == client_info(client_id)
    assert backend.calls[-1] == ("client", client_id)


async def test_unknown_client_is_a_json_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/clients/nobody%40team9", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "client_id": "nobody@team9"}


# ---------------------------------------------------------------- kick, revoke


async def test_kick_disconnects_by_decoded_id(
    api: httpx.AsyncClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mqtt_front.admin")
    response = await api.delete("/clients/project%3Ateam1%3AprojectA%3An", headers=AUTH)
    assert response.status_code == 204
    assert response.content == b""
    assert backend.calls == [("kick", "project:team1:projectA:n")]
    response = await api.delete("/clients/project%3Ateam1%3AprojectA%3An", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "client_id": "project:team1:projectA:n"}
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "admin"]
    assert lines[0].startswith("admin op=kick client=project:team1:projectA:n found=true")
    assert "found=false" in lines[1]
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "body,call,count",
    [
        ({"username": "alice@team2"}, ("revoke", "alice@team2", None), 1),
        ({"team": "team1"}, ("revoke", None, "team1"), 1),
    ],
)
async def test_revoke_by_username_or_team(
    api: httpx.AsyncClient,
    backend: FakeBackend,
    caplog: pytest.LogCaptureFixture,
    body: dict[str, str],
    call: tuple[str, ...],
    count: int,
) -> None:
    caplog.set_level(logging.INFO, "mqtt_front.admin")
    response = await api.post("/revoke", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"disconnected": count}
    assert backend.calls == [call]
    events = [r for r in caplog.records if getattr(r, "event", None) == "admin"]
    fields = getattr(events[0], "event_fields", {})
    assert fields["op"] == "revoke" and fields["disconnected"] == count
    assert fields.get("username") == body.get("username") and fields.get("team") == body.get("team")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"username": "a", "team": "b"}',  # both
        b"{}",  # neither
        b"",  # no body
        b'{"username": null, "team": null}',
        b"{not json",
        b'["username", "a"]',
        b'"a"',
        b'{"username": ""}',
        b'{"username": 7}',
        b'{"team": "t", "force": true}',
        b"\xff\xfe",
    ],
)
async def test_revoke_refuses_bad_bodies(api: httpx.AsyncClient, backend: FakeBackend, raw: bytes) -> None:
    response = await api.post("/revoke", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["error"], str)
    assert backend.calls == []


async def test_bodies_are_limited(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    raw = b'{"team": "' + b"x" * MAX_BODY + b'"}'
    response = await api.post("/revoke", content=raw, headers=AUTH)
    assert response.status_code == 413
    assert response.json() == {"error": "body too large", "limit": MAX_BODY}
    assert backend.calls == []


# ---------------------------------------------------------------- topics, reload


async def test_topics_of_a_team(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    response = await api.get("/teams/team%201/topics", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"data": backend.inventory, "meta": {"count": 1}}
    assert backend.calls == [("topics", "team 1")]


async def test_topics_with_the_inventory_off(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.inventory = None
    response = await api.get("/teams/team1/topics", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "topic inventory off"}


async def test_reload_reports(api: httpx.AsyncClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mqtt_front.admin")
    response = await api.post("/reload", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == backend.reload_report
    backend.reload_report = {"ok": False, "changed": [], "restart_needed": [], "error": "acl.rules.0: bad pattern"}
    response = await api.post("/reload", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["error"] == "acl.rules.0: bad pattern"
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "admin"]
    assert lines[0].startswith("admin op=reload ok=true changed=acl")
    assert lines[1].startswith('admin op=reload ok=false error="acl.rules.0: bad pattern"')
    response = await api.post("/reload", content=b"{oops", headers=AUTH)
    assert response.status_code == 400
    assert backend.calls == [("reload",), ("reload",)]


# ---------------------------------------------------------------- methods and errors


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("POST", "/clients", ["GET", "HEAD"]),
        ("PUT", "/clients/x", ["DELETE", "GET", "HEAD"]),
        ("GET", "/revoke", ["POST"]),
        ("DELETE", "/teams/t/topics", ["GET", "HEAD"]),
        ("GET", "/reload", ["POST"]),
    ],
)
async def test_wrong_methods_are_405(
    api: httpx.AsyncClient, backend: FakeBackend, method: str, path: str, allowed: list[str]
) -> None:
    response = await api.request(method, path, headers=AUTH)
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed", "allowed": allowed}
    assert response.headers["allow"].split(", ") == allowed
    assert backend.calls == []


@pytest.mark.parametrize("path", ["/", "/client", "/clients/", "/teams/t", "/teams/t/topics/x", "/../metrics"])
async def test_unknown_paths_are_json_404(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


async def test_backend_failures_are_json(api: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.fail = RuntimeError("boom")
    response = await api.get("/clients", headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
    backend.fail = AdminUnavailable("workers not answering", {"workers": [1]})
    response = await api.get("/clients", headers=AUTH)
    assert response.status_code == 503
    assert response.json() == {"error": "workers not answering", "workers": [1]}


# ---------------------------------------------------------------- the admin section


def admin_config(admin: dict[str, Any], base_dir: Path | None = None) -> Any:
    return parse_config({"listeners": LISTENER, "admin": admin}, base_dir).admin


def test_admin_is_off_unless_configured() -> None:
    assert parse_config({"listeners": LISTENER}).admin is None


def test_admin_with_a_token() -> None:
    admin = admin_config({"bind": "127.0.0.1:9200", "token": TOKEN})
    assert admin_token(admin) == TOKEN
    assert admin_url(admin) == "http://127.0.0.1:9200"
    assert admin_url(admin_config({"bind": "0.0.0.0:9200", "token": TOKEN})) == "http://127.0.0.1:9200"
    assert admin_url(admin_config({"bind": "[::]:9200", "token": TOKEN})) == "http://[::1]:9200"


def test_admin_token_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(f"  {TOKEN}  \nsecond line ignored\n")
    config = tmp_path / "front.yaml"
    config.write_text(
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nadmin: {bind: '127.0.0.1:9200', token_file: admin.token}\n"
    )
    admin = load_config(config).admin
    assert admin is not None and admin.token_file == tmp_path / "admin.token"
    assert admin_token(admin) == TOKEN


@pytest.mark.parametrize(
    "admin,expected",
    [
        ({"bind": "127.0.0.1:9200"}, ["admin", "either token or token_file"]),
        ({"bind": "127.0.0.1:9200", "token": TOKEN, "token_file": "t"}, ["admin", "not both"]),
        ({"bind": "127.0.0.1:9200", "token": "short-token"}, ["admin.token", "16 characters"]),
        ({"bind": "127.0.0.1", "token": TOKEN}, ["admin.bind", "host:port"]),
        ({"bind": "127.0.0.1:99999", "token": TOKEN}, ["admin.bind", "range"]),
        ({"token": TOKEN}, ["admin.bind", "required"]),
        ({"bind": "127.0.0.1:9200", "token": TOKEN, "user": "x"}, ["admin.user"]),
    ],
)
def test_admin_section_errors_name_the_key(admin: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        admin_config(admin)
    for part in expected:
        assert part in str(info.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("short\n", "shorter than 16"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_admin_token_file_problems_name_the_key(tmp_path: Path, content: str | bytes | None, expected: str) -> None:
    path = tmp_path / "admin.token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    admin = admin_config({"bind": "127.0.0.1:9200", "token_file": str(path)})
    with pytest.raises(ConfigError) as info:
        admin_token(admin)
    assert str(info.value).startswith("admin.token_file: ")
    assert expected in str(info.value)


# ---------------------------------------------------------------- --workers N: the parent's fan-out


@pytest.fixture
def run_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="adm-") as path:  # unix socket paths are short
        yield path


def topic_row(
    topic: str, messages: int, size: int, last_seen: float, retained: bool, payload: dict[str, Any] | None
) -> dict[str, Any]:
    """A row as broker.session.inventory.Inventory.snapshot gives it."""
    return {
        "topic": topic,
        "messages": messages,
        "bytes": size,
        "last_seen": last_seen,
        "retained": retained,
        "payload": payload,
    }


class Workers:
    def __init__(self, backends: list[FakeBackend], servers: list[AdminServer], parent: httpx.AsyncClient) -> None:
        self.backends, self.servers, self.parent = backends, servers, parent


@pytest.fixture
async def workers(run_dir: str) -> AsyncIterator[Workers]:
    backends = [
        FakeBackend(
            [client_info("c1"), client_info("shared")],
            [
                topic_row("b", 5, 50, 1_767_225_609.0, True, {"kind": "text"}),
                topic_row("a", 1, 10, 1_767_225_602.5, False, {"kind": "json", "keys": ["t"], "more_keys": False}),
            ],
        ),
        FakeBackend(
            [client_info("c2", team="team2", username="bob@team2"), client_info("shared")],
            [topic_row("a", 2, 30, 1_767_225_605.0, True, {"kind": "json", "keys": ["v"], "more_keys": False})],
        ),
    ]
    sockets = [f"{run_dir}/worker-{i}-admin.sock" for i in range(2)]
    servers = [AdminServer(b, TOKEN) for b in backends]
    for server, path in zip(servers, sockets, strict=True):
        await server.start_unix(path)
    fan_out = WorkersAdmin(sockets, TOKEN)
    parent = AdminHttpServer(fan_out, TOKEN)
    host, port = await parent.start("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}/api/v1", headers=AUTH, timeout=20) as client:
        yield Workers(backends, servers, client)
    await parent.stop()
    await fan_out.close()
    for server in servers:
        await server.stop()


async def test_fan_out_clients_concatenated_with_filters(workers: Workers) -> None:
    response = await workers.parent.get("/clients", headers=AUTH)
    assert [c["client_id"] for c in response.json()["data"]] == ["c1", "shared", "c2", "shared"]
    response = await workers.parent.get("/clients", params={"team": "team2", "username": "bob@team2"})
    assert response.json() == {"data": [client_info("c2", team="team2", username="bob@team2")], "meta": {"count": 1}}
    for backend in workers.backends:
        assert backend.calls[-1] == ("clients", "team2", "bob@team2", None)


async def test_fan_out_client_first_found(workers: Workers) -> None:
    response = await workers.parent.get("/clients/c2")
    assert response.json() == client_info("c2", team="team2", username="bob@team2")
    response = await workers.parent.get("/clients/nobody")
    assert response.status_code == 404
    encoded = "project:team1:p@x/y"
    workers.backends[1].sessions.append(client_info(encoded))
    response = await workers.parent.get(f"/clients/{quote(encoded, safe='')}")
    assert response.status_code == 200 and response.json()["client_id"] == encoded
    assert workers.backends[0].calls[-1] == ("client", encoded)


async def test_fan_out_kick_true_if_any_worker_kicked(workers: Workers) -> None:
    response = await workers.parent.delete("/clients/c2")
    assert response.status_code == 204
    assert [b.calls[-1] for b in workers.backends] == [("kick", "c2"), ("kick", "c2")]
    response = await workers.parent.delete("/clients/shared")
    assert response.status_code == 204
    assert all(c["client_id"] != "shared" for b in workers.backends for c in b.sessions)
    response = await workers.parent.delete("/clients/c2")
    assert response.status_code == 404


async def test_fan_out_revoke_sums(workers: Workers) -> None:
    response = await workers.parent.post("/revoke", json={"team": "team1"})
    assert response.json() == {"disconnected": 3}
    assert [b.calls[-1] for b in workers.backends] == [("revoke", None, "team1")] * 2
    response = await workers.parent.post("/revoke", json={"username": "bob@team2"})
    assert response.json() == {"disconnected": 1}
    assert workers.backends[1].calls[-1] == ("revoke", "bob@team2", None)


async def test_fan_out_topics_merged_per_topic(workers: Workers) -> None:
    """Counts and bytes summed, last_seen the latest, retained or-ed (and the payload kinds united)."""
    response = await workers.parent.get("/teams/team%201/topics")
    assert response.json()["data"] == [
        topic_row("a", 3, 40, 1_767_225_605.0, True, {"kind": "json", "keys": ["t", "v"], "more_keys": False}),
        topic_row("b", 5, 50, 1_767_225_609.0, True, {"kind": "text"}),
    ]
    assert [b.calls[-1] for b in workers.backends] == [("topics", "team 1")] * 2
    for backend in workers.backends:
        backend.inventory = None
    response = await workers.parent.get("/teams/team1/topics")
    assert response.status_code == 404
    assert response.json() == {"error": "topic inventory off"}


async def test_fan_out_reload_ok_only_if_all_ok(workers: Workers) -> None:
    response = await workers.parent.post("/reload")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["changed"] == ["acl"] and body["error"] is None
    assert body["workers"] == [workers.backends[0].reload_report, workers.backends[1].reload_report]
    workers.backends[1].reload_report = {"ok": False, "changed": [], "restart_needed": ["listeners"], "error": "bad"}
    response = await workers.parent.post("/reload")
    assert response.status_code == 422
    body = response.json()
    assert body["ok"] is False
    assert body["error"] == "worker 1: bad"
    assert body["changed"] == ["acl"] and body["restart_needed"] == ["listeners"]


async def test_fan_out_with_a_worker_down(workers: Workers) -> None:
    await workers.servers[1].stop()
    response = await workers.parent.get("/clients")
    assert response.status_code == 503
    assert response.json() == {"error": "workers not answering", "workers": [1]}
    assert (await workers.parent.delete("/clients/c1")).status_code == 204  # found on a worker that answers
    response = await workers.parent.delete("/clients/c2")
    assert response.status_code == 503  # maybe on the worker that did not answer
    response = await workers.parent.post("/revoke", json={"team": "team1"})
    assert response.status_code == 503
    assert response.json() == {"error": "workers not answering", "workers": [1], "disconnected": 1}
    response = await workers.parent.post("/reload")
    assert response.status_code == 422
    assert response.json()["error"] == "worker 1: worker not answering"


async def test_fan_out_needs_the_token_too(workers: Workers) -> None:
    response = await workers.parent.get("/clients", headers={"Authorization": "Bearer " + "y" * 30})
    assert response.status_code == 401
    assert all(b.calls == [] for b in workers.backends)


def test_merge_reloads() -> None:
    ok = {"ok": True, "changed": ["acl", "auth"], "restart_needed": [], "error": None}
    assert merge_reloads([ok, ok])["ok"] is True
    merged = merge_reloads([ok, {"ok": True, "changed": ["auth", "limits"], "restart_needed": ["metrics"]}])
    assert merged["changed"] == ["acl", "auth", "limits"] and merged["restart_needed"] == ["metrics"]
    assert merge_reloads([])["ok"] is False


def test_serve_worker_admin_from_a_thread(run_dir: str) -> None:
    """The parent's admin.bind as cmd_run starts it: a thread of its own, stopped by the returned callable."""
    import asyncio
    import threading

    from broker.ops.workers import serve_worker_admin

    backend = FakeBackend([client_info("w0")])
    socket_path = f"{run_dir}/worker-0-admin.sock"
    loop = asyncio.new_event_loop()
    worker = AdminServer(backend, TOKEN)
    loop.run_until_complete(worker.start_unix(socket_path))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    stop = serve_worker_admin(("127.0.0.1", port), [socket_path], TOKEN)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/api/v1/clients", headers=AUTH, timeout=10)
        assert response.json()["data"] == [client_info("w0")]
        with pytest.raises(OSError):
            serve_worker_admin(("127.0.0.1", port), [socket_path], TOKEN)  # the port is taken: before any worker
    finally:
        stop()
        asyncio.run_coroutine_threadsafe(worker.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/api/v1/clients", headers=AUTH, timeout=2)
