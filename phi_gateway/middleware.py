"""``PHIMiddleware``: the pure ASGI middleware that applies policies to JSON bodies.

Wraps any ASGI app: ``app.add_middleware(PHIMiddleware, policies=..., keys=...)`` in
Starlette/FastAPI, or ``PHIMiddleware(ProxyApp(url), ...)``, which is the gateway itself.
Requests no policy names pass through untouched and streaming (a path an upstream could
read as a policy route's is refused instead). On a policy route the
request body is read (bounded), parsed strictly, encrypted and indexed, and the app gets
the gateway's own serialization; if anything fails, the app is never called. Responses
to policy routes are buffered, decrypted and re-serialized; nothing partial is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi_gateway.audit import AuditEmitter
from phi_gateway.bodies import Limits
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import HTTPError
from phi_gateway.exchange import Exchange
from phi_gateway.httperrors import send_error
from phi_gateway.identity import Identity
from phi_gateway.metrics import REFUSED, UNMATCHED, Metrics
from phi_gateway.paths import AMBIGUOUS_PATH, route_path
from phi_gateway.pepper import Pepper
from phi_gateway.rules import PolicySet

log = logging.getLogger("phi_gateway")
AUDIT_DRAIN_SECONDS = 10.0


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
        audit: AuditEmitter | None = None,
        gateway_identity: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.audit = audit
        self.metrics = metrics
        self.gateway_identity = gateway_identity  # this gateway's own AWS identity, for audit events
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
        policies = self._policies()
        path = route_path(scope, policies)
        if path is None:
            await self._refuse(scope, send, AMBIGUOUS_PATH)
            return
        found = policies.match(scope["method"], path)
        if found is None:
            if policies.claims(path):  # a policy path with a method no route names: never pass it
                await self._refuse(
                    scope, send, HTTPError(405, "method_not_allowed", "no policy route has this method")
                )
            elif policies.unmatched == "deny":
                await self._refuse(
                    scope, send, HTTPError(403, "route_not_allowed", "no policy allows this route")
                )
            else:
                await self._pass_through(scope, receive, send)
            return
        await Exchange(self, found, scope, receive, send).run()

    async def _pass_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client's own X-User is nobody's identity: the app behind may trust that header.
        client = scope.get("client")
        drop = self.identity.claims_to_drop(client[0] if client else None)
        if drop:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in drop]}
        if self.metrics is None:
            await self.app(scope, receive, send)
        else:
            await _Observed(self.metrics, scope["method"]).pass_through(self.app, scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, error: HTTPError) -> None:
        started = time.perf_counter()
        await send_error(send, error, head=scope["method"] == "HEAD")
        if self.metrics is not None:
            self.metrics.request(REFUSED, scope["method"], error.status, time.perf_counter() - started)

    async def startup(self) -> None:
        """Start the audit trail; reach the key service early (a failure there is logged,
        requests retry it)."""
        if self.audit is not None:
            await self.audit.start()
        start = getattr(self.keys.provider, "start", None)
        if start is not None:
            try:
                await start()
            except Exception as exc:  # the gateway still serves, failing closed
                log.warning("key provider not reachable at startup: %s", exc)

    async def shutdown(self) -> None:
        if self.audit is not None:
            try:
                async with asyncio.timeout(AUDIT_DRAIN_SECONDS):
                    await self.audit.stop()  # drains: graceful shutdown loses no event it can write
            except TimeoutError:
                log.error("audit trail not drained within %s s at shutdown", AUDIT_DRAIN_SECONDS)
        close = getattr(self.keys.provider, "close", None)
        if close is not None:
            await close()


class _Observed:
    """Status and timings of a request passed through untouched, for metrics."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics, self.method = metrics, method
        self.started = time.perf_counter()
        self.status: int | None = None

    async def pass_through(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.metrics.upstream(UNMATCHED, time.perf_counter() - self.started)
            await send(message)

        try:
            await app(scope, receive, observed)
        finally:
            self.metrics.request(UNMATCHED, self.method, self.status, time.perf_counter() - self.started)


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
