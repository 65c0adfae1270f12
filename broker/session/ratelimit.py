"""Token buckets for publish and connect rates. No I/O, no clock of its own: callers pass ``now``.

The session is told how many more messages and bytes may pass (``PublishLimiter.allowance``, at most a
tenth of a second's worth at a time) and compares its running counters with that on each PUBLISH; only
when they pass it does the relay charge the buckets (one clock read per checkpoint, not per packet). A
bucket in debt answers how long the client must wait; the session holds its bytes and the relay stops
reading it meanwhile, so TCP pushes back on the client and nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

NO_LIMIT = 1 << 40  # an allowance no connection uses up between two checks


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; taking more than there are is debt."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float | None, now: float) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.tokens = self.burst
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount``; the seconds until the bucket is out of debt again (0.0: it is not in debt)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        tokens -= amount
        self.tokens = tokens
        self.stamp = now
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def available(self, now: float) -> float:
        tokens = self.tokens + (now - self.stamp) * self.rate
        return self.burst if tokens > self.burst else tokens

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class RatePair:
    """A messages bucket and a bytes bucket (either may be absent): one client's, or one team's."""

    __slots__ = ("bytes", "messages")

    def __init__(
        self,
        messages: float | None,
        messages_burst: float | None,
        bytes_per_s: float | None,
        bytes_burst: float | None,
        now: float,
    ) -> None:
        self.messages = TokenBucket(messages, messages_burst, now) if messages else None
        self.bytes = TokenBucket(bytes_per_s, bytes_burst, now) if bytes_per_s else None

    def retune(self, spec: RateSpec | None, now: float) -> None:
        """New rates in place (a reload), so every connection holding this pair sees them."""
        messages, messages_burst, bytes_per_s, bytes_burst = spec if spec is not None else (None, None, None, None)
        self.messages = _retuned(self.messages, messages, messages_burst, now)
        self.bytes = _retuned(self.bytes, bytes_per_s, bytes_burst, now)

    def allowance(self, now: float, share: float = 1.0) -> tuple[float, float]:
        """What may go before the next check: the tokens there are (times ``share``), a tenth of a second's
        rate at most, so that a checkpoint comes often enough to keep a burst within its bucket."""
        messages = size = float(NO_LIMIT)
        if self.messages is not None:
            bucket = self.messages
            messages = min(bucket.available(now) * share, bucket.rate / 10)
        if self.bytes is not None:
            bucket = self.bytes
            size = min(bucket.available(now) * share, bucket.rate / 10)
        return messages, size

    def take(self, messages: int, size: int, now: float) -> float:
        wait = 0.0
        if self.messages is not None:
            wait = self.messages.take(messages, now)
        if self.bytes is not None:
            wait = max(wait, self.bytes.take(size, now))
        return wait


def _retuned(bucket: TokenBucket | None, rate: float | None, burst: float | None, now: float) -> TokenBucket | None:
    if not rate:
        return None
    if bucket is None:
        return TokenBucket(rate, burst, now)
    bucket.take(0, now)  # settle what the old rate refilled
    bucket.rate = rate
    bucket.burst = burst if burst is not None else rate
    bucket.tokens = min(bucket.tokens, bucket.burst)
    return bucket


class TeamBuckets(Protocol):
    """A team's buckets: a :class:`RatePair` in one process, or one shared by the workers
    (``broker.shared_counts.SharedRatePair``)."""

    def retune(self, spec: RateSpec | None, now: float) -> None: ...

    def allowance(self, now: float, share: float = 1.0) -> tuple[float, float]: ...

    def take(self, messages: int, size: int, now: float) -> float: ...


class PublishLimiter:
    """One connection's publish limits: its own buckets and its team's (shared with the team's other
    connections). ``charge`` takes the session's running totals and charges what moved since last time."""

    __slots__ = ("bytes_seen", "client", "disconnect", "messages_seen", "team")

    def __init__(self, client: RatePair | None, team: TeamBuckets | None, disconnect: bool = False) -> None:
        self.client = client
        self.team = team
        self.disconnect = disconnect  # over the rate: DISCONNECT 0x96 instead of a pause (publish_rate.action)
        self.messages_seen = 0
        self.bytes_seen = 0

    def allowance(self, now: float) -> tuple[int, int]:
        """Messages and bytes this connection may send before the next RateCheck."""
        messages = size = float(NO_LIMIT)
        if self.client is not None:
            messages, size = self.client.allowance(now)
        if self.team is not None:
            # Several connections draw on the team's tokens between their checks: each takes a quarter.
            team_messages, team_size = self.team.allowance(now, 0.25)
            messages, size = min(messages, team_messages), min(size, team_size)
        return int(messages), int(size)

    def charge(self, messages_total: int, bytes_total: int, now: float) -> float:
        """Seconds to stop reading the client (0.0: read on)."""
        messages = messages_total - self.messages_seen
        size = bytes_total - self.bytes_seen
        self.messages_seen = messages_total
        self.bytes_seen = bytes_total
        wait = 0.0
        if self.client is not None:
            wait = self.client.take(messages, size, now)
        if self.team is not None:
            wait = max(wait, self.team.take(messages, size, now))
        return wait


