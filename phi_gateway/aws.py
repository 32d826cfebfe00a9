"""The AWS boundary: client settings shared by KMS and Secrets Manager, and the one place
where botocore/aiohttp errors become the project's errors.

Retries with exponential backoff and jitter on throttling are botocore's ``standard``
retry mode (``max_attempts`` in all); an overall ``deadline`` bounds one operation with
its retries. We do not stack a second retry loop on top.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

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


@dataclass(frozen=True, kw_only=True)
class AwsSettings:
    """How to reach AWS. ``endpoint_url`` overrides the regional (or FIPS) endpoint."""

    region: str = "us-east-1"
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

    def botocore_config(self) -> Config:
        return Config(
            region_name=self.region,
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
        return KeyUnavailable(f"{what} failed ({code or 'unknown error'})")
    if isinstance(exc, NoCredentialsError):
        return KeyAccessDenied(f"{what}: no AWS credentials")
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
