"""One /metrics, /healthz and /readyz for all worker processes.

With ``--workers N`` each worker serves its own endpoint on a unix socket; the parent serves
``metrics.bind`` and answers from all of them: metrics are summed sample by sample (so a
counter is the total over workers; a few gauges take the worst worker's value instead: start
and reload times, reload success, certificate expiry), health and readiness hold only if every
worker says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from broker.ops.http import HttpEndpoint, _json

FETCH_TIMEOUT = 5.0


async def fetch(path: str, socket_path: str) -> tuple[int, bytes]:
    """GET ``path`` from a worker's unix-socket endpoint: (status, body); status 0 if unreachable."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, b""
    return status, body


# Gauges that do not add up over workers: the worst worker's value is the process's. A start time and the
# last reload are the oldest worker's, a reload succeeded only if it did in every worker, a certificate
# expires in the least time any worker has left.
_WORST = ("_start_time_seconds", "_timestamp_seconds", "_reload_success", "_expiry_seconds")


def _combine(name: str, values: list[float]) -> float:
    # An info metric is 1; everything else adds up.
    if name.endswith(_WORST):
        return min(values)
    if name.endswith("_info"):
        return max(values)
    return sum(values)


def merge(texts: Iterable[str]) -> list[Metric]:
    """Sum the samples of several Prometheus text expositions by (sample name, labels)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            per_sample = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                per_sample.setdefault(key, []).append(sample.value)
    merged = []
    for name, family in families.items():
        for (sample_name, labels), vals in values[name].items():
            family.add_sample(sample_name, dict(labels), _combine(sample_name, vals))
        merged.append(family)
    return merged


class ParentCounts(Protocol):
    """The parent process's own counters (``broker.ops.workers.PARENT``)."""

    restarts: int


class _NoParent:
    restarts = 0


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


class WorkersOpsServer(HttpEndpoint):
    """The parent's endpoint: answers from every worker's endpoint."""

    def __init__(self, socket_paths: Sequence[str], parent: ParentCounts | None = None) -> None:
        super().__init__()
        self.socket_paths = list(socket_paths)
        self.parent: ParentCounts = parent if parent is not None else _NoParent()

    async def _all(self, path: str) -> list[tuple[int, bytes]]:
        return list(await asyncio.gather(*(fetch(path, p) for p in self.socket_paths)))

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            answers = await self._all("/metrics")
            missing = [i for i, (status, _) in enumerate(answers) if status != 200]
            if missing:
                return 503, "application/json", _json({"error": "workers not answering", "workers": missing})
            registry = CollectorRegistry(auto_describe=False)
            merged = merge(body.decode() for _, body in answers)
            restarts = CounterMetricFamily(
                "mqtt_front_worker_restarts", "Workers that died and were started again by the parent"
            )
            restarts.add_metric([], self.parent.restarts)
            registry.register(_Merged([*merged, restarts]))
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
        if path in ("/healthz", "/readyz"):
            answers = await self._all(path)
            bad = {str(i): _reason(status, body) for i, (status, body) in enumerate(answers) if status != 200}
            if not bad:
                return 200, "application/json", _json({"status": "ok" if path == "/healthz" else "ready"})
            state = "unhealthy" if path == "/healthz" else "not ready"
            return 503, "application/json", _json({"status": state, "workers": bad})
        return 404, "application/json", _json({"error": "not found"})


def _reason(status: int, body: bytes) -> str:
    if status == 0:
        return "worker not answering"
    with contextlib.suppress(ValueError, AttributeError):
        reason = json.loads(body).get("reason")
        if reason:
            return str(reason)
    return f"HTTP {status}"
