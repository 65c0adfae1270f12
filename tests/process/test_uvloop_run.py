"""``mqtt-front run`` on uvloop (installed by the test extras): every listener kind works there too.

uvloop's transports are not asyncio's classes, so the protocols must not rely on that.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import yaml

from broker.edge.proxy_protocol import encode_v1
from tests.support.cli import mqtt_front
from tests.support.front import PASSWORD
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.timeout(60)

USER = "project:team1:p1"


@pytest.fixture
def front_on_uvloop(tmp_path: Path, mosquitto: Mosquitto, users_file: Path) -> Iterator[tuple[dict[str, int], Path]]:
    ports = {"tcp": free_port(), "ws": free_port(), "proxy": free_port()}
    config = {
        "listeners": [
            {"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{ports['tcp']}"},
            {"name": "ws", "type": "ws", "bind": f"127.0.0.1:{ports['ws']}", "path": "/mqtt"},
            {"name": "lb", "type": "tcp", "bind": f"127.0.0.1:{ports['proxy']}", "proxy_protocol": True},
        ],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users_file)},
    }
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "front.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(path)], stdout=log, stderr=log)
        try:
            for port in ports.values():
                wait_port(port)
            yield ports, log_path
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


async def test_every_listener_kind_on_uvloop(front_on_uvloop: tuple[dict[str, int], Path]) -> None:
    ports, log_path = front_on_uvloop
    assert "event loop: uvloop" in log_path.read_text()
    def client(port: int, name: str, ws: bool = False) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=f"{USER}:{name}",
            username=USER,
            password=PASSWORD,
            transport="websockets" if ws else "tcp",
            websocket_path="/mqtt" if ws else None,
        )

    async with client(ports["tcp"], "tcp") as sub, client(ports["ws"], "ws", ws=True) as pub:
        await sub.subscribe("ff/v1/team1/p/+/out/#", qos=1)
        await pub.publish("ff/v1/team1/p/p1/out/uv", b"over ws", qos=1)
        async with asyncio.timeout(5):
            async for message in sub.messages:
                assert message.payload == b"over ws"
                break
    # PROXY protocol listener: the header, then MQTT.
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["proxy"])
    writer.write(encode_v1(("203.0.113.7", 4242)) + connect(f"{USER}:lb", USER, PASSWORD, keepalive=30))
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
    writer.close()
    async with asyncio.timeout(5):
        while "203.0.113.7" not in log_path.read_text():
            await asyncio.sleep(0.05)
