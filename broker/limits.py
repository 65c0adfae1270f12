"""The limits.* keys at run time: work budgets for new sessions, publish and connect rates.

The server holds one :class:`Limits`; a reload hands it the new LimitsConfig. Work budgets go into
the SessionSettings the sessions share (decode caps and the work budget reach running sessions at
once; alias and subscription caps are taken at a session's start); rates live in
:mod:`broker.session.ratelimit` buckets: a team's changed rate applies at once to the connections it
limits, a per-client rate (or one that was off) to connections made after the reload.
"""

from __future__ import annotations

import logging
import time

from broker.auth.backoff import source_of
from broker.config import LimitsConfig, RateConfig
from broker.logs import log_event
from broker.mqtt.limits import DecodeLimits
from broker.session import SessionSettings
from broker.session.ratelimit import ConnectRates, PublishLimiter, PublishRates, RateSpec, TeamBuckets
from broker.shared_counts import SharedRatePair, WorkerCounts

log = logging.getLogger("mqtt_front.limits")


def _spec(rate: RateConfig | None) -> RateSpec | None:
    if rate is None or (rate.messages is None and rate.bytes is None):
        return None
    return (rate.messages, rate.messages_burst, rate.bytes, rate.bytes_burst)


def apply_budgets(settings: SessionSettings, limits: LimitsConfig) -> None:
    """Put the work budgets of ``limits`` into ``settings`` (read by each new session)."""
    settings.max_packet_size = limits.max_packet_size
    settings.max_connect_size = limits.max_connect_size
    settings.decode_limits = DecodeLimits(
        user_properties=limits.max_user_properties,
        user_property_bytes=limits.max_user_property_bytes,
        filters=limits.max_filters_per_packet,
        topic_length=limits.max_topic_length,
        topic_levels=limits.max_topic_levels,
    )
    settings.max_alias_topic_length = limits.max_alias_topic_length
    settings.max_subscriptions = limits.max_subscriptions
    settings.work_budget = limits.work_budget


class Limits:
    """Publish and connect rates of this process; with ``shared`` (``--workers N``) the team and
    per-source buckets are the ones all workers share, so N workers allow each rate once."""

    def __init__(self, limits: LimitsConfig, shared: WorkerCounts | None = None) -> None:
        self.shared = shared
        team_buckets = None
        if shared is not None:

            def team_buckets(team: str, spec: RateSpec, _now: float) -> TeamBuckets:
                return SharedRatePair(shared, team, spec)

        self.publish = PublishRates(None, None, team_buckets)  # configure() sets what limits says, as a reload does
        self.disconnect_over_rate = False
        self.connect: ConnectRates | None = None
        self._logged = 0.0
        self._unlogged = 0
        self.configure(limits)

    def configure(self, limits: LimitsConfig) -> None:
        rates = limits.publish_rate
        self.publish.configure(_spec(rates.client), _spec(rates.team), time.monotonic())
        self.disconnect_over_rate = rates.action == "disconnect"
        connect = limits.connect_rate
        if connect is None:
            self.connect = None
        elif self.connect is None or (self.connect.rate, self.connect.burst) != (connect.per_source, connect.burst):
            self.connect = ConnectRates(connect.per_source, connect.burst)

    def publish_limiter(self, team: str | None) -> PublishLimiter | None:
        limiter = self.publish.limiter(team, time.monotonic())
        if limiter is not None:
            limiter.disconnect = self.disconnect_over_rate
        return limiter

    def connection_refused(self, peer: str) -> str | None:
        """limits.connect_rate: a reason string when ``peer``'s address opens connections too fast."""
        connect = self.connect
        if connect is None:
            return None
        source = source_of(peer)
        now = time.monotonic()
        if self._connect_allowed(connect, source, now):
            return None
        # A flood must not become a flood of log lines: one a second, with how many went unlogged.
        if now - self._logged >= 1.0:
            self._logged = now
            log_event(
                log,
                logging.INFO,
                "limit_exceeded",
                limit="connect_rate",
                peer=peer,
                refused_since_last=self._unlogged,
            )
            self._unlogged = 0
        else:
            self._unlogged += 1
        return f"connect_rate ({connect.rate:g}/s per source) exceeded"

    def _connect_allowed(self, connect: ConnectRates, source: str, now: float) -> bool:
        shared = self.shared
        if shared is None:
            return connect.allow(source, now)
        name = "\x00connect:" + source
        burst = connect.burst if connect.burst is not None else connect.rate
        rates = (connect.rate, burst, 0.0, 0.0)
        tokens = shared.buckets(name, 1, 0, now, rates)
        if tokens is None:  # no row left (16,384 sources refilling at once): this worker's own bucket decides
            return connect.allow(source, now)
        if tokens[0] < 0:
            shared.buckets(name, -1, 0, now, rates)  # a refused connection does not dig the debt deeper
            return False
        return True
