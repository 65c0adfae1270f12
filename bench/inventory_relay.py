"""The topic inventory's cost per relayed message, process-wide: two fronts side by side, identical but
for ``inventory: {}``, the same clients and topics, QoS 0, runs alternating.

    .venv/bin/python -m bench.inventory_relay [--repeat 5] [--count 300000]

mqtt-front CPU per message (user+sys from /proc, divided by the messages delivered), median [min-max]
of ``--repeat`` paired runs, for one topic and for 2,048 topics cycled. Target: under 3 %.
"""

from __future__ import annotations

import argparse

from bench.harness import FrontSetup
from bench.paired import TOPIC_SETS, print_paired, run_off_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", type=int, default=300_000)
    args = parser.parse_args()
    runs, overlaps = run_off_on(
        "inventory-relay-", FrontSetup(inventory=False), FrontSetup(inventory=True), args.repeat, args.count
    )
    print_paired(runs, TOPIC_SETS, "inventory", args.count, args.repeat, overlaps)


if __name__ == "__main__":
    main()
