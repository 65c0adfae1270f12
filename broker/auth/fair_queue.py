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

    async def run(self, source: str, username: str, fn: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        users = self._sources.get(source)
        if users is None:
            users = self._sources[source] = OrderedDict()
        jobs = users.get(username)
        if jobs is None:
            jobs = users[username] = deque()
        jobs.append((future, fn, args))
        self._dispatch()
        return await future

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
