"""Counts that the worker processes of one mqtt-front (``--workers N``) share: the connection caps,
queued password checks and the team and per-source rate buckets, so that N workers allow each cap once,
not N times.

:class:`SharedCounts` is made by the parent before it forks: an anonymous shared mapping (every
worker sees the same memory) and a lock file. Each worker uses its :class:`WorkerCounts`
(``attach(index)``); a single process uses :class:`LocalCounts`, the same interface over a dict.

Why it is crash safe:

- Each worker writes only its own column of counts and a key's total is the sum of the columns,
  so the parent frees a dead worker's share by zeroing its column before starting its replacement
  (a SIGKILLed worker leaves nothing counted). The parent then rebuilds both tables from their live
  rows, which also undoes a row move the dead worker may have left half done.
- Every update takes a POSIX record lock (``fcntl.lockf``) on the parent's lock file. The kernel
  drops the lock of a process that dies, so a worker killed mid-update cannot wedge the others.

A lock round trip is a few µs (bench/limits_cost.py). It is paid on the connect path and at rate
checkpoints, never per relayed packet.

Keys are 64-bit hashes (blake2b) of strings in open-addressing tables (linear probing, rows moved back
on delete), filled to three quarters at most, so a probe is short and always ends. The process-wide
counts (all connections, queued checks) have fixed rows of their own. When the team table is at its
bound, a new team is let in uncounted if it has no cap and refused if it has one; when the bucket table
is, the buckets that refilled are dropped (at most once a second) and, failing that, the caller uses a
bucket of its own process.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from broker.session.ratelimit import NO_LIMIT, RatePair, RateSpec

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
    """Linear probing over ``keys`` (a shared array), at most three quarters full; ``used`` is a shared
    one-cell counter of the rows in use. A row is a key plus what ``move``/``clear`` copy."""

    def __init__(
        self, keys: memoryview, used: memoryview, move: Callable[[int, int], None], clear: Callable[[int], None]
    ) -> None:
        self.keys = keys
        self.used = used
        self.mask = len(keys) - 1
        self.limit = len(keys) * 3 // 4
        self.move = move
        self.clear = clear

    def find(self, key: int, insert: bool) -> int:
        """The slot of ``key``; with ``insert``, an empty one made its own (-1: absent, or the table is at its
        bound). A table never full has an empty slot, so the probe ends."""
        keys, mask = self.keys, self.mask
        slot = key & mask
        while True:
            found = keys[slot]
            if found == key:
                return slot
            if found == 0:
                if not insert or self.used[0] >= self.limit:
                    return -1
                keys[slot] = key
                self.used[0] += 1
                return slot
            slot = (slot + 1) & mask

    def delete(self, slot: int) -> None:
        """Empty ``slot``, moving later rows of its probe chain back (Knuth's algorithm R)."""
        keys, mask = self.keys, self.mask
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            key = keys[probe]
            if key == 0:  # an empty slot ends the chain (there always is one)
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
        self.used[0] -= 1

    def rows(self) -> list[int]:
        return [slot for slot in range(len(self.keys)) if self.keys[slot]]


_ROW = 5  # doubles per bucket row: messages (tokens, stamp), bytes (tokens, stamp), when it is full again
_SWEEP_EVERY = 1.0  # seconds between two sweeps of refilled buckets (a sweep walks the whole table)


class SharedCounts:
    """The shared memory of ``workers`` processes: made before fork, then ``attach(index)`` in each."""

    def __init__(self, workers: int, slots: int = 1 << 15, buckets: int = 1 << 14) -> None:
        if slots & (slots - 1) or buckets & (buckets - 1) or slots < 4 or buckets < 4:
            raise ValueError("slots and buckets must be powers of two, at least 4")
        self.workers = workers
        self.slots = slots
        self.buckets = buckets
        rows = slots + len(_FIXED)  # the fixed rows come after the hash table's
        size = 16 + slots * 8 + workers * rows * 4 + buckets * 8 + buckets * _ROW * 8 + 8
        self._memory = mmap.mmap(-1, size)  # anonymous, MAP_SHARED: the forked workers see the same pages
        view = memoryview(self._memory)
        self.used = view[0:16].cast("q")  # [0]: rows of the counts table, [1]: rows of the bucket table
        offset = 16
        self.keys = view[offset : offset + slots * 8].cast("Q")
        offset += slots * 8
        self.columns: list[memoryview] = []
        for _ in range(workers):
            self.columns.append(view[offset : offset + rows * 4].cast("i"))
            offset += rows * 4
        self.bucket_keys = view[offset : offset + buckets * 8].cast("Q")
        offset += buckets * 8
        self.bucket_state = view[offset : offset + buckets * _ROW * 8].cast("d")
        offset += buckets * _ROW * 8
        self.last_sweep = view[offset : offset + 8].cast("d")
        self._lock_file = tempfile.TemporaryFile(prefix="mqtt-front-counts-")  # noqa: SIM115 (lives as long as the process)
        self._thread_lock = threading.Lock()  # lockf excludes processes, not threads of one
        self.counts = _Table(self.keys, self.used[0:1], self._move_row, self._clear_row)
        self.bucket_table = _Table(self.bucket_keys, self.used[1:2], self._move_bucket, self._clear_bucket)

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
        state[target * _ROW : target * _ROW + _ROW] = state[source * _ROW : source * _ROW + _ROW]

    def _clear_bucket(self, slot: int) -> None:
        self.bucket_state[slot * _ROW : slot * _ROW + _ROW] = memoryview(bytes(_ROW * 8)).cast("d")

    def row_total(self, slot: int) -> int:
        return sum(column[slot] for column in self.columns)

    # -------------------------------------------------------------- the parent

    def attach(self, worker: int) -> WorkerCounts:
        """What worker ``worker`` (0 .. workers-1) counts with, in its own process after the fork."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} of {self.workers}")
        return WorkerCounts(self, worker)

    def free_worker(self, worker: int) -> int:
        """Forget what a dead worker counted (before its replacement starts); how many it held. Both tables
        are rebuilt from their live rows: the dead worker may have been killed in the middle of a row move."""
        with self:
            column = self.columns[worker]
            held = sum(column[slot] for slot in range(len(column)))
            column[: len(column)] = memoryview(bytes(len(column) * 4)).cast("i")
            self._rebuild_counts()
            self._rebuild_buckets()
        return held

    def _rebuild_counts(self) -> None:
        live: dict[int, list[int]] = {}  # a key moved twice by a dead worker: its columns summed
        for slot in self.counts.rows():
            values = [column[slot] for column in self.columns]
            if any(values):
                merged = live.setdefault(self.keys[slot], [0] * len(values))
                live[self.keys[slot]] = [a + b for a, b in zip(merged, values, strict=True)]
        self.keys[: self.slots] = memoryview(bytes(self.slots * 8)).cast("Q")
        for column in self.columns:
            column[: self.slots] = memoryview(bytes(self.slots * 4)).cast("i")
        self.used[0] = 0
        for key, values in live.items():
            slot = self.counts.find(key, insert=True)
            for column, value in zip(self.columns, values, strict=True):
                column[slot] = value

    def _rebuild_buckets(self) -> None:
        state = self.bucket_state
        live: dict[int, list[float]] = {}  # a duplicate row (a move left half done): the first one kept
        for slot in self.bucket_table.rows():
            live.setdefault(self.bucket_keys[slot], list(state[slot * _ROW : slot * _ROW + _ROW]))
        self.bucket_keys[: self.buckets] = memoryview(bytes(self.buckets * 8)).cast("Q")
        state[: self.buckets * _ROW] = memoryview(bytes(self.buckets * _ROW * 8)).cast("d")
        self.used[1] = 0
        for key, row in live.items():
            slot = self.bucket_table.find(key, insert=True)
            for i, value in enumerate(row):
                state[slot * _ROW + i] = value


_FIXED = {CONNECTIONS: 0, AUTH_PENDING: 1}  # rows after the table's: the process-wide counts never miss a row


class WorkerCounts:
    """One worker's view of :class:`SharedCounts` (the same interface as :class:`LocalCounts`)."""

    def __init__(self, shared: SharedCounts, worker: int) -> None:
        self.shared = shared
        self.column = shared.columns[worker]

    def _slot(self, name: str, insert: bool) -> int:
        fixed = _FIXED.get(name)
        if fixed is not None:
            return self.shared.slots + fixed
        return self.shared.counts.find(_key(name), insert)

    def _settle(self, slot: int, total: int) -> None:
        if not total and slot < self.shared.slots:
            self.shared.counts.delete(slot)

    def add(self, name: str, delta: int) -> int:
        shared = self.shared
        with shared:
            slot = self._slot(name, insert=delta > 0)
            if slot < 0:
                return 0  # a team with no row: not counted (see take)
            self.column[slot] = max(0, self.column[slot] + delta)
            total = shared.row_total(slot)
            self._settle(slot, total)
            return total

    def take(self, name: str, cap: int | None) -> bool:
        """As :meth:`LocalCounts.take`. The team table at its bound: a team without a cap is let in
        uncounted (its release finds no row), one with a cap is refused (fail closed)."""
        shared = self.shared
        with shared:
            slot = self._slot(name, insert=True)
            if slot < 0:
                return cap is None
            total = shared.row_total(slot)
            if cap is not None and total >= cap:
                self._settle(slot, total)
                return False
            self.column[slot] += 1
            return True

    def release(self, name: str) -> None:
        shared = self.shared
        with shared:
            slot = self._slot(name, insert=False)
            if slot >= 0 and self.column[slot] > 0:  # never another worker's count, never below zero
                self.column[slot] -= 1
                self._settle(slot, shared.row_total(slot))

    def total(self, name: str) -> int:
        shared = self.shared
        with shared:
            slot = self._slot(name, insert=False)
            return shared.row_total(slot) if slot >= 0 else 0

    # -------------------------------------------------------------- token buckets

    def buckets(self, name: str, messages: float, size: float, now: float, rates: Rates) -> tuple[float, float] | None:
        """Take ``messages`` and ``size`` from ``name``'s two buckets (0, 0 only reads): their tokens after
        (negative: debt; a bucket whose rate is 0 is absent and answers +inf). None: the table is at its
        bound even after dropping the refilled buckets (the caller uses a bucket of its own)."""
        shared = self.shared
        with shared:
            table = shared.bucket_table
            key = _key(name)
            slot = table.find(key, insert=True)
            if slot < 0 and now - shared.last_sweep[0] >= _SWEEP_EVERY:
                self._forget_full_buckets(now)
                slot = table.find(key, insert=True)
            if slot < 0:
                return None
            state = shared.bucket_state
            base = slot * _ROW
            if state[base + 4] == 0.0:  # a new row: both halves not started (full)
                state[base + 1] = state[base + 3] = -1.0
            out = [INF, INF]
            full_at = now
            for half, amount in ((0, messages), (1, size)):
                rate, burst = rates[half * 2], rates[half * 2 + 1]
                if not rate:
                    continue
                at = base + half * 2
                stamp = state[at + 1]
                tokens = burst if stamp < 0 else min(burst, state[at] + max(0.0, now - stamp) * rate)
                tokens -= amount
                state[at] = tokens
                state[at + 1] = max(stamp, now)
                out[half] = tokens
                full_at = max(full_at, now + (burst - tokens) / rate)
            state[base + 4] = full_at  # after it the row is the same as none (see _forget_full_buckets)
            return out[0], out[1]

    def _forget_full_buckets(self, now: float) -> None:
        """Drop the rows whose buckets have refilled (the caller holds the lock); at most once a second."""
        shared = self.shared
        shared.last_sweep[0] = now
        state, keys = shared.bucket_state, shared.bucket_keys
        slot = 0
        while slot < shared.buckets:
            if keys[slot] and state[slot * _ROW + 4] <= now:
                shared.bucket_table.delete(slot)  # a row moved into this slot is looked at again
                continue
            slot += 1


INF = float("inf")
Rates = tuple[float, float, float, float]
"""(messages per second, messages burst, bytes per second, bytes burst); a rate of 0: no such bucket."""


class SharedRatePair:
    """A team's publish buckets kept in the workers' shared memory: what
    :class:`broker.session.ratelimit.RatePair` does for one process, for all workers at once. Without a
    row (the table at its bound) the team falls back to a RatePair of this worker."""

    __slots__ = ("_own", "counts", "name", "rates", "spec")

    def __init__(self, counts: WorkerCounts, team: str, spec: RateSpec) -> None:
        self.counts = counts
        self.name = "\x00rate:" + team
        self.spec: RateSpec | None = spec
        self.rates = _rates(spec)
        self._own: RatePair | None = None

    def _fallback(self, now: float) -> RatePair:
        if self._own is None:
            self._own = RatePair(*(self.spec or (None, None, None, None)), now)
        return self._own

    def retune(self, spec: RateSpec | None, now: float) -> None:
        self.spec, self.rates = spec, _rates(spec)
        if self._own is not None:
            self._own.retune(spec, now)

    def allowance(self, now: float, share: float = 1.0) -> tuple[float, float]:
        rates = self.rates
        tokens = self.counts.buckets(self.name, 0, 0, now, rates)
        if tokens is None:
            return self._fallback(now).allowance(now, share)
        messages = size = float(NO_LIMIT)
        if rates[0]:
            messages = min(max(0.0, tokens[0]) * share, rates[0] / 10)
        if rates[2]:
            size = min(max(0.0, tokens[1]) * share, rates[2] / 10)
        return messages, size

    def take(self, messages: int, size: int, now: float) -> float:
        rates = self.rates
        tokens = self.counts.buckets(self.name, messages, size, now, rates)
        if tokens is None:
            return self._fallback(now).take(messages, size, now)
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
