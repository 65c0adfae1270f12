"""Paced starts: callbacks run in order, a few per turn of the event loop (the login burst after an outage).

Moved out of :mod:`broker.relay`, which uses :data:`LOGINS` for every authentication it starts; it knows
nothing of MQTT or of connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("mqtt_front.connection")


class TurnPacer:
    """Runs callbacks in order, at most ``per_turn`` per turn of the event loop.

    A burst of new logins (a thousand CONNECTs read at once after an outage) would otherwise start all
    their authentications in one loop turn, each costing tens of microseconds, while the platform's
    answers to the first of them and other clients' packets wait for the next poll. Paced, the loop
    polls its sockets between two batches.
    """

    def __init__(self, per_turn: int = 16) -> None:
        self.per_turn = per_turn
        self._queue: deque[Callable[[], None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a run is scheduled on (None: none)

    def submit(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # left over from a loop that is gone (tests run one per test)
                self._queue.clear()
            self._loop = loop
            loop.call_soon(self._run)
        self._queue.append(callback)

    def _run(self) -> None:
        queue = self._queue
        try:
            for _ in range(min(self.per_turn, len(queue))):
                try:
                    queue.popleft()()
                except Exception:  # one login's failure must not stall the others
                    log.exception("starting an authentication failed")
        finally:
            if queue and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon(self._run)
            else:
                self._loop = None


LOGINS = TurnPacer()
"""Authentications started per loop turn (one event loop per process)."""
