"""Routes no policy names, end to end: the standalone proxy (``phi-gateway``'s app in uvicorn,
as ``serve`` runs it) in front of an upstream that keeps the raw bytes of every request,
and a Starlette app wrapped in ``PHIMiddleware``.

What is checked: a client trickling a pass-through body gets 408 and cannot hold a pooled
upstream connection; what the upstream receives is what the client sent (no headers the
client did not send, ``X-Forwarded-For`` appended to); odd paths away from policy routes
reach the app untouched.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from phi_gateway.bodies import Limits
from phi_gateway.cache import DataKeyCache
from phi_gateway.keyring import LocalKeyring
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.policy import load_policies
from tests.e2e.conftest import POLICIES, ThreadServer, Upstream, proxy_deployment
from tests.loopback import RawUpstream

BODY_TIMEOUT = 1.0  # seconds; short, so a stalled body is answered within the test


@pytest.fixture(scope="module")
def proxied(secrets_dir: Path) -> Iterator[tuple[str, RawUpstream]]:
    """The gateway with a one-connection upstream pool: a connection a stalled body kept
    would stall every request after it."""
    with (
        RawUpstream() as upstream,
        proxy_deployment(
            Upstream(f"http://127.0.0.1:{upstream.port}"),
            secrets_dir,
            body_timeout=BODY_TIMEOUT,
            upstream_max_connections=1,
        ) as gateway,
    ):
        yield gateway.url, upstream


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def send_raw(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data``, read until the gateway closes the connection; the reply and how long
    it took. A connection left open fails on the socket timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply, time.monotonic() - started


STALLED = {
    "content-length-part-sent": (b"Content-Length: 30\r\n", b"abcd"),
    "content-length-none-sent": (b"Content-Length: 30\r\n", b""),
    "chunked-part-sent": (b"Transfer-Encoding: chunked\r\n", b"4\r\nabcd\r\n"),
}


@pytest.mark.parametrize(("framing", "sent"), STALLED.values(), ids=STALLED.keys())
def test_a_stalled_pass_through_body_gets_408_and_frees_the_upstream_connection(
    proxied: tuple[str, RawUpstream], framing: bytes, sent: bytes
) -> None:
    url, upstream = proxied
    upstream.clear()
    reply, took = send_raw(port_of(url), b"PUT /unmatched HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + sent)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert took < 9  # the body deadline answered, not a socket timeout
    # The pool's one connection is free: the next request is served.
    with httpx.Client(base_url=url, timeout=5) as client:
        assert client.get("/after").status_code == 200
    assert [upstream.target(n) for n in range(len(upstream.requests))] == ["/after"]
    # A body that had started upstream was cut off there, not left waiting.
    assert upstream.cut_off == ([b"PUT /unmatched HTTP/1.1"] if sent else [])


def test_the_upstream_gets_no_header_the_client_did_not_send(proxied: tuple[str, RawUpstream]) -> None:
    url, upstream = proxied
    upstream.clear()
    bare, _ = send_raw(port_of(url), b"GET /bare HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    sent, _ = send_raw(
        port_of(url),
        b"GET /sent HTTP/1.1\r\nHost: gw.test\r\nAccept: application/json\r\nUser-Agent: curl/8.5\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert bare.startswith(b"HTTP/1.1 200") and sent.startswith(b"HTTP/1.1 200")
    assert {name for name, _ in upstream.headers(0)} == {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
    kept = upstream.headers(1)
    assert [v for k, v in kept if k == "accept"] == ["application/json"]
    assert [v for k, v in kept if k == "user-agent"] == ["curl/8.5"]


def test_x_forwarded_for_gets_the_client_appended(proxied: tuple[str, RawUpstream]) -> None:
    url, upstream = proxied
    upstream.clear()
    for extra in (
        b"",
        b"X-Forwarded-For: 203.0.113.9\r\n",
        b"X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\nX-Forwarded-For: 198.51.100.7\r\n",
        b"X-Forwarded-For: 203.0.113.9\r\nConnection: close, X-Forwarded-For\r\n",  # this hop's only
    ):
        reply, _ = send_raw(
            port_of(url), b"GET /xff HTTP/1.1\r\nHost: gw.test\r\n" + extra + b"Connection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200")
    chains = [[v for k, v in upstream.headers(n) if k == "x-forwarded-for"] for n in range(4)]
    assert chains == [
        ["127.0.0.1"],
        ["203.0.113.9, 127.0.0.1"],
        ["203.0.113.9, 10.0.0.2, 198.51.100.7, 127.0.0.1"],
        ["127.0.0.1"],
    ]
    assert all(dict(upstream.headers(n))["x-forwarded-host"] == "gw.test" for n in range(4))


ODD_ELSEWHERE = ["/echo;v=1", "/files/a%2Fb", "/x//y", "/static/../echo", "/static/%2e%2e/echo", "/a\\b"]


@pytest.mark.parametrize("target", ODD_ELSEWHERE)
def test_odd_paths_away_from_policy_routes_reach_the_upstream_as_sent(
    proxied: tuple[str, RawUpstream], target: str
) -> None:
    url, upstream = proxied
    upstream.clear()
    reply, _ = send_raw(
        port_of(url), f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert upstream.target() == target


@pytest.fixture(scope="module")
def wrapped(secrets_dir: Path) -> Iterator[str]:
    """A Starlette app with a catch-all route that echoes the raw path and the body size,
    wrapped in PHIMiddleware with the shipped policies and a short body deadline."""

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"raw_path": request.scope["raw_path"].decode("latin-1"), "size": len(body)})

    app = Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "PUT"])])
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([POLICIES]),
        keys=DataKeyCache(LocalKeyring.load(secrets_dir / "keyring.json")),
        limits=Limits(body_timeout=BODY_TIMEOUT),
    )
    with ThreadServer(app) as server:
        yield server.url


@pytest.mark.parametrize("target", ODD_ELSEWHERE)
def test_odd_paths_away_from_policy_routes_reach_a_wrapped_app_as_sent(wrapped: str, target: str) -> None:
    reply, _ = send_raw(
        port_of(wrapped), f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply
    assert json.loads(body)["raw_path"] == target


@pytest.mark.parametrize(
    "target", ["/patients;v=1/p-2", "/x/..;/patients/p-2", "/Patients%3Bv=1/p-2", "/fhir//Patient/f-1"]
)
def test_odd_paths_that_could_reach_a_policy_route_never_reach_a_wrapped_app(
    wrapped: str, target: str
) -> None:
    reply, _ = send_raw(
        port_of(wrapped),
        f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    assert json.loads(body)["error"]["code"] == "ambiguous_path"


def test_the_middleware_leaves_a_wrapped_apps_own_bodies_to_it(wrapped: str) -> None:
    """The body deadline is for policy routes (and ProxyApp's pool): a slow upload to a
    route of the app's own is the app's business."""
    with socket.create_connection(("127.0.0.1", port_of(wrapped)), timeout=10) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n")
        for part in (b"ab", b"cd", b"ef"):  # over about twice the deadline
            time.sleep(BODY_TIMEOUT * 0.6)
            sock.sendall(part)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply
    assert json.loads(body)["size"] == 6
