"""The configuration as an operator meets it through ``mqtt-front check``, ``run`` and ``schema`` (issue 15,
items 2 and 4): files that are not UTF-8 (also the users file on SIGHUP), duplicate keys, binds that overlap or
do not resolve, bind errors at run time, the upstream's credentials from the URL's userinfo, a secret file or
the environment (and never shown), and the JSON Schema."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.cli import ROOT, mqtt_front, run_cli, running
from tests.support.front import PASSWORD, uid, write_users_file
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.pki import pki_directory
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)

USER = "project:team1:p1"  # in tests.support.front.USERS, password PASSWORD
UPSTREAM_USER, UPSTREAM_PASSWORD = "front", "s3cret-upstream"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mqtt-front *args`` with ``env`` added to a copy of the environment that has no MQTT_FRONT_ variable."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("MQTT_FRONT_")}
    return subprocess.run(
        [*mqtt_front(), *args], capture_output=True, text=True, cwd=ROOT, timeout=30, env={**base, **(env or {})}
    )


def write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def connack(port: int, client_id: str, username: str, password: str) -> bytes:
    """The CONNACK (v3.1.1) the front broker answers a CONNECT with: b"\\x20\\x02\\x00\\x00" is accepted."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(client_id, username, password, keepalive=30))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(16)
            if not chunk:
                break
            data += chunk
    return data


ACCEPTED = b"\x20\x02\x00\x00"


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"


# ---------------------------------------------------------------- files as operators write them


def test_check_latin1_comment_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "front.yaml"
    text = b"# Konfiguration f\xfcr den Broker\nlisteners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n"
    path.write_bytes(text)
    result = cli("check", "-c", str(path))
    assert_clean_failure(result, f"mqtt-front: {path} is not UTF-8 text (a bad byte at offset {text.index(0xFC)})")


def test_check_latin1_users_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "users.yaml").write_bytes(b"# M\xfcller\nusers: []\n")
    path = write(tmp_path / "front.yaml", {"listeners": [{"name": "mqtt", "bind": "127.0.0.1:1883"}],
                                           "upstream": {"url": "mqtt://127.0.0.1:1"},
                                           "auth": {"users_file": "users.yaml"}})
    result = cli("check", "-c", str(path))
    users = tmp_path / "users.yaml"
    assert_clean_failure(result, f"auth.users_file: {users} is not UTF-8 text (a bad byte at offset 3)")


def test_check_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "front.yaml", (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n"
        "upstream: {url: 'mqtt://127.0.0.1:1'}\n"
        "acl:\n  preset: flowfuse\n"
        "acl:\n  preset: none\n"
    ))
    result = cli("check", "-c", str(path))
    assert_clean_failure(result, f"{path}: duplicate key 'acl' on line 5 (first on line 3)")


def test_check_hints(tmp_path: Path) -> None:
    path = write(tmp_path / "front.yaml", (
        "listeners: [{name: mqtt, bind: 1883}, {name: web, type: wss, bind: '127.0.0.1:8083'}]\n"
        "acls: {}\n"
    ))
    result = cli("check", "-c", str(path))
    assert_clean_failure(
        result,
        "listeners.0.bind: Input should be a valid string (host:port, e.g. 0.0.0.0:1883)",
        "listeners.1.type: Input should be 'tcp' or 'ws' (for WebSocket over TLS use type: ws with tls: {cert, key})",
        "acls: Extra inputs are not permitted (did you mean acl?)",
    )


