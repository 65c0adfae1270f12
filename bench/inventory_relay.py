"""The topic inventory's cost per relayed message, process-wide: two fronts side by side, identical but
for ``inventory: {}``, the same clients and topics, QoS 0, runs alternating.

    .venv/bin/python -m bench.inventory_relay [--repeat 5] [--count 300000]

mqtt-front CPU per message (user+sys from /proc, divided by the messages delivered), median [min-max]
of ``--repeat`` paired runs, for one topic and for 2,048 topics cycled. Target: under 3 %.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.harness import FrontSetup, start_front, start_mosquitto
from bench.platform_cost import PUB_USER, SUB_USER, FrontEnv, Overlaps, spread, throughput

SETS = {
    "1 topic": ["ff/v1/team0/p/pub/out/bench"],
    "2,048 topics": [f"ff/v1/team0/p/pub/out/k{k:04d}" for k in range(2048)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", type=int, default=300_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="inventory-relay-"))
    mosq, mosq_port = start_mosquitto(workdir)
    overlaps = Overlaps()
    envs: dict[str, FrontEnv] = {}
    try:
        for name, on in (("off", False), ("on", True)):
            proc, port, _ = start_front(workdir, mosq_port, FrontSetup(users=[SUB_USER, PUB_USER], inventory=on))
            envs[name] = FrontEnv(name, proc, port, mosq)
        for env in envs.values():  # warm up: connections, caches, the inventory's entries
            for topics in SETS.values():
                throughput(env, topics, max(20_000, 4 * len(topics)))
        runs: dict[tuple[str, str], list[float]] = {(e, s): [] for e in envs for s in SETS}
        for r in range(args.repeat):
            for set_name, topics in SETS.items():
                for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    overlaps.check(f"#{r + 1} {set_name} {name} (before)")
                    res = throughput(envs[name], topics, args.count)
                    overlaps.check(f"#{r + 1} {set_name} {name} (after)")
                    runs[(name, set_name)].append(res["front_us_per_msg"])
    finally:
        for env in envs.values():
            env.proc.stop()
        mosq.stop()
    print(f"\nmqtt-front CPU per message (µs), QoS 0, {args.count} messages per run, {args.repeat} paired runs\n")
    print("| topics | inventory off | inventory on | on / off (paired) |")
    print("|---|---|---|---|")
    for set_name in SETS:
        off, on = runs[("off", set_name)], runs[("on", set_name)]
        pairs = spread([b / a for a, b in zip(off, on, strict=True)])
        print(
            f"| {set_name} | {statistics.median(off):.2f} [{min(off):.2f}-{max(off):.2f}] | "
            f"{statistics.median(on):.2f} [{min(on):.2f}-{max(on):.2f}] | "
            f"{pairs['median']:.3f}x [{pairs['min']:.3f}-{pairs['max']:.3f}] |"
        )
    if overlaps.busy:
        print(f"\n({len(overlaps.busy)} of {overlaps.runs} checks found other work running: {overlaps.busy[:3]})")


if __name__ == "__main__":
    main()
