"""Several worker processes sharing the listening sockets (SO_REUSEPORT), one event loop each.

mqtt-front is stateless per connection, so workers need no coordination: the kernel spreads
new connections over them. The parent only starts, watches and stops them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType

log = logging.getLogger("mqtt_front.workers")


def resolve_workers(value: str) -> int:
    """``auto`` = one worker per CPU; otherwise a positive integer."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) or 1
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a positive integer or 'auto', not {value!r}") from None
    if count < 1:
        raise ValueError(f"--workers must be at least 1, not {count}")
    return count


def run_workers(count: int, target: Callable[[int], int], started: Callable[[], None] | None = None) -> int:
    """Run ``target(index)`` in ``count`` forked processes until a signal or a worker failure.

    ``started`` is called once every worker is forked and this process forwards signals to them (the
    moment to write a pid file: a SIGHUP sent to this process from then on reaches every worker)."""
    ctx = multiprocessing.get_context("fork")
    procs: list[BaseProcess] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGINT, signal.SIGTERM):
            stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for index in range(count):
        child = ctx.Process(target=_child, args=(target, index), name=f"mqtt-front-worker-{index}")
        child.start()
        procs.append(child)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("started %d workers: %s", count, ", ".join(str(p.pid) for p in procs))
    if started is not None:
        started()
    code = 0
    while any(p.is_alive() for p in procs):
        for proc in procs:
            if not proc.is_alive() and proc.exitcode not in (0, None) and not stopping:
                log.error("worker %s exited with %s: stopping the others", proc.name, proc.exitcode)
                code = 1
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    if any(p.exitcode not in (0, None) for p in procs) and not stopping:
        code = 1
    return code


def serve_worker_metrics(address: tuple[str, int], sockets: list[str]) -> Callable[[], None]:
    """Serve metrics.bind for all workers from a thread of this (parent) process; returns a stopper."""
    from broker.ops.worker_metrics import WorkersOpsServer

    loop = asyncio.new_event_loop()
    server = WorkersOpsServer(sockets)
    loop.run_until_complete(server.start(*address))  # binding errors surface here, before any worker starts
    log.info("metrics, health and readiness of %d workers on http://%s:%d", len(sockets), *address)
    thread = threading.Thread(target=loop.run_forever, name="worker-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return stop


def serve_worker_admin(address: tuple[str, int], sockets: list[str], token: str) -> Callable[[], None]:
    """Serve admin.bind for all workers from a thread of this (parent) process; returns a stopper.

    Each worker serves the admin API on its unix socket in ``sockets`` (same order as the workers);
    :class:`broker.ops.admin_workers.WorkersAdmin` asks them all and merges the answers.
    """
    from broker.ops.admin import AdminHttpServer
    from broker.ops.admin_workers import WorkersAdmin

    loop = asyncio.new_event_loop()
    backend = WorkersAdmin(sockets, token)
    server = AdminHttpServer(backend, token)
    try:
        loop.run_until_complete(server.start(*address))  # binding errors surface here, before any worker starts
    except BaseException:
        loop.close()
        raise
    thread = threading.Thread(target=loop.run_forever, name="worker-admin", daemon=True)  # start() logged the URL
    thread.start()

    async def shutdown() -> None:
        await server.stop()
        await backend.close()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return stop


def _child(target: Callable[[int], int], index: int) -> None:
    # The parent's handlers must not run here; the worker installs its own in its event loop. Until it
    # does, a SIGHUP (a reload forwarded by the parent) is ignored rather than fatal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise SystemExit(target(index))
