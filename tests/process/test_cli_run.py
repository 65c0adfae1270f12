"""The ``mqtt-front`` command as an operator uses it: ``check`` and ``run`` as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.cli import EXAMPLE, ROOT, mqtt_front, run_cli
from tests.support.front import uid
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.timeout(40)

DEMO_USERS = ROOT / "config" / "users.yaml"
DEMO_USER = "project:team1:projectA"
DEMO_PASSWORD = "demo-password"  # see config/users.yaml


# ---------------------------------------------------------------- check


def test_check_example_config() -> None:
    result = run_cli("check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    assert "listener mqtt: tcp on 127.0.0.1:1883" in result.stdout
    assert "upstream: embedded broker: demo only: managed Mosquitto" in result.stdout
    assert "3 users" in result.stdout


def test_check_relative_config_path_from_another_directory(tmp_path: Path) -> None:
    """users_file is relative to the configuration file, not to the working directory."""
    result = subprocess.run(
        [*mqtt_front(), "check", "-c", os.path.relpath(EXAMPLE, tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "3 users" in result.stdout


BAD_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "unknown-top-level-key": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nlistenerz: 1\n",
        ["listenerz", "Extra inputs are not permitted"],
    ),
    "unknown-nested-key": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nlimits: {max_packet: 10}\n",
        ["limits.max_packet"],
    ),
    "bad-bind-no-port": ("listeners: [{name: mqtt, bind: '127.0.0.1'}]\n", ["listeners.0.bind", "host:port"]),
    "bad-bind-port-not-number": ("listeners: [{name: mqtt, bind: 'localhost:http'}]\n", ["listeners.0.bind"]),
    "bad-bind-port-range": ("listeners: [{name: mqtt, bind: '127.0.0.1:70000'}]\n", ["listeners.0.bind", "range"]),
    "bad-upstream-scheme": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nupstream: {url: 'http://127.0.0.1:1884'}\n",
        ["upstream.url", "scheme"],
    ),
    "no-listeners": ("listeners: []\n", ["listeners"]),
    "bad-limit-type": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nlimits: {connect_timeout: soon}\n",
        ["limits.connect_timeout"],
    ),
    "bad-acl-rule": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n"
        "acl: {rules: [{who: any, effect: allow, action: both, pattern: 'a/#/b'}]}\n",
        ["acl.rules.0"],
    ),
    "missing-users-file": (
        "listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nauth: {users_file: no-such-users.yaml}\n",
        ["users_file", "no-such-users.yaml"],
    ),
    "not-yaml": ("listeners: [\n  {name: mqtt\n", ["not valid YAML"]),
    "not-a-mapping": ("- just\n- a list\n", ["mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_invalid_config(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("check", "-c", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"


def test_check_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run_cli("check", "-c", str(missing))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert str(missing) in result.stderr
    assert "cannot read" in result.stderr


def test_run_invalid_config_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\nupstream: {url: 'tcp://x:1'}\n")
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "upstream.url" in result.stderr


# ---------------------------------------------------------------- run


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 8.0) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started


def write_config(tmp_path: Path, port: int, upstream: str | None = None) -> Path:
    """A copy of config/example.yaml (and its users.yaml next to it) on a free port."""
    shutil.copy(DEMO_USERS, tmp_path / "users.yaml")
    data = yaml.safe_load(EXAMPLE.read_text())
    data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    if upstream is not None:
        data["upstream"] = {"url": upstream}
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_front(tmp_path: Path, upstream: str | None = None) -> Running:
    port = free_port()
    config = write_config(tmp_path, port, upstream)
    log = tmp_path / "mqtt-front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 15)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mqtt-front did not start: {log.read_text()}") from None
    return Running(proc, port, log)


@pytest.fixture
def embedded_front(tmp_path: Path) -> Iterator[Running]:
    running = start_front(tmp_path)
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


@pytest.fixture
def upstream_front(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Running]:
    running = start_front(tmp_path, mosquitto.url)
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


def pub_sub_roundtrip(port: int, topic: str, version: str, auth: list[str], sub_id: str, pub_id: str) -> str:
    """mosquitto_sub waits for one message; mosquitto_pub publishes until it gets there."""
    common = ["-h", "127.0.0.1", "-p", str(port), "-V", version, "-q", "1", *auth]
    sub = subprocess.Popen(
        ["mosquitto_sub", *common, "-i", sub_id, "-t", topic, "-C", "1", "-W", "15", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for attempt in range(40):
            pub = subprocess.run(
                ["mosquitto_pub", *common, "-i", f"{pub_id}-{attempt}", "-t", topic, "-m", f"hello {attempt}"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert pub.returncode == 0, pub.stderr
            try:
                sub.wait(0.25)
                break
            except subprocess.TimeoutExpired:
                continue
        out, err = sub.communicate(timeout=5)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    return out.strip()


def raw_connack(port: int, level: int, client_id: str, username: str | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(connect(client_id, username, DEMO_PASSWORD if username else None, v5=level == 5, keepalive=30))
        data = b""
        while len(data) < 2 or len(data) < 2 + data[1]:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    return data


def test_run_embedded(embedded_front: Running) -> None:
    front = embedded_front
    topic = f"public/{uid()}"
    line = pub_sub_roundtrip(front.port, topic, "mqttv311", [], f"sub-{uid()}", f"pub-{uid()}")
    assert line.startswith(f"{topic} hello "), line
    # Authenticated demo user on its team's topics, too.
    topic = f"ff/v1/team1/c/{uid()}"
    auth = ["-u", DEMO_USER, "-P", DEMO_PASSWORD]
    line = pub_sub_roundtrip(front.port, topic, "mqttv311", auth, f"{DEMO_USER}:sub", f"{DEMO_USER}:pub")
    assert line.startswith(f"{topic} hello "), line
    # MQTT 5 too: the embedded default is a managed Mosquitto (the amqtt fallback's 0x84 refusal of v5:
    # tests/process/test_managed_embedded.py).
    connack = raw_connack(front.port, 5, f"v5-{uid()}")
    assert connack[:4] == b"\x20" + bytes((len(connack) - 2,)) + b"\x00\x00", connack
    # Anonymous clients are confined to public/#.
    assert raw_connack(front.port, 4, f"v3-{uid()}") == b"\x20\x02\x00\x00"
    code, took = front.terminate()
    assert code == 0, front.log_text()
    assert took < 5
    assert "Traceback" not in front.log_text()


def test_run_sigterm_with_connected_client(embedded_front: Running) -> None:
    front = embedded_front
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as sock:
        sock.sendall(connect(f"c-{uid()}", keepalive=30))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        code, took = front.terminate()
        assert code == 0, front.log_text()
        assert took < 5
        assert sock.recv(1024) == b""  # the client's connection was closed
    assert "Traceback" not in front.log_text()


def test_run_sigint_exits_cleanly(embedded_front: Running) -> None:
    front = embedded_front
    front.proc.send_signal(signal.SIGINT)
    assert front.proc.wait(8) == 0, front.log_text()
    assert "Traceback" not in front.log_text()


def test_run_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, port)
        result = run_cli("run", "-c", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot listen" in output
    assert "Traceback" not in output


def test_run_with_mosquitto_upstream(upstream_front: Running, mosquitto: Mosquitto) -> None:
    front = upstream_front
    for version in ("mqttv5", "mqttv311"):
        topic = f"public/{uid()}"
        line = pub_sub_roundtrip(front.port, topic, version, [], f"sub-{uid()}", f"pub-{uid()}")
        assert line.startswith(f"{topic} hello "), line
        topic = f"ff/v1/team1/c/{uid()}"
        auth = ["-u", DEMO_USER, "-P", DEMO_PASSWORD]
        sub_id, pub_id = f"{DEMO_USER}:sub-{uid()}", f"{DEMO_USER}:pub-{uid()}"
        line = pub_sub_roundtrip(front.port, topic, version, auth, sub_id, pub_id)
        assert line.startswith(f"{topic} hello "), line
    # v5 is accepted now; the CONNACK carries the front's packet size limit.
    connack = raw_connack(front.port, 5, f"{DEMO_USER}:raw", DEMO_USER)
    assert connack[:4] == b"\x20" + bytes((len(connack) - 2,)) + b"\x00\x00", connack
    assert b"\x27\x00\x10\x00\x00" in connack  # Maximum Packet Size 1048576 from the example config
    # A user outside the ACL cannot read another team's topics: refused SUBACK.
    sub = subprocess.run(
        [
            "mosquitto_sub",
            *("-h", "127.0.0.1", "-p", str(front.port), "-V", "mqttv5"),
            *("-u", DEMO_USER, "-P", DEMO_PASSWORD, "-i", f"{DEMO_USER}:x"),
            *("-t", "ff/v1/team2/c/#", "-C", "1", "-W", "3"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "All subscription requests were denied" in sub.stderr, sub.stderr
    assert "Traceback" not in front.log_text()
    code, took = front.terminate()
    assert code == 0, front.log_text()
    assert took < 5
