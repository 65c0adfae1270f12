"""TLS facts both sides share: the version table, the never-prompt key policy, PEM file checks.

Owns the one ``TLS_VERSIONS`` table (config names to ``ssl.TLSVersion``), the one passphrase policy
(an encrypted key is refused, up front by :func:`refuse_encrypted_key` and, as a backstop, by the
:func:`no_passphrase` callback: loading a key never prompts on a terminal), and the PEM helpers the
listener side (:mod:`broker.edge.tls`) and the upstream side (:mod:`broker.upstream.tls_config`) both use.

A shared leaf: it imports only the standard library (not even :mod:`broker.config`, its sibling), builds
no contexts, logs nothing, opens no sockets. Problems are :class:`TlsFileError` whose message names the
file; the caller must turn it into a ``ConfigError`` that also names its configuration key.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
)
"""``min_version`` names (the values ``broker.config`` accepts) to ``SSLContext.minimum_version``."""

CERTIFICATE_BEGIN = b"-----BEGIN CERTIFICATE-----"

_ENCRYPTED = "is encrypted; give an unencrypted key readable only by this service"
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\r?\n(.*?)-----END", re.S)
# AlgorithmIdentifier OIDs (DER) inside a PKCS#8 key
_KEY_OIDS = {
    bytes.fromhex("06092a864886f70d010101"): "RSA",
    bytes.fromhex("06072a8648ce3d0201"): "EC",
    bytes.fromhex("06032b6570"): "ED25519",
    bytes.fromhex("06032b6571"): "ED448",
}


class TlsFileError(ValueError):
    """A certificate or key file that cannot be used; the message names the file, not the config key."""


def no_passphrase() -> bytes:
    """The ``password=`` of every ``load_cert_chain``: an encrypted key fails to load, never prompts.

    Raises :class:`TlsFileError` (``load_cert_chain`` passes it through); the caller must catch it
    next to ``ssl.SSLError``.
    """
    raise TlsFileError(f"the key {_ENCRYPTED}")


def read_pem(path: Path) -> bytes:
    """The bytes of a certificate, key or CA file; TlsFileError ``cannot read PATH: why`` when unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def require_certificate(pem: bytes, path: Path) -> None:
    """TlsFileError unless ``pem`` holds at least one PEM certificate block (its shape; not parsed)."""
    if CERTIFICATE_BEGIN not in pem:
        raise TlsFileError(f"{path} holds no PEM certificate")


def refuse_encrypted_key(pem: bytes, path: Path) -> None:
    """TlsFileError when the key in ``pem`` is encrypted: the service has no passphrase to give."""
    if b"ENCRYPTED" in pem:
        raise TlsFileError(f"{path} {_ENCRYPTED}")


def require_private_key(pem: bytes, path: Path) -> None:
    """TlsFileError unless ``pem`` holds a PEM private key block that is not encrypted."""
    if _PEM_KEY.search(pem) is None:
        raise TlsFileError(f"{path} holds no PEM private key")
    refuse_encrypted_key(pem, path)


def key_type(pem: bytes) -> str | None:
    """RSA, EC, DSA, ED25519 or ED448 for the first private key in ``pem``; None when unknown."""
    match = _PEM_KEY.search(pem)
    if match is None:
        return None
    label = match.group(1).strip().decode("ascii", "replace")
    if label in ("RSA", "EC", "DSA"):
        return label
    try:
        der = base64.b64decode(b"".join(match.group(2).split()))
    except ValueError:
        return None
    head = der[:40]
    return next((name for oid, name in _KEY_OIDS.items() if oid in head), None)
