"""End-to-end authentication: bcrypt users file, upstream credentials, logging hygiene, `mqtt-front passwd`,
users-file validation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from broker.codec import Connect, PacketType, decode_connack, encode_connect
from broker.config import ConfigError, parse_config
from broker.server import FrontBroker
from tests.conftest import PASSWORD, FrontFactory, Mosquitto, front_port, start_mosquitto
from tests.test_e2e_isolation import VERSIONS, Raw, connack_code, connect_ok, tag, topics

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "mqtt-front"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "broker.cli"]


async def connack(port: int, username: str | None, password: str | None, v5: bool) -> int:
    client, code, _ = await Raw.open(port, username, v5=v5, password=password,
                                     client_id=f"{username}:{tag()}" if username else "")
    await client.close()
    return code


# -- users file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_password_checks(front: FrontBroker, v5: bool) -> None:
    port = front_port(front)
    bad = connack_code(v5, v5_code=0x86, v3_code=0x04)
    assert await connack(port, "project:team1:p1", PASSWORD, v5) == 0
    assert await connack(port, "project:team1:p1", PASSWORD + "x", v5) == bad
    assert await connack(port, "project:team1:p1", PASSWORD[:-1], v5) == bad
    assert await connack(port, "project:team1:p1", "", v5) == bad
    assert await connack(port, "nobody", PASSWORD, v5) == bad  # unknown user
    assert await connack(port, "project:team2:p3", PASSWORD, v5) == 0
    # Username without a password: refused for lack of credentials.
    assert await connack(port, "project:team1:p1", None, v5) == connack_code(v5, v5_code=0x87, v3_code=0x05)
    # The decision cache is keyed by the credentials: a right answer is not reused for a wrong password.
    assert await connack(port, "project:team1:p1", PASSWORD, v5) == 0
    assert await connack(port, "project:team1:p1", "wrong", v5) == bad
    assert await connack(port, "project:team1:p2", PASSWORD, v5) == 0


async def test_v5_password_without_username_is_bad_credentials(front: FrontBroker) -> None:
    client = await Raw.attach(front_port(front), True)
    client.send(encode_connect(Connect(5, True, 60, "someone", password=PASSWORD.encode())))
    packet = await client.expect(PacketType.CONNACK)
    assert decode_connack(packet, 0, len(packet), True).reason_code == 0x86
    await client.close()


async def test_failed_logins_are_logged_without_the_password(
    front: FrontBroker, caplog: pytest.LogCaptureFixture
) -> None:
    port = front_port(front)
    secret = f"Wr0ng-{tag()}-pw"
    with caplog.at_level(logging.DEBUG):
        assert await connack(port, "project:team1:p1", secret, True) == 0x86
        assert await connack(port, "ghost-user", secret, False) == 0x04
        assert await connack(port, "project:team1:p2", PASSWORD, True) == 0
        await asyncio.sleep(0.05)
    records = caplog.records
    assert records
    for record in records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text or "")
        assert secret not in text
        assert PASSWORD not in text
    refused = [r.getMessage() for r in records if "refused" in r.getMessage()]
    assert any("project:team1:p1" in m for m in refused), refused
    assert any("ghost-user" in m for m in refused), refused


# -- upstream credentials -----------------------------------------------------------------------------


class Tap:
    """A TCP relay between the front broker and Mosquitto that records what the front sends upstream."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if record:
                        self.sent += data
                    dst.write(data)
            dst.close()

        for coro in (pipe(reader, up_writer, True), pipe(up_reader, writer, False)):
            task = asyncio.ensure_future(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await self.server.wait_closed()


@pytest.fixture
async def secured_mosquitto() -> AsyncIterator[tuple[Mosquitto, Path]]:
    """A Mosquitto that only accepts the front broker's own account."""
    # Mosquitto started as root reads the password file after dropping to its own user: the
    # directory must be reachable by that user (pytest's tmp_path is not).
    directory = Path(tempfile.mkdtemp(prefix="mqtt-front-auth-"))
    directory.chmod(0o755)
    pwfile = directory / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "frontsvc", "upstream-secret"], check=True,
                   capture_output=True)
    pwfile.chmod(0o644)
    broker = start_mosquitto(directory, extra=f"allow_anonymous false\npassword_file {pwfile}\n")
    log = directory / f"mosquitto-{broker.port}.log"
    yield broker, log
    broker.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("v5", VERSIONS)
