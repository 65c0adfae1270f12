"""SIGTERM (and ``mqtt-front ctl drain``) stop the real ``mqtt-front run`` process without losing what clients
sent: 20 paho clients (MQTT 3.1.1 and 5) stream QoS 1 through it to a real Mosquitto, a subscriber on Mosquitto
itself counts what arrived. Issue 13 item 5; the finding reproduced here: before the drain, ~100 of ~10,000
messages the clients had written before the signal never arrived (the upstream sockets were reset)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cli import mqtt_front, run_cli
from tests.support.drain_load import Collector, Stream, missing
from tests.support.front import PASSWORD, uid
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.mqtt_bytes import connect, publish, subscribe
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.timeout(120)

USER = "project:team1:p1"
TOKEN = "drain-test-admin-token-0123456789"
SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    # No queue limit: a subscriber that falls behind must not lose messages on Mosquitto's side.
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"), "max_queued_messages 0\n")
    yield broker
    broker.stop()


@dataclass
class Front:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    config: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except urllib.error.URLError:  # the metrics listener starts after the MQTT one: not up yet
            return 0


def start_front(tmp_path: Path, mosquitto: Mosquitto, users_file: Path, *args: str, admin: bool = False) -> Front:
    port, metrics_port = free_port(), free_port()
    config: dict[str, Any] = {
        "listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users_file)},
        "acl": {"preset": "flowfuse"},
        "limits": {"shutdown_timeout": SHUTDOWN_TIMEOUT},
        "metrics": {"bind": f"127.0.0.1:{metrics_port}"},
    }
    if admin:
        config["admin"] = {"bind": f"127.0.0.1:{free_port()}", "token": TOKEN}
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(path), *args], stdout=out, stderr=subprocess.STDOUT)
    front = Front(proc, port, metrics_port, path, log)
    try:
        wait_port(port, 15)
        deadline = time.monotonic() + 15
        while front.readyz() != 200:  # every worker bound (with --workers 2, the parent asks both)
            if time.monotonic() > deadline:
                raise RuntimeError(f"mqtt-front not ready: {front.log_text()}")
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return front


@pytest.fixture
def stop_front() -> Iterator[list[Front]]:
    fronts: list[Front] = []
    yield fronts
    for front in fronts:
        if front.proc.poll() is None:
            front.proc.kill()
            front.proc.wait()


def stuck_client(front: Front, mosquitto: Mosquitto, topic: str) -> socket.socket:
    """A v5 client that never reads, with more deliveries queued for it than its sockets hold: it keeps the
    drain busy until shutdown_timeout (so the test can look at the process meanwhile)."""
    sock = socket.create_connection(("127.0.0.1", front.port))
    sock.sendall(connect(f"{USER}:stuck-{uid()}", USER, PASSWORD, v5=True, keepalive=60))
    sock.sendall(subscribe([(f"{topic}/big", 0)], v5=True))
    time.sleep(0.3)  # CONNACK and SUBACK are the last bytes it reads: none at all, in fact
    feeder = socket.create_connection(("127.0.0.1", mosquitto.port))
    feeder.sendall(connect(f"feeder-{uid()}", v5=False))
    big = publish(f"{topic}/big", b"x" * 1_048_576, v5=False)
    for _ in range(24):
        feeder.sendall(big)
    feeder.close()  # QoS 0 after CONNECT on one connection: Mosquitto reads them all before the close
    return sock


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_mid_stream_loses_nothing_the_clients_wrote(
    tmp_path: Path, mosquitto: Mosquitto, users_file: Path, stop_front: list[Front], workers: str
) -> None:
    front = start_front(tmp_path, mosquitto, users_file, "--workers", workers)
    stop_front.append(front)
    topic = f"ff/v1/team1/c/drain-{uid()}"
    collector = Collector(mosquitto.port, topic)
    collector.start()
    stream = Stream(front.port, topic, 20, USER, PASSWORD)
    stream.start()
    stuck = stuck_client(front, mosquitto, f"{topic}-stuck")  # not under the collector's filter
    try:
        time.sleep(1.5)
        written = stream.written()  # handed to the sockets before the signal
        started = time.monotonic()
        front.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        during = (front.readyz(), refused(front.port), front.proc.poll())
        code = front.proc.wait(SHUTDOWN_TIMEOUT + 10)
        took = time.monotonic() - started
        stream.wait_gone(5)
        acked = stream.acked()
        received = collector.settle()
    finally:
        stream.close()
        collector.close()
        stuck.close()
    log = front.log_text()
    assert code == 0, log
    assert "Traceback" not in log
    assert during == (503, True, None), during  # not ready, not accepting, still draining (the stuck client)
    assert took < SHUTDOWN_TIMEOUT + 1.5, took  # the stuck client is dropped at shutdown_timeout
    assert sum(map(len, written.values())) > 500  # a real stream was cut
    assert missing(acked, received) == 0  # every message whose PUBACK a client got was delivered
    assert missing(written, received) == 0  # and every message written before the signal
    reasons = [pub.client.disconnect_reasons for pub in stream.publishers if pub.client.v5]
    assert reasons == [[0x8B]] * 10, reasons
    assert log.count("drained seconds=") == int(workers)


def test_ctl_drain_is_a_sigterm(
    tmp_path: Path, mosquitto: Mosquitto, users_file: Path, stop_front: list[Front]
) -> None:
    front = start_front(tmp_path, mosquitto, users_file, admin=True)
    stop_front.append(front)
    topic = f"ff/v1/team1/c/ctl-{uid()}"
    collector = Collector(mosquitto.port, topic)
    collector.start()
    stream = Stream(front.port, topic, 4, USER, PASSWORD)
    stream.start()
    try:
        time.sleep(0.5)
        result = run_cli("ctl", "-c", str(front.config), "drain")
        written = stream.written()  # an upper bound of what was written before the drain began
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("draining") and f"within {SHUTDOWN_TIMEOUT} s" in result.stdout
        code = front.proc.wait(SHUTDOWN_TIMEOUT + 10)
        stream.wait_gone(5)
        acked = stream.acked()
        received = collector.settle()
    finally:
        stream.close()
        collector.close()
    assert code == 0, front.log_text()
    assert missing(acked, received) == 0
    assert sum(map(len, written.values())) > 0
    assert [pub.client.disconnect_reasons for pub in stream.publishers if pub.client.v5] == [[0x8B]] * 2
    assert "admin op=drain" in front.log_text()


def test_a_hung_worker_is_killed_after_shutdown_timeout(
    tmp_path: Path, mosquitto: Mosquitto, users_file: Path, stop_front: list[Front]
) -> None:
    front = start_front(tmp_path, mosquitto, users_file, "--workers", "2")
    stop_front.append(front)
    with open(f"/proc/{front.proc.pid}/task/{front.proc.pid}/children") as f:
        hung, other = (int(pid) for pid in f.read().split())
    os.kill(hung, signal.SIGSTOP)  # cannot drain, cannot exit
    started = time.monotonic()
    front.proc.send_signal(signal.SIGTERM)
    code = front.proc.wait(SHUTDOWN_TIMEOUT + 15)
    took = time.monotonic() - started
    assert code == 1  # the parent had to kill: not a clean stop
    assert SHUTDOWN_TIMEOUT + 4 < took < SHUTDOWN_TIMEOUT + 8, took  # shutdown_timeout + the 5 s margin
    assert "killing it" in front.log_text()
    for pid in (hung, other):
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_start_up_log_says_not_ready_when_the_upstream_is_down(tmp_path: Path, users_file: Path) -> None:
    """Issue 15 item 6: with the upstream down at start the log says so instead of `ready`."""
    port = free_port()
    config = {
        "listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": f"mqtt://127.0.0.1:{free_port()}"},  # nothing listens there
        "auth": {"users_file": str(users_file)},
    }
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert "not_ready" in text and 'reason="upstream unreachable: ' in text, text
        assert " ready version=" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
