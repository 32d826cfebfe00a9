"""Raw TCP servers on loopback for tests that need an upstream misbehaving, or recording,
below HTTP libraries: each runs its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from tests.e2e.conftest import free_port


class LoopbackServer:
    """Serves ``handle`` on 127.0.0.1:``port`` from ``with`` to its end."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", self.port), self.loop
        ).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class RawUpstream(LoopbackServer):
    """A keep-alive HTTP/1.1 server answering every request ``200 {}``, keeping the exact
    bytes of each (the demo upstream records headers as a dict, where a repeated header
    would hide its first copy), and the request line of each whose connection closed
    mid-body."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []  # head and body, as read
        self.cut_off: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: the gateway pools its upstream connections
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            try:
                body = await self.read_body(reader, head.lower())
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                self.cut_off.append(head.split(b"\r\n", 1)[0])
                break
            self.requests.append(head + body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    @staticmethod
    async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
        """The body's bytes as sent (chunked framing included); ``head`` in lower case."""
        if b"\r\ntransfer-encoding: chunked\r\n" in head:
            body = b""
            while True:
                line = await reader.readuntil(b"\r\n")
                body += line
                size = int(line.strip(), 16)
                if not size:
                    return body + await reader.readuntil(b"\r\n")
                body += await reader.readexactly(size + 2)
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return await reader.readexactly(int(line.split(b":", 1)[1]))
        return b""

    def headers(self, n: int = -1) -> list[tuple[str, str]]:
        """Request ``n``'s header fields in order, names in lower case."""
        lines = self.requests[n].split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines if line)]

    def target(self, n: int = -1) -> str:
        return self.requests[n].split(b" ", 2)[1].decode("latin-1")

    def clear(self) -> None:
        self.requests.clear()
        self.cut_off.clear()
