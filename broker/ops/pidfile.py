"""The pid file of ``mqtt-front run --pid-file PATH``, read by ``mqtt-front reload --pid-file PATH``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# What a running front broker's command line contains: the installed script, or ``python -m broker.cli``.
COMMAND_MARKERS = ("mqtt-front", "broker.cli")


class PidFileError(Exception):
    """The pid file cannot be used; worded for the operator."""


def write_pid_file(path: str | Path) -> None:
    """This process's pid, written atomically (a reader never sees half a file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{os.getpid()}\n", encoding="ascii")
    os.replace(temporary, path)


def remove_pid_file(path: str | Path) -> None:
    """Remove the pid file if it still holds this process's pid (another process may have taken it over)."""
    with contextlib.suppress(OSError, PidFileError):
        if read_pid_file(path) == os.getpid():
            Path(path).unlink()


def read_pid_file(path: str | Path) -> int:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise PidFileError(f"{path} does not exist (is mqtt-front running with --pid-file {path}?)") from None
    except OSError as exc:
        raise PidFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PidFileError(f"{path} does not hold a pid") from None
    if not text.isdigit() or int(text) < 2:
        raise PidFileError(f"{path} does not hold a pid: {text[:40]!r}")
    return int(text)


def command_line(pid: int) -> list[str] | None:
    """The process's command line, or None when it cannot be read (no /proc, or no such process)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def signal_process(path: str | Path, signum: int) -> int:
    """Send ``signum`` to the mqtt-front whose pid ``path`` holds; its pid. PidFileError when the pid is
    not running, or is a process that is not mqtt-front (a stale file whose pid was reused)."""
    pid = read_pid_file(path)
    args = command_line(pid)
    # The program itself (argv[0..2]: the script, or `python -m broker.cli`), not any argument that names
    # it (an editor open on /etc/mqtt-front/front.yaml is not mqtt-front).
    if args is not None and not any(os.path.basename(arg) in COMMAND_MARKERS for arg in args[:3]):
        raise PidFileError(f"pid {pid} (from {path}) is not mqtt-front: a stale pid file? Nothing was signalled")
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise PidFileError(f"no process with pid {pid} (from {path}): a stale pid file?") from None
    except PermissionError:
        raise PidFileError(f"not allowed to signal pid {pid} (from {path}): run as the user of mqtt-front") from None
    return pid
