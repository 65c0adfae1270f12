"""The platform decides (issue 11): what asking FlowFuse over HTTP costs the front broker.

    .venv/bin/python -m bench.platform_cost [storm relay cold] [--repeat 5] [--json results.json]

Three measurements, each against its bound or baseline in the same run, every one repeated
``--repeat`` times (alternating the variants) and reported as median [min-max]:

1. **storm**: 1,000 MQTT 5 clients (``project:team0:s<i>``) CONNECT at once; every password is checked by
   the fake platform (``auth.http`` style emqx, no users file) answering after 20 ms. Time from the first
   CONNECT to the last CONNACK against the bound ``clients x 20 ms / max_concurrency``, for
   max_concurrency 16, 64 and 256; plus the same storm against a platform answering at once (what the
   front's own CPU allows) and straight into Mosquitto (what the load generator allows). CPU seconds of
   every process from /proc say what bounds a miss.
2. **relay**: QoS 0 through two fronts running side by side, identical but for ``acl.source``
   (``local``: FlowFuse preset; ``http``: the platform, caches warm), same clients and topics; mqtt-front
   CPU per message. One topic (every check answered by the session's topic cache) and 2,048 topics
   cycled (more than that cache holds: every message asks the policy, i.e. the platform client's cache).
3. **cold**: one client times round trips through the front (publishes to itself, 500/s) while
   subscribers receive messages on fresh topics, each delivery needing a platform check answered after
   20 ms; p50/p99 with no load, with 1 such subscriber, 8, and 64 (the max_concurrency ceiling), and
   the delayed subscribers' throughput. The fresh-topic messages are published straight into Mosquitto,
   so only the deliveries are cold. Two controls, while the 64 subscribers load the front: the round trips
   straight into Mosquitto (what the shared cores alone add to a round trip), and through a second,
   identical front (the same process hops and machine load, another event loop). The loaded front's p99
   minus the second front's, paired per repeat, is what the cold checks cost the other sessions of the
   front they run on: the stall the issue rules out.

The fake platform (``tests.support.platform.FakePlatform``) and every load generator run in processes of
their own; nothing here runs when other tests or benchmarks share the machine (check ``pgrep -fa
"pytest|python -m bench"`` first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import platform_load as load
from bench.harness import PASSWORD, Proc, free_port, start_mosquitto
from bench.loadgen import Target, publish_packet, run_subscriber
from bench.platform_proc import PlatformProc, start_platform_front

CTX = multiprocessing.get_context("spawn")
DELAY = 0.020
STORM_USERS = [f"project:team0:s{i}" for i in range(1000)]
SUB_USER, PUB_USER = "project:team0:sub", "project:team0:pub"
LAT_USER = "project:team0:lat"
COLD_USERS = [f"project:team0:c{i}" for i in range(64)]


def log(msg: str) -> None:
    print(f"[platform] {msg}", flush=True)


def others_busy() -> list[str]:
    """Other tests or benchmarks on the machine (``pgrep -fa "pytest|python -m bench"`` less this run)."""
    out = subprocess.run(["pgrep", "-fa", "pytest|python -m bench"], capture_output=True, text=True).stdout
    mine = {os.getpid(), os.getppid()}
    return [line for line in out.splitlines() if line and int(line.split()[0]) not in mine]


class Overlaps:
    """Counts the runs during which something else was running (checked before and after each)."""

    def __init__(self) -> None:
        self.runs = 0
        self.busy: list[str] = []

    def check(self, name: str) -> None:
        self.runs += 1
        others = others_busy()
        if others:
            self.busy.append(name)
            log(f"WARNING: {name} overlapped with other work: {others[:3]}")


OVERLAPS = Overlaps()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _procs(*specs: tuple[Callable[..., None], tuple[Any, ...]]) -> list[multiprocessing.process.BaseProcess]:
    procs: list[multiprocessing.process.BaseProcess] = [CTX.Process(target=fn, args=args) for fn, args in specs]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


# ------------------------------------------------------------------ 1. login storm


def listen_overflows() -> int:
    """TcpExt ListenOverflows, machine-wide: SYNs dropped because a listener's accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def jwt_tokens(secret: str) -> list[str]:
    import jwt  # PyJWT, mqtt-front's own dependency

    exp = int(time.time()) + 3600
    return [jwt.encode({"sub": u, "exp": exp}, secret, algorithm="HS256") for u in STORM_USERS]


