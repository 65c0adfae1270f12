"""The managed embedded broker: a Mosquitto child process that only the front broker can reach.

When no upstream is configured and the ``mosquitto`` binary is found (:func:`find_mosquitto`), the front
broker runs one :class:`ManagedMosquitto`. It owns:

- a private folder (``mkdtemp``, mode 0700) with the generated ``mosquitto.conf`` and a password file with
  one random :class:`Credential` per start, hashed as ``mosquitto_passwd`` does (PBKDF2-SHA512, ``$7$``;
  written here so the password never appears on a command line); removed when it stops;
- the process: one loopback TCP listener on a free port (Mosquitto 2.0.11 has no unix socket listener),
  ``allow_anonymous false``, no persistence. Started as root, it runs as the ``mosquitto`` user (the
  folder is handed to that user), in its own session (a terminal's Ctrl-C reaches only the front broker,
  which stops it) and with a parent-death signal (a front broker killed with SIGKILL takes it along);
- its log, forwarded line by line to ``mqtt_front.embedded`` (errors and warnings at WARNING);
- a health check (an MQTT CONNECT with the credential: the start waits for the first one to succeed),
  restarts with back-off when it dies or stops answering, and the stop: SIGTERM, then SIGKILL.

It must not know the client side: the front broker connects through :meth:`ManagedMosquitto.connector`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.config import ConfigError
from broker.logs import log_event
from broker.mqtt.packets import Connect, encode_connect
from broker.parent_death import end_with_parent, resolve_prctl
from broker.upstream.connector import UpstreamConnector

log = logging.getLogger("mqtt_front.embedded")

MOSQUITTO_ENV = "MQTT_FRONT_MOSQUITTO"  # a mosquitto binary to use, or "none" for the amqtt fallback
START_TIMEOUT = 10.0  # seconds for Mosquitto to accept the first CONNECT
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
HEALTH_INTERVAL = 5.0  # seconds between two health checks
HEALTH_FAILURES = 3  # failed checks in a row before it is killed and restarted
PROBE_TIMEOUT = 2.0
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_WINDOW = 0.1, 5.0, 60.0  # doubling per death within the window
DIR_PREFIX = "mqtt-front-mosquitto-"
OWNER_FILE = "front.pid"  # the front broker's pid: a folder whose owner is gone is removed at the next start


@dataclass(frozen=True, slots=True)
class Credential:
    """The front broker's login on the embedded broker: random, per start, known to nothing else."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def generate(cls) -> Credential:
        return cls(f"mqtt-front-{secrets.token_hex(4)}", secrets.token_urlsafe(32))


