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

from broker.parent_death import Prctl, end_with_parent, resolve_prctl

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


# A dead worker is started again after a back-off that doubles with each recent death; more than
# MAX_RESTARTS deaths within RESTART_WINDOW seconds mean it cannot run: the process stops.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# A worker whose target returned 1 could not start (its configuration, a bind): starting it again would
# fail the same way, so that stops the process at once. Its exit code says so (sysexits' EX_CONFIG).
COULD_NOT_START = 78
# On SIGTERM each worker drains within limits.shutdown_timeout; one still alive this long after it is killed.
KILL_MARGIN = 5.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what the parent passes on to its workers


class ParentStats:
    """What the parent counts (read by its metrics endpoint from another thread: plain integers)."""

    restarts = 0


PARENT = ParentStats()


def run_workers(
    count: int,
    target: Callable[[int], int],
    started: Callable[[], None] | None = None,
    shutdown_timeout: float = 10.0,
    on_death: Callable[[int], None] | None = None,
) -> int:
    """Run ``target(index)`` in ``count`` forked processes until a signal, restarting a worker that dies.

    The others keep serving meanwhile (they share the listening sockets: the port never stops accepting).
    Only repeated deaths (MAX_RESTARTS within RESTART_WINDOW) stop everything, with exit code 1.
    ``started`` is called once every worker is forked and this process forwards signals to them (the
    moment to write a pid file: a SIGHUP sent to this process from then on reaches every worker).
    SIGTERM/SIGINT drain every worker (each within ``shutdown_timeout``); one still alive KILL_MARGIN
    seconds later is killed, and the exit code is then 1. ``on_death(index)`` is called once a worker is
    found dead, before anything else (its replacement included) starts: the moment to free what it held."""
    ctx = multiprocessing.get_context("fork")
    procs: list[BaseProcess] = []
    stopping = False
    stop_at: float | None = None  # when the first SIGTERM/SIGINT came

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping, stop_at
        if signum in (signal.SIGINT, signal.SIGTERM):
            stopping = True
            stop_at = time.monotonic() if stop_at is None else stop_at
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    prctl = resolve_prctl()  # before any fork: no dlopen in a child forked from a process with threads

    def spawn(index: int) -> None:
        # The forwarded signals wait while a worker is forked and recorded: the child inherits this mask and
        # takes them with its own handlers (_child), not with forward(), which it inherits too.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            child = ctx.Process(
                target=_child, args=(target, index, os.getpid(), prctl), name=f"mqtt-front-worker-{index}"
            )
            child.start()
            if index < len(procs):
                procs[index] = child
            else:
                procs.append(child)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    for index in range(count):
        spawn(index)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    log.info("started %d workers: %s", count, ", ".join(str(p.pid) for p in procs))
    if started is not None:
        started()
    code = 0
    deaths: list[float] = []  # when workers died, within the window
    due: dict[int, float] = {}  # index -> when its replacement starts
    while not stopping or any(p.is_alive() for p in procs):
        now = time.monotonic()
        if stop_at is not None and now - stop_at > shutdown_timeout + KILL_MARGIN:
            for proc in procs:
                if proc.pid is not None and proc.is_alive():
                    log.error("worker %s still running %.0f s after the stop: killing it", proc.name, now - stop_at)
                    proc.kill()
                    code = 1
            stop_at = None  # once
        for index, proc in enumerate(procs):
            if stopping or proc.is_alive() or index in due:
                continue
            if on_death is not None:
                on_death(index)
            if proc.exitcode == COULD_NOT_START:
                log.error("worker %s could not start: stopping the others", proc.name)
                code = 1
                forward(signal.SIGTERM, None)
                break
            deaths[:] = [t for t in deaths if now - t < RESTART_WINDOW]
            deaths.append(now)
            if len(deaths) > MAX_RESTARTS:
                log.error(
                    "worker %s exited with %s, the %d. death in %.0f s: stopping the others",
                    proc.name,
                    proc.exitcode,
                    len(deaths),
                    RESTART_WINDOW,
                )
                code = 1
                forward(signal.SIGTERM, None)
                break
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(deaths) - 1))
            log.error("worker %s exited with %s: restarting it in %.1f s", proc.name, proc.exitcode, delay)
            due[index] = now + delay
        for index, at in list(due.items()):
            if stopping:
                due.clear()
            elif now >= at:
                del due[index]
                spawn(index)
                PARENT.restarts += 1
                log.info("worker %s restarted: pid %s", procs[index].name, procs[index].pid)
                if stopping and procs[index].pid is not None:
                    # The stop reached another thread of this process during the fork and forward() ran
                    # before the new worker was recorded.
                    os.kill(procs[index].pid, signal.SIGTERM)
        time.sleep(0.05)
    return code


def serve_worker_metrics(address: tuple[str, int], sockets: list[str]) -> Callable[[], None]:
    """Serve metrics.bind for all workers from a thread of this (parent) process; returns a stopper."""
    from broker.ops.worker_metrics import WorkersOpsServer

    loop = asyncio.new_event_loop()
    server = WorkersOpsServer(sockets, PARENT)
    loop.run_until_complete(server.start(*address))  # binding errors surface here, before any worker starts
    log.info("metrics, health and readiness of %d workers on http://%s:%d", len(sockets), *address)
    thread = threading.Thread(target=loop.run_forever, name="worker-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return stop


def serve_worker_admin(
    address: tuple[str, int], sockets: list[str], token: str, shutdown_timeout: float | None = None
) -> Callable[[], None]:
    """Serve admin.bind for all workers from a thread of this (parent) process; returns a stopper.

    Each worker serves the admin API on its unix socket in ``sockets`` (same order as the workers);
    :class:`broker.ops.admin_workers.WorkersAdmin` asks them all and merges the answers.
    """
    from broker.ops.admin import AdminHttpServer
    from broker.ops.admin_workers import WorkersAdmin

    loop = asyncio.new_event_loop()
    backend = WorkersAdmin(sockets, token)
    server = AdminHttpServer(backend, token, shutdown_timeout)  # POST /drain: SIGTERM to this parent
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


def _die_with_parent(parent: int, prctl: Prctl | None) -> None:
    """A SIGTERM (a drain) when the parent dies, however it dies (broker.parent_death). Linux only;
    elsewhere the parent's own stop still reaches the workers."""
    try:
        alive = end_with_parent(prctl, parent)
    except OSError as exc:
        log.warning("worker %d: prctl(PR_SET_PDEATHSIG) failed: %s", os.getpid(), exc.strerror)
        return
    if not alive:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _child(target: Callable[[int], int], index: int, parent: int, prctl: Prctl | None) -> None:
    # The parent's handlers must not run here; the worker installs its own in its event loop. Until it
    # does, a SIGHUP (a reload forwarded by the parent) is ignored rather than fatal. Forked with the
    # forwarded signals blocked (spawn): one sent meanwhile is taken now, by these handlers.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    _die_with_parent(parent, prctl)
    code = target(index)
    raise SystemExit(COULD_NOT_START if code == 1 else code)