async def test_client_password_never_forwarded_upstream(
    make_front: FrontFactory, secured_mosquitto: tuple[Mosquitto, Path], v5: bool
) -> None:
    upstream, log = secured_mosquitto
    client_secret = f"client-only-{tag()}"
    users = Path(log.parent / "users.yaml")
    hashed = bcrypt.hashpw(client_secret.encode(), bcrypt.gensalt(rounds=4)).decode()
    users.write_text(yaml.safe_dump({"users": [{"username": "project:team1:p1", "password_hash": hashed}]}))
    tap = Tap(upstream.port)
    tap_port = await tap.start()
    front = await make_front(
        upstream={"url": f"mqtt://127.0.0.1:{tap_port}", "username": "frontsvc", "password": "upstream-secret"},
        auth={"users_file": str(users), "allow_anonymous": False},
    )
    port = front_port(front)
    cid = f"project:team1:p1:{tag()}"
    client = await connect_ok(port, "project:team1:p1", v5, client_id=cid, password=client_secret)
    assert await client.subscribe("ff/v1/team1/c/#", qos=1) == [1]
    topic = f"ff/v1/team1/c/{tag()}"
    assert await client.publish(topic, qos=1) == 0
    assert topics(await client.until(topic)) == [topic]
    await client.disconnect()
    await asyncio.sleep(0.1)

    sent = bytes(tap.sent)
    assert b"frontsvc" in sent and b"upstream-secret" in sent
    assert client_secret.encode() not in sent
    assert b"project:team1:p1" in sent  # the client id prefix, never as a username
    text = log.read_text()
    assert re.search(rf"as {re.escape(cid)} \(.*u'frontsvc'\)", text), text
    assert "u'project:team1:p1'" not in text
    assert client_secret not in text
    await tap.stop()


async def test_wrong_upstream_credentials_are_server_unavailable(
    make_front: FrontFactory, secured_mosquitto: tuple[Mosquitto, Path], caplog: pytest.LogCaptureFixture
) -> None:
    upstream, _ = secured_mosquitto
    front = await make_front(upstream={"url": upstream.url, "username": "frontsvc", "password": "nope"})
    port = front_port(front)
    with caplog.at_level(logging.INFO):
        assert await connack(port, "project:team1:p1", PASSWORD, True) == 0x88
        assert await connack(port, "project:team1:p1", PASSWORD, False) == 0x03
    assert any("upstream.username/password" in r.getMessage() for r in caplog.records)
    assert all("nope" not in r.getMessage() for r in caplog.records)
    # Without front credentials the upstream refuses anonymous clients too.
    open_front = await make_front(upstream={"url": upstream.url})
    assert await connack(front_port(open_front), "project:team1:p1", PASSWORD, True) == 0x88


# -- mqtt-front passwd --------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=30)


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


async def test_generated_token_logs_in(make_front: FrontFactory, tmp_path: Path) -> None:
    result = run_cli("passwd", "--generate", "project", "--cost", "4")
    fields = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"users": [{"username": "project:team1:p1",
                                                "password_hash": fields["password_hash"]}]}))
    front = await make_front(auth={"users_file": str(users)})
    assert await connack(front_port(front), "project:team1:p1", fields["token"], True) == 0
    assert await connack(front_port(front), "project:team1:p1", PASSWORD, True) == 0x86


