"""The ``mqtt-front`` command as the tests run it: the installed script (or ``python -m broker.cli``),
from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
