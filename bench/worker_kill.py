"""A worker SIGKILLed under ``--workers 2`` (issue 13, item 6): the port never stops accepting, and the
clients of the other worker stay connected.

    .venv/bin/python -m bench.worker_kill [--trials 3] [--clients 200]

``--clients`` established clients (spread by the kernel over both workers' SO_REUSEPORT sockets) and a
prober that opens a new MQTT connection every 10 ms through the whole run. One worker is SIGKILLed; then
we count probe connections refused or not answered with CONNACK within 2 s (target: 0), established
clients dropped (those of the killed worker, about half), whether every other client still gets its
PINGRESP, and how long until the parent has a new worker running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import PASSWORD, FrontSetup, children, start_front, start_mosquitto
from bench.loadgen import Conn, Target, open_conn

USER = "project:team0:pub"


async def trial(port: int, parent: int, clients: int) -> dict[str, float]:
    target = Target(port, username=USER, password=PASSWORD)
    held: list[Conn] = [await open_conn(target, f"{USER}:held{i}", keepalive=600) for i in range(clients)]
    probes = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def prober() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with asyncio.timeout(2):
                    conn = await open_conn(target, f"{USER}:probe{i}")
                conn.close()
                probes["ok"] += 1
            except (OSError, ConnectionError, TimeoutError):
                probes["failed"] += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(prober())
    await asyncio.sleep(0.5)
    workers = children(parent)
    victim = workers[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    restarted = float("nan")
    async with asyncio.timeout(10):
        while True:
            now = [w for w in children(parent) if w != victim]
            if len(now) == len(workers):
                restarted = time.monotonic() - killed
                break
            await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)
    stop.set()
    await task
    alive = 0
    for conn in held:
        try:
            conn.writer.write(b"\xc0\x00")  # PINGREQ
            async with asyncio.timeout(2):
                answer = await conn.read_exactly(2)
            alive += answer == b"\xd0\x00"
        except (OSError, ConnectionError, TimeoutError):
            pass
        conn.close()
    return {
        "probes": probes["ok"] + probes["failed"],
        "refused": probes["failed"],
        "dropped": clients - alive,
        "alive": alive,
        "restart_s": restarted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="worker-kill-"))
    mosq, mosq_port = start_mosquitto(workdir)
    results = []
    try:
        for t in range(args.trials):
            front, port, _ = start_front(workdir, mosq_port, FrontSetup(users=[USER], workers=2, name=f"-kill{t}"))
            try:
                result = asyncio.run(trial(port, front.popen.pid, args.clients))
            finally:
                front.stop()
            print(f"#{t + 1}: {result}", flush=True)
            results.append(result)
    finally:
        mosq.stop()
    print(f"\n--workers 2, one worker SIGKILLed, {args.clients} established clients, a new connection every 10 ms\n")
    print("| trial | probe connects | refused | established dropped | still answering | new worker after |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(
            f"| {i} | {r['probes']:.0f} | {r['refused']:.0f} | {r['dropped']:.0f} | {r['alive']:.0f} | "
            f"{r['restart_s'] * 1000:.0f} ms |"
        )
    print(f"\nmedian restart {statistics.median(r['restart_s'] for r in results) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
