"""broker.parent_death: a child that asked for it gets its signal when its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import time

import pytest

from broker.parent_death import end_with_parent, resolve_prctl


def _state(pid: int) -> str | None:
    """The process's state letter (Z: dead, not reaped yet), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_child_gets_sigterm_when_its_parent_is_killed() -> None:
    prctl = resolve_prctl()
    assert prctl is not None
    ready_r, ready_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the parent to be killed: forks the child, then waits
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            asked = end_with_parent(prctl, os.getppid())
            os.write(ready_w, f"{os.getpid()} {int(asked)}\n".encode())
            time.sleep(30)
            os._exit(0)
        time.sleep(30)
        os._exit(0)
    os.close(ready_w)
    with os.fdopen(ready_r) as ready:
        child_pid, asked_ok = map(int, ready.readline().split())
    assert asked_ok == 1
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    deadline = time.monotonic() + 5
    while _state(child_pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _state(child_pid) in (None, "Z"), "the child outlived its parent"


def test_a_parent_gone_before_the_request_is_reported() -> None:
    assert end_with_parent(None, os.getppid())
    assert not end_with_parent(None, os.getppid() + 1 if os.getppid() > 1 else 2)


def test_a_refused_request_raises() -> None:
    def refusing(*_args: object) -> int:
        return -1

    with pytest.raises(OSError):
        end_with_parent(refusing, os.getppid())
