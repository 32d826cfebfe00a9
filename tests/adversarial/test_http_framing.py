"""HTTP framing against ``phi-gateway serve`` as shipped, over raw sockets: smuggling
(CL.TE, TE.CL and every obfuscation of both), hop-by-hop headers named in ``Connection``,
client copies of the headers the gateway sets, and slowloris.

Each case carries its own canary SSN, so a leak names its case. A refused request must
reach the upstream not at all and be answered by a JSON error with a stable code; an
accepted one reaches it only as the gateway's own serialization, tokens in place of PHI.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi_gateway import envelope
from phi_gateway.audit_chain import load_chain_key, verify_chain
from tests.e2e.conftest import Upstream, free_port, proxy_deployment, serve_env, wait_for_port
from tests.loopback import RawUpstream

HEADER_TIMEOUT = 2  # seconds; lowered so slowloris is answered within the test
AUTH = b"X-User: dr-framing\r\nX-Roles: clinician\r\n"


class Recording:
    """The recording upstream, through one long-lived client (a new httpx client costs
    ~50 ms, its TLS context)."""

    def __init__(self, upstream: Upstream) -> None:
        self.url = upstream.url
        self.http = httpx.Client(timeout=20)

    def received(self) -> list[dict[str, Any]]:
        return self.http.get(f"{self.url}/_received").json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        self.http.delete(f"{self.url}/_received")


@dataclass
class Served:
    port: int
    upstream: Recording
    output: Path  # the gateway's stdout and stderr


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        assert self.headers["content-type"] == "application/json", self.headers
        return str(json.loads(self.body)["error"]["code"])


@pytest.fixture(scope="module")
def served(
    secrets_dir: Path, upstream_process: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """``phi-gateway serve`` as shipped (httptools, HeaderDeadlineProtocol), configured by
    the environment, with the hash-chained audit file and a 2 s head deadline."""
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    env = serve_env(
        upstream_process.url,
        secrets_dir,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=HEADER_TIMEOUT,
        audit_sink="file",
        audit_file=tmp / "audit.jsonl",
        audit_chain_key_file=secrets_dir / "chain.key",
    )
    output = tmp / "gateway.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "phi_gateway", "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port)
        recording = Recording(upstream_process)
        with recording.http:
            yield Served(port, recording, output)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    # Nothing of any request is logged or audited; the trail of every case verifies.
    audit = tmp / "audit.jsonl"  # absent when the cases run had no policy route
    logged = output.read_text() + (audit.read_text() if audit.exists() else "")
    assert "-77-" not in logged and "Framing" not in logged
    if audit.exists():
        report = verify_chain(audit, load_chain_key(secrets_dir / "chain.key"))
        assert report.ok and not report.torn_tail, report.message


def canary(case: str) -> str:
    """A distinctive SSN per case: 9xx-77-nnnn, so a leak names the case it came from."""
    n = zlib.crc32(case.encode())
    return f"9{n % 100:02d}-77-{n // 100 % 10000:04d}"


def phi(ssn: str) -> bytes:
    return json.dumps({"first_name": "Framing", "ssn": ssn, "notes": f"seen {ssn}"}).encode()


def head(target: str = "/patients/fr-1", method: str = "PUT", version: str = "HTTP/1.1") -> bytes:
    return f"{method} {target} {version}\r\nHost: gateway.test\r\n".encode() + AUTH


def chunked(body: bytes, eol: bytes = b"\r\n", ext: bytes = b"") -> bytes:
    return b"%x" % len(body) + ext + eol + body + eol + b"0" + eol + eol


def exchange(port: int, raw: bytes, *, timeout: float = 10) -> Reply | None:
    """Send ``raw``, read one response (None if the connection closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> Reply | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)  # a socket timeout here fails the test: the gateway hung
        if not chunk:
            assert not data, f"connection closed inside a response head: {data!r}"
            return None
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return Reply(int(status_line.split()[1]), headers, body)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def assert_nothing_reached(upstream: Recording) -> None:
    received = upstream.received()
    assert received == [], f"the upstream received {len(received)} request(s)"


