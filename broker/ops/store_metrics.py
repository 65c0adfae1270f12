"""Prometheus families of ``limits.store`` (the per-team connection cap counted in Redis over all replicas).

Read at scrape time from the store's plain integers (:class:`broker.cluster_store.StoreStats`): nothing on
the connect path touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.cluster_store import ClusterCounts


class StoreCollector(Collector):
    def __init__(self, store: ClusterCounts) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return []  # collect() is cheap: no need to describe ahead

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats
        takes = CounterMetricFamily(
            "mqtt_front_store_takes",
            "Team connections asked of limits.store, by result: ok (counted), refused (the team is at "
            "max_connections_per_team over all replicas), error and timeout (limits.store.on_error decides)",
            labels=["result"],
        )
        ok = stats.requests - stats.refused - stats.errors - stats.timeouts
        for result, value in (("ok", ok), ("refused", stats.refused), ("error", stats.errors),
                              ("timeout", stats.timeouts)):
            takes.add_metric([result], max(0, value))
        yield takes
        up = GaugeMetricFamily("mqtt_front_store_up", "1 while limits.store answers, 0 while it is known down")
        up.add_metric([], 1.0 if self.store.available else 0.0)
        yield up
