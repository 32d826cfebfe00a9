"""Who is asking: a principal and roles from a verified bearer JWT, or from headers set by
a trusted authenticating proxy in front of the gateway (only when configured).

JWT keys are read and checked against the pinned algorithms when ``Identity`` is built, so
a missing, empty or unsuitable key file stops the gateway at startup (``ConfigError``)
instead of turning every request into a 401.

Break-glass: a caller holding the configured emergency role must also say why (a reason
header); such requests see every field and are flagged in the audit trail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from phi_gateway.config import ConfigError
from phi_gateway.exceptions import HTTPError
from phi_gateway.secretfile import read_private_file

_MAX_REASON = 200
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: at least the hash size
_EC_CURVES = {  # the curve each ECDSA algorithm signs on
    "ES256": "secp256r1",
    "ES256K": "secp256k1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "ES521": "secp521r1",
}


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    roles: frozenset[str]
    source: str  # "jwt" or "header"
    break_glass: bool = False
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    """Configure one or both sources. With none, no request has a principal."""

    principal_header: str | None = None  # trusted proxy: e.g. X-Authenticated-User
    roles_header: str | None = None  # trusted proxy: comma-separated roles
    trusted_proxies: tuple[str, ...] = ()  # addresses/networks whose identity headers count
    jwt_secret_file: str | None = None  # HMAC secret (HS256/384/512)
    jwt_public_key_file: str | None = None  # PEM public key (RS*/ES*/PS*/EdDSA)
    jwt_jwks_file: str | None = None  # a JWKS document; tokens pick a key by "kid"
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_roles_claim: str = "roles"
    leeway_seconds: float = 30.0
    break_glass_role: str | None = None
    break_glass_reason_header: str = "X-Break-Glass-Reason"

    @property
    def identity_headers(self) -> frozenset[str]:
        """The trusted-proxy header names, lower case."""
        return frozenset(n.lower() for n in (self.principal_header, self.roles_header) if n)

    def __post_init__(self) -> None:
        keys = [f for f in (self.jwt_secret_file, self.jwt_public_key_file, self.jwt_jwks_file) if f]
        if len(keys) > 1:
            raise ConfigError("configure one JWT key source: secret, public key or JWKS file.")
        if keys and not (self.jwt_algorithms and self.jwt_issuer and self.jwt_audience):
            raise ConfigError("JWT verification needs pinned algorithms, an issuer and an audience.")
        if keys and "none" in {a.lower() for a in self.jwt_algorithms}:
            raise ConfigError("the 'none' algorithm is never accepted.")
        if self.roles_header and not self.principal_header:
            raise ConfigError("roles_header needs principal_header.")
        if self.principal_header and not self.trusted_proxies:
            # Anyone who can reach the gateway could otherwise claim any identity and role.
            raise ConfigError(
                "principal_header needs trusted_proxies: the addresses of the proxy that sets it."
            )
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {network!r} is not an address or network.") from None


class Identity:
    """Resolves the principal of a request; raises 401/403 ``HTTPError`` for bad credentials.

    Raises ``ConfigError`` (one line naming the file, never key material) when a JWT key file
    cannot be read or parsed, or does not suit a pinned algorithm.
    """

    def __init__(self, settings: IdentitySettings | None = None) -> None:
        self.settings = settings or IdentitySettings()
        s = self.settings
        self._networks = [ipaddress.ip_network(n, strict=False) for n in s.trusted_proxies]
        self._key: Any = None
        # JWKS keys by (kid, algorithm): PyJWK objects, so PyJWT holds each key to its algorithm.
        self._jwks: dict[tuple[str | None, str], jwt.PyJWK] | None = None
        for algorithm in s.jwt_algorithms:
            if algorithm not in _HMAC_MIN_BYTES and not _asymmetric(algorithm):
                raise ConfigError(f"jwt_algorithms: {algorithm} is not a JWT signature algorithm")
            if algorithm in _HMAC_MIN_BYTES and (s.jwt_public_key_file or s.jwt_jwks_file):
                # HMAC with a public key as the secret is the classic algorithm-confusion attack.
                raise ConfigError(f"jwt_algorithms: {algorithm} needs jwt_secret_file, not a public key")
            if algorithm not in _HMAC_MIN_BYTES and s.jwt_secret_file:
                raise ConfigError(f"jwt_algorithms: {algorithm} needs a public key, not jwt_secret_file")
        if s.jwt_secret_file:
            self._key = _load_secret(s.jwt_secret_file, s.jwt_algorithms)
        elif s.jwt_public_key_file:
            self._key = _load_public_key(s.jwt_public_key_file, s.jwt_algorithms)
        elif s.jwt_jwks_file:
            self._jwks = _load_jwks(s.jwt_jwks_file, s.jwt_algorithms)

    @property
    def configured(self) -> bool:
        return bool(self._key is not None or self._jwks is not None or self.settings.principal_header)

    def resolve(self, headers: Mapping[str, str], client: str | None = None) -> Principal | None:
        """``headers`` with lower-case names; ``client`` the peer address. None when the
        request carries no identity. ``authenticate`` then ``break_glass``."""
        principal = self.authenticate(headers, client)
        return None if principal is None else self.break_glass(principal, headers)

    def authenticate(self, headers: Mapping[str, str], client: str | None = None) -> Principal | None:
        """Who the credentials say is asking (401 when they do not verify); break-glass is
        not decided yet."""
        return self._from_jwt(headers) or self._from_headers(headers, client)

    def claims_to_drop(self, client: str | None) -> frozenset[bytes]:
        """The identity header names (lower case) a request from ``client`` may not carry
        on to the app: all of them unless the peer is a trusted proxy, which sets them."""
        names = self.settings.identity_headers
        return frozenset() if not names or self._trusted(client) else frozenset(n.encode() for n in names)

    def wants_break_glass(self, principal: Principal) -> bool:
        """Whether this caller holds the emergency role, so its requests are break-glass."""
        role = self.settings.break_glass_role
        return bool(role and role in principal.roles)

    def _from_jwt(self, headers: Mapping[str, str]) -> Principal | None:
        if self._key is None and self._jwks is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        s = self.settings
        try:
            key = self._key
            if self._jwks is not None:
                header = jwt.get_unverified_header(token)
                key = self._jwks[(header.get("kid"), str(header.get("alg")))]
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.jwt_algorithms),
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            # One answer for every failure: which check failed is not the caller's business.
            raise HTTPError(401, "invalid_credentials", "the bearer token is not valid") from None
        roles = claims.get(s.jwt_roles_claim, [])
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise HTTPError(401, "invalid_credentials", "the bearer token is not valid")
        if not isinstance(claims["sub"], str) or not claims["sub"].strip():
            raise HTTPError(401, "invalid_credentials", "the bearer token is not valid")
        return Principal(claims["sub"], frozenset(roles), "jwt")

    def _from_headers(self, headers: Mapping[str, str], client: str | None) -> Principal | None:
        s = self.settings
        if not s.principal_header or not self._trusted(client):
            return None
        who = headers.get(s.principal_header.lower(), "").strip()
        if not who:
            return None
        roles = headers.get(s.roles_header.lower(), "") if s.roles_header else ""
        return Principal(who, frozenset(r.strip() for r in roles.split(",") if r.strip()), "header")

    def _trusted(self, client: str | None) -> bool:
        if client is None:
            return False
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def break_glass(self, principal: Principal, headers: Mapping[str, str]) -> Principal:
        """The principal flagged for break-glass when it holds the emergency role and gave a
        reason; 403 when it holds the role without one."""
        if not self.wants_break_glass(principal):
            return principal
        # Printable ASCII only, bounded: the reason is written to the audit trail verbatim.
        raw = headers.get(self.settings.break_glass_reason_header.lower(), "")
        reason = "".join(ch for ch in raw if " " <= ch <= "~").strip()
        if not reason:
            raise HTTPError(403, "break_glass_reason_required", "emergency access needs a reason header")
        return Principal(principal.id, principal.roles, principal.source, True, reason[:_MAX_REASON])


def _asymmetric(algorithm: str) -> type[Any] | tuple[type[Any], ...] | None:
    """The public-key type an asymmetric JWT algorithm verifies with; None for others."""
    if algorithm[:2] in ("RS", "PS") and algorithm[2:] in ("256", "384", "512"):
        return rsa.RSAPublicKey
    if algorithm in _EC_CURVES:
        return ec.EllipticCurvePublicKey
    if algorithm == "EdDSA":
        return (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    return None


def _check_suits(key: Any, algorithm: str, where: str) -> None:
    kind = _asymmetric(algorithm)
    curve = _EC_CURVES.get(algorithm)
    if kind is None or not isinstance(key, kind) or (curve and key.curve.name != curve):
        if curve:
            wanted = f"an EC {curve} key"
        elif algorithm == "EdDSA":
            wanted = "an Ed25519 or Ed448 key"
        else:
            wanted = "an RSA key"
        raise ConfigError(f"jwt_algorithms: {algorithm} needs {wanted}; {where} holds another kind")


def _load_secret(path: str, algorithms: tuple[str, ...]) -> bytes:
    try:
        secret = read_private_file(path, "JWT secret file").strip()
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    for algorithm in algorithms:
        if len(secret) < _HMAC_MIN_BYTES[algorithm]:
            raise ConfigError(
                f"JWT secret file {path} holds {len(secret)} bytes; {algorithm} needs at least "
                f"{_HMAC_MIN_BYTES[algorithm]}"
            )
    return secret


def _load_public_key(path: str, algorithms: tuple[str, ...]) -> Any:
    """A PEM public key, or the key of a PEM certificate; never a private key."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read JWT public key file {path}: {exc.strerror}") from None
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"JWT public key file {path} holds a private key; give the gateway the public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"JWT public key file {path} is not a PEM public key or certificate") from None
    for algorithm in algorithms:
        _check_suits(key, algorithm, f"JWT public key file {path}")
    return key


