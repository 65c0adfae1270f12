"""`mqtt-front passwd` (hashes, generated tokens, the cost's range), `mqtt-front users` (the users file edited in
place, read back with the broker's loader and by a running broker) and `mqtt-front check` on users files, as
subprocesses."""

from __future__ import annotations

import os
import pty
import re
import select
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
import yaml

from broker.auth.users import load_users
from tests.support.cli import mqtt_front, run_cli, running
from tests.support.front import GOOD_HASH, uid, write_config, write_users_config
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ports import free_port

# -- mqtt-front passwd --------------------------------------------------------------------------------


def test_passwd_hashes_stdin() -> None:
    result = run_cli("passwd", "--cost", "4", stdin="my pass word\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$2b$04$") and len(hashed) == 60
    assert bcrypt.checkpw(b"my pass word", hashed.encode())
    assert not bcrypt.checkpw(b"my pass word\n", hashed.encode())


def test_passwd_default_cost_is_flowfuse_10() -> None:
    result = run_cli("passwd", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("$2b$10$")


def test_passwd_refuses_empty_password() -> None:
    result = run_cli("passwd", "--cost", "4", stdin="\n")
    assert result.returncode == 1
    assert "empty password" in result.stderr
    assert "$2b$" not in result.stdout


@pytest.mark.parametrize(("kind", "prefix"), [("project", "ffbp_"), ("device", "ffbd_"), ("platform", "ffbpl_")])
def test_passwd_generate_token(kind: str, prefix: str) -> None:
    result = run_cli("passwd", "--generate", kind, "--cost", "4")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    token, hashed = fields["token"], fields["password_hash"]
    assert re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_-]{43}", token), token
    assert hashed.startswith("$2b$04$")
    assert bcrypt.checkpw(token.encode(), hashed.encode())


# -- mqtt-front check ---------------------------------------------------------------------------------


