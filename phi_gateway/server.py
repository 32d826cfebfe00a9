"""The HTTP server under the gateway: uvicorn's httptools protocol, plus the one thing
uvicorn lacks: a deadline for the request head. A client trickling its request line and
headers (slowloris) gets 408 and its connection closed; the body has its own deadline in
the middleware. httptools, unlike h11, refuses Content-Length with Transfer-Encoding."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from phi_gateway.exceptions import HTTPError
from phi_gateway.httperrors import error_body

_BODY = error_body(HTTPError(408, "request_timeout", "the request head did not arrive in time"))
_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: "
    + str(len(_BODY)).encode()
    + b"\r\n\r\n"
    + _BODY
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools with a deadline from a request's first byte (or the connection) to its
    last header. Set ``header_timeout`` before the server starts."""

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

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
            self.transport.write(_RESPONSE)
            self.transport.close()
