"""mqtt-front replicas as real ``mqtt-front run`` processes (PROXY protocol listener, metrics, admin API, JSON
logs), and paho clients with persistent sessions that reconnect by themselves, for tests/process/test_replicas.py.

A :class:`Subscriber` records every delivery and every (re)connect; a :class:`Publisher` streams numbered
QoS 1 and QoS 2 messages in a thread. Neither knows whether it talks to a balancer, a replica or Mosquitto.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.cli import mqtt_front
from tests.support.haproxy import Backend
from tests.support.ops import Scrape
from tests.support.ports import free_port

ADMIN_TOKEN = "replica-test-admin-token-0123456789"
SESSION_EXPIRY = 300  # seconds a v5 session outlives its connection
SHUTDOWN_TIMEOUT = 3.0  # limits.shutdown_timeout of the replicas: the drain window
# Messages a publisher has unacknowledged at most. paho 2.2 resends everything it holds at once after a
# reconnect (_messages_reconnect_reset_out never counts what it marks in flight), and Mosquitto answers what
# is over its Receive Maximum (20) with PUBACK/PUBREC 0x97, which paho takes as done: a lost message.
WINDOW = 16


@dataclass
class Replica:
    """One ``mqtt-front run`` process: MQTT listener ``port`` (PROXY protocol), metrics and admin ports."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    admin_port: int
    config: Path
    log: Path

    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port, self.metrics_port)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of ``event``."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
        return found

    def _get(self, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def readyz(self) -> int:
        try:
            return self._get(self.metrics_port, "/readyz")[0]
        except urllib.error.URLError:  # not listening (yet, or any more)
            return 0

    def metrics(self) -> Scrape:
        status, body = self._get(self.metrics_port, "/metrics")
        assert status == 200, body
        return Scrape(body.decode())

    def clients(self) -> list[dict[str, Any]]:
        """The admin API's client listing."""
        status, body = self._get(self.admin_port, "/api/v1/clients", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200, body
        data: list[dict[str, Any]] = json.loads(body)["data"]
        return data

    def client_ids(self) -> set[str]:
        return {c["client_id"] for c in self.clients()}

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until ``/readyz`` answers 200 (the metrics listener starts after the MQTT one); killed if it never does."""
        deadline = time.monotonic() + timeout
        while self.readyz() != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"replica {self.name} not ready: {self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch_replica(
    directory: Path, name: str, upstream_url: str, users_file: Path, limits: dict[str, Any] | None = None
) -> Replica:
    """``mqtt-front run`` with its config in ``directory``, started (see :meth:`Replica.wait_ready`)."""
    directory.mkdir(parents=True, exist_ok=True)
    port, metrics_port, admin_port = free_port(), free_port(), free_port()
    config = {
        "listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}", "proxy_protocol": True, "handshake_timeout": 2}],
        "upstream": {"url": upstream_url},
        "auth": {"users_file": str(users_file)},
        "acl": {"preset": "flowfuse"},
        "limits": {"shutdown_timeout": SHUTDOWN_TIMEOUT, **(limits or {})},
        "metrics": {"bind": f"127.0.0.1:{metrics_port}"},
        "admin": {"bind": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN},
        "logging": {"level": "info", "format": "json"},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(path)], stdout=out, stderr=subprocess.STDOUT)
    return Replica(name, proc, port, metrics_port, admin_port, path, log)


# ------------------------------------------------------------------ paho clients with persistent sessions


def _client(client_id: str, v5: bool) -> mqtt.Client:
    if v5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=False)
    client.reconnect_delay_set(1, 2)  # paho waits min_delay before each reconnect: keep the outage short
    return client


def _connect(client: mqtt.Client, port: int, v5: bool) -> None:
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY
        client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
    else:
        client.connect("127.0.0.1", port, keepalive=30)


@dataclass
class Subscriber:
    """A persistent session (v5 clean start false + session expiry, or v3.1.1 clean session false) subscribed
    once, at its first connect, to ``topic/#`` at QoS 2: deliveries after a reconnect prove the session lived."""

    port: int
    username: str
    password: str
    client_id: str
    v5: bool
    topic: str
    client: mqtt.Client = field(init=False)
    connects: list[bool] = field(default_factory=list)  # session present, per successful CONNACK
    disconnects: list[int] = field(default_factory=list)  # reason codes
    received: list[tuple[int, bytes]] = field(default_factory=list)  # (qos, payload)
    subscribed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = _client(self.client_id, self.v5)
        self.client.username_pw_set(self.username, self.password)
        self.client.on_connect = self._connected
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._message
        self.client.on_disconnect = self._disconnected

    def start(self, timeout: float = 10.0) -> None:
        _connect(self.client, self.port, self.v5)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError(f"{self.client_id} did not subscribe: connects {self.connects}")

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            return
        with self.lock:
            self.connects.append(bool(flags.session_present))
        if not self.subscribed.is_set():
            client.subscribe(f"{self.topic}/#", qos=2)

    def _message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append((message.qos, bytes(message.payload)))

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        with self.lock:
            self.disconnects.append(reason.value)

    def counts(self, qos: int) -> Counter[int]:
        """How often each message number arrived at ``qos``."""
        with self.lock:
            return Counter(int(payload) for q, payload in self.received if q == qos)

    def has_all(self, expected: dict[int, set[int]]) -> bool:
        return all(set(self.counts(qos)) >= seqs for qos, seqs in expected.items())

    def cut(self) -> None:
        """Cut the TCP connection under paho (as a dying replica would): it reconnects by itself."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)  # paho's loop reads the end of the stream

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """A v5 persistent session streaming message numbers ``first``..``first+count-1`` to ``topic/q1`` (even
    numbers: QoS 1) and ``topic/q2`` (odd: QoS 2), one every ``interval`` seconds. paho keeps what is not
    acknowledged and sends it again after a reconnect; Mosquitto, holding the session, delivers a QoS 2
    message sent twice once."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str,
        topic: str,
        count: int,
        *,
        first: int = 0,
        interval: float = 0.004,
    ) -> None:
        self.client = _client(client_id, v5=True)
        self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)  # no cap: whatever waits for a reconnect stays queued
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_publish = self._acknowledged
        self.client_id = client_id
        self.connected = threading.Event()
        self.connects = 0
        self.disconnects: list[int] = []
        self.port, self.topic, self.count, self.first, self.interval = port, topic, count, first, interval
        self.infos: list[mqtt.MQTTMessageInfo] = []
        # By packet id (unique here: fewer than 65,535 per publisher). Not MQTTMessageInfo.is_published(),
        # which raises for a message published while disconnected although paho sends it after the reconnect.
        self.acked: set[int] = set()
        self.refused: list[int] = []  # reason codes of failed acknowledgements
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stopping = threading.Event()

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not reason.is_failure:
            self.connects += 1
            self.connected.set()

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.disconnects.append(reason.value)

    def _acknowledged(self, client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        self.acked.add(mid)
        if reason.is_failure:
            self.refused.append(reason.value)

    @property
    def expected(self) -> dict[int, set[int]]:
        """Message numbers by QoS."""
        numbers = range(self.first, self.first + self.count)
        return {1: {n for n in numbers if n % 2 == 0}, 2: {n for n in numbers if n % 2 == 1}}

    def sent(self) -> int:
        return len(self.infos)

    def start(self) -> None:
        """Connect (the stream starts with :meth:`begin`, once the subscribers are subscribed)."""
        _connect(self.client, self.port, True)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"the publisher {self.client_id} did not connect")

    def begin(self) -> None:
        """Start publishing, in a thread."""
        self.thread.start()

    def _run(self) -> None:
        for seq in range(self.first, self.first + self.count):
            while len(self.infos) - len(self.acked) >= WINDOW:
                if self.stopping.is_set():
                    return
                time.sleep(0.001)
            if self.stopping.is_set():
                return
            qos = 1 if seq % 2 == 0 else 2
            self.infos.append(self.client.publish(f"{self.topic}/q{qos}", str(seq).encode(), qos=qos))
            time.sleep(self.interval)

    def wait_sent(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the publisher sent {self.sent()} of {n}")
            time.sleep(0.01)

    def wait_acked(self, timeout: float = 20.0) -> None:
        """Until every message was handed to paho and acknowledged (QoS 2: PUBCOMP)."""
        deadline = time.monotonic() + timeout
        self.thread.join(timeout)
        while len(self.infos) < self.count or not {info.mid for info in self.infos} <= self.acked:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the publisher {self.client_id} has {len(self.acked)} of {self.count} acknowledged")
            time.sleep(0.05)
        if self.refused:
            raise RuntimeError(f"the publisher {self.client_id} got failed acknowledgements: {self.refused}")

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def wait_delivered(subscribers: list[Subscriber], expected: dict[int, set[int]], timeout: float = 20.0) -> None:
    """Until every subscriber has every expected message (or ``timeout``), then a moment for late duplicates."""
    deadline = time.monotonic() + timeout
    while not all(sub.has_all(expected) for sub in subscribers) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
