"""Listener TLS: server contexts, SNI, client-certificate identities, certificate reload.

Owns one ``ssl.SSLContext`` per TLS listener, alive as long as the process. A reload (SIGHUP,
or the certificate/key files changing on disk) first loads the new chain into a scratch
context; only when that works is it loaded into the live context, which affects new
handshakes only: established connections keep their session untouched.

The version table, the never-prompt key policy and the PEM checks are :mod:`broker.tlsfiles`'
(shared with the upstream side). This module must not know the front broker or a connection:
callers hand it listener configs and get contexts back (:func:`server_ssl_context`). It also holds the
listeners' counts of refused handshakes (:class:`HandshakeFailures`; the metrics read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import ConfigError, ListenerConfig, ListenerTlsConfig
from broker.logs import log_event
from broker.tlsfiles import (
    TLS_VERSIONS,
    TlsFileError,
    key_type,
    no_passphrase,
    read_pem,
    require_certificate,
    require_private_key,
)

log = logging.getLogger("mqtt_front.tls")

POLL_INTERVAL = 2.0  # seconds between checks of the certificate files' mtimes

# Why a TLS handshake failed: the ``reason`` values of mqtt_front_handshake_failures_total (a fixed set).
TLS_FAILURES = (
    "tls_server_name",  # the SNI name is not in server_names (or there was none)
    "tls_client_certificate",  # no client certificate where one is required, or one that does not verify
    "tls_certificate_rejected",  # the client refused this listener's certificate (its alert says so)
    "tls_version",  # no TLS version or cipher in common
    "tls_not_tls",  # plain MQTT or HTTP on a TLS port
    "tls_handshake",  # any other handshake error
)
_TLS_REASONS = {
    "CALLBACK_FAILED": "tls_server_name",  # the SNI callback is the only callback a listener context has
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "tls_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "tls_client_certificate",
    "UNSUPPORTED_PROTOCOL": "tls_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls_version",
    "NO_SHARED_CIPHER": "tls_version",
    "WRONG_VERSION_NUMBER": "tls_not_tls",
    "HTTP_REQUEST": "tls_not_tls",
    "HTTPS_PROXY_REQUEST": "tls_not_tls",
}


class HandshakeFailures:
    """Refused handshakes (TLS, WebSocket upgrade, PROXY header) per (listener, reason): plain integers
    the listeners count into once per refused connection, read by the metrics collector at scrape time."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, listener: str, reason: str) -> None:
        key = (listener, reason)
        self.counts[key] = self.counts.get(key, 0) + 1


def tls_failure_reason(exc: ssl.SSLError) -> str:
    """The TLS_FAILURES value for a failed server-side handshake."""
    reason = exc.reason or ""
    known = _TLS_REASONS.get(reason)
    if known is not None:
        return known
    if "_ALERT_" in reason and ("CERTIFICATE" in reason or reason.endswith("UNKNOWN_CA")):
        return "tls_certificate_rejected"
    return "tls_handshake"


def _counting_sslobject(failures: HandshakeFailures, listener: str) -> type[ssl.SSLObject]:
    """The SSLObject class of a listener's context: counts the handshakes that fail. asyncio and uvloop
    call do_handshake until the handshake is done; reads and writes are not overridden, so they cost the same."""

    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                failures.count(listener, tls_failure_reason(exc))
                raise

    return CountingSSLObject


@dataclass(frozen=True, slots=True)
class ChainInfo:
    key_type: str | None
    cert_pem: bytes = b""  # the certificate chain loaded (for its expiry in the metrics)


