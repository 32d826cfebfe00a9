"""Reading a request body the gateway will transform: JSON only, bounded in size and time,
inflated with caps when it arrives compressed. Every refusal is an ``HTTPError``."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import Message, Receive

from phi_gateway.exceptions import HTTPError


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what one policy request or response may cost."""

    max_body: int = 1 << 20  # request body, after inflation too
    max_response: int = 16 << 20  # upstream response buffered for decryption
    max_inflate_ratio: int = 100  # compressed bodies: inflated size over wire size
    max_depth: int = 64  # JSON nesting
    # Seconds to receive a whole request body. ProxyApp holds pass-through bodies to the
    # same deadline (UpstreamSettings.body_timeout, from the same setting in the gateway).
    body_timeout: float = 30.0
    # Seconds from forwarding a request to the end of a response the gateway buffers to
    # decrypt: per-read timeouts alone let an upstream trickling bytes hold it for ever.
    response_timeout: float = 60.0

    def __post_init__(self) -> None:
        if min(self.max_body, self.max_response, self.max_inflate_ratio, self.max_depth) < 1:
            raise ValueError("limits must be positive.")
        if not (self.body_timeout > 0 and self.response_timeout > 0):
            raise ValueError("body_timeout and response_timeout must be positive.")


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


async def receive_by(receive: Receive, deadline: float) -> Message:
    """The next message of a request body, if it comes before ``deadline`` (event-loop
    time): 408 ``request_timeout`` after it, ``ClientGone`` if the client left."""
    try:
        async with asyncio.timeout_at(deadline):
            message = await receive()
    except TimeoutError:
        raise HTTPError(408, "request_timeout", "the request body did not arrive in time") from None
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` type, in UTF-8 (the only charset JSON allows)."""
    if not content_type:
        return False
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def check_json_request(headers: Headers) -> None:
    types = headers.getlist("content-type")
    # Two Content-Types: the gateway would read the first, an upstream perhaps the last.
    if len(types) != 1 or not is_json(types[0]):
        raise HTTPError(415, "unsupported_media_type", "this route accepts only UTF-8 JSON bodies")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise HTTPError(415, "unsupported_content_encoding", "only gzip and deflate bodies are accepted")
    lengths = headers.getlist("content-length")
    if lengths and (len(lengths) != 1 or not lengths[0].isascii() or not lengths[0].isdigit()):
        raise HTTPError(400, "bad_content_length", "invalid Content-Length")


async def read_body(receive: Receive, headers: Headers, limits: Limits) -> bytes:
    """The whole request body, inflated. Checks Content-Length before reading anything."""
    check_json_request(headers)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    declared = headers.get("content-length")
    wire_limit = limits.max_body  # compressed bodies are also capped on the wire
    if declared is not None and int(declared) > wire_limit:
        raise HTTPError(413, "body_too_large", f"request body is over {limits.max_body} bytes")
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.get_running_loop().time() + limits.body_timeout
    while True:
        message = await receive_by(receive, deadline)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > wire_limit:
            raise HTTPError(413, "body_too_large", f"request body is over {limits.max_body} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if encoding == "identity":
        return body
    return _inflate(body, encoding, limits)


def _inflate(body: bytes, encoding: str, limits: Limits) -> bytes:
    """gzip or zlib-wrapped deflate, refusing bombs: the output is capped before it is made."""
    cap = min(limits.max_body, max(len(body), 1) * limits.max_inflate_ratio)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, cap + 1)
        if len(out) > cap or inflater.unconsumed_tail:
            raise HTTPError(413, "body_too_large", "compressed body inflates beyond the limit")
        if not inflater.eof or inflater.unused_data:
            raise HTTPError(400, "bad_content_encoding", f"body is not one complete {encoding} stream")
    except zlib.error:
        raise HTTPError(400, "bad_content_encoding", f"body is not valid {encoding}") from None
    return out


def inflate_response(body: bytes, encoding: str, limit: int) -> bytes:
    """An upstream response that came compressed although we asked for identity."""
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPError(502, "upstream_content_encoding", "upstream response encoding is not supported")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise HTTPError(
            502, "upstream_content_encoding", f"upstream response is not valid {encoding}"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPError(502, "upstream_body_too_large", "upstream response inflates beyond the limit")
    if not inflater.eof:
        raise HTTPError(
            502, "upstream_content_encoding", f"upstream response is a truncated {encoding} stream"
        )
    return out