# ---------------------------------------------------------------- binds


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"listeners": [{"name": "a", "bind": "0.0.0.0:{p}"}, {"name": "b", "bind": "127.0.0.1:{p}", "type": "ws"}]},
         "listeners.1.bind 127.0.0.1:{p} overlaps listeners.0.bind 0.0.0.0:{p} (0.0.0.0 is every IPv4 address)"),
        ({"listeners": [{"name": "a", "bind": "127.0.0.1:{p}"}], "metrics": {"bind": "127.0.0.1:{p}"}},
         "metrics.bind 127.0.0.1:{p} overlaps listeners.0.bind 127.0.0.1:{p} (the same address)"),
        ({"listeners": [{"name": "a", "bind": "127.0.0.1:1"}], "metrics": {"bind": "0.0.0.0:{p}"},
          "admin": {"bind": "127.0.0.1:{p}", "token": "t" * 32}},
         "admin.bind 127.0.0.1:{p} overlaps metrics.bind 0.0.0.0:{p} (0.0.0.0 is every IPv4 address)"),
        # Only a resolved name shows this one: check resolves, as run would.
        ({"listeners": [{"name": "a", "bind": "127.0.0.1:{p}"}, {"name": "b", "bind": "localhost:{p}"}]},
         "listeners.1.bind localhost:{p} overlaps listeners.0.bind 127.0.0.1:{p} (the same address)"),
    ],
    ids=["wildcard", "metrics-on-listener", "admin-on-metrics", "resolved-name"],
)
def test_check_refuses_overlapping_binds(tmp_path: Path, sections: dict[str, object], expected: str) -> None:
    port = str(free_port())
    text = yaml.safe_dump({"upstream": {"url": "mqtt://127.0.0.1:1"}, **sections}).replace("{p}", port)
    result = cli("check", "-c", str(write(tmp_path / "front.yaml", text)))
    assert_clean_failure(result, expected.replace("{p}", port))


def test_check_resolves_bind_hosts(tmp_path: Path) -> None:
    base = {"upstream": {"url": "mqtt://127.0.0.1:1"}}
    bad = write(tmp_path / "bad.yaml", {**base, "listeners": [{"name": "a", "bind": "127.0.0.1:1883"},
                                                              {"name": "b", "bind": "no-such-host.invalid:1883"}]})
    assert_clean_failure(cli("check", "-c", str(bad)), "listeners.1.bind: cannot resolve 'no-such-host.invalid': ")
    good = write(tmp_path / "good.yaml", {**base, "listeners": [{"name": "a", "bind": "localhost:1883"}]})
    result = cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "listener a: tcp on localhost:1883 (localhost is 127.0.0.1" in result.stdout


def test_run_bind_error_names_the_listener_and_key(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        path = write(tmp_path / "front.yaml", {
            "listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{free_port()}"},
                          {"name": "web", "type": "ws", "bind": f"127.0.0.1:{port}"}],
            "upstream": {"url": "mqtt://127.0.0.1:1"},
        })
        result = cli("run", "-c", str(path))
    finally:
        taken.close()
    assert_clean_failure(
        result, f"cannot listen on listeners.1.bind 127.0.0.1:{port} (listener web, type ws): address already in use"
    )


def test_run_unresolvable_bind_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "front.yaml", {"listeners": [{"name": "mqtt", "bind": "no-such-host.invalid:1883"}],
                                           "upstream": {"url": "mqtt://127.0.0.1:1"}})
    result = cli("run", "-c", str(path))
    assert_clean_failure(
        result, "cannot listen on listeners.0.bind no-such-host.invalid:1883 (listener mqtt, type tcp): cannot resolve"
    )


# ---------------------------------------------------------------- a users file that is not UTF-8, on SIGHUP


def test_sighup_with_latin1_users_file_keeps_the_old_users(tmp_path: Path, mosquitto: Mosquitto) -> None:
    users = write_users_file(tmp_path / "users.yaml")
    port = free_port()
    path = write(tmp_path / "front.yaml", {"listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
                                           "upstream": {"url": mosquitto.url}, "auth": {"users_file": "users.yaml"}})
    log = tmp_path / "front.log"
    with running(path, log, ports=(port,)) as proc:
        wait_for(lambda: "ready" in log.read_text(), "ready")
        assert connack(port, f"{USER}:{uid()}", USER, PASSWORD) == ACCEPTED
        users.write_bytes(users.read_bytes() + b"# ge\xe4ndert\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reload_failed" in log.read_text(), "config_reload_failed")
        text = log.read_text()
        assert "Traceback" not in text
        assert "is not UTF-8 text (a bad byte at offset" in text
        assert proc.poll() is None
        assert connack(port, f"{USER}:{uid()}", USER, PASSWORD) == ACCEPTED  # the old users keep serving


# ---------------------------------------------------------------- the upstream's credentials


