"""Paired runs of two fronts that differ in one setting ("off" and "on"): warm-up, alternating runs, the table.

Shared by bench/inventory_relay.py and bench/limits_cost.py: mqtt-front CPU per message (user+sys from /proc
divided by the messages delivered), QoS 0, median [min-max] of each side and of the paired ratios.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.harness import FrontSetup, start_front, start_mosquitto
from bench.platform_cost import PUB_USER, SUB_USER, FrontEnv, Overlaps, spread, throughput

Runs = dict[tuple[str, str], list[float]]

# One topic (the caches' best case) and 2,048 cycled topics (past the per-client caches).
TOPIC_SETS = {
    "1 topic": ["ff/v1/team0/p/pub/out/bench"],
    "2,048 topics": [f"ff/v1/team0/p/pub/out/k{k:04d}" for k in range(2048)],
}


def run_off_on(
    prefix: str, off: FrontSetup, on: FrontSetup, repeat: int, count: int, sets: dict[str, list[str]] = TOPIC_SETS
) -> tuple[Runs, Overlaps]:
    """One Mosquitto, the two fronts (``users`` set to the bench publisher and subscriber), paired runs, all
    stopped again."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    mosq, mosq_port = start_mosquitto(workdir)
    envs: dict[str, FrontEnv] = {}
    try:
        for name, setup in (("off", off), ("on", on)):
            setup.users = [SUB_USER, PUB_USER]
            proc, port, _ = start_front(workdir, mosq_port, setup)
            envs[name] = FrontEnv(name, proc, port, mosq)
        return paired_runs(envs, sets, repeat, count)
    finally:
        for env in envs.values():
            env.proc.stop()
        mosq.stop()


def paired_runs(
    envs: dict[str, FrontEnv], sets: dict[str, list[str]], repeat: int, count: int
) -> tuple[Runs, Overlaps]:
    overlaps = Overlaps()
    for env in envs.values():  # warm up: connections, caches
        for topics in sets.values():
            throughput(env, topics, max(20_000, 4 * len(topics)))
    runs: Runs = {(e, s): [] for e in envs for s in sets}
    for r in range(repeat):
        for set_name, topics in sets.items():
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                overlaps.check(f"#{r + 1} {set_name} {name} (before)")
                res = throughput(envs[name], topics, count)
                overlaps.check(f"#{r + 1} {set_name} {name} (after)")
                runs[(name, set_name)].append(res["front_us_per_msg"])
                print(f"#{r + 1} {set_name} {name}: {res}", flush=True)
    return runs, overlaps


def print_paired(
    runs: Runs, sets: dict[str, list[str]], setting: str, count: int, repeat: int, overlaps: Overlaps
) -> None:
    print(f"\nmqtt-front CPU per message (µs), QoS 0, {count} messages per run, {repeat} paired runs\n")
    print(f"| topics | {setting} off | {setting} on | on / off (paired) |")
    print("|---|---|---|---|")
    for set_name in sets:
        off, on = runs[("off", set_name)], runs[("on", set_name)]
        pairs = spread([b / a for a, b in zip(off, on, strict=True)])
        print(
            f"| {set_name} | {statistics.median(off):.2f} [{min(off):.2f}-{max(off):.2f}] | "
            f"{statistics.median(on):.2f} [{min(on):.2f}-{max(on):.2f}] | "
            f"{pairs['median']:.3f}x [{pairs['min']:.3f}-{pairs['max']:.3f}] |"
        )
    if overlaps.busy:
        print(f"\n({len(overlaps.busy)} of {overlaps.runs} checks found other work running: {overlaps.busy[:3]})")
