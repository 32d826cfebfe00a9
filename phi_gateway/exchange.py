"""One request on a policy route and its response: the per-request state of
``PHIMiddleware`` (kept here, never on the middleware), and its audit event."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from phi_gateway.audit_event import request_events
from phi_gateway.bodies import ClientGone, inflate_response, is_json, read_body
from phi_gateway.cache import counting_requests
from phi_gateway.exceptions import HTTPError
from phi_gateway.httperrors import http_error, send_error
from phi_gateway.identity import Principal
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.logs import request_id as logged_request_id
from phi_gateway.rules import ResponseRule, RouteMatch
from phi_gateway.search import rewrite_query
from phi_gateway.transform import Report, decrypt_response, encrypt_request
from phi_gateway.transform import Scope as DocScope

if TYPE_CHECKING:
    from phi_gateway.middleware import PHIMiddleware

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


class Exchange:
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
        self.started_at = time.monotonic()
        self.forwarded_at: float | None = None  # when the request went to the app/upstream
        self.deadline: asyncio.Timeout | None = None  # for the whole upstream response
        self.upstream_seconds: float | None = None  # until its response head came back
        self.client_status: int | None = None
        self.upstream_status: int | None = None
        self.error_code: str | None = None
        self.reports: list[tuple[str, Report]] = []
        self.searched: dict[str, int] = {}
        given = self.headers.get("x-request-id", "")
        self.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        self.principal: Principal | None = None
        self.admitted = False
        self.cache_counts: Counter[str] = Counter()

    @property
    def roles(self) -> frozenset[str] | None:
        """What reveal rules see: None (everything) only for break-glass."""
        if self.principal is None:
            return frozenset()
        return None if self.principal.break_glass else self.principal.roles

    async def run(self) -> None:
        logged = logged_request_id.set(self.request_id)
        try:
            with counting_requests() as self.cache_counts:
                await self.exchange()
        except BaseException as exc:
            if self.error_code is None:
                self.error_code = "cancelled" if isinstance(exc, asyncio.CancelledError) else "aborted"
            raise
        finally:
            self.record()
            logged_request_id.reset(logged)

    async def exchange(self) -> None:
        try:
            identity = self.mw.identity
            if self._repeated(identity.settings.identity_headers | {"authorization"}):
                raise HTTPError(401, "invalid_credentials", "identity headers must appear once")
            client = self.scope.get("client")
            self.principal = identity.authenticate(self.headers, client[0] if client else None)
            if self.principal is not None:
                # Set before the break-glass check, so a refused attempt is on record with its caller.
                self.principal = identity.break_glass(self.principal, self.headers)
            if self.principal is None and self.route.require_principal:
                raise HTTPError(401, "authentication_required", "this route needs an authenticated caller")
            if self._repeated(self.route.context_headers):
                raise HTTPError(
                    400, "header_ambiguous", "a header the encryption context is taken from must appear once"
                )
            audit = self.mw.audit
            if audit is not None and audit.on_failure == "block":
                # Nothing lost: a request moves PHI only with room for its event reserved.
                self.admitted = audit.admit()
                if not self.admitted:
                    raise HTTPError(
                        503, "audit_unavailable", "the audit trail cannot take events", retry_after=2
                    )
            receive = await self.prepare_request()
        except ClientGone:
            self.error_code = "client_gone"
            return
        except Exception as exc:  # every failure is answered; nothing is forwarded
            await self.fail(exc, upstream_side=False)
            return
        send = self.send_decrypted if self.route.response is not None else self.send_through
        self.forwarded_at = time.monotonic()
        try:
            if self.route.response is None:
                await self.mw.app(self.scope, receive, send)
            else:
                await self.buffered(receive, send)
        except Exception as exc:
            if self.client_started:
                raise  # mid-stream: all we can do is drop the connection
            await self.fail(exc, upstream_side=True)

    async def buffered(self, receive: Receive, send: Send) -> None:
        """The app's answer on a route whose response is decrypted, within ``response_timeout``
        until its last byte arrives; decrypting and sending it on are not timed. (A status the
        rule does not cover is relayed as it streams, within the same deadline.)"""
        deadline = self.deadline = asyncio.timeout(self.mw.limits.response_timeout)
        try:
            async with deadline:  # expiry cancels the app and surfaces here as TimeoutError
                await self.mw.app(self.scope, receive, send)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise HTTPError(504, "upstream_timeout", "the upstream's answer took too long") from None

    async def fail(self, exc: BaseException, *, upstream_side: bool) -> None:
        error = http_error(exc, upstream_side=upstream_side)
        self.client_status, self.error_code = error.status, error.code
        if error.status >= 500 and error.code == "internal_error":
            log.error(
                "unexpected error on %s %s", self.scope["method"], self.route.template.text, exc_info=exc
            )
        self.client_started = True
        await send_error(self.send, error, head=self.head, request_id=self.request_id)

    async def prepare_request(self) -> Receive:
        headers = Headers(scope=self.scope)
        if self.route.query:
            query = self.scope.get("query_string", b"").decode("latin-1")
            rewritten, counts = rewrite_query(query, self.route.query, self.mw.pepper)
            self.searched = dict(counts)
            self.scope["query_string"] = rewritten.encode("ascii")
        # The break-glass reason is for the audit trail, not for the upstream; identity headers
        # reach it only as the trusted proxy set them, never as a client's own claim.
        settings = self.mw.identity.settings
        private = {b"x-request-id", settings.break_glass_reason_header.lower().encode()}
        if self.principal is None or self.principal.source != "header":
            private |= {name.encode() for name in settings.identity_headers}
        raw_headers = [(k, v) for k, v in self.scope["headers"] if k.lower() not in private]
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
        doc = loads_strict(body, max_depth=self.mw.limits.max_depth, protected=self.route.request.protected)
        report = await encrypt_request(
            doc,
            self.route.request,
            DocScope(self.params, self.headers),
            keys=self.mw.keys,
            pepper=self.mw.pepper,
            master_key=self.route.key,
        )
        self.reports.append(("request", report))
        forwarded = _serialize(doc, upstream_side=False)
        raw_headers = [(k, v) for k, v in raw_headers if k.lower() not in _BODY_HEADERS]
        raw_headers.append((b"content-length", str(len(forwarded)).encode()))
        self.scope["headers"] = raw_headers
        return _OneBody(forwarded, self.receive)

    def _upstream_answered(self, status: int) -> None:
        self.upstream_status = status
        if self.forwarded_at is not None:
            self.upstream_seconds = time.monotonic() - self.forwarded_at

    async def send_through(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": self._tagged(message["headers"])}
            self.client_status = message["status"]
            if self.upstream_status is None:
                self._upstream_answered(message["status"])
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
            status = message["status"]
            self._upstream_answered(status)
            if rule.applies_to(status) and status not in _NO_BODY_STATUS and not self.head:
                # Buffered whatever its type: a body the rule covers that is not JSON cannot
                # be checked for plaintext, so it is refused rather than relayed.
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
            if self.deadline is not None:
                self.deadline.reschedule(None)  # all of it arrived; decrypting has its own deadlines
            await self.finish_response(rule)

    async def finish_response(self, rule: ResponseRule) -> None:
        start = self.response_start
        assert start is not None
        headers = Headers(raw=start["headers"])
        body = b"".join(self.response_chunks)
        if body and not is_json(headers.get("content-type")):
            raise HTTPError(
                502, "upstream_not_json", "the upstream answered a protected route with a non-JSON body"
            )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        body = inflate_response(body, encoding, self.mw.limits.max_response)
        if body:
            try:
                doc = loads_strict(body, max_depth=self.mw.limits.max_depth)
            except Exception as exc:
                raise http_error(exc, upstream_side=True) from None
            report = await decrypt_response(
                doc,
                rule,
                DocScope(self.params, self.headers),  # the client's, as when encrypting
                keys=self.mw.keys,
                pepper=self.mw.pepper,
                roles=self.roles,
            )
            self.reports.append(("response", report))
            if report.plaintext_seen:  # stored before the gateway, or written around it
                log.warning("plaintext at protected paths: %s", dict(report.plaintext_seen))
            body = _serialize(doc, upstream_side=True)
        raw = [(k, v) for k, v in start["headers"] if k.lower() not in _BODY_HEADERS | _VALIDATORS]
        raw.append((b"content-length", str(len(body)).encode()))
        raw.append((b"cache-control", b"private, no-store"))  # decrypted PHI: no shared cache
        self.client_started = True
        self.client_status = start["status"]
        await self.send({**start, "headers": self._tagged(raw)})
        await self.send({"type": "http.response.body", "body": body})

    def _repeated(self, names: Iterable[str]) -> bool:
        """Whether a header named in ``names`` (lower case) appears more than once. Servers
        disagree on which copy of a repeated header counts: such a request is refused."""
        wanted = {name.encode() for name in names}
        seen = [k.lower() for k, _ in self.scope["headers"] if k.lower() in wanted]
        return len(seen) != len(set(seen))

    def outcome(self) -> str:
        if self.error_code in ("aborted", "cancelled", "client_gone"):
            return "incomplete"
        if self.error_code is not None:
            return "refused"
        if self.client_status is None:
            return "incomplete"  # the client left before any answer
        if any(report.redacted for _, report in self.reports):
            return "redacted"  # protected fields nulled: they did not authenticate, or were plaintext
        return "upstream_error" if self.upstream_status is not None and self.upstream_status >= 500 else "ok"

    def record(self) -> None:
        """The metrics and audit event of this request: who, which records, which fields, what
        happened. Paths, counts, ids and codes only: never a value, token, key or body."""
        latency = time.monotonic() - self.started_at
        metrics = self.mw.metrics
        if metrics is not None:
            route = self.route.template.text
            metrics.request(route, self.scope["method"], self.client_status, latency)
            if self.upstream_seconds is not None:
                metrics.upstream(route, self.upstream_seconds)
            for _, report in self.reports:
                metrics.report(self.route.policy, report)
        audit = self.mw.audit
        if audit is None:
            return
        principal = self.principal
        event: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id,
            "principal": principal.id if principal else None,
            "roles": sorted(principal.roles) if principal else [],
            "auth": principal.source if principal else None,
            "break_glass": bool(principal and principal.break_glass),
            # holds the emergency role: granted with a reason, refused (403) without one
            "break_glass_attempted": bool(principal and self.mw.identity.wants_break_glass(principal)),
            "gateway": self.mw.gateway_identity,
            "method": self.scope["method"],
            "route": self.route.template.text,
            "policy": self.route.policy,
            "outcome": self.outcome(),
            "status": self.client_status,
            "error": self.error_code,
            "upstream_status": self.upstream_status,
            "latency_ms": round(latency * 1000, 1),
            "key_cache": {"hits": self.cache_counts["hits"], "misses": self.cache_counts["misses"]},
        }
        if principal and principal.break_glass:
            event["break_glass_reason"] = principal.reason
        if self.searched:
            event["searched"] = self.searched
        try:
            # One unit: the main event and the continuations carrying the rest of its records.
            audit.emit_all(request_events(event, self.reports), admitted=self.admitted)
        except Exception as exc:  # the request is over; losing its event must at least be loud
            log.error("audit event of request %s not recorded: %s", self.request_id, type(exc).__name__)


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
