"""Peppers: the versioned secret behind blind indexes and context pseudonyms.

One pepper secret per version, kept in AWS Secrets Manager (production) or a local file
(development), never the same secret as any encryption key. Every use derives its own
key with HKDF-SHA256, so an index of one field or policy says nothing about another.
Format: ``docs/pepper.md``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

import aioboto3
import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phi_gateway import b64url
from phi_gateway.aws import AwsSettings, calling
from phi_gateway.context import Pseudonymizer
from phi_gateway.exceptions import PepperError
from phi_gateway.secretfile import create_private_file, read_private_file

FORMAT = "phi-gateway/pepper"
MIN_BYTES = 32
_SALT = b"phi-gateway/pepper/v1"


class Pepper:
    """A set of pepper versions; ``current`` makes new indexes, all may be searched."""

    __slots__ = ("_derived", "_pseudonymizers", "_secrets", "current")

    def __init__(self, versions: Mapping[int, bytes], current: int) -> None:
        if current not in versions:
            raise PepperError("pepper's current version is not among its versions")
        if any(len(v) < MIN_BYTES for v in versions.values()):
            raise PepperError(f"every pepper version must be at least {MIN_BYTES} bytes")
        self._secrets = dict(versions)
        self._derived: dict[tuple[str, int], bytes] = {}
        self._pseudonymizers: dict[tuple[str, int], Pseudonymizer] = {}  # asked for per record
        self.current = current

    def __repr__(self) -> str:
        return f"Pepper(versions={sorted(self._secrets)}, current={self.current}, secrets=<hidden>)"

    @property
    def versions(self) -> list[int]:
        return sorted(self._secrets)

    def search_order(self) -> list[int]:
        """Every version, current first, then the others newest first: the order searches ask
        for indexes in during an overlap, and decrypt tries pseudonym contexts in."""
        return [self.current, *sorted((v for v in self._secrets if v != self.current), reverse=True)]

    def derive(self, purpose: str, version: int | None = None) -> bytes:
        """A 32-byte key for one purpose (e.g. ``blind-index/patients/ssn_bidx``)."""
        version = self.current if version is None else version
        derived = self._derived.get((purpose, version))
        if derived is None:
            try:
                secret = self._secrets[version]
            except KeyError:
                raise PepperError("unknown pepper version") from None
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose.encode("utf-8"))
            derived = self._derived[(purpose, version)] = hkdf.derive(secret)
        return derived

    def pseudonymizer(self, policy: str, version: int | None = None) -> Pseudonymizer:
        """Pseudonyms for KMS context values under a pepper version (default: current, which
        new data keys use; older versions open data keys wrapped before a rotation)."""
        version = self.current if version is None else version
        pseudonymizer = self._pseudonymizers.get((policy, version))
        if pseudonymizer is None:
            pseudonymizer = self._pseudonymizers[(policy, version)] = Pseudonymizer(
                self.derive(f"context-pseudonym/{policy}", version)
            )
        return pseudonymizer

    @classmethod
    def from_json(cls, raw: bytes | str, source: str) -> Pepper:
        try:
            doc = orjson.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError
            versions = {int(k): b64url.decode(v) for k, v in doc["peppers"].items()}
            current = int(doc["current"])
        except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
            versions = {}  # raised below, outside this block: the parser's error holds the text
        if not versions:
            raise PepperError(f"{source} is not a valid phi-gateway pepper")
        return cls(versions, current)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Pepper:
        try:
            raw = read_private_file(path, "pepper file")
        except OSError as exc:
            raise PepperError(str(exc)) from None
        return cls.from_json(raw, f"pepper file {os.fspath(path)}")

    @classmethod
    async def from_secrets_manager(
        cls, secret_id: str, settings: AwsSettings | None = None, *, session: aioboto3.Session | None = None
    ) -> Pepper:
        """Read the pepper from a Secrets Manager SecretString (same JSON as the file)."""
        session = session or aioboto3.Session()
        settings = (settings or AwsSettings()).resolve(session, secret_id)
        async with (
            calling("Secrets Manager", "GetSecretValue", settings),
            session.client(
                "secretsmanager", endpoint_url=settings.endpoint_url, config=settings.botocore_config()
            ) as client,
        ):
            response = await client.get_secret_value(SecretId=secret_id)
        return cls.from_json(response.get("SecretString", ""), f"secret {secret_id}")


def new_pepper_document(version: int = 1) -> bytes:
    """JSON for a fresh pepper with one random 32-byte version."""
    doc = {
        "format": FORMAT,
        "current": str(version),
        "peppers": {str(version): b64url.encode(secrets.token_bytes(32))},
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def create_pepper_file(path: str | os.PathLike[str]) -> None:
    """Write a new pepper file (mode 0600); never overwrites."""
    try:
        create_private_file(path, new_pepper_document(), "pepper file")
    except OSError as exc:
        raise PepperError(str(exc)) from None
