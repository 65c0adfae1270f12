"""The operations endpoints over raw HTTP: a GET (or any request), and a parsed /metrics scrape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker.server import FrontBroker

Labels = frozenset[tuple[str, str]]


async def http_request(
    port: int, path: str, method: str = "GET", raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def ops_port(front: FrontBroker) -> int:
    assert front.ops is not None and front.ops.address is not None
    return front.ops.address[1]


async def get_json(front: FrontBroker, path: str) -> tuple[int, Any]:
    status, _, body = await http_request(ops_port(front), path)
    return status, json.loads(body)


class Scrape:
    """A /metrics scrape: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name) if label in dict(labels)}


async def scrape(front: FrontBroker) -> Scrape:
    status, headers, body = await http_request(ops_port(front), "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return Scrape(body.decode())
