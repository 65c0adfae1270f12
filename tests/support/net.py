"""TCP plumbing between a client and a server: a relay that records both directions (optionally a fake
load balancer that sends a PROXY protocol header first), and a TLS handshake that returns the peer certificate."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

Header = Callable[[tuple[str, int]], bytes]  # the client's address -> bytes sent upstream before its own


@dataclass
class Relay:
    """A TCP relay on a free port to ``target_port``; records every byte in both directions."""

    target_port: int
    header: Header | None = None
    port: int = 0
    upstream_bytes: bytearray = field(default_factory=bytearray)  # client -> target
    downstream_bytes: bytearray = field(default_factory=bytearray)  # target -> client
    server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        if self.header is not None:
            up_writer.write(self.header(writer.get_extra_info("peername")))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
            try:
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def balancer(target_port: int, header: Header) -> AsyncIterator[int]:
    """A fake TCP load balancer on a free port: prepends ``header(client_address)`` and relays both ways."""
    relay = await Relay(target_port, header).start()
    try:
        yield relay.port
    finally:
        await relay.stop()


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
