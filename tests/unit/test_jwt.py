"""Unit tests of broker.auth.jwt: keys, signatures, claims and reload. Tokens are made here with PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

from acl.claims import ClaimPolicy, ClaimRule
from broker.auth.jwt import JwtVerdict, JwtVerifier
from broker.config import ConfigError, JwtAlgorithm, JwtAuthConfig

SECRET = "s" * 32
NOW = 1_700_000_000.0
ALL_ALGORITHMS: list[JwtAlgorithm] = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "frontend:team1:dev1", "exp": int(NOW) + 300, "iat": int(NOW)}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(secret: str = SECRET, alg: str = "HS256", **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm=alg)


def verifier(**config: Any) -> JwtVerifier:
    return JwtVerifier(JwtAuthConfig(**config))


def check(v: JwtVerifier, token: str, username: str | None = "ignored", now: float = NOW) -> JwtVerdict:
    return v.verify(username, token.encode(), now=now)


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str | None, alg: str | None = None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        data["kid"] = kid
    if alg is not None:
        data["alg"] = alg
    return data


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """An HS256-style token built by hand: what an attacker can send."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# -- valid tokens, each key kind -------------------------------------------------------------------------


def test_hs256_valid() -> None:
    verdict = check(verifier(secret=SECRET, leeway=30), hs_token())
    assert verdict == JwtVerdict(True, "ok", "frontend:team1:dev1", NOW + 300)  # the session ends at exp


def test_hs512_needs_a_secret_as_long_as_its_hash() -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt\.secret: the secret is 32 bytes; HS512 needs at least 64"):
        verifier(secret=SECRET, algorithms=["HS256", "HS512"])
    long_secret = "k" * 64
    v = verifier(secret=long_secret, algorithms=["HS256", "HS512"])
    assert check(v, hs_token(long_secret, "HS512")).ok


def test_rs256_with_a_pem_public_key(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    v = verifier(public_keys=[write(tmp_path, "k.pem", pem(rsa_keys[0]))])
    verdict = check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256"))
    assert verdict.ok and verdict.identity == "frontend:team1:dev1"
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS384")).reason == "bad signature"  # not configured


def test_rs512_when_configured(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    v = verifier(public_keys=[write(tmp_path, "k.pem", pem(rsa_keys[0]))], algorithms=["RS512"])
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS512")).ok


def test_es256_with_a_pem_public_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    v = verifier(public_keys=[write(tmp_path, "ec.pem", pem(ec_key))])
    assert check(v, jwt.encode(claims(), ec_key, algorithm="ES256")).ok


def test_es384_uses_a_p384_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    v = verifier(public_keys=[write(tmp_path, "ec.pem", pem(key))], algorithms=["ES256", "ES384"])
    assert check(v, jwt.encode(claims(), key, algorithm="ES384")).ok
    with pytest.raises(ConfigError, match="no algorithm for it"):
        verifier(public_keys=[write(tmp_path, "ec.pem", pem(key))])  # ES384 not in the default list


def test_a_certificate_is_accepted_for_its_public_key(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    key = rsa_keys[0]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    v = verifier(public_keys=[write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM))])
    assert check(v, jwt.encode(claims(), key, algorithm="RS256")).ok


def test_any_configured_key_may_verify(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    v = verifier(
        secret=SECRET,
        public_keys=[write(tmp_path, "a.pem", pem(rsa_keys[0])), write(tmp_path, "b.pem", pem(rsa_keys[1]))],
    )
    assert v.key_names == ("auth.jwt.secret", "auth.jwt.public_keys.0", "auth.jwt.public_keys.1")
    assert check(v, jwt.encode(claims(), rsa_keys[1], algorithm="RS256")).ok
    assert check(v, hs_token()).ok
    assert check(v, jwt.encode(claims(), rsa_keys[2], algorithm="RS256")).reason == "bad signature"


def test_secret_file_uses_its_first_line(tmp_path: Path) -> None:
    v = verifier(secret_file=write(tmp_path, "secret", f"{SECRET}\nnot part of it\n"))
    assert check(v, hs_token()).ok
    assert check(v, hs_token(SECRET + "\nnot part of it")).reason == "bad signature"


# -- time claims --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"exp": int(NOW) - 31}, "expired"),
        ({"exp": int(NOW) - 30}, "expired"),  # exp + leeway is the last instant, exclusive
        ({"exp": int(NOW) - 29}, "ok"),  # within leeway
        ({"exp": int(NOW) + 1}, "ok"),
        ({"nbf": int(NOW) + 100}, "not yet valid"),
        ({"nbf": int(NOW) + 30}, "ok"),  # within leeway
        ({"iat": int(NOW) + 100}, "not yet valid"),
        ({"exp": None}, "malformed"),  # exp is required
        ({"exp": str(int(NOW) + 300)}, "malformed"),
        ({"exp": True}, "malformed"),
        ({"nbf": "soon"}, "malformed"),
        ({"iat": [1]}, "malformed"),
    ],
)
def test_time_claims(extra: dict[str, Any], reason: str) -> None:
    assert check(verifier(secret=SECRET, leeway=30), hs_token(**extra)).reason == reason


