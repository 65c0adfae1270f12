"""The processes of ``mqtt-front run --workers N`` as tests see them: the workers, and who holds a socket."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def socket_owners(front_port: int) -> dict[int, int]:
    """Client port -> the worker pid holding the accepted socket (from /proc/net/tcp and each pid's fds)."""
    inodes: dict[str, int] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.split(":")[1], 16) == front_port and remote.split(":")[1] != "0000":
                inodes[inode] = int(remote.split(":")[1], 16)
    owners: dict[int, int] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[inodes[target[8:-1]]] = pid
    return owners
