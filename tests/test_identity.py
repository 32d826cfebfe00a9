"""Caller identity: verified JWTs (HMAC secret, PEM key, JWKS) and trusted proxy headers."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from phi_gateway.config import ConfigError
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
    with pytest.raises(ConfigError, match="trusted_proxies"):
        IdentitySettings(principal_header="X-User")
    with pytest.raises(ConfigError, match=r"'10\.0\.0\.300' is not an address"):
        IdentitySettings(principal_header="X-User", trusted_proxies=("10.0.0.300",))


def test_break_glass_needs_a_reason_and_is_flagged(hmac_identity: Identity) -> None:
    token = jwt.encode(claims(roles=["emergency"]), SECRET, algorithm="HS256")
    with pytest.raises(HTTPError) as failure:
        hmac_identity.resolve(bearer(token))
    assert failure.value.status == 403 and failure.value.code == "break_glass_reason_required"
    principal = hmac_identity.resolve({**bearer(token), "x-break-glass-reason": "cardiac arrest, bed 4"})
    assert principal is not None and principal.break_glass and principal.reason == "cardiac arrest, bed 4"


def test_settings_refuse_unpinned_or_none_algorithms(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pinned"):
        IdentitySettings(jwt_secret_file="x")
    with pytest.raises(ConfigError, match="none"):
        IdentitySettings(jwt_secret_file="x", jwt_algorithms=("none",), jwt_issuer="i", jwt_audience="a")


def test_jwks_key_is_bound_to_its_algorithm_and_subject_must_be_real(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    identity = Identity(
        IdentitySettings(
            jwt_jwks_file=str(jwks), jwt_algorithms=("RS256",), jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        )
    )
    confused = jwt.encode(claims(), b"k" * 48, algorithm="HS256", headers={"kid": "k1"})
    with pytest.raises(HTTPError) as failure:  # an HS256 token naming an RSA key: 401, never 500
        identity.resolve(bearer(confused))
    assert failure.value.status == 401
    with pytest.raises(HTTPError):
        identity.resolve(bearer(jwt.encode(claims(sub=" "), key, algorithm="RS256", headers={"kid": "k1"})))


# Key files are checked when the gateway starts, not on the first request.

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def settings(algorithms: tuple[str, ...], **files: str) -> IdentitySettings:
    return IdentitySettings(jwt_algorithms=algorithms, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **files)


def secret_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / f"jwt-{len(list(tmp_path.iterdir()))}.secret"
    path.write_bytes(content)
    path.chmod(0o600)
    return str(path)


def jwks_file(tmp_path: Path, *keys: dict[str, Any]) -> str:
    path = tmp_path / f"jwks-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return str(path)


def rsa_jwk(**extra: Any) -> dict[str, Any]:
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())), **extra}


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [(RSA_KEY, "RS256"), (RSA_KEY, "PS384"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")],
)
def test_each_public_key_kind_verifies_its_algorithms(tmp_path: Path, key: Any, algorithm: str) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(key))
    identity = Identity(settings((algorithm,), jwt_public_key_file=str(pem)))
    principal = identity.resolve(bearer(jwt.encode(claims(), key, algorithm=algorithm)))
    assert principal is not None and principal.id == "dr-who"


def test_a_certificate_serves_as_the_public_key(tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(RSA_KEY, hashes.SHA256())
    )
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity = Identity(settings(("RS256",), jwt_public_key_file=str(pem)))
    assert identity.resolve(bearer(jwt.encode(claims(), RSA_KEY, algorithm="RS256"))) is not None


def _bad_key_cases(tmp: Path) -> list[tuple[IdentitySettings, str]]:
    """(settings, what the one-line message must say) for every kind of unusable key."""
    garbage, private, rsa_pem, ec_pem = (
        tmp / "garbage.pem",
        tmp / "private.pem",
        tmp / "rsa.pem",
        tmp / "ec.pem",
    )
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    private.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    rsa_pem.write_bytes(public_pem(RSA_KEY))
    ec_pem.write_bytes(public_pem(EC_KEY))
    missing = str(tmp / "missing.pem")
    empty_jwks = tmp / "empty-jwks.json"
    empty_jwks.write_text('{"keys": []}')
    not_json = tmp / "not-json.json"
    not_json.write_text("{keys: ")
    return [
        (settings(("RS256",), jwt_public_key_file=missing), f"cannot read JWT public key file {missing}"),
        (settings(("RS256",), jwt_public_key_file=str(garbage)), f"{garbage} is not a PEM public key"),
        (settings(("RS256",), jwt_public_key_file=str(private)), f"{private} holds a private key"),
        (
            settings(("ES256",), jwt_public_key_file=str(rsa_pem)),
            f"ES256 needs an EC secp256r1 key; JWT public key file {rsa_pem}",
        ),
        (settings(("ES384",), jwt_public_key_file=str(ec_pem)), "ES384 needs an EC secp384r1 key"),
        (settings(("RS256",), jwt_public_key_file=str(ec_pem)), "RS256 needs an RSA key"),
        (settings(("EdDSA",), jwt_public_key_file=str(rsa_pem)), "EdDSA needs an Ed25519 or Ed448 key"),
        (settings(("RS256", "HS256"), jwt_public_key_file=str(rsa_pem)), "HS256 needs jwt_secret_file"),
        (settings(("RS257",), jwt_public_key_file=str(rsa_pem)), "RS257 is not a JWT signature algorithm"),
        (settings(("HS256",), jwt_secret_file=str(tmp / "no-secret")), "cannot read JWT secret file"),
        (
            settings(("HS256",), jwt_secret_file=secret_file(tmp, b"  \n")),
            "holds 0 bytes; HS256 needs at least 32",
        ),
        (
            settings(("HS512",), jwt_secret_file=secret_file(tmp, SECRET)),
            "holds 48 bytes; HS512 needs at least 64",
        ),
        (settings(("RS256",), jwt_secret_file=secret_file(tmp, SECRET)), "RS256 needs a public key"),
        (settings(("RS256",), jwt_jwks_file=str(tmp / "none.json")), "cannot read JWKS file"),
        (settings(("RS256",), jwt_jwks_file=str(empty_jwks)), f"JWKS file {empty_jwks} has no signing key"),
        (settings(("RS256",), jwt_jwks_file=str(not_json)), f"JWKS file {not_json} is not JSON"),
        (
            settings(
                ("RS256",), jwt_jwks_file=jwks_file(tmp, {"kty": "RSA", "kid": "a", "alg": "RS256", "n": "!"})
            ),
            "key a is not a usable RS256 key",
        ),
        (
            settings(("RS256", "ES256"), jwt_jwks_file=jwks_file(tmp, rsa_jwk(kid="a"))),
            "ES256 has no key in JWKS file",
        ),
        (
            settings(("RS256",), jwt_jwks_file=jwks_file(tmp, rsa_jwk(kid="a", use="enc"))),
            "has no signing key",
        ),
        (
            settings(("RS256",), jwt_jwks_file=jwks_file(tmp, rsa_jwk(kid="a"), rsa_jwk(kid="a"))),
            "two RS256 keys share this kid",
        ),
        (
            settings(("RS256",), jwt_jwks_file=jwks_file(tmp, {**rsa_jwk(kid="a"), "d": "AQAB"})),
            "key a is a private key",
        ),
    ]


def test_unusable_key_files_stop_startup_with_one_line(tmp_path: Path) -> None:
    material = [SECRET.decode(), public_pem(RSA_KEY).decode().splitlines()[1], "AQAB", "BEGIN"]
    for case, expected in _bad_key_cases(tmp_path):
        with pytest.raises(ConfigError) as failure:
            Identity(case)
        message = str(failure.value)
        assert expected in message, message
        assert "\n" not in message
        assert not any(part in message for part in material)  # never key material


def test_serve_reports_a_bad_key_file_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from phi_gateway.cli_serve import serve

    keyring = tmp_path / "keyring.json"
    from phi_gateway.keyring import create_keyring

    create_keyring(keyring)
    missing = tmp_path / "idp.pem"
    env = {
        "PHI_GATEWAY_UPSTREAM": "http://127.0.0.1:9",
        "PHI_GATEWAY_KEYRING": str(keyring),
        "PHI_GATEWAY_POLICIES": str(Path(__file__).parents[1] / "policies"),
        "PHI_GATEWAY_JWT_PUBLIC_KEY_FILE": str(missing),
        "PHI_GATEWAY_JWT_ALGORITHMS": "RS256",
        "PHI_GATEWAY_JWT_ISSUER": ISSUER,
        "PHI_GATEWAY_JWT_AUDIENCE": AUDIENCE,
        "PHI_GATEWAY_AUDIT_SINK": "none",
    }
    result = CliRunner().invoke(serve, [], env=env)
    assert result.exit_code == 1
    assert result.output == (
        f"phi-gateway: error: cannot read JWT public key file {missing}: No such file or directory\n"
    )


def test_jwks_keys_are_picked_by_kid_and_algorithm(tmp_path: Path) -> None:
    """One RSA key published for two algorithms (a JWK holds one ``alg`` each): the token's
    ``alg`` picks which; keys for unpinned algorithms and encryption keys are skipped."""
    ec_jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "e"}
    path = jwks_file(
        tmp_path,
        rsa_jwk(kid="r", alg="RS256"),
        rsa_jwk(kid="r", alg="PS256"),
        rsa_jwk(kid="r", alg="RS512"),  # not pinned
        rsa_jwk(kid="enc", use="enc"),
        ec_jwk,
    )
    identity = Identity(settings(("RS256", "PS256", "ES256"), jwt_jwks_file=path))
    for key, algorithm, kid in ((RSA_KEY, "RS256", "r"), (RSA_KEY, "PS256", "r"), (EC_KEY, "ES256", "e")):
        token = jwt.encode(claims(), key, algorithm=algorithm, headers={"kid": kid})
        assert identity.resolve(bearer(token)) is not None
    with pytest.raises(HTTPError):  # RS512 is not pinned, whatever the JWKS says
        identity.resolve(bearer(jwt.encode(claims(), RSA_KEY, algorithm="RS512", headers={"kid": "r"})))


def test_break_glass_is_decided_after_authentication(hmac_identity: Identity) -> None:
    """``authenticate`` names the caller even when ``break_glass`` then refuses it, so the
    refusal can be audited with who tried."""
    headers = bearer(jwt.encode(claims(roles=["emergency"]), SECRET, algorithm="HS256"))
    principal = hmac_identity.authenticate(headers)
    assert principal is not None and principal.id == "dr-who" and not principal.break_glass
    assert hmac_identity.wants_break_glass(principal)
    with pytest.raises(HTTPError):
        hmac_identity.break_glass(principal, headers)
    clinician = hmac_identity.authenticate(bearer(jwt.encode(claims(), SECRET, algorithm="HS256")))
    assert clinician is not None and not hmac_identity.wants_break_glass(clinician)
