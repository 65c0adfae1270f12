"""The topic inventory's cost per relayed message, process-wide: two fronts side by side, identical but
for ``inventory: {}``, the same clients and topics, QoS 0, runs alternating.

    .venv/bin/python -m bench.inventory_relay [--repeat 5] [--count 300000]

mqtt-front CPU per message (user+sys from /proc, divided by the messages delivered), median [min-max]
of ``--repeat`` paired runs, for one topic and for 2,048 topics cycled. Target: under 3 %.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.harness import FrontSetup, start_front, start_mosquitto
from bench.paired import paired_runs, print_paired
from bench.platform_cost import PUB_USER, SUB_USER, FrontEnv

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
    envs: dict[str, FrontEnv] = {}
    try:
        for name, on in (("off", False), ("on", True)):
            proc, port, _ = start_front(workdir, mosq_port, FrontSetup(users=[SUB_USER, PUB_USER], inventory=on))
            envs[name] = FrontEnv(name, proc, port, mosq)
        runs, overlaps = paired_runs(envs, SETS, args.repeat, args.count)
    finally:
        for env in envs.values():
            env.proc.stop()
        mosq.stop()
    print_paired(runs, SETS, "inventory", args.count, args.repeat, overlaps)


if __name__ == "__main__":
    main()