def test_check_command_names_users_file(tmp_path: Path) -> None:
    bad = write_users_config(tmp_path, {"users": [{"username": "anonymous", "password_hash": GOOD_HASH}]})
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert "users_file" in result.stderr and "reserved" in result.stderr
    assert "Traceback" not in result.stderr

    missing = tmp_path / "missing.yaml"
    config = tmp_path / "config2.yaml"
    config.write_text(yaml.safe_dump({"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                                      "auth": {"users_file": str(missing)}}))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    assert "users_file" in result.stderr and "Traceback" not in result.stderr

    good = write_users_config(tmp_path, {"users": [{"username": "project:team1:p1", "password_hash": GOOD_HASH}]})
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "1 users" in result.stdout


@pytest.mark.parametrize("cost", ["3", "32", "-1", "ten"])
def test_passwd_cost_out_of_range_is_a_usage_error(cost: str) -> None:
    """It used to be a traceback from bcrypt (issue 15)."""
    result = run_cli("passwd", "--cost", cost, stdin="pw\n")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mqtt-front passwd: error: argument --cost: must be ")
    assert "4 to 31" in result.stderr
    assert "Traceback" not in result.stderr and "$2b$" not in result.stdout


@pytest.mark.parametrize("cost", ["4", "31"])
def test_passwd_cost_bounds_are_accepted(cost: str) -> None:
    if cost == "31":  # 2^31 rounds would take days: check the argument alone
        from broker.cli import build_parser

        assert build_parser().parse_args(["passwd", "--cost", cost]).cost == 31
        return
    result = run_cli("passwd", "--cost", cost, stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("$2b$04$")


# -- mqtt-front users ---------------------------------------------------------------------------------


def users(*args: str, stdin: str | None = "") -> subprocess.CompletedProcess[str]:
    """``mqtt-front users *args`` (bcrypt cost 4 where a password is set), stdin piped."""
    cost = ["--cost", "4"] if args and args[0] in ("add", "set") and "--cost" not in args else []
    return run_cli("users", *args, *cost, stdin=stdin)


def stored(path: Path) -> dict[str, bytes]:
    return load_users(path)  # the broker's own loader: the file must be what run reads


def test_users_add_creates_the_file_the_broker_loads(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    result = users("add", "-f", str(path), "project:team1:p1", stdin="first pass\n")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bcrypt.checkpw(b"first pass", stored(path)["project:team1:p1"])
    assert "added 'project:team1:p1'" in result.stdout and "created with mode 0600" in result.stdout
    assert "mqtt-front reload" in result.stdout and "kill -HUP" in result.stdout  # the hint
    assert "$2b$" not in result.stdout + result.stderr  # hashes are never printed
    result = users("add", "-f", str(path), "alice@team1", "--stdin", stdin="second\n")
    assert result.returncode == 0, result.stderr
    assert list(stored(path)) == ["project:team1:p1", "alice@team1"]
    assert yaml.safe_load(path.read_text())["users"][1] == {"username": "alice@team1",
                                                            "password_hash": stored(path)["alice@team1"].decode()}


def test_users_add_refuses_an_existing_user(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    assert users("add", "-f", str(path), "project:team1:p1", stdin="one\n").returncode == 0
    before = path.read_bytes()
    result = users("add", "-f", str(path), "project:team1:p1", stdin="two\n")
    assert result.returncode == 1
    assert "user 'project:team1:p1' already exists" in result.stderr and "users set" in result.stderr
    assert path.read_bytes() == before


def test_users_set_changes_a_password_and_refuses_a_missing_user(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    assert users("add", "-f", str(path), "project:team1:p1", stdin="old\n").returncode == 0
    result = users("set", "-f", str(path), "project:team1:p1", stdin="new\n")
    assert result.returncode == 0, result.stderr
    assert "changed the password of 'project:team1:p1'" in result.stdout
    assert bcrypt.checkpw(b"new", stored(path)["project:team1:p1"])
    assert not bcrypt.checkpw(b"old", stored(path)["project:team1:p1"])
    before = path.read_bytes()
    result = users("set", "-f", str(path), "device:team1:d1", stdin="x\n")
    assert result.returncode == 1
    assert "no user 'device:team1:d1'" in result.stderr and "--create" in result.stderr
    assert path.read_bytes() == before
    result = users("set", "-f", str(path), "device:team1:d1", "--create", stdin="dev\n")
    assert result.returncode == 0, result.stderr
    assert bcrypt.checkpw(b"dev", stored(path)["device:team1:d1"])
    result = users("set", "-f", str(tmp_path / "missing.yaml"), "x", stdin="x\n")
    assert result.returncode == 1 and "no such users file" in result.stderr


def test_users_remove(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    for name in ("project:team1:p1", "project:team1:p2"):
        assert users("add", "-f", str(path), name, stdin="pw\n").returncode == 0
    result = users("remove", "-f", str(path), "project:team1:p1")
    assert result.returncode == 0, result.stderr
    assert "removed 'project:team1:p1'" in result.stdout and "(1 user)" in result.stdout
    assert list(stored(path)) == ["project:team1:p2"]
    result = users("remove", "-f", str(path), "project:team1:p1")
    assert result.returncode == 1 and "no user 'project:team1:p1'" in result.stderr
    assert users("remove", "-f", str(path), "project:team1:p2").returncode == 0
    assert stored(path) == {}  # an empty list is still a users file the broker loads


def test_users_list_never_prints_hashes(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    for name in ("project:team1:p1", "alice@team2", "plainuser"):
        assert users("add", "-f", str(path), name, stdin="pw\n").returncode == 0
    result = users("list", "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["project:team1:p1", "alice@team2", "plainuser"]
    result = users("list", "-l", "-f", str(path))
    assert result.stdout.splitlines() == [
        "project:team1:p1\tproject\tteam=team1", "alice@team2\tteamclient\tteam=team2", "plainuser\tuser\tteam=-",
    ]
    assert "$2" not in result.stdout
    result = users("list", "-f", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "no such users file" in result.stderr


@pytest.mark.parametrize(("kind", "prefix", "username"), [("project", "ffbp_", "project:team1:p1"),
                                                          ("device", "ffbd_", "device:team1:d1"),
                                                          ("platform", "ffbpl_", "forge_platform")])
def test_users_generate_prints_the_token_once(tmp_path: Path, kind: str, prefix: str, username: str) -> None:
    path = tmp_path / "users.yaml"
    result = users("add", "-f", str(path), username, "--generate", kind)
    assert result.returncode == 0, result.stderr
    tokens = re.findall(re.escape(prefix) + r"[A-Za-z0-9_-]{43}", result.stdout + result.stderr)
    assert len(tokens) == 1, result.stdout
    assert result.stdout.splitlines()[0] == f"token: {tokens[0]}"
    assert bcrypt.checkpw(tokens[0].encode(), stored(path)[username])
    assert tokens[0] not in path.read_text() and "note:" not in result.stderr
    result = users("set", "-f", str(path), username, "--generate", kind)
    assert not bcrypt.checkpw(tokens[0].encode(), stored(path)[username])  # a new token replaced it


def test_users_generate_for_another_kind_warns(tmp_path: Path) -> None:
    result = users("add", "-f", str(tmp_path / "u.yaml"), "alice@team1", "--generate", "project")
    assert result.returncode == 0
    assert "note: FlowFuse gives project tokens (ffbp_...) to project identities; 'alice@team1' is a teamclient" \
        in result.stderr


@pytest.mark.parametrize(("username", "message"), [
    ("anonymous", "'anonymous' is reserved"),
    ("project", "'project' is reserved"),
    ("agent", "'agent' is reserved"),
    ("project:team1", "contains ':' but is none of"),
    ("", "the username is empty"),
])
def test_users_refuses_names_the_broker_refuses(tmp_path: Path, username: str, message: str) -> None:
    path = tmp_path / "users.yaml"
    result = users("add", "-f", str(path), username, stdin="pw\n")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not path.exists()


def test_users_refuses_an_empty_password(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    result = users("add", "-f", str(path), "plainuser", stdin="\n")
    assert result.returncode == 1 and "empty password" in result.stderr
    assert not path.exists()


def test_users_keeps_mode_owner_comments_and_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text("# Users of the demo.\n# Keep this header.\n\n" + yaml.safe_dump(
        {"users": [{"username": "plainuser", "password_hash": GOOD_HASH}]}))
    os.chmod(real, 0o640)
    link = tmp_path / "users.yaml"
    link.symlink_to(real)
    inode = real.stat().st_ino
    result = users("add", "-f", str(link), "project:team1:p1", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == real
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert real.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert real.read_text().startswith("# Users of the demo.\n# Keep this header.\n\n")
    assert list(stored(link)) == ["plainuser", "project:team1:p1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.yaml", "users.yaml"]  # no temporary file left


def test_users_refuses_a_broken_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users: [{username: x}]\n")
    result = users("add", "-f", str(path), "plainuser", stdin="pw\n")
    assert result.returncode == 1
    assert "needs exactly the keys username and password_hash" in result.stderr
    assert path.read_text() == "users: [{username: x}]\n"


def prompt(args: list[str], answers: list[str], tmp_path: Path) -> tuple[int, str]:
    """``mqtt-front users ...`` on a terminal (a pty, no controlling terminal of its own, so getpass reads it):
    each answer is typed once the prompt for it is shown. Returns the exit code and stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*mqtt_front(), "users", *args], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, cwd=tmp_path)
    os.close(slave)
    err = b""
    try:
        assert proc.stderr is not None
        for answer in answers:
            while not err.rstrip().endswith(b":"):  # getpass turns echo off, then prompts: type after that
                ready, _, _ = select.select([proc.stderr], [], [], 20)
                assert ready, f"no prompt: {err!r}"
                chunk = os.read(proc.stderr.fileno(), 1024)
                assert chunk, f"closed before the prompt: {err!r}"
                err += chunk
            os.write(master, answer.encode() + b"\n")
            err += b"|"  # the next prompt must come after this answer
        _, rest = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, (err + rest).decode()


def test_users_prompt_asks_twice(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    code, err = prompt(["add", "-f", str(path), "plainuser", "--cost", "4"], ["typed secret", "typed secret"],
                       tmp_path)
    assert code == 0, err
    assert "password: " in err and "password (again): " in err
    assert "typed secret" not in err  # not echoed
    assert bcrypt.checkpw(b"typed secret", stored(path)["plainuser"])
    before = path.read_bytes()
    code, err = prompt(["set", "-f", str(path), "plainuser", "--cost", "4"], ["one", "another"], tmp_path)
    assert code == 1
    assert "the passwords do not match; nothing changed" in err
    assert path.read_bytes() == before


def test_users_change_reaches_a_running_broker_on_reload(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The file `users` writes is the one `run` loads: a new user gets in after `mqtt-front reload`, a removed
    one no longer does."""
    path = tmp_path / "users.yaml"
    assert users("add", "-f", str(path), "project:team1:p1", stdin="pw-one\n").returncode == 0
    port = free_port()
    config = write_config(tmp_path, listeners=[{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
                          upstream={"url": mosquitto.url}, auth={"users_file": "users.yaml"})
    pid_file = tmp_path / "front.pid"
    log = tmp_path / "front.log"
    with running(config, log, "--pid-file", str(pid_file), ports=(port,)):
        wait_until(lambda: pid_file.exists())
        assert connack_code(port, "project:team1:p1", "pw-one") == 0
        assert users("add", "-f", str(path), "project:team1:p2", stdin="pw-two\n").returncode == 0
        assert users("remove", "-f", str(path), "project:team1:p1").returncode == 0
        assert connack_code(port, "project:team1:p2", "pw-two") == 0x86  # not before the reload
        result = run_cli("reload", "--pid-file", str(pid_file))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: connack_code(port, "project:team1:p2", "pw-two") == 0)
        assert connack_code(port, "project:team1:p1", "pw-one") == 0x86
        assert "config_reload_failed" not in log.read_text()


def wait_until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def connack_code(port: int, username: str, password: str) -> int:
    """The v5 CONNACK reason code for a CONNECT with these credentials (client id ``<username>:<random>``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(f"{username}:{uid()}", username, password, v5=True))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            assert chunk, data
            data += chunk
    return data[3]
