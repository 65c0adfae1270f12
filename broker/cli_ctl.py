"""``mqtt-front ctl`` (the admin API from the command line, like ``emqx ctl``) and ``mqtt-front reload``.

The URL and the token come from the configuration's ``admin`` section (``-c CONFIG``) unless
``--url`` and ``--token`` / ``--token-file`` are given. Output is a table by default, JSON with
``--json``. Exit codes: 0 done, 1 an error (HTTP, connection, refused token, failed reload; the message
on stderr, never the token), 2 not found (no such client, the topic inventory off).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from broker.config import Config, ConfigError, load_config
from broker.ops.admin_access import admin_token, admin_url
from broker.ops.pidfile import PidFileError, signal_process

EXIT_OK, EXIT_ERROR, EXIT_NOT_FOUND = 0, 1, 2
TIMEOUT = 70.0  # seconds; a reload with --workers N waits up to 60 s for its workers
API = "/api/v1"


class CtlError(Exception):
    """Ends the command: the message goes to stderr, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            token = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise CtlError(f"the token file {path} is empty (the token is its first line)")
    return token


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CtlError(str(exc)) from None


def connection(args: argparse.Namespace) -> tuple[str, str]:
    """(base URL, token) from --url/--token/--token-file, else from the configuration's admin section."""
    url, token = args.url, args.token
    if args.token_file is not None:
        token = _read_token_file(args.token_file)
    if url is None or token is None:
        if args.config is None:
            raise CtlError("give -c CONFIG (with an admin section), or --url URL and --token/--token-file")
        admin = _load(args.config).admin
        if admin is None:
            raise CtlError(f"{args.config} has no admin section (admin: {{bind: ..., token_file: ...}})")
        url = url or admin_url(admin)
        if token is None:
            try:
                token = admin_token(admin)
            except ConfigError as exc:
                raise CtlError(str(exc)) from None
    return str(url).rstrip("/"), str(token)