def mosquitto_password_line(credential: Credential, iterations: int = 101) -> str:
    """One password file line in Mosquitto 2's format (``mosquitto_passwd``: PBKDF2-SHA512, 12-byte salt)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", credential.password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{credential.username}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}\n"


def find_mosquitto() -> str | None:
    """The mosquitto binary: ``$MQTT_FRONT_MOSQUITTO`` (``none``: do not use Mosquitto), else on PATH or
    in /usr/sbin (Debian installs it there, outside a normal user's PATH). ``ConfigError`` when the
    variable names something that is not an executable file."""
    chosen = os.environ.get(MOSQUITTO_ENV)
    if chosen is not None:
        if chosen.strip().lower() in ("", "none"):
            return None
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise ConfigError(f"{MOSQUITTO_ENV}={chosen}: not an executable file (or 'none' for amqtt)")
        return chosen
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


def owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on 127.0.0.1:``port``. The credential is only sent,
    and traffic only forwarded, to our own child: between choosing a free port and the child binding it
    (or while the child restarts) another local user could listen there and collect both."""
    local = f"0100007F:{port:04X}"
    inode = None
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                    inode = fields[9]
                    break
        if inode is None:
            return False
        wanted = f"socket:[{inode}]"
        fds = f"/proc/{pid}/fd"
        return any(os.readlink(f"{fds}/{fd}") == wanted for fd in os.listdir(fds))
    except OSError:
        return False


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def probe(host: str, port: int, credential: Credential, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the broker accepts an MQTT CONNECT with ``credential``, else why not."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return "connect timed out"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    hello = Connect(4, True, 10, f"mqtt-front-health-{secrets.token_hex(4)}", username=credential.username,
                    password=credential.password.encode())
    try:
        writer.write(encode_connect(hello))
        connack = await asyncio.wait_for(reader.readexactly(4), timeout)
        writer.write(b"\xe0\x00")  # DISCONNECT: a clean goodbye
    except TimeoutError:
        return "no CONNACK"
    except (OSError, asyncio.IncompleteReadError):
        return "closed before CONNACK"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if connack[:3] != b"\x20\x02\x00":
        return "not an MQTT broker"
    return None if connack[3] == 0 else f"CONNACK return code {connack[3]}"


def _remove_stale() -> None:
    """Folders left by a front broker that was killed (SIGKILL: its Mosquitto went with it, the folder not)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge: another user's, or being written right now


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _account() -> tuple[str, int, int] | None:
    """The (user, uid, gid) to run Mosquitto as when we are root: its own ``mosquitto`` user (the Debian
    package creates it); None: the current user (root only when that user does not exist)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def _child_setup(account: tuple[str, int, int] | None) -> Callable[[], None]:
    """What the child runs between fork and exec: its own session, the account, then the parent-death
    signal (after the uid change, which clears it)."""
    parent = os.getpid()
    prctl = resolve_prctl()  # before the fork

    def setup() -> None:
        os.setsid()
        if account is not None:
            os.setgroups([])
            os.setgid(account[2])
            os.setuid(account[1])
        try:
            alive = end_with_parent(prctl, parent)
        except OSError:  # nothing can be logged here; the parent's stop still ends it
            alive = os.getppid() == parent
        if not alive:  # the parent died before the signal was set
            os._exit(1)

    return setup


class ManagedMosquitto:
    """One Mosquitto child process, loopback only, with a per-start credential; see the module docstring."""

    v5 = True
    name = "mosquitto"
    label = "embedded mosquitto"

    def __init__(self, binary: str, credential: Credential | None = None, host: str = "127.0.0.1") -> None:
        self.binary = binary
        self.credential = credential or Credential.generate()
        self.host = host
        self.port = 0
        self.restarts = 0
        self._account = _account()
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connector: UpstreamConnector | None = None
        self._recent: collections.deque[str] = collections.deque(maxlen=5)  # last log lines, for errors

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def connector(self, connect_timeout: float = 5.0) -> UpstreamConnector:
        """The front broker's way in (kept up to date if a restart has to move to another port)."""
        if self._connector is None:
            self._connector = UpstreamConnector.single(self.host, self.port, connect_timeout, self.label)
        return self._connector

    async def start(self) -> None:
        """Write the folder, start Mosquitto, wait until it accepts the credential; ``ConfigError`` when it
        does not start (three tries, each on a fresh port)."""
        try:
            self._prepare()
        except OSError as exc:
            self._remove_dir()
            raise ConfigError(f"embedded broker: cannot write its private folder: {exc.strerror or exc}") from None
        error: str | None = "not started"
        for _ in range(3):
            self.port = free_port(self.host)
            error = await self._launch()
            if error is None:
                break
        else:
            self._remove_dir()
            raise ConfigError(f"embedded broker: mosquitto ({self.binary}) did not start: {error}")
        log_event(log, logging.INFO, "embedded_started", broker=self.name, host=self.host, port=self.port,
                  pid=self.pid, user=self._account[0] if self._account else None)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the folder is removed."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        pid = self.pid
        code = await self._terminate()
        if code is not None:
            log_event(log, logging.INFO, "embedded_stopped", broker=self.name, pid=pid, reason=_exit_reason(code))
        self._remove_dir()

    # ------------------------------------------------------------------ files

    def _prepare(self) -> None:
        _remove_stale()
        directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))  # mode 0700
        self._dir = directory
        (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")
        passwd = directory / "passwd"
        passwd.touch(0o600)
        passwd.write_text(mosquitto_password_line(self.credential))
        if self._account is not None:  # the mosquitto user reads them; nobody else can
            os.chown(directory, self._account[1], self._account[2])
            os.chown(passwd, self._account[1], self._account[2])

    def _write_config(self) -> Path:
        assert self._dir is not None
        if self._account is not None:
            user = self._account[0]
        else:
            try:
                user = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:
                user = None
        conf = self._dir / "mosquitto.conf"
        conf.touch(0o600)
        conf.write_text(
            "# Generated by mqtt-front for this run only: the embedded broker (demo only). Deleted when it stops.\n"
            "per_listener_settings false\n"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self._dir / 'passwd'}\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"  # stderr is unbuffered: lines arrive as they are written
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages false\n"  # the front broker logs every client itself
            "log_timestamp false\n"
            + (f"user {user}\n" if user else "")
        )
        if self._account is not None:
            os.chown(conf, self._account[1], self._account[2])
        return conf

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # ------------------------------------------------------------------ the process

    async def _launch(self) -> str | None:
        """Start Mosquitto on ``self.port``; None once it accepts the credential, else why not (stopped)."""
        self._recent.clear()
        try:
            conf = self._write_config()
            proc = await asyncio.create_subprocess_exec(
                self.binary, "-c", str(conf),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # none of our secrets in its environment
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                preexec_fn=_child_setup(self._account),
            )
        except OSError as exc:
            return exc.strerror or str(exc)
        except subprocess.SubprocessError as exc:  # the child setup failed (setuid, setsid)
            return str(exc.__cause__ or exc)
        self._proc = proc
        assert proc.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._forward_log(proc.stderr))
        deadline = time.monotonic() + START_TIMEOUT
        error: str | None = f"no answer within {START_TIMEOUT:g}s"
        while time.monotonic() < deadline and proc.returncode is None:
            if not owns_listener(proc.pid, self.port):  # not bound yet, or the port is someone else's
                error = f"port {self.port} not (yet) held by the broker"
                await asyncio.sleep(0.05)
                continue
            error = await probe(self.host, self.port, self.credential)
            if error is None:
                if self._connector is not None:  # a restart on another port: new connections go there
                    self._connector.targets[0].port = self._connector.port = self.port
                return None
            await asyncio.sleep(0.05)
        exited = proc.returncode is not None
        code = await self._terminate()
        why = _exit_reason(code) if exited and code is not None else error
        recent = "; ".join(self._recent)
        return f"{why}" + (f" ({recent})" if recent else "")

    async def _terminate(self) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL) and the log reader; its exit code, None if none ran."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log_event(log, logging.WARNING, "embedded_killed", broker=self.name, pid=proc.pid,
                          reason=f"no exit within {STOP_TIMEOUT:g}s of SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 1.0)  # the last lines ("terminating")
            self._reader = None
        self._proc = None
        return proc.returncode

    async def _forward_log(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: skipped
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            self._recent.append(text)
            level = logging.WARNING if text.startswith(("Error", "Warning")) else logging.INFO
            log_event(log, level, "embedded_log", broker=self.name, line=text)

    async def _supervise(self) -> None:
        """Until stopped: wait for a death (or HEALTH_FAILURES failed checks, then kill), restart after
        a back-off that doubles for every death within BACKOFF_WINDOW."""
        deaths: list[float] = []
        while True:
            reason = await self._until_down()
            if self._connector is not None:  # until a new child holds a port, nobody else's listener gets traffic
                self._connector.targets[0].port = self._connector.port = 0
            self.port = free_port(self.host)  # a fresh port: the old one is known to every local user
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < BACKOFF_WINDOW] + [now]
            while True:
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(deaths) - 1))
                log_event(log, logging.WARNING, "embedded_restarting", broker=self.name, reason=reason,
                          delay=delay)
                await asyncio.sleep(delay)
                error = await self._launch()
                if error is None:
                    break
                reason = f"restart failed: {error}"
                deaths.append(time.monotonic())
                self.port = free_port(self.host)  # perhaps someone took the port meanwhile
            self.restarts += 1
            log_event(log, logging.INFO, "embedded_started", broker=self.name, host=self.host, port=self.port,
                      pid=self.pid, restarts=self.restarts)

    async def _until_down(self) -> str:
        """Returns why the process is gone: it exited, or it failed HEALTH_FAILURES checks in a row (killed)."""
        proc = self._proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())  # one waiter for the process' whole life
        failures = 0
        while True:
            await asyncio.wait({exited}, timeout=HEALTH_INTERVAL)
            if exited.done():
                await self._terminate()  # collects the log reader
                reason = _exit_reason(exited.result())
                log_event(log, logging.WARNING, "embedded_exited", broker=self.name, pid=proc.pid, reason=reason)
                return reason
            error = await probe(self.host, self.port, self.credential)
            if error is None:
                failures = 0
                continue
            failures += 1
            log_event(log, logging.WARNING, "embedded_unhealthy", broker=self.name, pid=proc.pid, reason=error,
                      failures=failures)
            if failures >= HEALTH_FAILURES:
                await self._terminate()
                exited.cancel()
                return f"unhealthy: {error}"