def test_the_session_ends_at_exp_or_at_the_end_of_the_leeway_if_exp_has_passed() -> None:
    v = verifier(secret=SECRET, leeway=30)
    verdict = check(v, hs_token(exp=int(NOW) + 10))
    assert verdict.ok and verdict.expires_at == NOW + 10
    verdict = check(v, hs_token(exp=int(NOW) - 10))  # accepted inside the leeway: not cut off at once
    assert verdict.ok and verdict.expires_at == NOW + 20


def test_now_defaults_to_the_clock() -> None:
    v = verifier(secret=SECRET, leeway=0)
    now = time.time()
    assert v.verify(None, hs_token(exp=int(now) + 60).encode()).ok
    assert v.verify(None, hs_token(exp=int(now) - 60).encode()).reason == "expired"


# -- signatures and algorithms ----------------------------------------------------------------------------


def test_wrong_secret_and_wrong_key(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    assert check(verifier(secret=SECRET), hs_token("t" * 32)).reason == "bad signature"
    v = verifier(public_keys=[write(tmp_path, "k.pem", pem(rsa_keys[0]))])
    assert check(v, jwt.encode(claims(), rsa_keys[1], algorithm="RS256")).reason == "bad signature"


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = hs_token().split(".")
    payload = b64(json.dumps(claims(sub="forge_platform")).encode())
    assert check(verifier(secret=SECRET), f"{header}.{payload}.{signature}").reason == "bad signature"


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    assert check(verifier(secret=SECRET), unsigned).reason == "bad signature"
    stripped = hs_token().rsplit(".", 1)[0] + "."
    assert check(verifier(secret=SECRET), stripped).reason == "bad signature"


def test_alg_none_is_refused_even_if_listed_by_the_token_header() -> None:
    token = forge({"alg": "None", "typ": "JWT"}, claims(), b"")
    assert check(verifier(secret=SECRET), token).reason == "bad signature"


def test_hs_token_signed_with_the_rsa_public_key_is_refused(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    public_pem = pem(rsa_keys[0])
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), public_pem)
    v = verifier(public_keys=[write(tmp_path, "k.pem", public_pem)], algorithms=["HS256", "RS256"])
    assert check(v, token).reason == "bad signature"
    # Also with a secret configured: the PEM is never tried as an HMAC key.
    v2 = verifier(secret=SECRET, public_keys=[write(tmp_path, "k.pem", public_pem)])
    assert check(v2, token).reason == "bad signature"


def test_rs_token_is_not_checked_against_the_hs_secret(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    v = verifier(secret=SECRET)
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256")).reason == "bad signature"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "e30.e30.", "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.sig"],
)
def test_garbage_is_malformed_or_no_token(token: str) -> None:
    reason = check(verifier(secret=SECRET), token).reason
    expected = "no token" if token == "" else "bad signature" if token.endswith("sig") else "malformed"
    assert reason == expected


def test_a_payload_that_is_not_an_object_is_malformed() -> None:
    token = forge({"alg": "HS256"}, claims(), SECRET.encode()).split(".")
    body = b64(b"[1, 2]")
    signing_input = f"{token[0]}.{body}"
    signature = b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())
    assert check(verifier(secret=SECRET), f"{signing_input}.{signature}").reason == "malformed"


