"""The benchmark suite: mqtt-front against the same Mosquitto reached directly, in the same run.

    make bench            # or: .venv/bin/python -m bench [--quick] [--out docs/benchmarks.md]

Absolute numbers drift on shared machines; the ratios, measured side by side, are what the
targets are about. Results are written to docs/benchmarks.md as a table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from bench import loadgen
from bench.harness import PASSWORD, FrontSetup, Proc, mosquitto_binary, start_front, start_mosquitto
from bench.loadgen import Target

CTX = multiprocessing.get_context("spawn")
SUB_USER = "project:team0:sub"
PUB_USER = "project:team0:pub"
STORM_USERS = [f"project:team0:s{i}" for i in range(1000)]


@dataclass
class Env:
    workdir: Path
    mosquitto: Proc
    mosq_port: int
    front: Proc | None = None
    tcp_port: int = 0
    ws_port: int = 0
    setup: FrontSetup = field(default_factory=FrontSetup)

    def use_front(self, teams: int = 1, workers: int = 1, fresh: bool = False) -> None:
        """Make sure mqtt-front runs with this setup; ``fresh`` restarts it anyway (clean RSS readings)."""
        if self.front is not None and (self.setup.teams, self.setup.workers) == (teams, workers) and not fresh:
            return
        if self.front is not None:
            self.front.stop()
        self.setup = FrontSetup(teams=teams, users=[SUB_USER, PUB_USER, *STORM_USERS], workers=workers)
        self.front, self.tcp_port, self.ws_port = start_front(self.workdir, self.mosq_port, self.setup)

    def target(self, via: str, user: str) -> Target:
        if via == "direct":
            return Target(self.mosq_port)
        port = self.tcp_port if via == "tcp" else self.ws_port
        return Target(port, ws=via == "ws", username=user, password=PASSWORD)

    def cpu(self) -> tuple[float, float]:
        front = self.front.cpu() if self.front is not None else 0.0
        return self.mosquitto.cpu(), front


def _procs(*specs: tuple[Callable[..., None], tuple[Any, ...]]) -> list[multiprocessing.process.BaseProcess]:
    procs = [CTX.Process(target=fn, args=args) for fn, args in specs]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def throughput(env: Env, via: str, qos: int, count: int, topics: list[str] | None = None,
               sub_filter: str = "ff/v1/team0/p/+/out/#") -> dict[str, float]:
    topics = topics or ["ff/v1/team0/p/pub/out/bench"]
    size = len(loadgen.publish_packet(topics[0], b"x" * 64, qos, 1 if qos else 0))
    ready, results = CTX.Event(), CTX.Queue()
    sub = _procs((loadgen.run_subscriber, (env.target(via, SUB_USER), f"{SUB_USER}:t", sub_filter, qos, size,
                                           count, ready, results, 60.0)))
    if not ready.wait(30):
        raise RuntimeError("subscriber did not get ready")
    mosq0, front0 = env.cpu()
    pub = _procs((loadgen.run_publisher, (env.target(via, PUB_USER), f"{PUB_USER}:t", topics, qos, count, 200,
                                          results)))
    got = [results.get(timeout=90), results.get(timeout=90)]
    mosq1, front1 = env.cpu()
    _join(sub + pub)
    sub_r = next(r for r in got if "received" in r)
    pub_r = next(r for r in got if "start" in r)
    seconds = max(1e-9, sub_r["last"] - pub_r["start"])
    received = sub_r["received"]
    return {
        "msgs_per_s": received / seconds,
        "received": received,
        "mosq_us_per_msg": (mosq1 - mosq0) / max(1, received) * 1e6,
        "front_us_per_msg": (front1 - front0) / max(1, received) * 1e6,
    }


def fan_in(env: Env, via: str, publishers: int, rate: float, duration: float) -> dict[str, float]:
    procs_n = 2
    per_proc = publishers // procs_n
    topic = "ff/v1/team0/p/pub/out/fanin"
    expected = int(rate * duration)
    ready, go, results, pub_results = CTX.Event(), CTX.Event(), CTX.Queue(), CTX.Queue()
    sub = _procs((loadgen.run_fanin_subscriber, (env.target(via, SUB_USER), f"{SUB_USER}:f", "ff/v1/team0/p/+/out/#",
                                                 expected, ready, results, duration + 15)))
    if not ready.wait(30):
        raise RuntimeError("subscriber did not get ready")
    pubs = _procs(*[
        (loadgen.run_fanin_publishers, (env.target(via, PUB_USER), f"{PUB_USER}:f{k}-", topic, per_proc,
                                        rate / publishers, duration, go, pub_results))
        for k in range(procs_n)
    ])
    for _ in range(procs_n):
        pub_results.get(timeout=60)
    go.set()
    sent = sum(pub_results.get(timeout=duration + 30) for _ in range(procs_n))
    lat = sorted(results.get(timeout=duration + 30))
    _join(sub + pubs)
    if not lat:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "sent": sent, "received": 0}
    return {
        "p50_ms": lat[len(lat) // 2] / 1e6,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6,
        "max_ms": lat[-1] / 1e6,
        "sent": sent,
        "received": len(lat),
    }


def idle(env: Env, via: str, clients: int) -> dict[str, float]:
    procs_n = 2
    hold, results = CTX.Event(), CTX.Queue()
    proc = env.front if via != "direct" and env.front is not None else env.mosquitto
    before = proc.rss()
    user = PUB_USER
    gens = _procs(*[
        (loadgen.run_idle_clients, (env.target(via, user), f"{user}:i{k}-", clients // procs_n, 200, hold, results))
        for k in range(procs_n)
    ])
    got = [results.get(timeout=180) for _ in range(procs_n)]
    time.sleep(1.0)
    after = proc.rss()
    hold.set()
    _join(gens)
    connected = sum(r["connected"] for r in got)
    return {
        "connected": connected,
        "errors": sum(r["errors"] for r in got),
        "rss_per_client_kib": (after - before) / max(1, connected) / 1024,
    }


def storm(env: Env, clients: int) -> dict[str, float]:
    procs_n = 2
    go, results = CTX.Event(), CTX.Queue()
    ids = STORM_USERS[:clients]
    per = clients // procs_n
    chunks = [ids[k * per : (k + 1) * per] for k in range(procs_n)]
    gens = _procs(*[
        (loadgen.run_storm, ([Target(env.tcp_port, username=u, password=PASSWORD) for u in chunk],
                             [f"{u}:n" for u in chunk], go, results))
        for chunk in chunks
    ])
    time.sleep(2.0)  # every generator waits on `go`
    go.set()
    got = [results.get(timeout=600) for _ in range(procs_n)]
    _join(gens)
    start = min(r["start"] for r in got)
    done = [t for r in got for t in r["done"]]
    return {"seconds": (max(done) - start) if done else float("nan"), "connected": len(done),
            "errors": sum(r["errors"] for r in got)}


def bcrypt_seconds() -> float:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10))
    start = time.perf_counter()
    for _ in range(5):
        bcrypt.checkpw(PASSWORD.encode(), hashed)
    return (time.perf_counter() - start) / 5


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosq = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    try:
        import uvloop

        loop = f"mqtt-front on uvloop {uvloop.__version__}"
    except ImportError:
        loop = "mqtt-front on asyncio's default loop"
    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB; "
            f"Python {platform.python_version()}, {loop}; {mosq}; {time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the suite)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    n = int(200_000 * scale)
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqtt-front-bench-") as tmp:
        workdir = Path(tmp)
        mosquitto, mosq_port = start_mosquitto(workdir)
        env = Env(workdir, mosquitto, mosq_port)
        try:
            env.use_front()
            rows += run_throughput(env, n)
            rows += run_fan_in(env, scale)
            rows += run_idle(env, scale)
            rows += run_storm(env, scale)
            rows += run_acl_scale(env, n)
        finally:
            if env.front is not None:
                env.front.stop()
            mosquitto.stop()
    elapsed = time.monotonic() - t_start
    table = render(rows, machine(), elapsed, args.quick)
    write_report(Path(args.out), table)
    print(table)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_report(path: Path, table: str) -> None:
    """Replace the generated table between the markers; hand-written notes around it stay."""
    block = f"{START}\n{table}\n{END}"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Benchmarks\n\n{block}\n"
    path.write_text(text)


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run_throughput(env: Env, n: int) -> list[dict[str, Any]]:
    rows = []
    for qos in (0, 1):
        count = n if qos == 0 else n // 4
        direct = throughput(env, "direct", qos, count)
        log(f"throughput qos{qos} direct {direct}")
        for via in ("tcp", "ws"):
            front = throughput(env, via, qos, count)
            log(f"throughput qos{qos} {via} {front}")
            primary = (qos, via) == (0, "tcp")  # the scenario the throughput target names
            rows.append(row(f"1. throughput {via.upper()} QoS {qos}, 64 B (msg/s)", direct["msgs_per_s"],
                            front["msgs_per_s"], ">= 0.9x direct" if primary else "",
                            (lambda r: r >= 0.9) if primary else None))
            limit = 0.5 if via == "tcp" else 1.0
            rows.append(row(f"   CPU per message {via.upper()} QoS {qos}: mqtt-front vs Mosquitto (µs)",
                            front["mosq_us_per_msg"], front["front_us_per_msg"],
                            f"<= {limit}x Mosquitto's" if qos == 0 else "",
                            (lambda r, lim=limit: r <= lim) if qos == 0 else (lambda r: None)))
    return rows


def run_fan_in(env: Env, scale: float) -> list[dict[str, Any]]:
    duration = 10.0 if scale == 1.0 else 3.0
    direct = fan_in(env, "direct", 200, 2000, duration)
    log(f"fan-in direct {direct}")
    rows = []
    for workers in (1, 2):
        env.use_front(workers=workers)
        front = fan_in(env, "tcp", 200, 2000, duration)
        log(f"fan-in front x{workers} {front}")
        for key in ("p50_ms", "p99_ms", "max_ms"):
            target = "<= direct + 1 ms" if key == "p99_ms" else ""
            rows.append(row(f"2. fan-in 200 pubs, 2000 msg/s, {workers} worker(s): {key[:-3]} latency (ms)",
                            direct[key], front[key], target,
                            (lambda r, d=direct[key], f=front[key]: f <= d + 1.0) if key == "p99_ms" else None,
                            ratio=False))
    env.use_front(workers=1)
    return rows


def run_idle(env: Env, scale: float) -> list[dict[str, Any]]:
    clients = int(10_000 * scale)
    # Every client costs mqtt-front two sockets and this machine caps a process at 20,000
    # descriptors (hard limit), so 10,000 clients need two workers.
    env.use_front(workers=2)
    direct = idle(env, "direct", clients)
    log(f"idle direct {direct}")
    rows = []
    for via in ("tcp", "ws"):
        env.use_front(workers=2, fresh=True)  # memory freed by an earlier run would hide this one's
        front = idle(env, via, clients)
        log(f"idle {via} {front}")
        rows.append(row(f"3. {front['connected']:,} idle clients {via.upper()}: RSS per client (KiB)",
                        direct["rss_per_client_kib"], front["rss_per_client_kib"], "<= 32 KiB",
                        lambda r, f=front["rss_per_client_kib"]: f <= 32.0, ratio=False))
    env.use_front(workers=1)
    return rows


def run_storm(env: Env, scale: float) -> list[dict[str, Any]]:
    clients = int(1000 * scale)
    per_check = bcrypt_seconds()
    rows = []
    for workers in (1, 2):
        env.use_front(workers=workers)
        result = storm(env, clients)
        cores = min(os.cpu_count() or 1, 2)
        floor = clients * per_check / cores
        log(f"storm x{workers} {result} floor {floor:.1f}s")
        rows.append(row(f"4. reconnect storm {result['connected']}/{clients} clients, {workers} worker(s) (s)",
                        floor, result["seconds"], "<= 1.25x bcrypt floor",
                        lambda r: r <= 1.25, direct_label="bcrypt floor"))
    env.use_front(workers=1)
    return rows


def run_acl_scale(env: Env, n: int) -> list[dict[str, Any]]:
    # 2,048 distinct topics, more than the per-client decision cache holds: every check walks the index.
    topics = [f"bench/team0/{k:04d}" for k in range(2048)]
    results = {}
    for teams in (1, 10_000):
        env.use_front(teams=teams)
        runs = [throughput(env, "tcp", 0, n // 2, topics, "bench/team0/#") for _ in range(2)]
        results[teams] = {
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
            "front_us_per_msg": statistics.median(r["front_us_per_msg"] for r in runs),
        }
        log(f"acl scale {teams} teams {results[teams]}")
    env.use_front()
    return [
        row("5. ACL scale: throughput 1 vs 10,000 teams (msg/s)", results[1]["msgs_per_s"],
            results[10_000]["msgs_per_s"], "within 5%", lambda r: r >= 0.95, direct_label="1 team"),
        row("   ACL scale: mqtt-front CPU per message 1 vs 10,000 teams (µs)", results[1]["front_us_per_msg"],
            results[10_000]["front_us_per_msg"], "within 5%", lambda r: r <= 1.05, direct_label="1 team"),
    ]


def row(name: str, direct: float, front: float, target: str, check: Callable[[float], bool | None] | None,
        ratio: bool = True, direct_label: str = "direct") -> dict[str, Any]:
    r = front / direct if direct else float("nan")
    met = check(r) if check is not None else None
    return {"name": name, "direct": direct, "front": front, "ratio": r if ratio or check else None,
            "target": target, "met": met, "direct_label": direct_label}


def _fmt(x: float) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def render(rows: list[dict[str, Any]], machine_desc: str, elapsed: float, quick: bool) -> str:
    lines = [
        "Generated by `make bench` (`python -m bench`): mqtt-front (FlowFuse preset ACL, authenticated clients,",
        "TCP or WebSocket with one MQTT packet per frame) against the same Mosquitto reached directly, in the same",
        "run. Ratios measured side by side are the figures that matter; absolute numbers drift on shared machines.",
        "",
        f"Machine: {machine_desc}. Suite time: {elapsed:.0f} s{' (--quick)' if quick else ''}.",
        "",
        "| scenario | direct / baseline | through mqtt-front | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        base = _fmt(r["direct"]) + ("" if r["direct_label"] == "direct" else f" ({r['direct_label']})")
        lines.append(f"| {r['name']} | {base} | {_fmt(r['front'])} | {ratio} | {r['target']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
