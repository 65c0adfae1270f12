"""``mqtt-front ctl ...`` and ``mqtt-front reload`` as subprocesses: against an admin API served by this
test process (AdminServer and a fake backend, on a thread), and against a pid file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from broker.ops.admin import AdminServer
from tests.support.admin import TOKEN, FakeBackend, client_info
from tests.support.cli import mqtt_front, run_cli
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.timeout(60)


@dataclass
class Admin:
    backend: FakeBackend
    port: int
    config: Path  # a configuration whose admin section points at it (token_file)
    token_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = run_cli("ctl", "-c", str(self.config), *args)
        assert TOKEN not in result.stdout + result.stderr
        return result


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    backend = FakeBackend(
        [
            client_info("project:team1:projectA:n"),
            client_info("alice@team2", team="team2", username="alice@team2") | {"mountpoint": "ff/v1/team2/c/"},
        ],
        [
            {
                "topic": "ff/v1/team1/p/projectA/out/status",
                "messages": 3,
                "bytes": 120,
                "last_seen": 1767225605.25,
                "retained": True,
                "payload": {"kind": "json", "keys": ["online", "ts"], "more_keys": False},
            },
            {
                "topic": "ff/v1/team1/p/projectB/in",
                "messages": 1,
                "bytes": 9,
                "last_seen": 1767225600.0,
                "retained": False,
                "payload": {"kind": "text"},
            },
        ],
    )
    port = free_port()
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "front.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"name": "mqtt", "bind": "127.0.0.1:1883"}],
                "admin": {"bind": f"127.0.0.1:{port}", "token_file": "admin.token"},  # relative to the config
            }
        )
    )
    loop = asyncio.new_event_loop()
    server = AdminServer(backend, TOKEN)
    loop.run_until_complete(server.start("127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Admin(backend, port, config, token_file)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# ---------------------------------------------------------------- ctl


def test_ctl_clients_table(admin: Admin) -> None:
    result = admin.ctl("clients")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "CLIENT", "ID", "USERNAME", "TEAM", "LISTENER", "PEER", "PROTOCOL", "CONNECTED", "SINCE", "SUBS", "MOUNTPOINT"
    ]  # fmt: skip
    assert lines[1].split() == [
        "project:team1:projectA:n", "project:team1:projectA", "team1", "mqtt", "127.0.0.1:50000", "5.0",
        "2026-01-02T03:04:05Z", "1", "-",
    ]  # fmt: skip
    assert lines[2].split()[0] == "alice@team2" and lines[2].split()[-1] == "ff/v1/team2/c/"
    assert admin.backend.calls == [("clients", None, None, None)]


def test_ctl_clients_filters_and_json(admin: Admin) -> None:
    result = admin.ctl("clients", "--team", "team2", "--username", "alice@team2", "--listener", "mqtt", "--json")
    assert result.returncode == 0, result.stderr
    assert [c["client_id"] for c in json.loads(result.stdout)] == ["alice@team2"]
    assert admin.backend.calls == [("clients", "team2", "alice@team2", "mqtt")]
    result = admin.ctl("clients", "--team", "team9")
    assert result.returncode == 0 and result.stdout.strip() == "no clients"


def test_ctl_client(admin: Admin) -> None:
    result = admin.ctl("client", "project:team1:projectA:n")
    assert result.returncode == 0, result.stderr
    assert "client id: project:team1:projectA:n\n" in result.stdout
    assert "subscriptions:\n  ff/v1/team1/p/+/out/#\n" in result.stdout
    assert admin.backend.calls == [("client", "project:team1:projectA:n")]
    result = admin.ctl("client", "alice@team2", "--json")
    assert json.loads(result.stdout)["mountpoint"] == "ff/v1/team2/c/"


def test_ctl_client_not_found_exits_2(admin: Admin) -> None:
    result = admin.ctl("client", "nobody@team9")
    assert result.returncode == 2
    assert "no client with id 'nobody@team9'" in result.stderr
    assert result.stdout == ""


def test_ctl_kick(admin: Admin) -> None:
    result = admin.ctl("kick", "project:team1:projectA:n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kicked project:team1:projectA:n"
    assert admin.backend.calls == [("kick", "project:team1:projectA:n")]
    result = admin.ctl("kick", "project:team1:projectA:n")
    assert result.returncode == 2
    assert "no client with id" in result.stderr


def test_ctl_revoke(admin: Admin) -> None:
    result = admin.ctl("revoke", "--team", "team1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "team team1: disconnected 1 session"
    result = admin.ctl("revoke", "--username", "nobody")
    assert result.stdout.strip() == "username nobody: disconnected 0 sessions"
    assert admin.backend.calls == [("revoke", None, "team1"), ("revoke", "nobody", None)]
    result = admin.ctl("revoke")  # one of them is required
    assert result.returncode == 2 and "one of the arguments --username --team is required" in result.stderr


def test_ctl_topics(admin: Admin) -> None:
    result = admin.ctl("topics", "team1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TOPIC", "MESSAGES", "BYTES", "LAST", "SEEN", "RETAINED", "PAYLOAD"]
    assert lines[1].split() == [
        "ff/v1/team1/p/projectA/out/status", "3", "120", "2026-01-01T00:00:05Z", "yes", "json{online,ts}"
    ]  # fmt: skip
    assert lines[2].split() == ["ff/v1/team1/p/projectB/in", "1", "9", "2026-01-01T00:00:00Z", "no", "text"]
    result = admin.ctl("topics", "team1", "--json")
    assert json.loads(result.stdout) == admin.backend.inventory
    admin.backend.inventory = None
    result = admin.ctl("topics", "team1")
    assert result.returncode == 2
    assert "topic inventory off" in result.stderr


def test_ctl_reload(admin: Admin) -> None:
    result = admin.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded: acl"
    admin.backend.reload_report = {"ok": False, "changed": [], "restart_needed": [], "error": "acl.rules.0: bad"}
    result = admin.ctl("reload")
    assert result.returncode == 1
    assert "reload failed: acl.rules.0: bad" in result.stderr


def test_ctl_with_url_and_token_file(admin: Admin) -> None:
    result = run_cli("ctl", "--url", admin.url, "--token-file", str(admin.token_file), "clients", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2
    result = run_cli("ctl", "--url", admin.url, "--token", TOKEN, "kick", "alice@team2")
    assert result.returncode == 0, result.stderr


def test_ctl_wrong_token_exits_1_without_showing_it(admin: Admin) -> None:
    wrong = "w" * 32
    result = run_cli("ctl", "--url", admin.url, "--token", wrong, "clients")
    assert result.returncode == 1
    assert "refused the token (401 unauthorized)" in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert admin.backend.calls == []


def test_ctl_connection_errors_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = run_cli("ctl", "--url", f"http://127.0.0.1:{port}", "--token", TOKEN, "clients")
    assert result.returncode == 1
    assert f"cannot reach the admin API at http://127.0.0.1:{port}" in result.stderr
    assert TOKEN not in result.stderr


def test_ctl_needs_an_admin_section_or_a_url(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text("listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n")
    result = run_cli("ctl", "-c", str(config), "clients")
    assert result.returncode == 1
    assert "has no admin section" in result.stderr
    result = run_cli("ctl", "clients")
    assert result.returncode == 1
    assert "give -c CONFIG" in result.stderr
    result = run_cli("ctl", "--url", "http://127.0.0.1:1", "clients")
    assert result.returncode == 1
    assert "--token" in result.stderr


def test_ctl_reports_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "front.yaml"
    config.write_text(
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nadmin: {bind: '127.0.0.1:9200', token_file: missing}\n"
    )
    result = run_cli("ctl", "-c", str(config), "clients")
    assert result.returncode == 1
    assert "admin.token_file: cannot read" in result.stderr


# ---------------------------------------------------------------- reload


def test_reload_through_the_admin_api(admin: Admin) -> None:
    result = run_cli("reload", "-c", str(admin.config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded: acl"
    assert admin.backend.calls == [("reload",)]
    admin.backend.reload_report = {"ok": False, "changed": [], "restart_needed": [], "error": "users.yaml: bad"}
    result = run_cli("reload", "-c", str(admin.config), "--pid-file", "/nonexistent")  # the API comes first
    assert result.returncode == 1
    assert "reload failed: users.yaml: bad; the running configuration stays" in result.stderr


# A stand-in for a running mqtt-front (its file name says so, as the pid file check wants): it records
# every SIGHUP, and writes its pid file once its handler is in place.
STUB = textwrap.dedent(
    """
    import os, signal, sys, time
    record, pid_file = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGHUP, lambda *_: open(record, "a").write("SIGHUP\\n"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()}\\n")
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    script = tmp_path / "mqtt-front"  # the program's name is what marks an mqtt-front process
    script.write_text(STUB)
    record, pid_file = tmp_path / "signals", tmp_path / "front.pid"
    proc = subprocess.Popen([sys.executable, str(script), str(record), str(pid_file)])
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().endswith("\n"):
            assert time.monotonic() < deadline, "the stub did not write its pid file"
            time.sleep(0.05)
        yield proc, record, pid_file
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not callable(predicate) or not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reload_through_the_pid_file_sends_sighup(
    stub: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path
) -> None:
    proc, record, pid_file = stub
    result = run_cli("reload", "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    assert f"sent SIGHUP to mqtt-front (pid {proc.pid})" in result.stdout
    wait_for(lambda: record.exists() and record.read_text() == "SIGHUP\n")
    # A configuration without an admin section: the pid file is used.
    config = tmp_path / "plain.yaml"
    config.write_text("listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n")
    result = run_cli("reload", "-c", str(config), "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: record.read_text() == "SIGHUP\nSIGHUP\n")
    assert proc.poll() is None


@pytest.mark.parametrize(
    "argv",
    [
        ["sleep", "30"],
        # Naming mqtt-front in an argument (an editor on its config) does not make a process mqtt-front.
        [sys.executable, "-c", "import time; time.sleep(30)", "/etc/mqtt-front/front.yaml"],
    ],
    ids=["sleep", "argument-names-it"],
)
def test_reload_refuses_a_pid_that_is_not_mqtt_front(tmp_path: Path, argv: list[str]) -> None:
    sleeper = subprocess.Popen(argv)
    try:
        pid_file = tmp_path / "front.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        result = run_cli("reload", "--pid-file", str(pid_file))
        assert result.returncode == 1
        assert f"pid {sleeper.pid} (from {pid_file}) is not mqtt-front" in result.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None  # not signalled: SIGHUP would have ended it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reload_pid_file_errors(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = {
        "missing": (None, "does not exist"),
        "garbage": ("not a pid\n", "does not hold a pid"),
        "stale": (f"{dead.pid}\n", f"no process with pid {dead.pid}"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.pid"
        if content is not None:
            path.write_text(content)
        result = run_cli("reload", "--pid-file", str(path))
        assert result.returncode == 1, name
        assert expected in result.stderr, (name, result.stderr)


def test_reload_needs_an_admin_section_or_a_pid_file(tmp_path: Path) -> None:
    result = run_cli("reload")
    assert result.returncode == 1
    assert "give --pid-file PATH" in result.stderr
    config = tmp_path / "plain.yaml"
    config.write_text("listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n")
    result = run_cli("reload", "-c", str(config))
    assert result.returncode == 1
    assert f"{config} has no admin section: give --pid-file PATH" in result.stderr


def test_run_writes_and_removes_its_pid_file(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "front.yaml"
    config.write_text(
        yaml.safe_dump(
            {"listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}], "auth": {"allow_anonymous": True}}
        )
    )
    pid_file = tmp_path / "run" / "front.pid"
    result = run_cli("run", "-c", str(config), "--pid-file", str(pid_file))  # its folder does not exist
    assert result.returncode == 1
    assert "--pid-file" in result.stderr and "not writable" in result.stderr
    pid_file.parent.mkdir()
    log = open(tmp_path / "front.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*mqtt_front(), "run", "-c", str(config), "--pid-file", str(pid_file)], stdout=log, stderr=log
    )
    try:
        wait_port(port)
        wait_for(pid_file.exists)
        assert pid_file.read_text() == f"{proc.pid}\n"
        result = run_cli("reload", "--pid-file", str(pid_file))
        assert result.returncode == 0, result.stderr
        time.sleep(0.5)
        assert proc.poll() is None  # SIGHUP reloads, it does not stop the process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not pid_file.exists()
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(pid_file)
