"""``PHIMiddleware``: the pure ASGI middleware that applies policies to JSON bodies.

Wraps any ASGI app: ``app.add_middleware(PHIMiddleware, policies=..., keys=...)`` in
Starlette/FastAPI, or ``PHIMiddleware(ProxyApp(url), ...)``, which is the gateway itself.
Requests no policy names pass through untouched and streaming. On a policy route the
request body is read (bounded), parsed strictly, encrypted and indexed, and the app gets
the gateway's own serialization; if anything fails, the app is never called. Responses
to policy routes are buffered, decrypted and re-serialized; nothing partial is sent.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi_gateway.bodies import ClientGone, Limits, inflate_response, is_json, read_body
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import HTTPError
from phi_gateway.httperrors import http_error, send_error
from phi_gateway.identity import Identity, Principal
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.pepper import Pepper
from phi_gateway.policy import PolicySet, ResponseRule, RouteMatch
from phi_gateway.transform import Scope as DocScope
from phi_gateway.transform import decrypt_response, encrypt_request, rewrite_query

log = logging.getLogger("phi_gateway")

# Headers the body rewrite invalidates: the app gets one exact Content-Length instead.
_BODY_HEADERS = {b"content-length", b"transfer-encoding", b"content-encoding", b"expect"}
# Requests for part of a response cannot be decrypted; validators describe the ciphertext.
_PARTIAL = {b"range", b"if-range"}
_VALIDATORS = {b"etag", b"last-modified", b"content-md5", b"digest", b"accept-ranges", b"cache-control"}
_NO_BODY_STATUS = {204, 205, 304}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _serialize(doc: Any, *, upstream_side: bool) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # a lone surrogate the parser let through
        status, code = (502, "upstream_invalid_json") if upstream_side else (400, "invalid_json")
        raise HTTPError(status, code, "JSON text contains an unpaired surrogate") from None


_AMBIGUOUS = re.compile(rb"%2[eEfF]|%5[cC]|\\|;")
_AMBIGUOUS_PATH = HTTPError(
    400, "ambiguous_path", "path must be plain: no dot or empty segments, encoded slashes, backslashes or ';'"
)


def _route_path(scope: Scope) -> str | None:
    """The path policies are matched on, or None when upstreams could read it differently.

    Dot segments (raw or encoded), empty segments, encoded slashes or backslashes and ';'
    are normalized, or not, differently by every server and client library: a request
    spelled that way could match no policy here and a protected route upstream.
    """
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if not raw.startswith(b"/") or _AMBIGUOUS.search(raw):
        return None
    segments = raw.split(b"/")[1:]
    if any(s in (b".", b"..") for s in segments) or b"" in segments[:-1]:
        return None
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):  # mounted under a prefix: policies name the app's own paths
        path = path[len(root) :] or "/"
    return path


class PHIMiddleware:
    """Encrypts PHI in requests and decrypts it in responses, as the policies say."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        policies: PolicySet | Callable[[], PolicySet],
        keys: DataKeyCache,
        pepper: Pepper | None = None,
        limits: Limits | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.app = app
        self.identity = identity or Identity()
        # A callable lets the gateway swap policy sets atomically (hot reload): each
        # request takes the set in force when it starts and keeps it to the end.
        self._policies = policies if callable(policies) else (lambda: policies)
        self.keys = keys
        self.pepper = pepper
        self.limits = limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, _LifespanReceive(receive, self), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        path = _route_path(scope)
        if path is None:
            await send_error(send, _AMBIGUOUS_PATH, head=head)
            return
        policies = self._policies()
        found = policies.match(scope["method"], path)
        if found is None:
            if policies.claims(path):  # a policy path with a method no route names: never pass it
                await send_error(
                    send, HTTPError(405, "method_not_allowed", "no policy route has this method"), head=head
                )
            elif policies.unmatched == "deny":
                await send_error(
                    send, HTTPError(403, "route_not_allowed", "no policy allows this route"), head=head
                )
            else:
                await self.app(scope, receive, send)
            return
        await _Exchange(self, found, scope, receive, send).run()

    async def startup(self) -> None:
        """Reach the key service early; a failure here is logged, requests retry it."""
        start = getattr(self.keys.provider, "start", None)
        if start is not None:
            try:
                await start()
            except Exception as exc:  # the gateway still serves, failing closed
                log.warning("key provider not reachable at startup: %s", exc)

    async def shutdown(self) -> None:
        close = getattr(self.keys.provider, "close", None)
        if close is not None:
            await close()


class _LifespanReceive:
    """Starts the key provider before the app's own startup, closes it on shutdown."""

    def __init__(self, receive: Receive, middleware: PHIMiddleware) -> None:
        self._receive = receive
        self._middleware = middleware

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "lifespan.startup":
            await self._middleware.startup()
        elif message["type"] == "lifespan.shutdown":
            await self._middleware.shutdown()
        return message


