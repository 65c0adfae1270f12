"""A real HAProxy in TCP mode in front of mqtt-front replicas: its own haproxy.cfg, log and stats socket in a
folder, a free loopback port, health checks, and the servers' states read back from the stats socket.

Used by tests/process/test_replicas.py and bench/replicas.py. It starts and stops one process; what the
replicas behind it are is the caller's business.
"""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, installed, stop_process

START_TIMEOUT = 15.0
FRONTEND = "mqtt"  # the section names in haproxy.cfg
BACKEND = "replicas"


def haproxy_binary() -> str:
    return installed("haproxy", "/usr/sbin/haproxy")


@dataclass
class Backend:
    """One replica: its MQTT listener (``host``:``port``, which expects PROXY v2) and, when given, the port of
    its metrics listener whose ``GET /readyz`` is the health check."""

    name: str
    host: str
    port: int
    check_port: int | None = None


@dataclass
class HAProxy:
    """A running haproxy process; ``port`` is the frontend port clients connect to."""

    port: int
    proc: subprocess.Popen[bytes]
    directory: Path
    config: Path
    socket_path: Path
    log: Path

    def stop(self) -> None:
        stop_process(self.proc)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``disable server replicas/a``, ...) and its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows (pxname, svname, status, scur, ... as HAProxy names them)."""
        text = self.command("show stat").lstrip("# ")
        return [row for row in csv.DictReader(io.StringIO(text)) if row.get("svname")]

    def server_state(self) -> dict[str, str]:
        """Backend server name -> its status as HAProxy reports it: "UP", "DOWN", "no check", "MAINT", or a
        transition such as "UP 1/2" (up, one failed check of the two that take it down)."""
        return {
            row["svname"]: row["status"]
            for row in self.stats()
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def sessions(self) -> dict[str, int]:
        """Backend server name -> connections it holds now (``scur``)."""
        return {
            row["svname"]: int(row["scur"] or 0)
            for row in self.stats()
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_state(self, name: str, state: str, timeout: float = 10.0) -> None:
        """Until server ``name`` is reported ``state`` (e.g. "DOWN" after its replica died)."""
        deadline = time.monotonic() + timeout
        while (now := self.server_state().get(name)) != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy server {name} is {now!r}, not {state!r}, after {timeout}s")
            time.sleep(0.05)



def render_config(
    port: int,
    socket_path: Path,
    backends: list[Backend],
    *,
    send_proxy_v2: bool,
    check_interval_ms: int,
    balance: str,
    timeout_client_s: int,
) -> str:
    http_checks = {b.check_port is not None for b in backends}
    if len(http_checks) > 1:
        # `option httpchk` is per backend section: a TCP-checked server would be asked HTTP on its MQTT port.
        raise ValueError("give every backend a check_port, or none")
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "    stats timeout 10s",
        "    log stderr format raw local0 info",
        "    maxconn 4000",  # 1,000 benchmark clients; each takes two descriptors of the 20,000 allowed here
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option redispatch",  # the last of the retries goes to another server than the one that refused
        "    retries 3",
        "    timeout connect 1s",
        "    timeout check 1s",
        # MQTT connections idle for their keep alive: HAProxy must not cut them first.
        f"    timeout client {timeout_client_s}s",
        f"    timeout server {timeout_client_s}s",
        "",
        f"frontend {FRONTEND}",
        f"    bind 127.0.0.1:{port}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        f"    balance {balance}",
    ]
    if http_checks == {True}:
        lines.append("    option httpchk GET /readyz")
    # fall 2: one lost check is not a dead replica; rise 1: a replica back is used at once.
    check = f"check inter {check_interval_ms} fall 2 rise 1"
    proxy = " send-proxy-v2" if send_proxy_v2 else ""
    for b in backends:
        # `check port N` sends no PROXY header with the check (HAProxy adds one only when neither port nor
        # addr is set), so the HTTP metrics listener gets a plain GET; a TCP check goes to the MQTT port
        # with the header, which is what that listener expects.
        port_part = f" port {b.check_port}" if b.check_port is not None else ""
        lines.append(f"    server {b.name} {b.host}:{b.port}{proxy} {check}{port_part}")
    return "\n".join(lines) + "\n"


def start_haproxy(
    directory: Path,
    backends: list[Backend],
    *,
    send_proxy_v2: bool = True,
    check_interval_ms: int = 300,
    balance: str = "roundrobin",
    timeout_client_s: int = 60,
) -> HAProxy:
    """haproxy on a free loopback port in front of ``backends``, once it listens and every backend is UP."""
    binary = haproxy_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    socket_path = directory / f"haproxy-{port}.sock"
    config = directory / f"haproxy-{port}.cfg"
    config.write_text(
        render_config(
            port,
            socket_path,
            backends,
            send_proxy_v2=send_proxy_v2,
            check_interval_ms=check_interval_ms,
            balance=balance,
            timeout_client_s=timeout_client_s,
        )
    )
    log = directory / f"haproxy-{port}.log"
    with open(log, "wb") as out:
        # -db: foreground, no daemon and no master-worker, so the process we hold is the one serving.
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    front = HAProxy(port, proc, directory, config, socket_path, log)
    try:
        _wait_started(front, [b.name for b in backends])
    except BaseException:
        front.stop()
        raise
    return front


def _wait_started(front: HAProxy, names: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        if front.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {front.proc.returncode}: {front.log_text().strip()}")
        try:
            rows = front.stats()
        except OSError:  # the stats socket is not there yet
            time.sleep(0.05)
            continue
        state = front.server_state()
        # Asked, not probed: a test connection through the frontend would reach a replica.
        listening = any(r["pxname"] == FRONTEND and r["svname"] == "FRONTEND" and r["status"] == "OPEN" for r in rows)
        if listening and all(state.get(name) == "UP" for name in names):
            return
        time.sleep(0.05)
    raise RuntimeError(f"haproxy backends not UP after {START_TIMEOUT}s: {state}; log: {front.log_text().strip()}")


@contextlib.contextmanager
def haproxy(directory: Path, backends: list[Backend], **options: Any) -> Iterator[HAProxy]:
    """``start_haproxy(directory, backends, **options)`` for the block; stopped when it ends."""
    front = start_haproxy(directory, backends, **options)
    try:
        yield front
    finally:
        front.stop()
