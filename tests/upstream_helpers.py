"""Certificates and TLS Mosquittos for the upstream TLS / failover tests (generated per run, never committed)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.conftest import Mosquitto, start_mosquitto


@dataclass
class Pki:
    directory: Path
    ca: Path  # signs the brokers' and the front broker's certificates
    other_ca: Path  # trusted by nobody
    server_cert: Path  # 127.0.0.1 / localhost, chain PEM
    server_key: Path
    expired_cert: Path  # same names, expired yesterday
    expired_key: Path
    front_cert: Path  # client certificate of the front broker, CN front-svc
    front_key: Path
    rogue_cert: Path  # client certificate from other_ca
    rogue_key: Path


FRONT_CN = "front-svc"


@contextlib.contextmanager
def pki_directory() -> Iterator[Path]:
    """A folder Mosquitto's own user can reach: pytest's tmp folders are private (0700) to root."""
    with tempfile.TemporaryDirectory(prefix="mqtt-front-pki-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def make_pki(directory: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> Pki:
    """All files world-readable: Mosquitto drops root before it reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(key_type=key_type), trustme.CA(key_type=key_type)
    now = datetime.datetime.now(datetime.UTC)
    server = ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
    day = datetime.timedelta(days=1)
    expired = ca.issue_cert("127.0.0.1", "localhost", not_before=now - 10 * day, not_after=now - day, key_type=key_type)
    front = ca.issue_cert("front.internal.example", common_name=FRONT_CN, key_type=key_type)
    rogue = other.issue_cert("front.internal.example", common_name="rogue", key_type=key_type)
    files: dict[str, Any] = {
        "ca.pem": ca.cert_pem,
        "other-ca.pem": other.cert_pem,
        "server.pem": server.cert_chain_pems[0],
        "server.key": server.private_key_pem,
        "expired.pem": expired.cert_chain_pems[0],
        "expired.key": expired.private_key_pem,
        "front.pem": front.cert_chain_pems[0],
        "front.key": front.private_key_pem,
        "rogue.pem": rogue.cert_chain_pems[0],
        "rogue.key": rogue.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(directory / name))
        os.chmod(directory / name, 0o644)
    os.chmod(directory, 0o755)
    d = directory
    return Pki(
        d,
        d / "ca.pem",
        d / "other-ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "expired.pem",
        d / "expired.key",
        d / "front.pem",
        d / "front.key",
        d / "rogue.pem",
        d / "rogue.key",
    )


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


@dataclass
class Relay:
    """A TCP relay that records every byte in both directions."""

    target_port: int
    port: int = 0
    upstream_bytes: bytearray = field(default_factory=bytearray)  # front -> broker
    downstream_bytes: bytearray = field(default_factory=bytearray)  # broker -> front
    server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (
            asyncio.ensure_future(pipe(reader, up_writer, self.upstream_bytes)),
            asyncio.ensure_future(pipe(up_reader, writer, self.downstream_bytes)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self.server is not None:
            await self.server.wait_closed()
