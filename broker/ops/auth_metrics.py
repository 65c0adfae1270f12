"""Prometheus families of the authentication backends.

- :class:`AuthCollector`: the backends that ask a service (``auth.http``: ``backend="http"``). They count
  plain integers (:class:`broker.auth.platform.PlatformStats`), read at scrape time, so the hot path never
  touches prometheus_client. It must not keep counts of its own: a scrape is a snapshot of those integers.
- :class:`AuthLatency`: how long admission took to decide a CONNECT's credentials, per backend
  (``mqtt_front_auth_duration_seconds``): plain integers too, counted once per CONNECT by
  :mod:`broker.admission` and read by :class:`AuthLatencyCollector`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker.auth.platform import KINDS, LATENCY_BUCKETS, RESULTS, PlatformClient

# The backends that decide credentials (the ``backend`` label of mqtt_front_auth_duration_seconds).
AUTH_BACKENDS = ("users_file", "http", "jwt", "anonymous")
# bcrypt at FlowFuse's cost 10 takes tens of milliseconds, a JWT check tens of microseconds.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Buckets:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: above every bound
        self.total = 0.0


class AuthLatency:
    """Time to decide a CONNECT's credentials, per backend: bucket counts and a sum (plain numbers)."""

    def __init__(self) -> None:
        self.backends: dict[str, _Buckets] = {}

    def add(self, backend: str) -> _Buckets:
        """The backend's buckets; a new backend starts with empty ones (its series exist from now on)."""
        buckets = self.backends.get(backend)
        if buckets is None:
            buckets = self.backends[backend] = _Buckets()
        return buckets

    def observe(self, backend: str, seconds: float) -> None:
        buckets = self.backends.get(backend) or self.add(backend)
        buckets.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        buckets.total += seconds


class AuthLatencyCollector(Collector):
    """``mqtt_front_auth_duration_seconds{backend}`` from an :class:`AuthLatency`, at scrape time."""

    def __init__(self, latency: AuthLatency) -> None:
        self.latency = latency

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "mqtt_front_auth_duration_seconds",
            "Time to decide a CONNECT's credentials, by the backend that decided (users_file: bcrypt; http: "
            "the platform; jwt; anonymous), waiting for a bcrypt thread or a platform slot included",
            labels=["backend"],
        )
        for backend, buckets in sorted(self.latency.backends.items()):
            family.add_metric([backend], _cumulative(DURATION_BUCKETS, buckets.counts), buckets.total)
        yield family


def _cumulative(bounds: Iterable[float], counts: Iterable[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last above every bound) as Prometheus' cumulative ``le`` buckets."""
    cumulative, running = [], 0
    for bound, n in zip((*map(floatToGoString, bounds), "+Inf"), counts, strict=True):
        running += n
        cumulative.append((bound, float(running)))
    return cumulative


class AuthCollector(Collector):
    """Reads each watched backend's counters at scrape time; ``add`` names a backend (its label)."""

    def __init__(self) -> None:
        self._backends: list[tuple[str, PlatformClient]] = []

    def add(self, backend: str, client: PlatformClient) -> None:
        self._backends = [(name, c) for name, c in self._backends if name != backend] + [(backend, client)]

    def describe(self) -> Iterable[Metric]:
        return []  # families appear with the first watched backend; collect() is cheap

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "mqtt_front_auth_requests",
            "Requests to an authentication/authorization service, by kind (auth: a CONNECT, acl: a topic check) "
            "and result (error and timeout refuse, and are not cached)",
            labels=["backend", "kind", "result"],
        )
        latency = HistogramMetricFamily(
            "mqtt_front_auth_request_seconds", "Time from sending a request to its answer", labels=["backend"]
        )
        hits = CounterMetricFamily(
            "mqtt_front_auth_cache_hits", "ACL checks answered from the decision cache", labels=["backend"]
        )
        misses = CounterMetricFamily(
            "mqtt_front_auth_cache_misses",
            "ACL checks the cache could not answer (each asks, or waits for a request in flight)",
            labels=["backend"],
        )
        coalesced = CounterMetricFamily(
            "mqtt_front_auth_coalesced_waits",
            "Cache misses that waited for a request already in flight for the same check",
            labels=["backend"],
        )
        in_flight = GaugeMetricFamily("mqtt_front_auth_in_flight", "Requests in flight now", labels=["backend"])
        entries = GaugeMetricFamily("mqtt_front_auth_cache_entries", "Decisions in the cache now", labels=["backend"])
        for backend, client in self._backends:
            stats = client.stats
            for kind in KINDS:
                for result in RESULTS:
                    requests.add_metric([backend, kind, result], stats.requests.get((kind, result), 0))
            latency.add_metric([backend], _cumulative(LATENCY_BUCKETS, stats.latency_counts), stats.latency_sum)
            hits.add_metric([backend], stats.cache_hits)
            misses.add_metric([backend], stats.cache_misses)
            coalesced.add_metric([backend], stats.coalesced)
            in_flight.add_metric([backend], stats.in_flight)
            entries.add_metric([backend], client.cache_size())
        yield from (requests, latency, hits, misses, coalesced, in_flight, entries)
