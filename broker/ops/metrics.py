"""Prometheus metrics of one front broker, in a registry of its own.

Per-packet numbers are never counted with prometheus_client here: each session counts
into the plain integers of its :class:`broker.session.stats.Stats`, and :class:`_TeamCollector`
sums them at scrape time, per team, over the live sessions plus the totals of the
closed ones (folded into per-team accumulators when a connection closes, so counters
never go backwards). Per-event numbers (connections accepted and closed, upstream
connect latency and failures) use ordinary prometheus_client metrics.

Label cardinality: ``team`` is the finest label. The first ``metrics.max_teams``
distinct teams (in the order they first authenticate) get their own label value;
later teams are counted as ``team="_other"``. Sessions without a team (anonymous and
plain users, clients that never authenticated) are ``team="_none"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker import __version__
from broker.mqtt.packets import PacketType
from broker.ops.auth_metrics import AuthCollector
from broker.session.stats import CONNECT_RESULTS, Stats

if TYPE_CHECKING:
    from broker.auth.platform import PlatformClient
    from broker.relay import ClientConnection
    from broker.upstream.connector import UpstreamConnector
    from broker.upstream.targets import UpstreamTarget

NO_TEAM = "_none"
OTHER_TEAM = "_other"

# Stats field -> denial action label.
_DENIALS = (
    ("denied_connect", "connect"),
    ("denied_publish", "publish"),
    ("denied_subscribe", "subscribe"),
    ("denied_deliver", "deliver"),
    ("denied_will", "will"),
)
_PACKET_NAMES = {int(t): t.name.lower() for t in PacketType}

# Upstream connect latency buckets (seconds): loopback is sub-millisecond, a TLS handshake
# across zones tens of milliseconds, a timeout seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TeamLabels:
    """Team -> label value, with at most ``max_teams`` distinct teams (first come, first served)."""

    def __init__(self, max_teams: int) -> None:
        self.max_teams = max_teams
        self._known: set[str] = set()

    def label(self, team: str | None) -> str:
        if team is None:
            return NO_TEAM
        known = self._known
        if team in known:
            return team
        if len(known) < self.max_teams:
            known.add(team)
            return team
        return OTHER_TEAM


class _Totals:
    """Accumulated Stats of closed sessions, per team label (and per result / packet type)."""

    def __init__(self) -> None:
        self.teams: dict[str, Stats] = {}
        self.connect_results: dict[str, int] = dict.fromkeys(CONNECT_RESULTS, 0)
        self.packets_in = [0] * 16
        self.packets_out = [0] * 16

    def team(self, label: str) -> Stats:
        stats = self.teams.get(label)
        if stats is None:
            stats = self.teams[label] = Stats()
        return stats

    def add(self, label: str, stats: Stats) -> None:
        acc = self.team(label)
        acc.msgs_in += stats.msgs_in
        acc.bytes_in += stats.bytes_in
        acc.msgs_out += stats.msgs_out
        acc.bytes_out += stats.bytes_out
        for name, _ in _DENIALS:
            setattr(acc, name, getattr(acc, name) + getattr(stats, name))
        if stats.connect_result:
            self.connect_results[stats.connect_result] = self.connect_results.get(stats.connect_result, 0) + 1
        for i, n in enumerate(stats.packets_in):
            self.packets_in[i] += n
        for i, n in enumerate(stats.packets_out):
            self.packets_out[i] += n

    def copy(self) -> _Totals:
        other = _Totals()
        for label, stats in self.teams.items():
            other.add(label, stats)
        other.connect_results = dict(self.connect_results)
        other.packets_in = list(self.packets_in)
        other.packets_out = list(self.packets_out)
        return other


class _TeamCollector(Collector):
    """Reads the sessions' plain integers at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed samples to describe; collect() is cheap enough to run at registration

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        labels = m.teams
        totals = m.closed.copy()
        totals.team(NO_TEAM)  # every family has at least its "_none" series, even on an idle process
        current: dict[tuple[str, str], int] = {}
        for conn in m.connections():
            session = conn.session
            if session is None:
                continue
            label = labels.label(session.team)
            totals.add(label, session.stats)
            key = (conn.listener, label)
            current[key] = current.get(key, 0) + 1

        messages = CounterMetricFamily(
            "mqtt_front_messages",
            "PUBLISH packets by direction (in: client to upstream, before the ACL check; "
            "out: upstream to client, delivered)",
            labels=["direction", "team"],
        )
        traffic = CounterMetricFamily(
            "mqtt_front_bytes",
            "Bytes of those PUBLISH packets by direction",
            labels=["direction", "team"],
        )
        denials = CounterMetricFamily(
            "mqtt_front_denials", "Requests refused by the access checks, by action", labels=["action", "team"]
        )
        for label, stats in sorted(totals.teams.items()):
            messages.add_metric(["in", label], stats.msgs_in)
            messages.add_metric(["out", label], stats.msgs_out)
            traffic.add_metric(["in", label], stats.bytes_in)
            traffic.add_metric(["out", label], stats.bytes_out)
            for name, action in _DENIALS:
                denials.add_metric([action, label], getattr(stats, name))
        yield messages
        yield traffic
        yield denials

        packets = CounterMetricFamily(
            "mqtt_front_packets",
            "MQTT packets parsed, by direction (in: from clients, out: from the upstream) and type",
            labels=["direction", "type"],
        )
        for direction, counts in (("in", totals.packets_in), ("out", totals.packets_out)):
            for ptype, n in enumerate(counts):
                if ptype in _PACKET_NAMES:
                    packets.add_metric([direction, _PACKET_NAMES[ptype]], n)
        yield packets

        attempts = CounterMetricFamily("mqtt_front_connect_attempts", "CONNECTs by result", labels=["result"])
        for result, n in totals.connect_results.items():
            attempts.add_metric([result], n)
        yield attempts

        connections = GaugeMetricFamily(
            "mqtt_front_connections", "Client connections open now", labels=["listener", "team"]
        )
        for listener in m.listeners:
            connections.add_metric([listener, NO_TEAM], current.pop((listener, NO_TEAM), 0))
        for (listener, label), n in sorted(current.items()):
            connections.add_metric([listener, label], n)
        yield connections

        upstream = GaugeMetricFamily(
            "mqtt_front_upstream_connections", "Connections to the upstream open now", labels=["upstream"]
        )
        if m.upstream is not None:
            for target in m.upstream.targets:
                upstream.add_metric([upstream_name(target)], target.open)
        yield upstream


