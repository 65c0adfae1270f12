"""TLS from the front broker to the internal broker, with session resumption.

asyncio's ``create_connection(ssl=...)`` cannot take an ``ssl.SSLSession``, so a reconnect
storm would pay a full handshake per client. Here TLS runs over ``ssl.MemoryBIO``:

* :class:`TlsClient` is Sans-I/O: ciphertext in, plaintext and ciphertext out, no socket,
  no event loop. It is given the last good session of its upstream to resume.
* :class:`TlsStream` drives a :class:`TlsClient` from a raw TCP connection and looks like an
  ``asyncio.Transport`` to the protocol above it (the per-client upstream connection).

:func:`build_context` turns ``upstream.tls`` into an ``ssl.SSLContext``; it is also what
``mqtt-front check`` runs, so a missing CA, an unreadable certificate or a key that does not
belong to the certificate is a configuration error naming the key, before anything listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from broker.config import ConfigError, UpstreamConfig, UpstreamTlsConfig

_READ_SIZE = 65536

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL reason codes worth an explanation in the log line.
_HINTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the upstream requires a client certificate: set upstream.tls.cert/key",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the upstream refused the front broker's client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the upstream does not trust the CA of the front broker's client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the upstream says the front broker's client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the upstream refused the front broker's client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the upstream refused the front broker's client certificate",
    "WRONG_VERSION_NUMBER": "no TLS on this port: is it a plain mqtt:// listener?",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common: see upstream.tls.min_version",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common: see upstream.tls.min_version",
}

# X509 verify codes meaning "no trusted CA for this chain".
_UNTRUSTED = {2, 18, 19, 20, 21}


def describe_tls_error(exc: BaseException) -> str:
    """One line for the operator: what failed and, where known, why."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = " (not issued by a CA in upstream.tls.ca)" if exc.verify_code in _UNTRUSTED else ""
        return f"certificate verify failed: {exc.verify_message}{hint}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        text = reason.lower().replace("_", " ")
        alert = _HINTS.get(reason)
        return f"TLS error: {text}" + (f" ({alert})" if alert else "")
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------------------- context


def _load_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return exc.strerror or str(exc)
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    return str(exc)


def _readable(key: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _check_certificate(path: Path) -> None:
    """The file holds at least one certificate that OpenSSL can parse."""
    text = path.read_text(encoding="ascii", errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"upstream.tls.cert: {path} holds no PEM certificate")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blocks = text[text.index("-----BEGIN CERTIFICATE-----") :]
    try:
        probe.load_verify_locations(cadata=blocks)
    except ssl.SSLError as exc:
        raise ConfigError(f"upstream.tls.cert: {path} holds no valid PEM certificate ({exc.reason or exc})") from None


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted (mqtt-front needs an unencrypted key file, readable by it only)")


def build_context(tls: UpstreamTlsConfig | None) -> ssl.SSLContext:
    """The client context for every ``mqtts://`` upstream; ConfigError names the failing key."""
    tls = tls or UpstreamTlsConfig()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca is not None:
        _readable("upstream.tls.ca", tls.ca)
        try:
            ctx.load_verify_locations(cafile=str(tls.ca))
        except (ssl.SSLError, OSError) as exc:
            problem = _load_error(exc)
            raise ConfigError(f"upstream.tls.ca: cannot load CA certificates from {tls.ca}: {problem}") from None
    elif tls.verify:
        ctx.load_default_certs()
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        _readable("upstream.tls.cert", tls.cert)
        _check_certificate(tls.cert)
        if tls.key is not None:
            _readable("upstream.tls.key", tls.key)
        key_name = "upstream.tls.key" if tls.key is not None else "upstream.tls.cert (no upstream.tls.key given)"
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None, password=_no_passphrase)
        except ValueError as exc:
            raise ConfigError(f"{key_name}: {exc}") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(
                    f"upstream.tls.key: {tls.key or tls.cert} is not the private key of the certificate {tls.cert}"
                ) from None
            problem = "not a PEM private key" if "PEM lib" in str(exc) else _load_error(exc)
            raise ConfigError(f"{key_name}: no usable private key in {tls.key or tls.cert}: {problem}") from None
    return ctx


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


# ------------------------------------------------------------------------------------- check


def check_upstream(config: UpstreamConfig) -> list[str]:
    """What ``mqtt-front check`` prints about the upstream; loads the TLS files (ConfigError if not)."""
    urls = config.all_urls
    lines = [f"upstream: {urls[0]}" if len(urls) == 1 else f"upstream: {', '.join(urls)} ({config.strategy})"]
    if not config.uses_tls:
        lines.append("upstream TLS: none (plain mqtt://): internal traffic is not encrypted")
        return lines
    tls = config.tls or UpstreamTlsConfig()
    build_context(tls)
    trust = f"CA {tls.ca}" if tls.ca else "the system CA store"
    name = f", name {tls.server_hostname}" if tls.server_hostname else ""
    lines.append(f"upstream TLS: {tls.min_version}+, certificate verified against {trust}{name}")
    if tls.cert is not None:
        lines.append(f"upstream TLS: client certificate {tls.cert} (key {tls.key or tls.cert}) loads and matches")
    if not tls.verify:
        lines.append("WARNING: upstream.tls.verify is false: the upstream's certificate is NOT verified")
    if not tls.session_resumption:
        lines.append("upstream TLS: session resumption off (every connect is a full handshake)")
    return lines
