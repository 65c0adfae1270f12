"""The ``mqtt-front`` command as the tests run it: the installed script (or ``python -m broker.cli``),
from the repository root."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import wait_port

ROOT = Path(__file__).resolve().parents[2]  # the repository
EXAMPLE = ROOT / "config" / "example.yaml"


def mqtt_front() -> list[str]:
    """The command line that starts ``mqtt-front``."""
    script = Path(sys.executable).parent / "mqtt-front"
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker.cli"]


def run_cli(*args: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``mqtt-front *args`` to completion, in the repository root; text output captured."""
    return subprocess.run([*mqtt_front(), *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@contextlib.contextmanager
def running(config: Path, log: Path, *args: str, ports: tuple[int, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """``mqtt-front run -c config *args`` in the background, logging to ``log``, until ``ports`` listen;
    stopped with SIGTERM (then killed) when the block ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(config), *args], stdout=out, stderr=out)
        try:
            for port in ports:
                wait_port(port)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
