"""MQTT over WebSocket (ws and wss listeners): real clients (aiomqtt, paho, MQTT.js, the
websockets library) and hand-made frames, through the front broker to a real Mosquitto."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
import websockets
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from websockets.asyncio.client import connect as ws_connect

from broker.edge.proxy_protocol import encode_v1
from broker.mqtt.framer import Framer
from broker.mqtt.packets import Subscribe, encode_publish, encode_subscribe
from broker.server import FrontBroker
from tests.support.cli import ROOT
from tests.support.front import PASSWORD, FrontFactory, front_port, uid
from tests.support.mqtt_bytes import connect, ws_client_frame
from tests.support.pki import Pki

pytestmark = pytest.mark.timeout(60)

JS_DIR = ROOT / "tests" / "js"
USER = "project:team1:p1"
V311 = aiomqtt.ProtocolVersion.V311
V5 = aiomqtt.ProtocolVersion.V5


def team_topic() -> str:
    return f"ff/v1/team1/c/{uid()}"


# ---------------------------------------------------------------- front brokers with a ws listener


async def ws_front(make_front: FrontFactory, pki: Pki | None = None, **ws: Any) -> FrontBroker:
    """A front broker with a tcp listener "mqtt" and a ws listener "ws" (wss with the pki's server certificate)."""
    listener: dict[str, Any] = {"name": "ws", "type": "ws", "bind": "127.0.0.1:0", **ws}
    if pki is not None:
        listener["tls"] = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    front: FrontBroker = await make_front(
        listeners=[{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}, listener]
    )
    return front


def ws_port(front: FrontBroker) -> int:
    return front_port(front, "ws")


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- raw WebSocket helpers


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def http_get(
    port: int,
    path: str = "/",
    *,
    upgrade: bool = True,
    subprotocols: list[str] | None = None,
    host: str | None = "127.0.0.1",
    extra: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if subprotocols is None:
        subprotocols = ["mqtt"]
    if subprotocols and upgrade:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return HttpResponse(int(status_line.split()[1]), headers, body, reader, writer)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server-to-client frame: (opcode, payload)."""
    b1, b2 = await reader.readexactly(2)
    assert not b2 & 0x80, "server frames are never masked"
    n = b2 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b1 & 0x0F, await reader.readexactly(n)


async def read_close(reader: asyncio.StreamReader, timeout: float = 3.0) -> int:
    """Read frames until a close frame; its code. Then the server closes the TCP connection."""
    async with asyncio.timeout(timeout):
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x8:
                code: int = struct.unpack("!H", payload[:2])[0]
                assert await reader.read() == b""
                return code


class MqttOverWs:
    """Collects the MQTT packets the server sends in binary frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = Framer()
        self.packets: list[bytes] = []

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def packet(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while not self.packets:
                opcode, payload = await read_frame(self.reader)
                assert opcode in (0x2, 0x0), f"unexpected opcode {opcode}"
                chunk, ends = self.framer.feed(payload)
                start = 0
                for end in ends:
                    self.packets.append(chunk[start:end])
                    start = end
        return self.packets.pop(0)


async def open_mqtt_ws(port: int, client_id: str | None = None) -> MqttOverWs:
    resp = await http_get(port)
    assert resp.status == 101
    conn = MqttOverWs(resp.reader, resp.writer)
    conn.send(ws_client_frame(connect(client_id or f"{USER}:{uid()}", USER, PASSWORD, keepalive=30)))
    connack = await conn.packet()
    assert connack[:1] == b"\x20" and connack[3] == 0, connack
    return conn


# ---------------------------------------------------------------- real MQTT clients


async def aiomqtt_roundtrip(port: int, version: aiomqtt.ProtocolVersion, tls: ssl.SSLContext | None) -> None:
    topic = team_topic()
    common: dict[str, Any] = {
        "hostname": "127.0.0.1",
        "port": port,
        "username": USER,
        "password": PASSWORD,
        "protocol": version,
        "transport": "websockets",
        "websocket_path": "/",
        "tls_context": tls,
    }
    async with (
        aiomqtt.Client(identifier=f"{USER}:{uid()}", **common) as sub,
        aiomqtt.Client(identifier=f"{USER}:{uid()}", **common) as pub,
    ):
        await sub.subscribe(f"{topic}/#", qos=1)
        payload = os.urandom(3000)  # several frames' worth on the TCP level
        await pub.publish(f"{topic}/a", payload, qos=1)
        await pub.publish(f"{topic}/b", b"second", qos=2)
        got = []
        async with asyncio.timeout(5):
            async for message in sub.messages:
                got.append((str(message.topic), message.payload))
                if len(got) == 2:
                    break
        assert got == [(f"{topic}/a", payload), (f"{topic}/b", b"second")]


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
async def test_aiomqtt_over_ws(make_front: FrontFactory, version: aiomqtt.ProtocolVersion) -> None:
    front = await ws_front(make_front)
    await aiomqtt_roundtrip(ws_port(front), version, None)


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
async def test_aiomqtt_over_wss(make_front: FrontFactory, pki: Pki, version: aiomqtt.ProtocolVersion) -> None:
    front = await ws_front(make_front, pki)
    await aiomqtt_roundtrip(ws_port(front), version, pki.client_context())


def paho_roundtrip(
    port: int, protocol: MQTTProtocolVersion, tls: ssl.SSLContext | None, origin: str | None = None
) -> list[bytes]:
    """Connect, subscribe and publish to itself with a threaded paho client; the payloads received."""
    topic = team_topic()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{USER}:{uid()}", protocol=protocol, transport="websockets"
    )
    client.ws_set_options(path="/", headers={"Origin": origin} if origin else None)
    if tls is not None:
        client.tls_set_context(tls)
    client.username_pw_set(USER, PASSWORD)
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    payloads: list[bytes] = []
    codes: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason)
        connected.set()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        payloads.append(message.payload)
        received.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(5), "no CONNACK"
        assert not codes[0].is_failure, codes
        client.subscribe(topic, qos=1)
        assert subscribed.wait(5), "no SUBACK"
        client.publish(topic, b"paho over websocket", qos=1).wait_for_publish(5)
        assert received.wait(5), "message not delivered"
    finally:
        client.disconnect()
        client.loop_stop()
    return payloads


@pytest.mark.parametrize(
    ("scheme", "protocol"),
    [("ws", paho.MQTTv311), ("ws", paho.MQTTv5), ("wss", paho.MQTTv311), ("wss", paho.MQTTv5)],
    ids=["ws-v311", "ws-v5", "wss-v311", "wss-v5"],
)
async def test_paho(make_front: FrontFactory, pki: Pki, scheme: str, protocol: MQTTProtocolVersion) -> None:
    front = await ws_front(make_front, pki if scheme == "wss" else None)
    tls = pki.client_context() if scheme == "wss" else None
    payloads = await asyncio.to_thread(paho_roundtrip, ws_port(front), protocol, tls)
    assert payloads == [b"paho over websocket"]


# ---------------------------------------------------------------- MQTT.js, as the FlowFuse project nodes


def node_binary() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed: `make test` needs Node.js for the MQTT.js interop tests")
    if not (JS_DIR / "node_modules" / "mqtt").is_dir():
        raise RuntimeError("tests/js/node_modules is missing: run `make test` (it runs npm ci in tests/js)")
    return found


def run_mqttjs(url: str, ca: Path | None) -> dict[str, Any]:
    config = {"url": url, "ca": str(ca) if ca else None, "password": PASSWORD, "run": uid()}
    proc = subprocess.run(
        [node_binary(), str(JS_DIR / "project_link.mjs"), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=40,
        cwd=JS_DIR,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output from node (exit {proc.returncode}): {proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in result, (result, proc.stderr)
    return result


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_mqttjs_project_link(make_front: FrontFactory, pki: Pki, scheme: str) -> None:
    front = await ws_front(make_front, pki if scheme == "wss" else None)
    url = f"{scheme}://127.0.0.1:{ws_port(front)}/"
    r = await asyncio.to_thread(run_mqttjs, url, pki.ca if scheme == "wss" else None)

    assert r["connack"]["p1"] == {"sessionPresent": False, "reasonCode": 0}
    assert r["connack"]["p2"] == {"sessionPresent": False, "reasonCode": 0}
    out_sub, in_sub, foreign_sub, res_sub = r["subscribe"]
    assert out_sub == {"topic": out_sub["topic"], "error": None, "granted": [2]}
    assert in_sub["error"] is None and in_sub["granted"] == [2]
    assert res_sub["error"] is None and res_sub["granted"] == [2]
    assert foreign_sub["error"] == 0x87 and foreign_sub["granted"] == [0x87]  # another team's topics: refused

    broadcast, call, foreign_pub = r["publish"]
    assert broadcast["error"] is None and call["error"] is None
    assert foreign_pub["error"] == 0x87  # PUBREC 0x87: not authorized

    by_topic = {m["topic"]: m for m in r["messages"]}
    assert len(by_topic) == len(r["messages"]) == 2, r["messages"]
    bcast = next(m for t, m in by_topic.items() if t.endswith("/broadcast"))
    assert bcast["subscriptionIdentifiers"] == [1]  # routed to the "out" subscription
    assert bcast["qos"] == 2
    assert bcast["contentType"] == "application/json"
    assert json.loads(bcast["payload"]) == {"hello": "team"}
    props = bcast["userProperties"]
    assert props["_projectID"] == "p2" and props["_applicationID"] == "app-p2" and props["_nodeID"] == "link-out-1"
    assert props["_publishTime"].isdigit()

    call_msg = next(m for t, m in by_topic.items() if t.endswith("/call"))
    assert call_msg["subscriptionIdentifiers"] == [2]  # routed to the "in" subscription
    assert call_msg["responseTopic"] == r["responseTopic"]
    assert call_msg["correlationData"] == r["sentCorrelationData"]
    assert call_msg["userProperties"]["_nodeID"] == "link-call-1"

    (response,) = r["responses"]
    assert response["topic"] == r["responseTopic"]
    assert response["subscriptionIdentifiers"] == [1]
    assert response["correlationData"] == r["sentCorrelationData"]
    assert json.loads(response["payload"]) == {"reply": "pong"}
    assert response["userProperties"]["_projectID"] == "p1"
    assert r["reconnectSessionPresent"] is True  # clean: false + sessionExpiryInterval 120


# ---------------------------------------------------------------- handshake policy


@pytest.mark.parametrize(
    ("offered", "required", "status", "chosen"),
    [
        (["mqtt"], True, 101, "mqtt"),
        (["mqttv3.1"], True, 101, "mqttv3.1"),
        (["chat", "mqtt"], True, 101, "mqtt"),
        (["chat"], True, 400, None),
        (["chat"], False, 400, None),
        ([], True, 400, None),
        ([], False, 101, None),
    ],
    ids=["mqtt", "mqttv3.1", "other-and-mqtt", "other-only", "other-only-optional", "none-required", "none-optional"],
)
async def test_subprotocol(
    make_front: FrontFactory, offered: list[str], required: bool, status: int, chosen: str | None
) -> None:
    front = await ws_front(make_front, require_subprotocol=required)
    resp = await http_get(ws_port(front), subprotocols=offered)
    assert resp.status == status, resp.body
    assert resp.headers.get("sec-websocket-protocol") == chosen
    if status == 101:
        conn = MqttOverWs(resp.reader, resp.writer)
        conn.send(ws_client_frame(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30)))
        assert (await conn.packet())[:4] == b"\x20\x02\x00\x00"
    else:
        assert await resp.reader.read() == b""  # closed after the refusal
    resp.writer.close()


async def test_origin(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, allowed_origins=["https://app.example.com", "http://localhost:1880"])
    port = ws_port(front)
    foreign = await http_get(port, extra=[("Origin", "https://evil.example.net")])
    assert foreign.status == 403
    assert await foreign.reader.read() == b""
    for origin in ["https://app.example.com", "HTTPS://App.Example.com", "http://localhost:1880"]:
        ok = await http_get(port, extra=[("Origin", origin)])
        assert ok.status == 101, origin
        ok.writer.close()
    no_origin = await http_get(port)  # not a browser
    assert no_origin.status == 101
    no_origin.writer.close()
    twice = await http_get(port, extra=[("Origin", "https://app.example.com"), ("Origin", "https://evil.example")])
    assert twice.status == 400
    # paho sends an Origin header of its own: allowed when listed
    payloads = await asyncio.to_thread(paho_roundtrip, port, paho.MQTTv5, None, "https://app.example.com")
    assert payloads == [b"paho over websocket"]
    assert not front.connections or all(c.listener == "ws" for c in front.connections)


async def test_path(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, path="/mqtt")
    port = ws_port(front)
    wrong = await http_get(port, "/")
    assert wrong.status == 404
    assert await wrong.reader.read() == b""
    for path in ["/mqtt", "/mqtt?client=1"]:
        ok = await http_get(port, path)
        assert ok.status == 101, path
        ok.writer.close()
    aio = aiomqtt.Client(
        "127.0.0.1", port, username=USER, password=PASSWORD, identifier=f"{USER}:{uid()}",
        transport="websockets", websocket_path="/mqtt",
    )  # fmt: skip
    async with aio:
        pass


async def test_allowed_hosts(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, allowed_hosts=["mqtt.example.com", "127.0.0.1"])
    port = ws_port(front)
    for host, status in [
        ("mqtt.example.com", 101),
        ("MQTT.example.com:443", 101),
        (f"127.0.0.1:{port}", 101),
        ("other.example.com", 403),
        ("mqtt.example.com.evil.net", 403),
        (None, 400),
    ]:
        resp = await http_get(port, host=host)
        assert resp.status == status, host
        resp.writer.close()


async def test_healthz(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, path="/mqtt", allowed_hosts=["mqtt.example.com"])
    resp = await http_get(ws_port(front), "/healthz", upgrade=False, host="10.1.2.3")
    assert resp.status == 200
    assert resp.body == b"ok\n"
    assert "upgrade" not in resp.headers
    assert await resp.reader.read() == b""
    assert not front.connections
    # a plain GET elsewhere is not a WebSocket request
    other = await http_get(ws_port(front), "/mqtt", upgrade=False, host="mqtt.example.com")
    assert other.status == 426


async def test_garbage_and_timeout(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, handshake_timeout=0.3)
    port = ws_port(front)
    # not HTTP at all
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n")
    async with asyncio.timeout(3):
        data = await reader.read()
    assert data.startswith(b"HTTP/1.1 400 ")
    writer.close()
    # oversized header line
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")
    async with asyncio.timeout(3):
        data = await reader.read()
    assert data == b"" or data.startswith(b"HTTP/1.1 400 ")
    writer.close()
    # silent, and half a request: closed after handshake_timeout
    for opening in [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        assert 0.2 < loop.time() - started < 2.5
        writer.close()
    # the listener still serves
    conn = await open_mqtt_ws(port)
    conn.writer.close()


# ---------------------------------------------------------------- frames


async def test_text_frame_closes(make_front: FrontFactory) -> None:
    front = await ws_front(make_front)
    conn = await open_mqtt_ws(ws_port(front))
    await wait_for(lambda: len(front.connections) == 1)
    conn.send(ws_client_frame(b"\xc0\x00", opcode=0x1))  # a PINGREQ in a text frame
    assert await read_close(conn.reader) == 1003
    await wait_for(lambda: not front.connections)


async def test_oversized_frame_closes_1009(make_front: FrontFactory) -> None:
    front = await ws_front(make_front, max_frame_size=512)
    conn = await open_mqtt_ws(ws_port(front))
    topic = team_topic()
    conn.send(ws_client_frame(encode_publish(0, False, False, topic, 0, None, b"x" * 400)))  # fits
    conn.send(ws_client_frame(b"\xc0\x00"))
    assert await conn.packet() == b"\xd0\x00"
    conn.send(ws_client_frame(encode_publish(0, False, False, topic, 0, None, b"x" * 600)))
    assert await read_close(conn.reader) == 1009
    await wait_for(lambda: not front.connections)


async def test_packets_split_over_frames_and_batched_in_one(make_front: FrontFactory) -> None:
    front = await ws_front(make_front)
    resp = await http_get(ws_port(front))
    assert resp.status == 101
    conn = MqttOverWs(resp.reader, resp.writer)
    connect_packet = connect(f"{USER}:{uid()}", USER, PASSWORD, v5=True, keepalive=30)
    # CONNECT in three binary messages, each a single frame
    conn.send(*(ws_client_frame(connect_packet[i : i + 7]) for i in (0, 7)), ws_client_frame(connect_packet[14:]))
    connack = await conn.packet()
    assert connack[0] == 0x20 and connack[3] == 0
    topic = team_topic()
    subscribe = encode_subscribe(Subscribe(1, [(topic, 1)]), True)
    # SUBSCRIBE as one fragmented message: binary (fin=0), continuation (fin=0), continuation (fin=1),
    # with a ping frame in the middle (control frames may interleave)
    conn.send(
        ws_client_frame(subscribe[:3], fin=False),
        ws_client_frame(subscribe[3:5], opcode=0x0, fin=False),
        ws_client_frame(b"hi", opcode=0x9),
        ws_client_frame(subscribe[5:], opcode=0x0),
    )
    opcode, payload = await read_frame(conn.reader)
    assert (opcode, payload) == (0xA, b"hi")  # the pong
    assert (await conn.packet())[0] == 0x90  # SUBACK
    # PUBLISH QoS 1, PUBLISH QoS 0 and PINGREQ in one frame
    batch = (
        encode_publish(1, False, False, topic, 7, {}, b"one")
        + encode_publish(0, False, False, topic, 0, {}, b"two")
        + b"\xc0\x00"
    )
    conn.send(ws_client_frame(batch))
    seen = [await conn.packet() for _ in range(4)]
    kinds = sorted(p[0] >> 4 for p in seen)
    assert kinds == [3, 3, 4, 13], seen  # two deliveries, PUBACK, PINGRESP
    payloads = sorted(p[-3:] for p in seen if p[0] >> 4 == 3)
    assert payloads == [b"one", b"two"]
    # a clean close from the client
    conn.send(ws_client_frame(struct.pack("!H", 1000), opcode=0x8))
    assert await read_close(conn.reader) == 1000
    await wait_for(lambda: not front.connections)


async def test_byte_by_byte_pipelined_and_long_frames(make_front: FrontFactory) -> None:
    """The request and the first frames in one write; then frames trickling in one byte per
    read; then frames with 16- and 64-bit lengths holding several packets."""
    front = await ws_front(make_front, max_frame_size=200_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", ws_port(front))
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    ).encode()
    topic = team_topic()
    writer.write(
        request
        + ws_client_frame(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30))
        + ws_client_frame(encode_subscribe(Subscribe(1, [(topic, 0)]), False))
    )
    await reader.readuntil(b"\r\n\r\n")
    conn = MqttOverWs(reader, writer)
    assert (await conn.packet())[:4] == b"\x20\x02\x00\x00"
    assert (await conn.packet())[0] == 0x90
    trickle = ws_client_frame(encode_publish(0, False, False, topic, 0, None, b"slow")) + ws_client_frame(b"\xc0\x00")
    for i in range(len(trickle)):
        writer.write(trickle[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0.002)
    assert (await conn.packet()).endswith(b"slow")
    assert await conn.packet() == b"\xd0\x00"
    medium = encode_publish(0, False, False, topic, 0, None, b"m" * 40_000)
    conn.send(ws_client_frame(medium))  # 16-bit length
    conn.send(ws_client_frame(medium + medium))  # 64-bit length, two packets
    for _ in range(3):
        assert await conn.packet() == medium
    writer.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([bytes((0x82, 0x02)) + b"\xc0\x00"], 1002),  # unmasked client frame
        ([ws_client_frame(b"\xc0\x00", opcode=0x3)], 1002),  # reserved opcode
        ([b"\xc2" + ws_client_frame(b"\xc0\x00")[1:]], 1002),  # RSV1 without an extension
        ([ws_client_frame(b"\xc0\x00", opcode=0x0)], 1002),  # continuation with nothing to continue
        ([ws_client_frame(b"\xc0", fin=False), ws_client_frame(b"\x00", opcode=0x2)], 1002),  # new message mid-message
        ([ws_client_frame(b"a" * 300, fin=False), ws_client_frame(b"a" * 300, opcode=0x0)], 1009),  # message too big
        ([ws_client_frame(b"\xc0\x00"), ws_client_frame(b"x" * 126, opcode=0x9)], 1002),  # control frame > 125 bytes
        ([ws_client_frame(b"\x03\xe8\xff", opcode=0x8)], 1007),  # close reason not UTF-8
    ],
    ids=[
        "unmasked", "opcode", "rsv1", "stray-continuation", "interleaved", "fragments-too-big", "big-ping", "close-utf8"
    ],
)
async def test_hostile_frames(make_front: FrontFactory, frames: list[bytes], code: int) -> None:
    front = await ws_front(make_front, max_frame_size=512)
    conn = await open_mqtt_ws(ws_port(front))
    conn.send(*frames)
    assert await read_close(conn.reader) == code
    await wait_for(lambda: not front.connections)
    again = await open_mqtt_ws(ws_port(front))  # the listener is unaffected
    again.writer.close()


async def test_websockets_library_client_and_compression(make_front: FrontFactory) -> None:
    """The websockets client offers permessage-deflate: declined by default, used with compression: true."""
    for compression in (False, True):
        front = await ws_front(make_front, compression=compression)
        uri = f"ws://127.0.0.1:{ws_port(front)}/"
        async with ws_connect(uri, subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
            assert ws.subprotocol == "mqtt"
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            assert (extensions is not None) == compression
            await ws.send(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30))
            assert await ws.recv() == b"\x20\x02\x00\x00"
            topic = team_topic()
            await ws.send(encode_subscribe(Subscribe(1, [(topic, 0)]), False))
            assert (await ws.recv())[:1] == b"\x90"
            payload = b"z" * 5000
            publish = encode_publish(0, False, False, topic, 0, None, payload)
            await ws.send(publish)
            assert await ws.recv() == publish
            await ws.ping()


# ---------------------------------------------------------------- X-Forwarded-For


async def test_x_forwarded_for(make_front: FrontFactory) -> None:
    trusted = await ws_front(make_front, trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    untrusted = await ws_front(make_front, trusted_proxies=["10.0.0.0/8"])
    cases = [
        (trusted, "198.51.100.1, 203.0.113.7, 10.1.1.1", "203.0.113.7"),  # right-most untrusted
        (trusted, "2001:db8::5", "2001:db8::5"),
        (trusted, "203.0.113.9:4711", "203.0.113.9"),
        (trusted, "garbage, 10.2.2.2", "10.2.2.2"),  # stops at an unparsable hop
        (untrusted, "203.0.113.7", "127.0.0.1"),  # the TCP peer is not a trusted proxy
    ]
    for front, header, expected in cases:
        resp = await http_get(ws_port(front), extra=[("X-Forwarded-For", header)])
        assert resp.status == 101
        conn = MqttOverWs(resp.reader, resp.writer)
        conn.send(ws_client_frame(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30)))
        await conn.packet()
        (client,) = front.connections
        assert client.peer.rsplit(":", 1)[0] == expected, header
        conn.writer.close()
        await wait_for(lambda f=front: not f.connections)


async def test_ws_behind_proxy_protocol(make_front: FrontFactory) -> None:
    """proxy_protocol on a ws listener: the header first, then the HTTP upgrade; the peer is
    the balancer-reported address."""
    front = await ws_front(make_front, proxy_protocol=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", ws_port(front))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        encode_v1(("198.51.100.23", 40000), ("192.0.2.1", 443))
        + f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n".encode()
        + ws_client_frame(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30))
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    conn = MqttOverWs(reader, writer)
    assert (await conn.packet())[:4] == b"\x20\x02\x00\x00"
    (client,) = front.connections
    assert client.peer == "198.51.100.23:40000"
    writer.close()


# ---------------------------------------------------------------- load and back-pressure


async def test_many_concurrent_ws_clients(make_front: FrontFactory) -> None:
    front = await ws_front(make_front)
    port = ws_port(front)
    topic = team_topic()
    clients = await asyncio.gather(*(open_mqtt_ws(port) for _ in range(60)))
    for conn in clients:
        conn.send(ws_client_frame(encode_subscribe(Subscribe(1, [(topic, 0)]), False)))
    for conn in clients:
        assert (await conn.packet())[0] == 0x90
    assert sum(1 for c in front.connections if c.listener == "ws") == 60
    clients[0].send(ws_client_frame(encode_publish(0, False, False, topic, 0, None, b"to all")))
    for conn in clients:
        assert (await conn.packet()).endswith(b"to all")
    for conn in clients:
        conn.writer.close()
    await wait_for(lambda: not front.connections, 5)


async def test_backpressure_slow_ws_subscriber(make_front: FrontFactory) -> None:
    """A ws subscriber that stops reading: the front stops reading the upstream for it
    instead of buffering everything Mosquitto delivers."""
    front = await ws_front(make_front)
    topic = team_topic()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", ws_port(front)))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    slow = MqttOverWs(reader, writer)
    slow.send(ws_client_frame(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30)))
    await slow.packet()
    slow.send(ws_client_frame(encode_subscribe(Subscribe(1, [(topic, 0)]), False)))
    await slow.packet()
    (conn,) = front.connections
    # the subscriber stops reading; a TCP publisher sends 16 MiB
    pub_reader, pub_writer = await asyncio.open_connection("127.0.0.1", front_port(front))
    pub_writer.write(connect(f"{USER}:{uid()}", USER, PASSWORD, keepalive=30))
    await pub_reader.readexactly(4)
    publish = encode_publish(0, False, False, topic, 0, None, b"p" * 8192)
    peak = 0
    for _ in range(128):
        pub_writer.write(publish * 16)
        await pub_writer.drain()
        assert conn.transport is not None
        peak = max(peak, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    assert conn.transport is not None
    peak = max(peak, conn.transport.get_write_buffer_size())
    assert conn.upstream is not None
    assert not conn.upstream.is_reading()  # upstream reading paused for this client
    assert peak < 2 * 1024 * 1024, peak  # bounded: a high-water mark plus one upstream read
    pub_writer.close()
    writer.close()
