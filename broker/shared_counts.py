"""Counts that the worker processes of one mqtt-front (``--workers N``) share: the connection caps,
queued password checks and team publish buckets, so that N workers allow each cap once, not N times.

:class:`SharedCounts` is made by the parent before it forks: an anonymous shared mapping (every
worker sees the same memory) and a lock file. Each worker uses its :class:`WorkerCounts`
(``attach(index)``); a single process uses :class:`LocalCounts`, the same interface over a dict.

Why it is crash safe:

- Each worker writes only its own column of counts and a key's total is the sum of the columns,
  so the parent frees a dead worker's share by zeroing its column before starting its replacement
  (a SIGKILLed worker leaves nothing counted).
- Every update takes a POSIX record lock (``fcntl.lockf``) on the parent's lock file. The kernel
  drops the lock of a process that dies, so a worker killed mid-update cannot wedge the others.

A lock round trip is about 2 µs. It is paid on the connect path and at rate checkpoints (a few per
second per connection), never per relayed packet.

Keys are 64-bit hashes (blake2b) of strings in open-addressing tables (linear probing, rows moved
back on delete), bounded by ``slots``. When a table is full, a new key cannot be counted: the
caller refuses (a cap) or falls back to a bucket of its own (a rate).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from broker.session.ratelimit import NO_LIMIT, RateSpec

CONNECTIONS = "\x00connections"  # limits.max_connections: every open client socket of the process
AUTH_PENDING = "\x00auth_pending"  # auth.max_pending: password checks queued or running


@lru_cache(maxsize=65536)
def _key(name: str) -> int:
    value = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1  # 0 marks an empty slot


class Counts(Protocol):
    """What the caps ask: one shared implementation, one local."""

    def add(self, name: str, delta: int) -> int:
        """Change this process's count of ``name`` by ``delta``; the total over all workers after it."""

    def take(self, name: str, cap: int | None) -> bool:
        """One more ``name`` unless the total is already ``cap`` (None: no cap). False: nothing counted."""

    def release(self, name: str) -> None:
        """One less ``name`` (what ``take`` counted)."""

    def total(self, name: str) -> int: ...


