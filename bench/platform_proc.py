"""The platform in a process of its own, and mqtt-front configured to ask it (``auth.http``, style emqx).

The platform is ``bench.platform_lean.LeanPlatform`` (a bare asyncio HTTP/1.1 server, cheap enough not
to be the bottleneck) or ``tests.support.platform.FakePlatform`` (aiohttp, FlowFuse's full semantics),
run on uvloop in a spawned child, so its CPU is measured apart from the front's (``/proc/<pid>/stat``).
The parent drives it over a pipe: change an endpoint's ``delay``, read the request counts and the most
requests seen in flight at once, clear the logs, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from bench.harness import Proc, cpu_seconds, free_port
from tests.support.ports import wait_port

CTX = multiprocessing.get_context("spawn")


# ------------------------------------------------------------------ the platform (child process)


def serve_platform(conn: Connection, kind: str, usernames: list[str], password: str, auth_delay: float,
                   acl_delay: float) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a test dependency
        pass
    asyncio.run(_serve(conn, kind, usernames, password, auth_delay, acl_delay))


async def _serve(conn: Connection, kind: str, usernames: list[str], password: str, auth_delay: float,
                 acl_delay: float) -> None:
    platform: Any
    if kind == "fake":
        from tests.support.platform import FakePlatform

        platform = FakePlatform()
        for name in usernames:
            platform.add(name, password)
        platform.auth.delay, platform.acl.delay = auth_delay, acl_delay
    else:
        from bench.platform_lean import LeanPlatform

        platform = LeanPlatform(usernames, password, auth_delay, acl_delay)
    await platform.start()
    conn.send(platform.port)
    loop = asyncio.get_running_loop()
    endpoints = {"auth": platform.auth, "acl": platform.acl}
    while True:
        cmd, *args = await loop.run_in_executor(None, conn.recv)  # a thread blocked in recv costs no CPU
        if cmd == "stop":
            break
        if cmd == "delay":
            endpoints[args[0]].delay = float(args[1])
            conn.send(None)
        elif cmd == "jitter":  # lean only
            endpoints[args[0]].jitter = float(args[1])
            conn.send(None)
        elif cmd == "stats":
            conn.send({f"{name}_{what}": getattr(ep, what) for name, ep in endpoints.items()
                       for what in ("count", "peak", "in_flight", "first", "last") if hasattr(ep, what)})
        elif cmd == "clear":  # the counts, logs and peaks, not the knobs
            for ep in endpoints.values():
                if kind == "fake":
                    ep.requests.clear()
                    ep.headers.clear()
                    ep.peers.clear()
                else:
                    ep.count = 0
                    ep.first = ep.last = 0.0
                ep.peak = ep.in_flight
            conn.send(None)
    await platform.stop()
    conn.send(None)


@dataclass
class PlatformProc:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    port: int

    @classmethod
    def start(cls, usernames: list[str], password: str, auth_delay: float = 0.0, acl_delay: float = 0.0,
              kind: str = "lean") -> PlatformProc:
        """``kind``: ``lean`` (bench.platform_lean) or ``fake`` (tests.support.platform.FakePlatform)."""
        parent, child = CTX.Pipe()
        process = CTX.Process(target=serve_platform,
                              args=(child, kind, usernames, password, auth_delay, acl_delay), daemon=True)
        process.start()
        if not parent.poll(60):
            process.kill()
            raise RuntimeError("the fake platform did not start")
        port = parent.recv()
        wait_port(port, timeout=15.0)
        return cls(process, parent, port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        assert self.process.pid is not None
        return cpu_seconds(self.process.pid)

    def _call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(30):
            raise RuntimeError(f"the fake platform did not answer {cmd[0]}")
        return self.conn.recv()

    def set_delay(self, endpoint: str, seconds: float) -> None:
        self._call("delay", endpoint, seconds)

    def set_jitter(self, endpoint: str, seconds: float) -> None:
        """Answers after delay +- up to ``seconds`` (lean platform only)."""
        self._call("jitter", endpoint, seconds)

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self._call("stats")
        return result

    def clear(self) -> None:
        self._call("clear")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ------------------------------------------------------------------ mqtt-front asking it


def start_platform_front(workdir: Path, upstream_port: int, platform: PlatformProc, *, acl_source: str,
                         max_concurrency: int = 64, cache_ttl: float = 3600.0, name: str = "front",
                         jwt_secret: str | None = None, metrics_port: int | None = None,
                         workers: int = 1) -> tuple[Proc, int]:
    """mqtt-front (one worker, tcp listener) authenticating every CONNECT with the platform (emqx style,
    no users file) and with ``acl.source`` ``local`` (FlowFuse preset) or ``http``; returns (process, port).
    ``jwt_secret`` adds ``auth.jwt`` (HS256): a password that is a JWT is then decided without the platform.
    ``metrics_port`` turns on /metrics there (the platform client's request latency histogram).
    ``workers`` > 1 runs that many worker processes (``--workers``), sharing ``max_concurrency``."""
    port = free_port()
    config = {
        "listeners": [{"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": f"mqtt://127.0.0.1:{upstream_port}"},
        "limits": {"max_packet_size": 1048576, "connect_timeout": 30},
        "auth": {
            "allow_anonymous": False,
            "http": {
                "style": "emqx",
                "auth_url": platform.base_url + "/api/comms/v2/auth",
                "acl_url": platform.base_url + "/api/comms/v2/acls",
                "timeout": 5,
                "cache_ttl": cache_ttl,
                "negative_cache_ttl": 5,
                "max_concurrency": max_concurrency,
            },
        },
        "acl": {"source": acl_source, "preset": "flowfuse"},
        "logging": {"level": "warning"},
    }
    if metrics_port is not None:
        config["metrics"] = {"bind": f"127.0.0.1:{metrics_port}"}
    if jwt_secret is not None:
        config["auth"]["jwt"] = {"secret": jwt_secret, "algorithms": ["HS256"]}  # type: ignore[index]
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).with_name("mqtt-front")
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    popen = subprocess.Popen([str(exe), "run", "-c", str(conf), "--workers", str(workers)], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=15.0)
    except RuntimeError:
        popen.kill()
        popen.wait()
        tail = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mqtt-front did not start: {tail}") from None
    time.sleep(0.2)
    return Proc(name, popen), port
