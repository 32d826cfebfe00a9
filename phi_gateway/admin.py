"""The admin port: ``/healthz``, ``/readyz`` and ``/metrics`` on a listener of their own,
never proxied, so probes and scrapes neither reach the upstream nor share its port.

``/healthz`` answers while the event loop runs. ``/readyz`` is 200 only when policies are
loaded, the key service answers for the current master key, and the audit trail takes
events (in ``block`` mode; in ``drop`` mode a failing sink is reported, not fatal, since
serving on is what that mode asked for). Answers name checks and our own error messages,
which carry no secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

import orjson
import uvicorn
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from phi_gateway.audit import AuditEmitter
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.metrics import CONTENT_TYPE, Metrics
from phi_gateway.rules import PolicySet

log = logging.getLogger("phi_gateway.admin")


class Readiness:
    """The /readyz checks. A key-service check is bounded by ``timeout`` and shared by
    probes that arrive together; its result is reused for ``reuse`` seconds."""

    def __init__(
        self,
        *,
        policies: Callable[[], PolicySet | None],
        keys: DataKeyCache,
        audit: Callable[[], AuditEmitter | None],
        metrics: Metrics | None = None,
        timeout: float = 2.0,
        reuse: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies, self._keys, self._audit = policies, keys, audit
        self._metrics = metrics
        self._timeout, self._reuse, self._clock = timeout, reuse, clock
        self._flight: asyncio.Task[tuple[bool, dict[str, str]]] | None = None
        self._last: tuple[float, tuple[bool, dict[str, str]]] | None = None

    async def check(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or why not})."""
        if self._last is not None and self._clock() - self._last[0] < self._reuse:
            return self._last[1]
        if self._flight is None:
            self._flight = asyncio.get_running_loop().create_task(self._run())
        flight = self._flight
        try:
            result = await asyncio.shield(flight)
        finally:
            if flight.done() and self._flight is flight:
                self._flight = None
        self._last = (self._clock(), result)
        return result

    async def _run(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        policies = self._policies()
        checks["policies"] = "ok" if policies is not None and policies.routes else "none loaded"
        checks["keys"] = await self._check_keys()
        fatal = {k for k, v in checks.items() if v != "ok"}
        audit = self._audit()
        if audit is None:
            checks["audit"] = "disabled"
        elif audit.accepting:
            checks["audit"] = "ok"
        else:
            checks["audit"] = "not accepting events (sink failing, queue full or stopped)"
            if audit.on_failure == "block":
                fatal.add("audit")
        ready = not fatal
        if self._metrics is not None:
            self._metrics.ready.set(1 if ready else 0)
        return ready, checks

    async def _check_keys(self) -> str:
        check = getattr(self._keys.provider, "check", None)
        if check is None:
            return "ok"  # a local keyring is a file already read
        try:
            async with asyncio.timeout(self._timeout):
                await check()
        except TimeoutError:
            return f"key service did not answer within {self._timeout:g} s"
        except PHIGatewayError as exc:
            return str(exc) or type(exc).__name__
        return "ok"


def admin_app(readiness: Readiness, metrics: Metrics) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        response: Response
        if method not in ("GET", "HEAD"):
            response = _json(405, {"error": {"code": "method_not_allowed"}})
        elif path == "/healthz":
            response = _json(200, {"status": "alive"})
        elif path == "/readyz":
            ready, checks = await readiness.check()
            response = _json(
                200 if ready else 503, {"status": "ready" if ready else "unready", "checks": checks}
            )
        elif path == "/metrics":
            response = Response(metrics.render(), media_type=CONTENT_TYPE)
        else:
            response = _json(404, {"error": {"code": "not_found"}})
        await response(scope, receive, send)

    return app


def _json(status: int, body: Any) -> Response:
    return Response(
        orjson.dumps(body), status, media_type="application/json", headers={"cache-control": "no-store"}
    )


class _Server(uvicorn.Server):
    """A second server in the gateway's loop: the main server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminServer:
    """Serves ``app`` on host:port inside the running loop, from ``start()`` to ``stop()``."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bound here, so a taken port is an error at startup (uvicorn would exit the process).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise PHIGatewayError(f"admin port {self.host}:{self.port} unavailable: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,  # the gateway's logging is configured already
            server_header=False,
            timeout_keep_alive=5,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise PHIGatewayError("admin server stopped at startup")
            await asyncio.sleep(0.01)
        log.info("admin endpoints on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)
        self._server = self._task = None