def auth_latency(metrics_port: int | None) -> tuple[float, float]:
    """(sum of seconds, count) of mqtt_front_auth_request_seconds: the platform requests as the front timed
    them (from sending, inside its request slot, to the answer read), on the front's /metrics."""
    if metrics_port is None:
        return 0.0, 0.0
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("mqtt_front_auth_request_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("mqtt_front_auth_request_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def storm_once(port: int, front: Proc | None, mosq: Proc, platform: PlatformProc,
               passwords: list[str] | None = None, metrics_port: int | None = None) -> dict[str, Any]:
    procs_n = 2
    go, release, results = CTX.Event(), CTX.Event(), CTX.Queue()
    per = len(STORM_USERS) // procs_n
    passwords = passwords or [PASSWORD] * len(STORM_USERS)
    gens = _procs(*[(load.run_storm_v5, (port, STORM_USERS[k * per : (k + 1) * per],
                                         passwords[k * per : (k + 1) * per], go, release, results))
                    for k in range(procs_n)])
    for _ in range(procs_n):
        assert results.get(timeout=60) == "ready"
    platform.clear()
    lat0 = auth_latency(metrics_port)
    overflows = listen_overflows()
    cpu0 = (front.cpu() if front else 0.0, platform.cpu(), mosq.cpu())
    go.set()
    got = [results.get(timeout=120) for _ in range(procs_n)]
    cpu1 = (front.cpu() if front else 0.0, platform.cpu(), mosq.cpu())
    overflows = listen_overflows() - overflows
    lat1 = auth_latency(metrics_port)
    pstats = platform.stats()
    release.set()
    _join(gens)
    start = min(r["start"] for r in got)
    first_connect = min((min(r["written"]) for r in got if r["written"]), default=start)
    done = sorted(t for r in got for t in r["done"])
    refused: dict[int, int] = {}
    for r in got:
        for code, n in r["refused"].items():
            refused[code] = refused.get(code, 0) + n
    return {
        # From the first CONNECT written to the last CONNACK (what the bound is about); the load generators take
        # 30-60 ms to open their 1,000 connections before that, reported as from_connects_s.
        "seconds": (done[-1] - first_connect) if done else float("nan"),
        "from_connects_s": (done[-1] - start) if done else float("nan"),
        "p50_connack_s": (done[len(done) // 2] - first_connect) if done else float("nan"),
        "connected": len(done),
        "refused": refused,
        "errors": sum(r["errors"] for r in got),
        # When the load generators had written their first and their last CONNECT.
        "first_written_s": first_connect - start,
        "last_written_s": max((max(r["written"]) for r in got if r["written"]), default=start) - start,
        "front_cpu": cpu1[0] - cpu0[0],
        "platform_cpu": cpu1[1] - cpu0[1],
        "mosquitto_cpu": cpu1[2] - cpu0[2],
        "loadgen_cpu": [r["cpu"] for r in got],
        "auth_requests": pstats["auth_count"],
        # The lean platform's clock: when the first request arrived and the last answer left (perf_counter).
        "first_request_s": pstats.get("auth_first", start) - start if pstats.get("auth_first") else float("nan"),
        "last_answer_s": pstats.get("auth_last", start) - start if pstats.get("auth_last") else float("nan"),
        "auth_peak_in_flight": pstats["auth_peak"],
        "listen_overflows": overflows,
        # Mean time a platform request held its slot, as the front timed it (NaN without /metrics).
        "auth_latency_ms": (lat1[0] - lat0[0]) / (lat1[1] - lat0[1]) * 1e3 if lat1[1] > lat0[1] else float("nan"),
    }


def run_storm(workdir: Path, mosq: Proc, mosq_port: int, repeat: int, kind: str, jitter: float) -> dict[str, Any]:
    platform = PlatformProc.start(STORM_USERS, PASSWORD, auth_delay=DELAY, kind=kind)
    if jitter:
        platform.set_jitter("auth", jitter)
    secret = "bench-" + "s" * 40
    tokens = jwt_tokens(secret)
    variants: list[tuple[str, int | None, float, int]] = [
        ("direct Mosquitto (no auth)", None, 0.0, 1),
        ("JWT HS256, no platform request", 64, -1.0, 1),
        ("platform 0 ms, max_concurrency 64", 64, 0.0, 1),
        ("platform 20 ms, max_concurrency 16", 16, DELAY, 1),
        ("platform 20 ms, max_concurrency 64", 64, DELAY, 1),
        ("platform 20 ms, max_concurrency 256", 256, DELAY, 1),
        # Two workers share max_concurrency (32 each): the same bound, on both cores.
        ("platform 20 ms, max_concurrency 64, --workers 2", 64, DELAY, 2),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in variants}
    try:
        for r in range(repeat):
            for name, mc, delay, workers in variants:
                front = None
                port = mosq_port
                metrics_port = None
                jwt_run = delay < 0
                if mc is not None:
                    platform.set_delay("auth", max(0.0, delay))
                    for attempt in range(2):  # a port taken meanwhile by another process: pick others once
                        metrics_port = free_port()
                        try:
                            front, port = start_platform_front(workdir, mosq_port, platform, acl_source="local",
                                                               max_concurrency=mc, name=f"storm-{mc}",
                                                               jwt_secret=secret if jwt_run else None,
                                                               metrics_port=metrics_port, workers=workers)
                            break
                        except RuntimeError as exc:
                            log(f"storm: {exc}")
                            if attempt:
                                raise
                OVERLAPS.check(f"storm #{r + 1} {name} (before)")
                try:
                    res = storm_once(port, front, mosq, platform, tokens if jwt_run else None, metrics_port)
                finally:
                    OVERLAPS.check(f"storm #{r + 1} {name} (after)")
                    if front is not None:
                        front.stop()
                log(f"storm #{r + 1} {name}: {res['seconds']:.3f}s connected {res['connected']} "
                    f"refused {res['refused']} errors {res['errors']} front cpu {res['front_cpu']:.2f}s "
                    f"platform cpu {res['platform_cpu']:.2f}s mosquitto cpu {res['mosquitto_cpu']:.2f}s "
                    f"loadgen cpu {res['loadgen_cpu']} auth requests {res['auth_requests']} "
                    f"peak in flight {res['auth_peak_in_flight']} listen overflows {res['listen_overflows']} "
                    f"auth latency seen by the front {res['auth_latency_ms']:.1f} ms; from the connects "
                    f"{res['from_connects_s']:.3f}s, CONNECTs written {res['first_written_s'] * 1e3:.0f}-"
                    f"{res['last_written_s'] * 1e3:.0f} ms, platform's first request "
                    f"{res['first_request_s'] * 1e3:.0f} ms, last answer {res['last_answer_s'] * 1e3:.0f} ms")
                runs[name].append(res)
    finally:
        platform.stop()
    out: dict[str, Any] = {}
    for name, mc, delay, _ in variants:
        rs = runs[name]
        bound = len(STORM_USERS) * delay / mc if mc and delay > 0 else None
        entry: dict[str, Any] = {
            key: spread([x[key] for x in rs])
            for key in ("seconds", "p50_connack_s", "front_cpu", "platform_cpu", "mosquitto_cpu",
                        "auth_peak_in_flight", "connected", "listen_overflows", "auth_latency_ms",
                        "from_connects_s", "first_written_s", "first_request_s", "last_answer_s")
        }
        entry["loadgen_cpu"] = spread([max(x["loadgen_cpu"]) for x in rs])
        entry["bound_s"] = bound
        if bound:
            entry["ratio"] = spread([x["seconds"] / bound for x in rs])
        entry["failures"] = sum(x["errors"] + sum(x["refused"].values()) for x in rs)
        out[name] = entry
    return out


# ------------------------------------------------------------------ 2. relay, acl.source local vs http


class FrontEnv:
    def __init__(self, name: str, proc: Proc, port: int, mosq: Proc) -> None:
        self.name, self.proc, self.port, self.mosq = name, proc, port, mosq


def throughput(env: FrontEnv, topics: list[str], count: int) -> dict[str, float]:
    size = len(publish_packet(topics[0], b"x" * 64))
    ready, results = CTX.Event(), CTX.Queue()
    sub = _procs((run_subscriber, (Target(env.port, username=SUB_USER, password=PASSWORD), f"{SUB_USER}:t",
                                   "ff/v1/team0/p/+/out/#", 0, size, count, ready, results, 90.0)))
    if not ready.wait(30):
        raise RuntimeError("subscriber did not get ready")
    cpu0 = env.proc.cpu()
    pub = _procs((load.run_publisher_all_topics, (Target(env.port, username=PUB_USER, password=PASSWORD),
                                                  f"{PUB_USER}:t", topics, count, results)))
    got = [results.get(timeout=120), results.get(timeout=120)]
    cpu1 = env.proc.cpu()
    _join(sub + pub)
    sub_r = next(r for r in got if "received" in r)
    pub_r = next(r for r in got if "start" in r)
    received = sub_r["received"]
    return {
        "received": received,
        "msgs_per_s": received / max(1e-9, sub_r["last"] - pub_r["start"]),
        "front_us_per_msg": (cpu1 - cpu0) / max(1, received) * 1e6,
    }


def run_relay(workdir: Path, mosq: Proc, mosq_port: int, repeat: int, count: int, kind: str) -> dict[str, Any]:
    platform = PlatformProc.start([SUB_USER, PUB_USER], PASSWORD, kind=kind)
    sets = {
        "1 topic": ["ff/v1/team0/p/pub/out/bench"],
        "2,048 topics": [f"ff/v1/team0/p/pub/out/k{k:04d}" for k in range(2048)],
    }
    envs: dict[str, FrontEnv] = {}
    try:
        for src in ("local", "http"):
            proc, port = start_platform_front(workdir, mosq_port, platform, acl_source=src, name=f"relay-{src}")
            envs[src] = FrontEnv(src, proc, port, mosq)
        for src, env in envs.items():  # warm the platform client's cache (and check the topics are allowed)
            for name, topics in sets.items():
                res = throughput(env, topics, max(20_000, 4 * len(topics)))
                log(f"relay warm-up {src} {name}: {res}")
                if res["received"] < max(20_000, 4 * len(topics)):
                    raise RuntimeError(f"warm-up through acl.source {src} lost messages: {res}")
        runs: dict[tuple[str, str], list[dict[str, float]]] = {(s, n): [] for s in envs for n in sets}
        acl_before = platform.stats()["acl_count"]
        for r in range(repeat):
            order = ["local", "http"] if r % 2 == 0 else ["http", "local"]
            for name, topics in sets.items():
                for src in order:
                    OVERLAPS.check(f"relay #{r + 1} {name} {src} (before)")
                    res = throughput(envs[src], topics, count)
                    OVERLAPS.check(f"relay #{r + 1} {name} {src} (after)")
                    log(f"relay #{r + 1} {name} acl.source {src}: {res}")
                    runs[(src, name)].append(res)
        acl_requests = platform.stats()["acl_count"] - acl_before
    finally:
        for env in envs.values():
            env.proc.stop()
        platform.stop()
    out: dict[str, Any] = {"acl_requests_during_measured_runs": acl_requests, "count": count}
    for name in sets:
        local = [x["front_us_per_msg"] for x in runs[("local", name)]]
        http = [x["front_us_per_msg"] for x in runs[("http", name)]]
        out[name] = {
            "local_us": spread(local),
            "http_us": spread(http),
            "pair_ratio": spread([h / lo for h, lo in zip(http, local, strict=True)]),
            "ratio_of_medians": statistics.median(http) / statistics.median(local),
            "local_msgs_per_s": spread([x["msgs_per_s"] for x in runs[("local", name)]]),
            "http_msgs_per_s": spread([x["msgs_per_s"] for x in runs[("http", name)]]),
        }
    return out


# ------------------------------------------------------------------ 3. cold delivery checks vs another session


def cold_once(tag: str, rtt_target: Target, front_port: int, mosq_port: int, subscribers: int, per_sub: int,
              duration: float, rate: float, front: Proc, mosq: Proc, platform: PlatformProc) -> dict[str, Any]:
    ready_rtt, ready_cold, go, results = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Queue()
    specs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (load.run_rtt_client, (rtt_target, f"{LAT_USER}:{tag}", "ff/v1/team0/p/lat/out/rtt", rate, duration,
                               ready_rtt, go, results)),
    ]
    if subscribers:
        users = COLD_USERS[:subscribers]
        filters = [f"ff/v1/team0/p/pub/out/cold/{tag}/{s}/#" for s in range(subscribers)]
        topics = [f"ff/v1/team0/p/pub/out/cold/{tag}/{s}/{k}" for k in range(per_sub) for s in range(subscribers)]
        specs.append((load.run_cold_subscribers, (front_port, users, PASSWORD, filters, per_sub, ready_cold, go,
                                                  duration + 1.5, results)))
        specs.append((load.run_cold_publisher, (mosq_port, topics, go, results)))
    procs = _procs(*specs)
    if not ready_rtt.wait(60) or (subscribers and not ready_cold.wait(60)):
        _join(procs)
        raise RuntimeError("cold-cache clients did not get ready")
    time.sleep(0.5)  # the publisher has connected too
    platform.clear()
    cpu0 = (front.cpu(), platform.cpu(), mosq.cpu())
    t0 = time.perf_counter()
    go.set()
    got = [results.get(timeout=duration + 60) for _ in range(3 if subscribers else 1)]
    wall = time.perf_counter() - t0
    cpu1 = (front.cpu(), platform.cpu(), mosq.cpu())
    pstats = platform.stats()
    _join(procs)
    rtt = next(r for r in got if r["kind"] == "rtt")
    lat = sorted(rtt["lat"])
    res: dict[str, Any] = {
        "p50_ms": lat[len(lat) // 2] / 1e6,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6,
        "max_ms": lat[-1] / 1e6,
        "rtt_received": len(lat),
        "rtt_sent": rtt["sent"],
        "front_cpu_share": (cpu1[0] - cpu0[0]) / wall,
        "platform_cpu_share": (cpu1[1] - cpu0[1]) / wall,
        "mosquitto_cpu_share": (cpu1[2] - cpu0[2]) / wall,
        "acl_requests": pstats["acl_count"],
        "acl_peak_in_flight": pstats["acl_peak"],
    }
    cold = next((r for r in got if r["kind"] == "cold"), None)
    if cold is not None:
        total = sum(cold["counts"])
        res["cold_received"] = total
        res["cold_expected"] = subscribers * per_sub
        res["cold_msgs_per_s"] = total / max(1e-9, max(cold["lasts"]))
        res["cold_per_sub_msgs_per_s"] = statistics.median(
            c / t for c, t in zip(cold["counts"], cold["lasts"], strict=True) if t > 0
        )
    return res


def run_cold(workdir: Path, mosq: Proc, mosq_port: int, repeat: int, duration: float, rate: float,
             kind: str, jitter: float) -> dict[str, Any]:
    platform = PlatformProc.start([LAT_USER, *COLD_USERS], PASSWORD, acl_delay=DELAY, kind=kind)
    if jitter:
        platform.set_jitter("acl", jitter)
    front, port = start_platform_front(workdir, mosq_port, platform, acl_source="http", max_concurrency=64,
                                       name="cold")
    front_target = Target(port, username=LAT_USER, password=PASSWORD)
    # A second front, the same config, for the round trips only: the same process hops and the same machine
    # load as through the first, without sharing its event loop with the cold checks. The difference between
    # the two, paired per repeat, is what the cold checks cost other sessions of their front (a stall).
    front_b, port_b = start_platform_front(workdir, mosq_port, platform, acl_source="http", max_concurrency=64,
                                           name="cold-b")
    second_target = Target(port_b, username=LAT_USER, password=PASSWORD)
    variants = [
        ("direct Mosquitto, no load", Target(mosq_port), 0),
        ("through mqtt-front, no load", front_target, 0),
        ("through mqtt-front, 1 cold subscriber", front_target, 1),
        ("through mqtt-front, 8 cold subscribers", front_target, 8),
        ("through mqtt-front, 64 cold subscribers", front_target, 64),
        # The control: the same load on the front, the round trips straight into Mosquitto. What the machine's
        # two cores shared by every process cost the round trip, without the front on its path.
        ("direct Mosquitto, 64 cold subscribers on the front", Target(mosq_port), 64),
        ("through a second mqtt-front, no load", second_target, 0),
        ("through a second mqtt-front, 64 cold subscribers on the first", second_target, 64),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    per_sub = 500  # at 20 ms per check in order: >= 10 s of cold deliveries, longer than the window
    try:
        for r in range(repeat):
            # Every other repeat in reverse: a pair's two runs are not always in the same order (the machine drifts).
            order = list(enumerate(variants))
            for i, (name, target, subs) in order if r % 2 == 0 else order[::-1]:
                OVERLAPS.check(f"cold #{r + 1} {name} (before)")
                res = cold_once(f"r{r}v{i}", target, port, mosq_port, subs, per_sub, duration, rate, front, mosq,
                                platform)
                OVERLAPS.check(f"cold #{r + 1} {name} (after)")
                log(f"cold #{r + 1} {name}: {res}")
                runs[name].append(res)
    finally:
        front.stop()
        front_b.stop()
        platform.stop()
    out: dict[str, Any] = {"duration_s": duration, "rate": rate, "per_sub": per_sub}
    own = [a["p99_ms"] - b["p99_ms"] for a, b in zip(runs["through mqtt-front, 64 cold subscribers"],
                                                       runs["through a second mqtt-front, 64 cold subscribers on the "
                                                            "first"], strict=True)]
    out["own_share_p99_ms"] = spread(own)
    for name, _, subs in variants:
        rs = runs[name]
        keys = ["p50_ms", "p99_ms", "max_ms", "front_cpu_share", "platform_cpu_share", "acl_requests",
                "acl_peak_in_flight"]
        if subs:
            keys += ["cold_msgs_per_s", "cold_per_sub_msgs_per_s", "cold_received"]
        entry = {key: spread([x[key] for x in rs]) for key in keys}
        entry["rtt_lost"] = sum(x["rtt_sent"] - x["rtt_received"] for x in rs)
        out[name] = entry
    return out


# ------------------------------------------------------------------ report


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "storm" in results:
        lines += ["## 1. login storm, 1,000 MQTT 5 clients (s: median [min-max])", "",
                  "| variant | bound | first CONNECT to last CONNACK | ratio | from the first connect() | "
                  "platform's first request, last answer (ms after the first CONNECT) | front CPU s | "
                  "platform CPU s | loadgen CPU s (busiest) | peak in flight | listen overflows | "
                  "request latency seen by front ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in results["storm"].items():
            bound = f"{e['bound_s']:.3f}" if e["bound_s"] else ""
            ratio = fmt(e["ratio"]) + "x" if "ratio" in e else ""
            peak = e["auth_peak_in_flight"]["median"]
            written = e["first_written_s"]["median"]
            window = (f"{(e['first_request_s']['median'] - written) * 1e3:.0f}, "
                      f"{(e['last_answer_s']['median'] - written) * 1e3:.0f}")
            lines.append(f"| {name} | {bound} | {fmt(e['seconds'], 3)} | {ratio} | {fmt(e['from_connects_s'], 3)} | "
                         f"{window} | {fmt(e['front_cpu'])} | "
                         f"{fmt(e['platform_cpu'])} | {fmt(e['loadgen_cpu'])} | {peak:.0f} | "
                         f"{fmt(e['listen_overflows'], 0)} | {fmt(e['auth_latency_ms'], 1)} |")
        lines.append("")
    if "relay" in results:
        rel = results["relay"]
        lines += ["## 2. QoS 0 relay, mqtt-front CPU per message (µs), acl.source local vs http (warm)", "",
                  "| topics | local | http | http/local (paired runs) | ratio of medians |", "|---|---|---|---|---|"]
        for name in ("1 topic", "2,048 topics"):
            e = rel[name]
            lines.append(f"| {name} | {fmt(e['local_us'])} | {fmt(e['http_us'])} | {fmt(e['pair_ratio'])}x | "
                         f"{e['ratio_of_medians']:.2f}x |")
        lines += ["", f"platform ACL requests during the measured runs: {rel['acl_requests_during_measured_runs']}",
                  ""]
    if "cold" in results:
        c = results["cold"]
        lines += [f"## 3. round trips of another client ({c['rate']:.0f}/s for {c['duration_s']:.0f} s) while "
                  "deliveries wait for 20 ms platform checks", "",
                  "| variant | p50 ms | p99 ms | max ms | CPU share of the (first) front | cold deliveries/s (all) | "
                  "per subscriber | ACL requests | peak in flight |", "|---|---|---|---|---|---|---|---|---|"]
        for name, e in c.items():
            if not isinstance(e, dict) or "p50_ms" not in e:
                continue
            cold = fmt(e["cold_msgs_per_s"], 0) if "cold_msgs_per_s" in e else ""
            per = fmt(e["cold_per_sub_msgs_per_s"], 1) if "cold_per_sub_msgs_per_s" in e else ""
            lines.append(f"| {name} | {fmt(e['p50_ms'])} | {fmt(e['p99_ms'])} | {fmt(e['max_ms'])} | "
                         f"{fmt(e['front_cpu_share'])} | {cold} | {per} | {fmt(e['acl_requests'], 0)} | "
                         f"{e['acl_peak_in_flight']['median']:.0f} |")
        lines += ["", "p99 through the loaded front minus p99 through the second front under the same load, paired "
                      f"per repeat (what the cold checks cost the other sessions of their front): "
                      f"{fmt(c['own_share_p99_ms'])} ms"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.platform_cost")
    parser.add_argument("scenarios", nargs="*", default=["storm", "relay", "cold"],
                        choices=["storm", "relay", "cold"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200_000, help="QoS 0 messages per relay run")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of round trips per cold run")
    parser.add_argument("--rate", type=float, default=500.0, help="round trips per second")
    parser.add_argument("--platform", choices=["lean", "fake"], default="lean",
                        help="lean: bench.platform_lean (default); fake: tests.support.platform.FakePlatform")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="lean platform: answer after 20 ms +- up to this many seconds (uniform), not exactly")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqtt-front-platform-") as tmp:
        workdir = Path(tmp)
        mosq, mosq_port = start_mosquitto(workdir)
        try:
            if "storm" in args.scenarios:
                results["storm"] = run_storm(workdir, mosq, mosq_port, args.repeat, args.platform, args.jitter)
            if "relay" in args.scenarios:
                results["relay"] = run_relay(workdir, mosq, mosq_port, args.repeat, args.messages,
                                             args.platform)
            if "cold" in args.scenarios:
                results["cold"] = run_cold(workdir, mosq, mosq_port, args.repeat, args.duration, args.rate,
                                           args.platform, args.jitter)
        finally:
            mosq.stop()
    results["elapsed_s"] = time.monotonic() - t0
    results["overlapped_checks"] = OVERLAPS.busy
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\n({results['elapsed_s']:.0f} s; {len(OVERLAPS.busy)} of {OVERLAPS.runs} checks found other tests "
          f"running{': ' + ', '.join(OVERLAPS.busy) if OVERLAPS.busy else ''})")


if __name__ == "__main__":
    main()
