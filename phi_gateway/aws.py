"""The AWS boundary: client settings shared by KMS and Secrets Manager, and the one place
where botocore/aiohttp errors become the project's errors.

The region of a client is, in order: the one set in ``AwsSettings``; the region inside the
ARN of the resource the client is for (``resolve``: the KMS provider gives its first key);
``AWS_REGION``; then botocore's own lookup (``AWS_DEFAULT_REGION``, the profile's
``region``). With none of these it is an error, as it is for ``aws kms``: a guessed region
sends requests, and key ids, to the wrong place. Settings that were not resolved skip the
ARN step and leave the rest to ``botocore_config`` and botocore.

Retries with exponential backoff and jitter on throttling are botocore's ``standard``
retry mode (``max_attempts`` in all); an overall ``deadline`` bounds one operation with
its retries. We do not stack a second retry loop on top.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    InvalidRegionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    SSOError,
    TokenRetrievalError,
    UnknownRegionError,
)

from phi_gateway.exceptions import InvalidToken, KeyAccessDenied, KeyAccessError, KeyThrottled, KeyUnavailable

# Told of every operation: (service, operation, outcome, seconds). For metrics.
AwsObserver = Callable[[str, str, str, float], None]

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
_NOT_FOUND = {"ResourceNotFoundException", "NotFoundException"}
# The key exists but cannot be used now: disabled, pending deletion or import, or its
# custom key store is disconnected. An operator can fix it; the request may succeed later.
_KEY_STATE = {"DisabledException", "KMSInvalidStateException", "KeyUnavailableException"}
_NO_CREDENTIALS = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    TokenRetrievalError,
    SSOError,
)
NO_REGION = (
    "no AWS region: give one (--region, aws_region), name the key by ARN, or set AWS_REGION, "
    "AWS_DEFAULT_REGION or the profile's region"
)


def _ambient_region() -> str | None:
    # AWS_REGION, which the AWS CLI v2 and the other SDKs read before AWS_DEFAULT_REGION and
    # the profile, but botocore does not read at all.
    return os.environ.get("AWS_REGION") or None


def arn_region(identifier: str) -> str | None:
    """The region inside an ARN (``arn:partition:service:region:account:resource``); None
    for a key id, an alias name, or an ARN without a region."""
    parts = identifier.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[3]:
        return parts[3]
    return None


@dataclass(frozen=True, kw_only=True)
class AwsSettings:
    """How to reach AWS. ``endpoint_url`` overrides the regional (or FIPS) endpoint.

    ``region`` None means: found by ``resolve`` (see the module docstring)."""

    region: str | None = None
    endpoint_url: str | None = None
    use_fips_endpoint: bool = False
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    max_attempts: int = 4  # in all, the first try included
    deadline: float = 10.0  # for one operation, its retries and backoff included
    observer: AwsObserver | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.connect_timeout > 0 and self.read_timeout > 0 and self.deadline > 0):
            raise ValueError("AWS timeouts and deadline must be positive.")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError("AWS max_attempts must be between 1 and 10.")
        if self.use_fips_endpoint and self.endpoint_url and "fips" not in self.endpoint_url:
            # botocore silently prefers endpoint_url over the FIPS switch.
            raise ValueError("use_fips_endpoint with an endpoint_url needs a FIPS endpoint URL.")

    def resolve(self, session: aioboto3.Session, arn: str | None = None) -> AwsSettings:
        """These settings with their region filled in for a client of the resource ``arn``
        (a key or secret id, an ARN or not): the order is the module docstring's."""
        if self.region:
            return self
        region = arn_region(arn or "") or _ambient_region() or session.region_name
        if not region:
            raise KeyAccessError(NO_REGION)
        return replace(self, region=region)

    def botocore_config(self) -> Config:
        return Config(
            region_name=self.region or _ambient_region(),  # None: botocore's lookup
            use_fips_endpoint=self.use_fips_endpoint,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
        )


def translate(exc: BaseException, service: str, operation: str) -> Exception:
    """Map a botocore/aiohttp error to the project's tree. Messages name only the service,
    the operation and AWS's error code: botocore's own messages can repeat parameters."""
    what = f"{service} {operation}"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _THROTTLED:
            return KeyThrottled(f"{what} throttled after retries")
        if code in _DENIED:
            return KeyAccessDenied(f"{what} denied ({code})")
        if code in _INVALID and operation in _UNWRAPPING:
            return InvalidToken()
        if code in _NOT_FOUND:
            return KeyAccessError(f"{what}: not found ({code})")
        if code in _KEY_STATE:
            return KeyUnavailable(f"{what}: the key is not usable now ({code})")
        return KeyUnavailable(f"{what} failed ({code or 'unknown error'})")
    if isinstance(exc, _NO_CREDENTIALS):
        return KeyAccessDenied(f"{what}: no usable AWS credentials ({type(exc).__name__})")
    if isinstance(exc, NoRegionError):
        return KeyAccessError(f"{what}: {NO_REGION}")
    if isinstance(exc, (InvalidRegionError, UnknownRegionError)):
        return KeyAccessError(f"{what}: the AWS region is not valid")
    if isinstance(exc, TimeoutError):
        return KeyUnavailable(f"{what} did not finish within its deadline")
    return KeyUnavailable(f"{what} unreachable ({type(exc).__name__})")


@asynccontextmanager
async def calling(service: str, operation: str, settings: AwsSettings) -> AsyncIterator[None]:
    """Run one AWS operation under the deadline, translating its errors (chains dropped)."""
    started, outcome = time.perf_counter(), "error"
    try:
        async with asyncio.timeout(settings.deadline):
            yield
        outcome = "ok"
    except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
        mapped = translate(exc, service, operation)
        outcome = _OUTCOMES.get(type(mapped), "error")
        raise mapped from None
    except asyncio.CancelledError:
        outcome = "cancelled"  # e.g. a readiness probe's own, shorter, deadline
        raise
    finally:
        if settings.observer is not None:
            settings.observer(service, operation, outcome, time.perf_counter() - started)


_OUTCOMES: dict[type[Exception], str] = {
    KeyThrottled: "throttled",
    KeyAccessDenied: "denied",
    InvalidToken: "invalid",
    KeyUnavailable: "unavailable",
}
