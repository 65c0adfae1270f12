"""Upstream TLS configuration: ``upstream.tls`` into an ``ssl.SSLContext``, file checks, error hints.

:func:`build_context` is also what ``mqtt-front check`` runs, so a missing CA, an unreadable
certificate or a key that does not belong to the certificate is a configuration error naming
the key, before anything listens. :func:`describe_tls_error` turns an OpenSSL failure into one
line for the operator.

The version table, the never-prompt key policy and the PEM checks are :mod:`broker.tlsfiles`'
(shared with the listener side). This module opens no connection and keeps no state: the
connector builds the context once and must reuse it for every ``mqtts://`` upstream.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.config import ConfigError, UpstreamConfig, UpstreamTlsConfig
from broker.tlsfiles import (
    CERTIFICATE_BEGIN,
    TLS_VERSIONS,
    TlsFileError,
    no_passphrase,
    read_pem,
    refuse_encrypted_key,
    require_certificate,
)

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


def _read(key: str, path: Path) -> bytes:
    try:
        return read_pem(path)
    except TlsFileError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _check_certificate(pem: bytes, path: Path) -> None:
    """The file holds at least one certificate that OpenSSL can parse."""
    try:
        require_certificate(pem, path)
    except TlsFileError as exc:
        raise ConfigError(f"upstream.tls.cert: {exc}") from None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blocks = pem[pem.index(CERTIFICATE_BEGIN) :].decode("ascii", "replace")
    try:
        probe.load_verify_locations(cadata=blocks)
    except ssl.SSLError as exc:
        raise ConfigError(f"upstream.tls.cert: {path} holds no valid PEM certificate ({exc.reason or exc})") from None


def build_context(tls: UpstreamTlsConfig | None) -> ssl.SSLContext:
    """The client context for every ``mqtts://`` upstream; ConfigError names the failing key."""
    tls = tls or UpstreamTlsConfig()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.ca is not None:
        _read("upstream.tls.ca", tls.ca)
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
        cert_pem = _read("upstream.tls.cert", tls.cert)
        _check_certificate(cert_pem, tls.cert)
        key_pem = _read("upstream.tls.key", tls.key) if tls.key is not None else cert_pem
        key_name = "upstream.tls.key" if tls.key is not None else "upstream.tls.cert (no upstream.tls.key given)"
        try:
            refuse_encrypted_key(key_pem, tls.key or tls.cert)
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None, password=no_passphrase)
        except ValueError as exc:  # TlsFileError: the key is encrypted
            raise ConfigError(f"{key_name}: {exc}") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(
                    f"upstream.tls.key: {tls.key or tls.cert} is not the private key of the certificate {tls.cert}"
                ) from None
            problem = "not a PEM private key" if "PEM lib" in str(exc) else _load_error(exc)
            raise ConfigError(f"{key_name}: no usable private key in {tls.key or tls.cert}: {problem}") from None
    return ctx


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
