"""CPU per platform request of the HTTP client alone: the front's PlatformClient vs bare httpx and aiohttp clients.

    .venv/bin/python -m bench.platform_client_cost [--requests 1000] [--delay 0.02] [--repeat 3]

No MQTT here: in this process (on uvloop, as mqtt-front runs) ``--requests`` authentication requests
are started at once and bounded by ``max_concurrency`` (16, 64, 256), against the lean platform
(``bench.platform_lean``) in a process of its own answering after ``--delay``. Reports the wall time
against the bound ``requests x delay / max_concurrency`` and this process's CPU per request, for

- ``PlatformClient (as built)``: ``broker.auth.platform.PlatformClient.authenticate``, exactly what a
  CONNECT costs the front on the platform side, with whatever HTTP library it is built on (httpx until
  commit f2dba43, aiohttp until the h11 client of broker/auth/http_client.py), bounded by max_concurrency;
- bare httpx: one ``httpx.AsyncClient`` with ``max_connections`` = max_concurrency (no semaphore), and the
  same split over 8 clients of max_concurrency/8 connections each (the pool's work grows with its size);
- ``aiohttp``: one ``aiohttp.ClientSession`` with ``TCPConnector(limit=max_concurrency)``, the same
  request body and the same JSON reading, as a reference for what another well-kept library costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import aiohttp
import httpx

from bench.harness import PASSWORD, cpu_seconds
from bench.platform_proc import PlatformProc
from broker.auth.platform import PlatformClient
from broker.config import HttpAuthConfig

USERS = [f"project:team0:s{i}" for i in range(1000)]


async def with_platform_client(base: str, n: int, concurrency: int) -> tuple[float, int]:
    client = PlatformClient(HttpAuthConfig(auth_url=base + "/api/comms/v2/auth", acl_url=base + "/api/comms/v2/acls",
                                           max_concurrency=concurrency, timeout=30))
    await client.start()
    try:
        start = time.perf_counter()
        verdicts = await asyncio.gather(*(client.authenticate(USERS[i % len(USERS)], PASSWORD.encode(), f"c{i}")
                                          for i in range(n)))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    return wall, sum(v.ok for v in verdicts)


async def with_aiohttp(base: str, n: int, concurrency: int) -> tuple[float, int]:
    url = base + "/api/comms/v2/auth"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=4.0)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(i: int) -> bool:
            body = json.dumps({"username": USERS[i % len(USERS)], "password": PASSWORD, "clientId": f"c{i}"},
                              separators=(",", ":")).encode()
            async with session.post(url, data=body) as response:
                data = json.loads(await response.read())
                return response.status == 200 and data.get("result") == "allow"

        start = time.perf_counter()
        oks = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return wall, sum(oks)


async def with_httpx_pools(base: str, n: int, concurrency: int, pools: int) -> tuple[float, int]:
    """Bare httpx: ``pools`` AsyncClients of ``concurrency / pools`` connections each, requests dealt round-robin."""
    url = base + "/api/comms/v2/auth"
    per = max(1, concurrency // pools)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per, keepalive_expiry=4.0)
    clients = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30), trust_env=False,
                                 headers={"Content-Type": "application/json"}) for _ in range(pools)]
    try:

        async def one(i: int) -> bool:
            body = json.dumps({"username": USERS[i % len(USERS)], "password": PASSWORD, "clientId": f"c{i}"},
                              separators=(",", ":")).encode()
            response = await clients[i % pools].post(url, content=body)
            return response.status_code == 200 and json.loads(response.content).get("result") == "allow"

        start = time.perf_counter()
        oks = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    finally:
        for c in clients:
            await c.aclose()
    return wall, sum(oks)


VARIANTS = {
    "PlatformClient (as built)": with_platform_client,
    "bare httpx, 1 pool": lambda base, n, c: with_httpx_pools(base, n, c, 1),
    "bare httpx, 8 pools of max_concurrency/8": lambda base, n, c: with_httpx_pools(base, n, c, 8),
    "aiohttp": with_aiohttp,
}


async def measure(base: str, n: int, concurrency: int, which: str) -> dict[str, float]:
    fn = VARIANTS[which]
    await fn(base, 64, concurrency)  # imports, first connections
    cpu0 = cpu_seconds(os.getpid())
    wall, ok = await fn(base, n, concurrency)
    cpu = cpu_seconds(os.getpid()) - cpu0
    return {"wall_s": wall, "ok": ok, "cpu_us_per_request": cpu / n * 1e6, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.platform_client_cost")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    platform = PlatformProc.start(USERS, PASSWORD, auth_delay=args.delay)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for r in range(args.repeat):
            for concurrency in (16, 64, 256):
                for which in VARIANTS:
                    res = uvloop.run(measure(platform.base_url, args.requests, concurrency, which))
                    print(f"[client] #{r + 1} {which} max_concurrency {concurrency}: {res}", flush=True)
                    results.setdefault((which, concurrency), []).append(res)
    finally:
        platform.stop()
    import broker.auth.http_client as built

    library = next((name for name in ("httptools", "h11") if hasattr(built, name)), "?")
    print(f"\n{args.requests} auth requests, platform answering after {args.delay * 1000:.0f} ms; "
          f"median [min-max] of {args.repeat}; PlatformClient on {library}\n")
    print("| client | max_concurrency | bound s | wall s | CPU µs per request |\n|---|---|---|---|---|")
    for (which, concurrency), rs in results.items():
        def cell(key: str, digits: int, rs: list[dict[str, Any]] = rs) -> str:
            xs = [x[key] for x in rs]
            return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"

        bound = args.requests * args.delay / concurrency
        print(f"| {which} | {concurrency} | {bound:.3f} | {cell('wall_s', 3)} | {cell('cpu_us_per_request', 0)} |")


if __name__ == "__main__":
    main()
