"""/healthz and /readyz on the metrics port, with an upstream Mosquitto that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt

from broker.config import parse_config
from broker.server import FrontBroker
from tests.support.front import PASSWORD, FrontFactory, front_port
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.ops import get_json, http_request, ops_port

METRICS = {"bind": "127.0.0.1:0", "ready_window": 0.5, "probe_interval": 0.2}


async def wait_ready(front: FrontBroker, status: int, timeout: float = 15.0) -> dict[str, str]:
    async with asyncio.timeout(timeout):
        while True:
            code, body = await get_json(front, "/readyz")
            if code == status:
                assert isinstance(body, dict)
                return body
            await asyncio.sleep(0.1)


async def test_healthz_and_http_handling(make_front: FrontFactory) -> None:
    front = await make_front(metrics=METRICS)
    port = ops_port(front)
    status, headers, body = await http_request(port, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    status, headers, body = await http_request(port, "/healthz", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert (await http_request(port, "/nope"))[0] == 404
    assert (await http_request(port, "/metrics?x=1"))[0] == 200
    status, headers, _ = await http_request(port, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await http_request(port, "", raw=b"garbage\r\n\r\n"))[0] == 400
    assert (await http_request(port, "", raw=b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"))[0] == 400
    many = b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n"
    assert (await http_request(port, "", raw=many))[0] == 400
    # Still serving after the bad requests.
    assert (await get_json(front, "/healthz")) == (200, {"status": "ok"})


async def test_metrics_off_by_default(front: FrontBroker) -> None:
    assert front.ops is None


async def test_readyz_follows_the_upstream(tmp_path: Path, users_file: Path) -> None:
    upstream = start_mosquitto(tmp_path / "up")
    config = parse_config(
        {
            "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
            "upstream": {"url": upstream.url, "connect_timeout": 1},
            "auth": {"users_file": str(users_file)},
            "metrics": METRICS,
        }
    )
    front = FrontBroker(config)
    await front.start()
    try:
        assert await wait_ready(front, 200) == {"status": "ready"}
        # A client connect is a recent success too.
        async with aiomqtt.Client(
            "127.0.0.1",
            front_port(front),
            username="project:team1:p1",
            password=PASSWORD,
            identifier="project:team1:p1",
        ):
            pass
        assert (await get_json(front, "/readyz"))[0] == 200

        upstream.stop()
        body = await wait_ready(front, 503)
        assert body["status"] == "not ready"
        assert f"127.0.0.1:{upstream.port}" in body["reason"] and "unreachable" in body["reason"]
        # /healthz does not depend on the upstream.
        assert (await get_json(front, "/healthz"))[0] == 200

        upstream = start_mosquitto(tmp_path / "up", port=upstream.port)  # back on the same port
        assert await wait_ready(front, 200) == {"status": "ready"}
    finally:
        await front.stop()
        upstream.stop()


async def test_readyz_not_ready_without_listeners(make_front: FrontFactory, mosquitto: Mosquitto) -> None:
    front = await make_front(metrics=METRICS)
    assert (await get_json(front, "/readyz"))[0] == 200
    for server in front._servers:
        server.close()
    code, body = await get_json(front, "/readyz")
    assert code == 503 and body == {"status": "not ready", "reason": "listeners not bound"}
