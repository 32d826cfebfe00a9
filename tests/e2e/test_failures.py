"""Faults around the gateway: upstream down, hanging or truncating, the key service down,
``phi-gateway serve`` as shipped. Nothing reaches the upstream that should not, and every
refusal is a JSON error with a stable code. Smuggling, hop-by-hop headers and slowloris
are in ``tests/adversarial/test_http_framing.py``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.cli_serve import serve
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.gateway import Gateway
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from tests.e2e.conftest import (
    AUTH,
    POLICIES,
    ThreadServer,
    Upstream,
    free_port,
    proxy_config,
    proxy_deployment,
    serve_env,
    wait_for_port,
)
from tests.loopback import LoopbackServer

PATIENT = json.loads((Path(__file__).parents[1] / "samples" / "patient.json").read_text())


class FakeUpstream(LoopbackServer):
    """A TCP server on loopback that misbehaves as told, counting connections."""

    def __init__(self, behaviour: str) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if self.behaviour == "hang":
            await asyncio.sleep(30)
        elif self.behaviour == "truncate":
            body = b'[{"id": "p-1", "ssn": "phi:AQE'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n" + body
            )
            await writer.drain()
        elif self.behaviour == "reset":
            writer.transport.abort()
            return
        elif self.behaviour == "text":
            body = b"ssn=123-45-6789"  # a legacy endpoint answering a protected route in plain text
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        elif self.behaviour == "redirect":
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {self.url}/patients/p-7\r\n".encode()
                + b"Content-Location: https://elsewhere.example/x\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()
        writer.close()


@pytest.mark.parametrize(
    ("behaviour", "method", "path", "status", "code"),
    [
        ("reset", "POST", "/patients", 502, "upstream_unavailable"),
        ("reset", "PUT", "/patients/p-1", 502, "upstream_unavailable"),
        ("reset", "GET", "/anything", 502, "upstream_unavailable"),
        ("hang", "GET", "/patients", 504, "upstream_timeout"),
        ("truncate", "GET", "/patients", 502, "upstream_unavailable"),
        ("text", "GET", "/patients", 502, "upstream_not_json"),
    ],
)
def test_upstream_faults_are_json_errors(
    secrets_dir: Path, behaviour: str, method: str, path: str, status: int, code: str
) -> None:
    with (
        FakeUpstream(behaviour) as fake,
        proxy_deployment(Upstream(fake.url), secrets_dir, upstream_read_timeout=0.5) as gateway,
        gateway.client() as client,
    ):
        response = client.request(method, path, json=PATIENT if method in ("PUT", "POST") else None)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    # A POST is never sent twice; an idempotent request may be retried once on a dropped
    # connection (RFC 9110 9.2.2, aiohttp's behaviour for stale keep-alive connections).
    assert len(fake.requests) == (1 if method == "POST" or behaviour != "reset" else 2)
    assert all(b"123-45-6789" not in request for request in fake.requests)


def test_upstream_refusing_connections_is_502(secrets_dir: Path) -> None:
    with (
        proxy_deployment(Upstream(f"http://127.0.0.1:{free_port()}"), secrets_dir) as gateway,
        gateway.client() as c,
    ):
        response = c.get("/patients/p-1")
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unavailable"


@pytest.fixture(params=["proxy", "middleware"])
def kms_down(
    request: pytest.FixtureRequest, secrets_dir: Path, upstream_process: Upstream, tmp_path: Path
) -> Iterator[tuple[ThreadServer, Upstream]]:
    """KMS as the key service, and KMS unreachable: the standalone proxy in front of the
    demo API, and the demo API wrapped in PHIMiddleware."""
    kms_key = "arn:aws:kms:us-east-1:111122223333:key/k"
    nowhere = f"http://127.0.0.1:{free_port()}"
    if request.param == "proxy":
        upstream_process.reset(data=True)
        config = proxy_config(
            upstream_process.url, secrets_dir, keyring=None, kms_key_ids=[kms_key], aws_endpoint_url=nowhere
        )
        with ThreadServer(Gateway(config)) as server:
            yield server, upstream_process
        return
    app = create_upstream(str(tmp_path / "inner.sqlite"), record=True)
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([POLICIES]),
        keys=DataKeyCache(KmsKeyProvider([kms_key], AwsSettings(endpoint_url=nowhere))),
        pepper=Pepper.load(secrets_dir / "pepper.json"),
        identity=Identity(
            IdentitySettings(
                principal_header="X-User", roles_header="X-Roles", trusted_proxies=("127.0.0.1",)
            )
        ),
    )
    with ThreadServer(app) as server:
        yield server, Upstream(server.url)


def test_key_service_down_is_503_with_retry_after_and_nothing_forwarded(
    kms_down: tuple[ThreadServer, Upstream],
) -> None:
    server, upstream = kms_down
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        write = client.put("/patients/p-1", json=PATIENT)
        search = client.get("/patients", params={"ssn": "123-45-6789"})
    assert write.status_code == 503, write.text
    assert write.json()["error"]["code"] == "key_service_unavailable"
    assert write.headers["retry-after"].isdigit()
    assert [r["method"] for r in upstream.received()] == [
        "GET"
    ]  # the search needs no key; the write went nowhere
    assert search.status_code == 200 and "123-45-6789" not in repr(upstream.received())


def test_unmatched_deny_refuses_other_routes(
    tmp_path: Path, secrets_dir: Path, upstream_process: Upstream
) -> None:
    text = (
        (POLICIES / "patients.yaml")
        .read_text()
        .replace("data_key: per_record", "data_key: per_record\nunmatched: deny")
    )
    (tmp_path / "patients.yaml").write_text(text)
    upstream_process.reset(data=True)
    gateway = Gateway(proxy_config(upstream_process.url, secrets_dir, policies=[str(tmp_path)]))
    with ThreadServer(gateway) as server, httpx.Client(base_url=server.url, headers=AUTH) as client:
        denied = client.get("/admin/export")
        allowed = client.get("/patients/nobody")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "route_not_allowed"
    assert allowed.status_code == 404
    assert [r["path"] for r in upstream_process.received()] == ["/patients/nobody"]


@pytest.fixture(scope="module")
def served(
    secrets_dir: Path, upstream_process: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """``phi-gateway serve`` as shipped, two workers (so ``--admin-port 0``: metrics are per
    process), configured through the environment; each worker keeps its own audit file
    (``audit-{pid}.jsonl``) in the directory yielded with the URL."""
    port = free_port()
    audit = tmp_path_factory.mktemp("served-audit")
    env = serve_env(
        upstream_process.url,
        secrets_dir,
        trusted_proxies="127.0.0.1,::1",
        admin_port=None,  # the default, 9090, unless the flag below says otherwise
        audit_sink="file",
        audit_file=audit / "audit-{pid}.jsonl",
        audit_chain_key_file=secrets_dir / "chain.key",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phi_gateway",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--admin-port",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", audit
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
        assert "123-45-6789" not in output  # nothing of the requests is logged


def test_serve_round_trip(served: tuple[str, Path], upstream_process: Upstream) -> None:
    url, _ = served
    upstream_process.reset(data=True)
    with httpx.Client(base_url=url, headers=AUTH) as client:
        assert client.put("/patients/sv-1", json=PATIENT).status_code == 200
        for _ in range(6):  # new connections land on either worker; both hold the same keys
            with httpx.Client(base_url=url, headers=AUTH) as fresh:
                assert fresh.get("/patients", params={"ssn": "123-45-6789"}).json()[0]["ssn"] == "123-45-6789"
    assert "123-45-6789" not in repr(upstream_process.received())


def test_serve_with_two_workers_serves_from_both(served: tuple[str, Path]) -> None:
    """Every policy request is audited by the worker that served it, in that worker's own
    file: events in two files are requests served by two processes."""
    url, audit = served

    async def burst() -> list[httpx.Response]:
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection, maybe another worker
        async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=fresh, timeout=20) as client:
            return await asyncio.gather(*(client.get("/patients/nobody") for _ in range(8)))

    def writers() -> set[Path]:
        return {path for path in audit.glob("audit-*.jsonl") if path.stat().st_size > 0}

    deadline = time.monotonic() + 60
    while len(writers()) < 2 and time.monotonic() < deadline:
        assert all(r.status_code == 404 for r in asyncio.run(burst()))
        time.sleep(0.1)  # the audit trail writes in the background
    assert len(writers()) == 2


def test_serve_says_what_several_workers_need() -> None:
    """The admin port (default 9090) serves one process: more workers need it off, and both
    the refusal and ``--help`` say how."""
    runner = CliRunner(env={name: None for name in os.environ if name.startswith("PHI_GATEWAY_")})
    refused = runner.invoke(serve, ["--upstream", "http://127.0.0.1:1", "--keyring", "k", "--workers", "2"])
    assert refused.exit_code == 1
    assert "workers: 2 needs the admin port off" in refused.output
    assert "--admin-port 0" in refused.output and "PHI_GATEWAY_ADMIN_PORT=0" in refused.output
    assert "More than one needs --admin-port 0" in " ".join(runner.invoke(serve, ["--help"]).output.split())


def test_redirects_to_the_upstream_point_back_at_the_gateway(secrets_dir: Path) -> None:
    with (
        FakeUpstream("redirect") as fake,
        proxy_deployment(Upstream(fake.url), secrets_dir) as gateway,
        gateway.client() as client,
    ):
        response = client.put("/patients/p-7/", json=PATIENT)
    assert response.status_code == 307
    assert response.headers["location"] == "/patients/p-7"  # relative: the client comes back through us
    assert response.headers["content-location"] == "https://elsewhere.example/x"  # not ours to rewrite
    assert fake.url.encode() not in repr(response.headers).encode()


def test_request_target_that_is_not_a_path_is_refused(secrets_dir: Path, upstream_process: Upstream) -> None:
    upstream_process.reset(data=True)
    with proxy_deployment(upstream_process, secrets_dir) as gateway:
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"ambiguous_path" in reply
    assert upstream_process.received() == []


def test_a_failed_startup_stops_serve(secrets_dir: Path, upstream_process: Upstream) -> None:
    env = serve_env(
        upstream_process.url,
        secrets_dir,
        pepper=None,
        pepper_secret_id="phi/pepper",
        aws_region="us-east-1",
        aws_endpoint_url=f"http://127.0.0.1:{free_port()}",  # Secrets Manager unreachable
    )
    done = subprocess.run(
        [sys.executable, "-m", "phi_gateway", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "Application startup failed" in done.stdout + done.stderr


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phi-gateway test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_serve_speaks_tls_when_given_a_certificate(
    secrets_dir: Path, upstream_process: Upstream, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = serve_env(upstream_process.url, secrets_dir, audit_sink="none", tls_certfile=cert, tls_keyfile=key)
    process = subprocess.Popen(
        [sys.executable, "-m", "phi_gateway", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", headers=AUTH, verify=trusted) as client:
            written = client.put("/patients/tls-1", json={"id": "tls-1", "ssn": "078-05-1120"})
            assert written.status_code == 200 and written.json()["ssn"] == "078-05-1120"
        stored = httpx.get(f"{upstream_process.url}/patients/tls-1").json()
        assert stored["ssn"].startswith("phi:")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/patients/tls-1", headers=AUTH, timeout=5)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    from phi_gateway.config import ConfigError, GatewayConfig

    cert, _ = _self_signed(tmp_path)
    with pytest.raises(ConfigError, match="both"):
        GatewayConfig(upstream="http://127.0.0.1:1", keyring="k", tls_certfile=str(cert)).check()
