"""Who is asking: a principal and roles from a verified bearer JWT, or from headers set by
a trusted authenticating proxy in front of the gateway (only when configured).

Break-glass: a caller holding the configured emergency role must also say why (a reason
header); such requests see every field and are flagged in the audit trail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson

from phi_gateway.exceptions import HTTPError
from phi_gateway.secretfile import read_private_file

_MAX_REASON = 200


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

    def __post_init__(self) -> None:
        keys = [f for f in (self.jwt_secret_file, self.jwt_public_key_file, self.jwt_jwks_file) if f]
        if len(keys) > 1:
            raise ValueError("configure one JWT key source: secret, public key or JWKS file.")
        if keys and not (self.jwt_algorithms and self.jwt_issuer and self.jwt_audience):
            raise ValueError("JWT verification needs pinned algorithms, an issuer and an audience.")
        if keys and "none" in {a.lower() for a in self.jwt_algorithms}:
            raise ValueError("the 'none' algorithm is never accepted.")
        if self.roles_header and not self.principal_header:
            raise ValueError("roles_header needs principal_header.")
        if self.principal_header and not self.trusted_proxies:
            # Anyone who can reach the gateway could otherwise claim any identity and role.
            raise ValueError(
                "principal_header needs trusted_proxies: the addresses of the proxy that sets it."
            )
        for network in self.trusted_proxies:
            ipaddress.ip_network(network, strict=False)  # ValueError on a typo, at startup


class Identity:
    """Resolves the principal of a request; raises 401/403 ``HTTPError`` for bad credentials."""

    def __init__(self, settings: IdentitySettings | None = None) -> None:
        self.settings = settings or IdentitySettings()
        s = self.settings
        self._networks = [ipaddress.ip_network(n, strict=False) for n in s.trusted_proxies]
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if s.jwt_secret_file:
            self._key = read_private_file(s.jwt_secret_file, "JWT secret").strip()
        elif s.jwt_public_key_file:
            self._key = Path(s.jwt_public_key_file).read_bytes()
        elif s.jwt_jwks_file:
            self._jwks = jwt.PyJWKSet.from_dict(orjson.loads(Path(s.jwt_jwks_file).read_bytes()))

    @property
    def configured(self) -> bool:
        return bool(self._key is not None or self._jwks is not None or self.settings.principal_header)

    def resolve(self, headers: Mapping[str, str], client: str | None = None) -> Principal | None:
        """``headers`` with lower-case names; ``client`` the peer address. None when the
        request carries no identity."""
        principal = self._from_jwt(headers) or self._from_headers(headers, client)
        if principal is None:
            return None
        return self._break_glass(principal, headers)

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
                # The PyJWK itself, so PyJWT checks the token's algorithm against the key's.
                kid = jwt.get_unverified_header(token).get("kid")
                key = next(k for k in self._jwks.keys if k.key_id == kid)
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.jwt_algorithms),
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, StopIteration, ValueError, TypeError, KeyError):
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

    def _break_glass(self, principal: Principal, headers: Mapping[str, str]) -> Principal:
        role = self.settings.break_glass_role
        if not role or role not in principal.roles:
            return principal
        # Printable ASCII only, bounded: the reason is written to the audit trail verbatim.
        raw = headers.get(self.settings.break_glass_reason_header.lower(), "")
        reason = "".join(ch for ch in raw if " " <= ch <= "~").strip()
        if not reason:
            raise HTTPError(403, "break_glass_reason_required", "emergency access needs a reason header")
        return Principal(principal.id, principal.roles, principal.source, True, reason[:_MAX_REASON])