class _Exchange:
    """One request on a policy route, and its response."""

    def __init__(
        self, middleware: PHIMiddleware, found: RouteMatch, scope: Scope, receive: Receive, send: Send
    ):
        self.mw = middleware
        self.route = found.route
        self.params = found.params
        self.scope = dict(scope)
        self.receive = receive
        self.send = send
        self.head = scope["method"] == "HEAD"
        self.client_started = False  # has anything been sent to the client?
        self.response_start: Message | None = None
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self.headers = {k.lower(): v for k, v in Headers(scope=scope).items()}
        given = self.headers.get("x-request-id", "")
        self.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        self.principal: Principal | None = None

    @property
    def roles(self) -> frozenset[str] | None:
        """What reveal rules see: None (everything) only for break-glass."""
        if self.principal is None:
            return frozenset()
        return None if self.principal.break_glass else self.principal.roles

    async def run(self) -> None:
        try:
            self.principal = self.mw.identity.resolve(self.headers)
            if self.principal is None and self.route.require_principal:
                raise HTTPError(401, "authentication_required", "this route needs an authenticated caller")
            receive = await self.prepare_request()
        except ClientGone:
            return
        except Exception as exc:  # every failure is answered; nothing is forwarded
            await self.fail(exc, upstream_side=False)
            return
        send = self.send_decrypted if self.route.response is not None else self.send_through
        try:
            await self.mw.app(self.scope, receive, send)
        except Exception as exc:
            if self.client_started:
                raise  # mid-stream: all we can do is drop the connection
            await self.fail(exc, upstream_side=True)

    async def fail(self, exc: BaseException, *, upstream_side: bool) -> None:
        error = http_error(exc, upstream_side=upstream_side)
        if error.status >= 500 and error.code == "internal_error":
            log.error(
                "unexpected error on %s %s", self.scope["method"], self.route.template.text, exc_info=exc
            )
        self.client_started = True
        await send_error(self.send, error, head=self.head, request_id=self.request_id)

    async def prepare_request(self) -> Receive:
        headers = Headers(scope=self.scope)
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.route.query:
            query = self.scope.get("query_string", b"").decode("latin-1")
            rewritten, _ = rewrite_query(query, self.route.query, self.mw.pepper)
            self.scope["query_string"] = rewritten.encode("ascii")
        raw_headers = [(k, v) for k, v in self.scope["headers"] if k.lower() != b"x-request-id"]
        raw_headers.append((b"x-request-id", self.request_id.encode()))
        if self.route.response is not None:
            # Ask for a whole, uncompressed response: it has to be decrypted, not relayed.
            raw_headers = [
                (k, v) for k, v in raw_headers if k.lower() not in (_PARTIAL | {b"accept-encoding"})
            ]
            raw_headers.append((b"accept-encoding", b"identity"))
        if self.route.request is None:
            # Forward what we parsed: a body on a route with no request rule was not parsed.
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                raise HTTPError(400, "unexpected_body", "this route takes no request body")
            self.scope["headers"] = raw_headers
            return self.receive
        body = await read_body(self.receive, headers, self.mw.limits)
        doc = loads_strict(body, max_depth=self.mw.limits.max_depth)
        await encrypt_request(
            doc,
            self.route.request,
            DocScope(self.params, lowered),
            keys=self.mw.keys,
            pepper=self.mw.pepper,
            master_key=self.route.key,
        )
        forwarded = _serialize(doc, upstream_side=False)
        raw_headers = [(k, v) for k, v in raw_headers if k.lower() not in _BODY_HEADERS]
        raw_headers.append((b"content-length", str(len(forwarded)).encode()))
        self.scope["headers"] = raw_headers
        return _OneBody(forwarded, self.receive)

    async def send_through(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": self._tagged(message["headers"])}
        self.client_started = True
        await self.send(message)

    def _tagged(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in headers if k.lower() != b"x-request-id"] + [
            (b"x-request-id", self.request_id.encode())
        ]

    async def send_decrypted(self, message: Message) -> None:
        rule = self.route.response
        assert rule is not None
        if message["type"] == "http.response.start":
            headers = Headers(raw=message["headers"])
            status = message["status"]
            if (
                rule.applies_to(status)
                and status not in _NO_BODY_STATUS
                and is_json(headers.get("content-type"))
                and not self.head
            ):
                self.response_start = message
                return
            await self.send_through(message)
            return
        if self.response_start is None:
            await self.send_through(message)
            return
        chunk = message.get("body", b"")
        self.response_size += len(chunk)
        if self.response_size > self.mw.limits.max_response:
            raise HTTPError(502, "upstream_body_too_large", "upstream response is over the gateway's limit")
        self.response_chunks.append(chunk)
        if not message.get("more_body", False):
            await self.finish_response(rule)

    async def finish_response(self, rule: ResponseRule) -> None:
        start = self.response_start
        assert start is not None
        headers = Headers(raw=start["headers"])
        body = b"".join(self.response_chunks)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        body = inflate_response(body, encoding, self.mw.limits.max_response)
        if body:
            try:
                doc = loads_strict(body, max_depth=self.mw.limits.max_depth)
            except Exception as exc:
                raise http_error(exc, upstream_side=True) from None
            lowered = {k.lower(): v for k, v in Headers(scope=self.scope).items()}
            report = await decrypt_response(
                doc,
                rule,
                DocScope(self.params, lowered),
                keys=self.mw.keys,
                pepper=self.mw.pepper,
                roles=self.roles,
            )
            if report.plaintext_seen:  # stored before the gateway, or written around it
                log.warning("plaintext at protected paths: %s", dict(report.plaintext_seen))
            body = _serialize(doc, upstream_side=True)
        raw = [(k, v) for k, v in start["headers"] if k.lower() not in _BODY_HEADERS | _VALIDATORS]
        raw.append((b"content-length", str(len(body)).encode()))
        raw.append((b"cache-control", b"private, no-store"))  # decrypted PHI: no shared cache
        self.client_started = True
        await self.send({**start, "headers": self._tagged(raw)})
        await self.send({"type": "http.response.body", "body": body})


class _OneBody:
    """``receive`` for the app: the rewritten body once, then the client's own messages
    (so the app still learns of a disconnect)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()
