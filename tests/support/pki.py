"""The one PKI of the tests: trustme CAs and certificates in a folder Mosquitto can read.

Mosquitto started as root drops to its own user before it reads its certificates, and pytest's
tmp folders are private (0700): the folder comes from ``pki_directory()`` and every file in it
is world-readable. Generated per run, never committed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

FRONT_CN = "front-svc"  # common name of the front broker's client certificate towards the upstream


@contextlib.contextmanager
def pki_directory() -> Iterator[Path]:
    """A temporary folder Mosquitto's own user can reach."""
    with tempfile.TemporaryDirectory(prefix="mqtt-front-pki-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


@dataclass
class Pki:
    """Three CAs and the certificates the tests need, as files in ``folder``.

    - ``authority`` (``ca.pem``) signs every server certificate (the front broker's listeners and
      the Mosquittos) and the front broker's client certificate towards the upstream;
    - ``client_authority`` (``client-ca.pem``) signs client certificates for the front broker's listeners;
    - ``other_authority`` (``other-ca.pem``) is trusted by nobody.
    """

    folder: Path
    authority: trustme.CA
    client_authority: trustme.CA
    other_authority: trustme.CA
    key_type: trustme.KeyType = trustme.KeyType.ECDSA

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def client_ca(self) -> Path:
        return self.folder / "client-ca.pem"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.pem"

    # Made by make_pki: a server certificate for 127.0.0.1 / localhost, the same names expired
    # yesterday, the front broker's client certificate (CN front-svc) and a rogue one from other_authority.

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def expired_cert(self) -> Path:
        return self.folder / "expired.pem"

    @property
    def expired_key(self) -> Path:
        return self.folder / "expired.key"

    @property
    def front_cert(self) -> Path:
        return self.folder / "front.pem"

    @property
    def front_key(self) -> Path:
        return self.folder / "front.key"

    @property
    def rogue_cert(self) -> Path:
        return self.folder / "rogue.pem"

    @property
    def rogue_key(self) -> Path:
        return self.folder / "rogue.key"

    def server_files(self, name: str, *names: str) -> tuple[Path, Path, bytes]:
        """A new server certificate (``localhost``, ``127.0.0.1`` + names) -> (cert, key, DER)."""
        leaf = self.authority.issue_cert("localhost", "127.0.0.1", *names, key_type=self.key_type)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        write_leaf(leaf, cert, key)
        return cert, key, der(leaf)

    def client_files(
        self, common_name: str, authority: trustme.CA | None = None, name: str = "client"
    ) -> tuple[Path, Path]:
        leaf = (authority or self.client_authority).issue_cert(
            f"{name}.clients.example", common_name=common_name, key_type=self.key_type
        )
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        write_leaf(leaf, cert, key)
        return cert, key

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts ``authority`` (and presents ``cert`` when given)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context


def make_pki(folder: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> Pki:
    """All files world-readable: Mosquitto drops root before it reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    pki = Pki(folder, trustme.CA(key_type=key_type), trustme.CA(key_type=key_type), trustme.CA(key_type=key_type),
              key_type)
    for authority, path in ((pki.authority, pki.ca), (pki.client_authority, pki.client_ca),
                            (pki.other_authority, pki.other_ca)):
        authority.cert_pem.write_to_path(str(path))
        os.chmod(path, 0o644)
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca, other = pki.authority, pki.other_authority
    leaves = [
        (ca.issue_cert("127.0.0.1", "localhost", key_type=key_type), pki.server_cert, pki.server_key),
        (ca.issue_cert("127.0.0.1", "localhost", not_before=now - 10 * day, not_after=now - day, key_type=key_type),
         pki.expired_cert, pki.expired_key),
        (ca.issue_cert("front.internal.example", common_name=FRONT_CN, key_type=key_type),
         pki.front_cert, pki.front_key),
        (other.issue_cert("front.internal.example", common_name="rogue", key_type=key_type),
         pki.rogue_cert, pki.rogue_key),
    ]
    for leaf, cert, key in leaves:
        write_leaf(leaf, cert, key)
    return pki


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Write a chain and its key, world-readable; replaced atomically (a watcher never sees half a file)."""
    tmp_cert, tmp_key = cert.with_suffix(".tmp-cert"), key.with_suffix(".tmp-key")
    tmp_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    tmp_key.write_bytes(leaf.private_key_pem.bytes())
    for path in (tmp_cert, tmp_key):
        os.chmod(path, 0o644)
    os.replace(tmp_cert, cert)
    os.replace(tmp_key, key)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))
