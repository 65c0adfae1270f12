"""One tenant cannot hurt another (issue 13): another team's p99 latency while one client attacks, through
mqtt-front (its default limits) and against the same Mosquitto directly, in the same run.

    .venv/bin/python -m bench.fairness [--seconds 5] [--repeat 3] [--only storm]

A probe (team1: one publisher, one subscriber, 200 messages/s of QoS 0) measures publish-to-delivery latency,
first alone (idle), then during each attack:

- ``connect_flood``: 5 connections at a time, each sending a 1 MB CONNECT packed with ~200,000 empty User
  Properties and no credentials, over and over (the finding: 0.5 s of event loop per CONNECT);
- ``connect_flood_close``: the same CONNECTs, each connection reset by the attacker right after its
  CONNECT is handed to the kernel, without waiting for any answer: a connection churn that the hold of
  refused connections (linger.Tarpit) cannot slow down. ``limits.connect_rate`` is the knob for it, so the
  run includes mqtt-front with a connect rate of 20/s per source. The attackers connect from 127.0.0.2,
  another address than the probe's, as a client elsewhere would;
- ``storm``: one client of team0 publishing QoS 0 as fast as it can (the finding: x14);
- ``connect_burst``: 2,000 connections at once, half of them never sending CONNECT (the finding: x83).

Target: p99 during the attack within 3x of idle p99. Also reported: the storm with ``publish_rate`` off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import PASSWORD, FrontSetup, Proc, start_front, start_mosquitto
from bench.loadgen import HOST, Target, open_conn, publish_packet, subscribe
from broker.mqtt.packets import Connect, encode_connect
from broker.mqtt.properties import Prop

CTX = multiprocessing.get_context("spawn")
CONNECT_RATE = "mqtt-front, connect_rate 20/s"
ONLY = {"mqtt-front, publish_rate off": [None, "storm"], CONNECT_RATE: [None, "connect_flood_close"]}
PROBE_USER, STORM_USER, BURST_USER = "project:team1:probe", "project:team0:storm", "project:team2:burst"
PROBE_TOPIC, STORM_TOPIC = "ff/v1/team1/c/probe", "ff/v1/team0/c/storm"
ATTACKER = "127.0.0.2"  # where the connect floods come from (the probe connects from 127.0.0.1)
ATTACKS = ("connect_flood", "connect_flood_close", "storm", "connect_burst")


# ------------------------------------------------------------------ the probe (another team)


def run_probe(target: Target, seconds: float, result: Any) -> None:
    result.put(asyncio.run(_probe(target, seconds)))


async def _probe(target: Target, seconds: float) -> list[float]:
    sub = await open_conn(target, f"{PROBE_USER}:sub")
    await subscribe(sub, PROBE_TOPIC, 0)
    pub = await open_conn(target, f"{PROBE_USER}:pub")
    latencies: list[float] = []
    sent = 0

    size = len(publish_packet(PROBE_TOPIC, bytes(8)))  # every probe message has this size

    async def receive() -> None:
        buf = b""
        while True:
            buf += await sub.read()
            now = time.perf_counter()
            whole = len(buf) - len(buf) % size
            for end in range(size, whole + 1, size):
                latencies.append(now - struct.unpack(">d", buf[end - 8 : end])[0])
            buf = buf[whole:]

    reader = asyncio.ensure_future(receive())
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pub.writer.write(pub.frame(publish_packet(PROBE_TOPIC, struct.pack(">d", time.perf_counter()))))
        sent += 1
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)
    reader.cancel()
    pub.close()
    sub.close()
    lost = sent - len(latencies)
    return [*latencies, *([10.0] * lost)]  # a lost probe counts as 10 s: it must show


# ------------------------------------------------------------------ attacks


def run_attack(name: str, target: Target, seconds: float, ready: Any) -> None:
    asyncio.run(ATTACK_FUNCS[name](target, seconds, ready))


async def _connect_flood_close(target: Target, seconds: float, ready: Any) -> None:
    await _connect_flood(target, seconds, ready, wait=False)


async def _connect_flood(target: Target, seconds: float, ready: Any, wait: bool = True) -> None:
    props: dict[int, Any] = {Prop.USER_PROPERTY: [("", "")] * 200_000}
    packet = encode_connect(Connect(level=5, clean_start=True, keepalive=60, client_id="flood", properties=props))
    ready.set()
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(HOST, target.port, local_addr=(ATTACKER, 0))
                writer.write(packet)
                if wait:
                    async with asyncio.timeout(5):
                        while await reader.read(65536):
                            pass
                else:
                    await asyncio.sleep(0)  # the CONNECT goes to the kernel, then the connection is reset
                    writer.transport.abort()
                writer.close()
            except (OSError, TimeoutError):
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(5)))


async def _storm(target: Target, seconds: float, ready: Any) -> None:
    storm_target = Target(target.port, username=STORM_USER if target.username else None, password=target.password)
    conn = await open_conn(storm_target, f"{STORM_USER}:1")
    batch = publish_packet(STORM_TOPIC, b"s" * 64) * 500
    ready.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.writer.write(batch)
        await conn.writer.drain()
    conn.close()


async def _connect_burst(target: Target, seconds: float, ready: Any) -> None:
    burst_target = Target(target.port, username=BURST_USER if target.username else None, password=target.password)
    silent: list[asyncio.StreamWriter] = []
    conns: list[Any] = []
    ready.set()

    async def quiet() -> None:
        try:
            _, writer = await asyncio.open_connection(HOST, target.port)
            silent.append(writer)
        except OSError:
            pass

    async def login(i: int) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            conns.append(await open_conn(burst_target, f"{BURST_USER}:{i}"))

    await asyncio.gather(*(quiet() for _ in range(1000)), *(login(i) for i in range(1000)))
    await asyncio.sleep(max(0.0, seconds - 1))
    for writer in silent:
        writer.close()
    for conn in conns:
        conn.close()


ATTACK_FUNCS = {
    "connect_flood": _connect_flood,
    "connect_flood_close": _connect_flood_close,
    "storm": _storm,
    "connect_burst": _connect_burst,
}


# ------------------------------------------------------------------ runs


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 2 else max(values)


def measure(target: Target, attack: str | None, seconds: float) -> float:
    """The probe's p99 latency (ms) during ``attack`` (None: idle)."""
    result = CTX.Queue()
    attacker = None
    if attack is not None:
        ready = CTX.Event()
        attacker = CTX.Process(target=run_attack, args=(attack, target, seconds + 1.5, ready))
        attacker.start()
        ready.wait(10)
        time.sleep(0.5)  # the attack is under way
    probe = CTX.Process(target=run_probe, args=(target, seconds, result))
    probe.start()
    latencies = result.get(timeout=seconds + 60)
    probe.join()
    if attacker is not None:
        attacker.join(timeout=30)
        if attacker.is_alive():
            attacker.kill()
    time.sleep(1.0)  # let both sides settle before the next run
    return p99(latencies) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=ATTACKS, action="append")
    args = parser.parse_args()
    attacks = args.only or list(ATTACKS)
    workdir = Path(tempfile.mkdtemp(prefix="fairness-"))
    users = [PROBE_USER, STORM_USER, BURST_USER]
    mosq, mosq_port = start_mosquitto(workdir)
    fronts: dict[str, Proc] = {}
    targets: dict[str, Target] = {"mosquitto": Target(mosq_port)}
    try:
        # "mqtt-front": the product's default limits (the bench harness turns publish_rate off unless told).
        defaults = {"publish_rate": {"client": {"messages": 10_000, "messages_burst": 20_000}}}
        rate = {**defaults, "connect_rate": {"per_source": 20, "burst": 40}}
        variants = (("mqtt-front", defaults), ("mqtt-front, publish_rate off", {}), (CONNECT_RATE, rate))
        for name, limits in variants:
            suffix = "-fair-rate" if name == CONNECT_RATE else "-fair" if limits else "-fair-off"
            setup = FrontSetup(users=users, limits=limits, name=suffix)
            proc, port, _ = start_front(workdir, mosq_port, setup)
            fronts[name] = proc
            targets[name] = Target(port, username=PROBE_USER, password=PASSWORD)
        rows: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeat):
            for name, target in targets.items():
                runs = ONLY.get(name, [None, *attacks])
                for attack in runs:
                    if attack is not None and attack not in attacks:
                        continue
                    value = measure(target, attack, args.seconds)
                    rows.setdefault((name, attack or "idle"), []).append(value)
                    print(f"#{r + 1} {name:<30} {attack or 'idle':<14} p99 {value:8.2f} ms", flush=True)
    finally:
        for proc in fronts.values():
            proc.stop()
        mosq.stop()
    print(f"\nAnother team's p99 latency (ms), median of {args.repeat} runs of {args.seconds:g} s; x = of idle\n")
    print("| target | idle | " + " | ".join(attacks) + " |")
    print("|---|---|" + "---|" * len(attacks))
    for name in targets:
        idle = statistics.median(rows[(name, "idle")])
        cells = []
        for attack in attacks:
            values = rows.get((name, attack))
            if not values:
                cells.append("")
                continue
            value = statistics.median(values)
            cells.append(f"{value:.2f} (x{value / idle:.1f})")
        print(f"| {name} | {idle:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
