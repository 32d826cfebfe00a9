"""Part 6, the upstream client: why the proxy's hop to the upstream uses aiohttp and not httpx.
Both clients, pooled to the same number of connections, send the same GETs and POSTs from
one event loop to the demo API (in a process of its own), in interleaved rounds; what each
costs is this process's CPU per request, since nothing else runs in it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import Section
from bench.http import Processes, _free_port, patient

CONNECTIONS = 32
Send = Callable[[str, str, bytes], Awaitable[None]]


async def _load(send: Send, url: str, method: str, body: bytes, requests: int) -> tuple[float, float]:
    """``requests`` calls from ``CONNECTIONS`` concurrent tasks: (wall, CPU) seconds per request."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send(method, url, body)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return (time.perf_counter() - wall) / requests, (time.process_time() - cpu) / requests


async def _measure(
    base: str, body: bytes, rounds: int, requests: int
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        httpx.AsyncClient(limits=limits) as client,
    ):

        async def via_aiohttp(method: str, url: str, data: bytes) -> None:
            async with session.request(method, url, data=data or None, headers=headers) as response:
                await response.read()
                response.raise_for_status()

        async def via_httpx(method: str, url: str, data: bytes) -> None:
            response = await client.request(method, url, content=data or None, headers=headers)
            response.raise_for_status()

        clients: dict[str, Send] = {"aiohttp": via_aiohttp, "httpx": via_httpx}
        measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(rounds + 1):  # round 0 warms both pools up and is not recorded
            order = list(clients) if r % 2 else list(reversed(clients))
            for name in order:
                for method in ("GET", "POST"):
                    url = f"{base}/patients" + ("/bench-client" if method == "GET" else "")
                    sample = await _load(
                        clients[name], url, method, body if method == "POST" else b"", requests
                    )
                    if r:
                        measured.setdefault((name, method), []).append(sample)
    return measured


def run(context: dict[str, Any]) -> Section:
    quick = bool(context.get("quick"))
    rounds, requests = (1, 500) if quick else (3, 2000)
    body = json.dumps(patient("bench-client")).encode()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-clients-")))
        procs = Processes(tmp)
        stack.callback(procs.stop_all)
        port = _free_port()
        procs.start(
            "upstream",
            [sys.executable, "-m", "uvicorn", "--factory", "--host", "127.0.0.1", "--port", str(port),
             "--http", "httptools", "--no-access-log", "--log-level", "warning", "bench.http:upstream_app"],
            {**os.environ, "BENCH_DB": str(tmp / "upstream.sqlite")},
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        procs.wait_http("upstream", base)
        httpx.post(
            f"{base}/patients", content=body, headers={"content-type": "application/json"}
        ).raise_for_status()
        measured = asyncio.run(_measure(base, body, rounds, requests))
    wall = {key: statistics.median(w for w, _ in samples) for key, samples in measured.items()}
    cpu = {key: statistics.median(c for _, c in samples) for key, samples in measured.items()}
    section = Section("6. The upstream client: aiohttp against httpx")
    section.add(
        f"One event loop sends {requests:,} requests per case and round from {CONNECTIONS} tasks over a"
        f" pool of {CONNECTIONS} keep-alive connections to the demo API (another process), {rounds}"
        f" round{'s' * (rounds > 1)}, the clients alternating which goes first, after a warm-up round;"
        " medians. Requests/s is bounded by the upstream as much as by the client; the CPU columns are"
        " this process's CPU per request (`time.process_time`): the client's own cost, which is what"
        " the proxy's hop adds to every request, whatever the upstream costs.",
        "",
    )
    section.table(
        ["method", "aiohttp req/s", "httpx req/s", "aiohttp CPU µs/req", "httpx CPU µs/req",
         "httpx / aiohttp CPU"],
        [
            [m, f"{1 / wall['aiohttp', m]:,.0f}", f"{1 / wall['httpx', m]:,.0f}",
             f"{cpu['aiohttp', m] * 1e6:,.0f}", f"{cpu['httpx', m] * 1e6:,.0f}",
             f"{cpu['httpx', m] / cpu['aiohttp', m]:.1f}×"]
            for m in ("GET", "POST")
        ],
    )  # fmt: skip
    section.add(
        "httpx's pool looks for a free connection by scanning its list on every request"
        " (encode/httpx#3215), which grows with the pool; aiohttp keeps idle connections per host."
        " aiohttp also comes with aiobotocore, so it costs the install nothing.",
    )
    if quick:
        section.add("", "(--quick: one short round; the numbers check the bench, they are not results.)")
    return section
