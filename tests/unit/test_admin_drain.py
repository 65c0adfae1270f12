"""``POST /api/v1/drain``: answered 202 with the shutdown timeout, then the drain starts (a SIGTERM to the process
by default: the end-to-end path is in tests/process/test_drain.py); the token is required like everywhere."""

from __future__ import annotations

import asyncio

import httpx

from broker.ops.admin import AdminServer
from tests.support.admin import AUTH, TOKEN, FakeBackend


async def test_drain_answers_then_starts_the_drain() -> None:
    started: list[str] = []
    server = AdminServer(FakeBackend(), TOKEN, shutdown_timeout=7.0, drain=lambda: started.append("drain"))
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}/api/v1", timeout=10) as client:
            refused = await client.post("/drain")
            assert refused.status_code == 401 and started == []
            answer = await client.post("/drain", headers=AUTH)
            assert answer.status_code == 202
            assert answer.json() == {"draining": True, "shutdown_timeout": 7.0}
            await asyncio.sleep(0.05)
            assert started == ["drain"]
            assert (await client.post("/drain", headers=AUTH, json={"now": True})).status_code == 400
    finally:
        await server.stop()
