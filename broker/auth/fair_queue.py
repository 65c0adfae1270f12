"""Password checks run round robin over source addresses, and within one source over usernames.

bcrypt costs tens of milliseconds of CPU per check; with one FIFO in front of the threads, 40
wrong-password CONNECTs from one address put 1.2-2.4 s in front of an unrelated first login. Here
every source address has its own queue (and every username its own queue inside it), and a free
thread takes the next job from the next source in turn: a flood from one address waits behind its
own jobs, not in front of everyone's. Written by hand because the standard executor has one FIFO.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class FairQueue:
    """Runs blocking jobs on ``executor`` with at most ``workers`` at once, taking them round robin."""

    def __init__(self, executor: Executor, workers: int) -> None:
        self._executor = executor
        self._free = workers
        # source -> username -> jobs; both levels in rotation order (the next to serve first).
        self._sources: OrderedDict[str, OrderedDict[str, deque[_Job]]] = OrderedDict()

    @property
    def queued(self) -> int:
        return sum(len(jobs) for users in self._sources.values() for jobs in users.values())

    def queued_for(self, source: str) -> int:
        """Jobs of ``source`` waiting for a thread (not those running)."""
        users = self._sources.get(source)
        return sum(len(jobs) for jobs in users.values()) if users else 0

    async def run(self, source: str, username: str, fn: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        users = self._sources.get(source)
        if users is None:
            users = self._sources[source] = OrderedDict()
        jobs = users.get(username)
        if jobs is None:
            jobs = users[username] = deque()
        job = (future, fn, args)
        jobs.append(job)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(source, username, job)  # the client went away: its place in the queue goes too
            raise

    def _forget(self, source: str, username: str, job: _Job) -> None:
        users = self._sources.get(source)
        jobs = users.get(username) if users else None
        if users is None or jobs is None or job not in jobs:
            return  # already taken by a thread
        jobs.remove(job)
        if not jobs:
            del users[username]
            if not users:
                del self._sources[source]

    def _dispatch(self) -> None:
        sources = self._sources
        while self._free and sources:
            source, users = next(iter(sources.items()))
            sources.move_to_end(source)  # the next job comes from the next source
            username, jobs = next(iter(users.items()))
            users.move_to_end(username)
            future, fn, args = jobs.popleft()
            if not jobs:
                del users[username]
                if not users:
                    del sources[source]
            if future.done():  # the client went away while it waited (its task was cancelled)
                continue
            self._free -= 1
            running = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
            running.add_done_callback(partial(self._finished, future))

    def _finished(self, future: asyncio.Future[Any], running: asyncio.Future[Any]) -> None:
        self._free += 1
        if not future.done():
            if running.cancelled():
                future.cancel()
            elif (exc := running.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(running.result())
        self._dispatch()
