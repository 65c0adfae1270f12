"""End-to-end authentication: bcrypt users file, upstream credentials, logging hygiene, a generated token,
reloading the users file (`mqtt-front passwd` and `check`: tests/process/test_cli_users.py; users-file
validation: tests/unit/test_users_file.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest
import yaml

from broker.mqtt.packets import PacketType, decode_connack
from broker.server import FrontBroker
from tests.support.cli import run_cli
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, connack_code, front_port, uid
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.net import Relay
from tests.support.raw_client import RawClient, connect_ok, topics


async def connack(port: int, username: str | None, password: str | None, v5: bool) -> int:
    client, code, _ = await RawClient.open(port, username, v5=v5, password=password,
                                     client_id=f"{username}:{uid()}" if username else "")
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
    client = await RawClient.attach(front_port(front), True)
    client.send(connect("someone", None, PASSWORD, v5=True))
    packet = await client.expect(PacketType.CONNACK)
    assert decode_connack(packet, 0, len(packet), True).reason_code == 0x86
    await client.close()


async def test_failed_logins_are_logged_without_the_password(
    front: FrontBroker, caplog: pytest.LogCaptureFixture
) -> None:
    port = front_port(front)
    secret = f"Wr0ng-{uid()}-pw"
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
    client_secret = f"client-only-{uid()}"
    users = Path(log.parent / "users.yaml")
    hashed = bcrypt.hashpw(client_secret.encode(), bcrypt.gensalt(rounds=4)).decode()
    users.write_text(yaml.safe_dump({"users": [{"username": "project:team1:p1", "password_hash": hashed}]}))
    tap = await Relay(upstream.port).start()
    front = await make_front(
        upstream={"url": f"mqtt://127.0.0.1:{tap.port}", "username": "frontsvc", "password": "upstream-secret"},
        auth={"users_file": str(users), "allow_anonymous": False},
    )
    port = front_port(front)
    cid = f"project:team1:p1:{uid()}"
    client = await connect_ok(port, "project:team1:p1", v5, client_id=cid, password=client_secret)
    assert await client.subscribe("ff/v1/team1/c/#", qos=1) == [1]
    topic = f"ff/v1/team1/c/{uid()}"
    assert await client.publish(topic, qos=1) == 0
    assert topics(await client.until(topic)) == [topic]
    await client.disconnect()
    await asyncio.sleep(0.1)

    sent = bytes(tap.upstream_bytes)
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


# -- generated tokens and reloads ---------------------------------------------------------------------


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
    inbox = f"ff/v1/team1/p/p1/in/{uid()}"
    assert await stays.subscribe("ff/v1/team1/p/p1/in/#", qos=1) == [1]
    assert await stays.publish(inbox, qos=1) == 0
    assert topics(await stays.until(inbox)) == [inbox]
    await stays.close()
