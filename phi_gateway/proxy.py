"""``ProxyApp``: an ASGI app that forwards every request to one upstream over a pooled
aiohttp client (httpx 0.28 costs several times its CPU per request, its connection pool
scan dominating, encode/httpx#3215: ``bench/clients.py`` measures both side by side).

Hop-by-hop headers (RFC 9110 §7.6.1, and any named in ``Connection``) are dropped both
ways; ``X-Forwarded-Proto/Host`` are set by the gateway, replacing client copies, and the
client's address is appended to ``X-Forwarded-For`` (nginx's ``$proxy_add_x_forwarded_for``).
aiohttp adds no header of its own (no ``Accept``, no ``User-Agent``) but ``Host`` and framing.

A request body must arrive within ``body_timeout``, as on policy routes: a client trickling
one would otherwise hold a pooled upstream connection (and the upstream's worker) for ever.

A refused or reset upstream is 502, a slow one 504, as JSON errors. A POST is never sent
twice; aiohttp retries an idempotent request once when its connection drops before any
response (RFC 9110 §9.2.2), which covers the stale keep-alive race.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from phi_gateway.bodies import ClientGone, receive_by
from phi_gateway.exceptions import HTTPError
from phi_gateway.httperrors import send_error

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_GATEWAY_SET = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # between bytes of the upstream response
    max_connections: int = 100
    preserve_host: bool = False  # send the client's Host instead of the upstream's
    body_timeout: float = 30.0  # for the client to send a whole request body

    def __post_init__(self) -> None:
        timeouts = (self.connect_timeout, self.read_timeout, self.body_timeout)
        if not (min(timeouts) > 0 and self.max_connections > 0):
            raise ValueError("upstream timeouts, body_timeout and max_connections must be positive.")


# A client must not be able to strip these by naming them in Connection: the last two are
# set by the middleware (the audit trail's request id; identity, so a response it must
# decrypt does not come back compressed).
_NEVER_HOP = frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"host",
        b"location",
        b"x-request-id",
        b"accept-encoding",
    }
)


def _dropped(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Hop-by-hop names, including every token a Connection header lists."""
    names = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return names - _NEVER_HOP


class ProxyApp:
    def __init__(self, upstream: str, settings: UpstreamSettings | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("upstream must be an http(s) URL with no query or fragment.")
        self.upstream = upstream.rstrip("/")
        self.origin = f"{parts.scheme}://{parts.netloc}".encode("latin-1")
        self.settings = settings or UpstreamSettings()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ProxyApp({self.upstream!r})"

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.settings.connect_timeout,
                    sock_read=self.settings.read_timeout,
                ),
                auto_decompress=False,  # relay bytes as they are; the middleware inflates when it must
                # aiohttp would add these when the client sent none; Host and framing it must.
                skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        await _Forward(self, scope, receive, send).run()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _Forward:
    def __init__(self, proxy: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.proxy = proxy
        self.scope = scope
        self.receive = receive
        self.send = send
        self.started = False
        # Why the body stream stopped: aiohttp reports it only as a connection error.
        self.body_failure: HTTPError | ClientGone | None = None

    def url(self) -> URL:
        path = self.scope.get("raw_path") or self.scope["path"].encode("utf-8")
        if not path.startswith(b"/"):  # "OPTIONS *" and absolute forms have no place upstream
            raise HTTPError(400, "ambiguous_path", "request target must be a path")
        query = self.scope.get("query_string", b"")
        text = self.proxy.upstream + path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        # encoded=True: send the path exactly as checked, without yarl normalizing it again.
        return URL(text, encoded=True)

    def headers(self) -> list[tuple[str, str]]:
        raw: list[tuple[bytes, bytes]] = self.scope["headers"]
        hop = _dropped(raw)
        dropped = hop | _GATEWAY_SET
        if not self.proxy.settings.preserve_host:
            dropped.add(b"host")
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() not in dropped]
        # The addresses before ours, unless the previous hop named the header in Connection.
        chain = (
            []
            if b"x-forwarded-for" in hop
            else [v.decode("latin-1") for k, v in raw if k.lower() == b"x-forwarded-for"]
        )
        client = self.scope.get("client")
        if client:
            chain.append(client[0])
        if chain:
            out.append(("X-Forwarded-For", ", ".join(chain)))
        out.append(("X-Forwarded-Proto", self.scope.get("scheme", "http")))
        host = next((v for k, v in raw if k.lower() == b"host"), None)
        if host is not None:
            out.append(("X-Forwarded-Host", host.decode("latin-1")))
        return out

    async def body(self) -> bytes | AsyncIterator[bytes] | None:
        """The request body: bytes when it came in one message (always so after the
        middleware's rewrite), else a stream. Either must be whole by ``body_timeout``."""
        deadline = asyncio.get_running_loop().time() + self.proxy.settings.body_timeout
        first = await receive_by(self.receive, deadline)
        if not first.get("more_body", False):
            return first.get("body", b"") or None

        async def stream() -> AsyncIterator[bytes]:
            yield first.get("body", b"")
            try:
                while True:
                    message = await receive_by(self.receive, deadline)
                    yield message.get("body", b"")
                    if not message.get("more_body", False):
                        return
            except (HTTPError, ClientGone) as exc:
                # aiohttp closes the upstream connection and raises a ClientConnectionError
                # in exchange(), which reports this instead.
                self.body_failure = exc
                raise

        return stream()

    async def run(self) -> None:
        try:
            await self.exchange()
        except ClientGone:
            return
        except HTTPError as error:
            if self.started:
                raise  # from the app's own send (e.g. the middleware refusing a response)
            await send_error(self.send, error, head=self.scope["method"] == "HEAD")
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            await self.upstream_failed(
                HTTPError(504, "upstream_timeout", "the upstream did not answer in time"), exc
            )
        except aiohttp.ClientError as exc:
            await self.upstream_failed(
                HTTPError(502, "upstream_unavailable", "the upstream could not be reached"), exc
            )

    async def upstream_failed(self, error: HTTPError, exc: BaseException) -> None:
        if self.started:
            # Half a response has gone out: raising drops the client's connection rather
            # than pretend it is complete. A middleware still buffering can answer `error`.
            raise error from exc
        await send_error(self.send, error, head=self.scope["method"] == "HEAD")

    async def exchange(self) -> None:
        session = await self.proxy.session()
        data = await self.body()
        try:
            async with session.request(
                self.scope["method"],
                self.url(),
                headers=self.headers(),
                data=data,
                allow_redirects=False,
                compress=None,
            ) as response:
                raw = [(k, v) for k, v in response.raw_headers]
                dropped = _dropped(raw) | {b"server"}
                headers = [
                    (k.lower(), self.relocate(k.lower(), v)) for k, v in raw if k.lower() not in dropped
                ]
                await self._send(
                    {"type": "http.response.start", "status": response.status, "headers": headers}
                )
                async for chunk in response.content.iter_any():
                    await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except aiohttp.ClientError:
            if self.body_failure is not None:  # the client's fault, not the upstream's
                raise self.body_failure from None
            raise

    def relocate(self, name: bytes, value: bytes) -> bytes:
        """A redirect to the upstream's own origin points back at the gateway instead, as
        nginx's proxy_redirect does: a client following it must not bypass the gateway."""
        if name in (b"location", b"content-location") and value.startswith(self.proxy.origin):
            return value[len(self.proxy.origin) :] or b"/"
        return value

    async def _send(self, message: Message) -> None:
        self.started = True
        try:
            await self.send(message)
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Not the upstream's fault: make sure run() does not report it as one.
            raise _DownstreamError from exc


class _DownstreamError(Exception):
    pass
