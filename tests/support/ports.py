"""Loopback ports: a free one to bind, and waiting until something listens on one."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time


def free_port() -> int:
    """A free loopback port below the ephemeral range (32768-60999 here).

    Port 0 would hand out an ephemeral port, which an outgoing connection of the same suite can
    take before the process under test binds it; random ports below that range cannot be.
    """
    low, high = 20000, _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(21000, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def installed(name: str, fallback: str) -> str:
    """The path of a program the tests need (``PATH`` first, then ``fallback``, e.g. /usr/sbin for a
    daemon); a missing one says how to get it instead of skipping."""
    found = shutil.which(name) or (fallback if os.path.exists(fallback) else None)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test`, which installs it with apt-get")
    return found


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds (a server started by a test)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
