"""CPU per message of the front broker over WebSocket vs plain TCP (a quick measurement, not a test).

Starts a Mosquitto and ``mqtt-front run`` (subprocesses) with a tcp and a ws listener,
then, for each transport, one publisher and one subscriber (raw sockets in this
process) move N QoS 0 messages through the front broker in blocks; the front
process's CPU time (utime + stime from /proc) divided by N is the cost per message
(one inbound PUBLISH from the publisher and one delivery to the subscriber).

    .venv/bin/python -m bench.ws_cost [--messages 100000] [--payload 64] [--block 500]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from broker.mqtt.framer import Framer
from broker.mqtt.packets import Connect, Subscribe, encode_connect, encode_publish, encode_subscribe
from tests.support.mosquitto import start_mosquitto
from tests.support.ports import wait_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ws_frame(payload: bytes) -> bytes:
    """A client frame with an all-zero masking key (valid, and free to build here)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: bool) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.framer = Framer()
        self.buf = b""

    @classmethod
    async def open(cls, port: int, ws: bool, client_id: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if ws:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            )
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer, ws)
        client.send(encode_connect(Connect(level=4, clean_start=True, keepalive=600, client_id=client_id)))
        connack = await client.packets(1)
        assert connack[0][3] == 0, connack
        return client

    def send(self, packet: bytes) -> None:
        self.writer.write(ws_frame(packet) if self.ws else packet)

    async def _read_mqtt_bytes(self) -> bytes:
        if not self.ws:
            return await self.reader.read(262144)
        data = self.buf + await self.reader.read(262144)
        out = []
        pos = 0
        while len(data) - pos >= 2:
            n = data[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(data) - pos < 4:
                    break
                (n,) = struct.unpack_from("!H", data, pos + 2)
                head = 4
            elif n == 127:
                if len(data) - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", data, pos + 2)
                head = 10
            if len(data) - pos < head + n:
                break
            out.append(data[pos + head : pos + head + n])
            pos += head + n
        self.buf = data[pos:]
        return b"".join(out)

    async def packets(self, count: int) -> list[bytes]:
        got: list[bytes] = []
        while len(got) < count:
            data = await self._read_mqtt_bytes()
            if not data and not self.buf:
                raise ConnectionError("closed")
            chunk, ends = self.framer.feed(data)
            start = 0
            for end in ends:
                got.append(chunk[start:end])
                start = end
        return got

    async def count(self, count: int, timeout: float) -> int:
        got = 0
        try:
            async with asyncio.timeout(timeout):
                while got < count:
                    data = await self._read_mqtt_bytes()
                    _, ends = self.framer.feed(data)
                    got += len(ends)
        except TimeoutError:
            pass
        return got


async def measure(port: int, ws: bool, messages: int, payload: int, block: int, pid: int) -> tuple[float, int]:
    tag = "ws" if ws else "tcp"
    sub = await Client.open(port, ws, f"bench-sub-{tag}")
    sub.send(encode_subscribe(Subscribe(1, [(f"bench/{tag}", 0)]), False))
    await sub.packets(1)
    pub = await Client.open(port, ws, f"bench-pub-{tag}")
    publish = encode_publish(0, False, False, f"bench/{tag}", 0, None, b"x" * payload)
    # warm up
    for _ in range(block):
        pub.send(publish)
    await sub.count(block, 5)
    received = 0
    before = cpu_seconds(pid)
    for _ in range(messages // block):
        for _ in range(block):
            pub.send(publish)  # one MQTT packet per WebSocket frame, as clients write them
        await pub.writer.drain()
        received += await sub.count(block, 5)
    used = cpu_seconds(pid) - before
    pub.writer.close()
    sub.writer.close()
    return used, received


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        mosquitto = start_mosquitto(directory, "max_queued_messages 100000\n")
        tcp_port, ws_port = free_port(), free_port()
        config = {
            "listeners": [
                {"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{tcp_port}"},
                {"name": "ws", "type": "ws", "bind": f"127.0.0.1:{ws_port}"},
            ],
            "upstream": {"url": mosquitto.url},
            "auth": {"allow_anonymous": True},
            "acl": {"preset": "none", "rules": [{"who": "any", "effect": "allow", "action": "both", "pattern": "#"}]},
            "logging": {"level": "warning"},
        }
        (directory / "front.yaml").write_text(yaml.safe_dump(config))
        front = subprocess.Popen([sys.executable, "-m", "broker.cli", "run", "-c", str(directory / "front.yaml")])
        try:
            wait_port(tcp_port)
            wait_port(ws_port)
            time.sleep(0.3)
            results = {}
            for ws in (False, True, False, True):
                used, received = await measure(
                    ws_port if ws else tcp_port, ws, args.messages, args.payload, args.block, front.pid
                )
                results.setdefault("ws" if ws else "tcp", []).append((used, received))
            for name, runs in results.items():
                per = [used / args.messages * 1e6 for used, _ in runs]
                lost = [args.messages - received for _, received in runs]
                print(f"{name:4s} {min(per):6.2f} us/message (runs: {', '.join(f'{p:.2f}' for p in per)}; lost {lost})")
        finally:
            front.terminate()
            front.wait(10)
            mosquitto.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--block", type=int, default=500)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
