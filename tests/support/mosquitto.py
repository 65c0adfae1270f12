"""Real Mosquitto processes: plain or TLS, each with its own config file and log on a free port."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.pki import Pki
from tests.support.ports import free_port, installed, stop_process, wait_port


def mosquitto_binary() -> str:
    return installed("mosquitto", "/usr/sbin/mosquitto")


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[bytes]
    conf: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def start_mosquitto(directory: Path, extra: str = "", port: int | None = None) -> Mosquitto:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}")
    os.chmod(directory, 0o755)
    os.chmod(conf, 0o644)
    log = open(directory / f"mosquitto-{port}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"mosquitto did not start: {(directory / f'mosquitto-{port}.log').read_text()}") from None
    return Mosquitto(port, proc, conf)


def start_tls_mosquitto(
    directory: Path, pki: Pki, *, expired: bool = False, require_cert: bool = False, extra: str = ""
) -> Mosquitto:
    """A Mosquitto whose only listener is TLS (the settings below belong to that listener)."""
    cert, key = (pki.expired_cert, pki.expired_key) if expired else (pki.server_cert, pki.server_key)
    extra = f"cafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n{extra}"
    if require_cert:
        extra += "require_certificate true\nuse_identity_as_username true\n"
    return start_mosquitto(directory, extra)


def mqtts(broker: Mosquitto) -> str:
    return f"mqtts://127.0.0.1:{broker.port}"


def mosquitto_log(broker: Mosquitto) -> str:
    return (broker.conf.parent / f"mosquitto-{broker.port}.log").read_text(errors="replace")
