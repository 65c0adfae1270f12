"""Prometheus families of the authentication backends that ask a service (``auth.http``: ``backend="http"``).

The backends count plain integers (:class:`broker.auth.platform.PlatformStats`); :class:`AuthCollector`
reads them at scrape time, so the hot path never touches prometheus_client. Must not keep counts of its
own: a scrape is a snapshot of the backends' integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker.auth.platform import KINDS, LATENCY_BUCKETS, RESULTS, PlatformClient


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
            cumulative, running = [], 0
            for bound, n in zip((*map(floatToGoString, LATENCY_BUCKETS), "+Inf"), stats.latency_counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            latency.add_metric([backend], cumulative, stats.latency_sum)
            hits.add_metric([backend], stats.cache_hits)
            misses.add_metric([backend], stats.cache_misses)
            coalesced.add_metric([backend], stats.coalesced)
            in_flight.add_metric([backend], stats.in_flight)
            entries.add_metric([backend], client.cache_size())
        yield from (requests, latency, hits, misses, coalesced, in_flight, entries)
