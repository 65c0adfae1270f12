"""The embedded default as ``make run`` serves it: ``mqtt-front run`` with a config without ``upstream``.

With Mosquitto installed, the front broker runs it as a managed child process: MQTT 5 clients work through
the front broker, and nothing else can use the child (loopback only, no anonymous login, a password only
the front broker knows). It stops with the front broker, comes back when killed, and without Mosquitto
(``MQTT_FRONT_MOSQUITTO=none``) the amqtt fallback is locked down the same way.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import yaml
from paho.mqtt.reasoncodes import ReasonCode

from broker.config import ConfigError
from broker.upstream.managed import DIR_PREFIX, OWNER_FILE, ManagedMosquitto
from tests.support.cli import EXAMPLE, ROOT, mqtt_front, run_cli
from tests.support.front import uid
from tests.support.mqtt_bytes import connect
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.timeout(60)

DEMO_USER = "project:team1:projectA"
DEMO_PASSWORD = "demo-password"  # config/users.yaml
STARTED = re.compile(r"embedded_started broker=(\w+) host=127\.0\.0\.1 port=(\d+)(?: pid=(\d+))?")


@dataclass
class Front:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 15.0) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the log, waiting for them."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{pattern!r} x{count} not in the log:\n{self.text()}")
            time.sleep(0.05)

    def embedded(self, count: int = 1) -> tuple[str, int, int | None]:
        """(broker, port, pid) of the ``count``-th start of the embedded broker."""
        match = self.wait_for(STARTED.pattern, count)[count - 1]
        return match[1], int(match[2]), int(match[3]) if match[3] else None


def write_demo_config(folder: Path, port: int, **extra: object) -> Path:
    """config/example.yaml (no upstream) on ``port``, with config/users.yaml next to it."""
    shutil.copy(ROOT / "config" / "users.yaml", folder / "users.yaml")
    data = yaml.safe_load(EXAMPLE.read_text())
    assert "upstream" not in data, "the example must run the embedded default"
    data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    data.update(extra)
    path = folder / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    port = free_port()
    config = write_demo_config(tmp_path, port)
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    running = Front(proc, port, log)
    try:
        running.wait_for(r"ready version=", timeout=20)  # fails at once, with the log, if the process ends
        wait_port(port)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def v5_client(port: int, name: str, user: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"{user}:{name}" if user else f"{name}-{uid()}",
        username=user,
        password=DEMO_PASSWORD if user else None,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def roundtrip(port: int, topic: str, user: str | None = None) -> bytes:
    async with v5_client(port, "sub", user) as sub, v5_client(port, "pub", user) as pub:
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b"through the managed broker", qos=1)
        async with asyncio.timeout(10):
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no message")


def connack(port: int, client_id: str, username: str | None = None, password: str | None = None,
            v5: bool = False) -> bytes:
    """The CONNACK a broker answers to a raw CONNECT (b"" if it just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(connect(client_id, username, password, v5=v5, keepalive=30))
        data = b""
        while len(data) < 2 or len(data) < 2 + data[1]:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    return data


def listening_addresses(port: int) -> set[str]:
    """The local addresses of every listening TCP socket on ``port`` (from /proc/net/tcp and tcp6, hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def mosquitto_folder(pid: int) -> Path:
    """The managed Mosquitto's private folder, from its command line (``mosquitto -c <folder>/mosquitto.conf``)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(args[args.index(b"-c") + 1].decode()).parent


# ---------------------------------------------------------------- the managed Mosquitto


async def test_the_default_serves_mqtt5_clients_through_a_managed_mosquitto(front: Front) -> None:
    broker, _, pid = front.embedded()
    assert broker == "mosquitto" and pid is not None
    assert "embedded broker: demo only" in front.text()
    assert 'forwarding upstream="embedded mosquitto"' in front.text()
    topic = f"public/{uid()}"
    assert await roundtrip(front.port, topic) == b"through the managed broker"
    topic = f"ff/v1/team1/p/projectA/out/{uid()}"
    assert await roundtrip(front.port, topic, DEMO_USER) == b"through the managed broker"
    # The ACL still holds: team1's topics are not anonymous clients' (v5 SUBACK 0x87 from the front).
    async with v5_client(front.port, "nosy") as nosy:
        granted = await nosy.subscribe("ff/v1/team1/#", qos=1)
        assert [code.value if isinstance(code, ReasonCode) else code for code in granted] == [0x87]
    # Its log reaches ours, at info.
    assert re.search(r"INFO mqtt_front\.embedded: embedded_log broker=mosquitto line=\"mosquitto version", front.text())
    assert "Traceback" not in front.text()


def test_nothing_but_the_front_broker_can_use_the_managed_mosquitto(front: Front) -> None:
    _, port, pid = front.embedded()
    assert pid is not None
    # Only on loopback: every listening socket on that port is 127.0.0.1.
    assert listening_addresses(port) == {"0100007F"}
    # It is an MQTT broker (it answers), but refuses anonymous clients, v3.1.1 and v5 alike ...
    assert connack(port, f"direct-{uid()}") == b"\x20\x02\x00\x05"  # not authorized
    assert connack(port, f"direct-{uid()}", v5=True)[:4] == b"\x20\x03\x00\x87"
    # ... a demo user of the front broker (its users are the front's, not the internal broker's) ...
    assert connack(port, f"{DEMO_USER}:direct", DEMO_USER, DEMO_PASSWORD) == b"\x20\x02\x00\x05"
    # ... and the front broker's own username with a wrong password.
    folder = mosquitto_folder(pid)
    username = (folder / "passwd").read_text().split(":", 1)[0]
    assert username.startswith("mqtt-front-")
    assert connack(port, f"direct-{uid()}", username, "not-the-password") == b"\x20\x02\x00\x05"
    assert connack(port, f"direct-{uid()}", username, "", v5=True)[:4] == b"\x20\x03\x00\x87"  # not authorized
    # Its files: a private folder (0700), files for no one else (0600), owned by the user it runs as.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("passwd", "mosquitto.conf"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    conf = (folder / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and f"listener {port} 127.0.0.1" in conf
    assert "persistence false" in conf
    if os.geteuid() == 0:  # started as root: it runs as the mosquitto user, which owns the folder
        assert Path(f"/proc/{pid}").stat().st_uid == folder.stat().st_uid != 0
    password = (folder / "passwd").read_text()
    assert password.count("\n") == 1 and ":$7$101$" in password  # one user, Mosquitto's PBKDF2-SHA512
    assert password.split(":", 1)[1].strip() not in front.text()


def test_the_managed_mosquitto_stops_with_the_front_broker(front: Front) -> None:
    _, _, pid = front.embedded()
    assert pid is not None and alive(pid)
    folder = mosquitto_folder(pid)
    front.proc.send_signal(signal.SIGTERM)
    assert front.proc.wait(10) == 0, front.text()
    assert not alive(pid), "the managed mosquitto outlived the front broker"
    assert not folder.exists(), "its folder (password file) was left behind"
    assert "embedded_stopped broker=mosquitto" in front.text()


def test_the_managed_mosquitto_goes_when_the_front_broker_is_killed(front: Front) -> None:
    _, _, pid = front.embedded()
    assert pid is not None and alive(pid)
    front.proc.kill()  # no chance to stop it: the parent-death signal does
    front.proc.wait(10)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the managed mosquitto outlived a killed front broker"


async def test_the_managed_mosquitto_is_restarted_when_it_dies(front: Front) -> None:
    _, port, pid = front.embedded()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, new_port, new_pid = front.embedded(count=2)
    assert new_pid is not None and new_pid != pid and alive(new_pid)
    assert new_port != port  # a fresh port: the old one is known to every local user, who could bind it
    assert 'embedded_exited broker=mosquitto' in front.text() and 'reason="killed by SIGKILL"' in front.text()
    assert "embedded_restarting broker=mosquitto" in front.text()
    assert await roundtrip(front.port, f"public/{uid()}") == b"through the managed broker"
    assert connack(new_port, f"direct-{uid()}") == b"\x20\x02\x00\x05"  # locked down again


# ---------------------------------------------------------------- without Mosquitto: amqtt


def test_without_mosquitto_the_amqtt_fallback_is_locked_down_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_FRONT_MOSQUITTO", "none")  # as if mosquitto were not installed
    port = free_port()
    config = write_demo_config(tmp_path, port)
    check = run_cli("check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert "embedded broker: demo only: amqtt (mosquitto not found), MQTT 3.1.1 clients only" in check.stdout
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    running = Front(proc, port, log)
    try:
        running.wait_for(r"ready version=", timeout=20)
        broker, amqtt_port, _ = running.embedded()
        assert broker == "amqtt"
        assert "embedded broker: demo only" in running.text()
        assert re.search(r"WARNING mqtt_front\.embedded: amqtt speaks MQTT 3\.1\.1 only", running.text())
        # 3.1.1 through the front broker works (mosquitto_sub/pub) ...
        topic = f"public/{uid()}"
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", topic, "-C", "1", "-W", "10"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for _ in range(20):
            subprocess.run(["mosquitto_pub", "-p", str(port), "-t", topic, "-m", "via amqtt"], check=True, timeout=10)
            try:
                sub.wait(0.25)
                break
            except subprocess.TimeoutExpired:
                continue
        received, _ = sub.communicate(timeout=10)
        assert received.strip() == "via amqtt"
        # ... MQTT 5 is refused with 0x84, and the log says why.
        assert connack(port, f"v5-{uid()}", v5=True) == b"\x20\x03\x00\x84\x00"
        running.wait_for("configure a v5 upstream")
        # Nothing but the front broker gets in: loopback only, no anonymous, no other password.
        assert listening_addresses(amqtt_port) == {"0100007F"}
        for username, password in ((None, None), (DEMO_USER, DEMO_PASSWORD), ("mqtt-front-0000", "guess")):
            answer = connack(amqtt_port, f"direct-{uid()}", username, password)
            assert answer[:3] == b"\x20\x02\x00" and answer[3] in (4, 5), answer  # bad credentials / not authorized
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, running.text()
        assert "Traceback" not in running.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- check: loopback unless embedded: true


def test_check_and_run_refuse_a_network_listener_without_upstream(tmp_path: Path) -> None:
    port = free_port()
    config = write_demo_config(tmp_path, port)
    data = yaml.safe_load(config.read_text())
    data["listeners"][0]["bind"] = f"0.0.0.0:{port}"
    config.write_text(yaml.safe_dump(data))
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(config))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert f"listeners.0.bind: 0.0.0.0:{port} is not a loopback address and no upstream is configured" in (
            result.stdout + result.stderr
        )
        assert "embedded broker: demo only" in result.stdout + result.stderr
        assert "upstream: {embedded: true}" in result.stdout + result.stderr
    # Said on purpose: accepted.
    data["upstream"] = {"embedded": True}
    config.write_text(yaml.safe_dump(data))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "upstream: embedded broker: demo only: managed Mosquitto" in result.stdout
    assert "MQTT 5 and 3.1.1" in result.stdout
    # embedded: true is the embedded broker: no url or credentials of one's own next to it.
    data["upstream"] = {"embedded": True, "url": "mqtt://127.0.0.1:1884", "password": "x"}
    config.write_text(yaml.safe_dump(data))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    assert "embedded: true runs the embedded broker" in result.stderr and "remove password, url" in result.stderr


def test_check_on_loopback_says_demo_only(tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(write_demo_config(tmp_path, free_port())))
    assert result.returncode == 0, result.stderr
    assert "upstream: embedded broker: demo only: managed Mosquitto" in result.stdout
    assert "with a password only the front broker knows" in result.stdout


# ---------------------------------------------------------------- a Mosquitto that cannot start


async def test_a_mosquitto_that_cannot_start_is_one_clear_error() -> None:
    # Not in tmp_path: started as root it runs as the mosquitto user, which cannot enter pytest's 0700 folder.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o755)
        broken = Path(folder) / "mosquitto"
        broken.write_text("#!/bin/sh\necho 'Error: something is wrong' >&2\nexit 3\n")
        broken.chmod(0o755)
        broker = ManagedMosquitto(str(broken))
        with pytest.raises(ConfigError) as err:
            await broker.start()
    assert str(err.value) == (
        f"embedded broker: mosquitto ({broken}) did not start: exit code 3 (Error: something is wrong)"
    )
    assert broker.pid is None
    owners = Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*/{OWNER_FILE}")
    assert all(int(owner.read_text()) != os.getpid() for owner in owners), "its private folder was left behind"
