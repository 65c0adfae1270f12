"""Replicas behind HAProxy (issue 14, item 4): one mqtt-front replica against two, and what a replica's death
costs its clients. Every process is real and separate: one Mosquitto, mqtt-front replicas (``mqtt-front run``,
``proxy_protocol: true``, /readyz for HAProxy's checks), HAProxy (TCP mode, ``send-proxy-v2``, roundrobin,
checks every 300 ms, down after 2 failed: tests/support/haproxy.py) and load generators in processes of
their own, so that the CPU seconds read from /proc are each process's own.

    .venv/bin/python -m bench.replicas [throughput] [reconnect] [--quick] [--json F]

1. **throughput**: ``--pairs`` publisher/subscriber pairs (MQTT 3.1.1, 64-byte payloads, a topic per pair,
   bench.loadgen's pre-encoded raw clients, one process each) relay QoS 0 (and QoS 1, a window of 200 in
   flight) (a) through HAProxy to one replica, (b) through HAProxy to two replicas, HAProxy spreading the
   connections, both replicas in front of the one Mosquitto, and (c) straight into Mosquitto, the reference.
   Messages/s end to end (first publish to last delivery) and CPU µs per delivered message of each
   replica, of HAProxy and of Mosquitto, plus how many of the 2 cores the whole machine kept busy.
2. **reconnect**: ``--clients`` persistent MQTT 5 clients (clean start false, session expiry, one QoS 1
   subscription each; bench/replica_clients.py, two processes) connected through HAProxy, spread over two
   replicas; one replica SIGKILLed. For each client of the dead replica: from the kill to its reconnect
   through HAProxy (CONNACK), its subscription back (session present, or subscribed again), and a probe
   published to its topic delivered back to it. p50/p99/max, attempts, the time HAProxy took to mark the
   replica DOWN, and a final probe of every client. Twice: with a password of their own per client (the
   surviving replica checks 500 bcrypt hashes it never saw: the bcrypt floor is given) and with one
   shared identity (its verdict cached: the mechanics alone).

Mosquitto 2.0.11 listens with a fixed backlog of 100 (docs/benchmarks.md, issue 11): SYNs beyond it are
dropped and retried after 1 s. When a C compiler is there, Mosquitto runs with a tiny LD_PRELOAD shim that
raises its listen() backlog to ``--mosquitto-backlog`` (default 1024, EMQX's; 0 keeps Mosquitto's own), and
TcpExt ListenOverflows are counted during each reconnect. The figures only mean something on a quiet
machine: each run checks for other tests or benchmarks (``pgrep``) and reports overlaps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.__main__ import bcrypt_seconds, machine
from bench.harness import CLK_TCK, PASSWORD, FrontSetup, Proc, cpu_seconds, start_front, start_mosquitto
from bench.loadgen import Target
from bench.platform_cost import Overlaps, _join, _procs, fmt, listen_overflows, spread
from bench.replica_clients import ATTEMPT_TIMEOUT, BACKOFF, FIRST_JITTER, run_persistent_clients
from tests.support.haproxy import Backend, HAProxy, start_haproxy
from tests.support.ports import free_port

CTX = multiprocessing.get_context("spawn")
SUB_USER, PUB_USER = "project:team0:sub", "project:team0:pub"
SHARED_USER = "project:team0:fleet"
MAX_CLIENTS = 2000
FLEET = [f"project:team0:d{i}" for i in range(MAX_CLIENTS)]
ALL_USERS = [SUB_USER, PUB_USER, SHARED_USER, *FLEET]  # one users file for every replica of the run
SOURCES = 100  # loopback source addresses the reconnect clients are spread over (127.0.1.1-100)
OVERLAPS = Overlaps()
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
int listen(int fd, int backlog) {
    static int (*real)(int, int);
    if (!real) real = (int (*)(int, int))dlsym(RTLD_NEXT, "listen");
    return real(fd, backlog < BACKLOG ? BACKLOG : backlog);
}
"""


def log(msg: str) -> None:
    print(f"[replicas] {msg}", flush=True)


# ------------------------------------------------------------------ the processes


@dataclass
class Replica:
    name: str
    proc: Proc
    port: int
    metrics_port: int

    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port, self.metrics_port)


