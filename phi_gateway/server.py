"""The HTTP server under the gateway: uvicorn's httptools protocol, plus what uvicorn lacks.

- A deadline for the request head: a client trickling its request line and headers
  (slowloris) gets 408 and its connection closed; the body has its own deadline in the
  middleware. httptools, unlike h11, refuses Content-Length with Transfer-Encoding.
- Framing httptools accepts but other HTTP parsers read differently is refused before the
  app sees the request: Transfer-Encoding in HTTP/1.0, codings other than ``chunked``, and
  an Upgrade request with a body (its body would be read as upgraded bytes).
- No protocol upgrades (the gateway relays HTTP only), and every refusal, httptools' own
  included, is a JSON error with a stable code, as everywhere else in the gateway.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from phi_gateway.exceptions import HTTPError
from phi_gateway.httperrors import error_body

_TOO_SLOW = HTTPError(408, "request_timeout", "the request head did not arrive in time")
_INVALID = HTTPError(400, "invalid_request", "the request is not valid HTTP/1.1")


def _response(error: HTTPError) -> bytes:
    body = error_body(error)
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
        f"cache-control: no-store\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _framing_error(version: str, headers: list[tuple[bytes, bytes]], upgrade: bool) -> HTTPError | None:
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name == b"transfer-encoding"
        for coding in value.split(b",")
    ]
    if codings and version != "1.1":
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing;
        # httptools dechunks it, a front proxy may read it to the end of the connection.
        return HTTPError(400, "invalid_request", "Transfer-Encoding needs HTTP/1.1")
    if codings and codings != [b"chunked"]:
        # httptools dechunks "gzip, chunked" and hands the gzip bytes on as the body;
        # RFC 9112 6.1 says to answer 501 to a coding the server does not implement.
        return HTTPError(501, "unsupported_transfer_encoding", "only the chunked transfer coding is accepted")
    lengths = [value.strip() for name, value in headers if name == b"content-length"]
    if upgrade and (codings or any(length != b"0" for length in lengths)):
        # httptools passes the bytes after an Upgrade request's head on as upgraded data, so
        # the body would silently vanish (and a pass-through upstream wait for it).
        return HTTPError(400, "upgrade_not_supported", "this gateway upgrades no protocol")
    return None


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools with a deadline from a request's first byte (or the connection) to its
    last header, strict framing and JSON errors. Set ``header_timeout`` before the server
    starts."""

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _refusal: HTTPError | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        upgrade = bool(self.parser.should_upgrade())
        self._refusal = _framing_error(self.parser.get_http_version(), self.headers, upgrade)
        if self._refusal is not None:
            # Stops the parser before the app sees anything; uvicorn answers the parser
            # error through send_400_response, which sends this refusal.
            raise httptools.HttpParserError(self._refusal.code)
        super().on_headers_complete()
        if upgrade:
            # llhttp reads every later byte on this connection as upgraded data: nothing
            # after this request would be answered, so the connection ends with it.
            self.cycle.keep_alive = False

    def _should_upgrade(self) -> bool:
        # ProxyApp relays HTTP only; uvicorn's WebSocket handshake left a PUT unanswered.
        return False

    def send_400_response(self, msg: str) -> None:
        error, self._refusal = self._refusal or _INVALID, None
        if self.cycle is None or not self.cycle.response_started:  # never inside a response
            self.transport.write(_response(error))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_response(_TOO_SLOW))
            self.transport.close()
