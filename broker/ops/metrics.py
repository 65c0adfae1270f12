"""Prometheus metrics of one front broker, in a registry of its own.

Per-packet numbers are never counted with prometheus_client here: each session counts
into the plain integers of its :class:`broker.session.stats.Stats`, and :class:`_TeamCollector`
sums them at scrape time, per team, over the live sessions plus the totals of the
closed ones (folded into per-team accumulators when a connection closes, so counters
never go backwards). Per-event numbers (connections accepted and closed, upstream
connect latency and failures, reloads) use ordinary prometheus_client metrics; the
edge's refused handshakes, the certificates' expiry and the auth latency are read from
the parts' plain numbers at scrape time too. No ``_created`` series: nothing here needs
them, and they double the series count.

Label cardinality: ``team`` is the finest label. The first ``metrics.max_teams``
distinct teams (in the order they first authenticate) get their own label value;
later teams are counted as ``team="_other"``. Sessions without a team (anonymous and
plain users, clients that never authenticated) are ``team="_none"``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker import __version__
from broker.cluster_store import ClusterCounts
from broker.config import Config, UpstreamConfig
from broker.edge.proxy_transport import PROXY_REFUSALS
from broker.edge.tls import TLS_FAILURES, TlsContexts
from broker.edge.websocket import WS_REFUSALS
from broker.mqtt.packets import PacketType
from broker.ops.auth_metrics import AuthCollector, AuthLatency, AuthLatencyCollector
from broker.ops.store_metrics import StoreCollector
from broker.session.stats import CONNECT_RESULTS, LIMIT_NAMES, Stats

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
# Who may send which packet (MQTT 5.0 section 2.1.2; 3.1.1 the same without AUTH): only these type/direction
# pairs are exported. Any other type is a protocol error that ends the connection (it is counted as that).
_T = PacketType
_BOTH = (_T.PUBLISH, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP, _T.DISCONNECT, _T.AUTH)
_PACKET_TYPES = {
    "in": sorted((_T.CONNECT, _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.PINGREQ, *_BOTH)),  # from clients
    "out": sorted((_T.CONNACK, _T.SUBACK, _T.UNSUBACK, _T.PINGRESP, *_BOTH)),  # from the upstream
}

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
        self.limit_hits: dict[str, int] = dict.fromkeys(LIMIT_NAMES, 0)

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
        if stats.limit_hits:
            hits = self.limit_hits
            for name, n in stats.limit_hits.items():
                hits[name] = hits.get(name, 0) + n

    def copy(self) -> _Totals:
        other = _Totals()
        for label, stats in self.teams.items():
            other.add(label, stats)
        other.connect_results = dict(self.connect_results)
        other.packets_in = list(self.packets_in)
        other.packets_out = list(self.packets_out)
        other.limit_hits = dict(self.limit_hits)
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
            for ptype in _PACKET_TYPES[direction]:
                packets.add_metric([direction, _PACKET_NAMES[ptype]], counts[ptype])
        yield packets

        hits = CounterMetricFamily(
            "mqtt_front_limit_hits",
            "Times a limit bit, by limit (README: Limits and failure behaviour)",
            labels=["limit"],
        )
        for name, n in totals.limit_hits.items():
            hits.add_metric([name], n)
        yield hits

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


class _EdgeCollector(Collector):
    """Refused handshakes and certificate expiry, from the listeners' TLS state at scrape time."""

    def __init__(self, metrics: Metrics, tls: TlsContexts, reasons: dict[str, tuple[str, ...]]) -> None:
        self._metrics = metrics
        self._tls = tls
        self._reasons = reasons  # listener -> the refusal reasons it can have (their series start at 0)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "mqtt_front_handshake_failures",
            "Connections refused before MQTT, by listener and reason (tls_*: the TLS handshake; ws_*: the "
            "WebSocket upgrade; proxy_*: the PROXY protocol header)",
            labels=["listener", "reason"],
        )
        counts = dict.fromkeys(((name, r) for name, reasons in self._reasons.items() for r in reasons), 0)
        counts.update(self._tls.failures.counts)
        for (listener, reason), n in sorted(counts.items()):
            failures.add_metric([listener, reason], n)
        yield failures

        expiry = GaugeMetricFamily(
            "mqtt_front_certificate_expiry_seconds",
            "Seconds until the certificate in use expires (the earliest notAfter of its chain; negative once "
            "expired): a listener's, or the client certificate presented to an upstream",
        )
        now = time.time()
        for name, item in sorted(self._tls.listeners.items()):
            not_after = certificate_not_after(item.cert_pem)
            if not_after is not None:
                expiry.add_sample(expiry.name, {"listener": name}, not_after - now)
        upstream, not_after = self._metrics.upstream, self._metrics.upstream_cert_not_after
        if upstream is not None and not_after is not None:
            for target in upstream.targets:
                expiry.add_sample(expiry.name, {"upstream": upstream_name(target)}, not_after - now)
        yield expiry