def _load_jwks(path: str, algorithms: tuple[str, ...]) -> dict[tuple[str | None, str], jwt.PyJWK]:
    """The JWKS file's signing keys for the pinned algorithms, by (kid, algorithm). PyJWT's
    own messages are not passed on: they can quote the key."""
    try:
        with open(path, "rb") as f:
            doc = orjson.loads(f.read())
    except OSError as exc:
        raise ConfigError(f"cannot read JWKS file {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise ConfigError(f"JWKS file {path} is not JSON") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'JWKS file {path} is not a JWK Set (an object with a "keys" list)')
    keys: dict[tuple[str | None, str], jwt.PyJWK] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue  # not a signing key: nothing to verify with
        kid = entry.get("kid")
        where = f"JWKS file {path}, key {kid if isinstance(kid, str) else f'#{n + 1}'}"
        if "d" in entry:
            raise ConfigError(f"{where} is a private key; give the gateway the public keys")
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            if entry.get("alg") in algorithms:
                raise ConfigError(f"{where} is not a usable {entry['alg']} key") from None
            continue  # a key type PyJWT cannot use; another relying party's, perhaps
        if jwk.algorithm_name not in algorithms:
            continue
        _check_suits(jwk.key, jwk.algorithm_name, where)
        if (jwk.key_id, jwk.algorithm_name) in keys:
            raise ConfigError(f"{where}: two {jwk.algorithm_name} keys share this kid")
        keys[(jwk.key_id, jwk.algorithm_name)] = jwk
    if not keys:
        raise ConfigError(f"JWKS file {path} has no signing key for jwt_algorithms {', '.join(algorithms)}")
    for algorithm in algorithms:
        if all(alg != algorithm for _, alg in keys):
            raise ConfigError(f"jwt_algorithms: {algorithm} has no key in JWKS file {path}")
    return keys
