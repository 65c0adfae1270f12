"""The container health check: ``python -m broker.ops.healthcheck [CONFIG]``; exit 0 healthy, 1 not.

It asks the running process's own ``/healthz`` on the port its configuration sets (``metrics.bind``), so a
configuration that moves the metrics port needs no change to the image. The configuration is CONFIG, else
the ``-c``/``--config`` of the container's main process (``/proc/1/cmdline``: ``mqtt-front run -c ...``,
also behind an init such as tini), else ``/etc/mqtt-front/config.yaml``. Without ``metrics.bind`` there is
no ``/healthz``: the first listener's port must then accept a TCP connection.

It prints one line when unhealthy and never a traceback; it does not start anything or change any state.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from broker.config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/mqtt-front/config.yaml"
TIMEOUT = 4.0  # seconds; the image's HEALTHCHECK gives the whole check 5
# A wildcard bind is reached on loopback from inside the container.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def config_from_cmdline(argv: Sequence[str]) -> str | None:
    """The value of ``-c``/``--config`` in a command line (None when it has none)."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def main_process_config(cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    """The configuration file the container's main process was started with, if it can be read."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return config_from_cmdline(argv)


def _url_host(host: str) -> str:
    host = _LOOPBACK.get(host, host)
    return f"[{host}]" if ":" in host else host


def check(config_path: str) -> str | None:
    """None when the process behind ``config_path`` is healthy, else why not (one line)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return str(exc).splitlines()[0]
    address = config.metrics.host_port if config.metrics is not None else None
    if address is None:
        host, port = config.listeners[0].host_port
        try:
            socket.create_connection((_LOOPBACK.get(host, host), port), timeout=TIMEOUT).close()
        except OSError as exc:
            return f"listener {config.listeners[0].name} on port {port}: {exc.strerror or exc}"
        return None
    url = f"http://{_url_host(address[0])}:{address[1]}/healthz"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via HTTP_PROXY
        with opener.open(url, timeout=TIMEOUT) as answer:  # a non-2xx answer raises HTTPError
            answer.read()
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"{url}: {getattr(reason, 'strerror', None) or reason}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = args[0] if args else (main_process_config() or DEFAULT_CONFIG)
    problem = check(path)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
