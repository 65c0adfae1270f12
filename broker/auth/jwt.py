"""JSON Web Tokens (``auth.jwt``) for browsers and short-lived clients: the keys and the verdict on a token.

Signatures are checked by PyJWT, never here. This module decides which keys a token may be checked
with, and what a verified token means for the session. No I/O after construction except
:meth:`JwtVerifier.reload`; :meth:`JwtVerifier.verify` is synchronous and cheap (one signature check
per candidate key, tens of microseconds), so the I/O layer may call it on the event loop.

Where the token is (``token_from``):

- ``password`` (default): the CONNECT password is the token. **The CONNECT username is ignored**, as
  EMQX's JWT authentication ignores it: the identity is the token's ``identity_claim``, signed by the
  issuer, and a client cannot change it by sending another username. Browser clients over MQTT 3.1.1
  must send *some* username to send a password at all, and many put a fixed word there; refusing a
  mismatch would break them and protect nothing. The caller must therefore use
  :attr:`JwtVerdict.identity`, never the CONNECT username, for everything after authentication (ACL,
  client-id policy, team, logs).
- ``username``: the CONNECT username is the token and the password is ignored.

Checks, in order: a token is present and is three base64url parts; its ``alg`` is one of
``auth.jwt.algorithms`` (so ``none`` is always refused); a key of that algorithm's family verifies it
(HS keys are only ever tried with HS algorithms, RSA keys with RS, EC keys with the ES algorithm of
their curve: an HS token "signed" with a public key is never checked against that key, which is the
alg-confusion attack); ``iss`` equals ``issuer`` and ``aud`` contains ``audience`` when configured (as
RFC 7519 requires, a token with an ``aud`` claim is refused when no ``audience`` is configured); then
``exp`` (required: browser tokens must be short-lived, and a token without one would be valid forever),
``nbf`` and ``iat`` with ``leeway``; the identity claim is a non-empty string; the ACL claim parses
(:mod:`acl.claims`); the mountpoint claim, when present, is a mountpoint
(:func:`broker.session.mount.mountpoint_problem`: ends with ``/``, no wildcard, not a ``$`` topic).

Key selection: keys with a ``kid`` (JWKS entries that have one) are only tried for a token naming that
``kid``; keys without one (``secret``, ``secret_file``, ``public_keys``, JWKS entries without ``kid``)
are tried for every token. A JWKS entry (read by :class:`jwt.PyJWK`) with an ``alg`` is used with that
algorithm only, one without with every configured algorithm of its family; entries whose ``use`` is not
``sig``, or for an algorithm not configured, are skipped.

Keys are checked when loaded: an HS secret at least as long as the hash (RFC 7518 section 3.2; 32 bytes
for HS256), RSA keys of at least 2048 bits, EC keys on P-256 or P-384, public keys only (a private key
in a key file is refused), and every configured key usable by some configured algorithm.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeGuard

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from acl.claims import ClaimPolicy, ClaimRule, FallbackPolicy, parse_acl_claim
from broker.config import ConfigError, JwtAuthConfig
from broker.session.mount import mountpoint_problem

if TYPE_CHECKING:
    from jwt.types import Options  # PyJWT 2.10+; at run time the annotation is never evaluated

JwtReason = Literal[
    "ok",
    "no token",
    "expired",
    "not yet valid",
    "bad signature",
    "bad audience",
    "bad issuer",
    "malformed",
    "no identity",
]

HS_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # the hash size, RFC 7518 section 3.2
RS_ALGORITHMS = frozenset({"RS256", "RS384", "RS512"})
ES_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}
MIN_RSA_BITS = 2048
MAX_IDENTITY = 65535  # bytes: an MQTT string
MAX_NUMERIC_DATE = 2**53  # seconds: far beyond any real exp, and exact as a float

# PyJWT checks the signature, iss and aud; the time claims are checked here, against the caller's clock.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,  # the identity claim is checked here, whichever claim it is
    "verify_jti": False,
    "require": [],
    "enforce_minimum_key_length": True,
}

# Raw keys, never PyJWK objects: the algorithm is then the token's, already checked against the key's family.
_VerifyKey = bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class JwtVerdict:
    """What a token proved. ``expires_at`` is when the session must end, on the ``time.time()`` clock: at
    ``exp``, as EMQX's ``disconnect_after_expire`` does; for a token already past its ``exp`` and accepted
    inside the leeway, at ``exp + leeway`` (ending it at ``exp`` would cut it off at once). ``rules`` are
    the token's ACL claim, placeholders unbound (see :meth:`access_policy`); ``rules_exclusive`` is set for
    EMQX's object form, whose lists are the whole policy. ``detail`` says more about a refusal for the log;
    it never holds the token."""

    ok: bool
    reason: JwtReason
    identity: str | None = None
    expires_at: float | None = None
    rules: tuple[ClaimRule, ...] = ()
    mountpoint: str = ""
    rules_exclusive: bool = False
    detail: str = ""
    # JwtVerifier.fingerprint of the verifier that accepted it (a reload compares it with the one in force).
    fingerprint: bytes = field(default=b"", compare=False, repr=False)

    def access_policy(self, fallback: FallbackPolicy, client_id: str) -> FallbackPolicy:
        """The session's access policy: the token's rules before ``fallback``, or ``fallback`` itself."""
        if not self.rules and not self.rules_exclusive:
            return fallback
        return ClaimPolicy(self.rules, fallback, self.identity, client_id, exclusive=self.rules_exclusive)


def _refuse(reason: JwtReason, detail: str = "") -> JwtVerdict:
    return JwtVerdict(False, reason, detail=detail)


@dataclass(frozen=True, slots=True)
class _Key:
    name: str  # the configuration key it came from, for messages
    kid: str | None
    algorithms: frozenset[str]
    key: _VerifyKey


def _fingerprint(config: JwtAuthConfig, keys: tuple[_Key, ...]) -> bytes:
    """A digest of what decides whether a token is accepted: the configuration and every key."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    for k in keys:
        key = k.key
        material = key if isinstance(key, bytes) else key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digest.update(repr((k.name, k.kid, sorted(k.algorithms))).encode() + material)
    return digest.digest()


