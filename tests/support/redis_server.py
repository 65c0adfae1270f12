"""Real redis-server processes for the cluster-wide connection cap (``limits.store``): each on a free loopback
port with its own config file and log, nothing saved to disk; stopped, paused (SIGSTOP) and restarted empty
by the tests."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, installed, stop_process


def redis_binary() -> str:
    return installed("redis-server", "/usr/bin/redis-server")


def ping(port: int, password: str | None = None, ca: Path | None = None, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING on 127.0.0.1:``port`` (raw RESP, no client library; TLS when ``ca``)."""
    request = (f"AUTH {password}\r\n" if password else "") + "PING\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            sock = raw
            if ca is not None:
                sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(request.encode())
            reply = b""
            while b"PONG" not in reply and b"-" not in reply:
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    directory: Path
    password: str | None = None  # requirepass
    tls: tuple[Path, Path, Path] | None = None  # (cert, key, CA): TLS only on the port, no client certificates
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        userinfo = f":{self.password}@" if self.password else ""
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}/0"

    @property
    def conf(self) -> Path:
        return self.directory / f"redis-{self.port}.conf"

    @property
    def log(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (again, empty: nothing is persisted) on the same port; returns when it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = ["bind 127.0.0.1", 'save ""', "appendonly no", f"dir {self.directory}", f"logfile {self.log}"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.tls:
            cert, key, ca = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}"]
            lines += [f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        self.conf.write_text("\n".join(lines) + "\n")
        with open(self.directory / f"redis-{self.port}.out", "ab") as out:  # what it says before its logfile opens
            self.proc = subprocess.Popen([redis_binary(), str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ping(self.port, self.password, self.tls[2] if self.tls else None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        stop_process(proc)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered (a hung store)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        parts = [self.directory / f"redis-{self.port}.out", self.log]
        return "".join(path.read_text(errors="replace") for path in parts if path.exists())


def start_redis(
    directory: Path, *, password: str | None = None, tls: tuple[Path, Path, Path] | None = None
) -> RedisServer:
    """A redis-server on a free loopback port, answering PING (with ``requirepass``, or TLS, when given)."""
    return RedisServer(free_port(), directory, password, tls).start()