@pytest.mark.parametrize("field", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400), 2**63, 1e308 * 10, float("nan"), True])
def test_time_claims_no_float_holds_are_malformed_without_raising(field: str, value: Any) -> None:
    """10**400 made math.isfinite raise OverflowError (a traceback in the log, from a signed token)."""
    token = forge({"alg": "HS256"}, claims(**{field: value}), SECRET.encode())
    verdict = check(verifier(secret=SECRET), token)
    assert (verdict.ok, verdict.reason) == (False, "malformed")


def test_odd_headers_are_malformed() -> None:
    v = verifier(secret=SECRET)
    assert check(v, forge({"alg": "HS256", "kid": 7}, claims(), SECRET.encode())).reason == "malformed"
    assert check(v, forge({"alg": 256}, claims(), SECRET.encode())).reason == "malformed"
    assert check(v, forge({"alg": "HS256", "crit": ["exp"]}, claims(), SECRET.encode())).reason == "malformed"
    assert check(v, forge({"alg": "HS256"}, claims(), SECRET.encode())).ok


def test_non_ascii_password_is_malformed() -> None:
    assert verifier(secret=SECRET).verify("u", "tøken".encode()).reason == "malformed"


# -- iss and aud ----------------------------------------------------------------------------------------


def test_audience() -> None:
    v = verifier(secret=SECRET, audience="mqtt")
    assert check(v, hs_token(aud="mqtt")).ok
    assert check(v, hs_token(aud=["web", "mqtt"])).ok
    assert check(v, hs_token(aud="web")).reason == "bad audience"
    assert check(v, hs_token()).reason == "bad audience"
    assert check(v, hs_token(aud=5)).reason == "bad audience"


def test_a_token_for_an_audience_is_refused_when_none_is_configured() -> None:
    assert check(verifier(secret=SECRET), hs_token(aud="someone-else")).reason == "bad audience"


def test_issuer() -> None:
    v = verifier(secret=SECRET, issuer="https://forge.example")
    assert check(v, hs_token(iss="https://forge.example")).ok
    assert check(v, hs_token(iss="https://evil.example")).reason == "bad issuer"
    assert check(v, hs_token()).reason == "bad issuer"
    assert check(verifier(secret=SECRET), hs_token(iss="anyone")).ok  # not configured: not checked


# -- identity and where the token is ----------------------------------------------------------------------


@pytest.mark.parametrize("sub", [None, "", 42, ["a"], "a\x00b", "\ud800"])
def test_identity_claim_must_be_a_non_empty_string(sub: Any) -> None:
    token = forge({"alg": "HS256"}, claims(sub=sub) if sub is not None else claims(sub=None), SECRET.encode())
    assert check(verifier(secret=SECRET), token).reason == "no identity"


def test_identity_from_another_claim() -> None:
    v = verifier(secret=SECRET, identity_claim="username")
    verdict = check(v, hs_token(username="alice@team1"))
    assert verdict.ok and verdict.identity == "alice@team1"
    assert check(v, hs_token()).reason == "no identity"


def test_the_connect_username_is_ignored_when_the_password_is_the_token() -> None:
    v = verifier(secret=SECRET)
    assert v.token_from == "password"
    token = hs_token()
    for username in ("frontend:team1:dev1", "forge_platform", "jwt", "", None):
        verdict = v.verify(username, token.encode(), now=NOW)
        assert verdict.ok and verdict.identity == "frontend:team1:dev1"


def test_token_in_the_username() -> None:
    v = verifier(secret=SECRET, token_from="username")
    verdict = v.verify(hs_token(), b"whatever the password is", now=NOW)
    assert verdict.ok and verdict.identity == "frontend:team1:dev1"
    assert v.verify(hs_token(), None, now=NOW).ok
    assert v.verify(None, hs_token().encode(), now=NOW).reason == "no token"
    assert v.verify("", None, now=NOW).reason == "no token"


def test_no_token() -> None:
    v = verifier(secret=SECRET)
    assert v.verify("user", None, now=NOW).reason == "no token"
    assert v.verify("user", b"", now=NOW).reason == "no token"
    assert v.verify(hs_token(), None, now=NOW).reason == "no token"  # token_from: password


