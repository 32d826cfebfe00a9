"""Fault injection for the adversarial suite: a loopback HTTP proxy in front of the moto KMS
server that passes, throttles, delays or resets chosen operations, or stops listening; an
upstream that answers with scripted raw bytes; and a gateway stack whose AWS timeouts,
retries and data-key cache limits a test chooses."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.proxy import ProxyApp
from tests.e2e.conftest import POLICIES, Deployment, ThreadServer, Upstream, free_port

THROTTLED = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding"}


class LoopThread:
    """An asyncio loop of its own in a daemon thread, for servers that sync tests drive."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Fault:
    """What happens to an operation: ``pass``, ``throttle``, ``delay`` (then pass) or ``reset``.
    ``times``: only the next N requests of it are affected, then it passes again."""

    kind: str = "pass"
    delay: float = 0.0
    times: int | None = None


@dataclass
class FaultyKms:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``target`` (the moto server).

    ``seen`` lists every request that arrived, by AWS operation (``Decrypt``,
    ``GenerateDataKey``, ``GetCallerIdentity``...), retries included, in arrival order.
    ``stop()`` closes the listener and every open connection, as a KMS endpoint that went
    away; ``start()`` brings it back on the same port.
    """

    target: str
    port: int = field(default_factory=free_port)
    faults: dict[str, Fault] = field(default_factory=dict)  # by operation; "*": every operation
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner = LoopThread()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._session: aiohttp.ClientSession | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyKms:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._session is not None:
            self._runner.run(self._session.close())
        self._runner.close()

    def start(self) -> None:
        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self._server = self._runner.run(listen())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                for writer in list(self._writers):
                    writer.transport.abort()
                await self._server.wait_closed()
                self._server = None

        self._runner.run(close())

    def set(self, operation: str, kind: str, *, delay: float = 0.0, times: int | None = None) -> None:
        with self._lock:
            self.faults[operation] = Fault(kind, delay, times)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.seen.clear()

    def count(self, operation: str) -> int:
        with self._lock:
            return self.seen.count(operation)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.seen)

    def _fault(self, operation: str) -> Fault:
        with self._lock:
            self.seen.append(operation)
            name = operation if operation in self.faults else "*"
            fault = self.faults.get(name)
            if fault is None or fault.kind == "pass":
                return Fault()
            if fault.times is not None:
                if fault.times <= 0:
                    return Fault()
                fault.times -= 1
            return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        first, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = first.split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]
        named = {k.lower(): v for k, v in headers}
        body = await reader.readexactly(int(named.get("content-length", "0")))
        operation = named.get("x-amz-target", "").rpartition(".")[2]
        if not operation:  # query protocol (STS): Action=GetCallerIdentity&...
            form = dict(p.partition("=")[::2] for p in body.decode("latin-1").split("&"))
            operation = form.get("Action", "?")
        fault = self._fault(operation)
        if fault.kind == "reset":
            writer.transport.abort()
            return False
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay)
        if fault.kind == "throttle":
            status, reason = 400, "Bad Request"
            out_headers = [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("x-amzn-RequestId", str(uuid.uuid4())),
                ("x-amzn-ErrorType", "ThrottlingException"),
            ]
            payload = THROTTLED
        else:
            if self._session is None:
                self._session = aiohttp.ClientSession(auto_decompress=False)
            async with self._session.request(
                method,
                self.target + target,
                headers=[(k, v) for k, v in headers if k.lower() not in _HOP],
                data=body,
            ) as response:
                status, reason = response.status, response.reason or "OK"
                payload = await response.read()
                out_headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\n".encode()
            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in out_headers)
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        return True


class ScriptedUpstream:
    """A loopback HTTP server that reads each request (head and body) and writes
    ``respond(method, path)``, raw bytes sent as they are, then closes the connection; with
    ``hold``, it keeps the connection open without another byte instead."""

    def __init__(
        self, respond: Callable[[str, str], bytes], *, hold: bool = False, trickle: float = 0.0
    ) -> None:
        self.respond = respond
        self.hold = hold
        self.trickle = trickle  # seconds between bytes of the answer after its head (0: at once)
        self.requests: list[bytes] = []
        self.port = free_port()
        self._runner = LoopThread()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            body = await reader.readexactly(int(lengths[0].split(b":")[1]) if lengths else 0)
            self.requests.append(head + body)
            method, path, _ = head.split(b" ", 2)
            answer = self.respond(method.decode(), path.decode())
            if self.trickle:  # the head at once, then the body a byte at a time
                split = answer.index(b"\r\n\r\n") + 4
                writer.write(answer[:split])
                for byte in answer[split:]:
                    await writer.drain()
                    await asyncio.sleep(self.trickle)
                    writer.write(bytes((byte,)))
            else:
                writer.write(answer)
            await writer.drain()
            if self.hold:
                await asyncio.sleep(60)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def __enter__(self) -> ScriptedUpstream:
        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self._server = self._runner.run(listen())
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        self._runner.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


AUTH_IDENTITY = IdentitySettings(
    principal_header="X-User", roles_header="X-Roles", trusted_proxies=("127.0.0.1",)
)


@contextlib.contextmanager
def kms_gateway(
    upstream: Upstream,
    secrets: Path,
    master_keys: list[str],
    aws: AwsSettings,
    *,
    cache: dict[str, Any] | None = None,
) -> Iterator[Deployment]:
    """``PHIMiddleware(ProxyApp(upstream))`` with KMS keys, as ``phi-gateway serve`` builds it,
    but with the AWS settings (endpoint, timeouts, attempts, deadline, observer) and the
    data-key cache options (``ttl``, ``max_uses``, ``clock``...) the test gives."""
    keys = DataKeyCache(KmsKeyProvider(master_keys, aws), **(cache or {}))
    app = PHIMiddleware(
        ProxyApp(upstream.url),
        policies=load_policies([POLICIES]),
        keys=keys,
        pepper=Pepper.load(secrets / "pepper.json"),
        identity=Identity(AUTH_IDENTITY),
    )
    with ThreadServer(app) as server:
        yield Deployment(server.url, upstream, keys, "proxy")


class FakeClock:
    """A monotonic clock a test moves by hand, for the data-key cache's TTL."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
