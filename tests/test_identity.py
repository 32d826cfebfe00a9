"""Caller identity: verified JWTs (HMAC secret, PEM key, JWKS) and trusted proxy headers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from phi_gateway.exceptions import HTTPError
from phi_gateway.identity import Identity, IdentitySettings

ISSUER, AUDIENCE = "https://idp.example", "phi-gateway"
SECRET = b"s" * 48


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": "dr-who",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 300,
        "nbf": now - 10,
        "roles": ["clinician"],
        **overrides,
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def hmac_identity(tmp_path: Path) -> Identity:
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return Identity(
        IdentitySettings(
            jwt_secret_file=str(secret),
            jwt_algorithms=("HS256",),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            break_glass_role="emergency",
        )
    )


def test_valid_hmac_token_gives_principal_and_roles(hmac_identity: Identity) -> None:
    principal = hmac_identity.resolve(bearer(jwt.encode(claims(), SECRET, algorithm="HS256")))
    assert principal is not None and principal.id == "dr-who" and principal.roles == {"clinician"}
    assert principal.source == "jwt" and not principal.break_glass


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"),
        jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"),
        jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256"),
        jwt.encode(claims(nbf=int(time.time()) + 3600), SECRET, algorithm="HS256"),
        jwt.encode(claims(), b"w" * 48, algorithm="HS256"),
        jwt.encode(claims(), SECRET * 2, algorithm="HS512"),  # not a pinned algorithm
        jwt.encode(claims(), None, algorithm="none"),
        jwt.encode({k: v for k, v in claims().items() if k != "exp"}, SECRET, algorithm="HS256"),
        jwt.encode(claims(roles={"a": 1}), SECRET, algorithm="HS256"),
        "not.a.jwt",
    ],
    ids=[
        "issuer",
        "audience",
        "expired",
        "not-yet",
        "key",
        "alg",
        "none",
        "no-exp",
        "roles-shape",
        "garbage",
    ],
)
def test_bad_tokens_are_401_with_one_message(hmac_identity: Identity, token: str) -> None:
    with pytest.raises(HTTPError) as failure:
        hmac_identity.resolve(bearer(token))
    assert failure.value.status == 401 and str(failure.value) == "the bearer token is not valid"


def test_rsa_public_key_and_jwks(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    common = {"jwt_algorithms": ("RS256",), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
    assert (
        Identity(IdentitySettings(jwt_public_key_file=str(pem), **common)).resolve(bearer(token)) is not None
    )
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    by_jwks = Identity(IdentitySettings(jwt_jwks_file=str(jwks), **common))
    assert by_jwks.resolve(bearer(token)) is not None
    with pytest.raises(HTTPError):
        by_jwks.resolve(bearer(jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "unknown"})))
    # An HMAC token signed with the public key as secret must not pass (algorithm confusion).
    with pytest.raises(HTTPError):
        Identity(IdentitySettings(jwt_public_key_file=str(pem), **common)).resolve(
            bearer(jwt.encode(claims(), pem.read_bytes()[:40], algorithm="HS256"))
        )


def test_trusted_headers_only_when_configured_and_only_from_the_proxy() -> None:
    headers = {"x-user": "nurse-1", "x-roles": "nurse, triage"}
    assert Identity().resolve(headers, "10.0.0.5") is None
    identity = Identity(
        IdentitySettings(
            principal_header="X-User", roles_header="X-Roles", trusted_proxies=("10.0.0.0/24", "::1")
        )
    )
    principal = identity.resolve(headers, "10.0.0.5")
    assert principal is not None and principal.roles == {"nurse", "triage"} and principal.source == "header"
    assert identity.resolve(headers, "10.0.1.5") is None  # straight to the gateway: headers ignored
    assert identity.resolve(headers, None) is None
    with pytest.raises(ValueError, match="trusted_proxies"):
        IdentitySettings(principal_header="X-User")


def test_break_glass_needs_a_reason_and_is_flagged(hmac_identity: Identity) -> None:
    token = jwt.encode(claims(roles=["emergency"]), SECRET, algorithm="HS256")
    with pytest.raises(HTTPError) as failure:
        hmac_identity.resolve(bearer(token))
    assert failure.value.status == 403 and failure.value.code == "break_glass_reason_required"
    principal = hmac_identity.resolve({**bearer(token), "x-break-glass-reason": "cardiac arrest, bed 4"})
    assert principal is not None and principal.break_glass and principal.reason == "cardiac arrest, bed 4"


def test_settings_refuse_unpinned_or_none_algorithms(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pinned"):
        IdentitySettings(jwt_secret_file="x")
    with pytest.raises(ValueError, match="none"):
        IdentitySettings(jwt_secret_file="x", jwt_algorithms=("none",), jwt_issuer="i", jwt_audience="a")


def test_jwks_key_is_bound_to_its_algorithm_and_subject_must_be_real(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    identity = Identity(
        IdentitySettings(
            jwt_jwks_file=str(jwks),
            jwt_algorithms=("RS256", "HS256"),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
        )
    )
    confused = jwt.encode(claims(), b"k" * 48, algorithm="HS256", headers={"kid": "k1"})
    with pytest.raises(HTTPError) as failure:  # an HS256 token naming an RSA key: 401, never 500
        identity.resolve(bearer(confused))
    assert failure.value.status == 401
    with pytest.raises(HTTPError):
        identity.resolve(bearer(jwt.encode(claims(sub=" "), key, algorithm="RS256", headers={"kid": "k1"})))
