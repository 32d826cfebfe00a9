"""AWS KMS as a ``KeyProvider``, through one long-lived aioboto3 client.

Settings, retries and error translation are the AWS boundary's (``aws.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aioboto3

from phi_gateway.aws import AwsSettings, arn_region, calling
from phi_gateway.context import Context
from phi_gateway.exceptions import InvalidToken, KeyAccessError, KeyUnavailable, UnknownMasterKey
from phi_gateway.keys import DataKey

# KMS refuses CiphertextBlob over 6144 bytes; a longer "wrapped key" is a forged token, and
# sending it would turn an attacker's input into a KMS error that looks like an outage.
MAX_WRAPPED_KEY = 6144


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

    One client talks to one region: ``settings.region``, else the region in the first key's
    ARN, else the environment's (``AwsSettings.resolve``). A key ARN in another region is
    refused here rather than left to fail as "not found" at the first call.
    """

    def __init__(
        self,
        master_keys: Sequence[str],
        settings: AwsSettings | None = None,
        *,
        session: aioboto3.Session | None = None,
    ) -> None:
        if not master_keys:
            raise ValueError("KmsKeyProvider needs at least one master key.")
        self._configured = tuple(master_keys)
        self._session = session or aioboto3.Session()
        self._settings = (settings or AwsSettings()).resolve(self._session, self._configured[0])
        for configured in self._configured:
            if arn_region(configured) not in (None, self.region):
                raise KeyAccessError(f"KMS key {configured} is not in this provider's region {self.region}")
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

    async def check(self) -> None:
        """Readiness: KMS answers DescribeKey for the current master key (raises otherwise)."""
        await self._ready()
        async with self._calling("DescribeKey"):
            await self._client.describe_key(KeyId=self.master_key_arns[0])

    @property
    def region(self) -> str:
        """The AWS region this provider's client talks to."""
        return str(self._settings.region)

    @property
    def default_master_key(self) -> str:
        return self._configured[0]

    @property
    def master_key_arns(self) -> list[str]:
        """Resolved ARNs in configured order (current first)."""
        return [self._arns[k] for k in self._configured]

    async def _ready(self) -> None:
        # Started lazily too, so a gateway that came up while KMS was down recovers with it.
        if self._client is None:
            await self.start()

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
        async with calling("KMS", operation, self._settings):
            yield

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey:
        await self._ready()
        arn = self._resolve(master_key)
        context = _check_context(context)
        async with self._calling("GenerateDataKey"):
            resp = await self._client.generate_data_key(
                KeyId=arn, KeySpec="AES_256", EncryptionContext=context
            )
        return DataKey(resp["KeyId"], resp["CiphertextBlob"], resp.pop("Plaintext"))

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        await self._ready()
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
        await self._ready()
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
