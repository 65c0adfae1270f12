"""Children that end with their parent: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``).

mqtt-front forks two kinds of children, its workers (``--workers N``) and the embedded Mosquitto. Either,
left behind by a parent killed with SIGKILL, would go on serving with nobody watching it: a worker keeps its
share of the port (SO_REUSEPORT), a Mosquitto its loopback port and credential. Each asks the kernel for a
signal when its parent dies, however it dies.

Split in two because of where it runs: :func:`resolve_prctl` in the parent before any fork (a child forked
from a process with threads must not ``dlopen``), :func:`end_with_parent` in the child, possibly between
fork and exec, where it may neither log nor allocate much: it returns what happened and the caller decides.
Knows nothing of MQTT or of what the child is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import cast

PR_SET_PDEATHSIG = 1  # linux/prctl.h

Prctl = Callable[..., int]


def resolve_prctl() -> Prctl | None:
    """libc's prctl, or None where there is none (not Linux). Call it in the parent, before forking."""
    if sys.platform != "linux":
        return None
    try:
        return cast(Prctl, ctypes.CDLL(None, use_errno=True).prctl)
    except (OSError, AttributeError):
        return None


def end_with_parent(prctl: Prctl | None, parent: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """In the child: ask for ``sig`` when the parent (pid ``parent``) dies. False if the parent died before
    the request was made (no signal will come: the caller ends itself). Raises OSError if prctl refuses;
    without prctl (not Linux) only the parent check is made."""
    if prctl is not None and prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return os.getppid() == parent
