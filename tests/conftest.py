"""Shared fixtures: a real Mosquitto per test module, an in-process front broker per test."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from broker.config import parse_config
from broker.server import FrontBroker

# Test users: bcrypt cost 4 keeps the suite fast; the format is the same as FlowFuse's.
PASSWORD = "s3cret-pass"
USERS = [
    "project:team1:p1",
    "project:team1:p2",
    "project:team2:p3",
    "project:team10:p4",
    "device:team1:d1",
    "alice@team1",
    "bob@team2",
    "forge_platform",
    "plainuser",
]


def free_port() -> int:
    """A free loopback port below the ephemeral range (32768-60999 here).

    Port 0 would hand out an ephemeral port, which an outgoing connection of the same suite can
    take before the process under test binds it; random ports below that range cannot be.
    """
    low, high = 20000, _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(21000, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it with apt-get")
    return found


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[bytes]
    conf: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mosquitto(directory: Path, extra: str = "", port: int | None = None) -> Mosquitto:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}")
    os.chmod(directory, 0o755)
    os.chmod(conf, 0o644)
    log = open(directory / f"mosquitto-{port}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"mosquitto did not start: {(directory / f'mosquitto-{port}.log').read_text()}") from None
    return Mosquitto(port, proc, conf)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.yaml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(yaml.safe_dump({"users": [{"username": u, "password_hash": hashed} for u in USERS]}))
    return path


FrontFactory = Callable[..., Any]


@pytest.fixture
async def make_front(mosquitto: Mosquitto, users_file: Path) -> AsyncIterator[FrontFactory]:
    """Start front brokers in this test's event loop; each call may override config sections."""
    started: list[FrontBroker] = []

    async def factory(**overrides: Any) -> FrontBroker:
        data: dict[str, Any] = {
            "listeners": [{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}],
            "upstream": {"url": mosquitto.url},
            "limits": {"max_packet_size": 65536, "connect_timeout": 2},
            "auth": {"users_file": str(users_file), "allow_anonymous": False},
            "acl": {"preset": "flowfuse"},
        }
        data.update(overrides)
        front = FrontBroker(parse_config(data))
        await front.start()
        started.append(front)
        return front

    yield factory
    for front in started:
        await front.stop()


@pytest.fixture
async def front(make_front: FrontFactory) -> FrontBroker:
    """A front broker on a free port, upstream = this module's Mosquitto, flowfuse preset."""
    result: FrontBroker = await make_front()
    return result


def front_port(front: FrontBroker, name: str = "mqtt") -> int:
    return front.bound[name][1]


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout)."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data