# -- acl and mountpoint claims ------------------------------------------------------------------------------


def test_acl_claim_list_form() -> None:
    acl = [
        {"permission": "allow", "action": "publish", "topic": "ff/v1/team1/d/${clientid}/#"},
        {"permission": "deny", "action": "all", "topic": "#"},
    ]
    verdict = check(verifier(secret=SECRET), hs_token(acl=acl))
    assert verdict.ok and not verdict.rules_exclusive
    assert verdict.rules == (
        ClaimRule(True, True, False, "ff/v1/team1/d/${clientid}/#"),
        ClaimRule(False, True, True, "#"),
    )


def test_acl_claim_object_form_is_exclusive() -> None:
    verdict = check(verifier(secret=SECRET), hs_token(acl={"sub": ["a/#"]}))
    assert verdict.ok and verdict.rules_exclusive and verdict.rules == (ClaimRule(True, False, True, "a/#"),)


@pytest.mark.parametrize(
    "acl",
    [
        "a/#",
        [{"permission": "allow", "action": "publish"}],
        [{"permission": "allow", "action": "publish", "topic": "a/#/b"}],
        [{"permission": "allow", "action": "fly", "topic": "a"}],
        {"pub": ["a"], "admin": True},
        None,
    ],
)
def test_malformed_acl_claim_refuses_the_token(acl: Any) -> None:
    token = forge({"alg": "HS256"}, {**claims(), "acl": acl}, SECRET.encode())
    verdict = check(verifier(secret=SECRET), token)
    assert verdict.reason == "malformed" and "acl" in verdict.detail and not verdict.ok


def test_acl_claim_can_be_switched_off_or_renamed() -> None:
    assert check(verifier(secret=SECRET, acl_claim=None), hs_token(acl="junk")).ok
    verdict = check(verifier(secret=SECRET, acl_claim="rights"), hs_token(acl="junk", rights={"pub": ["x"]}))
    assert verdict.ok and verdict.rules == (ClaimRule(True, True, False, "x"),)


def test_access_policy_binds_the_rules_before_the_fallback() -> None:
    class DenyAll:
        def check_publish(self, topic: str, retain: bool = False) -> bool | None:
            return False

        def check_receive(self, topic: str) -> bool | None:
            return False

        def check_subscribe(self, topic_filter: str) -> bool | None:
            return False

    fallback = DenyAll()
    acl = [{"permission": "allow", "action": "publish", "topic": "u/${username}/${clientid}"}]
    verdict = check(verifier(secret=SECRET), hs_token(acl=acl))
    policy = verdict.access_policy(fallback, "frontend:team1:dev1:x")
    assert isinstance(policy, ClaimPolicy)
    assert policy.check_publish("u/frontend:team1:dev1/frontend:team1:dev1:x") is True
    assert policy.check_publish("u/other/frontend:team1:dev1:x") is False
    assert check(verifier(secret=SECRET), hs_token()).access_policy(fallback, "c") is fallback


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("ff/v1/team1/c/", True),
        ("/", True),
        ("ff/v1/team1/c", False),
        ("ff/+/c/", False),
        ("ff/#/", False),
        ("$SYS/", False),
        ("", False),
        (7, False),
        (None, False),
    ],
)
def test_mountpoint_claim(value: Any, ok: bool) -> None:
    token = forge({"alg": "HS256"}, {**claims(), "mp": value}, SECRET.encode())
    verdict = check(verifier(secret=SECRET, mountpoint_claim="mp"), token)
    assert verdict.ok is ok
    assert verdict.mountpoint == (value if ok else "")
    if not ok:
        assert verdict.reason == "malformed"


def test_mountpoint_claim_absent_or_not_configured() -> None:
    assert check(verifier(secret=SECRET, mountpoint_claim="mp"), hs_token()).mountpoint == ""
    assert check(verifier(secret=SECRET), hs_token(mp="x/")).mountpoint == ""


# -- JWKS ------------------------------------------------------------------------------------------------


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