class ConnectRates:
    """New connections per source address: one bucket each, bounded in number (full buckets are forgotten)."""

    MAX_SOURCES = 100_000

    def __init__(self, rate: float, burst: float | None) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, source: str, now: float) -> bool:
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self.MAX_SOURCES:
                self._buckets = buckets = {k: b for k, b in buckets.items() if not b.full(now)}
                if len(buckets) >= self.MAX_SOURCES:  # all busy: a flood from everywhere; forget the oldest half
                    self._buckets = buckets = dict(list(buckets.items())[len(buckets) // 2 :])
            bucket = buckets[source] = TokenBucket(self.rate, self.burst, now)
        if bucket.take(1, now) > 0:
            bucket.tokens += 1  # a refused connection does not dig the debt deeper
            return False
        return True


RateSpec = tuple[float | None, float | None, float | None, float | None]
"""(messages per second, messages burst, bytes per second, bytes burst) of one RatePair."""


class PublishRates:
    """The process's publish limits: a RatePair per new connection, and one per team shared by its connections."""

    MAX_TEAMS = 100_000

    def __init__(
        self,
        client: RateSpec | None,
        team: RateSpec | None,
        team_buckets: Callable[[str, RateSpec, float], TeamBuckets] | None = None,
    ) -> None:
        self.client = client
        self.team = team
        # How a team's buckets are made: a RatePair of this process, or buckets the workers share.
        self._team_buckets: Callable[[str, RateSpec, float], TeamBuckets] = team_buckets or (
            lambda _team, spec, now: RatePair(*spec, now)
        )
        self._teams: dict[str, TeamBuckets] = {}

    def configure(self, client: RateSpec | None, team: RateSpec | None, now: float) -> None:
        """New limits (a reload): new connections get the new client limit, teams the new team limit at once."""
        if team != self.team:
            for pair in self._teams.values():
                pair.retune(team, now)
        self.client = client
        self.team = team

    def limiter(self, team: str | None, now: float) -> PublishLimiter | None:
        """The limiter of a connection just admitted for ``team`` (None: no limit applies)."""
        client = RatePair(*self.client, now) if self.client is not None else None
        pair = None
        if self.team is not None and team is not None:
            teams = self._teams
            pair = teams.get(team)
            if pair is None:
                if len(teams) >= self.MAX_TEAMS:
                    self._teams = teams = {}  # a bound, not a policy: the buckets start full again
                pair = teams[team] = self._team_buckets(team, self.team, now)
        if client is None and pair is None:
            return None
        return PublishLimiter(client, pair)