def start_replica(workdir: Path, mosq_port: int, name: str) -> Replica:
    metrics_port = free_port()
    setup = FrontSetup(users=ALL_USERS, name=f"-{name}", listener={"proxy_protocol": True},
                       sections={"metrics": {"bind": f"127.0.0.1:{metrics_port}"}})
    proc, port, _ = start_front(workdir, mosq_port, setup)
    return Replica(name, proc, port, metrics_port)


def backlog_env(workdir: Path, backlog: int) -> dict[str, str] | None:
    """The environment that makes Mosquitto listen with ``backlog`` (an LD_PRELOAD shim), or None."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if backlog <= 0 or compiler is None:
        return None
    source, library = workdir / "backlog.c", workdir / "libbacklog.so"
    source.write_text(SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", f"-DBACKLOG={backlog}", "-o", str(library), str(source),
                    "-ldl"], check=True, capture_output=True)
    os.chmod(library, 0o755)
    return {**os.environ, "LD_PRELOAD": str(library)}


def listen_backlog(port: int) -> int:
    """The accept queue size of the listener on ``port`` (``ss``'s Send-Q), 0 when not found."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    return int(out[2]) if len(out) > 2 else 0


def haproxy_cpu(ha: HAProxy) -> float:
    return cpu_seconds(ha.proc.pid)


class BusySampler:
    """How many cores the whole machine kept busy (not idle, not iowait; /proc/stat) in a window of time.

    Sampled every 10 ms by a thread, so that the window can be the messages' own (first publish to last
    delivery), known only afterwards, without the load generators' start-up around it.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open("/proc/stat") as f:
            while not self.stop.is_set():
                f.seek(0)
                ticks = [int(x) for x in f.readline().split()[1:]]
                self.samples.append((time.monotonic(), (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK))
                time.sleep(0.01)

    def cores(self, start: float, end: float) -> float:
        self.stop.set()
        self.thread.join()
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# ------------------------------------------------------------------ 1. throughput


def relay_once(path: str, port: int, login: bool, qos: int, count: int, pairs: int, replicas: list[Replica],
               ha: HAProxy | None, mosq: Proc) -> dict[str, Any]:
    per = count // pairs
    topics = [f"bench/team0/pair{k:02d}" for k in range(pairs)]
    size = len(loadgen.publish_packet(topics[0], b"x" * 64, qos, 1 if qos else 0))

    def target(user: str) -> Target:
        return Target(port, username=user, password=PASSWORD) if login else Target(port)

    ready = [CTX.Event() for _ in range(pairs)]
    results = CTX.Queue()
    tag = f"{time.monotonic_ns()}"
    subs = _procs(*[(loadgen.run_subscriber, (target(SUB_USER), f"{SUB_USER}:{tag}-{k}", topics[k], qos, size, per,
                                              ready[k], results, 60.0)) for k in range(pairs)])
    for event in ready:
        if not event.wait(30):
            raise RuntimeError("a subscriber did not get ready")
    spread_subs = ha.sessions() if ha is not None else {}

    def cpu() -> dict[str, float]:
        now = {r.name: r.proc.cpu() for r in replicas}
        now["haproxy"] = haproxy_cpu(ha) if ha is not None else 0.0
        now["mosquitto"] = mosq.cpu()
        return now

    before = cpu()
    sampler = BusySampler()
    pubs = _procs(*[(loadgen.run_publisher, (target(PUB_USER), f"{PUB_USER}:{tag}-{k}", [topics[k]], qos, per, 200,
                                             results)) for k in range(pairs)])
    got = [results.get(timeout=120) for _ in range(2 * pairs)]
    after = cpu()
    _join(subs + pubs)
    received = sum(r["received"] for r in got if "received" in r)
    start = min(r["start"] for r in got if "start" in r)
    last = max(r["last"] for r in got if "received" in r)
    seconds = max(1e-9, last - start)
    out: dict[str, Any] = {"path": path, "qos": qos, "sent": per * pairs, "received": received,
                           "msgs_per_s": received / seconds, "subscribers_per_replica": spread_subs,
                           "machine_busy_cores": sampler.cores(start, last)}
    for key in before:
        out[f"{key}_us_per_msg"] = (after[key] - before[key]) / max(1, received) * 1e6
    out["replicas_us_per_msg"] = sum(out[f"{r.name}_us_per_msg"] for r in replicas)
    return out


def run_throughput(workdir: Path, mosq: Proc, mosq_port: int, repeat: int, count: int, pairs: int) -> dict[str, Any]:
    a, b = start_replica(workdir, mosq_port, "a"), start_replica(workdir, mosq_port, "b")
    one = start_haproxy(workdir / "haproxy-one", [a.backend()])
    two = start_haproxy(workdir / "haproxy-two", [a.backend(), b.backend()])
    paths: list[tuple[str, int, bool, HAProxy | None]] = [
        ("Mosquitto directly", mosq_port, False, None),
        ("HAProxy, 1 replica", one.port, True, one),
        ("HAProxy, 2 replicas", two.port, True, two),
    ]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(p[0], q): [] for p in paths for q in (0, 1)}
    try:
        for name, port, login, ha in paths:  # warm up: connections, the replicas' caches
            relay_once(name, port, login, 0, max(4000, count // 10), pairs, [a, b], ha, mosq)
        for r in range(repeat):
            for name, port, login, ha in paths if r % 2 == 0 else paths[::-1]:
                for qos in (0, 1):
                    n = count if qos == 0 else count // 4
                    OVERLAPS.check(f"throughput #{r + 1} {name} QoS {qos} (before)")
                    res = relay_once(name, port, login, qos, n, pairs, [a, b], ha, mosq)
                    OVERLAPS.check(f"throughput #{r + 1} {name} QoS {qos} (after)")
                    log(f"throughput #{r + 1} {name} QoS {qos}: " + json.dumps(res, default=str))
                    runs[(name, qos)].append(res)
    finally:
        one.stop()
        two.stop()
        a.proc.stop()
        b.proc.stop()
    keys = ("msgs_per_s", "a_us_per_msg", "b_us_per_msg", "replicas_us_per_msg", "haproxy_us_per_msg",
            "mosquitto_us_per_msg", "machine_busy_cores")
    summary = {f"{name} QoS {qos}": {k: spread([x[k] for x in rs]) for k in keys} | {
        "lost": sum(x["sent"] - x["received"] for x in rs), "runs": len(rs)}
        for (name, qos), rs in runs.items()}
    return {"pairs": pairs, "count": count, "repeat": repeat, "summary": summary,
            "runs": {f"{n} QoS {q}": rs for (n, q), rs in runs.items()}}


# ------------------------------------------------------------------ 2. reconnect after a replica's death


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def reconnect_trial(workdir: Path, mosq: Proc, mosq_port: int, clients: int, identities: str,
                    trial: int) -> dict[str, Any]:
    a, b = start_replica(workdir, mosq_port, f"a{trial}"), start_replica(workdir, mosq_port, f"b{trial}")
    ha = start_haproxy(workdir / f"haproxy-rc{trial}", [a.backend(), b.backend()], timeout_client_s=900)
    specs = []
    for i in range(clients):
        user = FLEET[i] if identities == "distinct" else SHARED_USER
        cid = f"{user}:t{trial}" if identities == "distinct" else f"{user}:{i}-t{trial}"
        specs.append((cid, user, PASSWORD, f"bench/team0/rc{trial}/{i}"))
    gens_n = 2
    killed, check, release = CTX.Event(), CTX.Event(), CTX.Event()
    outs = [CTX.Queue() for _ in range(gens_n)]
    gens = _procs(*[(run_persistent_clients, (ha.port, specs[k::gens_n], SOURCES, 100, killed, check, release,
                                              outs[k])) for k in range(gens_n)])
    try:
        up = [q.get(timeout=600) for q in outs]
        held = ha.sessions()
        log(f"reconnect #{trial} {identities}: {up}, HAProxy sessions {held}")
        OVERLAPS.check(f"reconnect #{trial} {identities} (before)")
        cpu0 = {"replica": b.proc.cpu(), "haproxy": haproxy_cpu(ha), "mosquitto": mosq.cpu()}
        overflows = listen_overflows()
        victims = [*a.proc.pids(), a.proc.popen.pid]
        kill = time.monotonic()
        for pid in dict.fromkeys(victims):
            os.kill(pid, signal.SIGKILL)
        killed.set()
        down = float("nan")
        reports: list[dict[str, Any] | None] = [None] * gens_n
        deadline = kill + 300
        while any(r is None for r in reports) and time.monotonic() < deadline:
            if down != down and ha.server_state().get(a.name, "").startswith("DOWN"):
                down = time.monotonic() - kill
            for k, q in enumerate(outs):
                if reports[k] is None and not q.empty():
                    reports[k] = q.get()
            time.sleep(0.02)
        if any(r is None for r in reports):
            raise RuntimeError("the clients did not report their reconnects within 300 s")
        done = [r for r in reports if r is not None]
        cpu1 = {"replica": b.proc.cpu(), "haproxy": haproxy_cpu(ha), "mosquitto": mosq.cpu()}
        overflows = listen_overflows() - overflows
        OVERLAPS.check(f"reconnect #{trial} {identities} (after)")
        check.set()
        final = [q.get(timeout=60) for q in outs]
        release.set()
    finally:
        killed.set()
        check.set()
        release.set()
        _join(gens)
        ha.stop()
        b.proc.stop()
        a.proc.stop()
    episodes = [e for r in done for e in r["episodes"]]
    ready = [e[7] - kill for e in episodes if e[7]]
    failures: dict[str, int] = {}
    for e in episodes:
        for kind, n in e[3].items():
            failures[kind] = failures.get(kind, 0) + n
    res = {
        "identities": identities,
        "clients": sum(u["connected"] for u in up),
        "initial_failed": sum(u["failed"] for u in up),
        "initial_seconds": max(u["seconds"] for u in up),
        "held": held,
        "moved": len(episodes),
        "not_back": sum(1 for e in episodes if not e[7]),
        "haproxy_down_s": down,
        "lost_s": percentile([e[1] - kill for e in episodes], 0.99),
        "connack_p50_s": percentile([e[4] - kill for e in episodes if e[4]], 0.5),
        "ready_p50_s": percentile(ready, 0.5),
        "ready_p99_s": percentile(ready, 0.99),
        "ready_max_s": max(ready) if ready else float("nan"),
        "first_attempt_ok": sum(1 for e in episodes if e[2] == 1 and e[7]),
        "attempts_max": max((e[2] for e in episodes), default=0),
        "failures": failures,
        "session_present": sum(1 for e in episodes if e[5]),
        "resubscribed": sum(1 for e in episodes if e[6]),
        "answering": sum(f["answering"] for f in final),
        "silent": sum(f["silent"] for f in final),
        "replica_cpu_s": cpu1["replica"] - cpu0["replica"],
        "haproxy_cpu_s": cpu1["haproxy"] - cpu0["haproxy"],
        "mosquitto_cpu_s": cpu1["mosquitto"] - cpu0["mosquitto"],
        "clients_cpu_s": sum(r["cpu"] for r in done),
        "listen_overflows": overflows,
    }
    if identities == "distinct":
        res["bcrypt_floor_s"] = len(episodes) * bcrypt_seconds() / min(2, os.cpu_count() or 1)
    return res


def run_reconnect(workdir: Path, mosq: Proc, mosq_port: int, clients: int, trials: int,
                  variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"clients": clients, "trials": []}
    for t in range(trials):
        for identities in variants if t % 2 == 0 else variants[::-1]:
            res = reconnect_trial(workdir, mosq, mosq_port, clients, identities, len(out["trials"]))
            log(f"reconnect {identities} #{t + 1}: " + json.dumps(res))
            out["trials"].append(res)
    return out


# ------------------------------------------------------------------ the report


def report(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}; load average before the run {results['load_before']}.",
             f"Mosquitto listen backlog: {results['mosquitto_backlog']}.", ""]
    if "throughput" in results:
        t = results["throughput"]
        lines += [f"Throughput: {t['pairs']} publisher/subscriber pairs, {t['count']:,} QoS 0 / {t['count'] // 4:,} "
                  f"QoS 1 messages of 64 B per run, median [min-max] of {t['repeat']} runs; CPU in µs per delivered "
                  "message.", "",
                  "| path | QoS | msg/s | replica a | replica b | replicas together | HAProxy | Mosquitto | "
                  "machine busy (of 2 cores) | lost |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in t["summary"].items():
            path, qos = name.rsplit(" QoS ", 1)
            direct = path.startswith("Mosquitto")
            cols = [fmt(s["msgs_per_s"], 0)]
            cols += ["", "", "", ""] if direct else [fmt(s[k]) for k in ("a_us_per_msg", "b_us_per_msg",
                                                                        "replicas_us_per_msg", "haproxy_us_per_msg")]
            cols += [fmt(s["mosquitto_us_per_msg"]), fmt(s["machine_busy_cores"]), str(s["lost"])]
            lines.append(f"| {path} | {qos} | " + " | ".join(cols) + " |")
        lines.append("")
    if "reconnect" in results:
        r = results["reconnect"]
        lines += [f"Reconnect: {r['clients']:,} persistent MQTT 5 clients through HAProxy over two replicas, one "
                  "SIGKILLed; seconds from the kill. Reconnect policy: first attempt after "
                  f"{FIRST_JITTER[0]:.2f}-{FIRST_JITTER[1]:.2f} s, then {BACKOFF[0]}-{BACKOFF[1]} s uniform after "
                  f"each failed attempt, {ATTEMPT_TIMEOUT:.0f} s per attempt.", "",
                  "| identities | clients moved | HAProxy marks it DOWN | CONNACK p50 | back p50 | p99 "
                  "| max (all back) | first attempt ok | failed attempts | session present | all answering after "
                  "| survivor CPU s | listen overflows | bcrypt floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["trials"]:
            failed = ", ".join(f"{k} x{n}" for k, n in sorted(x["failures"].items())) or "none"
            floor = f"{x['bcrypt_floor_s']:.2f}" if "bcrypt_floor_s" in x else ""
            lines.append(
                f"| {x['identities']} | {x['moved']} of {x['clients']} | {x['haproxy_down_s']:.2f} | "
                f"{x['connack_p50_s']:.2f} | {x['ready_p50_s']:.2f} | {x['ready_p99_s']:.2f} | "
                f"{x['ready_max_s']:.2f} | {x['first_attempt_ok']} | {failed} | {x['session_present']} | "
                f"{x['answering']}/{x['clients']} | {x['replica_cpu_s']:.2f} | {x['listen_overflows']} | {floor} |")
        for variant in dict.fromkeys(x["identities"] for x in r["trials"]):
            rows = [x for x in r["trials"] if x["identities"] == variant]
            if len(rows) > 1:
                lines.append(f"\n{variant}: all back after {fmt(spread([x['ready_max_s'] for x in rows]))} s, "
                             f"p50 {fmt(spread([x['ready_p50_s'] for x in rows]))} s over {len(rows)} trials")
        lines.append("")
    if OVERLAPS.busy:
        lines.append(f"({len(OVERLAPS.busy)} of {OVERLAPS.runs} checks found other work running: "
                     f"{OVERLAPS.busy[:3]}: not figures to publish)")
    else:
        lines.append(f"(0 of {OVERLAPS.runs} checks found other work running)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="throughput|reconnect", help="the parts to run (default: both)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts, one round")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--repeat", type=int, default=3, help="throughput rounds (paths alternating)")
    parser.add_argument("--count", type=int, default=200_000, help="QoS 0 messages per throughput run")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=3, help="reconnect trials per identity variant")
    parser.add_argument("--identities", default="distinct,shared")
    parser.add_argument("--mosquitto-backlog", type=int, default=1024)
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.count, args.pairs, args.clients, args.trials = 1, 10_000, 2, 60, 1
    args.parts = args.parts or ["throughput", "reconnect"]
    if set(args.parts) - {"throughput", "reconnect"}:
        parser.error(f"unknown part in {args.parts}: throughput or reconnect")
    if args.clients > MAX_CLIENTS:
        parser.error(f"at most {MAX_CLIENTS} clients")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, Any] = {"machine": machine(), "load_before": load, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        workdir = Path(tmp)
        mosq, mosq_port = start_mosquitto(workdir, backlog_env(workdir, args.mosquitto_backlog))
        results["mosquitto_backlog"] = listen_backlog(mosq_port)
        log(f"Mosquitto on {mosq_port}, listen backlog {results['mosquitto_backlog']}")
        try:
            if "throughput" in args.parts:
                results["throughput"] = run_throughput(workdir, mosq, mosq_port, args.repeat, args.count, args.pairs)
            if "reconnect" in args.parts:
                results["reconnect"] = run_reconnect(workdir, mosq, mosq_port, args.clients, args.trials,
                                                     args.identities.split(","))
        finally:
            mosq.stop()
    results["overlaps"] = {"runs": OVERLAPS.runs, "busy": OVERLAPS.busy}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print()
    print(report(results))


if __name__ == "__main__":
    main()