def test_jwks_selects_the_key_by_kid(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = write(tmp_path, "jwks.json", jwks(jwk(rsa_keys[0], "k1", "RS256"), jwk(ec_key, "k2")))
    v = verifier(jwks_file=path)
    assert v.key_names == ("auth.jwt.jwks_file key 'k1'", "auth.jwt.jwks_file key 'k2'")
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "k1"})).ok
    assert check(v, jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k2"})).ok
    # The right kid, the wrong key; a kid nobody has; a key of the other kind under a kid.
    assert check(v, jwt.encode(claims(), rsa_keys[1], algorithm="RS256", headers={"kid": "k1"})).reason == (
        "bad signature"
    )
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "k9"})).reason == (
        "bad signature"
    )
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "k2"})).reason == (
        "bad signature"
    )
    # Without a kid every key of the algorithm is tried.
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256")).ok


def test_jwks_key_is_used_with_its_alg_only(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    path = write(tmp_path, "jwks.json", jwks(jwk(rsa_keys[0], "k1", "RS512")))
    v = verifier(jwks_file=path, algorithms=["RS256", "RS512"])
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS512", headers={"kid": "k1"})).ok
    assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "k1"})).reason == (
        "bad signature"
    )


def test_jwks_key_without_alg_serves_its_family(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    path = write(tmp_path, "jwks.json", jwks(jwk(rsa_keys[0], "k1"), {"kty": "OKP", "crv": "Ed25519", "x": "AA"}))
    v = verifier(jwks_file=path, algorithms=["RS256", "RS512"])
    assert v.key_names == ("auth.jwt.jwks_file key 'k1'",)
    for alg in ("RS256", "RS512"):
        assert check(v, jwt.encode(claims(), rsa_keys[0], algorithm=alg, headers={"kid": "k1"})).ok


def test_jwks_key_whose_alg_does_not_fit_its_curve(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = write(tmp_path, "jwks.json", jwks(jwk(ec_key, "m", "ES384")))
    with pytest.raises(ConfigError, match="key 'm': its alg ES384 does not fit its key"):
        verifier(jwks_file=path, algorithms=["ES256", "ES384"])


def test_jwks_with_a_symmetric_key(tmp_path: Path) -> None:
    key = HMACAlgorithm.to_jwk(SECRET.encode(), as_dict=True)
    v = verifier(jwks_file=write(tmp_path, "jwks.json", jwks({**key, "kid": "h"})))
    assert check(v, jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "h"})).ok


def test_jwks_skips_keys_for_other_uses_and_algorithms(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    path = write(
        tmp_path,
        "jwks.json",
        jwks({**jwk(rsa_keys[0], "enc"), "use": "enc"}, jwk(rsa_keys[1], "ps", "PS256"), jwk(rsa_keys[2], "ok")),
    )
    v = verifier(jwks_file=path)
    assert v.key_names == ("auth.jwt.jwks_file key 'ok'",)
    token = jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "enc"})
    assert check(v, token).reason == "bad signature"