class LocalCounts:
    """One process: a dict."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, name: str, delta: int) -> int:
        count = self._counts.get(name, 0) + delta
        if count > 0:
            self._counts[name] = count
        else:
            self._counts.pop(name, None)
        return count

    def take(self, name: str, cap: int | None) -> bool:
        count = self._counts.get(name, 0)
        if cap is not None and count >= cap:
            return False
        self._counts[name] = count + 1
        return True

    def release(self, name: str) -> None:
        self.add(name, -1)

    def total(self, name: str) -> int:
        return self._counts.get(name, 0)


class _Table:
    """Linear probing over ``keys`` (a shared array); a row is a key plus what ``move``/``clear`` copy."""

    def __init__(self, keys: memoryview, move: Callable[[int, int], None], clear: Callable[[int], None]) -> None:
        self.keys = keys
        self.mask = len(keys) - 1
        self.move = move
        self.clear = clear

    def find(self, key: int, insert: bool) -> int:
        """The slot of ``key``; with ``insert``, an empty one made its own (-1: absent, or the table is full)."""
        keys, mask = self.keys, self.mask
        slot = key & mask
        for _ in range(mask + 1):
            found = keys[slot]
            if found == key:
                return slot
            if found == 0:
                if not insert:
                    return -1
                keys[slot] = key
                return slot
            slot = (slot + 1) & mask
        return -1

    def delete(self, slot: int) -> None:
        """Empty ``slot``, moving later rows of its probe chain back (Knuth's algorithm R)."""
        keys, mask = self.keys, self.mask
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            key = keys[probe]
            if key == 0 or probe == hole:  # an empty slot ends the chain; in a full table, the hole itself
                break
            home = key & mask
            # The row at probe may fill the hole only if its home is not cyclically within (hole, probe].
            if (hole < probe and hole < home <= probe) or (hole > probe and (home > hole or home <= probe)):
                continue
            keys[hole] = key
            self.move(probe, hole)
            hole = probe
        keys[hole] = 0
        self.clear(hole)


class SharedCounts:
    """The shared memory of ``workers`` processes: made before fork, then ``attach(index)`` in each."""

    def __init__(self, workers: int, slots: int = 1 << 15, buckets: int = 1 << 14) -> None:
        if slots & (slots - 1) or buckets & (buckets - 1):
            raise ValueError("slots and buckets must be powers of two")
        self.workers = workers
        self.slots = slots
        self.buckets = buckets
        size = slots * 8 + workers * slots * 4 + buckets * 8 + buckets * 4 * 8
        self._memory = mmap.mmap(-1, size)  # anonymous, MAP_SHARED: the forked workers see the same pages
        view = memoryview(self._memory)
        offset = slots * 8
        self.keys = view[:offset].cast("Q")
        self.columns: list[memoryview] = []
        for _ in range(workers):
            self.columns.append(view[offset : offset + slots * 4].cast("i"))
            offset += slots * 4
        self.bucket_keys = view[offset : offset + buckets * 8].cast("Q")
        offset += buckets * 8
        self.bucket_state = view[offset : offset + buckets * 32].cast("d")  # per row: 2 x (tokens, stamp)
        self._lock_file = tempfile.TemporaryFile(prefix="mqtt-front-counts-")  # noqa: SIM115 (lives as long as the process)
        self._thread_lock = threading.Lock()  # lockf excludes processes, not threads of one
        self.counts = _Table(self.keys, self._move_row, self._clear_row)
        self.bucket_table = _Table(self.bucket_keys, self._move_bucket, self._clear_bucket)

    # -------------------------------------------------------------- locking

    def __enter__(self) -> SharedCounts:
        self._thread_lock.acquire()
        fcntl.lockf(self._lock_file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc: object) -> None:
        fcntl.lockf(self._lock_file, fcntl.LOCK_UN)
        self._thread_lock.release()

    # -------------------------------------------------------------- rows

    def _move_row(self, source: int, target: int) -> None:
        for column in self.columns:
            column[target] = column[source]

    def _clear_row(self, slot: int) -> None:
        for column in self.columns:
            column[slot] = 0

    def _move_bucket(self, source: int, target: int) -> None:
        state = self.bucket_state
        state[target * 4 : target * 4 + 4] = state[source * 4 : source * 4 + 4]

    def _clear_bucket(self, slot: int) -> None:
        self.bucket_state[slot * 4 : slot * 4 + 4] = memoryview(bytes(32)).cast("d")

    def row_total(self, slot: int) -> int:
        return sum(column[slot] for column in self.columns)

    # -------------------------------------------------------------- the parent

    def attach(self, worker: int) -> WorkerCounts:
        """What worker ``worker`` (0 .. workers-1) counts with, in its own process after the fork."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} of {self.workers}")
        return WorkerCounts(self, worker)

    def free_worker(self, worker: int) -> int:
        """Forget what a dead worker counted (before its replacement starts); how many it held."""
        with self:
            column = self.columns[worker]
            held = 0
            for slot in range(self.slots):
                if column[slot]:
                    held += column[slot]
                    column[slot] = 0
            self._compact()
        return held

    def _compact(self) -> None:
        """Rows whose total is zero go (the caller holds the lock)."""
        slot = 0
        while slot < self.slots:
            if self.keys[slot] and not self.row_total(slot):
                self.counts.delete(slot)  # a row moved into this slot is looked at again
                continue
            slot += 1


class WorkerCounts:
    """One worker's view of :class:`SharedCounts` (the same interface as :class:`LocalCounts`)."""

    def __init__(self, shared: SharedCounts, worker: int) -> None:
        self.shared = shared
        self.column = shared.columns[worker]
        self.pid = os.getpid()

    def add(self, name: str, delta: int) -> int:
        shared = self.shared
        with shared:
            slot = shared.counts.find(_key(name), insert=delta > 0)
            if slot < 0:
                # Full table (growing), or nothing counted (shrinking): the total is not known; a cap refuses.
                return 1 << 30 if delta > 0 else 0
            self.column[slot] = max(0, self.column[slot] + delta)
            total = shared.row_total(slot)
            if not total:
                shared.counts.delete(slot)
            return total

    def take(self, name: str, cap: int | None) -> bool:
        shared = self.shared
        with shared:
            slot = shared.counts.find(_key(name), insert=True)
            if slot < 0:
                return False  # the table is full: fail closed
            total = shared.row_total(slot)
            if cap is not None and total >= cap:
                if not total:
                    shared.counts.delete(slot)
                return False
            self.column[slot] += 1
            return True

    def release(self, name: str) -> None:
        self.add(name, -1)

    def total(self, name: str) -> int:
        shared = self.shared
        with shared:
            slot = shared.counts.find(_key(name), insert=False)
            return shared.row_total(slot) if slot >= 0 else 0

    # -------------------------------------------------------------- token buckets

    def buckets(self, name: str, messages: float, size: float, now: float, rates: Rates) -> tuple[float, float] | None:
        """Take ``messages`` and ``size`` from ``name``'s two buckets (0, 0 only reads): their tokens after
        (negative: debt; a bucket whose rate is 0 is absent and answers +inf). None: the table is full."""
        shared = self.shared
        with shared:
            table = shared.bucket_table
            key = _key(name)
            slot = table.find(key, insert=False)
            state = shared.bucket_state
            if slot < 0:
                slot = table.find(key, insert=True)
                if slot < 0:
                    self._forget_full_buckets(now, rates)
                    slot = table.find(key, insert=True)
                    if slot < 0:
                        return None
                state[slot * 4 + 1] = state[slot * 4 + 3] = -1.0  # not started: full
            out = [INF, INF]
            for half, amount in ((0, messages), (1, size)):
                rate, burst = rates[half * 2], rates[half * 2 + 1]
                if not rate:
                    continue
                at = slot * 4 + half * 2
                stamp = state[at + 1]
                tokens = burst if stamp < 0 else min(burst, state[at] + max(0.0, now - stamp) * rate)
                tokens -= amount
                state[at] = tokens
                state[at + 1] = max(stamp, now)
                out[half] = tokens
            return out[0], out[1]

    def _forget_full_buckets(self, now: float, rates: Rates) -> None:
        """A full bucket is the same as none: drop those (the caller holds the lock)."""
        shared = self.shared
        state, keys = shared.bucket_state, shared.bucket_keys
        slot = 0
        while slot < shared.buckets:
            if keys[slot] and all(_full(state, slot * 4 + half * 2, now, rates, half) for half in (0, 1)):
                shared.bucket_table.delete(slot)  # a row moved into this slot is looked at again
                continue
            slot += 1


INF = float("inf")
Rates = tuple[float, float, float, float]
"""(messages per second, messages burst, bytes per second, bytes burst); a rate of 0: no such bucket."""


def _full(state: memoryview[float], at: int, now: float, rates: Rates, half: int) -> bool:
    rate, burst = rates[half * 2], rates[half * 2 + 1]
    stamp = state[at + 1]
    return not rate or stamp < 0 or state[at] + (now - stamp) * rate >= burst


class SharedRatePair:
    """A team's publish buckets kept in the workers' shared memory: what
    :class:`broker.session.ratelimit.RatePair` does for one process, for all workers at once."""

    __slots__ = ("counts", "name", "rates")

    def __init__(self, counts: WorkerCounts, team: str, spec: RateSpec) -> None:
        self.counts = counts
        self.name = "\x00rate:" + team
        self.rates = _rates(spec)

    def retune(self, spec: RateSpec | None, now: float) -> None:
        self.rates = _rates(spec)

    def allowance(self, now: float, share: float = 1.0) -> tuple[float, float]:
        rates = self.rates
        tokens = self.counts.buckets(self.name, 0, 0, now, rates)
        messages = size = float(NO_LIMIT)
        if tokens is None:
            return messages, size
        if rates[0]:
            messages = min(max(0.0, tokens[0]) * share, rates[0] / 10)
        if rates[2]:
            size = min(max(0.0, tokens[1]) * share, rates[2] / 10)
        return messages, size

    def take(self, messages: int, size: int, now: float) -> float:
        rates = self.rates
        tokens = self.counts.buckets(self.name, messages, size, now, rates)
        if tokens is None:
            return 0.0  # no row left for this team (16,384 teams rate-limited at once): not enforced
        wait = 0.0
        if tokens[0] < 0:
            wait = -tokens[0] / rates[0]
        if tokens[1] < 0:
            wait = max(wait, -tokens[1] / rates[2])
        return wait


def _rates(spec: RateSpec | None) -> Rates:
    messages, messages_burst, size, size_burst = spec if spec is not None else (None, None, None, None)
    return (
        float(messages or 0),
        float(messages_burst if messages_burst is not None else messages or 0),
        float(size or 0),
        float(size_burst if size_burst is not None else size or 0),
    )