class Metrics:
    """All metrics of one FrontBroker; ``registry`` is what /metrics exposes."""

    def __init__(self, max_teams: int = 1000, listeners: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.teams = TeamLabels(max_teams)
        self.closed = _Totals()
        self.listeners = list(listeners)
        self.upstream: UpstreamConnector | None = None
        self._connections: Iterable[ClientConnection] = ()
        self._auth: AuthCollector | None = None
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        build = Gauge("mqtt_front_build_info", "mqtt-front version", ["version"], registry=reg)
        build.labels(__version__).set(1)
        self.accepted = Counter(
            "mqtt_front_connections_accepted", "Client connections accepted, by listener", ["listener"], registry=reg
        )
        self.closed_connections = Counter(
            "mqtt_front_connections_closed",
            "Client connections closed, by listener and team (_none: never authenticated or no team)",
            ["listener", "team"],
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "mqtt_front_upstream_connect_seconds",
            "Time to open a connection to the upstream (TCP, and TLS when configured)",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_failures = Counter(
            "mqtt_front_upstream_connect_failures",
            "Failed attempts to connect to the upstream",
            ["upstream"],
            registry=reg,
        )
        self._accepted_by_listener: dict[str, Counter] = {}
        self._latency_by_target: dict[UpstreamTarget, Histogram] = {}  # targets compare by identity
        for listener in self.listeners:
            self.accepted.labels(listener)
            self.closed_connections.labels(listener, NO_TEAM)
        reg.register(_TeamCollector(self))

    def watch(self, connections: Iterable[ClientConnection], upstream: UpstreamConnector) -> None:
        """Read these live connections and this upstream at scrape time; observe its connect attempts."""
        self._connections = connections
        self.upstream = upstream
        for target in upstream.targets:
            name = upstream_name(target)
            self.upstream_latency.labels(name)
            self.upstream_failures.labels(name)
        upstream.on_connect = self.upstream_connected
        upstream.on_failure = self.upstream_failed

    def watch_platform(self, client: PlatformClient, backend: str = "http") -> None:
        """Read this auth.http client's counters at scrape time (``mqtt_front_auth_*{backend}``)."""
        if self._auth is None:
            self._auth = AuthCollector()
            self.registry.register(self._auth)
        self._auth.add(backend, client)

    def connections(self) -> list[ClientConnection]:
        return list(self._connections)

    # -- per-event hooks (once per connection, never per packet) ---------------------------

    def connection_opened(self, listener: str) -> None:
        # One child per listener, looked up once: labels() validates and locks on every call (a login storm
        # pays it per connection).
        child = self._accepted_by_listener.get(listener)
        if child is None:
            child = self._accepted_by_listener[listener] = self.accepted.labels(listener)
        child.inc()

    def connection_closed(self, listener: str, team: str | None, stats: Stats) -> None:
        label = self.teams.label(team)
        self.closed.add(label, stats)
        self.closed_connections.labels(listener, label).inc()

    def upstream_connected(self, target: UpstreamTarget, seconds: float) -> None:
        child = self._latency_by_target.get(target)
        if child is None:
            child = self._latency_by_target[target] = self.upstream_latency.labels(upstream_name(target))
        child.observe(seconds)

    def upstream_failed(self, target: UpstreamTarget, reason: str) -> None:
        self.upstream_failures.labels(upstream_name(target)).inc()


def upstream_name(target: UpstreamTarget) -> str:
    """The upstream label: host:port (never the URL, which may carry credentials)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}"