def test_jwks_reload(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    path = write(tmp_path, "jwks.json", jwks(jwk(rsa_keys[0], "k1"), jwk(rsa_keys[1], "k2")))
    v = verifier(jwks_file=path)
    old = jwt.encode(claims(), rsa_keys[0], algorithm="RS256", headers={"kid": "k1"})
    new = jwt.encode(claims(), rsa_keys[2], algorithm="RS256", headers={"kid": "k3"})
    assert check(v, old).ok and not check(v, new).ok

    write(tmp_path, "jwks.json", jwks(jwk(rsa_keys[1], "k2"), jwk(rsa_keys[2], "k3")))
    v.reload()
    assert check(v, new).ok
    assert check(v, old).reason == "bad signature"

    for broken in ("{not json", json.dumps({"keys": []}), json.dumps([1]), jwks({"kty": "RSA", "kid": "x"})):
        write(tmp_path, "jwks.json", broken)
        with pytest.raises(ConfigError, match=r"^auth\.jwt\.jwks_file[: ]"):
            v.reload()
        assert check(v, new).ok  # the keys in use stay
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        v.reload()
    assert check(v, new).ok


def test_reload_rereads_public_keys_and_secret_file(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    key_path = write(tmp_path, "k.pem", pem(rsa_keys[0]))
    secret_path = write(tmp_path, "secret", SECRET)
    v = verifier(public_keys=[key_path], secret_file=secret_path)
    write(tmp_path, "k.pem", pem(rsa_keys[1]))
    write(tmp_path, "secret", "n" * 40)
    v.reload()
    assert check(v, jwt.encode(claims(), rsa_keys[1], algorithm="RS256")).ok
    assert check(v, hs_token("n" * 40)).ok
    assert not check(v, hs_token()).ok
    write(tmp_path, "k.pem", "garbage")
    with pytest.raises(ConfigError, match=r"auth\.jwt\.public_keys\.0: .* is not a PEM public key"):
        v.reload()
    assert check(v, jwt.encode(claims(), rsa_keys[1], algorithm="RS256")).ok


# -- key errors at construction ---------------------------------------------------------------------------


def test_key_file_problems_name_the_key(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    good = write(tmp_path, "good.pem", pem(rsa_keys[0]))
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.public_keys\.1: cannot read .*missing\.pem"):
        verifier(public_keys=[good, tmp_path / "missing.pem"])
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.public_keys\.0: .* is not a PEM public key"):
        bad = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        verifier(public_keys=[write(tmp_path, "bad.pem", bad)])
    private = rsa_keys[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.public_keys\.0: .* private key"):
        verifier(public_keys=[write(tmp_path, "private.pem", private)])
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.public_keys\.0: .*no RS256"):
        verifier(public_keys=[good], algorithms=["HS256"])
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.jwks_file: cannot read"):
        verifier(jwks_file=tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.secret_file: cannot read"):
        verifier(secret_file=tmp_path / "nope")


def test_weak_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.secret: the secret is 6 bytes; HS256 needs at least 32"):
        verifier(secret="secret")
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.secret_file: the secret is empty"):
        verifier(secret_file=write(tmp_path, "empty", ""))
    with pytest.raises(ConfigError, match=r"^auth\.jwt\.secret: .*no HS algorithm"):
        verifier(secret=SECRET, algorithms=["RS256"])
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024-bit RSA key is too weak"):
        verifier(public_keys=[write(tmp_path, "small.pem", pem(small))])
    with pytest.raises(ConfigError, match=r"key 'w': an HS256 key needs at least 32 bytes"):
        short = HMACAlgorithm.to_jwk(b"short", as_dict=True)
        verifier(jwks_file=write(tmp_path, "w.json", jwks({**short, "kid": "w"})))


def test_jwks_with_a_private_key_is_refused(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    private_jwk = RSAAlgorithm.to_jwk(rsa_keys[0], as_dict=True)
    with pytest.raises(ConfigError, match="private key"):
        verifier(jwks_file=write(tmp_path, "p.json", jwks({**private_jwk, "kid": "p"})))


def test_every_algorithm_of_the_config_model_is_known() -> None:
    assert JwtAuthConfig(secret="k" * 64, algorithms=ALL_ALGORITHMS).algorithms == ALL_ALGORITHMS
    JwtVerifier(JwtAuthConfig(secret="k" * 64, algorithms=ALL_ALGORITHMS))


# -- robustness ----------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
CLAIM_NAMES = ["sub", "exp", "nbf", "iat", "aud", "iss", "acl", "mp", "x"]
FUZZ_VERIFIER = JwtVerifier(JwtAuthConfig(secret=SECRET, mountpoint_claim="mp", audience="mqtt"))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_garbage_never_raises_and_never_passes(password: bytes) -> None:
    assert not FUZZ_VERIFIER.verify("u", password, now=NOW).ok


@FUZZ
@given(st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, max_size=8), st.booleans())
def test_any_signed_payload_gets_a_verdict(payload: dict[str, Any], valid_times: bool) -> None:
    if valid_times:
        payload.update(exp=int(NOW) + 60, sub=payload.get("sub") or "alice", aud="mqtt")
    token = forge({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode())  # PyJWT would refuse to encode some
    verdict = FUZZ_VERIFIER.verify(None, token.encode(), now=NOW)
    if verdict.ok:
        assert isinstance(verdict.identity, str) and verdict.identity
        assert verdict.expires_at is not None and verdict.expires_at > NOW
        assert verdict.mountpoint == "" or verdict.mountpoint.endswith("/")
