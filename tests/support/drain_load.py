"""A QoS 1 publish stream from many paho clients, counted exactly, and a subscriber that counts what arrived.

For the drain tests and ``bench/drain.py``: every client knows which of its PUBLISHes it handed to its socket
(whole packets, by sequence number, counted where paho writes to the socket) and which were acknowledged;
the :class:`Collector` is subscribed on the internal broker directly, so what it received is what got
through. Read :meth:`Stream.written` right before the signal: those are the messages the clients had
written before it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.mqtt.framer import Framer
from broker.mqtt.packets import decode_publish

WINDOW = 40  # publishes a client has queued in paho and not yet acknowledged (paho sends 20 at a time)


class CountingClient(mqtt.Client):
    """A paho client that records the sequence number of every PUBLISH whose last byte went to its socket."""

    def __init__(self, client_id: str, v5: bool, name: str) -> None:
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.v5 = v5
        self.name = name
        self._sent = Framer()
        self.written: list[int] = []  # appended by paho's network thread only
        self.disconnect_reasons: list[int] = []
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.acks = 0
        self.on_connect = self._connected
        self.on_disconnect = self._disconnected
        self.on_publish = self._published

    def _sock_send(self, buf: bytes | bytearray) -> int:
        sent = super()._sock_send(buf)
        chunk, ends = self._sent.feed(bytes(buf[:sent]))
        start = 0
        for end in ends:
            if chunk[start] >> 4 == 3:
                pub = decode_publish(chunk, start, end, self.v5)
                self.written.append(int(chunk[pub.payload_start : end].split(b":")[1]))
            start = end
        return sent

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not reason.is_failure:
            self.connected.set()

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.disconnect_reasons.append(reason.value)
        self.gone.set()

    def _published(self, client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Properties) -> None:
        self.acks += 1


@dataclass
class Publisher:
    client: CountingClient
    topic: str
    infos: list[tuple[int, mqtt.MQTTMessageInfo]] = field(default_factory=list)
    thread: threading.Thread | None = None

    def acked(self) -> set[int]:
        return {seq for seq, info in self.infos if info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()}


class Stream:
    """``count`` clients (v3.1.1 and v5 alternately) streaming QoS 1 to ``port`` under ``topic/<client>``."""

    def __init__(self, port: int, topic: str, count: int, username: str, password: str) -> None:
        self.stop = threading.Event()
        self.publishers: list[Publisher] = []
        for i in range(count):
            name = f"c{i}"
            client = CountingClient(f"{username}:drain-{name}-{time.monotonic_ns()}", v5=i % 2 == 1, name=name)
            client.username_pw_set(username, password)
            self.publishers.append(Publisher(client, f"{topic}/{name}"))
        self.port = port

    def start(self) -> None:
        for pub in self.publishers:
            pub.client.connect("127.0.0.1", self.port, keepalive=30)
            pub.client.loop_start()
        for pub in self.publishers:
            if not pub.client.connected.wait(10):
                raise RuntimeError(f"{pub.client.name} did not connect")
        for pub in self.publishers:
            pub.thread = threading.Thread(target=self._run, args=(pub,), daemon=True)
            pub.thread.start()

    def _run(self, pub: Publisher) -> None:
        client = pub.client
        seq = 0
        while not self.stop.is_set() and not client.gone.is_set():
            if seq - client.acks >= WINDOW:
                time.sleep(0.001)
                continue
            seq += 1
            info = client.publish(pub.topic, f"{client.name}:{seq}".encode(), qos=1)
            pub.infos.append((seq, info))

    def written(self) -> dict[str, set[int]]:
        """Per client, the messages handed to its socket so far."""
        return {pub.client.name: set(pub.client.written[:]) for pub in self.publishers}

    def acked(self) -> dict[str, set[int]]:
        return {pub.client.name: pub.acked() for pub in self.publishers}

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(pub.client.gone.wait(max(0.0, deadline - time.monotonic())) for pub in self.publishers)

    def close(self) -> None:
        self.stop.set()
        for pub in self.publishers:
            if pub.thread is not None:
                pub.thread.join(5)
            pub.client.disconnect()
            pub.client.loop_stop()


class Collector:
    """Subscribed to ``topic/#`` on the internal broker itself: what the front broker got through."""

    def __init__(self, port: int, topic: str) -> None:
        self.received: dict[str, set[int]] = {}
        self.last = time.monotonic()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{time.monotonic_ns()}")
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.max_inflight_messages_set(1000)
        self.topic = topic
        self.port = port

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.subscribe(f"{self.topic}/#", qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the collector did not subscribe")

    def _message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        name, seq = message.payload.split(b":")
        with self._lock:
            self.received.setdefault(name.decode(), set()).add(int(seq))
            self.last = time.monotonic()

    def settle(self, quiet: float = 1.0, timeout: float = 20.0) -> dict[str, set[int]]:
        """What arrived, once nothing more has for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - self.last < quiet:
            time.sleep(0.1)
        with self._lock:
            return {name: set(seqs) for name, seqs in self.received.items()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def missing(expected: dict[str, set[int]], received: dict[str, set[int]]) -> int:
    """How many of ``expected`` never arrived."""
    return sum(len(seqs - received.get(name, set())) for name, seqs in expected.items())
