"""SIGTERM during a QoS 1 stream from 20 clients: what is lost, the exit code, how long the drain takes.

Issue 13 item 5. A Mosquitto and ``mqtt-front run`` (subprocesses, see bench/harness.py); 20 paho clients
(MQTT 3.1.1 and 5, half each) stream QoS 1 through the front broker, a subscriber on Mosquitto itself counts
what arrived (tests/support/drain_load.py counts, per client, every PUBLISH handed to the socket and every
PUBACK). After ``--seconds`` the front broker gets SIGTERM. Side by side, in the same run, the same clients
straight on Mosquitto stop at that moment and disconnect cleanly: what a stop loses when nothing sits in
between (nothing), and how long the clients take to leave.

    .venv/bin/python -m bench.drain [--trials 3] [--seconds 3] [--clients 20] [--workers 1]

Columns: messages written before the signal, those of them never delivered, messages whose PUBACK a client
got but never delivered (both must be 0), exit codes, time from the signal to the exit (direct: to the last
client gone), median and worst.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import PASSWORD, FrontSetup, Proc, start_front, start_mosquitto
from tests.support.drain_load import Collector, Stream, missing

USER = "project:team0:pub"


@dataclass
class Row:
    name: str
    written: list[int] = field(default_factory=list)
    lost_written: list[int] = field(default_factory=list)
    lost_acked: list[int] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        codes = ",".join(str(c) for c in self.codes)
        return (
            f"| {self.name} | {len(self.written)} | {sum(self.written)} | {sum(self.lost_written)} | "
            f"{sum(self.lost_acked)} | {codes} | {statistics.median(self.seconds):.2f} | {max(self.seconds):.2f} |"
        )


def trial(port: int, mosq_port: int, clients: int, seconds: float, front: Proc | None, row: Row) -> None:
    topic = f"bench/team0/drain-{time.monotonic_ns()}"
    collector = Collector(mosq_port, topic)
    collector.start()
    stream = Stream(port, topic, clients, USER if front is not None else "direct", PASSWORD)
    stream.start()
    try:
        time.sleep(seconds)
        written = stream.written()
        started = time.monotonic()
        if front is not None:
            front.popen.send_signal(signal.SIGTERM)
            row.codes.append(front.popen.wait(60))
        else:
            stream.stop.set()  # the clients stop publishing and leave with a DISCONNECT
            for pub in stream.publishers:
                pub.client.disconnect()
            stream.wait_gone(30)
            row.codes.append(0)
        row.seconds.append(time.monotonic() - started)
        stream.wait_gone(10)
        acked = stream.acked()
        received = collector.settle()
    finally:
        stream.close()
        collector.close()
    row.written.append(sum(map(len, written.values())))
    row.lost_written.append(missing(written, received))
    row.lost_acked.append(missing(acked, received))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="streaming time before the signal")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        workdir = Path(tmp)
        mosquitto, mosq_port = start_mosquitto(workdir)
        direct = Row("Mosquitto directly (clients stop)")
        front_row = Row(f"mqtt-front, SIGTERM (--workers {args.workers})")
        try:
            for _ in range(args.trials):
                trial(mosq_port, mosq_port, args.clients, args.seconds, None, direct)
                setup = FrontSetup(users=[USER], workers=args.workers)
                front, tcp_port, _ = start_front(workdir, mosq_port, setup)
                try:
                    trial(tcp_port, mosq_port, args.clients, args.seconds, front, front_row)
                finally:
                    front.stop()
        finally:
            mosquitto.stop()
    print(f"{args.clients} clients, QoS 1, SIGTERM after {args.seconds:.1f} s of streaming, {args.trials} trials")
    print()
    print("| | trials | written before the signal | of them lost | acked but lost | exit codes | s median | s worst |")
    print("|---|---|---|---|---|---|---|---|")
    print(direct.line())
    print(front_row.line())


if __name__ == "__main__":
    main()
