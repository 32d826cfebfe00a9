"""Every failure the gateway reports to a client: one mapping from the exception tree to an
HTTP status and a stable ``code``, and one JSON error body. Messages name fields and
limits, never values."""

from __future__ import annotations

import orjson
from starlette.types import Send

from phi_gateway.exceptions import (
    DocumentError,
    HTTPError,
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    UnknownMasterKey,
)

KEY_SERVICE_RETRY_AFTER = 2


def http_error(exc: BaseException, *, upstream_side: bool = False) -> HTTPError:
    """The client-facing error for ``exc``. ``upstream_side``: raised while handling the
    upstream's response (a bad token there is the upstream's data, not the client's fault)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, DocumentError):
        if exc.code == "configuration":
            return HTTPError(500, "configuration", str(exc))
        if upstream_side:
            return HTTPError(502, f"upstream_{exc.code}", f"upstream response: {exc}")
        return HTTPError(400, exc.code, str(exc))
    if isinstance(exc, UnknownMasterKey) and not upstream_side:
        return HTTPError(500, "configuration", "the policy's master key is not one the gateway may use")
    if isinstance(exc, InvalidToken | UnknownMasterKey):
        return HTTPError(502, "integrity_error", "a protected field did not authenticate")
    if isinstance(exc, KeyAccessDenied):
        return HTTPError(503, "key_access_denied", "the key service refused the gateway")
    if isinstance(exc, KeyAccessError):
        return HTTPError(
            503,
            "key_service_unavailable",
            "the key service is unavailable",
            retry_after=KEY_SERVICE_RETRY_AFTER,
        )
    return HTTPError(500, "internal_error", "internal error")


def error_body(error: HTTPError) -> bytes:
    return orjson.dumps({"error": {"code": error.code, "message": str(error)}})


async def send_error(
    send: Send, error: HTTPError, *, head: bool = False, request_id: str | None = None
) -> None:
    body = error_body(error)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    if error.status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the request is not read
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