def read_chain(cert: Path, key: Path, where: str) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate chain and its key, checked for shape; ConfigError naming the file."""
    texts: dict[str, bytes] = {}
    for name, path in (("cert", cert), ("key", key)):
        try:
            texts[name] = read_pem(path)
        except TlsFileError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from None
    try:
        require_certificate(texts["cert"], cert)
    except TlsFileError as exc:
        raise ConfigError(f"{where}.cert: {exc}") from None
    try:
        require_private_key(texts["key"], key)
    except TlsFileError as exc:
        raise ConfigError(f"{where}.key: {exc}") from None
    return texts["cert"], texts["key"]


def load_chain_bytes(context: ssl.SSLContext, chain: tuple[bytes, bytes], cert: Path, key: Path, where: str) -> None:
    """Load PEM bytes read by :func:`read_chain` (via a private temporary file: ssl only reads files).

    Loading bytes, not the paths again, means the scratch check and the live load see the same files.
    """
    with tempfile.TemporaryDirectory(prefix="mqtt-front-tls-") as tmp:
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(chain[1] + b"\n" + chain[0])
        try:
            context.load_cert_chain(path, password=no_passphrase)
        except TlsFileError as exc:
            raise ConfigError(f"{where}.key: {key}: {exc}") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"{where}.key: {key} does not match the certificate {cert}") from None
            raise ConfigError(f"{where}: cannot load {cert} with {key}: {exc.reason or exc}") from None


def load_chain(context: ssl.SSLContext, cert: Path, key: Path, where: str) -> ChainInfo:
    """Load a certificate chain and its key; ConfigError naming the key and file on failure."""
    chain = read_chain(cert, key, where)
    load_chain_bytes(context, chain, cert, key, where)
    return ChainInfo(key_type(chain[1]), chain[0])


def server_name_allowed(name: str | None, allowed: Sequence[str]) -> bool:
    """SNI check: exact names (case-insensitive) or ``*.domain`` for one more label. No SNI: refused."""
    if not name:
        return False
    name = name.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            first, _, rest = name.partition(".")
            if first and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False


def _sni_callback(listener: str, allowed: Sequence[str]) -> Any:
    names = tuple(allowed)

    def check(sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> int | None:
        if server_name_allowed(server_name, names):
            return None
        # "None": no SNI at all (an empty name shows as ""); a client-chosen name is quoted when it needs it.
        sni = "None" if server_name is None else server_name
        log_event(log, logging.INFO, "tls_refused", listener=listener, reason="unrecognized_server_name", sni=sni)
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    return check


def build_server_context(tls: ListenerTlsConfig, where: str, listener: str) -> tuple[ssl.SSLContext, ChainInfo]:
    """The server SSLContext for one listener's ``tls:`` block (``where`` is e.g. ``listeners.1.tls``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{where}.ciphers: no cipher matches {tls.ciphers!r}") from None
    info = load_chain(context, tls.cert, tls.key, where)
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except FileNotFoundError:
            raise ConfigError(f"{where}.client_ca: cannot read {tls.client_ca}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise ConfigError(f"{where}.client_ca: cannot load {tls.client_ca}: {reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.server_names:
        context.sni_callback = _sni_callback(listener, tls.server_names)
    return context, info


# ------------------------------------------------------------------ client certificate identity


def identity_from_peercert(cert: Mapping[str, Any] | None) -> str | None:
    """The username a verified client certificate stands for: its CN, else its first DNS/email SAN.

    A certificate with several CNs is ambiguous and gives None (refused).
    """
    if not cert:
        return None
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if len(names) == 1 and names[0]:
        return str(names[0])
    if len(names) > 1:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email") and value:
            return str(value)
    return None


def peer_identity(transport: Any) -> str | None:
    """The certificate identity of a TLS transport's client (None: no verified certificate)."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    return identity_from_peercert(cert) if isinstance(cert, Mapping) else None


# ------------------------------------------------------------------ live contexts and reload


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class ListenerTls:
    name: str
    where: str
    config: ListenerTlsConfig
    context: ssl.SSLContext
    key_type: str | None
    stamps: tuple[tuple[int, int, int] | None, ...]
    cert_pem: bytes = b""  # the chain in use: set at start and by every reload that loaded one

    def current_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.config.cert), _stamp(self.config.key))


class TlsContexts:
    """The TLS contexts of all listeners, their reload on demand and on file changes.

    Building it loads every listener's certificate and key (ConfigError, naming the key, before
    anything listens). The caller must :meth:`start` the file watcher once the listeners are up,
    call :meth:`reload` on SIGHUP, and ``await`` :meth:`stop` on shutdown.
    """

    def __init__(self, listeners: Sequence[ListenerConfig]) -> None:
        self.listeners: dict[str, ListenerTls] = {}
        self.poll_interval = POLL_INTERVAL
        self.failures = HandshakeFailures()  # every listener's refused handshakes (the edge counts into it)
        self._task: asyncio.Task[None] | None = None
        for i, listener in enumerate(listeners):
            if listener.tls is None:
                continue
            where = f"listeners.{i}.tls"
            stamps = (_stamp(listener.tls.cert), _stamp(listener.tls.key))
            context, info = build_server_context(listener.tls, where, listener.name)
            context.sslobject_class = _counting_sslobject(self.failures, listener.name)
            self.listeners[listener.name] = ListenerTls(
                listener.name, where, listener.tls, context, info.key_type, stamps, info.cert_pem
            )

    def context(self, listener: str) -> ssl.SSLContext | None:
        """The live context of a listener (None without ``tls:``); reloads change it in place."""
        item = self.listeners.get(listener)
        return item.context if item is not None else None

    def identity_as_username(self, listener: str) -> bool:
        """The listener's verified client-certificate identity stands for the username."""
        item = self.listeners.get(listener)
        return item is not None and item.config.use_identity_as_username

    def reload(self) -> bool:
        """Reload every listener's certificate and key (SIGHUP). True if all loaded."""
        ok = True
        for item in self.listeners.values():
            item.stamps = item.current_stamps()
            ok = self._reload_one(item) and ok
        return ok

    def check_files(self) -> None:
        """Reload the listeners whose certificate or key file changed since last seen."""
        for item in self.listeners.values():
            stamps = item.current_stamps()
            if stamps != item.stamps:
                item.stamps = stamps  # a broken file is reported once, retried when it changes again
                self._reload_one(item)

    def _reload_one(self, item: ListenerTls) -> bool:
        cert, key = item.config.cert, item.config.key
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            chain = read_chain(cert, key, item.where)
            load_chain_bytes(scratch, chain, cert, key, item.where)
            new_type = key_type(chain[1])
            if new_type != item.key_type:
                # OpenSSL keeps one certificate per key type: the old one would still be served.
                raise ConfigError(
                    f"{item.where}.key: key type changed ({item.key_type} -> {new_type}); restart to change it"
                )
            load_chain_bytes(item.context, chain, cert, key, item.where)
            item.cert_pem = chain[0]
        except (ConfigError, ssl.SSLError, OSError) as exc:
            log_event(
                log,
                logging.ERROR,
                "config_reload_failed",
                listener=item.name,
                file=str(cert),
                reason=f"{exc}; keeping the certificate in use",
            )
            return False
        log_event(log, logging.INFO, "config_reloaded", listener=item.name, file=str(cert))
        return True

    def start(self) -> None:
        """Start watching the certificate and key files (every ``poll_interval`` seconds)."""
        if self.listeners and self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        """Stop the file watcher; the contexts stay usable."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check_files()
            except Exception:  # the watcher must outlive any surprise
                log.exception("certificate file check failed")


def server_ssl_context(contexts: TlsContexts, listener: ListenerConfig) -> ssl.SSLContext | None:
    """The live server SSLContext of a listener, or None without ``tls:`` (for tcp and ws listeners).

    The caller passes it to ``create_server(ssl=...)`` (or to the PROXY protocol reader, which runs
    TLS after the header); reloads change this same object, so it is never fetched again.
    """
    return contexts.context(listener.name)
