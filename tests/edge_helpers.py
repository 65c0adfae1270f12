"""Helpers for the TLS and PROXY protocol tests: certificates made on the fly, a fake load balancer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.conftest import PASSWORD


@dataclass
class Pki:
    """A server CA with a server certificate on disk, and a separate CA for client certificates."""

    folder: Path
    ca: trustme.CA
    client_ca: trustme.CA
    other_ca: trustme.CA  # trusted by nobody

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def client_ca_file(self) -> Path:
        return self.folder / "client-ca.pem"

    def server_files(self, name: str = "server", *names: str) -> tuple[Path, Path, bytes]:
        """A new server certificate (``localhost``, ``127.0.0.1`` + names) -> (cert, key, DER)."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", *names)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        write_leaf(leaf, cert, key)
        return cert, key, der(leaf)

    def client_files(self, common_name: str, ca: trustme.CA | None = None, name: str = "client") -> tuple[Path, Path]:
        leaf = (ca or self.client_ca).issue_cert(f"{name}.clients.example", common_name=common_name)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        write_leaf(leaf, cert, key)
        return cert, key

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Write a chain and its key; world-readable, as a Mosquitto dropping privileges would need."""
    tmp_cert, tmp_key = cert.with_suffix(".tmp-cert"), key.with_suffix(".tmp-key")
    tmp_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    tmp_key.write_bytes(leaf.private_key_pem.bytes())
    for path in (tmp_cert, tmp_key):
        os.chmod(path, 0o644)
    os.replace(tmp_cert, cert)
    os.replace(tmp_key, key)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    pki = Pki(folder, trustme.CA(), trustme.CA(), trustme.CA())
    pki.ca.cert_pem.write_to_path(str(pki.ca_file))
    pki.client_ca.cert_pem.write_to_path(str(pki.client_ca_file))
    for path in (pki.ca_file, pki.client_ca_file):
        os.chmod(path, 0o644)
    return pki


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def connect_v311(client_id: str, username: str | None = None, password: str | None = PASSWORD) -> bytes:
    """A v3.1.1 CONNECT (clean session, keep-alive 30 s)."""
    flags = 0x02
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def read_connack(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readexactly(4)


async def tls_peer_cert(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    prefix: bytes = b"",
) -> bytes:
    """Handshake with 127.0.0.1:port and return the server certificate (DER); raises ssl.SSLError."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if prefix:
            writer.write(prefix)
            await writer.drain()
        async with asyncio.timeout(5):
            await writer.start_tls(context, server_hostname=server_hostname)
        ssl_object = writer.get_extra_info("ssl_object")
        cert: bytes = ssl_object.getpeercert(binary_form=True)
        return cert
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def balancer(target_port: int, header: Callable[[tuple[str, int]], bytes]) -> AsyncIterator[int]:
    """A fake TCP load balancer on a free port: prepends ``header(client_address)`` and relays both ways."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        up_writer.write(header(writer.get_extra_info("peername")))
        for task in (asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
