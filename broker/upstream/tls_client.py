"""TLS from the front broker to the internal broker, with session resumption.

asyncio's ``create_connection(ssl=...)`` cannot take an ``ssl.SSLSession``, so a reconnect
storm would pay a full handshake per client. Here TLS runs over ``ssl.MemoryBIO``:

* :class:`TlsClient` is Sans-I/O: ciphertext in, plaintext and ciphertext out, no socket,
  no event loop. It is given the last good session of its upstream to resume.
* :class:`TlsStream` drives a :class:`TlsClient` from a raw TCP connection and looks like an
  ``asyncio.Transport`` to the protocol above it (the per-client upstream connection).

The context comes from :func:`broker.upstream.tls_config.build_context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, cast

from broker.upstream.tls_config import describe_tls_error

_READ_SIZE = 65536


# ------------------------------------------------------------------------------------- Sans-I/O


class TlsClient:
    """The client side of one TLS connection, without I/O.

    ``start()`` returns the ClientHello; ``receive(ciphertext)`` returns ``(plaintext, ciphertext
    to send)``; ``send(plaintext)`` returns ciphertext. Plaintext sent before the handshake ends is
    kept and encrypted as soon as it can be. TLS errors are raised as ``ssl.SSLError``.
    """

    def __init__(
        self, context: ssl.SSLContext, server_hostname: str | None, session: ssl.SSLSession | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname, session=session
        )
        self.handshake_done = False
        self.peer_closed = False  # the peer sent close_notify
        self._pending: list[bytes] = []

    def start(self) -> bytes:
        self._handshake()
        return self._outgoing.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        if data:
            self._incoming.write(data)
        if not self.handshake_done:
            self._handshake()
        plain: list[bytes] = []
        if self.handshake_done and not self.peer_closed:
            read = self.sslobj.read
            while True:
                try:
                    chunk = read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.peer_closed = True
                    break
                if not chunk:
                    break
                plain.append(chunk)
        return b"".join(plain), self._outgoing.read()

    def send(self, data: bytes) -> bytes:
        if not self.handshake_done:
            self._pending.append(data)
            return b""
        self.sslobj.write(data)
        return self._outgoing.read()

    def close(self) -> bytes:
        """close_notify, when the handshake got that far."""
        if self.handshake_done and not self.peer_closed:
            with contextlib.suppress(ssl.SSLError):
                self.sslobj.unwrap()
        return self._outgoing.read()

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.sslobj.session

    @property
    def session_reused(self) -> bool:
        return self.sslobj.session_reused

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.handshake_done = True
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self.sslobj.write(data)


# ------------------------------------------------------------------------------------- asyncio


class TlsStream(asyncio.Protocol, asyncio.Transport):
    """The protocol of a raw TCP connection, and the transport of the protocol above (``app``).

    ``handshake`` completes when the TLS handshake does. ``on_session`` receives the session to
    resume next time, once it carries a ticket (TLS 1.3 sends tickets after the handshake).
    ``on_error`` hears of a TLS error after the handshake (a TLS 1.3 server refuses a client
    certificate only then), before the app sees ``connection_lost``.
    """

    def __init__(
        self,
        tls: TlsClient,
        app: asyncio.BaseProtocol,
        *,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        asyncio.Transport.__init__(self)
        self.tls = tls
        self.app = app
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_session = on_session
        self._on_error = on_error
        self._raw: asyncio.Transport | None = None
        self._closing = False
        self._app_lost = False
        self._heard = False  # anything came from the upstream after the handshake
        self._established = False  # the handshake succeeded: the app owns the connection

    # -- raw side -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)
        self._raw.write(self.tls.start())

    def data_received(self, data: bytes) -> None:
        raw = self._raw
        assert raw is not None
        if self.tls.handshake_done:
            self._heard = True
        try:
            plain, out = self.tls.receive(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if out:
            raw.write(out)
        if self.tls.handshake_done:
            if not self._established:
                self._established = True
                if not self.handshake.done():
                    self.handshake.set_result(None)
                self.app.connection_made(self)
            if self._on_session is not None:
                self._capture_session()
            if plain and not self._app_lost:
                cast(asyncio.Protocol, self.app).data_received(plain)
        if self.tls.peer_closed:
            raw.close()

    def eof_received(self) -> bool | None:
        return None  # the raw transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._established:
            if not self.handshake.done():
                self.handshake.set_exception(
                    exc or ConnectionResetError("closed during the TLS handshake (is it a TLS listener?)")
                )
        elif not self._app_lost:
            if not self._heard and not self._closing and self.tls.sslobj.version() == "TLSv1.3":
                # A TLS 1.3 server checks the client certificate after the client considers the
                # handshake done; its alert often loses the race with the TCP reset that follows.
                exc = ConnectionError(
                    f"the upstream dropped the connection right after the TLS handshake ({exc or 'closed'}): "
                    "it most likely refused the front broker's client certificate, or requires one "
                    "(upstream.tls.cert/key); its log says which"
                )
                if self._on_error is not None:
                    self._on_error(exc)
            self._app_lost = True
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    def _capture_session(self) -> None:
        session = self.tls.session
        if session is None:
            return
        if session.has_ticket or self.tls.sslobj.version() != "TLSv1.3":
            callback = self._on_session
            self._on_session = None
            if callback is not None:
                callback(session)

    def _fail(self, exc: ssl.SSLError) -> None:
        if not self._established:
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            self._abort_raw()
            return
        if self._on_error is not None:
            self._on_error(exc)
        self._abort_raw()
        if not self._app_lost:
            self._app_lost = True
            self.app.connection_lost(ConnectionError(describe_tls_error(exc)))

    def _abort_raw(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # -- transport side (what the app sees) ---------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._raw is None:
            return
        try:
            out = self.tls.send(bytes(data))
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if out:
            self._raw.write(out)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.write(self.tls.close())
            self._raw.close()

    def abort(self) -> None:
        """Drop the connection now (also used when the handshake times out)."""
        if not self.handshake.done():
            self.handshake.cancel()
        self._abort_raw()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw is not None and self._raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        obj = self.tls.sslobj
        if name == "ssl_object":
            return obj
        if name == "peercert":
            return obj.getpeercert()
        if name == "cipher":
            return obj.cipher()
        if name == "session_reused":
            return obj.session_reused
        return self._raw.get_extra_info(name, default) if self._raw is not None else default
