"""AWS KMS as a ``KeyProvider``, through one long-lived aioboto3 client.

Every botocore/aiohttp error is translated here, once, into the project's tree.
Retries with exponential backoff and jitter on throttling are botocore's ``standard``
retry mode (bounded by ``max_attempts``); we do not stack a second retry loop on top.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from phi_gateway.context import Context
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    KeyThrottled,
    KeyUnavailable,
    UnknownMasterKey,
)
from phi_gateway.keys import DataKey

_THROTTLED = {"ThrottlingException"}
_DENIED = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
}
# On Decrypt/ReEncrypt: the wrapped key does not open under this key and context, which for
# a token means tampering. On any other operation these are configuration errors.
_INVALID = {"InvalidCiphertextException", "IncorrectKeyException"}
_UNWRAPPING = {"Decrypt", "ReEncrypt"}
# KMS refuses CiphertextBlob over 6144 bytes; a longer "wrapped key" is a forged token, and
# sending it would turn an attacker's input into a KMS error that looks like an outage.
MAX_WRAPPED_KEY = 6144


@dataclass(frozen=True, kw_only=True)
class KmsSettings:
    """How to reach KMS. ``endpoint_url`` overrides the regional (or FIPS) endpoint."""

    region: str = "us-east-1"
    endpoint_url: str | None = None
    use_fips_endpoint: bool = False
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    max_attempts: int = 4  # in all, the first try included
    deadline: float = 10.0  # for one operation, its retries and backoff included

    def __post_init__(self) -> None:
        if not (self.connect_timeout > 0 and self.read_timeout > 0 and self.deadline > 0):
            raise ValueError("KMS timeouts and deadline must be positive.")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError("KMS max_attempts must be between 1 and 10.")
        if self.use_fips_endpoint and self.endpoint_url and "fips" not in self.endpoint_url:
            # botocore silently prefers endpoint_url over the FIPS switch.
            raise ValueError("use_fips_endpoint with an endpoint_url needs a FIPS endpoint URL.")

    def botocore_config(self) -> Config:
        return Config(
            region_name=self.region,
            use_fips_endpoint=self.use_fips_endpoint,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
        )


def _translate(exc: BaseException, operation: str) -> Exception:
    """Map a botocore/aiohttp error to the project's tree. Messages name only the operation
    and AWS's error code: botocore's own messages can repeat request parameters."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _THROTTLED:
            return KeyThrottled(f"KMS {operation} throttled after retries")
        if code in _DENIED:
            return KeyAccessDenied(f"KMS {operation} denied ({code})")
        if code in _INVALID and operation in _UNWRAPPING:
            return InvalidToken()
        return KeyUnavailable(f"KMS {operation} failed ({code or 'unknown error'})")
    if isinstance(exc, NoCredentialsError):
        return KeyAccessDenied(f"KMS {operation}: no AWS credentials")
    if isinstance(exc, TimeoutError):
        return KeyUnavailable(f"KMS {operation} did not finish within its deadline")
    return KeyUnavailable(f"KMS {operation} unreachable ({type(exc).__name__})")


def _check_context(context: Context) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise TypeError("encryption context keys and values must be strings")
    return dict(context)


class KmsKeyProvider:
    """Data keys from AWS KMS under a fixed set of master keys.

    ``master_keys`` lists key ids, ARNs or aliases; the first makes new data keys, all of
    them may unwrap (older keys stay listed through a rotation). They are resolved to key
    ARNs with DescribeKey on start, and Decrypt always pins ``KeyId`` to the token's ARN,
    so a token cannot steer the gateway to a key outside this list.
    """

    def __init__(
        self,
        master_keys: Sequence[str],
        settings: KmsSettings | None = None,
        *,
        session: aioboto3.Session | None = None,
    ) -> None:
        if not master_keys:
            raise ValueError("KmsKeyProvider needs at least one master key.")
        self._configured = tuple(master_keys)
        self._settings = settings or KmsSettings()
        self._session = session or aioboto3.Session()
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._arns: dict[str, str] = {}  # configured id/alias/ARN -> key ARN
        self._allowed: frozenset[str] = frozenset()
        self._starting = asyncio.Lock()

    def __repr__(self) -> str:
        return f"KmsKeyProvider(master_keys={list(self._configured)!r})"

    async def __aenter__(self) -> KmsKeyProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        async with self._starting:
            if self._client is None:
                await self._start()

    async def _start(self) -> None:
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                self._session.client(
                    "kms",
                    endpoint_url=self._settings.endpoint_url,
                    config=self._settings.botocore_config(),
                )
            )
            for configured in self._configured:
                async with self._calling("DescribeKey"):
                    meta = await self._client.describe_key(KeyId=configured)
                self._arns[configured] = meta["KeyMetadata"]["Arn"]
        except BaseException:
            self._client = None
            await stack.aclose()
            raise
        self._allowed = frozenset(self._arns.values())
        self._stack = stack

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    @property
    def default_master_key(self) -> str:
        return self._configured[0]

    @property
    def master_key_arns(self) -> list[str]:
        """Resolved ARNs in configured order (current first)."""
        return [self._arns[k] for k in self._configured]

    def _resolve(self, master_key: str) -> str:
        """A configured id, alias or ARN to its ARN; anything else is refused."""
        arn = self._arns.get(master_key, master_key)
        if arn not in self._allowed:
            raise UnknownMasterKey("master key is not configured for this gateway")
        return arn

    @asynccontextmanager
    async def _calling(self, operation: str) -> AsyncIterator[None]:
        if self._client is None:
            raise KeyUnavailable("KMS provider is not started")
        try:
            async with asyncio.timeout(self._settings.deadline):
                yield
        except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc, operation) from None

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey:
        arn = self._resolve(master_key)
        context = _check_context(context)
        async with self._calling("GenerateDataKey"):
            resp = await self._client.generate_data_key(
                KeyId=arn, KeySpec="AES_256", EncryptionContext=context
            )
        return DataKey(resp["KeyId"], resp["CiphertextBlob"], resp.pop("Plaintext"))

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        arn = self._resolve(key_ref)
        context = _check_context(context)
        if not 1 <= len(wrapped) <= MAX_WRAPPED_KEY:
            raise InvalidToken()
        async with self._calling("Decrypt"):
            resp = await self._client.decrypt(CiphertextBlob=wrapped, KeyId=arn, EncryptionContext=context)
        plaintext = resp.pop("Plaintext")
        if resp.get("KeyId") != arn:  # KMS already pins KeyId; refuse a response that disagrees
            raise KeyAccessError("KMS Decrypt answered for another key")
        return DataKey(arn, wrapped, plaintext)

    async def rewrap(
        self,
        key_ref: str,
        wrapped: bytes,
        context: Context,
        *,
        master_key: str,
        new_context: Context | None = None,
    ) -> tuple[str, bytes]:
        source, destination = self._resolve(key_ref), self._resolve(master_key)
        if not 1 <= len(wrapped) <= MAX_WRAPPED_KEY:
            raise InvalidToken()
        async with self._calling("ReEncrypt"):
            resp = await self._client.re_encrypt(
                CiphertextBlob=wrapped,
                SourceKeyId=source,
                SourceEncryptionContext=_check_context(context),
                DestinationKeyId=destination,
                DestinationEncryptionContext=_check_context(context if new_context is None else new_context),
            )
        return resp["KeyId"], resp["CiphertextBlob"]