# -- loading keys -------------------------------------------------------------------------------------


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None


def _secret_key(where: str, secret: bytes, algorithms: tuple[str, ...]) -> _Key:
    hs = [a for a in algorithms if a in HS_MIN_BYTES]
    if not hs:
        raise ConfigError(f"{where}: a shared secret, but auth.jwt.algorithms has no HS algorithm")
    if not secret:
        raise ConfigError(f"{where}: the secret is empty")
    for alg in hs:
        if len(secret) < HS_MIN_BYTES[alg]:
            raise ConfigError(
                f"{where}: the secret is {len(secret)} bytes; {alg} needs at least {HS_MIN_BYTES[alg]}"
                " (RFC 7518 section 3.2): use a longer secret or drop the algorithm"
            )
    return _Key(where, None, frozenset(hs), secret)


_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _fitting(key: _PublicKey, algorithms: tuple[str, ...]) -> frozenset[str]:
    """The configured algorithms of the key's family (RS for RSA, the ES of its curve for EC)."""
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset(a for a in algorithms if a in RS_ALGORITHMS)
    return frozenset(a for a in algorithms if ES_CURVES.get(a) == key.curve.name)


def _public_key_algorithms(where: str, key: object, algorithms: tuple[str, ...]) -> tuple[_PublicKey, frozenset[str]]:
    """The key as a public key and the configured algorithms that can use it; ``ConfigError`` if none."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: a {key.key_size}-bit RSA key is too weak (at least {MIN_RSA_BITS} bits)")
        usable = _fitting(key, algorithms)
        if not usable:
            raise ConfigError(f"{where}: an RSA key, but auth.jwt.algorithms has no RS256, RS384 or RS512")
        return key, usable
    if isinstance(key, ec.EllipticCurvePublicKey):
        usable = _fitting(key, algorithms)
        if not usable:
            raise ConfigError(
                f"{where}: an EC key on {key.curve.name}, but auth.jwt.algorithms has no algorithm for it"
                " (ES256 needs P-256, ES384 P-384)"
            )
        return key, usable
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"{where}: a private key; give the public key only")
    raise ConfigError(f"{where}: unsupported key type {type(key).__name__} (RSA or EC P-256/P-384 only)")


def _pem_key(where: str, path: Path, algorithms: tuple[str, ...]) -> _Key:
    data = _read(path, where)
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{where}: {path} holds a private key; give the public key (or certificate) only")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {path} is not a PEM public key or certificate") from None
    public, usable = _public_key_algorithms(f"{where}: {path}", key, algorithms)
    return _Key(where, None, usable, public)


def _jwk_key(name: str, kid: str | None, data: dict[str, object], algorithms: tuple[str, ...]) -> _Key | None:
    """One JWKS entry as a key; None when no configured algorithm can use it; ``ConfigError`` when unsafe."""
    declared = data.get("alg")
    if data.get("use", "sig") != "sig" or (declared is not None and declared not in algorithms):
        return None  # an encryption key, or a key for an algorithm not configured (PS256, EdDSA, ...)
    try:
        raw = jwt.PyJWK(data).key
    except jwt.PyJWTError as exc:
        if declared is None and data.get("kty") not in ("RSA", "EC", "oct"):
            return None  # a key type no configured algorithm could use
        raise ConfigError(f"{name}: {exc}") from None
    if isinstance(raw, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{name}: a private key; a JWKS file for verifying holds public keys only")
    if isinstance(raw, bytes):
        fits = [a for a in algorithms if a in HS_MIN_BYTES]
    elif isinstance(raw, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        fits = list(_fitting(raw, algorithms))
    else:
        return None
    if declared is not None:
        if declared not in fits:
            raise ConfigError(f"{name}: its alg {declared} does not fit its key")
        fits = [declared]
    if not fits:
        return None
    if isinstance(raw, bytes):
        for alg in fits:
            if len(raw) < HS_MIN_BYTES[alg]:
                raise ConfigError(f"{name}: an {alg} key needs at least {HS_MIN_BYTES[alg]} bytes")
        return _Key(name, kid, frozenset(fits), raw)
    public, usable = _public_key_algorithms(name, raw, algorithms)
    return _Key(name, kid, usable & frozenset(fits), public)


def _jwks_keys(where: str, path: Path, algorithms: tuple[str, ...]) -> list[_Key]:
    """The signing keys of a JWKS document, each as PyJWT's :class:`jwt.PyJWK` reads it."""
    try:
        document = json.loads(_read(path, where))
    except ValueError as exc:
        raise ConfigError(f"{where}: {path} is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'{where}: {path} is not a JWKS document (an object with a "keys" list)')
    keys: list[_Key] = []
    for n, data in enumerate(entries):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {path}: keys[{n}] is not an object")
        kid = data.get("kid") if isinstance(data.get("kid"), str) else None
        key = _jwk_key(f"{where} key {kid!r}" if kid is not None else f"{where} key #{n}", kid, data, algorithms)
        if key is not None:
            keys.append(key)
    if not keys:
        listed = ", ".join(algorithms)
        raise ConfigError(f"{where}: {path} has no signing key for auth.jwt.algorithms ({listed})")
    return keys


def load_keys(config: JwtAuthConfig) -> tuple[_Key, ...]:
    """Every key of ``config``, checked; ``ConfigError`` names the one that fails."""
    algorithms = tuple(config.algorithms)
    keys: list[_Key] = []
    if config.secret:
        keys.append(_secret_key("auth.jwt.secret", config.secret.encode(), algorithms))
    if config.secret_file is not None:
        lines = _read(config.secret_file, "auth.jwt.secret_file").splitlines()
        keys.append(_secret_key("auth.jwt.secret_file", lines[0] if lines else b"", algorithms))
    for i, path in enumerate(config.public_keys):
        keys.append(_pem_key(f"auth.jwt.public_keys.{i}", path, algorithms))
    if config.jwks_file is not None:
        keys.extend(_jwks_keys("auth.jwt.jwks_file", config.jwks_file, algorithms))
    return tuple(keys)


# -- verifying tokens ---------------------------------------------------------------------------------


def _number(value: object) -> TypeGuard[int | float]:
    """A NumericDate: a finite number, and an int no larger than a float holds exactly (10**400 would make
    math.isfinite, and later float(), raise)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE
    return isinstance(value, float) and math.isfinite(value)


def identity_problem(value: object) -> str | None:
    """Why an identity claim cannot be an MQTT identity (a non-empty UTF-8 string without U+0000), or None."""
    if not isinstance(value, str) or not value:
        return "not a non-empty string"
    if "\x00" in value:
        return "contains U+0000"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: not an MQTT string
        return "not valid UTF-8"
    return "longer than an MQTT string" if size > MAX_IDENTITY else None


class JwtVerifier:
    """Verifies the JWTs of ``auth.jwt``; keys are loaded (and checked) at construction."""

    def __init__(self, config: JwtAuthConfig) -> None:
        self.config = config
        self._algorithms = frozenset(config.algorithms)
        self._keys = load_keys(config)
        # What verifies tokens, as a digest: a reload checks the tokens of connected sessions again only when
        # it changed (a key dropped or rotated, the issuer or audience), not on every reload (each check is
        # about 100 us of CPU: 10,000 sessions would stall the loop a second).
        self.fingerprint = _fingerprint(config, self._keys)

    @property
    def token_from(self) -> str:
        """Which CONNECT field holds the token: "password" or "username"."""
        return self.config.token_from

    @property
    def key_names(self) -> tuple[str, ...]:
        """Where each loaded key came from (``mqtt-front check`` prints them)."""
        return tuple(k.name for k in self._keys)

    def reload(self) -> None:
        """Re-read ``secret_file``, ``public_keys`` and ``jwks_file`` (SIGHUP).

        All or nothing: when any key is missing or invalid, the keys in use stay and ``ConfigError``
        names the problem (the caller logs it). Tokens verified meanwhile see either set, never a mix.
        """
        self._keys = load_keys(self.config)
        self.fingerprint = _fingerprint(self.config, self._keys)

    def _token(self, username: str | None, password: bytes | None) -> str | JwtVerdict:
        if self.config.token_from == "username":
            return username if username else _refuse("no token")
        if not password:
            return _refuse("no token")
        try:
            return password.decode("ascii")
        except UnicodeDecodeError:
            return _refuse("malformed", "the token is not ASCII")

    def verify(self, username: str | None, password: bytes | None, now: float | None = None) -> JwtVerdict:
        """The verdict on the token the CONNECT carries (module docstring: the username is ignored when
        the password is the token). ``now`` is the ``time.time()`` clock, for tests."""
        token = self._token(username, password)
        if isinstance(token, JwtVerdict):
            return token
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _refuse("malformed", "not a JWS compact token")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            return _refuse("malformed", "alg or kid is not a string")
        if alg not in self._algorithms:
            return _refuse("bad signature", f"algorithm {alg!r} is not allowed")
        if "crit" in header:
            return _refuse("malformed", "critical header extensions are not supported")
        keys = self._keys  # one snapshot: a reload meanwhile swaps the whole tuple
        candidates = [k for k in keys if alg in k.algorithms and (kid is None or k.kid is None or k.kid == kid)]
        if not candidates:
            return _refuse("bad signature", f"no {alg} key" + (f" with kid {kid!r}" if kid is not None else ""))
        for key in candidates:
            try:
                payload = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[alg],
                    audience=self.config.audience,
                    issuer=self.config.issuer,
                    options=_DECODE_OPTIONS,
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except jwt.InvalidAudienceError:
                return _refuse("bad audience")
            except jwt.InvalidIssuerError:
                return _refuse("bad issuer")
            except jwt.MissingRequiredClaimError as exc:
                if exc.claim == "aud":
                    return _refuse("bad audience", "no aud claim")
                if exc.claim == "iss":
                    return _refuse("bad issuer", "no iss claim")
                return _refuse("malformed", f"no {exc.claim} claim")
            except jwt.InvalidAlgorithmError:
                return _refuse("bad signature", f"algorithm {alg!r} does not fit the key")
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
                # Attacker-chosen bytes: whatever else PyJWT or the JSON decoder rejects is a malformed token.
                return _refuse("malformed", "the token does not decode")
            return self._claims(payload, time.time() if now is None else now)
        return _refuse("bad signature", f"no {alg} key verifies it")

    def _claims(self, payload: dict[str, object], now: float) -> JwtVerdict:
        """The verified payload's time claims, identity, ACL and mountpoint."""
        config, leeway = self.config, self.config.leeway
        exp, nbf, iat = payload.get("exp"), payload.get("nbf"), payload.get("iat")
        if exp is None:
            return _refuse("malformed", "no exp claim (tokens must expire)")
        if not _number(exp) or any(v is not None and not _number(v) for v in (nbf, iat)):
            return _refuse("malformed", "exp, nbf and iat must be numbers")
        if exp <= now - leeway:
            return _refuse("expired")
        for name, value in (("nbf", nbf), ("iat", iat)):
            if isinstance(value, int | float) and value > now + leeway:
                return _refuse("not yet valid", f"{name} is in the future")
        identity = payload.get(config.identity_claim)
        if not isinstance(identity, str) or identity_problem(identity) is not None:
            return _refuse("no identity", f"claim {config.identity_claim!r}: {identity_problem(identity)}")
        rules: tuple[ClaimRule, ...] = ()
        exclusive = False
        if config.acl_claim is not None and config.acl_claim in payload:
            try:
                parsed = parse_acl_claim(payload[config.acl_claim])
            except ValueError as exc:
                return _refuse("malformed", f"claim {config.acl_claim!r}: {exc}")
            rules, exclusive = parsed.rules, parsed.exclusive
        mountpoint = ""
        if config.mountpoint_claim is not None and config.mountpoint_claim in payload:
            value = payload[config.mountpoint_claim]
            if not isinstance(value, str):
                return _refuse("malformed", f"claim {config.mountpoint_claim!r} is not a string")
            problem = mountpoint_problem(value)
            if problem is not None:
                return _refuse("malformed", f"claim {config.mountpoint_claim!r}: {problem}")
            mountpoint = value
        expires_at = float(exp) if exp > now else float(exp) + leeway
        return JwtVerdict(True, "ok", identity, expires_at, rules, mountpoint, exclusive, fingerprint=self.fingerprint)