async def test_users_file_reload(make_front: FrontFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP (front.reload) picks up added and removed users and changed passwords; a broken file
    is refused with a log line and the users in use stay. Connected clients are not touched."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    users = tmp_path / "users.yaml"

    def write(*names: str, password_hash: str = hashed) -> None:
        users.write_text(yaml.safe_dump({"users": [{"username": n, "password_hash": password_hash} for n in names]}))

    write("project:team1:p1")
    front = await make_front(auth={"users_file": str(users), "cache_ttl": 60})
    port = front_port(front)
    assert await connack(port, "project:team1:p1", PASSWORD, True) == 0
    assert await connack(port, "project:team1:p2", PASSWORD, True) == 0x86
    stays = await connect_ok(port, "project:team1:p1", True)
    write("project:team1:p2")  # p1 removed (its verdict is cached), p2 added
    with caplog.at_level(logging.INFO):
        assert front.reload()
    assert any("config_reloaded" in r.getMessage() for r in caplog.records)
    assert await connack(port, "project:team1:p2", PASSWORD, True) == 0
    assert await connack(port, "project:team1:p1", PASSWORD, True) == 0x86
    users.write_text("users: [oops")
    with caplog.at_level(logging.INFO):
        assert not front.reload()
    assert any("config_reload_failed" in r.getMessage() for r in caplog.records)
    assert await connack(port, "project:team1:p2", PASSWORD, True) == 0  # the last good file stays
    inbox = f"ff/v1/team1/p/p1/in/{tag()}"
    assert await stays.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
    assert await stays.publish(inbox, qos=1) == 0
    assert topics(await stays.until(inbox)) == [inbox]
    await stays.close()


# -- users file validation ----------------------------------------------------------------------------

GOOD_HASH = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode()

BAD_USERS: list[tuple[str, Any, str]] = [
    ("not-a-list", {"users": {"project:team1:p1": GOOD_HASH}}, "users: ["),
    ("no-users-key", {"accounts": []}, "users: ["),
    ("top-level-list", [{"username": "a", "password_hash": GOOD_HASH}], "users: ["),
    ("bad-hash", {"users": [{"username": "a", "password_hash": "plaintext"}]}, "not a bcrypt hash"),
    ("short-hash", {"users": [{"username": "a", "password_hash": GOOD_HASH[:-1]}]}, "not a bcrypt hash"),
    ("reserved", {"users": [{"username": "anonymous", "password_hash": GOOD_HASH}]}, "reserved"),
    ("reserved-prefix", {"users": [{"username": "anonymous:x", "password_hash": GOOD_HASH}]}, "contains ':'"),
    ("duplicate", {"users": [{"username": "a", "password_hash": GOOD_HASH}] * 2}, "twice"),
    ("extra-key", {"users": [{"username": "a", "password_hash": GOOD_HASH, "role": "x"}]}, "exactly the keys"),
    ("empty-name", {"users": [{"username": "", "password_hash": GOOD_HASH}]}, "non-empty string"),
]


def write_config(tmp_path: Path, users_data: Any) -> Path:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(users_data))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}],
        "upstream": {"url": "mqtt://127.0.0.1:1"},
        "auth": {"users_file": "users.yaml"},
    }))
    return config


@pytest.mark.parametrize(("users_data", "message"), [pytest.param(d, m, id=i) for i, d, m in BAD_USERS])
def test_users_file_errors(tmp_path: Path, users_data: Any, message: str) -> None:
    config = write_config(tmp_path, users_data)
    data = yaml.safe_load(config.read_text())
    with pytest.raises(ConfigError) as err:
        FrontBroker(parse_config(data, tmp_path))
    assert "users_file" in str(err.value)
    assert message in str(err.value)


def test_check_command_names_users_file(tmp_path: Path) -> None:
    bad = write_config(tmp_path, {"users": [{"username": "anonymous", "password_hash": GOOD_HASH}]})
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

    good = write_config(tmp_path, {"users": [{"username": "project:team1:p1", "password_hash": GOOD_HASH}]})
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "1 users" in result.stdout

