"""/readyz follows the upstream at once (issue 15 item 6): a lost upstream connection makes the next request
probe, so a dead upstream is 503 long before ``metrics.ready_window`` would have run out; a connection the
upstream merely dropped (a session takeover) leaves it ready. The start-up log line is in
tests/process/test_drain.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker.config import parse_config
from broker.server import FrontBroker
from tests.support.front import front_port, uid
from tests.support.mosquitto import start_mosquitto
from tests.support.ops import get_json
from tests.support.raw_client import connect_ok

USER = "project:team1:p1"
# Long on purpose: without the lost-connection signal /readyz would stay 200 for 30 s and not probe for 10.
METRICS = {"bind": "127.0.0.1:0", "ready_window": 30, "probe_interval": 10}


async def started_front(upstream_url: str, users_file: Path) -> FrontBroker:
    config = parse_config(
        {
            "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
            "upstream": {"url": upstream_url, "connect_timeout": 1},
            "auth": {"users_file": str(users_file)},
            "metrics": METRICS,
        }
    )
    front = FrontBroker(config)
    await front.start()
    return front


async def test_readyz_503_as_soon_as_the_upstream_dies(tmp_path: Path, users_file: Path) -> None:
    upstream = start_mosquitto(tmp_path / "up")
    front = await started_front(upstream.url, users_file)
    try:
        client = await connect_ok(front_port(front), USER, v5=True)  # a recent successful upstream connect
        assert await get_json(front, "/readyz") == (200, {"status": "ready"})
        upstream.stop()
        await client.wait_closed()  # its upstream connection was lost
        lost = time.monotonic()
        code, body = await get_json(front, "/readyz")
        assert code == 503, body
        assert body["reason"].startswith("upstream unreachable") and f":{upstream.port}" in body["reason"], body
        assert time.monotonic() - lost < 2.5  # one probe (refused at once), not the 30 s window
        assert (await get_json(front, "/healthz"))[0] == 200

        upstream = start_mosquitto(tmp_path / "up", port=upstream.port)
        again = await connect_ok(front_port(front), USER, v5=True)  # a new connect after the loss: ready
        assert await get_json(front, "/readyz") == (200, {"status": "ready"})
        await again.close()
    finally:
        await front.stop()
        upstream.stop()


async def test_a_connection_the_upstream_dropped_while_up_keeps_it_ready(tmp_path: Path, users_file: Path) -> None:
    upstream = start_mosquitto(tmp_path / "up")
    front = await started_front(upstream.url, users_file)
    try:
        client_id = f"{USER}:{uid()}"
        first = await connect_ok(front_port(front), USER, v5=False, client_id=client_id)
        assert (await get_json(front, "/readyz"))[0] == 200
        # The same client id straight on Mosquitto: it takes the session over and closes the front's connection.
        thief = await connect_ok(upstream.port, USER, v5=False, client_id=client_id, password=None)
        await first.wait_closed()
        await asyncio.sleep(0.1)
        assert await get_json(front, "/readyz") == (200, {"status": "ready"})  # probed: the upstream is there
        await thief.close()
    finally:
        await front.stop()
        upstream.stop()
