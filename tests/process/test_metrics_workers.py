"""``mqtt-front run --workers 2``: the parent's merged /metrics carries the new families with the right
arithmetic (counters and histograms add up over workers; reload success, reload time and certificate
expiry are the worst worker's, not a sum), and the workers run on uvloop when it is installed."""

from __future__ import annotations

import asyncio
import datetime
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
import yaml

from tests.support.cli import running
from tests.support.front import PASSWORD
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ops import Scrape, http_request
from tests.support.pki import Pki, write_leaf
from tests.support.ports import free_port
from tests.support.workers import children

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 20.0


async def merged(port: int) -> Scrape:
    status, _, body = await http_request(port, "/metrics")
    assert status == 200, body
    return Scrape(body.decode())


async def until(port: int, ready: Callable[[Scrape], bool]) -> Scrape:
    async with asyncio.timeout(TIMEOUT):
        while True:
            s = await merged(port)
            if ready(s):
                return s
            await asyncio.sleep(0.1)


async def test_worker_metrics_merge_the_new_families(
    tmp_path: Path, mosquitto: Mosquitto, users_file: Path, pki: Pki
) -> None:
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=10)
    cert, key = tmp_path / "mqtts.pem", tmp_path / "mqtts.key"
    leaf = pki.authority.issue_cert("localhost", "127.0.0.1", not_after=not_after, key_type=pki.key_type)
    write_leaf(leaf, cert, key)
    port, tls_port, metrics_port = free_port(), free_port(), free_port()
    path = tmp_path / "front.yaml"
    config = {
        "listeners": [
            {"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{port}"},
            {"name": "mqtts", "bind": f"127.0.0.1:{tls_port}", "tls": {"cert": str(cert), "key": str(key)}},
        ],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users_file)},
        "acl": {"preset": "flowfuse"},
        "metrics": {"bind": f"127.0.0.1:{metrics_port}"},
    }
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    with running(path, tmp_path / "front.log", "--workers", "2", ports=(port, tls_port, metrics_port)) as proc:
        async with asyncio.timeout(TIMEOUT):
            while len(children(proc.pid)) < 2 or (await http_request(metrics_port, "/readyz"))[0] != 200:
                await asyncio.sleep(0.1)
        s = await merged(metrics_port)
        assert not [name for name in s.names if name.endswith("_created")]
        assert s.get("mqtt_front_config_reload_success") == 1  # 1 in each worker: not 2
        loaded = s.get("mqtt_front_config_last_reload_timestamp_seconds")
        assert started - 1 <= loaded <= time.time()  # a time, not the sum of two
        left = s.get("mqtt_front_certificate_expiry_seconds", listener="mqtts")
        assert abs(left - (not_after.timestamp() - time.time())) < 30

        # Plain MQTT on the TLS port, four times: the kernel spreads them over the workers, the sum is 4.
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
            writer.write(connect("x", None, None))
            await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
        await until(metrics_port, lambda r: r.get("mqtt_front_handshake_failures_total", listener="mqtts",
                                                   reason="tls_not_tls") == 4)
        async with aiomqtt.Client("127.0.0.1", port, username="project:team1:p1", password=PASSWORD, timeout=10):
            pass
        s = await until(
            metrics_port, lambda r: r.get("mqtt_front_auth_duration_seconds_count", backend="users_file") == 1
        )
        assert s.get("mqtt_front_auth_duration_seconds_bucket", backend="users_file", le="+Inf") == 1

        # A reload every worker refuses: 0 (the worst worker's), and the time moves on (the oldest worker's:
        # it has moved once both reloaded).
        path.write_text("listeners: [{name: mqtt, bind: 1883}]\n")
        proc.send_signal(signal.SIGHUP)
        await until(
            metrics_port,
            lambda r: r.get("mqtt_front_config_reload_success") == 0
            and r.get("mqtt_front_config_last_reload_timestamp_seconds") > loaded,
        )
    log = (tmp_path / "front.log").read_text()
    assert "config_reload_failed" in log
