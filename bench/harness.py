"""Processes under test: a Mosquitto and an mqtt-front in front of it, plus CPU/RSS readings from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from tests.support.mosquitto import mosquitto_binary
from tests.support.ports import wait_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PASSWORD = "bench-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a process and its reaped children, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The process, or its workers when it forked some (the parent only waits)."""
        kids = children(self.popen.pid)
        return kids or [self.popen.pid]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_mosquitto(workdir: Path, env: dict[str, str] | None = None) -> tuple[Proc, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # Limits off so that neither side drops messages or refuses the 10,000 idle clients.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\nmax_connections -1\nset_tcp_nodelay true\n"
    )
    os.chmod(workdir, 0o755)
    os.chmod(conf, 0o644)
    log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115 - lives as long as the process
    popen = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(port, timeout=15.0)
    return Proc("mosquitto", popen), port


@dataclass
class FrontSetup:
    teams: int = 1  # literal per-team ACL rules on top of the flowfuse preset
    users: list[str] = field(default_factory=list)
    workers: int = 1
    inventory: bool = False  # the topic inventory on (inventory: {})
    # limits.* on top of the bench defaults. Those turn publish_rate off: a throughput run pushes one client
    # flat out, past the product default of 10,000 messages/s (bench/fairness.py measures with the defaults).
    limits: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # a suffix for the config file when several setups differ only in ``limits``
    # More keys of the tcp listener (e.g. proxy_protocol) and more top-level sections (e.g. metrics).
    listener: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)


def write_users(path: Path, usernames: list[str]) -> None:
    # One bcrypt hash (cost 10, as FlowFuse stores them) reused for every user: the check cost
    # per user is the same, and hashing thousands of passwords would dominate the run.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    path.write_text(yaml.safe_dump({"users": [{"username": u, "password_hash": hashed} for u in usernames]}))


def start_front(workdir: Path, upstream_port: int, setup: FrontSetup) -> tuple[Proc, int, int]:
    """mqtt-front with a tcp and a ws listener; returns (process, tcp port, ws port)."""
    tcp_port, ws_port = free_port(), free_port()
    users_file = workdir / f"users-{setup.teams}.yaml"
    if not users_file.exists():
        write_users(users_file, setup.users)
    rules: list[dict[str, Any]] = [
        {"who": "project", "effect": "allow", "action": "both", "pattern": f"bench/team{i}/#"}
        for i in range(setup.teams)
    ]
    config = {
        "listeners": [
            {"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{tcp_port}", **setup.listener},
            {"name": "ws", "type": "ws", "bind": f"127.0.0.1:{ws_port}", "path": "/mqtt"},
        ],
        "upstream": {"url": f"mqtt://127.0.0.1:{upstream_port}"},
        "limits": {"max_packet_size": 1048576, "connect_timeout": 30, "publish_rate": {"client": None}, **setup.limits},
        "auth": {"users_file": str(users_file), "allow_anonymous": False},
        "acl": {"preset": "flowfuse", "rules": rules},
        "logging": {"level": "warning"},
        **setup.sections,
    }
    if setup.inventory:
        config["inventory"] = {}
    conf = workdir / f"front-{setup.teams}-{setup.workers}{'-inventory' if setup.inventory else ''}{setup.name}.yaml"
    conf.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).with_name("mqtt-front")
    log = open(workdir / "front.log", "ab")  # noqa: SIM115 - lives as long as the process
    popen = subprocess.Popen(
        [str(exe), "run", "-c", str(conf), "--workers", str(setup.workers)], stdout=log, stderr=subprocess.STDOUT
    )
    wait_port(tcp_port, timeout=15.0)
    wait_port(ws_port, timeout=15.0)
    time.sleep(0.3 * setup.workers)  # every worker has bound its SO_REUSEPORT socket
    return Proc("mqtt-front", popen), tcp_port, ws_port
