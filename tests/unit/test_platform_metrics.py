"""The auth.http families of /metrics, read from a PlatformClient's plain integers at scrape time."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.auth.platform import PlatformClient
from broker.config import HttpAuthConfig
from broker.ops.metrics import Metrics


def _families(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(metrics.registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
        if f.name.startswith("mqtt_front_auth") and f.name != "mqtt_front_auth_duration_seconds"  # every backend's
    }


def test_no_auth_families_without_a_platform() -> None:
    assert _families(Metrics()) == {}


def test_collector_reads_the_counters_at_scrape_time() -> None:
    client = PlatformClient(HttpAuthConfig(auth_url="http://forge/a", acl_url="http://forge/b"))
    metrics = Metrics()
    metrics.watch_platform(client)
    metrics.watch_platform(client)  # watching twice does not duplicate the series
    families = _families(metrics)
    assert len(families["mqtt_front_auth_requests"]) == 8
    assert all(value == 0 for _, value in families["mqtt_front_auth_requests"])

    stats = client.stats
    stats.requests[("acl", "timeout")] += 3
    stats.cache_hits, stats.cache_misses, stats.coalesced, stats.in_flight = 7, 5, 2, 1
    stats.observe(0.002)
    stats.observe(0.3)
    families = _families(metrics)
    requests = {(labels["kind"], labels["result"]): v for labels, v in families["mqtt_front_auth_requests"]}
    assert requests[("acl", "timeout")] == 3 and requests[("auth", "allow")] == 0
    assert all(labels["backend"] == "http" for labels, _ in families["mqtt_front_auth_requests"])
    assert families["mqtt_front_auth_cache_hits"] == [({"backend": "http"}, 7)]
    assert families["mqtt_front_auth_cache_misses"] == [({"backend": "http"}, 5)]
    assert families["mqtt_front_auth_coalesced_waits"] == [({"backend": "http"}, 2)]
    assert families["mqtt_front_auth_in_flight"] == [({"backend": "http"}, 1)]
    assert families["mqtt_front_auth_cache_entries"] == [({"backend": "http"}, 0)]
    latency = {labels.get("le", "sum/count"): v for labels, v in families["mqtt_front_auth_request_seconds"]}
    assert latency["0.001"] == 0 and latency["0.0025"] == 1 and latency["0.25"] == 1 and latency["0.5"] == 2
    assert latency["+Inf"] == 2