@pytest.fixture(scope="module")
def locked_mosquitto() -> Iterator[Mosquitto]:
    """A Mosquitto that only lets UPSTREAM_USER in (no anonymous clients)."""
    tool = shutil.which("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd is not installed: `make test` installs Mosquitto with it"
    with pki_directory() as folder:  # one Mosquitto's own user can read (it drops root)
        passwords = folder / "passwd"
        subprocess.run([tool, "-b", "-c", str(passwords), UPSTREAM_USER, UPSTREAM_PASSWORD], check=True,
                       capture_output=True)
        os.chmod(passwords, 0o644)
        broker = start_mosquitto(folder, f"allow_anonymous false\npassword_file {passwords}\n")
        yield broker
        broker.stop()


def _upstream(source: str, broker: Mosquitto, folder: Path) -> tuple[dict[str, object], dict[str, str]]:
    """The upstream section and the environment that give the front broker its credentials from ``source``."""
    plain = f"mqtt://127.0.0.1:{broker.port}"
    if source == "userinfo":
        return {"url": f"mqtt://{UPSTREAM_USER}:{UPSTREAM_PASSWORD}@127.0.0.1:{broker.port}"}, {}
    if source == "password_file":
        (folder / "secrets").mkdir()
        (folder / "secrets" / "upstream").write_text(UPSTREAM_PASSWORD + "\n")
        return {"url": plain, "username": UPSTREAM_USER, "password_file": "secrets/upstream"}, {}
    if source == "environment":
        env = {"MQTT_FRONT_UPSTREAM__USERNAME": UPSTREAM_USER, "MQTT_FRONT_UPSTREAM__PASSWORD": UPSTREAM_PASSWORD}
        return {"url": plain, "password": "wrong, the environment wins"}, env
    return {"url": plain}, {}


@pytest.mark.parametrize("source", ["userinfo", "password_file", "environment", "none"])
def test_upstream_credentials_are_used_and_never_shown(
    tmp_path: Path, locked_mosquitto: Mosquitto, source: str
) -> None:
    write_users_file(tmp_path / "users.yaml")
    upstream, env = _upstream(source, locked_mosquitto, tmp_path)
    port = free_port()
    path = write(tmp_path / "front.yaml", {"listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
                                           "upstream": upstream, "auth": {"users_file": "users.yaml"}})
    checked = cli("check", "-c", str(path), env=env)
    assert checked.returncode == 0, checked.stderr
    assert UPSTREAM_PASSWORD not in checked.stdout + checked.stderr
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(path)], stdout=out, stderr=out,
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("MQTT_FRONT_")},
                                     **env})
    try:
        wait_for(lambda: "ready" in log.read_text(), "ready")
        answer = connack(port, f"{USER}:{uid()}", USER, PASSWORD)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    text = log.read_text()
    assert UPSTREAM_PASSWORD not in text
    if source == "none":  # the control: this Mosquitto refuses a front broker without credentials
        assert answer != ACCEPTED
        assert "upstream login: anonymous" in checked.stdout
        return
    assert answer == ACCEPTED, text
    shown = f"mqtt://{UPSTREAM_USER}:***@127.0.0.1:{locked_mosquitto.port}"
    if source == "userinfo":
        assert f"upstream: {shown}" in checked.stdout
        assert "upstream login: front, password from the URL" in checked.stdout
        assert f"forwarding upstream={shown}" in text  # the start-up log
    else:
        assert f"forwarding upstream=mqtt://127.0.0.1:{locked_mosquitto.port}" in text
        assert f"upstream login: {UPSTREAM_USER}, password from " in checked.stdout


# ---------------------------------------------------------------- environment and schema


def test_environment_overrides_in_check(tmp_path: Path) -> None:
    path = write(tmp_path / "front.yaml", {"listeners": [{"name": "mqtt", "bind": "127.0.0.1:1883"}],
                                           "upstream": {"url": "mqtt://127.0.0.1:1"}})
    result = cli("check", "-c", str(path), env={"MQTT_FRONT_LISTENERS__0__BIND": "127.0.0.1:2883"})
    assert result.returncode == 0, result.stderr
    assert "listener mqtt: tcp on 127.0.0.1:2883" in result.stdout
    result = cli("check", "-c", str(path), env={"MQTT_FRONT_LIMITS__CONNECT_TIMEOUT": "soon"})
    assert_clean_failure(result, "limits.connect_timeout (from MQTT_FRONT_LIMITS__CONNECT_TIMEOUT): ")


def test_schema_is_json_for_editors() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "listeners" in schema["required"]
    assert set(schema["$defs"]["UpstreamConfig"]["properties"]) >= {"url", "username", "password", "password_file"}