class AdminClient:
    """Synchronous requests to the admin API; every failure a CtlError worded for the operator."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = httpx.Client(
            base_url=url + API, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT, trust_env=False
        )

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, JSON body or None) of a 2xx answer, or of a 404/422 the caller words itself."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CtlError(f"cannot reach the admin API at {self.url}: {exc or type(exc).__name__}") from None
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code == 401:
            raise CtlError(f"the admin API at {self.url} refused the token (401 unauthorized)")
        if response.is_success or response.status_code in (404, 422):
            return response.status_code, body
        message = body.get("error") if isinstance(body, dict) else None
        details = {k: v for k, v in body.items() if k != "error"} if isinstance(body, dict) else {}
        extra = f" {json.dumps(details)}" if details else ""
        raise CtlError(f"admin API: HTTP {response.status_code}: {message or response.reason_phrase}{extra}")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(c) for c in header], *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return str(len(value))
    return str(value)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


CLIENT_COLUMNS = [
    ("client_id", "CLIENT ID"),
    ("username", "USERNAME"),
    ("team", "TEAM"),
    ("listener", "LISTENER"),
    ("peer", "PEER"),
    ("protocol", "PROTOCOL"),
    ("connected_at", "CONNECTED SINCE"),
    ("subscriptions", "SUBS"),
    ("mountpoint", "MOUNTPOINT"),
]


def _clients(client: AdminClient, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("team", args.team), ("username", args.username), ("listener", args.listener)) if v}
    _, body = client.request("GET", "/clients", params=query)
    data = body["data"]
    if args.json:
        _print_json(data)
    elif data:
        print(table([[c.get(key) for key, _ in CLIENT_COLUMNS] for c in data], [h for _, h in CLIENT_COLUMNS]))
    else:
        print("no clients")
    return EXIT_OK


def _not_found(what: str) -> CtlError:
    return CtlError(f"no client with id {what!r}", EXIT_NOT_FOUND)


def _client(client: AdminClient, args: argparse.Namespace) -> int:
    status, body = client.request("GET", f"/clients/{quote(args.client_id, safe='')}")
    if status == 404:
        raise _not_found(args.client_id)
    if args.json:
        _print_json(body)
        return EXIT_OK
    for key, _ in CLIENT_COLUMNS:
        value, label = body.get(key), key.replace("_", " ")
        if key == "subscriptions":
            print(f"{label}:", *(f"\n  {item}" for item in value or []), sep="")
        else:
            print(f"{label}: {_cell(value)}")
    return EXIT_OK


def _kick(client: AdminClient, args: argparse.Namespace) -> int:
    status, _ = client.request("DELETE", f"/clients/{quote(args.client_id, safe='')}")
    if status == 404:
        raise _not_found(args.client_id)
    print(f"kicked {args.client_id}")
    return EXIT_OK


def _revoke(client: AdminClient, args: argparse.Namespace) -> int:
    target = {"username": args.username} if args.username is not None else {"team": args.team}
    _, body = client.request("POST", "/revoke", json=target)
    count = int(body["disconnected"])
    key, value = next(iter(target.items()))
    print(f"{key} {value}: disconnected {count} session{'' if count == 1 else 's'}")
    return EXIT_OK


def _topics(client: AdminClient, args: argparse.Namespace) -> int:
    status, body = client.request("GET", f"/teams/{quote(args.team, safe='')}/topics")
    if status == 404:
        reason = body.get("error") if isinstance(body, dict) else None
        raise CtlError(f"no topics for team {args.team!r}: {reason or 'not found'}", EXIT_NOT_FOUND)
    data = body["data"]
    if args.json:
        _print_json(data)
    elif not data:
        print(f"no topics for team {args.team}")
    else:
        keys = list(dict.fromkeys(["topic", *(key for entry in data for key in entry)]))
        rows = [[_topic_cell(key, entry.get(key)) for key in keys] for entry in data]
        print(table(rows, [k.upper().replace("_", " ") for k in keys]))
    return EXIT_OK


def _topic_cell(key: str, value: object) -> object:
    """``last_seen`` (unix time) as ISO-8601 UTC; ``payload`` as its kind and JSON keys."""
    if key == "last_seen" and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if key == "payload" and isinstance(value, dict):
        keys = value.get("keys")
        if not isinstance(keys, list):
            return value.get("kind")
        more = ",..." if value.get("more_keys") else ""
        return f"{value.get('kind')}{{{','.join(map(str, keys))}{more}}}"
    return value


def print_reload(status: int, report: Any, as_json: bool = False) -> int:
    if as_json:
        _print_json(report)
    report = report if isinstance(report, dict) else {}
    ok = status == 200 and report.get("ok") is True
    if not as_json:
        changed, restart = report.get("changed") or [], report.get("restart_needed") or []
        if ok:
            print("reloaded" + (f": {', '.join(map(str, changed))}" if changed else ": nothing changed"))
        if restart:
            print(f"changed but applied only after a restart: {', '.join(map(str, restart))}")
    if not ok:
        raise CtlError(f"reload failed: {report.get('error') or f'HTTP {status}'}; the running configuration stays")
    return EXIT_OK


def _reload(client: AdminClient, args: argparse.Namespace) -> int:
    status, body = client.request("POST", "/reload")
    return print_reload(status, body, args.json)


def _drain(client: AdminClient, args: argparse.Namespace) -> int:
    _, body = client.request("POST", "/drain")
    timeout = body.get("shutdown_timeout") if isinstance(body, dict) else None
    within = f" within {timeout} s" if timeout is not None else ""
    print(f"draining: no new connections; the sessions finish and the process exits{within}")
    return EXIT_OK


COMMANDS = {
    "clients": _clients,
    "client": _client,
    "kick": _kick,
    "revoke": _revoke,
    "topics": _topics,
    "reload": _reload,
    "drain": _drain,
}


def _run(work: Any) -> int:
    try:
        code: int = work()
        return code
    except CtlError as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return exc.code


def ctl(args: argparse.Namespace) -> int:
    """``mqtt-front ctl ...``."""

    def work() -> int:
        client = AdminClient(*connection(args))
        try:
            return COMMANDS[args.ctl_command](client, args)
        finally:
            client.close()

    return _run(work)


def reload(args: argparse.Namespace) -> int:
    """``mqtt-front reload``: POST /api/v1/reload when the configuration has ``admin``, else SIGHUP to the
    pid in ``--pid-file``."""

    def work() -> int:
        config = _load(args.config) if args.config is not None else None
        if config is not None and config.admin is not None:
            try:
                token = admin_token(config.admin)
            except ConfigError as exc:
                raise CtlError(str(exc)) from None
            client = AdminClient(admin_url(config.admin), token)
            try:
                status, body = client.request("POST", "/reload")
            finally:
                client.close()
            return print_reload(status, body)
        if args.pid_file is None:
            where = f"{args.config} has no admin section" if args.config is not None else "no -c CONFIG"
            raise CtlError(f"{where}: give --pid-file PATH (the file `run --pid-file PATH` writes) to send SIGHUP")
        try:
            pid = signal_process(args.pid_file, signal.SIGHUP)
        except PidFileError as exc:
            raise CtlError(str(exc)) from None
        print(f"sent SIGHUP to mqtt-front (pid {pid}); its log says what was reloaded")
        return EXIT_OK

    return _run(work)
