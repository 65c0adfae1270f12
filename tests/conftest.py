"""Fixtures of the whole suite: a real Mosquitto per test module, the users file, an in-process front
broker per test, the certificates. They start only when a test asks for them (unit tests never do);
what they are built from lives in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.config import parse_config
from broker.linger import TARPIT
from broker.server import FrontBroker
from tests.support.front import FrontFactory, write_users_file
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.pki import Pki, make_pki, pki_directory
from tests.support.platform import FakePlatform


@pytest.fixture(autouse=True)
def short_tarpit(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CONNECT refused as malformed is closed 1 s later (broker.linger.Tarpit): the in-process fronts of
    tests about other things close it after 50 ms instead (tests/e2e/test_tarpit.py keeps the real hold)."""
    if not request.module.__name__.endswith("test_tarpit"):
        monkeypatch.setattr(TARPIT, "HOLD", 0.05)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users_file(tmp_path_factory.mktemp("users") / "users.yaml")


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


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    """This module's certificates (see tests/support/pki.py), in a folder Mosquitto can read."""
    with pki_directory() as folder:
        yield make_pki(folder)


@pytest.fixture
async def platform() -> AsyncIterator[FakePlatform]:
    """A platform stand-in (aiohttp, FlowFuse's semantics, both API styles) on a free port."""
    fake = await FakePlatform().start()
    yield fake
    await fake.stop()