@functools.lru_cache(maxsize=64)
def certificate_not_after(pem: bytes) -> float | None:
    """The earliest notAfter (a Unix time) of the certificates in a PEM chain; None without one."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return None
    return min(cert.not_valid_after_utc for cert in chain).timestamp() if chain else None


class Metrics:
    """All metrics of one FrontBroker; ``registry`` is what /metrics exposes."""

    def __init__(self, max_teams: int = 1000, listeners: Iterable[str] = ()) -> None:
        # Process-wide, read at scrape time: this process exports no _created series.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.teams = TeamLabels(max_teams)
        self.closed = _Totals()
        self.listeners = list(listeners)
        self.upstream: UpstreamConnector | None = None
        self.upstream_cert_not_after: float | None = None  # the upstream client certificate's, when it has one
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
        self.reload_success = Gauge(
            "mqtt_front_config_reload_success",
            "1 if the last configuration reload loaded everything (or none happened since the start), 0 if it "
            "was refused or a part of it could not be loaded",
            registry=reg,
        )
        self.reload_time = Gauge(
            "mqtt_front_config_last_reload_timestamp_seconds",
            "When the configuration was last loaded (the start, then each reload, whatever its outcome)",
            registry=reg,
        )
        self.reload_success.set(1)
        self.reload_time.set(time.time())
        self.auth_latency = AuthLatency()  # admission counts into it
        reg.register(AuthLatencyCollector(self.auth_latency))
        self._accepted_by_listener: dict[str, Counter] = {}
        self._latency_by_target: dict[UpstreamTarget, Histogram] = {}  # targets compare by identity
        for listener in self.listeners:
            self.accepted.labels(listener)
            self.closed_connections.labels(listener, NO_TEAM)
        reg.register(_TeamCollector(self))

    def watch_edge(self, tls: TlsContexts, config: Config) -> None:
        """Read the listeners' refused handshakes and certificates in ``tls`` at scrape time; start the series
        each listener of ``config`` can have at 0, also the auth latency of the backends it configures; read
        the upstream client certificate."""
        reasons = {}
        for listener in config.listeners:
            reasons[listener.name] = (
                (TLS_FAILURES if listener.tls is not None else ())
                + (WS_REFUSALS if listener.type == "ws" else ())
                + (PROXY_REFUSALS if listener.proxy_protocol else ())
            )
        self.registry.register(_EdgeCollector(self, tls, reasons))
        auth = config.auth
        for backend, used in (
            ("users_file", True),  # it also refuses the users no other backend knows
            ("anonymous", auth.allow_anonymous),
            ("http", auth.http is not None),
            ("jwt", auth.jwt is not None),
        ):
            if used:
                self.auth_latency.add(backend)
        self.read_upstream_certificate(config.upstream)

    def read_upstream_certificate(self, upstream: UpstreamConfig | None) -> None:
        """The expiry of the client certificate the front broker presents upstream (none: no series)."""
        cert = upstream.tls.cert if upstream is not None and upstream.tls is not None else None
        try:
            pem = cert.read_bytes() if cert is not None else b""
        except OSError:
            pem = b""  # it was loaded before this reads it: a file gone since is no certificate to report
        self.upstream_cert_not_after = certificate_not_after(pem)

    def reloaded(self, ok: bool, upstream: UpstreamConfig | None = None) -> None:
        """A reload ran: ``ok`` if it loaded everything; ``upstream``: its TLS files were read again."""
        self.reload_success.set(1 if ok else 0)
        self.reload_time.set(time.time())
        if upstream is not None:
            self.read_upstream_certificate(upstream)

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

    def watch_store(self, store: ClusterCounts) -> None:
        """limits.store's counters at scrape time (``mqtt_front_store_*``)."""
        self.registry.register(StoreCollector(store))

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