def assert_only_tokens(upstream: Recording, ssn: str, *, path: str = "/patients/fr-1") -> dict[str, Any]:
    """Exactly one request reached the upstream: the gateway's own serialization."""
    received = upstream.received()
    assert [(r["method"], r["path"]) for r in received] == [("PUT", path)]
    text = repr(received)
    assert ssn not in text and ssn.replace("-", "") not in text
    body = json.loads(received[0]["body"])
    assert envelope.is_token(body["ssn"]) and envelope.is_token(body["notes"])
    headers: dict[str, str] = received[0]["headers"]
    assert headers["content-length"] == str(len(received[0]["body"].encode()))
    assert "transfer-encoding" not in headers
    return headers


def smuggled(ssn: str) -> bytes:
    """A whole second request, for a body a differing parser would read as two."""
    body = phi(ssn)
    return (
        head("/patients/smuggled")
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


BAD = (400, "invalid_request")  # httptools' own refusals, answered as JSON by server.py
CODING = (501, "unsupported_transfer_encoding")
UPGRADE = (400, "upgrade_not_supported")
CL, TE, END = "Content-Length", "Transfer-Encoding", "\r\n\r\n"

# id: (framing after the head's fixed lines, (status, code)). {n} is the body's length,
# {body} the canary document, {chunked} it chunked, {smuggled} a whole second request.
REFUSED: dict[str, tuple[str, tuple[int, str]]] = {
    "cl-te": (f"{CL}: {{n}}\r\n{TE}: chunked{END}{{chunked}}", BAD),
    "te-cl": (f"{TE}: chunked\r\n{CL}: {{n}}{END}{{chunked}}", BAD),
    "cl-te-smuggle": (f"{CL}: 5\r\n{TE}: chunked{END}0{END}{{smuggled}}", BAD),
    "cl-duplicate-equal": (f"{CL}: {{n}}\r\n{CL}: {{n}}{END}{{body}}", BAD),
    "cl-duplicate-conflicting": (f"{CL}: {{n}}\r\n{CL}: 2{END}{{body}}", BAD),
    "cl-list": (f"{CL}: {{n}}, {{n}}{END}{{body}}", BAD),
    "cl-plus": (f"{CL}: +{{n}}{END}{{body}}", BAD),
    "cl-negative": (f"{CL}: -1{END}{{body}}", BAD),
    "cl-hex": (f"{CL}: 0x{{x}}{END}{{body}}", BAD),
    "cl-space-before-colon": (f"{CL} : {{n}}{END}{{body}}", BAD),
    "cl-overflow": (f"{CL}: 99999999999999999999999{END}{{body}}", BAD),
    "te-chunked-identity": (f"{TE}: chunked, identity{END}{{chunked}}", BAD),
    "te-chunked-twice": (f"{TE}: chunked, chunked{END}{{chunked}}", BAD),
    "te-two-fields": (f"{TE}: chunked\r\n{TE}: identity{END}{{chunked}}", BAD),
    "te-space-before-colon": (f"{TE} : chunked{END}{{chunked}}", BAD),
    "te-obs-fold": (f"{TE}:\r\n chunked{END}{{chunked}}", BAD),
    "te-xchunked": (f"{TE}: xchunked{END}{{chunked}}", CODING),
    "te-identity-chunked": (f"{TE}: identity, chunked{END}{{chunked}}", CODING),
    "te-gzip-chunked": (f"{TE}: gzip, chunked{END}{{chunked}}", CODING),
    "te-identity-alone": (f"{TE}: identity{END}{{body}}", CODING),
    "chunk-bare-lf": (f"{TE}: chunked{END}{{chunked_lf}}", BAD),
    "chunk-size-overflow": (f"{TE}: chunked{END}fffffffffffffffff1\r\n{{body}}\r\n0{END}", BAD),
    "chunk-size-not-hex": (f"{TE}: chunked{END}{{n}}g\r\n{{body}}\r\n0{END}", BAD),
    "chunk-longer-than-size": (f"{TE}: chunked{END}2\r\n{{body}}\r\n0{END}", BAD),
    "header-bare-lf": (f"{CL}: {{n}}{END}{{body}}", BAD),  # every CRLF of the head made LF
    "header-nul": (f"{CL}: {{n}}\r\nX-Note: a\x00b{END}{{body}}", BAD),
    "upgrade-h2c-with-body": (
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n{CL}: {{n}}{END}{{body}}",
        UPGRADE,
    ),
    "upgrade-websocket-with-body": (
        f"Connection: Upgrade\r\nUpgrade: websocket\r\n{CL}: {{n}}{END}{{body}}",
        UPGRADE,
    ),
}


def refused_request(case: str, framing: str, version: str = "HTTP/1.1") -> tuple[bytes, str]:
    ssn = canary(case)
    body = phi(ssn)
    text = framing.format(
        n=len(body),
        x=f"{len(body):x}",
        body=body.decode(),
        chunked=chunked(body).decode(),
        chunked_lf=chunked(body, eol=b"\n").decode(),
        smuggled=smuggled(ssn).decode(),
    )
    raw = head(version=version) + b"Content-Type: application/json\r\n" + text.encode("latin-1")
    if case == "header-bare-lf":
        request_head, _, rest = raw.partition(b"\r\n\r\n")
        raw = request_head.replace(b"\r\n", b"\n") + b"\n\n" + rest
    return raw, ssn


@pytest.mark.parametrize(
    ("case", "framing", "expected"), [(k, *v) for k, v in REFUSED.items()], ids=list(REFUSED)
)
def test_ambiguous_framing_is_refused_and_reaches_nothing(
    served: Served, case: str, framing: str, expected: tuple[int, str]
) -> None:
    served.upstream.reset()
    raw, ssn = refused_request(case, framing)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = read_reply(sock)
        assert reply is not None
        assert (reply.status, reply.code) == expected, reply
        assert reply.headers["connection"] == "close" and closed(sock)
    assert ssn.encode() not in reply.body
    assert_nothing_reached(served.upstream)


@pytest.mark.parametrize(
    ("case", "framing"),
    [
        ("http10-te", "Transfer-Encoding: chunked\r\n\r\n{chunked}"),
        ("http10-te-smuggle", "Transfer-Encoding: chunked\r\n\r\n{chunked}{smuggled}"),
        ("http10-te-cl", "Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n{chunked}"),
    ],
    ids=["http10-te", "http10-te-smuggle", "http10-te-cl"],
)
def test_http10_with_transfer_encoding_is_refused(served: Served, case: str, framing: str) -> None:
    """RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing."""
    served.upstream.reset()
    raw, ssn = refused_request(case, framing, version="HTTP/1.0")
    reply = exchange(served.port, raw)
    assert reply is not None and (reply.status, reply.code) == (400, "invalid_request")
    assert ssn.encode() not in reply.body
    assert_nothing_reached(served.upstream)


ACCEPTED = {
    "chunked": f"{TE}: chunked{END}{{chunked}}",
    "chunked-upper-case": f"{TE}: CHUNKED{END}{{chunked}}",
    "chunked-tab": f"{TE}:\tchunked {END}{{chunked}}",
    "chunk-extension": f"{TE}: chunked{END}{{chunked_ext}}",
    "cl-leading-zeros": f"{CL}: 00{{n}}{END}{{body}}",
    "expect-100-continue": f"Expect: 100-continue\r\n{CL}: {{n}}{END}{{body}}",
    "http10-content-length": f"{CL}: {{n}}{END}{{body}}",
}


@pytest.mark.parametrize(("case", "framing"), ACCEPTED.items(), ids=list(ACCEPTED))
def test_framing_the_gateway_accepts_reaches_the_upstream_reframed(
    served: Served, case: str, framing: str
) -> None:
    """Valid framing is read, and the upstream gets the gateway's own bytes with one exact
    Content-Length: never the client's framing."""
    served.upstream.reset()
    ssn = canary(case)
    body = phi(ssn)
    text = framing.format(
        n=len(body),
        body=body.decode(),
        chunked=chunked(body).decode(),
        chunked_ext=chunked(body, ext=b';name="v"').decode(),
    )
    version = "HTTP/1.0" if case.startswith("http10") else "HTTP/1.1"
    raw = head(version=version) + b"Content-Type: application/json\r\n" + text.encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = read_reply(sock)
        if reply is not None and reply.status == 100:
            reply = read_reply(sock)
    assert reply is not None and reply.status == 200, reply
    assert json.loads(reply.body)["ssn"] == ssn  # the client reads its own plaintext back
    assert_only_tokens(served.upstream, ssn)


def test_a_pipelined_request_after_a_body_is_its_own_request(served: Served) -> None:
    """Bytes after a Content-Length body are the next request, and go through the policy."""
    served.upstream.reset()
    ssn = canary("pipelined")
    body = phi(ssn)
    first = head() + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(first + smuggled(ssn))
        replies = [read_reply(sock), read_reply(sock)]
    assert [r.status for r in replies if r is not None] == [200, 200]
    received = served.upstream.received()
    assert [r["path"] for r in received] == ["/patients/fr-1", "/patients/smuggled"]
    assert ssn not in repr(received)
    assert all(envelope.is_token(json.loads(r["body"])["ssn"]) for r in received)


def test_an_upgrade_without_a_body_is_plain_http_and_ends_the_connection(served: Served) -> None:
    """No protocol is upgraded (the gateway relays HTTP only). llhttp would read any later
    byte on the connection as upgraded data, so the gateway closes it after the response:
    a request pipelined behind is never answered nor forwarded."""
    served.upstream.reset()
    ssn = canary("upgrade-get")
    raw = (
        head("/patients/nobody", method="GET")
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        + smuggled(ssn)
    )
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = read_reply(sock)
        assert reply is not None and reply.status == 404  # the upstream's answer, relayed
        assert reply.headers["connection"] == "close" and closed(sock)
    received = served.upstream.received()
    assert [(r["method"], r["path"]) for r in received] == [("GET", "/patients/nobody")]
    assert "upgrade" not in received[0]["headers"] and "sec-websocket-key" in received[0]["headers"]


def test_connect_and_absolute_targets_are_refused(served: Served) -> None:
    served.upstream.reset()
    for raw, code in (
        (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n", "invalid_request"),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", "ambiguous_path"),
    ):
        reply = exchange(served.port, raw)
        assert reply is not None and (reply.status, reply.code) == (400, code)
    assert served.upstream.received() == []


@pytest.fixture(scope="module")
def recorded(secrets_dir: Path) -> Iterator[tuple[int, RawUpstream]]:
    """The gateway (in-thread, the server options ``serve`` uses) in front of a raw recorder."""
    with (
        RawUpstream() as recorder,
        proxy_deployment(Upstream(f"http://127.0.0.1:{recorder.port}"), secrets_dir) as gateway,
    ):
        yield int(gateway.url.rsplit(":", 1)[1]), recorder


def put_recorded(
    recorded: tuple[int, RawUpstream], case: str, extra: bytes
) -> tuple[Reply, list[tuple[str, str]]]:
    """PUT a canary through the gateway; the headers the upstream got, after checking that
    it got exactly one request, tokens only, framed by the gateway."""
    port, recorder = recorded
    recorder.clear()
    ssn = canary(case)
    body = phi(ssn)
    raw = (
        head()
        + extra
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    reply = exchange(port, raw)
    assert reply is not None and reply.status == 200, reply
    (forwarded,) = recorder.requests
    assert ssn.encode() not in forwarded and ssn.replace("-", "").encode() not in forwarded
    sent = json.loads(forwarded.split(b"\r\n\r\n", 1)[1])
    assert envelope.is_token(sent["ssn"]) and envelope.is_token(sent["notes"])
    headers = recorder.headers()
    assert [v for k, v in headers if k == "content-length"] == [str(len(forwarded.split(b"\r\n\r\n", 1)[1]))]
    assert "transfer-encoding" not in dict(headers)
    return reply, headers


CONNECTION_CASES = [
    (
        "connection-authorization",
        "close, Authorization",
        b"Authorization: Bearer not-for-the-upstream\r\n",
        ["authorization"],
        [],
    ),
    ("connection-identity-header", "X-User", b"", ["x-user"], ["x-roles"]),
    (
        "connection-custom-and-standard-hops",
        "keep-alive, X-Hop",
        b"X-Hop: one hop only\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nX-Kept: end-to-end\r\n",
        ["x-hop", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"],
        ["x-kept"],
    ),
    (
        "connection-names-what-the-gateway-sets",
        "Content-Length, Content-Type, Host, X-Request-ID, Accept-Encoding, X-Forwarded-For",
        b"",
        [],
        ["content-length", "content-type", "host", "x-request-id", "accept-encoding", "x-forwarded-for"],
    ),
]


@pytest.mark.parametrize(
    ("case", "connection", "extra", "gone", "kept"), CONNECTION_CASES, ids=[c[0] for c in CONNECTION_CASES]
)
def test_headers_named_in_connection_are_hop_by_hop_except_the_gateways_own(
    recorded: tuple[int, RawUpstream],
    case: str,
    connection: str,
    extra: bytes,
    gone: list[str],
    kept: list[str],
) -> None:
    """A header named in Connection is for the gateway alone (it still authenticates with
    it), but a client cannot strip what the gateway sets for the upstream by naming it."""
    reply, headers = put_recorded(recorded, case, f"Connection: {connection}\r\n".encode() + extra)
    names = [name for name, _ in headers]
    assert not [name for name in [*gone, "connection"] if name in names]
    assert all(names.count(name) == 1 for name in kept)
    if "X-Request-ID" in connection:
        found = dict(headers)
        assert found["x-request-id"] == reply.headers["x-request-id"]
        assert found["accept-encoding"] == "identity"  # the gateway decrypts this response
        assert found["x-forwarded-for"] == "127.0.0.1"


def test_client_copies_of_gateway_headers_are_replaced(recorded: tuple[int, RawUpstream]) -> None:
    extra = (
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.7\r\n"
        b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
        b"Forwarded: for=203.0.113.9;host=evil.example;proto=https\r\n"
        b"X-Request-ID: first-id\r\nX-Request-ID: second-id\r\n"
        b"Accept-Encoding: gzip, br\r\nX-Break-Glass-Reason: not for the upstream\r\n"
    )
    reply, headers = put_recorded(recorded, "gateway-headers", extra)
    recorder = recorded[1]
    assert b"evil.example" not in recorder.requests[0]
    values = {name: [v for k, v in headers if k == name] for name, _ in headers}
    assert values["x-forwarded-for"] == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]  # appended, as nginx does
    assert values["x-forwarded-host"] == ["gateway.test"]  # the Host the gateway was reached by
    assert values["x-forwarded-proto"] == ["http"]
    assert values["accept-encoding"] == ["identity"]
    assert values["host"] == [f"127.0.0.1:{recorder.port}"]
    assert "forwarded" not in values and "x-break-glass-reason" not in values
    # One request id, the one the client is told; never both copies of a repeated header.
    assert values["x-request-id"] == [reply.headers["x-request-id"]]


def test_slowloris_gets_408_while_other_clients_are_served(served: Served) -> None:
    """Ten clients trickle their request heads, and two their bodies, at 1 byte/s: each
    gets a JSON 408 at the deadline and a closed connection. A normal client sent during
    the trickle is answered before any of them, and only its request reaches the upstream."""
    served.upstream.reset()
    ssn = canary("slowloris")
    body = phi(ssn)
    full_head = head() + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    slow: list[tuple[socket.socket, bytes]] = []
    for _ in range(10):
        slow.append((socket.create_connection(("127.0.0.1", served.port), timeout=10), full_head + body))
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        sock.sendall(full_head)  # the head arrives whole; the body trickles
        slow.append((sock, body))
    stop = threading.Event()

    def trickle() -> None:
        for offset in range(len(full_head) + len(body)):
            for sock, data in slow:
                if offset < len(data):
                    with contextlib.suppress(OSError):  # already answered and closed
                        sock.send(data[offset : offset + 1])
            if stop.wait(1.0):
                return

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.3)  # the trickle has begun
        normal_ssn = canary("slowloris-normal")
        with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=10) as client:
            normal = client.put(
                "/patients/fr-normal",
                content=phi(normal_ssn),
                headers={"Content-Type": "application/json", "X-User": "dr-normal", "X-Roles": "clinician"},
            )
        # Answered while every slow client still waits for its deadline.
        pending, _, _ = select.select([sock for sock, _ in slow], [], [], 0)
        assert pending == []
        replies = [read_reply(sock) for sock, _ in slow]
        assert all(closed(sock) for sock, _ in slow)
    finally:
        stop.set()
        trickler.join(5)
        for sock, _ in slow:
            sock.close()
    assert normal.status_code == 200 and normal.json()["ssn"] == normal_ssn
    for reply in replies:
        assert reply is not None and (reply.status, reply.code) == (408, "request_timeout")
    received = served.upstream.received()
    assert [r["path"] for r in received] == ["/patients/fr-normal"]
    assert ssn not in repr(received) and normal_ssn not in repr(received)
